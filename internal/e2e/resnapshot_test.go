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
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
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

// TestNewTableSnapshotted (issue 16, tables added later): a table added to
// postgres.tables after the slot was created is snapshotted incrementally
// on the next start (snapshot.new_tables): its topic, folded, equals the
// table, including the rows it had before it was added; the next start
// does not snapshot it again. A table without a key to chunk by is left
// to its live changes, with a warning naming it.
func TestNewTableSnapshotted(t *testing.T) {
	e := newEnv(t, "")
	e.seedItems(10)
	cfg := e.config("newtab", []string{"public.items"}, nil)
	r := e.start(cfg)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	e.exec(`CREATE TABLE later (id int PRIMARY KEY, v int NOT NULL); INSERT INTO later SELECT g, g FROM generate_series(1, 5000) g;
CREATE TABLE later_nokey (a int); ALTER TABLE later_nokey REPLICA IDENTITY FULL; INSERT INTO later_nokey VALUES (1)`)
	cfg2 := e.config("newtab", []string{"public.items", "public.later", "public.later_nokey"}, func(c *config.Config) {
		c.Snapshot.SignalInterval = 50 * time.Millisecond
	})
	core, logs := observer.New(zap.InfoLevel)
	r = e.startWith(cfg2, zap.New(core))
	var id int64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		err := e.pool.QueryRow(context.Background(), `SELECT id FROM tidemark.incremental_snapshots WHERE table_name = 'public.later'`).Scan(&id)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot of the added table: %v", err)
		}
	}
	e.exec(`UPDATE later SET v = -1 WHERE id <= 100; DELETE FROM later WHERE id > 4990`)
	rows, _ := e.waitIncrementalDone(id, 60*time.Second, nil)
	e.waitSlot(cfg2.Postgres.Slot, e.currentLSN(), 30*time.Second)
	fold := map[string]string{}
	ms := e.read("newtab.public.later")
	sortByPosition(ms)
	for _, m := range ms {
		if m.Env.Op == "d" {
			delete(fold, string(m.Env.Before["id"]))
		} else {
			fold[string(m.Env.After["id"])] = string(m.Env.After["v"])
		}
	}
	var n, bad int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*), count(*) FILTER (WHERE v <> CASE WHEN id <= 100 THEN -1 ELSE id END) FROM later`).Scan(&n, &bad); err != nil {
		t.Fatal(err)
	}
	if len(fold) != n || bad != 0 || fold["1"] != "-1" || fold["4000"] != "4000" || fold["4995"] != "" {
		t.Errorf("fold of the added table: %d keys (table %d rows, %d unexpected), 1=%s 4000=%s 4995=%q", len(fold), n, bad, fold["1"], fold["4000"], fold["4995"])
	}
	t.Logf("added table: %d snapshot rows, %d records", rows, len(ms))
	if w := logs.FilterMessageSnippet("cannot be snapshotted automatically").FilterField(zap.String("table", "public.later_nokey")); w.Len() != 1 {
		t.Errorf("no warning naming the keyless added table: %v", logs.All())
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	// The next start queues nothing.
	r = e.start(cfg2)
	var count int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.incremental_snapshots`).Scan(&count); err != nil || count != 1 {
		t.Errorf("%d snapshots after another start (%v), want 1", count, err)
	}
}
