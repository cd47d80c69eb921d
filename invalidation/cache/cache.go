// Package cache is an in-process cache for Go services, backed by ristretto
// (github.com/dgraph-io/ristretto/v2), that follows Tidemark's compacted
// invalidations topic (<prefix>.invalidations, written by
// invalidation.TopicInvalidator: key = cache key, value = "commitLSN:seq")
// and refuses stale fills.
//
//	c, err := cache.New(cache.Config[Members]{Brokers: brokers, Topic: "tm.invalidations"}, log)
//	go c.Follow(ctx)  // until Ready, nothing is cached
//	m, err := c.GetOrLoad(ctx, "room:!r1:members", loadMembersFromPostgres)
//
// # Guarantee
//
// GetOrLoad registers a load before calling it. If an invalidation of the key
// is applied (Invalidate, called by Follow for every record) while the load
// runs, the loaded value is returned to the callers but not stored: the lease
// idea of "Scaling Memcache at Facebook" (NSDI 2013, 3.2.1). A fill that
// passed that check and races with an Invalidate is deleted by it: when
// Invalidate(key) returns, no value of a load that started before the call
// is in the cache, and none can enter it later.
//
// So, provided load reads the primary database and the invalidation rules map
// every change to the keys it affects:
//   - Once the invalidation of a change C has been applied, Get and GetOrLoad
//     do not return a value read before C committed (a GetOrLoad joins a
//     running load only if no invalidation of the key was applied since that
//     load started).
//   - A cached value is stale for at most the time between a change's commit
//     and Follow applying its invalidation (capture, pipeline, Kafka, this
//     process: normally milliseconds), and never longer than Config.TTL when
//     that is set.
//
// # Limits
//
//   - While the invalidations do not arrive (Kafka unreachable, the
//     invalidation role stopped or stalled), staleness is bounded by
//     Config.MaxStaleness: the invalidation role writes a watermark record to
//     every partition each second, and when the newest one of a partition is
//     older than MaxStaleness (this process's clock, from when Follow read
//     it) the cache is cleared and not Ready until they are fresh again.
//     Follow keeps its position through outages and applies the backlog when
//     it reads again. A watermark proves the invalidation role is live and
//     holds nothing undelivered, not that it is caught up with capture:
//     a consumer far behind its change topics delays invalidations without
//     stopping watermarks (watch tidemark_consumer_lag_messages, or set
//     Config.TTL). With MaxStaleness < 0 (a writer that predates
//     watermarks) staleness is unbounded meanwhile; set Config.TTL then.
//   - load must read a source at least as new as the invalidations. A load
//     that reads a lagging replica, or another cache, can fill a value that
//     predates an invalidation that was already applied, and nothing removes
//     it except TTL or eviction.
//   - A change that no rule maps to a key never invalidates it.
//   - Nothing is cached until Ready (Follow has positioned on every
//     partition), nor after Follow returns (the cache is cleared then): in
//     those periods every GetOrLoad miss calls load (coalesced per key).
//   - Follow starts at the partitions' end offsets, so records written before
//     it started are never applied. That is safe because the cache is empty
//     then and only loads that start after positioning may fill it: a change
//     such a load can miss commits after the load started, so its record is
//     written at or after those offsets.
//   - Follow assumes records are not deleted before it reads them
//     (cleanup.policy=compact,delete with a short retention, DeleteRecords):
//     such a record is a lost invalidation. Compaction alone is harmless, it
//     drops a record only when a later record has the same key. If the
//     topic is deleted and recreated (a new topic id, or on brokers without
//     topic ids a partition's end below Follow's position), Follow clears
//     the cache and positions again, within about 5 s; partitions added
//     later are found as fast and read from their start (they count for
//     MaxStaleness from their first watermark on). A flush control record
//     clears the cache too.
//   - The record value (the change's position) is not compared: every record
//     invalidates its key, so duplicates or reordering cost only misses.
//   - A fill is best effort: ristretto may drop a Set (full buffer) or reject
//     it (admission policy), and it evicts by cost.
//   - The guarantee is per process: each process runs its own Follow.
package cache

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"hash/maphash"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/ristretto/v2"
	"github.com/segmentio/kafka-go/sasl"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/kafkanet"
)

