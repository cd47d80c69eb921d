package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
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

// TestTargetsAuditCommitAfterL (issue 15, acceptance 2): a join commits
// after the audit started and while it takes its snapshot. The snapshot
// holds exactly the transactions committed before its L (a temporary
// logical slot's exported snapshot, whose creation waits for the
// transactions in progress), so the join is in it only with a commit LSN
// below L, and the re-check must wait for the pipeline to pass L, join
// included: the join is then kept and the audit reports 1.0 and no room.
//
// The interleaving is forced: a transaction holding an xid is open when
// the audit starts (so creating the slot waits until it ends), the join
// commits while it is open, and the targets consumer is stopped until the
// audit asks for a position past the join. Passed is truthful: it returns
// at once only for positions below the join (everything committed there
// was applied), else it restarts the consumer and waits for real.
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
	// The audit takes its snapshot by creating a temporary slot, which
	// waits for the blocker to end.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var n int
		if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'
  AND query LIKE 'CREATE_REPLICATION_SLOT%' AND wait_event_type = 'Lock'`).Scan(&n); err != nil {
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
			t.Fatal("the audit did not wait for the blocker while taking its snapshot")
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
	if r.rep.LSN <= before {
		t.Fatalf("the snapshot's L %s is not past the join it shows (WAL was at %s before the join): not exact", r.rep.LSN, before)
	}
	if r.rep.Suspected == 0 {
		t.Fatalf("interleaving not forced: the snapshot did not show the join committed while it was taken (report %+v)", r.rep)
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

// TestTargetsRebuildSyncRepWait (issue 15, item 1): a leave whose commit
// record is in WAL and whose transaction clog already says committed, but
// whose backend still waits for a synchronous standby (so the ProcArray
// still lists it and a snapshot taken from it does not show the leave),
// races a rebuild. The rebuild's snapshot must hold exactly the
// transactions committed before its LSN: either the leave (then the
// rebuild reads it) or neither the leave nor anything after it (then the
// consumer's leave, at a position above the rebuild's stamp, wins). Either
// way the member who left is not a target afterwards. Taking the snapshot
// from the ProcArray and stamping it just below pg_current_wal_insert_lsn()
// resurrects the member: the rebuild stamps the pre-leave state above the
// leave's commit LSN, and the consumer's leave loses last-writer-wins.
//
// The wait is forced: synchronous_standby_names names a standby that does
// not exist, and only the leave's session has synchronous_commit on (the
// test server runs with it off on the command line, which ALTER SYSTEM does
// not override, so no other commit waits). The targets consumer is stopped
// during the wait, so no other transaction completes after the leave took
// its xid. The wait ends by pg_cancel_backend: the commit stays committed.
func TestTargetsRebuildSyncRepWait(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "syncrep", []string{"public.users", "public.room_memberships"}, &config.Targets{})
	e.start(cfg)
	_, stop := e.startTargets(cfg)
	e.exec(`INSERT INTO users(user_id) SELECT '@u' || g FROM generate_series(1, 3) g;
