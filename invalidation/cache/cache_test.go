package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/leakcheck"
)

// TestMain fails the package when a test leaves goroutines of the code
// under test behind.
func TestMain(m *testing.M) { leakcheck.Main(m, "tidemark/invalidation/cache.", "dgraph-io/ristretto") }

// newReady returns a cache fed by the test (no Follow), already Ready.
func newReady[V any](t *testing.T, cfg Config[V]) *Cache[V] {
	t.Helper()
	c, err := New(cfg, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(c.Close)
	if err := c.SetReady(true); err != nil {
		t.Fatalf("SetReady: %v", err)
	}
	return c
}

// tracked counts the keys whose generation the cache tracks (those with a
// load in flight).
func (c *Cache[V]) tracked() int {
	n := 0
	for i := range c.shards {
		c.shards[i].mu.Lock()
		n += len(c.shards[i].m)
		c.shards[i].mu.Unlock()
	}
	return n
}

// db is a fake database: one version per key. A writer bumps the version and
// then invalidates, as the pipeline does (commit, then invalidation).
type db struct {
	mu       sync.Mutex
	versions map[string]*atomic.Int64
	applied  map[string]*atomic.Int64 // highest version whose Invalidate returned
}

func newDB(keys ...string) *db {
	d := &db{versions: map[string]*atomic.Int64{}, applied: map[string]*atomic.Int64{}}
	for _, k := range keys {
		d.versions[k] = new(atomic.Int64)
		d.applied[k] = new(atomic.Int64)
	}
	return d
}

func (d *db) read(key string) int64 { return d.versions[key].Load() }

// write commits a change of key and applies its invalidation to c.
func (d *db) write(c *Cache[int64], key string) int64 {
	v := d.versions[key].Add(1)
	c.Invalidate(key)
	for {
		a := d.applied[key].Load()
		if a >= v || d.applied[key].CompareAndSwap(a, v) {
			return v
		}
	}
}

// TestStaleFillRefused forces the interleaving of the lease problem: a load
// reads the database, the row changes and its invalidation is applied, and
// only then does the load return. The old value must be returned to the
// caller but never cached.
func TestStaleFillRefused(t *testing.T) {
	const iterations = 2000
	ctx := context.Background()

	t.Run("invalidation applied while loading", func(t *testing.T) {
		c := newReady(t, Config[int64]{})
		d := newDB("room:!r1:members", "room:!r2:members", "unread:@u:!r1")
		keys := []string{"room:!r1:members", "room:!r2:members", "unread:@u:!r1"}
		for i := range iterations {
			key := keys[i%len(keys)]
			c.Invalidate(key) // drop the previous iteration's fill so that this one loads
			loaded := make(chan struct{})
			applied := make(chan struct{})
			go func() {
				<-loaded // the load has read the database
				d.write(c, key)
				close(applied)
			}()
			var read int64
			got, err := c.GetOrLoad(ctx, key, func(context.Context) (int64, error) {
				read = d.read(key)
				close(loaded)
				<-applied // return only after the invalidation was applied
				return read, nil
			})
			if err != nil || got != read {
				t.Fatalf("iteration %d: GetOrLoad = %d, %v; want the loaded value %d", i, got, err, read)
			}
			if v, ok := c.Get(key); ok {
				t.Fatalf("iteration %d: stale fill cached: Get(%q) = %d, database is at %d", i, key, v, d.read(key))
			}
			// A load that starts after the invalidation fills normally.
			got, err = c.GetOrLoad(ctx, key, func(context.Context) (int64, error) { return d.read(key), nil })
			if err != nil || got != d.read(key) {
				t.Fatalf("iteration %d: fresh GetOrLoad = %d, %v; want %d", i, got, err, d.read(key))
			}
			if v, ok := c.Get(key); !ok || v != d.read(key) {
				t.Fatalf("iteration %d: fresh fill: Get = %d, %v; want %d", i, v, ok, d.read(key))
			}
		}
		st := c.Stats()
		if st.RefusedFills != iterations {
			t.Errorf("RefusedFills = %d, want %d", st.RefusedFills, iterations)
		}
		if n := c.tracked(); n != 0 {
			t.Errorf("%d keys still tracked after all loads finished", n)
		}
	})

	t.Run("invalidation applied between Set and its application", func(t *testing.T) {
		c := newReady(t, Config[int64]{})
		d := newDB("k")
		var hookErr atomic.Value
		c.afterSet = func(key string) {
			d.write(c, key)
			// Invalidate has returned: the fill just handed to ristretto must
			// not be visible, now or later.
			if v, ok := c.Get(key); ok {
				hookErr.CompareAndSwap(nil, fmt.Errorf("right after Invalidate, Get(%q) = %d (database %d)", key, v, d.read(key)))
			}
		}
		for i := range iterations {
			got, err := c.GetOrLoad(ctx, "k", func(context.Context) (int64, error) { return d.read("k"), nil })
			if err != nil || got != d.read("k")-1 {
				t.Fatalf("iteration %d: GetOrLoad = %d, %v; want %d", i, got, err, d.read("k")-1)
			}
			if err, _ := hookErr.Load().(error); err != nil {
				t.Fatalf("iteration %d: %v", i, err)
			}
			if v, ok := c.Get("k"); ok {
				t.Fatalf("iteration %d: stale fill cached: Get = %d, database is at %d", i, v, d.read("k"))
			}
		}
		if st := c.Stats(); st.Fills != iterations || st.RevokedFills != iterations {
			t.Errorf("Fills = %d, RevokedFills = %d; want %d each", st.Fills, st.RevokedFills, iterations)
		}
	})
}

// TestStaleFillStress runs loads and invalidations of a few keys from many
// goroutines, while the cache leaves and re-enters Ready (as Follow does
// when it positions again). Each writer bumps the database version before
// invalidating. Checked all along: once Invalidate(key) has returned for
// version v, neither Get nor GetOrLoad returns a version below v. Checked at
// the end, after an invalidation-free period of loads: every cached value is
// the database's version.
func TestStaleFillStress(t *testing.T) {
	keys := []string{"a", "b", "c", "d"}
	c := newReady(t, Config[int64]{})
	d := newDB(keys...)
	ctx := context.Background()

	var failed atomic.Int64
	var once sync.Once
	fail := func(format string, args ...any) {
		failed.Add(1)
		once.Do(func() { t.Errorf(format, args...) })
	}
	// loaders runs n goroutines of GetOrLoad on random keys until stop.
	loaders := func(n int, seed uint64, stop <-chan struct{}) *sync.WaitGroup {
		var wg sync.WaitGroup
		for w := range n {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(seed, uint64(w)))
				for {
					select {
					case <-stop:
						return
					default:
					}
					key := keys[rng.IntN(len(keys))]
					floor := d.applied[key].Load()
					got, err := c.GetOrLoad(ctx, key, func(context.Context) (int64, error) {
						v := d.read(key)
						if rng.IntN(4) == 0 {
							time.Sleep(time.Duration(rng.IntN(50)) * time.Microsecond)
						} else {
							runtime.Gosched()
						}
						return v, nil
					})
					if err != nil {
						fail("GetOrLoad(%q): %v", key, err)
					} else if got < floor {
						fail("GetOrLoad(%q) = %d after the invalidation of version %d was applied", key, got, floor)
					}
				}
			})
		}
		return &wg
	}

	stop := make(chan struct{})
	busy := loaders(32, 1, stop)
	var writers sync.WaitGroup
	for w := range 4 {
		writers.Go(func() {
			rng := rand.New(rand.NewPCG(2, uint64(w)))
			for range 3000 {
				key := keys[rng.IntN(len(keys))]
				v := d.write(c, key)
				if got, ok := c.Get(key); ok && got < v {
					fail("Get(%q) = %d right after the invalidation of version %d returned", key, got, v)
				}
				if rng.IntN(8) == 0 {
					time.Sleep(time.Duration(rng.IntN(100)) * time.Microsecond)
				}
			}
		})
	}
	toggler := make(chan struct{})
	go func() {
		defer close(toggler)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if err := c.SetReady(i%4 != 0); err != nil { // Ready three quarters of the time
				fail("SetReady: %v", err)
			}
		}
	}()
	writers.Wait()
	close(stop)
	busy.Wait()
	<-toggler
	if err := c.SetReady(true); err != nil {
		t.Fatal(err)
	}

	// The invalidation-free period.
	stop = make(chan struct{})
	quiet := loaders(8, 3, stop)
	time.Sleep(50 * time.Millisecond)
	close(stop)
	quiet.Wait()

	cached := 0
	for _, key := range keys {
		if got, ok := c.Get(key); ok {
			cached++
			if got != d.read(key) {
				t.Errorf("after the writers stopped, Get(%q) = %d; database is at %d", key, got, d.read(key))
			}
		}
	}
	st := c.Stats()
	t.Logf("stats: %+v, cached at the end: %d of %d, violations: %d", st, cached, len(keys), failed.Load())
	if st.RefusedFills == 0 || cached == 0 {
		t.Errorf("the stress did not exercise the race: %d fills refused, %d keys cached at the end", st.RefusedFills, cached)
	}
	if n := c.tracked(); n != 0 {
		t.Errorf("%d keys still tracked after all loads finished", n)
	}
}