// Defaults of Config.
const (
	DefaultMaxCost     = 1 << 26
	DefaultNumCounters = 1_000_000
	// DefaultMaxStaleness is Config.MaxStaleness's default.
	DefaultMaxStaleness = 10 * time.Second
)

// ErrClosed is returned by Follow and SetReady after Close.
var ErrClosed = errors.New("cache: closed")

// ErrFollowing is returned by Follow when Follow is already running on the
// cache, and by SetReady while it runs.
var ErrFollowing = errors.New("cache: Follow is already running")

// Config configures a Cache.
type Config[V any] struct {
	// Brokers to read the invalidations topic from. Required by Follow; a
	// cache fed through Invalidate and SetReady does not need it.
	Brokers []string
	// Topic is the invalidations topic, <prefix>.invalidations. Required by
	// Follow.
	Topic string
	// MaxCost bounds the sum of the cached values' costs (ristretto's
	// MaxCost). Default 1<<26. ristretto's NumCounters is 1e6.
	MaxCost int64
	// Cost returns a value's cost. Default: every value costs 1, so MaxCost
	// is a number of entries. Results below 1 count as 1.
	Cost func(V) int64
	// TTL, when > 0, expires every value that long after it was stored: an
	// upper bound on staleness if the topic stalls. Default 0: no expiry.
	TTL time.Duration
	// TLS, when set, encrypts Follow's connections to the brokers (set
	// RootCAs to the cluster's CA, and Certificates for mutual TLS).
	TLS *tls.Config
	// SASL, when set, authenticates Follow's connections: kafka-go's
	// plain.Mechanism or a scram.Mechanism (SCRAM-SHA-256/512).
	SASL sasl.Mechanism
	// MaxStaleness bounds the age of the newest watermark record of every
	// partition (written by the invalidation role each second, see
	// invalidation.TopicInvalidator), measured on this process's clock from
	// when Follow read it. Older, the cache is not Ready: it clears itself
	// and GetOrLoad loads without caching, until fresh watermarks arrive on
	// every partition. After positioning, Follow is Ready only once every
	// partition has delivered a watermark. Default 10s
	// (DefaultMaxStaleness); a negative value turns the check off, for a
	// topic whose writer predates watermarks (then staleness is unbounded
	// while invalidations do not arrive, as before).
	MaxStaleness time.Duration
}

func (c Config[V]) net() kafkanet.Settings { return kafkanet.Settings{TLS: c.TLS, SASL: c.SASL} }

// Validate reports every problem of c, by field name.
func (c Config[V]) Validate() error {
	var errs []error
	if c.MaxCost < 0 {
		errs = append(errs, fmt.Errorf("cache: MaxCost must not be negative (got %d)", c.MaxCost))
	}
	if c.TTL < 0 {
		errs = append(errs, fmt.Errorf("cache: TTL must not be negative (got %s)", c.TTL))
	}
	if c.MaxStaleness > 0 && c.MaxStaleness < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("cache: MaxStaleness %s is below 10ms (watermarks come each second by default; use a negative value to turn the check off)", c.MaxStaleness))
	}
	return errors.Join(errs...)
}

// validateFollow reports the fields Follow needs.
func (c Config[V]) validateFollow() error {
	var errs []error
	if len(c.Brokers) == 0 {
		errs = append(errs, errors.New("cache: Brokers is required to Follow"))
	}
	for i, b := range c.Brokers {
		if b == "" {
			errs = append(errs, fmt.Errorf("cache: Brokers[%d] is empty", i))
		}
	}
	if c.Topic == "" {
		errs = append(errs, errors.New("cache: Topic is required to Follow"))
	}
	return errors.Join(errs...)
}

