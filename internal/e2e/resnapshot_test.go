package e2e

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/app"
)

// TestResnapshotAfterDroppedSlot (issue 16, recovery path): with a healthy
// slot, --resnapshot is refused (nothing to recover). After the slot was
// dropped and the application went on writing (updates, deletes,
// inserts), `run --resnapshot` creates the slot with an exported snapshot
// and publishes every row again before it streams: the topic, folded by
// position, holds every row of the table with its current values; only
// the rows deleted in the gap remain (no delete was captured for them), as
// the README says. Without --resnapshot the start is refused (a gap).
func TestResnapshotAfterDroppedSlot(t *testing.T) {
	e := newEnv(t, "")
	e.seedItems(300)
	cfg := e.config("resnap", []string{"public.items"}, snapshotInitial)
	r := e.start(cfg)
	e.exec(`UPDATE items SET v = 1 WHERE id <= 10`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	var rs *app.ResnapshotError
	if _, err := app.Prepare(ctx, cfg, log, app.Resnapshot()); !errors.As(err, &rs) {
		t.Fatalf("--resnapshot with a healthy slot: %v, want a ResnapshotError", err)
	}
	if _, err := e.pool.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, cfg.Postgres.Slot); err != nil {
		t.Fatal(err)
	}
	e.exec(`UPDATE items SET v = 2 WHERE id BETWEEN 5 AND 20; DELETE FROM items WHERE id BETWEEN 100 AND 109; INSERT INTO items VALUES (1000, 3, 'gap')`)
	var gap *app.SlotGapError
	if _, err := app.Prepare(ctx, cfg, log); !errors.As(err, &gap) {
		t.Fatalf("start without the slot: %v, want a SlotGapError", err)
	}
	a, err := app.Prepare(ctx, cfg, log, app.Resnapshot())
	if err != nil {
		t.Fatal(err)
	}
	if a.Snapshot == nil {
		t.Fatal("--resnapshot created the slot without a snapshot")
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(rctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	e.exec(`UPDATE items SET v = 4 WHERE id = 1`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 60*time.Second)
	_, extra := e.foldAgainstItems("resnap.public.items")
	want := []string{}
	for id := 100; id <= 109; id++ {
		want = append(want, strconv.Itoa(id))
	}
	slices.Sort(extra)
	slices.Sort(want)
	if !slices.Equal(extra, want) {
		t.Errorf("keys in the fold but not in the table: %v, want exactly those deleted in the gap %v", extra, want)
	}
}
