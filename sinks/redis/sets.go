package redis

import (
	"context"
	"fmt"

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
