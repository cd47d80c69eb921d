package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation"
)

// checkBinary runs `tidemark check` on cfg and returns its output and exit
// code.
func checkBinary(t *testing.T, cfg *config.Config) (string, int) {
	t.Helper()
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "check.yml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary(t), "check", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("check: %v\n%s", err, out)
	}
	return string(out), 0
}

// waitKeysGone waits until none of keys exists in Redis and returns how
// long that took; it fails the test after within.
func waitKeysGone(t *testing.T, rd *redistest.Server, within time.Duration, keys ...string) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		n, err := rd.Client().Exists(context.Background(), keys...).Result()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%d of keys %v still cached after %s", n, keys, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func setKeys(t *testing.T, rd *redistest.Server, keys ...string) {
	t.Helper()
	for _, k := range keys {
		if err := rd.Client().Set(context.Background(), k, "cached", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestInvalidationTemplatesNeedOldImages (acceptance 1): a rule whose
// template uses a column deletes do not carry (events keyed by event_id,
// the default identity) is refused by `tidemark check` (exit 3) and by the
// consumer's start, naming the rule, the column and the fix; so is a
// typo'd template, at check. With REPLICA IDENTITY FULL the same rule is
// accepted and a delete invalidates its key.
func TestInvalidationTemplatesNeedOldImages(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	e.exec(`ALTER TABLE events REPLICA IDENTITY DEFAULT`)
	cfg := e.config("oldimg", demo.Tables, func(c *config.Config) {
		c.Invalidation = &config.Invalidation{
			Redis: &config.Redis{Addr: rd.Addr()},
			Rules: []invalidation.Rule{{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}, Ops: []string{"c", "d"}}},
		}
	})
	want := []string{
		"invalidation.rules[0] (public.events): its templates use column(s) room_id",
		"a DELETE's old image carries only the replica identity (replica identity: event_id)",
		"fix: ALTER TABLE public.events REPLICA IDENTITY FULL; or limit the rule to ops: [c]",
	}
	out, code := checkBinary(t, cfg)
	if code != 3 {
		t.Errorf("check: exit %d, want 3\n%s", code, out)
	}
	_, err := app.PrepareInvalidation(context.Background(), cfg, nil)
	if err == nil {
		t.Fatal("PrepareInvalidation accepted the rule")
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("check output lacks %q:\n%s", w, out)
		}
		if !strings.Contains(err.Error(), w) {
			t.Errorf("PrepareInvalidation error lacks %q:\n%v", w, err)
		}
	}

	typo := *cfg
	inv := *cfg.Invalidation
	inv.Rules = []invalidation.Rule{{Table: "public.events", Keys: []string{"room:{roomid}:timeline"}, Ops: []string{"c"}}}
	typo.Invalidation = &inv
	if out, code := checkBinary(t, &typo); code != 3 || !strings.Contains(out, `invalidation.rules[0].keys[0]: "room:{roomid}:timeline" uses column "roomid"`) {
		t.Errorf("check with a typo'd template: exit %d, want 3 naming it\n%s", code, out)
	}

	e.exec(`ALTER TABLE events REPLICA IDENTITY FULL`)
	if out, code := checkBinary(t, cfg); code != 0 || !strings.Contains(out, "invalidation rules: 1 checked") {
		t.Errorf("check under REPLICA IDENTITY FULL: exit %d\n%s", code, out)
	}
	e.start(cfg)
	invc, _ := e.startInvalidation(cfg)
	e.exec(`INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ('$d1', '!del', '@a', 'm.room.message', 1)`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp(cfg.Invalidation.Group, []string{"oldimg.public.events"}, 20*time.Second)
	setKeys(t, rd, "room:!del:timeline")
	e.exec(`DELETE FROM events WHERE event_id = '$d1'`)
	waitKeysGone(t, rd, 20*time.Second, "room:!del:timeline")
	if n := invc.Consumer.Stats().DLQ.Load(); n != 0 {
		t.Errorf("%d changes dead-lettered", n)
	}
}

// TestInvalidationExcludedOps (acceptance 4): with the README's rule
// `ops: [c, u]` on read_markers, 20 deletes are counted no-ops
// (skipped_total{reason="op_excluded"} = 20), never retried or
// dead-lettered, and an insert after them has its key deleted within a
// second of its commit.
func TestInvalidationExcludedOps(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "excl", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Rules[1].Ops = []string{"c", "u"}
		c.Invalidation.Rules[1].Columns = []string{"stream_ordering"}
	})
	e.start(cfg)
	inv, _ := e.startInvalidation(cfg)
	var warm []string
	for i := 0; i < 20; i++ {
		warm = append(warm, "unread:@d"+string(rune('a'+i))+":!x")
	}
	setKeys(t, rd, warm...)
	e.exec(`INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) SELECT '@d' || chr(97 + g), '!x', '$e', g FROM generate_series(0, 19) g`)
	waitKeysGone(t, rd, 30*time.Second, warm...) // the consumer is running

	e.exec(`DELETE FROM read_markers WHERE room_id = '!x'`)
	setKeys(t, rd, "unread:@late:!x")
	e.exec(`INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) VALUES ('@late', '!x', '$e', 1)`)
	if took := waitKeysGone(t, rd, 30*time.Second, "unread:@late:!x"); took > time.Second {
		t.Errorf("the insert after 20 excluded deletes was invalidated %v after its commit, want within 1s", took)
	}
	topics := []string{"excl.public.room_memberships", "excl.public.read_markers", "excl.public.events"}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp(cfg.Invalidation.Group, topics, 20*time.Second)
	st := inv.Consumer.Stats()
	if got := st.SkippedBy()[invalidation.SkipOpExcluded]; got != 20 {
		t.Errorf("skipped op_excluded = %d, want 20 (all: %v)", got, st.SkippedBy())
	}
	if st.DLQ.Load() != 0 || st.Retries.Load() != 0 {
		t.Errorf("dead-lettered %d, retried %d; want none", st.DLQ.Load(), st.Retries.Load())
	}
	if recs, err := kafkatest.ReadAll(context.Background(), e.kafka.Brokers(), "excl.dlq"); err == nil && len(recs) > 0 {
		t.Errorf("the DLQ holds %d records: %v", len(recs), recs[0].Headers)
	}
}