func TestGetOrLoad(t *testing.T) {
	ctx := context.Background()
	errDB := errors.New("database down")

	t.Run("a load is cached and Invalidate removes it", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		calls := 0
		load := func(context.Context) (string, error) { calls++; return fmt.Sprintf("v%d", calls), nil }
		if got, err := c.GetOrLoad(ctx, "k", load); err != nil || got != "v1" {
			t.Fatalf("GetOrLoad = %q, %v; want v1", got, err)
		}
		if got, ok := c.Get("k"); !ok || got != "v1" {
			t.Fatalf("Get = %q, %v; want v1, true", got, ok)
		}
		if got, err := c.GetOrLoad(ctx, "k", load); err != nil || got != "v1" || calls != 1 {
			t.Fatalf("second GetOrLoad = %q, %v after %d loads; want v1 from the cache", got, err, calls)
		}
		c.Invalidate("k")
		if got, ok := c.Get("k"); ok {
			t.Fatalf("after Invalidate, Get = %q, true", got)
		}
		if got, err := c.GetOrLoad(ctx, "k", load); err != nil || got != "v2" {
			t.Fatalf("GetOrLoad after Invalidate = %q, %v; want v2", got, err)
		}
	})

	t.Run("a load error is returned and nothing is cached", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		if _, err := c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { return "partial", errDB }); !errors.Is(err, errDB) {
			t.Fatalf("GetOrLoad error = %v, want %v", err, errDB)
		}
		if got, ok := c.Get("k"); ok {
			t.Fatalf("Get after a failed load = %q, true", got)
		}
	})

	t.Run("a panicking load is an error", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		_, err := c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { panic("boom") })
		if err == nil || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("GetOrLoad error = %v, want the panic", err)
		}
		if _, ok := c.Get("k"); ok {
			t.Fatal("a panicking load was cached")
		}
	})

	t.Run("nothing is cached before Ready or by a load that started before", func(t *testing.T) {
		c, err := New(Config[string]{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		if c.Ready() {
			t.Fatal("a new cache is Ready")
		}
		if got, err := c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { return "v", nil }); err != nil || got != "v" {
			t.Fatalf("GetOrLoad = %q, %v", got, err)
		}
		if _, ok := c.Get("k"); ok {
			t.Fatal("cached before Ready")
		}
		release := make(chan struct{})
		done := make(chan struct{})
		started := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { close(started); <-release; return "old", nil })
		}()
		<-started
		if err := c.SetReady(true); err != nil {
			t.Fatal(err)
		}
		close(release)
		<-done
		if got, ok := c.Get("k"); ok {
			t.Fatalf("a load that started before Ready was cached: %q", got)
		}
		if st := c.Stats(); st.NotReady != 2 {
			t.Fatalf("NotReady = %d, want 2", st.NotReady)
		}
		_, _ = c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { return "new", nil })
		if got, ok := c.Get("k"); !ok || got != "new" {
			t.Fatalf("after Ready, Get = %q, %v; want new", got, ok)
		}
		if err := c.SetReady(false); err != nil {
			t.Fatal(err)
		}
		if got, ok := c.Get("k"); ok {
			t.Fatalf("SetReady(false) kept %q", got)
		}
	})

	t.Run("a load that spans leaving Ready is not cached", func(t *testing.T) {
		// While not Ready invalidations may be missed (Follow stopped), so a
		// load that started before cannot know whether its key changed.
		c := newReady(t, Config[string]{})
		started := make(chan struct{})
		release := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { close(started); <-release; return "old", nil })
		}()
		<-started
		if err := c.SetReady(false); err != nil {
			t.Fatal(err)
		}
		// "k" changes here; its invalidation is not delivered.
		if err := c.SetReady(true); err != nil {
			t.Fatal(err)
		}
		close(release)
		<-done
		if got, ok := c.Get("k"); ok {
			t.Fatalf("a load that started before Ready was left was cached: %q", got)
		}
		if st := c.Stats(); st.RefusedFills != 1 {
			t.Fatalf("RefusedFills = %d, want 1 %+v", st.RefusedFills, st)
		}
	})

	t.Run("concurrent callers share one load and each gets the value", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		var calls atomic.Int32
		release := make(chan struct{})
		load := func(context.Context) (string, error) { calls.Add(1); <-release; return "v", nil }
		const n = 20
		results := make(chan string, n)
		go func() {
			v, _ := c.GetOrLoad(ctx, "k", load)
			results <- v
		}()
		waitFor(t, func() bool { return calls.Load() == 1 })
		for range n - 1 {
			go func() {
				v, _ := c.GetOrLoad(ctx, "k", load)
				results <- v
			}()
		}
		waitFor(t, func() bool { return waiters(c, "k") == n })
		close(release)
		for range n {
			if v := <-results; v != "v" {
				t.Fatalf("a caller got %q", v)
			}
		}
		if calls.Load() != 1 {
			t.Fatalf("%d loads, want 1", calls.Load())
		}
	})

	t.Run("a caller after an invalidation does not join the older load", func(t *testing.T) {
		c := newReady(t, Config[int64]{})
		d := newDB("k")
		release := make(chan struct{})
		first := make(chan int64, 1)
		go func() {
			v, _ := c.GetOrLoad(ctx, "k", func(context.Context) (int64, error) { v := d.read("k"); <-release; return v, nil })
			first <- v
		}()
		waitFor(t, func() bool { return waiters(c, "k") == 1 })
		v := d.write(c, "k")
		// Joining the older load would block until release (and then return
		// the old version): bound the wait so that the test fails instead.
		jctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		got, err := c.GetOrLoad(jctx, "k", func(context.Context) (int64, error) { return d.read("k"), nil })
		if err != nil || got != v {
			close(release)
			t.Fatalf("GetOrLoad after the invalidation = %d, %v; want %d", got, err, v)
		}
		close(release)
		if old := <-first; old != v-1 {
			t.Fatalf("first caller got %d, want %d", old, v-1)
		}
		if got, ok := c.Get("k"); !ok || got != v {
			t.Fatalf("Get = %d, %v; want %d (the older load must not overwrite it)", got, ok, v)
		}
	})

	t.Run("a caller whose context ends returns at once; the others still get the value", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		release := make(chan struct{})
		var loadCtx context.Context
		started := make(chan struct{})
		load := func(ctx context.Context) (string, error) {
			loadCtx = ctx
			close(started)
			<-release
			return "v", nil
		}
		cctx, cancel := context.WithCancel(ctx)
		errc := make(chan error, 1)
		go func() { _, err := c.GetOrLoad(cctx, "k", load); errc <- err }()
		<-started
		other := make(chan string, 1)
		go func() { v, _ := c.GetOrLoad(ctx, "k", load); other <- v }()
		waitFor(t, func() bool { return waiters(c, "k") == 2 })
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled caller got %v", err)
		}
		if loadCtx.Err() != nil {
			t.Fatal("the load was cancelled although a caller still waits")
		}
		close(release)
		if v := <-other; v != "v" {
			t.Fatalf("other caller got %q", v)
		}
	})

	t.Run("the load is cancelled when every caller gave up", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		cctx, cancel := context.WithCancel(ctx)
		cancelled := make(chan struct{})
		errc := make(chan error, 1)
		go func() {
			_, err := c.GetOrLoad(cctx, "k", func(ctx context.Context) (string, error) {
				<-ctx.Done()
				close(cancelled)
				return "", ctx.Err()
			})
			errc <- err
		}()
		waitFor(t, func() bool { return waiters(c, "k") == 1 })
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v", err)
		}
		select {
		case <-cancelled:
		case <-time.After(5 * time.Second):
			t.Fatal("the load's context was not cancelled")
		}
		waitFor(t, func() bool { return c.tracked() == 0 })
	})

	t.Run("TTL expires values", func(t *testing.T) {
		c := newReady(t, Config[string]{TTL: 50 * time.Millisecond})
		_, _ = c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { return "v", nil })
		if _, ok := c.Get("k"); !ok {
			t.Fatal("not cached")
		}
		waitFor(t, func() bool { _, ok := c.Get("k"); return !ok })
	})

	t.Run("after Close nothing is cached", func(t *testing.T) {
		c := newReady(t, Config[string]{})
		_, _ = c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { return "v", nil })
		c.Close()
		if _, ok := c.Get("k"); ok {
			t.Fatal("Get hit after Close")
		}
		if got, err := c.GetOrLoad(ctx, "k", func(context.Context) (string, error) { return "w", nil }); err != nil || got != "w" {
			t.Fatalf("GetOrLoad after Close = %q, %v", got, err)
		}
		c.Invalidate("k")
		if err := c.SetReady(true); !errors.Is(err, ErrClosed) {
			t.Fatalf("SetReady after Close = %v", err)
		}
		if err := c.Follow(ctx); err == nil {
			t.Fatal("Follow without brokers succeeded")
		}
	})
}

func TestConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config[int]
		want []string // substrings of the error; none: valid
	}{
		{"zero value", Config[int]{}, nil},
		{"negative", Config[int]{MaxCost: -1, TTL: -time.Second}, []string{"MaxCost must not be negative", "TTL must not be negative"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := New(tc.cfg, nil)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				c.Close()
				return
			}
			if err == nil {
				c.Close()
				t.Fatal("New accepted the config")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}

	c, err := New(Config[int]{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Follow(context.Background())
	for _, w := range []string{"Brokers is required", "Topic is required"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("Follow without Brokers and Topic: error %v does not contain %q", err, w)
		}
	}
}

func waiters[V any](c *Cache[V], key string) int {
	sh := c.shardFor(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if ks := sh.m[key]; ks != nil && ks.cur != nil {
		return ks.cur.waiters
	}
	return 0
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}
