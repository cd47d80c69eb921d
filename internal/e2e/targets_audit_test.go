package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/targets"
	"github.com/tidemark/tidemark/pipeline"
)

// auditMetric reads the gauge or counter name (first series) from reg.
func auditMetric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	return metricOf(t, reg, name, "", "")
}

// TestTargetsAuditCommitAfterL (issue 15, acceptance 2): the audit reads
// L, then retakes its snapshot until the transactions in progress at L
// have ended; a join committed meanwhile (after L) is in the snapshot. The
// re-check must wait for the pipeline to pass that join too, not only L:
// the join is then kept and the audit reports 1.0 and no room.
//
// The interleaving is forced: a transaction holding an xid is open when
// the audit reads L (so the audit retakes its snapshot until it ends), the
// join commits while it is open, and the targets consumer is stopped until
// the audit asks for a position past the join. Passed is truthful: it
// returns at once only for positions below the join (everything committed
// there was applied), else it restarts the consumer and waits for real.
func TestTargetsAuditCommitAfterL(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "auditl", []string{"public.users", "public.room_memberships"}, &config.Targets{})
	e.start(cfg)
	_, stop := e.startTargets(cfg)
	e.exec(`INSERT INTO users(user_id) SELECT '@u' || g FROM generate_series(1, 3) g;
INSERT INTO room_memberships(room_id, user_id, membership) SELECT '!r' || r, '@u' || u, 'join' FROM generate_series(1, 5) r, generate_series(1, 3) u`)
	e.waitTargets(cfg, 30*time.Second)
	stop()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	blocker, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = blocker.Rollback(context.Background()) }()
	if _, err := blocker.Exec(ctx, `SELECT txid_current()`); err != nil {
		t.Fatal(err)
	}
	// A later xid completes, so the blocker's is below the snapshots' xmax
	// and listed by pg_snapshot_xip.
	e.exec(`SELECT txid_current()`)

	var beforeJoin atomic.Uint64 // WAL position just before the join: everything below it is applied
	needReal := make(chan struct{})
	consumerUp := make(chan struct{})
	var mu sync.Mutex
	var asked []pipeline.LSN
	realPassed := targets.PipelinePassed(e.pool, cfg.Postgres.Slot, cfg.Kafka.Brokers, e.transport(), cfg.Targets.Group, targetTopics(cfg))
	var once sync.Once
	passed := func(ctx context.Context, lsn pipeline.LSN) error {
		mu.Lock()
		asked = append(asked, lsn)
		mu.Unlock()
		if lsn <= pipeline.LSN(beforeJoin.Load()) {
			return nil
		}
		once.Do(func() { close(needReal) })
		select {
		case <-consumerUp:
		case <-ctx.Done():
			return ctx.Err()
		}
		return realPassed(ctx, lsn)
	}
	a := &targets.Auditor{Mapping: cfg.Targets.Mapping(), Source: e.pool, Store: targets.NewStore(e.pool, cfg.Targets.Postgres.Schema),
		Passed: passed, Wait: time.Minute}
	type result struct {
		rep targets.AuditReport
		err error
	}
	res := make(chan result, 1)
	go func() {
		rep, err := a.Audit(ctx, 0)
		res <- result{rep, err}
	}()
	// The audit has read L once it lists the transactions in progress
	// (and rolls back the snapshot it retakes). Should another session
	// match, the check of L below catches it.
	var blockerPID int
	if err := blocker.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&blockerPID); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var n int
		if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid NOT IN (pg_backend_pid(), $1)
  AND application_name = current_setting('application_name') AND (query LIKE '%pg_snapshot_xip%' OR lower(query) = 'rollback')`, blockerPID).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		select {
		case r := <-res:
			t.Fatalf("the audit ended before the join: %+v, %v", r.rep, r.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the audit did not start reading its snapshot")
		}
	}
	before := e.currentLSN()
	beforeJoin.Store(uint64(before))
	e.exec(`INSERT INTO users(user_id) VALUES ('@late');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r2', '@late', 'join')`)
	if err := blocker.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-res:
	case <-needReal:
		e.startTargets(cfg)
		close(consumerUp)
		r = <-res
	}
	if r.err != nil {
		t.Fatalf("audit: %v", r.err)
	}
	if r.rep.LSN > before {
		t.Fatalf("interleaving not forced: the audit read L %s after the join (WAL was at %s before it)", r.rep.LSN, before)
	}
	if r.rep.Suspected == 0 {
		t.Fatalf("interleaving not forced: the snapshot did not show the join committed after L (report %+v)", r.rep)
	}
	mu.Lock()
	defer mu.Unlock()
	if r.rep.Ratio != 1 || len(r.rep.Mismatches) != 0 || r.rep.Unconfirmed || r.rep.Rooms != 5 {
		t.Errorf("audit with a join committed after L: %d rooms, ratio %v, unconfirmed %v, mismatches %v (waited for %v; L %s, join after %s); want 5 rooms, 1.0, none",
			r.rep.Rooms, r.rep.Ratio, r.rep.Unconfirmed, r.rep.Mismatches, asked, r.rep.LSN, before)
	}
}

