package e2e

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
)

// TestIncrementalSnapshotWaitsForInvisibleCommit: a transaction that has
// committed (its commit record is written and streamed, clog says
// committed) but is not yet visible, because it waits for a synchronous
// standby that never answers, must not let a chunk read the row without
// it: the chunk would be published after the live change, stale. Tidemark
// is restarted after the change was streamed, so the stream's memory of
// recent commits does not help; the runner's check of the chunk
// snapshot's invisible transactions against the sessions waiting for a
// synchronous standby must (without it the chunk is published stale:
// key 5 with v=0 after the change to v=999). The snapshot
// waits (retries counted) until the transaction is visible, then the
// fold of the topic equals the table with no stale snapshot row.
func TestIncrementalSnapshotWaitsForInvisibleCommit(t *testing.T) {
	srv := throwawayServer(t, nil)
	ctx := context.Background()
	e := envOn(t, srv)
	pool := e.pool
	e.seedItems(1000)
	e.exec(`ALTER SYSTEM SET synchronous_standby_names = 'nobody'`)
	e.exec(`SELECT pg_reload_conf()`)
	cfg := e.config("stuck", []string{"public.items"}, func(c *config.Config) {
		c.Snapshot.ChunkSize = 100
		c.Snapshot.SignalInterval = 50 * time.Millisecond
	})
	// What a role without pg_read_all_stats is told (a superuser, the
	// harness's role, needs nothing).
	if w, err := capture.SyncRepVisibility(ctx, mustConn(t, e.dsn)); err != nil || w != "" {
		t.Errorf("superuser: %q, %v; want no warning", w, err)
	}
	e.exec(`CREATE ROLE plain LOGIN`)
	plainDSN := strings.Replace(e.dsn, "://", "://plain@", 1)
	if strings.Contains(e.dsn, "@") {
		plainDSN = regexp.MustCompile(`://[^@]*@`).ReplaceAllString(e.dsn, "://plain@")
	}
	if w, err := capture.SyncRepVisibility(ctx, mustConn(t, plainDSN)); err != nil || !strings.Contains(w, "GRANT pg_read_all_stats") {
		t.Errorf("a role without pg_read_all_stats: %q, %v; want the grant named", w, err)
	}
	e.exec(`GRANT pg_read_all_stats TO plain`)
	if w, err := capture.SyncRepVisibility(ctx, mustConn(t, plainDSN)); err != nil || w != "" {
		t.Errorf("a role with pg_read_all_stats: %q, %v; want no warning", w, err)
	}
	r := e.start(cfg)

	// The stuck transaction: synchronous_commit on, with a synchronous
	// standby that does not exist.
	conn, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		t.Fatal(err)
	}
	// The waiting session owns conn until it returns: a failing test
	// cancels it and waits before closing conn.
	stuckCtx, cancelStuck := context.WithCancel(ctx)
	stuck := make(chan error, 1)
	stuckDone := make(chan struct{})
	defer func() {
		cancelStuck()
		<-stuckDone
		conn.Close(context.Background())
	}()
	go func() {
		defer close(stuckDone)
		_, err := conn.Exec(stuckCtx, "SET synchronous_commit = on; UPDATE items SET v = 999 WHERE id = 5")
		stuck <- err
	}()
	// Premise: its change is streamed while it is invisible. The topic
	// appears with the first record the stream sends.
	e.waitTopic("stuck.public.items", 15*time.Second)
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		found := false
		for _, m := range e.read("stuck.public.items") {
			if m.Env.Op == "u" && string(m.Env.After["id"]) == "5" {
				found = true
			}
		}
		var v int
		if err := pool.QueryRow(ctx, "SELECT v FROM items WHERE id = 5").Scan(&v); err != nil {
			t.Fatal(err)
		}
		if found && v == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("premise: the waiting transaction's change was not streamed while invisible (streamed %v, visible v=%d)", found, v)
		}
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	r = e.start(cfg)
	ids, err := r.Incremental.Enqueue(ctx, capture.SnapshotRequest{Tables: []string{"items"}})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	state, rows, _, _ := e.incrementalState(ids[0])
	retries := r.Incremental.Stats().Retries.Load()
	if state != capture.IncrementalRunning || rows != 0 || retries == 0 {
		t.Errorf("while the transaction is invisible: state %s, %d rows, %d retries; want running, 0, >0", state, rows, retries)
	}
	// The standby requirement goes: the transaction completes.
	e.exec(`ALTER SYSTEM SET synchronous_standby_names = ''`)
	e.exec(`SELECT pg_reload_conf()`)
	select {
	case err := <-stuck:
		if err != nil {
			t.Fatalf("the waiting transaction: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the waiting transaction did not complete after synchronous_standby_names was cleared")
	}
	e.waitIncrementalDone(ids[0], 60*time.Second, nil)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	t.Logf("%d retries while the transaction was invisible", retries)
	e.foldCheck("stuck.public.items")
}

func mustConn(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}
