// Package redisfill is the fill protocol of Tidemark's versioned Redis
// invalidation (invalidation.redis.mode: versioned): a look-aside cache in
// Redis that never keeps a value read before a change whose invalidation
// Tidemark has already applied.
//
// # The race it closes
//
// With DEL-only invalidation, a reader that misses reads the database, and
// then SETs what it read. If the row changes, and Tidemark DELs the key,
// between the read and the SET, the SET stores the old value after the DEL
// and it stays until the next change of the row (a read marker saved while
// the unread count stays old). This is the problem memcache's leases solve
// at Facebook ("Scaling Memcache at Facebook", NSDI 2013, §3.2.1); this
// package adapts them to Redis with one marker key per cache key.
//
// # The marker key
//
// For a cache key K, the marker is MarkerKey(prefix, K) =
// prefix + "{" + tag + "}" + K, where tag is K's own hash tag (the text
// between its first "{" and the next "}", when not empty) or else K itself,
// so that in Redis Cluster the marker and K hash to the same slot (a cache
// key without a hash tag that contains "}" is the one exception: keep such
// keys off Cluster, or give them a hash tag). The prefix (default
// DefaultMarkerPrefix) must not contain "{" or "}" and must not begin any
// cache key. The marker holds one of:
//
//   - "v:" + 16 hex digits of the commit LSN + ":" + 8 hex digits of the
//     change's index in its transaction (Marker), written by Tidemark with
//     the DEL of K, in one script (InvalidateScript), with a TTL
//     (invalidation.redis.marker_ttl). Positions are compared in the
//     script: an older or equal position never replaces a newer marker, so
//     redeliveries are idempotent and per-key order holds.
//   - "l:" + 32 random hex digits: a lease, written by a reader that missed
//     while no marker existed (BeginScript), with the reader's LeaseTTL.
//
// # The protocol
//
//  1. Begin (before reading the database): GET K; on a hit, done. On a
//     miss, the token is the marker's current value; if there is none, the
//     reader writes a fresh lease and that is the token. A marker that
//     would expire within LeaseTTL has its TTL raised to LeaseTTL.
//  2. Read the database.
//  3. Fill: SET K only if the marker still equals the token, in one script
//     (FillScript). Otherwise the value is returned to the caller but not
//     stored.
//
// Why that is enough: Tidemark writes a change's marker after the change
// committed, in the same script as its DEL. A fill is stale only if the
// database read missed a change, i.e. the change committed after Begin. If
// that change's invalidation ran before the fill, it replaced the token
// (a lease always, a marker because its position is newer), so the fill is
// refused; if it runs after the fill, its DEL removes the value. Every
// change that replaced the token before Begin committed before Begin, so the
// read sees it.
//
// # Expiry and restarts fail safe
//
// The fill needs the token to be present and equal. A marker or lease that
// expires, is evicted, or is lost with a Redis restart makes the fill
// refused, never accepted: expiry cannot re-open the race. The bound it
// sets is on liveness, not on safety: a load that takes longer than
// LeaseTTL (default 10s) is not cached. The marker TTL only bounds the
// memory markers take (one small key per key invalidated within the TTL);
// Begin extends a marker it takes as its token to LeaseTTL.
//
// An invalidation without a position (Tidemark's Invalidate, e.g. from an
// operator tool) deletes K and its marker, which also refuses every fill in
// flight.
//
// A reader that does not use this protocol (plain GET/SET) still sees the
// DEL, exactly as in delete mode: versioned mode only adds the markers.
//
// The scripts are exported (InvalidateSource, BeginSource, FillSource) so
// that readers in other languages can run the same protocol; their KEYS are
// always K then its marker.
package redisfill

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/tidemark/tidemark/pipeline"
)

// Defaults of the protocol.
const (
	// DefaultMarkerPrefix begins every marker key.
	DefaultMarkerPrefix = "tidemark:marker:"
	// DefaultLeaseTTL is how long a reader's token stays valid: the longest
	// load whose value can still be cached.
	DefaultLeaseTTL = 10 * time.Second
)