// TestTargetsAuditLagLeavesGauge (issue 15, acceptance 2): while capture
// is stopped, a change the database shows cannot reach the consumer, so
// the periodic audit cannot confirm the room that differs within
// targets.audit_wait. That is lag: the consistency gauge keeps its value,
// tidemark_notify_targets_audit_unconfirmed_total counts each such audit
// and one warning covers the streak. Once capture resumes, audits confirm
// again and the counter stops.
func TestTargetsAuditLagLeavesGauge(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "auditlag", []string{"public.users", "public.room_memberships"}, &config.Targets{
		AuditInterval: 200 * time.Millisecond, AuditWait: 300 * time.Millisecond,
	})
	capture := e.start(cfg)
	core, logs := observer.New(zapcore.WarnLevel)
	tg, err := app.PrepareTargets(context.Background(), cfg, zap.New(core))
	if err != nil {
		t.Fatalf("prepare targets: %v", err)
	}
	reg := prometheus.NewRegistry()
	tg.Register(reg)
	stopTargets := runConsumer(t, "targets", tg.Run)
	defer stopTargets()
	m := func(name string) float64 { return auditMetric(t, reg, "tidemark_notify_targets_"+name) }
	// waitAudits waits for n audits that started after now.
	waitAudits := func(n float64) {
		t.Helper()
		start := m("audits_total")
		for deadline := time.Now().Add(30 * time.Second); m("audits_total") < start+n+1; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("fewer than %v periodic audits within 30s", n)
			}
		}
	}
	e.exec(`INSERT INTO users(user_id) SELECT '@u' || g FROM generate_series(1, 3) g;
INSERT INTO room_memberships(room_id, user_id, membership) SELECT '!r' || r, '@u' || u, 'join' FROM generate_series(1, 4) r, generate_series(1, 3) u`)
	e.waitTargets(cfg, 30*time.Second)
	// Audits during the seeding may have been unconfirmed; once caught
	// up, none is.
	waitAudits(1)
	un0 := m("audit_unconfirmed_total")
	waitAudits(2)
	if got, un := m("consistency_ratio"), m("audit_unconfirmed_total"); got != 1 || un != un0 {
		t.Fatalf("caught up: ratio %v, unconfirmed %v -> %v; want 1 and no new unconfirmed audits", got, un0, un)
	}
	warned := logs.FilterMessageSnippet("audit unconfirmed").Len()

	// Lag: capture stops, the database moves on.
	if err := capture.stop(t); err != nil {
		t.Fatalf("stopping capture: %v", err)
	}
	e.exec(`INSERT INTO users(user_id) VALUES ('@late');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@late', 'join')`)
	waitAudits(3)
	if got := m("consistency_ratio"); got != 1 {
		t.Errorf("consistency ratio %v under lag, want 1 (lag is not inconsistency)", got)
	}
	if un := m("audit_unconfirmed_total"); un < un0+3 {
		t.Errorf("audit_unconfirmed_total %v -> %v after 3 audits under lag, want 3 more", un0, un)
	}
	if n := logs.FilterMessageSnippet("audit unconfirmed").Len() - warned; n != 1 {
		t.Errorf("%d unconfirmed-audit warnings during one lag streak, want 1", n)
	}

	// The command under the same lag says so, exits 4 and leaves its
	// textfile alone.
	path := writeConfig(t, cfg)
	appendFile(t, path, "targets: {}\n")
	textfile := filepath.Join(t.TempDir(), "targets.prom")
	out, err := exec.Command(binary(t), "audit", "targets", "--config", path, "--wait", "300ms", "--textfile", textfile).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 4 {
		t.Errorf("audit targets under lag: %v, want exit 4\n%s", err, out)
	}
	if !strings.Contains(string(out), "differences are unconfirmed") || !strings.Contains(string(out), "left unchanged") {
		t.Errorf("audit targets under lag does not say the differences are unconfirmed:\n%s", out)
	}
	if _, err := os.Stat(textfile); !os.IsNotExist(err) {
		t.Errorf("audit targets under lag wrote its textfile (%v): lag is not inconsistency", err)
	}

	// Capture resumes: audits confirm again, the counter stops.
	e.start(cfg)
	e.waitTargets(cfg, 30*time.Second)
	waitAudits(1)
	un := m("audit_unconfirmed_total")
	waitAudits(2)
	if got, now := m("consistency_ratio"), m("audit_unconfirmed_total"); got != 1 || now != un {
		t.Errorf("caught up again: ratio %v, unconfirmed %v -> %v; want 1 and no new unconfirmed audits", got, un, now)
	}
	if n := logs.FilterMessageSnippet("differ from the database").Len(); n != 0 {
		t.Errorf("%d inconsistency warnings, want none: %v", n, fmt.Sprint(logs.FilterMessageSnippet("differ from the database").All()))
	}
}
