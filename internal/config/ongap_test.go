package config_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/internal/config"
)

// TestOnGap: invalidation.on_gap defaults to fail; an unknown value, Redis
// patterns without flush_prefix or without Redis, and a pattern matching
// every key are refused by field.
func TestOnGap(t *testing.T) {
	const base = `postgres:
  dsn: "postgres://tidemark@db:5432/chat"
  tables: [public.events]
kafka:
  brokers: ["k:9092"]
invalidation:
  rules: [{table: public.events, keys: ["room:{room_id}:timeline"]}]
`
	c, err := config.Parse("good.yml", []byte(base), func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if c.Invalidation.OnGap != config.OnGapFail {
		t.Errorf("default on_gap = %q, want fail", c.Invalidation.OnGap)
	}
	if _, err := config.Parse("flush.yml", []byte(base+`  on_gap: flush_prefix
  redis: {addr: "cache:6379"}
  on_gap_redis_patterns: ["room:*"]
`), func(string) string { return "" }); err != nil {
		t.Errorf("flush_prefix with patterns refused: %v", err)
	}
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"flush of nothing", "  on_gap: flush_prefix\n  topic: false\n  redis: {addr: \"cache:6379\"}\n",
			[]string{`invalidation.on_gap: flush_prefix would flush nothing`}},
		{"unknown value", "  on_gap: skip\n", []string{`invalidation.on_gap: "skip" is neither fail nor flush_prefix`}},
		{"patterns without flush_prefix", "  redis: {addr: \"cache:6379\"}\n  on_gap_redis_patterns: [\"room:*\"]\n",
			[]string{`invalidation.on_gap_redis_patterns: only used with on_gap: flush_prefix`}},
		{"patterns without redis", "  on_gap: flush_prefix\n  on_gap_redis_patterns: [\"room:*\"]\n",
			[]string{`invalidation.on_gap_redis_patterns: needs invalidation.redis`}},
		{"pattern of every key", "  on_gap: flush_prefix\n  redis: {addr: \"cache:6379\"}\n  on_gap_redis_patterns: [\"room:*\", \"*\"]\n",
			[]string{`invalidation.on_gap_redis_patterns[1]: "*" would UNLINK every key`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := config.Parse("bad.yml", []byte(base+tc.yaml), func(string) string { return "" })
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			for _, p := range problemPaths(t, err) {
				if !slices.Contains([]string{"invalidation.on_gap", "invalidation.on_gap_redis_patterns", "invalidation.on_gap_redis_patterns[1]"}, p) {
					t.Errorf("unexpected problem %s:\n%v", p, err)
				}
			}
		})
	}
}