// Stats are a Cache's counters since New.
type Stats struct {
	// Loads counts calls of a load function (coalesced callers share one).
	Loads uint64
	// Fills counts loaded values handed to ristretto (which may still drop
	// or reject them).
	Fills uint64
	// RefusedFills counts loaded values not stored because an invalidation of
	// their key, or a change of Ready, was applied while they loaded.
	RefusedFills uint64
	// RevokedFills counts fills deleted again because an invalidation
	// arrived between the Set and its application.
	RevokedFills uint64
	// NotReady counts loaded values not stored because the load started
	// before the cache was Ready.
	NotReady uint64
	// Invalidations counts Invalidate calls (one per invalidation record
	// Follow reads; control records are not invalidations).
	Invalidations uint64
	// Flushes counts flush control records applied (each cleared the cache).
	Flushes uint64
	// ControlSkipped counts control records Follow did not understand (an
	// unknown kind, or a malformed watermark) and skipped; each kind is
	// warned about once.
	ControlSkipped uint64
	// Stale counts the times the cache stopped caching because a
	// partition's newest watermark became older than MaxStaleness.
	Stale uint64
	// Recreations counts the times Follow found the topic recreated (a new
	// topic id, or an end offset below its position) and positioned again.
	Recreations uint64
	// WatermarkAge is the age, on this process's clock, of the oldest of
	// the partitions' newest watermarks (since positioning for a partition
	// that has delivered none yet); 0 while Follow is not positioned. It is
	// the cache's lag bound: export it as a gauge.
	WatermarkAge time.Duration
	// WatermarkPosition and WatermarkAt are that watermark's position and
	// the writer's time ("" and zero if none was read).
	WatermarkPosition string
	WatermarkAt       time.Time
}

const numShards = 64

// Cache is a ristretto cache whose fills are checked against the
// invalidations applied while they loaded. All methods are safe for
// concurrent use. Build with New.
type Cache[V any] struct {
	cfg  Config[V]
	log  *zap.Logger
	cost func(V) int64

	closeMu sync.RWMutex // guards rc against Close; taken inside a shard's mu, never around one
	closed  bool         // guarded by closeMu
	shut    bool         // set by Close with every shard locked; read with any shard locked
	rc      *ristretto.Cache[string, V]

	// epoch is bumped, with every shard locked, whenever ready changes or
	// the cache is cleared: a load that started in an older epoch never
	// fills.
	epoch  atomic.Uint64
	ready  atomic.Bool
	seed   maphash.Seed
	shards [numShards]shard[V]

	following  atomic.Bool
	followMu   sync.Mutex
	stopFollow context.CancelFunc // cancels a running Follow; guarded by followMu
	refresh    time.Duration      // how often Follow looks for new partitions and truncation
	recheck    chan struct{}      // test hook: a receive runs that check now (nil: never)

	afterSet func(key string) // test hook: runs after a fill's Set, before its Wait

	loads, fills, refused, revoked, notReady, invalidations atomic.Uint64
	flushes, controlSkipped, stale, recreations             atomic.Uint64

	marksMu sync.Mutex
	marks   map[int]*mark   // newest watermark per partition of the current session; nil when not positioned
	warned  map[string]bool // control kinds already warned about; guarded by marksMu
}

// mark is the newest watermark of one partition.
type mark struct {
	got  time.Time // this process's clock: when it was read (or the partition positioned)
	seen bool      // a watermark was read; false: got is the positioning time
	// grace: a partition found after positioning counts as fresh until
	// MaxStaleness after it was found, without a watermark.
	grace bool
	pos   string
	at    time.Time
}

// shard tracks the keys that have a load in flight. Entries exist only while
// a load of their key runs or finishes its fill, so the map is bounded by the
// number of concurrent loads, not by the key space.
type shard[V any] struct {
	mu sync.Mutex
	m  map[string]*keyState[V]
}

type keyState[V any] struct {
	gen     uint64     // invalidations of the key applied while the entry existed
	refs    int        // loads registered and not finished; the entry is dropped at 0
	pending int        // fills Set in ristretto whose application Wait has not confirmed
	cur     *flight[V] // the load new callers may join; nil once invalidated or finished
}

// flight is one call of a load function, shared by the callers that joined it.
type flight[V any] struct {
	done    chan struct{}
	cancel  context.CancelFunc
	epoch   uint64
	waiters int // callers still waiting; guarded by the shard's mu
	val     V
	err     error
}

// snapshot is what a load saw when it was registered.
type snapshot struct {
	gen   uint64
	epoch uint64
	ready bool
}