// TestInvalidationTruncateFlushesOnce (acceptance 5): a TRUNCATE (sent to
// every partition) under the default on_truncate (flush_pattern, Redis
// configured) deletes the rule's keys by pattern once, leaves other keys,
// dead-letters nothing, and a change committed after it is invalidated
// within a second.
func TestInvalidationTruncateFlushesOnce(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "trunc", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Rules = c.Invalidation.Rules[:1] // room_memberships: room:{room_id}:members, user:{user_id}:rooms
	})
	e.start(cfg)
	inv, _ := e.startInvalidation(cfg)
	ctx := context.Background()
	setKeys(t, rd, "room:!w:members")
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!w', '@w', 'join')`)
	waitKeysGone(t, rd, 30*time.Second, "room:!w:members") // the consumer is running

	flushed := []string{"room:!a:members", "room:!b:members", "user:@x:rooms", "user:@y:rooms"}
	setKeys(t, rd, append(flushed, "unrelated", "room:!a:timeline")...)
	if err := rd.Client().ConfigResetStat(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`TRUNCATE room_memberships`)
	waitKeysGone(t, rd, 20*time.Second, flushed...)
	setKeys(t, rd, "room:!after:members")
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!after', '@z', 'join')`)
	if took := waitKeysGone(t, rd, 20*time.Second, "room:!after:members"); took > time.Second {
		t.Errorf("a change after the truncate was invalidated %v after its commit, want within 1s", took)
	}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp(cfg.Invalidation.Group, []string{"trunc.public.room_memberships"}, 20*time.Second)
	if n, err := rd.Client().Exists(ctx, "unrelated", "room:!a:timeline").Result(); err != nil || n != 2 {
		t.Errorf("keys outside the rule's patterns deleted (%d of 2 left, %v)", n, err)
	}
	// Two patterns over a small keyspace: one SCAN each, if the flush
	// happened once (the truncate arrives on each of 3 partitions).
	stats, err := rd.Client().Info(ctx, "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stats, "cmdstat_scan:calls=2,") {
		t.Errorf("want exactly 2 SCAN calls (one flush of 2 patterns); commandstats:\n%s", stats)
	}
	st := inv.Consumer.Stats()
	if got := st.SkippedBy()[invalidation.SkipTruncateDuplicate]; got != 2 {
		t.Errorf("skipped truncate_duplicate = %d, want 2 (3 partitions, one action)", got)
	}
	if st.DLQ.Load() != 0 || st.Retries.Load() != 0 {
		t.Errorf("dead-lettered %d, retried %d; want none", st.DLQ.Load(), st.Retries.Load())
	}
}
