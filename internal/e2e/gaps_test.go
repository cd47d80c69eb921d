package e2e

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation"
)

// cutTopics deletes every record topics hold now (DeleteRecords up to each
// partition's end), as retention does to a group that was down too long.
func (e *env) cutTopics(topics []string) {
	e.t.Helper()
	ctx := context.Background()
	client, parts := e.partitionCounts(ctx, topics)
	ends, err := kafkatest.EndOffsets(ctx, client, parts)
	if err != nil {
		e.t.Fatal(err)
	}
	for topic, offs := range ends {
		for p, end := range offs {
			if err := kafkatest.DeleteRecords(ctx, e.brokers(), topic, p, end); err != nil {
				e.t.Fatal(err)
			}
		}
	}
}

// runUntilError runs a consumer role and returns what Run returned, or
// fails when it keeps running for 60s.
func runUntilError(t *testing.T, name string, run func(context.Context) error) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := run(ctx)
	if ctx.Err() != nil {
		t.Fatalf("%s kept running for 60s after a retention gap (Run: %v)", name, err)
	}
	return err
}

// TestInvalidationRetentionGap: the invalidation group was stopped while
// a membership change went to Kafka, and retention deleted it unread. With
// on_gap: flush_prefix the restarted consumer logs the gap (group, topic,
// partition, offsets) as an error, counts it in
// tidemark_consumer_offset_gaps_total, publishes a flush control record to
// every partition of <prefix>.invalidations, UNLINKs the configured Redis
// patterns (and nothing else) and goes on invalidating; with on_gap: fail
// (the default) it stops with an error naming the partition and how to
// resume.
func TestInvalidationRetentionGap(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	rc := rd.Client()
	ctx := context.Background()
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "gap", rd.Addr(), func(c *config.Config) {
		c.Invalidation.OnGap = config.OnGapFlushPrefix
		c.Invalidation.OnGapRedisPatterns = []string{"room:*"}
	})
	var topics []string
	for _, r := range cfg.Invalidation.Rules {
		topics = append(topics, "gap."+r.Table)
	}
	e.start(cfg)
	_, stop := e.startInvalidation(cfg)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'join')`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp(cfg.Invalidation.Group, topics, 20*time.Second)
	stop()

	// Down: a change arrives and is deleted by retention before the group
	// reads it (the same row throughout, so its partition is one the group
	// has committed on). Its keys, and others the rules cover, are cached stale.
	e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!r1' AND user_id = '@a'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.cutTopics(topics)
	for _, k := range []string{"room:!r1:members", "room:!r7:timeline", "session:1"} {
		if err := rc.Set(ctx, k, "stale", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}

	core, logs := observer.New(zapcore.WarnLevel)
	inv, err := app.PrepareInvalidation(ctx, cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	inv.Register(reg)
	stop = runConsumer(t, "invalidation", inv.Run)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		n, err := rc.Exists(ctx, "room:!r1:members", "room:!r7:timeline").Result()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the Redis keys of on_gap_redis_patterns were not flushed within 30s of the restart")
		}
	}
	if n, err := rc.Exists(ctx, "session:1").Result(); err != nil {
		t.Fatalf("EXISTS session:1: %v", err)
	} else if n != 1 {
		t.Error("session:1, which no on_gap_redis_patterns pattern matches, was deleted")
	}
	gapLogs := logs.FilterLevelExact(zapcore.ErrorLevel).FilterMessageSnippet("retention gap").All()
	if len(gapLogs) == 0 {
		t.Fatal("no error log of the retention gap")
	}
	f := gapLogs[0].ContextMap()
	if f["group"] != cfg.Invalidation.Group || f["topic"] != "gap.public.room_memberships" || f["partition"] == nil ||
		f["committed"] == nil || f["log_start"] == nil || f["records_lost"] != int64(1) {
		t.Errorf("gap log fields %v lack the group, topic, partition, offsets and size (1 record)", f)
	}
	if n := counterValue(t, reg, "tidemark_consumer_offset_gaps_total", "role", "invalidation"); n != 1 {
		t.Errorf("tidemark_consumer_offset_gaps_total = %v, want 1", n)
	}
	recs, err := kafkatest.ReadAll(ctx, e.brokers(), "gap.invalidations")
	if err != nil {
		t.Fatal(err)
	}
	flushed := map[int]bool{}
	for _, r := range recs {
		if r.Headers[invalidation.ControlHeader] == invalidation.ControlFlush && string(r.Key) == invalidation.FlushKey &&
			strings.Contains(string(r.Value), `"reason":"retention gap: gap.public.room_memberships partition`) {
			flushed[r.Partition] = true
		}
	}
	if len(flushed) != cfg.Kafka.Partitions {
		t.Errorf("flush record on partitions %v of gap.invalidations, want all %d", flushed, cfg.Kafka.Partitions)
	}
	// It goes on from the log start.
	if err := rc.Set(ctx, "room:!r1:members", "cached", 0).Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`UPDATE room_memberships SET membership = 'join' WHERE room_id = '!r1' AND user_id = '@a'`)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		n, err := rc.Exists(ctx, "room:!r1:members").Result()
		if err != nil {
			t.Fatalf("EXISTS room:!r1:members: %v", err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a change after the gap was not invalidated within 20s")
		}
	}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp(cfg.Invalidation.Group, topics, 20*time.Second)
	stop()

	// on_gap: fail stops, naming the partition and the way back.
	failCfg := *cfg
	inc := *cfg.Invalidation
	inc.OnGap, inc.OnGapRedisPatterns = config.OnGapFail, nil
	failCfg.Invalidation = &inc
	e.exec(`UPDATE room_memberships SET membership = 'ban' WHERE room_id = '!r1' AND user_id = '@a'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.cutTopics(topics)
	inv, err = app.PrepareInvalidation(ctx, &failCfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = runUntilError(t, "invalidation", inv.Run)
	t.Logf("Run: %v", err)
	var ge *invalidation.GapError
	if !errors.As(err, &ge) {
		t.Fatalf("Run = %v, want a GapError", err)
	}
	for _, want := range []string{"gap.public.room_memberships partition", "invalidation.on_gap: flush_prefix",
		"--group " + cfg.Invalidation.Group + " --reset-offsets --to-earliest --topic gap.public.room_memberships:"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// TestTargetsStopOnRetentionGap: a membership change deleted by retention
// before the targets group read it stops the targets consumer with an
// error naming the partition and saying to rebuild every room, then
// reset the group.
func TestTargetsStopOnRetentionGap(t *testing.T) {
	e, cfg, stop := canonicalEnv(t, "tgap", nil)
	e.exec(`INSERT INTO users(user_id) VALUES ('@a'); INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'join')`)
	e.waitTargets(cfg, 30*time.Second)
	e.waitGroupCaughtUp(cfg.Targets.Group, targetTopics(cfg), 20*time.Second)
	stop()
	e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!r1' AND user_id = '@a'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.cutTopics(targetTopics(cfg))
	tg, err := app.PrepareTargets(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = runUntilError(t, "targets", tg.Run)
	t.Logf("Run: %v", err)
	var ge *invalidation.GapError
	if !errors.As(err, &ge) {
		t.Fatalf("Run = %v, want a GapError", err)
	}
	for _, want := range []string{"tgap.public.room_memberships partition", "tidemark rebuild targets --all",
		"--group " + cfg.Targets.Group + " --reset-offsets --to-earliest"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// TestIntegrityStopOnRetentionGap: changes deleted by retention before the
// integrity group checked them stop the integrity consumer with an error
// naming the partition, saying they were never checked and how to resume.
func TestIntegrityStopOnRetentionGap(t *testing.T) {
	e := newIntegrityEnv(t, "igap", "1s")
	e.start(e.cfg)
	ig, stop := e.startIntegrity("igap-integrity")
	var topics []string
	for tp := range ig.Topics {
		topics = append(topics, tp)
	}
	e.sentinel()
	e.waitSlot(e.cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp("igap-integrity", topics, 30*time.Second)
	stop()
	e.sentinel()
	e.waitSlot(e.cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.cutTopics(topics)
	cfg := *e.cfg
	in := *cfg.Integrity
	in.Group = "igap-integrity"
	cfg.Integrity = &in
	ig, err := app.PrepareIntegrity(context.Background(), &cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = runUntilError(t, "integrity", ig.Run)
	t.Logf("Run: %v", err)
	var ge *invalidation.GapError
	if !errors.As(err, &ge) {
		t.Fatalf("Run = %v, want a GapError", err)
	}
	for _, want := range []string{"partition", "never checked", "--group igap-integrity --reset-offsets --to-earliest"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}