// New builds a cache. It starts ristretto's goroutines but does not read the
// topic: run Follow for that (or feed Invalidate and call SetReady). A nil
// log means no logging.
func New[V any](cfg Config[V], log *zap.Logger) (*Cache[V], error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxCost == 0 {
		cfg.MaxCost = DefaultMaxCost
	}
	if cfg.MaxStaleness == 0 {
		cfg.MaxStaleness = DefaultMaxStaleness
	}
	if log == nil {
		log = zap.NewNop()
	}
	c := &Cache[V]{
		cfg:     cfg,
		log:     log.With(zap.String("component", "invalidation/cache")),
		seed:    maphash.MakeSeed(),
		refresh: 5 * time.Second,
		warned:  map[string]bool{},
	}
	c.cost = func(V) int64 { return 1 }
	if cfg.Cost != nil {
		c.cost = func(v V) int64 { return max(cfg.Cost(v), 1) }
	}
	rc, err := ristretto.NewCache(&ristretto.Config[string, V]{
		NumCounters:        DefaultNumCounters,
		MaxCost:            cfg.MaxCost,
		BufferItems:        64,
		IgnoreInternalCost: true, // MaxCost is in the caller's units
	})
	if err != nil {
		return nil, fmt.Errorf("cache: creating ristretto cache: %w", err)
	}
	c.rc = rc
	for i := range c.shards {
		c.shards[i].m = map[string]*keyState[V]{}
	}
	return c, nil
}

func (c *Cache[V]) shardFor(key string) *shard[V] {
	return &c.shards[maphash.String(c.seed, key)%numShards]
}

// Get returns the cached value of key. It never loads, and misses while the
// cache is not Ready.
func (c *Cache[V]) Get(key string) (V, bool) {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if c.closed || !c.ready.Load() {
		var zero V
		return zero, false
	}
	return c.rc.Get(key)
}

// GetOrLoad returns the cached value of key, or calls load and caches its
// result unless an invalidation of key was applied while load ran (or the
// cache was not Ready when load started): then the loaded value is returned
// but not cached. A cached value is visible to Get when GetOrLoad returns
// (unless ristretto dropped or rejected it).
//
// Concurrent calls for one key share one load, as long as no invalidation of
// the key was applied since that load started; each caller gets its value or
// error. load runs in its own goroutine with a context that keeps ctx's
// values and is cancelled when every caller waiting for it has given up. A
// caller whose ctx ends returns ctx.Err() at once. A panic in load is
// returned as an error.
//
// load MUST read a source at least as new as the invalidations (the primary
// database), after it is called; see the package documentation.
func (c *Cache[V]) GetOrLoad(ctx context.Context, key string, load func(ctx context.Context) (V, error)) (V, error) {
	if v, ok := c.Get(key); ok {
		return v, nil
	}
	var zero V
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	sh := c.shardFor(key)
	sh.mu.Lock()
	ks := sh.m[key]
	if ks != nil && ks.cur != nil && ks.cur.epoch == c.epoch.Load() {
		f := ks.cur
		f.waiters++
		sh.mu.Unlock()
		return c.await(ctx, sh, ks, f)
	}
	if ks == nil {
		ks = &keyState[V]{}
		sh.m[key] = ks
	}
	ks.refs++
	// epoch and ready only change with every shard locked, so they are
	// consistent with gen here.
	s := snapshot{gen: ks.gen, epoch: c.epoch.Load(), ready: c.ready.Load()}
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f := &flight[V]{done: make(chan struct{}), cancel: cancel, epoch: s.epoch, waiters: 1}
	ks.cur = f
	sh.mu.Unlock()
	go c.run(fctx, key, sh, ks, f, s, load)
	return c.await(ctx, sh, ks, f)
}

// await waits for f on behalf of one caller.
func (c *Cache[V]) await(ctx context.Context, sh *shard[V], ks *keyState[V], f *flight[V]) (V, error) {
	select {
	case <-f.done:
		return f.val, f.err
	case <-ctx.Done():
		sh.mu.Lock()
		f.waiters--
		if f.waiters == 0 {
			f.cancel()
			if ks.cur == f {
				ks.cur = nil // nobody joins a cancelled load
			}
		}
		sh.mu.Unlock()
		var zero V
		return zero, ctx.Err()
	}
}