// MarkerKey returns the marker key of the cache key key (see the package
// documentation): prefix + "{" + tag + "}" + key, sharing key's Redis
// Cluster slot.
func MarkerKey(prefix, key string) string {
	tag := key
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			tag = key[i+1 : i+1+j]
		}
	}
	return prefix + "{" + tag + "}" + key
}

// Marker is the marker value of the change at pos: "v:" + the commit LSN
// in 16 hex digits + ":" + the sequence in 8. Markers of later positions
// are greater, as strings and as the script compares them.
func Marker(pos pipeline.Position) string {
	return fmt.Sprintf("v:%016X:%08X", uint64(pos.CommitLSN), pos.Seq)
}

// ValidatePrefix reports why prefix cannot prefix marker keys.
func ValidatePrefix(prefix string) error {
	if strings.ContainsAny(prefix, "{}") {
		return fmt.Errorf("%q must not contain { or } (the marker's hash tag follows it)", prefix)
	}
	return nil
}

// luaNewer is shared by the scripts: whether marker a is of a later
// position than marker b, both well formed. The three 8-digit parts are
// compared as numbers (exact in Lua's doubles; a string comparison would
// follow the server's locale).
const luaNewer = `
local function valid(m)
  return m and string.match(m, '^v:' .. string.rep('%x', 16) .. ':' .. string.rep('%x', 8) .. '$') ~= nil
end
local function newer(a, b)
  for _, r in ipairs({{3, 10}, {11, 18}, {20, 27}}) do
    local x, y = tonumber(string.sub(a, r[1], r[2]), 16), tonumber(string.sub(b, r[1], r[2]), 16)
    if x ~= y then return x > y end
  end
  return false
end
`

// InvalidateSource is Tidemark's side, run per key: KEYS = {K, marker},
// ARGV = {Marker(pos), marker TTL in milliseconds}. It deletes K and, unless
// the marker holds an equal or later position, sets the marker. It returns
// 1 when it set the marker, 0 when it kept a marker at least as new.
const InvalidateSource = luaNewer + `
redis.call('DEL', KEYS[1])
local cur = redis.call('GET', KEYS[2])
if valid(cur) and not newer(ARGV[1], cur) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
`

// DeleteSource is Tidemark's side of an invalidation without a position:
// KEYS = {K, marker}; it deletes both, refusing every fill in flight.
const DeleteSource = `
redis.call('DEL', KEYS[1], KEYS[2])
return 1
`

// BeginSource is a reader's first step: KEYS = {K, marker}, ARGV = {a fresh
// lease "l:<random>", LeaseTTL in milliseconds}. It returns {1, value} on a
// hit, else {0, token}: the marker (its TTL raised to LeaseTTL if lower), or
// the lease it wrote.
const BeginSource = `
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local m = redis.call('GET', KEYS[2])
if m then
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
  return {0, m}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {0, ARGV[1]}
`

// FillSource is a reader's last step: KEYS = {K, marker}, ARGV = {token,
// value, value TTL in milliseconds or 0}. It SETs K only if the marker still
// equals the token, and returns 1 if it did, 0 if it refused.
const FillSource = `
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
`

// The scripts, for EVALSHA with a fallback to EVAL (go-redis Script).
var (
	InvalidateScript = goredis.NewScript(InvalidateSource)
	DeleteScript     = goredis.NewScript(DeleteSource)
	BeginScript      = goredis.NewScript(BeginSource)
	FillScript       = goredis.NewScript(FillSource)
)

// Config configures a Filler. The zero value of each field is its default.
type Config struct {
	// MarkerPrefix must equal Tidemark's invalidation.redis.marker_prefix.
	// Default DefaultMarkerPrefix.
	MarkerPrefix string
	// LeaseTTL bounds a load: a value loaded for longer is returned but not
	// cached. Default DefaultLeaseTTL (10s).
	LeaseTTL time.Duration
	// ValueTTL, when set, makes filled values expire. Default 0: they stay
	// until invalidated (or evicted).
	ValueTTL time.Duration
}

