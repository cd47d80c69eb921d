package e2e

import (
	"context"
	"errors"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/app"
)

// haProc is one `tidemark run` of the HA test.
type haProc struct {
	cmd *exec.Cmd
	out *syncBuffer
}

func (p *haProc) leader() bool { return strings.Contains(p.out.String(), "capture leader") }

// TestHATakeover (issue 18, acceptance 1): two `tidemark run` processes on
// one slot under a workload. The leader is killed with SIGKILL three
// times (each time restarted as a standby); the standby takes over, and
// the takeover time (kill to the new leader's slot moving) is measured.
// Then the leader is paused with SIGSTOP: the standby takes over (ending
// the paused one's walsender), and once the workload stopped and the new
// leader caught up, the paused one is continued: it finds its lease run
// out and exits non-zero without writing a record (every topic's end
// offsets stay as they were). In the end nothing committed is missing and
// per-key order holds.
func TestHATakeover(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the binary; skipped in -short")
	}
	e := newEnv(t, "")
	// A slot whose lock key is negative (the default slot name's is): the
	// leader confirms its lock for several rounds.
	l := &app.Leader{DSN: e.dsn, Slot: "tidemark", Retry: 50 * time.Millisecond}
	lctx, lcancel := context.WithCancel(context.Background())
	if err := l.Acquire(lctx); err != nil {
		t.Fatal(err)
	}
	held := make(chan error, 1)
	go func() { held <- l.Hold(lctx) }()
	time.Sleep(400 * time.Millisecond)
	if !l.Valid() || l.Key() >= 0 {
		t.Errorf("leader of slot tidemark (key %d): valid %v after 8 confirmations", l.Key(), l.Valid())
	}
	lcancel()
	if err := <-held; err != nil {
		t.Errorf("Hold: %v", err)
	}
	l.Close()

	cfg, tr, _ := e.binaryUnderWorkload("ha")
	path := writeConfigWith(t, cfg, "pipeline:\n  max_batch_messages: 500\nhttp:\n  listen: \"\"\nlog:\n  level: info\nha:\n  retry: 200ms\n  lock_ttl: 2s\n")
	bin := binary(t)
	start := func() *haProc {
		p := &haProc{cmd: exec.Command(bin, "run", "--config", path), out: &syncBuffer{}}
		p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return p
	}
	waitFor := func(what string, within time.Duration, ok func() bool) time.Duration {
		t.Helper()
		t0 := time.Now()
		for deadline := t0.Add(within); !ok(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s", what, within)
			}
		}
		return time.Since(t0)
	}
	stop := e.workload(300)
	a := start()
	waitFor("a first leader", 30*time.Second, a.leader)
	b := start()
	waitFor("the second process standing by", 30*time.Second, func() bool { return strings.Contains(b.out.String(), "standing by") })
	if b.leader() {
		t.Fatalf("premise: two leaders:\n%s", b.out)
	}
	procs := []*haProc{a, b}
	var takeovers []time.Duration
	for i := 0; i < 3; i++ {
		leader, standby := procs[0], procs[1]
		time.Sleep(time.Duration(800+200*i) * time.Millisecond)
		killedAt := e.currentLSN()
		t0 := time.Now()
		kill(t, leader.cmd)
		waitFor("the standby taking over", 30*time.Second, standby.leader)
		waitFor("the new leader's slot moving", 30*time.Second, func() bool { return e.slotConfirmed(cfg.Postgres.Slot) >= killedAt })
		takeovers = append(takeovers, time.Since(t0))
		procs = []*haProc{standby, start()}
		waitFor("the restarted process standing by", 30*time.Second, func() bool { return strings.Contains(procs[1].out.String(), "standing by") })
	}
	// A paused leader.
	paused, standby := procs[0], procs[1]
	if err := paused.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stoppedAt := e.currentLSN()
	t0 := time.Now()
	waitFor("the standby taking over from a paused leader", 60*time.Second, standby.leader)
	waitFor("the new leader's slot moving", 60*time.Second, func() bool { return e.slotConfirmed(cfg.Postgres.Slot) >= stoppedAt })
	pausedTakeover := time.Since(t0)
	counts := stop()
	end := e.currentLSN()
	waitFor("the new leader catching up", 60*time.Second, func() bool { return e.slotConfirmed(cfg.Postgres.Slot) >= end })
	topics := append(append([]string(nil), canonicalTopics...), "transaction")
	offsets := func() map[string]int {
		n := map[string]int{}
		for _, tp := range topics {
			n[tp] = len(e.readRaw("ha." + tp))
		}
		return n
	}
	before := offsets()
	if err := paused.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- paused.cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() == 0 {
			t.Errorf("the paused leader, continued: %v (want a non-zero exit)\n%s", err, paused.out)
		}
	case <-time.After(30 * time.Second):
		kill(t, paused.cmd)
		t.Fatalf("the paused leader did not stop after it was continued:\n%s", paused.out)
	}
	if !strings.Contains(paused.out.String(), "capture leadership lost") {
		t.Errorf("the paused leader's log does not say it lost the lock:\n%s", paused.out)
	}
	time.Sleep(time.Second)
	if after := offsets(); !equalCounts(before, after) {
		t.Errorf("records were written after the paused leader was continued: before %v, after %v\n%s", before, after, paused.out)
	}
	if err := standby.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := standby.cmd.Wait(); err != nil {
		t.Errorf("the last leader's clean stop: %v\n%s", err, standby.out)
	}
	txns := tr.txns()
	view := e.kafkaView("ha", canonicalTopics)
	if miss := view.missing(txns, 0); len(miss) > 0 {
		t.Fatalf("Kafka lacks %d of %d transactions, e.g. %v", len(miss), len(txns), miss[:min(3, len(miss))])
	}
	for _, topic := range canonicalTopics {
		e.checkKeyOrder("ha."+topic, e.read("ha."+topic), true)
	}
	sorted := append([]time.Duration(nil), takeovers...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	t.Logf("%d transactions (%d committed by the workload); takeover after SIGKILL: %v (min %v, max %v); after SIGSTOP: %v",
		len(txns), counts.Transactions.Load(), takeovers, sorted[0], sorted[len(sorted)-1], pausedTakeover)
}

func equalCounts(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
