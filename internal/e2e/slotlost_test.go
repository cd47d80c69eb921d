package e2e

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/app"
)

// TestSlotInvalidatedWhileRunning: on a server with a small
// max_slot_wal_keep_size, capture is held back (the broker is down, so
// nothing is acknowledged) while WAL piles up until a checkpoint
// invalidates the slot. Postgres ends the walsender; capture must not
// reconnect forever: `tidemark run` exits non-zero with the "lost"
// explanation naming the slot.
func TestSlotInvalidatedWhileRunning(t *testing.T) {
	srv := throwawayServer(t, map[string]string{
		"max_slot_wal_keep_size": "64MB", "max_wal_size": "32MB", "min_wal_size": "32MB", "wal_keep_size": "0",
	})
	ctx := context.Background()
	e := envOn(t, srv)
	pool := e.pool
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE filler (id bigserial PRIMARY KEY, pad text)`)
	cfg := e.config("lost", []string{"public.notes"}, nil)
	// The slot and publication first, so the first row is after the slot's
	// start; then the real binary, so that the exit status is what an
	// operator sees.
	if _, err := app.Prepare(ctx, cfg, nil); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary(t), "run", "--config", writeConfig(t, cfg))
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			if err := cmd.Process.Kill(); err != nil {
				t.Errorf("killing tidemark: %v", err)
			}
			<-exited
		}
	})
	e.exec(`INSERT INTO notes VALUES (1, 'published')`)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := e.partitionCount("lost.public.notes"); err == nil && len(e.read("lost.public.notes")) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the first row was not published within 30s\n%s", &out)
		}
	}

	e.kafka.Stop()
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
	case <-exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("tidemark still running 60s after its slot was invalidated\n%s", &out)
	}
	var ee *exec.ExitError
	if !errors.As(waitErr, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("tidemark exited with %v, want a non-zero exit code\n%s", waitErr, &out)
	}
	if !strings.Contains(out.String(), `replication slot \"lost_slot\" is invalidated (wal_status lost)`) &&
		!strings.Contains(out.String(), `replication slot "lost_slot" is invalidated (wal_status lost)`) {
		t.Fatalf("output lacks the lost-slot explanation naming the slot:\n%s", &out)
	}
	if n := strings.Count(out.String(), "reconnecting"); n > 1 {
		t.Errorf("%d reconnect warnings before giving up, want at most the one after the walsender was ended\n%s", n, &out)
	}
	t.Logf("exit code %d", ee.ExitCode())
}
