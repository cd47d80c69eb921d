package redisfill_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/pipeline"
	redissink "github.com/tidemark/tidemark/sinks/redis"
	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

func TestMarkerKey(t *testing.T) {
	const p = "tm:"
	for _, tc := range []struct{ key, want string }{
		{"room:!r1:members", "tm:{room:!r1:members}room:!r1:members"},
		{"room:{!r1}:timeline", "tm:{!r1}room:{!r1}:timeline"}, // the key's own hash tag
		{"a{}b", "tm:{a{}b}a{}b"},                              // an empty tag is no tag
		{"a{b", "tm:{a{b}a{b"},
		{"", "tm:{}"},
	} {
		if got := redisfill.MarkerKey(p, tc.key); got != tc.want {
			t.Errorf("MarkerKey(%q, %q) = %q, want %q", p, tc.key, got, tc.want)
		}
	}
	if err := redisfill.ValidatePrefix("a{b:"); err == nil {
		t.Error(`ValidatePrefix("a{b:") = nil, want an error`)
	}
}

func TestMarkerOrder(t *testing.T) {
	ps := []pipeline.Position{{CommitLSN: 1, Seq: 0}, {CommitLSN: 1, Seq: 9}, {CommitLSN: 1, Seq: 10}, {CommitLSN: 0xFFFFFFFF, Seq: 0},
		{CommitLSN: 1 << 32, Seq: 0}, {CommitLSN: 1<<63 + 5, Seq: 1<<32 - 1}}
	for i := 1; i < len(ps); i++ {
		a, b := redisfill.Marker(ps[i-1]), redisfill.Marker(ps[i])
		if !(a < b) || len(a) != 27 || len(b) != 27 {
			t.Errorf("Marker(%v) = %q, Marker(%v) = %q: want 27 characters, increasing", ps[i-1], a, ps[i], b)
		}
	}
}

// fixture is a real redis-server, Tidemark's sink writing to it, and a
// reader's Filler.
type fixture struct {
	rdb    *goredis.Client
	sink   *redissink.Sink
	filler *redisfill.Filler
}

func newFixture(t *testing.T, mode redissink.Mode, fc redisfill.Config) *fixture {
	t.Helper()
	srv := redistest.ForTest(t)
	sink, err := redissink.New(redissink.Config{Addr: srv.Addr(), Mode: mode}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sink.Close() })
	f, err := redisfill.New(srv.Client(), fc)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{rdb: srv.Client(), sink: sink, filler: f}
}

// db is a fake database: one version per key. write commits a change (the
// version is its position) and then applies its invalidation through the
// sink, as the pipeline does.
type db struct {
	mu       sync.Mutex
	versions map[string]int64
	applied  map[string]*atomic.Int64 // highest version whose invalidation returned
}

func newDB(keys ...string) *db {
	d := &db{versions: map[string]int64{}, applied: map[string]*atomic.Int64{}}
	for _, k := range keys {
		d.applied[k] = new(atomic.Int64)
	}
	return d
}

func (d *db) read(key string) int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.versions[key]
}

// pos is the position of version v: commit LSNs above 2^32 so that the
// markers' high halves are compared too.
func pos(v int64) pipeline.Position {
	return pipeline.Position{CommitLSN: pipeline.LSN(1<<32 + v/3), Seq: uint32(v % 3)}
}

func (d *db) commit(key string) int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.versions[key]++
	return d.versions[key]
}

func (d *db) invalidate(ctx context.Context, s *redissink.Sink, key string, v int64) error {
	if err := s.InvalidateAt(ctx, []redissink.KeyAt{{Key: key, Pos: pos(v)}}); err != nil {
		return err
	}
	for a := d.applied[key]; ; {
		cur := a.Load()
		if cur >= v || a.CompareAndSwap(cur, v) {
			return nil
		}
	}
}

// cached returns the value Redis holds for key (ok false: none).
func cached(t *testing.T, rdb *goredis.Client, key string) (int64, bool) {
	t.Helper()
	s, err := rdb.Get(context.Background(), key).Result()
	if errors.Is(err, goredis.Nil) {
		return 0, false
	}
	if err != nil {
		t.Fatalf("GET %q: %v", key, err)
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("GET %q = %q: %v", key, s, err)
	}
	return v, true
}

