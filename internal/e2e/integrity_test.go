package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/bench"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

// The canonical transactions are bench.SQLMessage, bench.SQLRead and
// bench.SQLMember.
const (
	// The fault transactions (tx_orphan.sql, tx_dangling.sql, tx_regress.sql)
	// and an event_json deleted under its live event.
	itxOrphan   = `INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ($1, $2, $3, 'm.room.message', 0)`
	itxDangling = `INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) VALUES ($1, $2, $3, 9000000000000)
ON CONFLICT (user_id, room_id) DO UPDATE SET event_id = EXCLUDED.event_id, stream_ordering = EXCLUDED.stream_ordering, updated_at = now()`
	itxRegress    = `UPDATE read_markers SET stream_ordering = stream_ordering - 1000, updated_at = now() WHERE user_id = $1 AND room_id = $2`
	itxDeleteJSON = `DELETE FROM event_json WHERE event_id = $1`
)

func benchRoom(i int) string { return fmt.Sprintf("!r%d:bench.test", i) }
func benchUser(i int) string { return fmt.Sprintf("@u%d:bench.test", i) }

// cleanWorkload runs total canonical transactions (70% message, 20% read
// marker, 10% membership) on workers connections, over rooms 1..50. It
// returns the event ids it created.
func cleanWorkload(t *testing.T, pool *pgxpool.Pool, prefix string, total, workers int) []string {
	t.Helper()
	events, err := runWorkload(pool, prefix, total, workers)
	if err != nil {
		t.Fatalf("workload: %v", err)
	}
	return events
}

// runWorkload is cleanWorkload for any goroutine.
func runWorkload(pool *pgxpool.Pool, prefix string, total, workers int) ([]string, error) {
	var mu sync.Mutex
	var events []string
	w := &bench.Workload{Pool: pool, Prefix: prefix, Rooms: 50, OnEvent: func(id string, _ time.Time) {
		mu.Lock()
		events = append(events, id)
		mu.Unlock()
	}}
	if err := w.Run(context.Background(), total, workers); err != nil {
		return nil, err
	}
	sort.Strings(events)
	return events, nil
}

// integrityEnv is a captured canonical database with the integrity consumer.
type integrityEnv struct {
	*env
	cfg    *config.Config
	prefix string
}

func newIntegrityEnv(t *testing.T, prefix string, window string) *integrityEnv {
	t.Helper()
	e := newEnv(t, "")
	e.exec(bench.Schema)
	e.exec(bench.Seed)
	cfg := e.config(prefix, bench.Tables, func(c *config.Config) {
		rules := integrity.DefaultRules()
		for i := range rules {
			if rules[i].Name == "read_marker_event_exists" {
				rules[i].Within = window
			}
		}
		c.Integrity = &config.Integrity{Rules: rules}
	})
	return &integrityEnv{env: e, cfg: cfg, prefix: prefix}
}

// startIntegrity runs the integrity consumer of group in the test process.
func (e *integrityEnv) startIntegrity(group string, opts ...app.IntegrityOption) (*app.Integrity, func()) {
	e.t.Helper()
	cfg := *e.cfg
	in := *cfg.Integrity
	in.Group = group
	cfg.Integrity = &in
	log := zaptest.NewLogger(e.t, zaptest.Level(zap.ErrorLevel))
	ig, err := app.PrepareIntegrity(context.Background(), &cfg, log, opts...)
	if err != nil {
		e.t.Fatalf("prepare integrity: %v", err)
	}
	stop := runConsumer(e.t, "integrity", ig.Run)
	return ig, stop
}

// sentinel commits a transaction the checker reads only as an END record
// and returns its commit time (truncated to the END record's milliseconds).
func (e *integrityEnv) sentinel() time.Time {
	e.t.Helper()
	var ts time.Time
	if err := e.pool.QueryRow(context.Background(),
		`INSERT INTO rooms(room_id) VALUES ('!sentinel'||gen_random_uuid()) RETURNING now()`).Scan(&ts); err != nil {
		e.t.Fatal(err)
	}
	return ts.Truncate(time.Millisecond)
}

