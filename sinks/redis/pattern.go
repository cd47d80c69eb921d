package redis

import (
	"context"
	"fmt"
	"strings"
)

// UsePattern is InvalidatePattern: SCAN and UNLINK (for Check and
// Commands). Its bit is kept apart from the iota-numbered uses.
const UsePattern Use = 1 << 7

// scanCount is the COUNT hint of each SCAN: how many keys the server looks
// at per call (not how many match).
const scanCount = 1000

// InvalidatePattern deletes every key matching each glob pattern (Redis
// MATCH syntax: "room:*:members"), walking the keyspace with SCAN and
// deleting what matches with UNLINK in batches of Config.BatchSize, and
// returns how many keys it deleted. Every key that matched when it started
// and still exists is deleted when it returns nil; keys written meanwhile
// may or may not be. It is idempotent; on an error some keys may be
// deleted already and the caller retries the whole call. It publishes
// nothing on Config.Channel (subscribers expect keys, not patterns).
//
// In ModeVersioned it also deletes the markers (and leases) of the
// matching keys, pattern MarkerPrefix + "{*}" + pattern: like Invalidate
// without positions, that refuses every fill in flight of a flushed key
// (its token is gone), and a fill that begins later reads the database
// after the change that asked for the flush.
//
// SCAN visits the whole keyspace of the DB, so its cost grows with the
// number of keys in it, not with the number that match.
//
// Protocol: https://redis.io/docs/latest/commands/scan/ and
// https://redis.io/docs/latest/commands/unlink/.
func (s *Sink) InvalidatePattern(ctx context.Context, patterns []string) (int, error) {
	if s.closed.Load() {
		return 0, ErrClosed
	}
	deleted := 0
	patterns = s.scanOrder(patterns)
	for _, p := range patterns {
		var cursor uint64
		for {
			keys, next, err := s.client.Scan(ctx, cursor, p, scanCount).Result()
			if err != nil {
				return deleted, fmt.Errorf("redis SCAN MATCH %q: %w", p, err)
			}
			for start := 0; start < len(keys); start += s.cfg.BatchSize {
				batch := keys[start:min(start+s.cfg.BatchSize, len(keys))]
				n, err := s.client.Unlink(ctx, batch...).Result()
				if err != nil {
					return deleted, fmt.Errorf("redis UNLINK of %d keys matching %q: %w", len(batch), p, err)
				}
				deleted += int(n)
			}
			if cursor = next; cursor == 0 {
				break
			}
		}
	}
	return deleted, nil
}

// globEscape escapes the characters MATCH patterns give a meaning.
func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[]\^`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// scanOrder is the order InvalidatePattern scans in: in versioned mode the
// patterns of the keys' markers (and leases) first, then the keys. A fill
// whose token is gone is refused, and one that landed before is removed by
// the key scan that follows; keys first left a window in which a reader
// holding its token could SET an old value after its key was unlinked.
func (s *Sink) scanOrder(patterns []string) []string {
	if s.cfg.Mode != ModeVersioned {
		return patterns
	}
	out := make([]string, 0, 2*len(patterns))
	for _, p := range patterns {
		out = append(out, globEscape(s.cfg.MarkerPrefix)+"{*}"+p)
	}
	return append(out, patterns...)
}