// TestStaleFillRefused forces the interleaving of the look-aside race: the
// load reads the database, the row changes, Tidemark's invalidation (DEL
// and marker) is applied, and only then does the load try its SET. The old
// value must never be left in Redis, whether the reader's token was a
// lease (no marker yet) or an earlier marker. The control shows the race is
// real: with plain DELs the same interleaving leaves the stale value.
func TestStaleFillRefused(t *testing.T) {
	const iterations = 1000
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	keys := []string{"room:!r1:members", "room:{!r2}:members", "unread:@u:!r1"}

	// interleave runs one forced interleaving of key and returns what the
	// load read and whether its fill was stored.
	interleave := func(t *testing.T, f *fixture, d *db, key string) (read int64, filled bool) {
		t.Helper()
		_, hit, tok, err := f.filler.Begin(ctx, key)
		if err != nil || hit {
			t.Fatalf("Begin(%q) = hit %v, %v; want a miss", key, hit, err)
		}
		read = d.read(key)
		done := make(chan error, 1)
		go func() { // the change commits after the read; its invalidation is applied before the fill
			v := d.commit(key)
			done <- d.invalidate(ctx, f.sink, key, v)
		}()
		if err := <-done; err != nil {
			t.Fatalf("InvalidateAt: %v", err)
		}
		filled, err = f.filler.Fill(ctx, key, tok, strconv.FormatInt(read, 10))
		if err != nil {
			t.Fatalf("Fill: %v", err)
		}
		return read, filled
	}

	t.Run("versioned", func(t *testing.T) {
		f := newFixture(t, redissink.ModeVersioned, redisfill.Config{})
		d := newDB(keys...)
		for i := range iterations {
			key := keys[i%len(keys)]
			// Drop the previous fill so that this load misses. Without a
			// marker (even iterations) the reader's token is a lease of its
			// own; otherwise it is the marker of the key's last change.
			if i%2 == 0 {
				if err := f.sink.Invalidate(ctx, []string{key}); err != nil {
					t.Fatal(err)
				}
			} else if err := f.rdb.Del(ctx, key).Err(); err != nil {
				t.Fatal(err)
			}
			read, filled := interleave(t, f, d, key)
			if filled {
				t.Fatalf("iteration %d: the fill of %q read at version %d was stored after the invalidation of version %d", i, key, read, d.read(key))
			}
			if v, ok := cached(t, f.rdb, key); ok {
				t.Fatalf("iteration %d: stale value in Redis: %q = %d, database at %d", i, key, v, d.read(key))
			}
			// A load that starts after the invalidation fills normally.
			got, err := f.filler.GetOrLoad(ctx, key, func(context.Context) (string, error) { return strconv.FormatInt(d.read(key), 10), nil })
			if err != nil || got != strconv.FormatInt(d.read(key), 10) {
				t.Fatalf("iteration %d: fresh GetOrLoad = %q, %v; want %d", i, got, err, d.read(key))
			}
			if v, ok := cached(t, f.rdb, key); !ok || v != d.read(key) {
				t.Fatalf("iteration %d: fresh fill: %q = %d, %v; want %d", i, key, v, ok, d.read(key))
			}
		}
		if st := f.filler.Stats(); st.RefusedFills != iterations || st.Fills != iterations {
			t.Errorf("Stats = %+v, want %d refused fills and %d fills", st, iterations, iterations)
		}
	})

	t.Run("fill before the invalidation", func(t *testing.T) {
		// The SET lands first (Tidemark lags); the invalidation's DEL then
		// removes it.
		f := newFixture(t, redissink.ModeVersioned, redisfill.Config{})
		d := newDB(keys...)
		for i := range iterations / 10 {
			key := keys[i%len(keys)]
			_, _, tok, err := f.filler.Begin(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			read := d.read(key)
			v := d.commit(key)
			if ok, err := f.filler.Fill(ctx, key, tok, strconv.FormatInt(read, 10)); err != nil || !ok {
				t.Fatalf("iteration %d: Fill = %v, %v; want stored (no invalidation yet)", i, ok, err)
			}
			if err := d.invalidate(ctx, f.sink, key, v); err != nil {
				t.Fatal(err)
			}
			if got, ok := cached(t, f.rdb, key); ok {
				t.Fatalf("iteration %d: stale value in Redis: %q = %d, database at %d", i, key, got, v)
			}
		}
	})

	t.Run("control: plain DEL leaves the stale value", func(t *testing.T) {
		f := newFixture(t, redissink.ModeDelete, redisfill.Config{})
		d := newDB(keys...)
		key := keys[0]
		read, filled := interleave(t, f, d, key)
		if v, ok := cached(t, f.rdb, key); !filled || !ok || v != read || read == d.read(key) {
			t.Fatalf("delete mode: filled %v, cached %d %v, read %d, database %d; want the stale value cached (the race this package closes)",
				filled, v, ok, read, d.read(key))
		}
	})
}

// TestStaleFillStress runs loads and invalidations of a few keys from many
// goroutines against a real Redis. Checked all along: once the invalidation
// of version v has returned, no GetOrLoad returns a version below v.
// Checked at the end, after the writers stopped and a round of loads: Redis
// holds no value other than the database's.
func TestStaleFillStress(t *testing.T) {
	keys := []string{"a", "b", "c"}
	f := newFixture(t, redissink.ModeVersioned, redisfill.Config{})
	d := newDB(keys...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var (
		failed atomic.Int64
		once   sync.Once
	)
	fail := func(format string, args ...any) {
		failed.Add(1)
		once.Do(func() { t.Errorf(format, args...) })
	}
	load := func(key string, rng *rand.Rand) {
		floor := d.applied[key].Load()
		got, err := f.filler.GetOrLoad(ctx, key, func(context.Context) (string, error) {
			v := d.read(key)
			if rng.IntN(3) == 0 {
				time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
			}
			return strconv.FormatInt(v, 10), nil
		})
		if err != nil {
			fail("GetOrLoad(%q): %v", key, err)
			return
		}
		if v, _ := strconv.ParseInt(got, 10, 64); v < floor {
			fail("GetOrLoad(%q) = %d after the invalidation of version %d had returned", key, v, floor)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(1, uint64(w)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				load(keys[rng.IntN(len(keys))], rng)
			}
		})
	}
	for w := range len(keys) { // one writer per key: per-key order, as the consumer keeps it
		wg.Go(func() {
			key := keys[w]
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := d.invalidate(ctx, f.sink, key, d.commit(key)); err != nil {
					fail("InvalidateAt: %v", err)
					return
				}
				time.Sleep(time.Duration(w*100) * time.Microsecond)
			}
		})
	}
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	rng := rand.New(rand.NewPCG(2, 2))
	for _, k := range keys {
		load(k, rng)
		if v, ok := cached(t, f.rdb, k); ok && v != d.read(k) {
			t.Errorf("after the writers stopped: %q = %d in Redis, database at %d", k, v, d.read(k))
		}
	}
	st := f.filler.Stats()
	t.Logf("stats %+v, database versions %v", st, d.versions)
	if st.RefusedFills == 0 || st.Fills == 0 {
		t.Errorf("Stats = %+v: the stress produced no refused fill or no fill; it tests nothing", st)
	}
}

