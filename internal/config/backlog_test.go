package config_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/internal/config"
)

// TestInvalidationMaxBacklogBytes: invalidation.max_backlog_bytes defaults
// to 64 MiB, and a value below 1 MiB is refused by its field path.
func TestInvalidationMaxBacklogBytes(t *testing.T) {
	base := `postgres: {dsn: "postgres://t@db:5432/app", tables: [public.room_memberships]}
kafka: {brokers: ["k:9092"]}
invalidation:
  rules: [{table: public.room_memberships, keys: ["room:{room_id}:members"]}]
`
	c, err := config.Parse("inv.yml", []byte(base), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Invalidation.MaxBacklogBytes; got != 64<<20 {
		t.Errorf("default max_backlog_bytes = %d, want %d", got, 64<<20)
	}
	_, err = config.Parse("inv.yml", []byte(base+"  max_backlog_bytes: 1000\n"), noEnv)
	if got := problemPaths(t, err); !slices.Equal(got, []string{"invalidation.max_backlog_bytes"}) {
		t.Errorf("problem paths %q, want [invalidation.max_backlog_bytes]: %v", got, err)
	}
	if err == nil || !strings.Contains(err.Error(), "below 1 MiB") {
		t.Errorf("error %v does not say the bound", err)
	}
}
