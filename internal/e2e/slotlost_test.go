package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/internal/kafkatest"
)

// TestSlotInvalidatedWhileRunning: on a server with a small
// max_slot_wal_keep_size, capture is held back (the broker is down, so
// nothing is acknowledged) while WAL piles up until a checkpoint
// invalidates the slot. Postgres ends the walsender; capture must not
// reconnect forever: Run ends with the "lost" explanation naming the slot.
func TestSlotInvalidatedWhileRunning(t *testing.T) {
	srv := throwawayServer(t, map[string]string{
		"max_slot_wal_keep_size": "64MB", "max_wal_size": "32MB", "min_wal_size": "32MB", "wal_keep_size": "0",
	})
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, srv.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	kc, err := kafkatest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Close)
	e := &env{t: t, dsn: srv.DSN("postgres"), pool: pool, kafka: kc}
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE filler (id bigserial PRIMARY KEY, pad text)`)
	cfg := e.config("lost", []string{"public.notes"}, nil)
	r, logs := e.startObserved(cfg)
	e.exec(`INSERT INTO notes VALUES (1, 'published')`)
	e.waitRecords("lost.public.notes", 1, 20*time.Second)

	kc.Stop()
	e.exec(`INSERT INTO notes VALUES (2, 'never acknowledged')`)
	lost := false
	for i := 0; i < 40 && !lost; i++ {
		e.exec(`INSERT INTO filler (pad) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 25000) g`)
		e.exec(`SELECT pg_switch_wal()`)
		e.exec(`CHECKPOINT`)
		var status *string
		if err := pool.QueryRow(ctx, `SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1`, cfg.Postgres.Slot).Scan(&status); err != nil {
			t.Fatal(err)
		}
		lost = status != nil && *status == "lost"
	}
	if !lost {
		t.Fatal("the slot was not invalidated after 40 steps of ~8 MiB of WAL")
	}
	select {
	case <-r.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("capture still running 60s after its slot was invalidated (reconnects: %d)", r.Stream.Stats().Reconnects.Load())
	}
	if r.err == nil || !strings.Contains(r.err.Error(), `replication slot "lost_slot" is invalidated (wal_status lost)`) {
		t.Fatalf("run ended with %v, want the lost-slot explanation naming the slot", r.err)
	}
	if n := len(warnings(logs, "reconnecting")); n > 1 {
		t.Errorf("%d reconnect warnings before giving up, want at most the one after the walsender was ended", n)
	}
}