// run calls load and fills the cache if no invalidation of key was applied
// since s was taken.
func (c *Cache[V]) run(ctx context.Context, key string, sh *shard[V], ks *keyState[V], f *flight[V], s snapshot, load func(context.Context) (V, error)) {
	defer f.cancel()
	c.loads.Add(1)
	v, err := callLoad(ctx, key, load)

	filled := false
	sh.mu.Lock()
	if ks.cur == f {
		ks.cur = nil
	}
	if err == nil {
		switch {
		case !s.ready:
			c.notReady.Add(1)
		case ks.gen != s.gen || c.epoch.Load() != s.epoch:
			c.refused.Add(1)
		default:
			// Set under the shard lock: an Invalidate of key either bumped
			// gen before this check, or runs after the Set is buffered, and
			// then its Del is buffered after the Set and wins.
			if filled = c.set(key, v); filled {
				ks.pending++
				c.fills.Add(1)
			}
		}
	}
	sh.mu.Unlock()

	if filled {
		if c.afterSet != nil {
			c.afterSet(key)
		}
		// Make the fill visible to Get before returning, and keep the entry
		// (and pending, which makes Invalidate wait too) until it is applied.
		c.wait()
		sh.mu.Lock()
		ks.pending--
		stale := ks.gen != s.gen || c.epoch.Load() != s.epoch
		sh.mu.Unlock()
		if stale {
			// Invalidate already deleted it after its Set; this is a second
			// line of defence and may cost a newer fill one extra miss.
			c.del(key)
			c.revoked.Add(1)
		}
	}

	sh.mu.Lock()
	ks.refs--
	if ks.refs == 0 {
		delete(sh.m, key)
	}
	sh.mu.Unlock()
	f.val, f.err = v, err
	close(f.done)
}

func callLoad[V any](ctx context.Context, key string, load func(context.Context) (V, error)) (v V, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("cache: load of %q panicked: %v\n%s", key, r, debug.Stack())
		}
	}()
	return load(ctx)
}

func (c *Cache[V]) set(key string, v V) bool {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if c.closed {
		return false
	}
	return c.rc.SetWithTTL(key, v, c.cost(v), c.cfg.TTL)
}

func (c *Cache[V]) del(key string) {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if !c.closed {
		c.rc.Del(key)
	}
}

func (c *Cache[V]) wait() {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if !c.closed {
		c.rc.Wait()
	}
}

// Invalidate applies one invalidation of key now: it deletes the cached
// value and makes every load of key in flight return without filling. When
// it returns, no value of a load that started before the call is cached or
// can be cached later. Follow calls it for every record; it is exported for
// tests and other transports (see SetReady).
func (c *Cache[V]) Invalidate(key string) {
	c.invalidations.Add(1)
	sh := c.shardFor(key)
	sh.mu.Lock()
	pending := false
	if ks := sh.m[key]; ks != nil {
		ks.gen++
		ks.cur = nil // later callers must not get a value loaded before this
		pending = ks.pending > 0
	}
	sh.mu.Unlock()

	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if c.closed {
		return
	}
	// Del removes the stored value now and queues a delete behind any Set
	// already buffered for key, so a fill that passed its check before gen
	// was bumped is removed when ristretto applies the buffer.
	c.rc.Del(key)
	if pending {
		// Such a fill exists: wait for the buffer, so that Get cannot see it
		// between its Set being applied and the queued delete.
		c.rc.Wait()
		// A concurrent ristretto Clear (setReady) releases Wait and drops the
		// queued delete without applying them, before it empties the store:
		// the fill may have been applied just before, and Get would see it
		// until the Clear finishes. The fill is out of the buffer once Wait
		// returns, so deleting again now removes it for good.
		c.rc.Del(key)
	}
}