INSERT INTO room_memberships(room_id, user_id, membership) SELECT '!r' || r, '@u' || u, 'join' FROM generate_series(1, 3) r, generate_series(1, 3) u`)
	e.waitTargets(cfg, 30*time.Second)
	stop()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// setStandby sets (or, with "", resets) synchronous_standby_names and
	// waits until a session sees it.
	setStandby := func(v string) error {
		q := `ALTER SYSTEM RESET synchronous_standby_names`
		if v != "" {
			q = `ALTER SYSTEM SET synchronous_standby_names = '` + v + `'`
		}
		if _, err := e.pool.Exec(context.Background(), q); err != nil {
			return err
		}
		if _, err := e.pool.Exec(context.Background(), `SELECT pg_reload_conf()`); err != nil {
			return err
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			var got string
			if err := e.pool.QueryRow(context.Background(), `SHOW synchronous_standby_names`).Scan(&got); err != nil {
				return err
			}
			if got == v {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("synchronous_standby_names is %q after reloading, want %q", got, v)
			}
		}
	}
	leave, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leave.Exec(ctx, `SET synchronous_commit = on`); err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := leave.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	var sc string
	if err := leave.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&sc); err != nil || sc != "on" {
		t.Fatalf("synchronous_commit in the leave's session: %q, %v", sc, err)
	}
	committed := make(chan error, 1)
	commitStarted := false
	defer func() {
		// Never leave a waiting backend or the setting behind for the
		// next test; the commit returns before its connection closes.
		_, _ = e.pool.Exec(context.Background(), `SELECT pg_cancel_backend($1)`, pid)
		if commitStarted {
			err := <-committed
			committed <- err
		}
		leave.Close(context.Background())
		if err := setStandby(""); err != nil {
			t.Errorf("resetting synchronous_standby_names: %v", err)
		}
	}()
	if err := setStandby("tidemark_test_absent_standby"); err != nil {
		t.Fatal(err)
	}
	tx, err := leave.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!r1' AND user_id = '@u2'`); err != nil {
		t.Fatal(err)
	}
	beforeCommit := e.currentLSN()
	commitStarted = true
	go func() { committed <- tx.Commit(ctx) }()
	// A backend waits in SyncRep only after its commit record is flushed
	// and clog marks the transaction committed (RecordTransactionCommit);
	// it leaves the ProcArray after the wait.
	waitEvent := func() string {
		t.Helper()
		var event string
		if err := e.pool.QueryRow(ctx, `SELECT coalesce((SELECT wait_event FROM pg_stat_activity WHERE pid = $1), '')`, pid).Scan(&event); err != nil {
			t.Fatal(err)
		}
		return event
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if waitEvent() == "SyncRep" {
			break
		}
		select {
		case err := <-committed:
			committed <- err
			t.Fatalf("the leave committed without waiting for the standby: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the leave's backend does not wait for the standby: wait_event %q", waitEvent())
		}
	}
	var visible bool
	if err := e.pool.QueryRow(ctx, `SELECT membership = 'leave' FROM room_memberships WHERE room_id = '!r1' AND user_id = '@u2'`).Scan(&visible); err != nil || visible {
		t.Fatalf("premise: the leave waiting for the standby is visible to a new snapshot (%v, %v)", visible, err)
	}

	type result struct {
		rep targets.RebuildReport
		err error
	}
	rebuilt := make(chan result, 1)
	go func() {
		rep, err := app.RebuildTargets(ctx, cfg, nil, []string{"!r1"}, false)
		rebuilt <- result{rep, err}
	}()
	// The rebuild takes its snapshot while the leave waits: it either
	// ends meanwhile (it read the source in a snapshot taken during the
	// wait) or waits in CREATE_REPLICATION_SLOT for the leave to end.
	var r result
	done := false
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		select {
		case r = <-rebuilt:
			done = true
		default:
		}
		if done {
			break
		}
		var n int
		if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' AND query LIKE 'CREATE_REPLICATION_SLOT%'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the rebuild neither ended nor waited in CREATE_REPLICATION_SLOT within 60s while the leave waited")
		}
	}
	if ev := waitEvent(); ev != "SyncRep" {
		t.Fatalf("premise: the leave's backend stopped waiting for the standby (wait_event %q) while the rebuild took its snapshot", ev)
	}
	t.Logf("the rebuild took its snapshot while the leave (commit after %s) waited in SyncRep; the rebuild ended meanwhile: %v", beforeCommit, done)
	if _, err := e.pool.Exec(ctx, `SELECT pg_cancel_backend($1)`, pid); err != nil {
		t.Fatal(err)
	}
	err = <-committed
	committed <- err
	if err != nil {
		t.Fatalf("the leave's commit after its wait was cancelled: %v (want committed, with a warning)", err)
	}
	if !done {
		r = <-rebuilt
	}
	if r.err != nil {
		t.Fatalf("rebuild: %v", r.err)
	}
	t.Logf("the rebuild read the source as of %s", r.rep.LSN)
	if err := setStandby(""); err != nil {
		t.Fatal(err)
	}
	var status string
	if err := e.pool.QueryRow(ctx, `SELECT membership FROM room_memberships WHERE room_id = '!r1' AND user_id = '@u2'`).Scan(&status); err != nil || status != "leave" {
		t.Fatalf("the leave after its wait was cancelled: %q, %v; want committed", status, err)
	}
	e.startTargets(cfg)
	e.waitTargets(cfg, 30*time.Second)
	kept := e.pairs(keptSQL(cfg) + ` WHERE room_id = '!r1'`)
	if want := []string{"!r1 @u1", "!r1 @u3"}; !slices.Equal(kept, want) {
		t.Errorf("kept targets of !r1 after the rebuild (LSN %s) and the consumer applied the leave of @u2: %v, want %v (the member who left was resurrected)",
			r.rep.LSN, kept, want)
	}
}
