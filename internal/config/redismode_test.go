package config_test

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
)

// TestRedisMode: invalidation.redis.mode and its marker settings are
// parsed, defaulted to delete, and every misuse is reported by path.
func TestRedisMode(t *testing.T) {
	const base = `
postgres:
  dsn: "postgres://tidemark@db:5432/chat"
  tables: [public.events, public.users]
kafka:
  brokers: ["k:9092"]
invalidation:
  rules:
    - table: events
      keys: ["room:{room_id}:timeline", "tm:m:{event_id}"]
`
	for _, tc := range []struct {
		name  string
		yaml  string
		paths []string // problem paths; none = valid
		errs  []string
		check func(t *testing.T, c *config.Config)
	}{
		{name: "default is delete", yaml: "  redis: {addr: \"r:6379\"}\n", check: func(t *testing.T, c *config.Config) {
			if m := c.Invalidation.Redis.Mode; m != "" {
				t.Errorf("mode = %q, want empty (delete)", m)
			}
		}},
		{name: "versioned", yaml: "  redis: {addr: \"r:6379\", mode: versioned, marker_prefix: \"mk:\", marker_ttl: 90s}\n", check: func(t *testing.T, c *config.Config) {
			if v := c.Invalidation.Redis.RedisVersioning; v != (config.RedisVersioning{Mode: "versioned", MarkerPrefix: "mk:", MarkerTTL: 90 * time.Second}) {
				t.Errorf("versioning = %+v", v)
			}
		}},
		{name: "unknown mode", yaml: "  redis: {addr: \"r:6379\", mode: lease}\n",
			paths: []string{"invalidation.redis.mode"}, errs: []string{`"lease" is not delete or versioned`}},
		{name: "defaults listed in delete mode", yaml: "  redis: {addr: \"r:6379\", mode: delete, marker_prefix: \"tidemark:marker:\", marker_ttl: 1m}\n",
			check: func(*testing.T, *config.Config) {}},
		{name: "marker settings without versioned", yaml: "  redis: {addr: \"r:6379\", marker_ttl: 5s}\n",
			paths: []string{"invalidation.redis.mode"}, errs: []string{"only used with mode: versioned"}},
		{name: "bad marker settings", yaml: "  redis: {addr: \"r:6379\", mode: versioned, marker_prefix: \"m{x}:\", marker_ttl: -1s}\n",
			paths: []string{"invalidation.redis.marker_prefix", "invalidation.redis.marker_ttl"}, errs: []string{"must not contain { or }", "-1s must be at least 1ms"}},
		{name: "prefix collides with a cache key", yaml: "  redis: {addr: \"r:6379\", mode: versioned, marker_prefix: \"tm:\"}\n",
			paths: []string{"invalidation.redis.marker_prefix"}, errs: []string{`"tm:" begins the keys of invalidation.rules[0].keys[1] ("tm:m:{event_id}")`}},
		{name: "not for targets", yaml: `targets:
  membership: {table: public.events}
  users: {table: public.users}
  redis: {addr: "r:6379", mode: versioned}
`, paths: []string{"targets.redis.mode"}, errs: []string{"apply to invalidation.redis only"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.Parse("test.yml", []byte(base+tc.yaml), noEnv)
			if tc.paths == nil {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				tc.check(t, c)
				return
			}
			if err == nil {
				t.Fatalf("Parse accepted it")
			}
			var got []string
			for _, p := range problemPaths(t, err) {
				if strings.Contains(p, "redis") {
					got = append(got, p)
				}
			}
			if !slices.Equal(got, tc.paths) {
				t.Errorf("redis problem paths %q, want %q:\n%v", got, tc.paths, err)
			}
			for _, w := range tc.errs {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}