// Ready reports whether the cache stores fills: true once Follow has
// positioned on every partition of the topic (or after SetReady(true)),
// false before that and after Follow returns. While it is false GetOrLoad
// still loads but caches nothing, because an invalidation written before
// the positioning would never be applied. A load that started while the
// cache was not Ready never fills, even if it finishes after.
func (c *Cache[V]) Ready() bool { return c.ready.Load() }

// SetReady is for transports other than Follow. Call SetReady(true) once
// every invalidation written from now on will reach Invalidate, and
// SetReady(false) as soon as that stops being true; both clear the cache and
// make loads in flight return without filling. It returns ErrFollowing
// while Follow runs and ErrClosed after Close.
func (c *Cache[V]) SetReady(ready bool) error {
	if c.following.Load() {
		return ErrFollowing
	}
	c.closeMu.RLock()
	closed := c.closed
	c.closeMu.RUnlock()
	if closed {
		return ErrClosed
	}
	c.setReady(ready)
	return nil
}

// setReady changes ready, starts a new epoch and clears the cache (after the
// epoch changed when leaving ready, so that fills of the old epoch are gone).
func (c *Cache[V]) setReady(ready bool) {
	if ready {
		// Nothing fills while not ready, so this only makes sure; clearing
		// after the flip could drop fills of the new epoch.
		c.clear()
	}
	for i := range c.shards {
		c.shards[i].mu.Lock()
	}
	// With every shard locked no fill is between its check and its Set: any
	// fill of the old epoch is already buffered, and Clear drops it. Get
	// misses once Ready is false, and Ready is false before the Clear, so
	// nothing is served from the moment Ready turns false, and whoever finds
	// the cache cleared sees Ready false.
	c.ready.Store(ready && !c.shut)
	c.epoch.Add(1)
	if !ready {
		c.clear()
	}
	for i := range c.shards {
		c.shards[i].mu.Unlock()
	}
}

func (c *Cache[V]) clear() {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if !c.closed {
		c.rc.Clear()
	}
}

// Stats returns the cache's counters and its watermark lag.
func (c *Cache[V]) Stats() Stats {
	s := Stats{
		Loads:          c.loads.Load(),
		Fills:          c.fills.Load(),
		RefusedFills:   c.refused.Load(),
		RevokedFills:   c.revoked.Load(),
		NotReady:       c.notReady.Load(),
		Invalidations:  c.invalidations.Load(),
		Flushes:        c.flushes.Load(),
		ControlSkipped: c.controlSkipped.Load(),
		Stale:          c.stale.Load(),
		Recreations:    c.recreations.Load(),
	}
	c.marksMu.Lock()
	if m := c.oldestMark(); m != nil {
		s.WatermarkAge = time.Since(m.got)
		s.WatermarkPosition, s.WatermarkAt = m.pos, m.at
	}
	c.marksMu.Unlock()
	return s
}

// oldestMark is the partition mark read longest ago; c.marksMu is held.
func (c *Cache[V]) oldestMark() *mark {
	var old *mark
	for _, m := range c.marks {
		if old == nil || m.got.Before(old.got) {
			old = m
		}
	}
	return old
}

// flushAll drops every cached value and makes every load in flight return
// without filling, keeping Ready: a flush control record.
func (c *Cache[V]) flushAll() {
	for i := range c.shards {
		c.shards[i].mu.Lock()
	}
	// As in setReady(false): a fill that passed its check is buffered now,
	// and Clear drops it; later checks see the new epoch.
	c.clear()
	c.epoch.Add(1)
	for i := range c.shards {
		c.shards[i].mu.Unlock()
	}
}

// Close stops a running Follow (without waiting for it to return), drops
// every value and stops ristretto. Afterwards Get misses, GetOrLoad loads
// without caching and Invalidate does nothing. Close is idempotent.
func (c *Cache[V]) Close() {
	c.followMu.Lock()
	if c.stopFollow != nil {
		c.stopFollow()
	}
	c.followMu.Unlock()
	for i := range c.shards {
		c.shards[i].mu.Lock()
	}
	c.shut = true
	c.ready.Store(false)
	c.epoch.Add(1)
	for i := range c.shards {
		c.shards[i].mu.Unlock()
	}
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if !c.closed {
		c.closed = true
		c.rc.Close()
	}
}