// TestMarkerOrderAndExpiry: a redelivered older change keeps the newer
// marker (and a reader's token from it stays good); an expired token makes
// the fill refused, never stale.
func TestMarkerOrderAndExpiry(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFixture(t, redissink.ModeVersioned, redisfill.Config{LeaseTTL: 100 * time.Millisecond})
	const key = "k"
	marker := redisfill.MarkerKey(redisfill.DefaultMarkerPrefix, key)
	at := func(p pipeline.Position) {
		t.Helper()
		if err := f.sink.InvalidateAt(ctx, []redissink.KeyAt{{Key: key, Pos: p}}); err != nil {
			t.Fatal(err)
		}
	}
	p1, p2, p3 := pos(5), pos(7), pos(8)
	at(p2)
	at(p1) // redelivered: older
	if got := f.rdb.Get(ctx, marker).Val(); got != redisfill.Marker(p2) {
		t.Fatalf("marker after %v then %v = %q, want %q", p2, p1, got, redisfill.Marker(p2))
	}
	if n := f.sink.MarkersKept(); n != 1 {
		t.Errorf("MarkersKept = %d, want 1", n)
	}
	_, _, tok, err := f.filler.Begin(ctx, key)
	if err != nil || string(tok) != redisfill.Marker(p2) {
		t.Fatalf("Begin = token %q, %v; want the marker %q", tok, err, redisfill.Marker(p2))
	}
	at(p2) // redelivered: equal
	if ok, err := f.filler.Fill(ctx, key, tok, "v2"); err != nil || !ok {
		t.Fatalf("Fill after redeliveries = %v, %v; want stored", ok, err)
	}
	at(p3)
	if got := f.rdb.Get(ctx, marker).Val(); got != redisfill.Marker(p3) {
		t.Fatalf("marker after %v = %q, want %q", p3, got, redisfill.Marker(p3))
	}
	if f.rdb.Exists(ctx, key).Val() != 0 {
		t.Fatalf("%q still cached after the invalidation at %v", key, p3)
	}

	// Every part of the position counts, the LSN's high half included.
	for _, tc := range []struct{ newer, older pipeline.Position }{
		{pipeline.Position{CommitLSN: 2 << 32}, pipeline.Position{CommitLSN: 1<<32 + 5, Seq: 9}},
		{pipeline.Position{CommitLSN: 1<<32 + 6}, pipeline.Position{CommitLSN: 1<<32 + 5, Seq: 9}},
		{pipeline.Position{CommitLSN: 7, Seq: 2}, pipeline.Position{CommitLSN: 7, Seq: 1}},
	} {
		k := "order:" + tc.newer.String()
		for _, p := range []pipeline.Position{tc.newer, tc.older} {
			if err := f.sink.InvalidateAt(ctx, []redissink.KeyAt{{Key: k, Pos: p}}); err != nil {
				t.Fatal(err)
			}
		}
		if got := f.rdb.Get(ctx, redisfill.MarkerKey(redisfill.DefaultMarkerPrefix, k)).Val(); got != redisfill.Marker(tc.newer) {
			t.Errorf("marker after %v then %v = %q, want %q", tc.newer, tc.older, got, redisfill.Marker(tc.newer))
		}
	}

	// Expiry: the token (a lease) outlived by the load.
	const other = "expiring"
	_, _, tok, err = f.filler.Begin(ctx, other)
	if err != nil || tok == "" || tok[:2] != "l:" {
		t.Fatalf("Begin(%q) = token %q, %v; want a lease", other, tok, err)
	}
	time.Sleep(200 * time.Millisecond)
	if ok, err := f.filler.Fill(ctx, other, tok, "late"); err != nil || ok {
		t.Fatalf("Fill after the lease expired = %v, %v; want refused", ok, err)
	}
}
