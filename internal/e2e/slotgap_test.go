package e2e

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

// slotExists reports whether the replication slot exists.
func (e *env) slotExists(slot string) bool {
	e.t.Helper()
	var n int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n > 0
}

// TestMissingSlotNotRecreated: once the topic prefix has published, a
// dropped slot is not recreated silently (a new slot starts at the current
// WAL position: what was committed meanwhile would never be captured).
// `tidemark run` exits 3 naming the slot, the last published commit LSN and
// the gap, and creates no slot; `tidemark run --accept-gap` creates it,
// says so at Warn naming the slot and the LSN, and captures from then on.
// A first start (nothing published) creates the slot without a word above
// Info.
func TestMissingSlotNotRecreated(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary; skipped in -short")
	}
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	cfg := e.config("gap", []string{"public.notes"}, nil)
	slot := cfg.Postgres.Slot
	path := writeConfig(t, cfg)
	bin := binary(t)

	// run starts `tidemark run` with args; stop ends it with SIGTERM and
	// returns its output once it exited.
	run := func(args ...string) (stop func() string) {
		cmd := exec.Command(bin, append([]string{"run", "--config", path}, args...)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		stopped := false
		stop = func() string {
			if stopped {
				return out.String()
			}
			stopped = true
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Errorf("SIGTERM: %v", err)
			}
			if err := cmd.Wait(); err != nil {
				t.Errorf("tidemark run %v: %v\n%s", args, err, out.String())
			}
			return out.String()
		}
		t.Cleanup(func() { stop() })
		return stop
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}

	// First start: nothing published, the slot is created.
	stop := run()
	waitFor("the slot", func() bool { return e.slotExists(slot) })
	e.exec(`INSERT INTO notes VALUES (1, 'published')`)
	e.waitSlot(slot, e.currentLSN(), 30*time.Second)
	if out := stop(); strings.Contains(out, "WARN") || strings.Contains(out, "ERROR") {
		t.Errorf("first start logged above Info:\n%s", out)
	}
	txns := e.readTxns("gap.transaction")
	if len(txns) == 0 {
		t.Fatal("nothing in gap.transaction after the first run")
	}
	last := pipeline.LSN(txns[len(txns)-1].LSN)

	// The slot is dropped (by an operator, a failover to a replica without
	// it, ...) and the application keeps writing.
	waitFor("dropping the slot", func() bool {
		_, err := e.pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, slot)
		return err == nil
	})
	e.exec(`INSERT INTO notes VALUES (2, 'in the gap')`)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "run", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("tidemark run without the slot: %v, want exit 3\n%s", err, out)
	}
	for _, want := range []string{
		`replication slot "gap_slot" does not exist, but topic prefix "gap" has published before`,
		"the last published transaction committed at LSN " + last.String() + " (gap.transaction)",
		"the changes committed after " + last.String() + " until now would never be captured",
		"`tidemark run --accept-gap`",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("tidemark run output lacks %q:\n%s", want, out)
		}
	}
	if e.slotExists(slot) {
		t.Errorf("the refused start created the slot")
	}
	t.Logf("refused start:\n%s", out)

	// --accept-gap: the slot is created, at Warn, and capture goes on.
	stop = run("--accept-gap")
	waitFor("the slot", func() bool { return e.slotExists(slot) })
	e.exec(`INSERT INTO notes VALUES (3, 'after the gap')`)
	e.waitSlot(slot, e.currentLSN(), 30*time.Second)
	logs := stop()
	warned := false
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, "WARN") && strings.Contains(line, "accepting the gap") &&
			strings.Contains(line, `"slot": "gap_slot"`) && strings.Contains(line, `"last_published_lsn": "`+last.String()+`"`) {
			warned = true
			t.Logf("accepted: %s", line)
		}
	}
	if !warned {
		t.Errorf("--accept-gap: no Warn line naming the accepted gap, the slot and LSN %s:\n%s", last, logs)
	}
	ids := map[string]bool{}
	for _, m := range e.read("gap.public.notes") {
		ids[string(m.Env.After["id"])] = true
	}
	if !ids["1"] || ids["2"] || !ids["3"] {
		t.Errorf("notes published: %v, want 1 and 3 (2 was committed in the gap)", ids)
	}
}

// TestSlotDroppedWhileRunning: a slot dropped while capture runs (its
// walsender ended, then pg_drop_replication_slot) is not recreated: the
// reconnect's "does not exist" ends the run with an error naming the slot
// and the lost changes, instead of retrying or creating a new slot.
func TestSlotDroppedWhileRunning(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	cfg := e.config("dropped", []string{"public.notes"}, nil)
	slot := cfg.Postgres.Slot
	r := e.start(cfg)
	e.exec(`INSERT INTO notes VALUES (1, 'published')`)
	e.waitSlot(slot, e.currentLSN(), 30*time.Second)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		e.exec(`SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL`, slot)
		if _, err := e.pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, slot); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("could not drop the slot within 30s")
		}
	}
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		t.Fatal("capture kept running after its slot was dropped")
	}
	if r.err == nil || !strings.Contains(r.err.Error(), `replication slot "dropped_slot" no longer exists`) || !strings.Contains(r.err.Error(), "--accept-gap") {
		t.Fatalf("run ended with %v, want the dropped-slot explanation", r.err)
	}
	if e.slotExists(slot) {
		t.Error("the slot was recreated")
	}
	t.Logf("run ended with: %v", r.err)
}
