package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/pipeline"
	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

// TestInvalidationVersionedRedis: with invalidation.redis.mode: versioned,
// a committed change deletes its keys and leaves each key's marker holding
// the change's position (the same position the invalidations topic
// carries), and a reader's fill that began before the change is refused:
// the look-aside race of issue 14 against the whole pipeline.
func TestInvalidationVersionedRedis(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "ver", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Redis.Mode = "versioned"
		c.Invalidation.Redis.MarkerPrefix = "mk:"
	})
	e.start(cfg)
	e.startInvalidation(cfg)
	rc := rd.Client()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	filler, err := redisfill.New(rc, redisfill.Config{MarkerPrefix: "mk:"})
	if err != nil {
		t.Fatal(err)
	}
	const key = "room:!r1:members"
	marker := redisfill.MarkerKey("mk:", key)

	// A reader misses and reads the members (none yet); then a join commits.
	_, hit, tok, err := filler.Begin(ctx, key)
	if err != nil || hit {
		t.Fatalf("Begin = hit %v, %v", hit, err)
	}
	if err := rc.Set(ctx, "user:@a:rooms", "cached", 0).Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'join')`)
	deadline := time.Now().Add(20 * time.Second)
	for !strings.HasPrefix(rc.Get(ctx, marker).Val(), "v:") {
		if time.Now().After(deadline) {
			t.Fatalf("no marker %s within 20s (it holds %q)", marker, rc.Get(ctx, marker).Val())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := rc.Exists(ctx, "user:@a:rooms").Val(); n != 0 {
		t.Error("user:@a:rooms not deleted with its marker written")
	}
	// The reader's fill of what it read before the join is refused.
	if ok, err := filler.Fill(ctx, key, tok, "members: none"); err != nil || ok {
		t.Fatalf("Fill of a value read before the join = %v, %v; want refused", ok, err)
	}
	if n := rc.Exists(ctx, key).Val(); n != 0 {
		t.Fatalf("stale value of %s in Redis", key)
	}

	// The marker is the position the invalidations topic records.
	e.waitGroupCaughtUp(cfg.Invalidation.Group, []string{"ver.public.room_memberships"}, 20*time.Second)
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), "ver.invalidations")
	if err != nil {
		t.Fatal(err)
	}
	var want string
	for _, r := range recs {
		if string(r.Key) == key {
			lsn, seq, _ := strings.Cut(string(r.Value), ":")
			p, err := pipeline.ParsePositionHeaders(lsn, seq)
			if err != nil {
				t.Fatal(err)
			}
			want = redisfill.Marker(p)
		}
	}
	if got := rc.Get(ctx, marker).Val(); want == "" || got != want {
		t.Errorf("marker %s = %q, want %q (the invalidations topic's position)", marker, got, want)
	}
	if ttl := rc.PTTL(ctx, marker).Val(); ttl <= 0 || ttl > time.Minute {
		t.Errorf("marker TTL %v, want the default (1m) or less", ttl)
	}
	// A load that begins after the invalidation fills.
	v, err := filler.GetOrLoad(ctx, key, func(context.Context) (string, error) { return "members: @a", nil })
	if err != nil || v != "members: @a" || rc.Get(ctx, key).Val() != "members: @a" {
		t.Fatalf("fresh GetOrLoad = %q, %v; Redis holds %q", v, err, rc.Get(ctx, key).Val())
	}
}