// settle waits until the checker has read past the sentinel by more than
// the window, holds nothing and has made everything durable.
func (e *integrityEnv) settle(ig *app.Integrity, window time.Duration, timeout time.Duration) {
	e.t.Helper()
	until := e.sentinel().Add(window + 500*time.Millisecond)
	deadline := time.Now().Add(timeout)
	for {
		p := ig.Checker.Progress()
		if !p.StreamTime.Before(until) && p.OpenTransactions == 0 && p.Pending == 0 && p.Unflushed == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("integrity checker did not settle within %s: %+v (want stream time >= %s)", timeout, p, until)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// inTx runs statements, each with arg, in one transaction.
func (e *integrityEnv) inTx(first, second string, arg any) {
	e.t.Helper()
	err := pgx.BeginFunc(context.Background(), e.pool, func(tx pgx.Tx) error {
		for _, q := range []string{first, second} {
			if _, err := tx.Exec(context.Background(), q, arg); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *integrityEnv) violations() []*integrity.Violation {
	e.t.Helper()
	vs, err := integrity.List(context.Background(), e.pool, "tidemark", integrity.Filter{})
	if err != nil {
		e.t.Fatal(err)
	}
	return vs
}

// identity names what a violation is about: rule, kind and the event id
// (existence rules) or the read marker (monotonic rule).
func identity(t *testing.T, v *integrity.Violation) string {
	if v.Kind == integrity.KindRegressed {
		var k struct {
			User string `json:"user_id"`
			Room string `json:"room_id"`
		}
		if err := json.Unmarshal(v.RowKey, &k); err != nil {
			t.Fatalf("row key %s: %v", v.RowKey, err)
		}
		return v.Rule + "|" + v.Kind + "|" + k.User + "|" + k.Room
	}
	return v.Rule + "|" + v.Kind + "|" + v.Match["event_id"]
}

// TestIntegrityPrecisionRecall (acceptance 1, 4): thousands of clean
// transactions with injected faults of every kind flag exactly the injected
// set; a missing row written later resolves its violation; replaying every
// topic from the beginning with a new group duplicates nothing.
func TestIntegrityPrecisionRecall(t *testing.T) {
	e := newIntegrityEnv(t, "ipr", "2s")
	e.start(e.cfg)
	ig, _ := e.startIntegrity("ipr-integrity")

	began := time.Now()
	events := cleanWorkload(t, e.pool, "a", 1000, 4)
	t.Logf("first half of the workload: %s", time.Since(began).Round(time.Millisecond))
	want := map[string]bool{}
	// Regressions need markers the checker has seen move forward first.
	for i := 0; i < 8; i++ {
		u, r := fmt.Sprintf("@reg%d:bench.test", i), benchRoom(1+i)
		e.exec(bench.SQLRead, u, r)
		e.exec(bench.SQLRead, u, r) // no-op: never backwards
	}
	// The faults go in while the second half of the clean workload runs.
	type result struct {
		events []string
		err    error
	}
	second := make(chan result, 1)
	go func() {
		evs, err := runWorkload(e.pool, "b", 1000, 3)
		second <- result{evs, err}
	}()
	injected := 0
	for i := 0; i < 10; i++ {
		id := fmt.Sprintf("$orphan%d:bench.test", i)
		e.exec(itxOrphan, id, benchRoom(1+i), benchUser(i+1))
		want["events_have_json|missing|"+id] = true
		injected++
	}
	for i := 0; i < 8; i++ {
		id := fmt.Sprintf("$missing%d", i)
		e.exec(itxDangling, fmt.Sprintf("@dangle%d:bench.test", i), benchRoom(1+i), id)
		want["read_marker_event_exists|missing|"+id] = true
		injected++
	}
	for i := 0; i < 8; i++ {
		u, r := fmt.Sprintf("@reg%d:bench.test", i), benchRoom(1+i)
		e.exec(itxRegress, u, r)
		want["read_marker_monotonic|regressed|"+u+"|"+r] = true
		injected++
	}
	for i := 0; i < 8; i++ {
		id := events[i*len(events)/8]
		e.exec(itxDeleteJSON, id)
		want["events_have_json|orphaned|"+id] = true
		injected++
	}
	// Synapse-style rewrite: delete and re-insert event_json in one
	// transaction orphans nothing; deleting an event with its event_json
	// neither.
	e.inTx(`DELETE FROM event_json WHERE event_id = $1`, `INSERT INTO event_json(event_id, room_id, json) VALUES ($1, 'x', '{}')`, events[1])
	e.inTx(`DELETE FROM event_json WHERE event_id = $1`, `DELETE FROM events WHERE event_id = $1`, events[2])
	r2 := <-second
	if r2.err != nil {
		t.Fatalf("workload: %v", r2.err)
	}
	events2 := r2.events
	if len(want) != injected {
		t.Fatalf("injected %d faults but %d distinct identities", injected, len(want))
	}
	t.Logf("workload and faults: %s", time.Since(began).Round(time.Millisecond))
	e.settle(ig, 2*time.Second, 3*time.Minute)
	t.Logf("settled: %s", time.Since(began).Round(time.Millisecond))

	got := map[string]bool{}
	vs := e.violations()
	for _, v := range vs {
		id := identity(t, v)
		if got[id] {
			t.Errorf("flagged twice: %s", id)
		}
		got[id] = true
	}
	for id := range want {
		if !got[id] {
			t.Errorf("missed: %s", id)
		}
	}
	for id := range got {
		if !want[id] {
			t.Errorf("false alarm: %s", id)
		}
	}
	st := ig.Checker.Stats()
	t.Logf("%d clean events, %d violations; stats %+v", len(events)+len(events2), len(vs), st)
	if st.Decided < int64(len(events)+len(events2)) {
		t.Errorf("decided %d transactions, fewer than the %d message transactions", st.Decided, len(events)+len(events2))
	}
	if st.Violations != int64(injected) {
		t.Errorf("violations counter %d, want %d", st.Violations, injected)
	}
	// The Prometheus counter per rule (and kind).
	reg := prometheus.NewRegistry()
	ig.Register(reg)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	perRule := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "tidemark_integrity_violations_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			perRule[l["rule"]+"/"+l["kind"]] += m.GetCounter().GetValue()
		}
	}
	wantPerRule := map[string]float64{"events_have_json/missing": 10, "events_have_json/orphaned": 8,
		"read_marker_event_exists/missing": 8, "read_marker_monotonic/regressed": 8}
	if fmt.Sprint(perRule) != fmt.Sprint(wantPerRule) {
		t.Errorf("tidemark_integrity_violations_total %v, want %v", perRule, wantPerRule)
	}

	// A missing row that appears later resolves its violation.
	e.exec(`INSERT INTO event_json(event_id, room_id, json) VALUES ('$orphan0:bench.test', $1, '{}')`, benchRoom(1))
	e.settle(ig, 0, 3*time.Minute)
	resolved := 0
	for _, v := range e.violations() {
		if v.Status == integrity.StatusResolved {
			resolved++
			if identity(t, v) != "events_have_json|missing|$orphan0:bench.test" || v.ResolvedBy == "" || v.ResolvedAt == nil {
				t.Errorf("unexpected resolution: %+v", v)
			}
		}
	}
	if resolved != 1 {
		t.Errorf("%d resolved violations, want 1", resolved)
	}
	recs := e.readRaw(e.prefix + ".violations")
	if len(recs) < injected+1 {
		t.Errorf("violations topic holds %d records, want at least %d (one per violation and the resolution)", len(recs), injected+1)
	}

	// Replay every topic from the beginning with a new group: the same
	// violations are found again and none is stored twice.
	t.Logf("resolved: %s", time.Since(began).Round(time.Millisecond))
	rg, _ := e.startIntegrity("ipr-replay")
	e.settle(rg, 2*time.Second, 3*time.Minute)
	t.Logf("replayed: %s", time.Since(began).Round(time.Millisecond))
	after := e.violations()
	if len(after) != len(vs) {
		t.Errorf("after the replay %d violations are stored, before %d", len(after), len(vs))
		for _, v := range after {
			if !got[identity(t, v)] {
				t.Logf("stored by the replay only: %+v", v)
			}
		}
	}
	rst := rg.Checker.Stats()
	if rst.Violations != 0 || rst.Redetected != int64(injected) {
		t.Errorf("replay: %d new violations and %d found again, want 0 and %d", rst.Violations, rst.Redetected, injected)
	}
	for _, v := range after {
		if identity(t, v) == "events_have_json|missing|$orphan0:bench.test" && v.Status != integrity.StatusResolved {
			t.Errorf("the replay reopened a resolved violation: %+v", v)
		}
	}
}

// TestIntegrityNoFalseAlarmsUnderLag (acceptance 2): a clean workload with
// the integrity consumer stopped for longer than the window, then resumed,
// flags nothing.
func TestIntegrityNoFalseAlarmsUnderLag(t *testing.T) {
	e := newIntegrityEnv(t, "ilag", "1s")
	e.start(e.cfg)
	ig, stop := e.startIntegrity("ilag-integrity")
	cleanWorkload(t, e.pool, "a", 400, 2)
	e.settle(ig, time.Second, 3*time.Minute)
	decided := ig.Checker.Stats().Decided
	stop() // paused
	pausedAt := time.Now()
	cleanWorkload(t, e.pool, "b", 1000, 4)
	if d := time.Since(pausedAt); d < 3*time.Second {
		time.Sleep(3*time.Second - d) // paused for three windows at least
	}
	ig2, _ := e.startIntegrity("ilag-integrity")
	e.settle(ig2, time.Second, 3*time.Minute)
	if vs := e.violations(); len(vs) != 0 {
		for _, v := range vs {
			t.Errorf("false alarm: %s %s %s %s", v.Rule, v.Kind, v.RowKey, v.Detail)
		}
	}
	st := ig2.Checker.Stats()
	t.Logf("before the pause %d transactions decided; after it %+v", decided, st)
	if st.Decided < 700 {
		t.Errorf("the resumed consumer decided %d transactions, want the ~840 message transactions of the backlog", st.Decided)
	}
}

// TestIntegrityEarlierRowViaDatabase (acceptance 3): a read marker to an
// event written before capture started (so never seen in the stream) is
// satisfied by the database check; one to an event that does not exist is
// flagged.
func TestIntegrityEarlierRowViaDatabase(t *testing.T) {
	e := newIntegrityEnv(t, "iold", "1s")
	e.exec(bench.SQLMessage, "$old:bench.test", benchRoom(1), benchUser(1), 1)
	e.start(e.cfg)
	ig, _ := e.startIntegrity("iold-integrity")
	e.exec(itxDangling, benchUser(2), benchRoom(1), "$old:bench.test")
	e.exec(itxDangling, benchUser(3), benchRoom(1), "$never:bench.test")
	e.settle(ig, time.Second, 3*time.Minute)
	vs := e.violations()
	var ids []string
	for _, v := range vs {
		ids = append(ids, identity(t, v))
	}
	if !slices.Equal(ids, []string{"read_marker_event_exists|missing|$never:bench.test"}) {
		t.Errorf("violations %v, want only the marker to $never", ids)
	}
	if st := ig.Checker.Stats(); st.Checked < 2 {
		t.Errorf("%d expectations checked in the database, want both markers (%+v)", st.Checked, st)
	}

	// tidemark violations lists them, filtered by rule and time.
	path := writeConfig(t, e.cfg)
	appendFile(t, path, "integrity: {}\n")
	bin := binary(t)
	run := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"violations", "--config", path}, args...)...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	out, code := run("--rule", "read_marker_event_exists", "--since", "1h")
	if code != 0 || !strings.Contains(out, `$never:bench.test`) || !strings.Contains(out, "1 violation(s)") || strings.Contains(out, "$old") {
		t.Errorf("violations --rule read_marker_event_exists: exit %d\n%s", code, out)
	}
	if out, code := run("--rule", "events_have_json"); code != 0 || !strings.Contains(out, "0 violation(s)") {
		t.Errorf("violations --rule events_have_json: exit %d\n%s", code, out)
	}
	if out, code := run("--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339)); code != 0 || !strings.Contains(out, "0 violation(s)") {
		t.Errorf("violations --since in an hour: exit %d\n%s", code, out)
	}
	if out, code := run("--since", "yesterday"); code != 2 || !strings.Contains(out, `--since "yesterday"`) {
		t.Errorf("violations --since yesterday: exit %d, want 2\n%s", code, out)
	}

	// tidemark check compiles the rules against the tables' columns.
	if out, err := exec.Command(bin, "check", "--config", path).CombinedOutput(); err != nil || !strings.Contains(string(out), "integrity rules: 3 checked") {
		t.Errorf("check: %v\n%s", err, out)
	}
	bad := writeConfig(t, e.cfg)
	appendFile(t, bad, "integrity:\n  rules:\n    - name: marker_target\n      table: read_markers\n      expect: {table: events, match: {event_id: id}}\n")
	cout, err := exec.Command(bin, "check", "--config", bad).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 ||
		!strings.Contains(string(cout), `integrity.rules[0] (marker_target).expect.match: public.events has no column "id"`) {
		t.Errorf("check with a rule naming a missing column: %v, want exit 3 naming rule and column\n%s", err, cout)
	}
}

// BenchmarkIntegrityDetectionLatency (acceptance 5) drives the canonical
// mix at a steady rate (default 1,000 tx/s for 15 s; env
// TIDEMARK_BENCH_RATE, TIDEMARK_BENCH_SECONDS), 5% of it orphaned events
// (an event without its event_json), through capture, kfake and the
// integrity consumer, and reports the latency from each orphan's commit
// (its COMMIT returned to the client) to its violation being durable (the
// violations table and topic written), p50 and p99. Run it once:
//
//	go test -run '^$' -bench IntegrityDetectionLatency -benchtime 1x ./internal/e2e/
func BenchmarkIntegrityDetectionLatency(b *testing.B) {
	rate, seconds := envInt("TIDEMARK_BENCH_RATE", 1000), envInt("TIDEMARK_BENCH_SECONDS", 15)
	dsn := pgserver.ForTest(b)
	ctx := context.Background()
	// synchronous_commit=on, as tidemark bench's live phase: with it off,
	// a commit reaches the WAL (and logical decoding) only at the WAL
	// writer's next round (wal_writer_delay, 200 ms).
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		b.Fatal(err)
	}
	pc.ConnConfig.RuntimeParams["synchronous_commit"] = "on"
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)
	for _, q := range []string{bench.Schema, bench.Seed} {
		if _, err := pool.Exec(ctx, q); err != nil {
			b.Fatal(err)
		}
	}
	kc := kafkatest.ForTest(b)
	noHTTP := ""
	cfg := &config.Config{
		Postgres:  config.Postgres{DSN: dsn, Slot: "ilat_slot", Publication: "ilat_pub", Tables: bench.Tables, StandbyInterval: time.Second},
		Kafka:     config.Kafka{Brokers: kc.Brokers(), TopicPrefix: "ilat", Partitions: 3},
		HTTP:      config.HTTP{Listen: &noHTTP},
		Integrity: &config.Integrity{},
	}
	cfg.ApplyDefaults()
	if ps := cfg.Validate(); len(ps) > 0 {
		b.Fatal(ps)
	}
	log := zap.NewNop()
	a, err := app.Prepare(ctx, cfg, log)
	if err != nil {
		b.Fatal(err)
	}
	var mu sync.Mutex
	committed := map[string]time.Time{}
	var lat []time.Duration
	detected := make(chan struct{}, 1<<16)
	onViolation := func(v *integrity.Violation) {
		now := time.Now()
		mu.Lock()
		if t0, ok := committed[v.Match["event_id"]]; ok {
			lat = append(lat, now.Sub(t0))
		}
		mu.Unlock()
		detected <- struct{}{}
	}
	ig, err := app.PrepareIntegrity(ctx, cfg, log, func(o *integrity.Options) { o.OnViolation = onViolation })
	if err != nil {
		b.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, run := range []func(context.Context) error{a.Run, ig.Run} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(runCtx); err != nil {
				b.Error(err)
			}
		}()
	}
	defer func() { cancel(); wg.Wait() }()
	// Warm up until the consumer has decided a transaction.
	for i := 0; ig.Checker.Stats().Decided == 0; i++ {
		if i > 600 {
			b.Fatal("the integrity consumer decided nothing within 60s")
		}
		if _, err := pool.Exec(ctx, bench.SQLMessage, fmt.Sprintf("$warm%d", i), benchRoom(1), benchUser(1), 0); err != nil {
			b.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	b.ResetTimer()
	total := rate * seconds
	jobs := make(chan int, 1024)
	var orphans, errs atomic.Int64
	var workers sync.WaitGroup
	for w := 0; w < 8; w++ {
		workers.Add(1)
		go func(w int) {
			defer workers.Done()
			rng := rand.New(rand.NewPCG(uint64(w)+1, 7))
			for i := range jobs {
				room, user := benchRoom(1+rng.IntN(500)), benchUser(1+rng.IntN(2000))
				var err error
				switch p := rng.IntN(100); {
				case p < 5:
					id := fmt.Sprintf("$orphan%d", i)
					_, err = pool.Exec(ctx, itxOrphan, id, room, user)
					t1 := time.Now()
					mu.Lock()
					committed[id] = t1
					mu.Unlock()
					orphans.Add(1)
				case p < 70:
					_, err = pool.Exec(ctx, bench.SQLMessage, fmt.Sprintf("$m%d", i), room, user, time.Now().UnixMilli())
				case p < 90:
					_, err = pool.Exec(ctx, bench.SQLRead, user, room)
				default:
					_, err = pool.Exec(ctx, bench.SQLMember, room, user, "join", fmt.Sprintf("$j%d", i))
				}
				if err != nil {
					errs.Add(1)
				}
			}
		}(w)
	}
	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	sent, late := 0, 0
	for sent < total {
		<-tick.C
		due := int(time.Since(start) * time.Duration(rate) / time.Second)
		for sent < due && sent < total {
			select {
			case jobs <- sent:
			default:
				late++
				jobs <- sent
			}
			sent++
		}
	}
	tick.Stop()
	close(jobs)
	workers.Wait()
	elapsed := time.Since(start)
	want := int(orphans.Load())
	deadline := time.After(60 * time.Second)
	for got := 0; got < want; got++ {
		select {
		case <-detected:
		case <-deadline:
			b.Fatalf("%d of %d orphans detected within 60s of the workload's end", got, want)
		}
	}
	b.StopTimer()
	// Capture's own share: commit to Kafka acknowledgement.
	reg := prometheus.NewRegistry()
	reg.MustRegister(a.CommitToAck)
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 {
		b.Fatalf("gathering commit_to_ack_seconds: %v", err)
	}
	h := mfs[0].GetMetric()[0].GetHistogram()
	ackMean := 1000 * h.GetSampleSum() / float64(max(1, h.GetSampleCount()))
	b.ReportMetric(ackMean, "commit-to-ack-mean-ms")
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lat)
	q := func(f float64) time.Duration { return lat[min(len(lat)-1, int(f*float64(len(lat))))] }
	b.ReportMetric(float64(total)/elapsed.Seconds(), "tx/s")
	b.ReportMetric(float64(q(0.50).Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(q(0.99).Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
	b.ReportMetric(float64(len(lat)), "orphans")
	b.Logf("%d transactions in %s (%.0f tx/s, %d errors, %d dispatches late), %d orphans: commit to durable violation p50 %s, p99 %s, max %s; capture commit to Kafka ack mean %.1f ms",
		total, elapsed.Round(time.Millisecond), float64(total)/elapsed.Seconds(), errs.Load(), late, len(lat),
		q(0.5).Round(10*time.Microsecond), q(0.99).Round(10*time.Microsecond), lat[len(lat)-1].Round(10*time.Microsecond), ackMean)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// appendFile appends text to the file at path.
func appendFile(t *testing.T, path, text string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(text); err != nil {
		t.Fatalf("appending to %s: %v", path, err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("closing %s: %v", path, err)
	}
}
