package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	goredis "github.com/redis/go-redis/v9"
)

// ReplaceSets makes members[i] the whole content of the Redis set keys[i]
// (DEL then SADD, in one MULTI per batch, so readers never see a half-written
// set); an empty members[i] just deletes the key. It returns once Redis
// acknowledged every command. Replaying it is harmless.
func (s *Sink) ReplaceSets(ctx context.Context, keys []string, members [][]string) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if len(keys) != len(members) {
		return fmt.Errorf("redis ReplaceSets: %d keys but %d member lists", len(keys), len(members))
	}
	for start := 0; start < len(keys); start += s.cfg.BatchSize {
		end := min(start+s.cfg.BatchSize, len(keys))
		_, err := s.client.TxPipelined(ctx, func(p goredis.Pipeliner) error {
			for i := start; i < end; i++ {
				p.Del(ctx, keys[i])
				if len(members[i]) > 0 {
					args := make([]any, len(members[i]))
					for j, m := range members[i] {
						args[j] = m
					}
					p.SAdd(ctx, keys[i], args...)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("redis ReplaceSets (sets %d-%d of %d): %w", start+1, end, len(keys), err)
		}
	}
	return nil
}

// Versioned sets: a set KEY carries the version of the last update applied
// to it in the string key KEY + VersionSuffix (a decimal number; a missing
// key counts as version 0). ApplySets and ReplaceSetVersioned read and
// write both keys; ReplaceSetVersioned also writes KEY + BuildingSuffix
// while it builds a replacement. ACL key patterns must cover all three;
// in Redis Cluster, KEY needs a hash tag ({...}) so that they share a
// slot. Redis deletes a set when its last member goes; its version key
// stays, so an empty set keeps its version. ReplaceSets knows nothing of
// versions and leaves the version key as it is.
const (
	VersionSuffix  = ":version"
	BuildingSuffix = ":building"
)

// SetUpdate is one versioned update of a Redis set.
type SetUpdate struct {
	Key string
	// Version is the update's version, from 1 (0 is refused); the versions
	// of one key's updates are consecutive.
	Version uint64
	// Full: Add is the whole new content (Remove is ignored); applied when the
	// stored version is below Version (missing counts as 0).
	// Otherwise a delta: SADD Add, SREM Remove, applied only when the stored
	// version is exactly Version-1.
	Full        bool
	Add, Remove []string
}

// SetResult is what ApplySets did with one SetUpdate.
type SetResult uint8

// The results; their values are the replies of the script.
const (
	SetApplied SetResult = iota // written; the stored version is now Version
	SetSkipped                  // stored version >= Version: already applied (a replay); nothing written
	SetGap                      // a delta whose predecessor is missing (stored < Version-1, or no version key while Version > 1): nothing written; the caller must replace the whole set (ReplaceSetVersioned)
)

func (r SetResult) String() string {
	switch r {
	case SetApplied:
		return "applied"
	case SetSkipped:
		return "skipped"
	case SetGap:
		return "gap"
	}
	return "SetResult(" + strconv.Itoa(int(r)) + ")"
}

// luaVersions compares versions exactly (uint64 does not fit a Lua number):
// decimal strings without leading zeros, shorter is smaller. chunked runs
// cmd on key with ARGV[first..last] in slices of 1000, below the limit of
// unpack.
const luaVersions = `
local function below(a, b)
  return #a < #b or (#a == #b and a < b)
end
local function chunked(cmd, key, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call(cmd, key, unpack(ARGV, i, j))
    i = j + 1
  end
end
`

// applySetSource applies one SetUpdate: KEYS = {KEY, KEY:version}, ARGV =
// {version, version-1, "full" or "delta", number of members to add, the
// members to add..., the members to remove...}. It returns a SetResult.
const applySetSource = luaVersions + `
local stored = redis.call('GET', KEYS[2]) or '0'
if not below(stored, ARGV[1]) then
  return 1
end
local nadd = tonumber(ARGV[4])
if ARGV[3] == 'full' then
  redis.call('DEL', KEYS[1])
elseif stored ~= ARGV[2] then
  return 2
end
chunked('SADD', KEYS[1], 5, 4 + nadd)
chunked('SREM', KEYS[1], 5 + nadd, #ARGV)
redis.call('SET', KEYS[2], ARGV[1])
return 0
`

// switchSetSource ends ReplaceSetVersioned: KEYS = {KEY, KEY:version,
// KEY:building}, ARGV = {version}. Unless the stored version is already
// at least version (reply 0, KEY:building deleted), it makes KEY:building
// the new KEY (an absent one: the empty set) and stores version (reply 1).
const switchSetSource = luaVersions + `
local stored = redis.call('GET', KEYS[2]) or '0'
if not below(stored, ARGV[1]) then
  redis.call('DEL', KEYS[3])
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('RENAME', KEYS[3], KEYS[1])
else
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
`

var (
	applySetScript  = goredis.NewScript(applySetSource)
	switchSetScript = goredis.NewScript(switchSetSource)
)

// saddChunk is the most members ReplaceSetVersioned sends in one SADD.
const saddChunk = 10000

// ApplySets applies updates in order (several versions of one key in one call are fine:
// they apply in sequence), pipelined in batches of Config.BatchSize, each update atomically
// (one Lua script per update: check the version key, SADD/SREM or DEL+SADD, SET the version key).
// It returns one result per update, or an error naming the batch.
//
// An update is written, with its version in KEY + VersionSuffix, only as a
// whole and only in order: a delta needs the stored version to be exactly
// its predecessor, a full update any lower one. Replaying updates is
// harmless: those already applied come back SetSkipped and change nothing.
// On an error the earlier batches are applied (and maybe part of the
// failed one); the caller retries the whole call. A Full update with no
// members deletes KEY and stores its version.
func (s *Sink) ApplySets(ctx context.Context, ups []SetUpdate) ([]SetResult, error) {
	if s.closed.Load() {
		return nil, ErrClosed
	}
	for i, u := range ups {
		if u.Version == 0 {
			return nil, fmt.Errorf("redis ApplySets: update %d (key %q) has version 0; versions begin at 1", i+1, u.Key)
		}
	}
	results := make([]SetResult, len(ups))
	for start := 0; start < len(ups); start += s.cfg.BatchSize {
		end := min(start+s.cfg.BatchSize, len(ups))
		if err := s.applySetBatch(ctx, ups[start:end], results[start:end]); err != nil {
			what := fmt.Sprintf("updates %d-%d of %d", start+1, end, len(ups))
			if start > 0 {
				what += "; earlier batches applied"
			}
			return nil, fmt.Errorf("redis ApplySets (%s): %w", what, err)
		}
	}
	return results, nil
}

// applySetBatch applies ups in one pipeline and fills results. When the
// server did not know the script it sends the updates again from the first
// refused one, by EVAL (a replay: those applied meanwhile are skipped, and
// keep their SetApplied).
func (s *Sink) applySetBatch(ctx context.Context, ups []SetUpdate, results []SetResult) error {
	from, eval := 0, false
	var appliedBefore []bool // by the first attempt, when there is a second
	for {
		cmds := make([]*goredis.Cmd, 0, len(ups)-from)
		pipe := s.client.Pipeline()
		for _, u := range ups[from:] {
			cmds = append(cmds, evalScript(ctx, pipe, applySetScript, eval, []string{u.Key, u.Key + VersionSuffix}, applySetArgs(u)...))
		}
		_, _ = pipe.Exec(ctx) // each command carries its error
		retry := -1
		for i, c := range cmds {
			u := ups[from+i]
			v, err := c.Int64()
			switch {
			case err == nil && v >= int64(SetApplied) && v <= int64(SetGap):
				if !eval || !appliedBefore[from+i] {
					results[from+i] = SetResult(v)
				}
			case err == nil:
				return fmt.Errorf("update of %q to version %d: unexpected reply %d", u.Key, u.Version, v)
			case !eval && goredis.HasErrorPrefix(err, "NOSCRIPT"):
				if retry < 0 {
					retry = from + i
				}
			case retry >= 0:
				// After a refused script: sent again below.
			default:
				return fmt.Errorf("update of %q to version %d: %w", u.Key, u.Version, err)
			}
		}
		if retry < 0 {
			return nil
		}
		appliedBefore = make([]bool, len(ups))
		for i, c := range cmds[retry-from:] {
			if v, err := c.Int64(); err == nil && SetResult(v) == SetApplied {
				appliedBefore[retry+i] = true
			}
		}
		from, eval = retry, true
	}
}

// applySetArgs are the ARGV of applySetSource for u.
func applySetArgs(u SetUpdate) []any {
	kind, remove := "delta", u.Remove
	if u.Full {
		kind, remove = "full", nil
	}
	args := make([]any, 0, 4+len(u.Add)+len(remove))
	args = append(args, strconv.FormatUint(u.Version, 10), strconv.FormatUint(u.Version-1, 10), kind, len(u.Add))
	for _, m := range u.Add {
		args = append(args, m)
	}
	for _, m := range remove {
		args = append(args, m)
	}
	return args
}

// ReplaceSetVersioned replaces the whole content of key with the members that next yields
// (next returns nil, nil when done; chunks of any size, memory stays bounded by a chunk),
// at version: unless the stored version is already >= version, in which case nothing
// changes and it returns false. Readers see the old content until the switch: members are
// written to a temporary key (e.g. KEY + ":building"; DEL it first), then one script checks
// the version, RENAMEs the temporary key onto KEY (or DELs KEY when the new set is empty) and
// SETs the version key, atomically. A failure leaves KEY and its version untouched (the
// temporary key is deleted when possible).
//
// The temporary key is KEY + BuildingSuffix and the version key KEY +
// VersionSuffix. Two calls for one key must not run at the same time (they
// would share the temporary key). When the stored version is already high
// enough at the start, next is not called. It returns true once the new
// content and version are stored.
func (s *Sink) ReplaceSetVersioned(ctx context.Context, key string, version uint64, next func() ([]string, error)) (bool, error) {
	if s.closed.Load() {
		return false, ErrClosed
	}
	if version == 0 {
		return false, fmt.Errorf("redis ReplaceSetVersioned %q: version 0; versions begin at 1", key)
	}
	verKey, tmp := key+VersionSuffix, key+BuildingSuffix
	ver := strconv.FormatUint(version, 10)
	fail := func(what string, err error) (bool, error) {
		// Best effort, also when ctx is what failed.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.WriteTimeout)
		defer cancel()
		if derr := s.client.Del(cctx, tmp).Err(); derr != nil {
			err = errors.Join(err, fmt.Errorf("deleting %q: %w", tmp, derr))
		}
		return false, fmt.Errorf("redis ReplaceSetVersioned %q at version %d: %s: %w", key, version, what, err)
	}
	stored, err := s.client.Get(ctx, verKey).Result()
	switch {
	case errors.Is(err, goredis.Nil):
	case err != nil:
		return false, fmt.Errorf("redis ReplaceSetVersioned %q at version %d: GET %q: %w", key, version, verKey, err)
	default:
		if n, perr := strconv.ParseUint(stored, 10, 64); perr == nil && n >= version {
			return false, nil
		}
	}
	if err := s.client.Del(ctx, tmp).Err(); err != nil {
		return fail("DEL of the temporary key", err)
	}
	added := 0
	for {
		members, err := next()
		if err != nil {
			return fail(fmt.Sprintf("reading the members (after %d)", added), err)
		}
		if members == nil {
			break
		}
		_, err = s.client.Pipelined(ctx, func(p goredis.Pipeliner) error {
			for start := 0; start < len(members); start += saddChunk {
				chunk := members[start:min(start+saddChunk, len(members))]
				args := make([]any, len(chunk))
				for i, m := range chunk {
					args[i] = m
				}
				p.SAdd(ctx, tmp, args...)
			}
			return nil
		})
		if err != nil {
			return fail(fmt.Sprintf("SADD to %q (after %d members)", tmp, added), err)
		}
		added += len(members)
	}
	keys := []string{key, verKey, tmp}
	v, err := evalScript(ctx, s.client, switchSetScript, false, keys, ver).Int64()
	if err != nil && goredis.HasErrorPrefix(err, "NOSCRIPT") {
		v, err = evalScript(ctx, s.client, switchSetScript, true, keys, ver).Int64()
	}
	if err != nil {
		return fail("switch", err)
	}
	return v == 1, nil
}