// Validate reports every problem of c, by field name.
func (c Config) Validate() error {
	var errs []error
	if err := ValidatePrefix(c.MarkerPrefix); err != nil {
		errs = append(errs, fmt.Errorf("MarkerPrefix: %w", err))
	}
	if c.LeaseTTL < 0 || (c.LeaseTTL > 0 && c.LeaseTTL < time.Millisecond) {
		errs = append(errs, fmt.Errorf("LeaseTTL: %v must be at least 1ms (0 means the default, %v)", c.LeaseTTL, DefaultLeaseTTL))
	}
	if c.ValueTTL < 0 || (c.ValueTTL > 0 && c.ValueTTL < time.Millisecond) {
		errs = append(errs, fmt.Errorf("ValueTTL: %v must be at least 1ms, or 0 for none", c.ValueTTL))
	}
	return errors.Join(errs...)
}

// Token is what Begin returns and Fill checks; opaque.
type Token string

// Stats counts a Filler's outcomes since New.
type Stats struct {
	Hits, Fills uint64
	// RefusedFills are loads not cached because the key was invalidated
	// (or the token expired) while they ran.
	RefusedFills uint64
}

// Filler runs the fill protocol against one Redis (or Cluster) client. It
// is safe for concurrent use.
type Filler struct {
	client                 goredis.Scripter
	prefix                 string
	leaseMS, valueMS       int64
	hits, fills, refusedFs atomic.Uint64
}

// New returns a Filler over client (a *redis.Client, *redis.ClusterClient
// or *redis.Ring).
func New(client goredis.Scripter, cfg Config) (*Filler, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("redisfill: %w", err)
	}
	if cfg.MarkerPrefix == "" {
		cfg.MarkerPrefix = DefaultMarkerPrefix
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	return &Filler{client: client, prefix: cfg.MarkerPrefix, leaseMS: cfg.LeaseTTL.Milliseconds(), valueMS: cfg.ValueTTL.Milliseconds()}, nil
}

// Begin is step 1: on a hit it returns the cached value; on a miss, the
// token to pass to Fill after reading the database.
func (f *Filler) Begin(ctx context.Context, key string) (value string, hit bool, tok Token, err error) {
	var b [16]byte
	_, _ = rand.Read(b[:])
	res, err := BeginScript.Run(ctx, f.client, []string{key, MarkerKey(f.prefix, key)}, "l:"+hex.EncodeToString(b[:]), f.leaseMS).Slice()
	if err != nil {
		return "", false, "", fmt.Errorf("redisfill: begin %q: %w", key, err)
	}
	if len(res) != 2 {
		return "", false, "", fmt.Errorf("redisfill: begin %q: unexpected reply %v", key, res)
	}
	s, _ := res[1].(string)
	if n, _ := res[0].(int64); n == 1 {
		f.hits.Add(1)
		return s, true, "", nil
	}
	return "", false, Token(s), nil
}

// Fill is step 3: it stores value under key only if key was not
// invalidated since Begin returned tok, and reports whether it did.
func (f *Filler) Fill(ctx context.Context, key string, tok Token, value string) (bool, error) {
	n, err := FillScript.Run(ctx, f.client, []string{key, MarkerKey(f.prefix, key)}, string(tok), value, f.valueMS).Int64()
	if err != nil {
		return false, fmt.Errorf("redisfill: fill %q: %w", key, err)
	}
	if n != 1 {
		f.refusedFs.Add(1)
		return false, nil
	}
	f.fills.Add(1)
	return true, nil
}

// GetOrLoad returns key's cached value, or loads it and caches it unless
// it was invalidated meanwhile (the loaded value is returned either way).
// A load error is returned as is; a Redis error of Begin fails the call
// before loading, one of Fill is returned with the loaded value.
func (f *Filler) GetOrLoad(ctx context.Context, key string, load func(context.Context) (string, error)) (string, error) {
	v, hit, tok, err := f.Begin(ctx, key)
	if err != nil || hit {
		return v, err
	}
	v, err = load(ctx)
	if err != nil {
		return "", err
	}
	if _, err := f.Fill(ctx, key, tok, v); err != nil {
		return v, err
	}
	return v, nil
}

// Stats returns the counts so far.
func (f *Filler) Stats() Stats {
	return Stats{Hits: f.hits.Load(), Fills: f.fills.Load(), RefusedFills: f.refusedFs.Load()}
}
