package integrity

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/leakcheck"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/invalidation/expr"
	"github.com/tidemark/tidemark/pipeline"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := leakcheck.Wait(5*time.Second, "tidemark/invalidation/integrity."); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines leaked by the tests:\n%s\n", leaked)
			code = 1
		}
	}
	pgserver.StopShared()
	os.Exit(code)
}

func testPool(t *testing.T) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), pgserver.ForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// TestSchemaAndProbe: columns, types and replica identities come from the
// catalog; a multi-column match with a row filter is checked with the
// columns' own types.
func TestSchemaAndProbe(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
CREATE TABLE members (room_id text, user_no bigint, membership text, PRIMARY KEY (room_id, user_no));
CREATE TABLE notes (id serial, body text);
ALTER TABLE notes REPLICA IDENTITY FULL;
INSERT INTO members VALUES ('!a', 1, 'join'), ('!a', 2, 'leave'), ('!b', 1, 'join');`); err != nil {
		t.Fatal(err)
	}
	schema, err := LoadSchema(ctx, pool, []string{"public.members", "public.notes", "public.absent"})
	if err != nil {
		t.Fatal(err)
	}
	m := schema["public.members"]
	if m == nil || len(m.Columns) != 3 || m.Types["user_no"] != `"pg_catalog"."int8"` || len(m.Identity) != 2 {
		t.Fatalf("members: %+v", m)
	}
	if n := schema["public.notes"]; n == nil || len(n.Identity) != 2 {
		t.Errorf("notes (REPLICA IDENTITY FULL): %+v", n)
	}
	if schema["public.absent"] != nil {
		t.Error("a missing table has a schema")
	}
	p := NewProber(pool, 1000, 2) // chunks of 2 rows
	got, err := p.Existing(ctx, m, []string{"room_id", "user_no"}, expr.MustParse("membership = 'join'"),
		[][]string{{"!a", "1"}, {"!a", "2"}, {"!b", "1"}, {"!c", "1"}, {"!a", "01"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []bool{true, false, true, false, true} // "01" is the bigint 1
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("key %d: exists %v, want %v", i, got[i], want[i])
		}
	}
}

// TestStoreIdempotent: a violation stored twice is inserted once; a resolved
// one stays resolved when found again; state rows are upserted and deleted.
func TestStoreIdempotent(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	s := NewStore(pool, "tidemark", "g1")
	if err := s.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Setup(ctx); err != nil {
		t.Fatalf("setup is not repeatable: %v", err)
	}
	pos := pipeline.Position{CommitLSN: 0x1000, Seq: 2}
	v := &Violation{ID: ViolationID("r", []byte(`{"id":1}`), pos), Rule: "r", Kind: KindMissing, Severity: "error", Table: "public.t",
		RowKey: []byte(`{"id":1}`), Position: pos.String(), CommitLSN: pos.CommitLSN.String(), Seq: 2, TransactionID: "7:4096",
		CommittedAt: time.Now().UTC(), DetectedAt: time.Now().UTC(), Related: "public.u", Match: map[string]string{"id": "1"},
		MatchKey: "r|1", Detail: "d", Status: StatusOpen}
	b := &batch{violations: []*Violation{v}, upserts: map[stateKey][]byte{{"pos", "t/0"}: []byte(`{"l":1}`)}, deletes: map[stateKey]bool{}}
	res, err := s.commit(ctx, b, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !res.inserted[v.ID] {
		t.Fatal("first store did not insert")
	}
	published := 0
	res, err = s.commit(ctx, &batch{violations: []*Violation{v}, resolved: []resolution{{ID: v.ID, At: time.Now(), By: "4097:0"}}},
		func(*commitResult) []pipeline.Message { published++; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if res.inserted[v.ID] || !res.resolved[v.ID] || published != 1 {
		t.Errorf("second store: inserted %v resolved %v published %d", res.inserted, res.resolved, published)
	}
	res, err = s.commit(ctx, &batch{violations: []*Violation{v}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.inserted[v.ID] || res.status[v.ID] != StatusResolved {
		t.Errorf("found again: inserted %v status %q, want stored once and still resolved", res.inserted, res.status[v.ID])
	}
	vs, err := List(ctx, pool, "tidemark", Filter{Rule: "r"})
	if err != nil || len(vs) != 1 || vs[0].Status != StatusResolved || vs[0].ResolvedBy != "4097:0" || vs[0].Match["id"] != "1" {
		t.Fatalf("list: %v %+v", err, vs)
	}
	if _, err := s.commit(ctx, &batch{deletes: map[stateKey]bool{{"pos", "t/0"}: true}}, nil); err != nil {
		t.Fatal(err)
	}
	st, err := s.LoadState(ctx)
	if err != nil || len(st) != 0 {
		t.Errorf("state after delete: %v %v", st, err)
	}
}

// TestRestartResumesState: what one checker held (an undecided
// transaction, a pending expectation, a monotonic value, its positions) is
// picked up by the next one with the same group, and changes it applied
// before the restart are skipped, not counted twice.
func TestRestartResumesState(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	rules := DefaultRules()
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	newChecker := func() *Checker {
		c := NewChecker(eng, NewStore(pool, "tidemark", "g"), nil, Options{Group: "g"}, nil, nil)
		if err := c.Load(ctx); err != nil {
			t.Fatal(err)
		}
		return c
	}
	both := map[string]int{"public.events": 1, "public.event_json": 1}
	a := newChecker()
	evA := change("events", "c", 10, 0, key("$a"), nil, ev("$a"))
	evB := change("events", "c", 20, 0, key("$b"), nil, ev("$b"))
	feed(t, a, evA, end(t, 10, both), evB, end(t, 20, map[string]int{"public.events": 1}),
		change("read_markers", "c", 30, 0, mkey("@u", "!r"), nil, marker("@u", "!r", "$nowhere", 100)),
		end(t, 30, map[string]int{"public.read_markers": 1}),
		end(t, 35, map[string]int{"public.events": 1})) // its change arrives after the restart
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if p := a.Progress(); p.OpenTransactions != 2 || p.Pending != 1 || a.Stats().Violations != 1 {
		t.Fatalf("before the restart: %+v %+v", p, a.Stats())
	}

	b := newChecker()
	if p := b.Progress(); p.OpenTransactions != 2 || p.Pending != 1 {
		t.Fatalf("after the restart: %+v, want the open transaction and the pending expectation back", p)
	}
	// Redelivered (applied before the restart): skipped.
	feed(t, b, evA, evB)
	// The rest of transaction 10 (its END record arrived before the
	// restart), and a regression of the kept marker.
	feed(t, b, change("event_json", "c", 10, 1, key("$a"), nil, js("$a")), change("events", "c", 35, 0, key("$c"), nil, ev("$c")),
		change("read_markers", "u", 40, 0, mkey("@u", "!r"), nil, marker("@u", "!r", "$nowhere", 90)),
		end(t, 40, map[string]int{"public.read_markers": 1}))
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := kinds(b); len(got) != 0 {
		t.Errorf("unflushed violations %v", got)
	}
	st := b.Stats()
	if st.Violations != 2 || st.Decided != 3 {
		t.Errorf("after the restart: %+v, want transactions 10 (clean), 35 (orphan) and 40 (regression) decided", st)
	}
	vs, err := List(ctx, pool, "tidemark", Filter{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, v := range vs {
		got = append(got, v.Rule+"/"+v.Kind)
	}
	slices.Sort(got)
	if want := []string{"events_have_json/missing", "events_have_json/missing", "read_marker_monotonic/regressed"}; !slices.Equal(got, want) {
		t.Errorf("stored violations %v, want %v", got, want)
	}
}

// TestTickConfirmsAndRunStops: due expectations are confirmed against the
// database by the ticker (an earlier-written row satisfies, a missing one is
// flagged once durable), and Run stops when its context ends.
func TestTickConfirmsAndRunStops(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE events (event_id text PRIMARY KEY, room_id text, sender text, type text, stream_ordering bigint, origin_ts bigint);
INSERT INTO events(event_id) VALUES ('$old')`); err != nil {
		t.Fatal(err)
	}
	rules := DefaultRules()[1:2] // read markers point to events within 30s
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	eng.rules[0].related.Types = map[string]string{"event_id": `"pg_catalog"."text"`}
	now := time.UnixMilli(100_000)
	c := NewChecker(eng, NewStore(pool, "tidemark", "tick"), NewProber(pool, 100, 10),
		Options{Group: "tick", TickInterval: 10 * time.Millisecond, Now: func() time.Time { return now }}, nil, nil)
	if err := c.Load(ctx); err != nil {
		t.Fatal(err)
	}
	feed(t, c, change("read_markers", "c", 50, 0, mkey("@a", "!r"), nil, marker("@a", "!r", "$old", 1)),
		change("read_markers", "c", 60, 0, mkey("@b", "!r"), nil, marker("@b", "!r", "$gone", 1)))
	if n, err := c.Tick(ctx); err != nil || n != 0 {
		t.Fatalf("tick before the deadline decided %d (%v)", n, err)
	}
	c.mu.Lock()
	c.recvAt = now.Add(-31 * time.Second) // idle: stream time moves on with the clock
	c.mu.Unlock()
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(runCtx) }()
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().Checked < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the ticker did not confirm the expectations: %+v", c.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not stop when its context ended")
	}
	vs, err := List(ctx, pool, "tidemark", Filter{})
	if err != nil || len(vs) != 1 || vs[0].Match["event_id"] != "$gone" {
		t.Fatalf("violations %v %+v, want the marker to $gone only", err, vs)
	}
}

// TestMonotonicBeyondMemory: with more keys than max_keys, an evicted key's
// last value is read back from the state table, so its regression is still
// flagged.
func TestMonotonicBeyondMemory(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	rules := DefaultRules()[2:]
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(eng, NewStore(pool, "tidemark", "mono"), nil, Options{Group: "mono", MaxKeys: 1}, nil, nil)
	if err := c.Load(ctx); err != nil {
		t.Fatal(err)
	}
	feed(t, c, change("read_markers", "c", 10, 0, mkey("@a", "!r"), nil, marker("@a", "!r", "$e", 100)),
		change("read_markers", "c", 20, 0, mkey("@b", "!r"), nil, marker("@b", "!r", "$e", 5))) // evicts @a from memory
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if c.mono.len() != 1 || c.monoAll {
		t.Fatalf("memory holds %d keys (all: %v), want 1 and not all", c.mono.len(), c.monoAll)
	}
	feed(t, c, change("read_markers", "u", 30, 0, mkey("@a", "!r"), nil, marker("@a", "!r", "$e", 50)))
	if got := kinds(c); len(got) != 1 || got[0] != "read_marker_monotonic/regressed" {
		t.Errorf("violations %v, want the regression of the evicted key", got)
	}
}

// TestSetupRacesOtherSchemaCreators: the integrity store shares its schema
// with the notification-targets store, which creates it on its own; setups
// racing with other creators of the same (new) schema all succeed.
func TestSetupRacesOtherSchemaCreators(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	for round := 0; round < 5; round++ {
		schema := fmt.Sprintf("shared_%d", round)
		errs := make(chan error, 16)
		for i := 0; i < 8; i++ {
			go func() { errs <- NewStore(pool, schema, "c").Setup(ctx) }()
			go func() {
				// What another part does (ignoring that it may lose the race).
				_, _ = pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema)
				errs <- nil
			}()
		}
		for i := 0; i < 16; i++ {
			if err := <-errs; err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
	}
}

// TestMonotonicSplitUpdateAcrossRestart: a split update whose halves are
// applied on either side of a restart is still compared, and its violation
// has the id it has without the restart.
func TestMonotonicSplitUpdateAcrossRestart(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	logs := &TableSchema{Name: "public.logs", Columns: []string{"stream", "n"}, Identity: []string{"stream", "n"},
		Types: map[string]string{"stream": `"pg_catalog"."text"`, "n": `"pg_catalog"."numeric"`}}
	rules := []Rule{{Name: "logs_n", Table: "public.logs", Monotonic: &Monotonic{Column: "n", Key: []string{"stream"}}}}
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, map[string]*TableSchema{"public.logs": logs})
	if err != nil {
		t.Fatal(err)
	}
	row := func(n string) map[string]any { return map[string]any{"stream": "s", "n": n} }
	del := change("logs", "d", 11, 0, `{"stream":"s","n":"20"}`, row("20"), nil)
	ins := change("logs", "c", 11, 1, `{"stream":"s","n":"15"}`, nil, row("15"))
	ref := NewChecker(eng, nil, nil, Options{Group: "ref"}, nil, nil)
	feed(t, ref, del, ins)
	if len(ref.violations) != 1 {
		t.Fatalf("reference run: %v", kinds(ref))
	}
	for i, order := range [][]*invalidation.Message{{del, ins}, {ins, del}} {
		group := fmt.Sprintf("split%d", i)
		c := NewChecker(eng, NewStore(pool, "tidemark", group), nil, Options{Group: group}, nil, nil)
		if err := c.Load(ctx); err != nil {
			t.Fatal(err)
		}
		feed(t, c, order[0])
		if err := c.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		c = NewChecker(eng, NewStore(pool, "tidemark", group), nil, Options{Group: group}, nil, nil) // restart
		if err := c.Load(ctx); err != nil {
			t.Fatal(err)
		}
		if order[0].Env.Op == "d" && len(c.monoGone) != 1 {
			t.Errorf("the deleted value is not known after the restart as one to forget: %v", c.monoGone)
		}
		feed(t, c, order[1])
		if len(c.violations) != 1 || c.violations[0].ID != ref.violations[0].ID {
			t.Errorf("%s first, restart, then %s: violations %v, want the reference's id %s", order[0].Env.Op, order[1].Env.Op, c.violations, ref.violations[0].ID)
		}
	}
}

// blockingSink holds every Write until release is closed, like a Kafka
// that is down; it records what it was given.
type blockingSink struct {
	entered chan struct{}
	release chan struct{}
	got     []pipeline.Message
}

func (b *blockingSink) Write(ctx context.Context, msgs []pipeline.Message) error {
	select {
	case b.entered <- struct{}{}:
	default:
	}
	select {
	case <-b.release:
	case <-ctx.Done():
		return ctx.Err()
	}
	b.got = append(b.got, msgs...)
	return nil
}

func (b *blockingSink) Close(context.Context) error { return nil }

// TestPublishOutsideTransaction (issue 15, acceptance 4): while the
// violations topic does not answer, the store holds no transaction open:
// the violation and its outbox record are committed first, and publishing
// happens after; once the sink answers, the outbox empties.
func TestPublishOutsideTransaction(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	s := NewStore(pool, "tidemark", "g-outbox")
	if err := s.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	pos := pipeline.Position{CommitLSN: 0x2000, Seq: 1}
	v := &Violation{ID: ViolationID("ob", []byte(`{"id":2}`), pos), Rule: "ob", Kind: KindMissing, Severity: "error", Table: "public.t",
		RowKey: []byte(`{"id":2}`), Position: pos.String(), CommitLSN: pos.CommitLSN.String(), Seq: 1, TransactionID: "8:8192",
		CommittedAt: time.Now().UTC(), DetectedAt: time.Now().UTC(), MatchKey: "ob|2", Detail: "d", Status: StatusOpen}
	sink := &blockingSink{entered: make(chan struct{}, 1), release: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := s.commit(ctx, &batch{violations: []*Violation{v}}, func(*commitResult) []pipeline.Message {
			return []pipeline.Message{{Topic: "p.violations", Key: []byte(v.ID), Value: []byte(`{"id":"` + v.ID + `"}`)}}
		})
		if err == nil {
			err = s.drainOutbox(ctx, sink)
		}
		done <- err
	}()
	select {
	case <-sink.entered:
	case err := <-done:
		t.Fatalf("finished without publishing: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("never published")
	}
	time.Sleep(300 * time.Millisecond) // publishing is blocked
	var open int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND xact_start IS NOT NULL AND now() - xact_start > interval '200 milliseconds'`).Scan(&open); err != nil {
		t.Fatal(err)
	}
	if open != 0 {
		t.Errorf("%d session(s) held a transaction open while the violations topic was not answering", open)
	}
	var stored, outboxed int
	if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM tidemark.violations WHERE id = $1), (SELECT count(*) FROM tidemark.violation_outbox WHERE consumer = 'g-outbox')`, v.ID).Scan(&stored, &outboxed); err != nil {
		t.Fatal(err)
	}
	if stored != 1 || outboxed != 1 {
		t.Errorf("while publishing: %d violation row(s), %d outbox record(s) committed; want 1 and 1", stored, outboxed)
	}
	close(sink.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM tidemark.violation_outbox WHERE consumer = 'g-outbox'`).Scan(&outboxed); err != nil {
		t.Fatal(err)
	}
	if len(sink.got) != 1 || string(sink.got[0].Key) != v.ID || outboxed != 0 {
		t.Errorf("after publishing: sink got %d record(s), %d outbox record(s) left; want 1 and 0", len(sink.got), outboxed)
	}
}

// TestStateLookupFailureIsTransient: when the state database cannot answer
// an evicted key's lookup, the change is an infrastructure failure (the
// consumer retries it without bound and never dead-letters it), and it has
// changed nothing: handled again once the database answers, the regression
// is flagged.
func TestStateLookupFailureIsTransient(t *testing.T) {
	dsn := pgserver.ForTest(t)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	rules := DefaultRules()[2:]
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(eng, NewStore(pool, "tidemark", "transient"), nil, Options{Group: "transient", MaxKeys: 1}, nil, nil)
	if err := c.Load(ctx); err != nil {
		t.Fatal(err)
	}
	feed(t, c, change("read_markers", "c", 10, 0, mkey("@a", "!r"), nil, marker("@a", "!r", "$e", 100)),
		change("read_markers", "c", 20, 0, mkey("@b", "!r"), nil, marker("@b", "!r", "$e", 5))) // evicts @a
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	regress := change("read_markers", "u", 30, 0, mkey("@a", "!r"), nil, marker("@a", "!r", "$e", 50))
	// The lookup cannot reach the database: a cancelled context stands in
	// for a database that is down (the pool returns the same kind of error).
	down, cancel := context.WithCancel(ctx)
	cancel()
	err = c.Handle(down, regress)
	if err == nil || !invalidation.IsTransient(err) || invalidation.IsPermanent(err) {
		t.Fatalf("a failed state lookup returned %v (transient %v), want a Transient error", err, invalidation.IsTransient(err))
	}
	if got := kinds(c); len(got) != 0 {
		t.Fatalf("a failed change left violations %v", got)
	}
	feed(t, c, regress)
	if got := kinds(c); len(got) != 1 || got[0] != "read_marker_monotonic/regressed" {
		t.Errorf("violations %v after the retry, want the regression", got)
	}
}

// TestPruneResolved: only resolved violations, resolved before the cut-off
// and below the watermark, are deleted; open ones always stay.
func TestPruneResolved(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	s := NewStore(pool, "tidemark", "prune")
	if err := s.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	old, recent := now.Add(-30*24*time.Hour), now.Add(-time.Hour)
	add := func(id string, lsn int, status string, resolvedAt *time.Time) {
		t.Helper()
		if _, err := pool.Exec(ctx, `INSERT INTO tidemark.violations (id, rule, kind, severity, table_name, row_key, position, commit_lsn, seq,
  transaction_id, committed_at, detected_at, match_key, detail, status, resolved_at)
VALUES ($1, 'r', 'missing', 'error', 'public.events', '{}', '', $2::pg_lsn, 1, '1', now(), now(), '', '', $3, $4)`,
			id, pipeline.LSN(lsn).String(), status, resolvedAt); err != nil {
			t.Fatal(err)
		}
	}
	add("old-low", 100, "resolved", &old)       // pruned
	add("old-high", 900, "resolved", &old)      // above the watermark
	add("recent-low", 100, "resolved", &recent) // resolved too recently
	add("open-low", 100, "open", nil)           // open: kept
	n, err := s.PruneResolved(ctx, pipeline.Position{CommitLSN: 500}, now.Add(-7*24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := pool.Query(ctx, `SELECT id FROM tidemark.violations ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	left, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 || !slices.Equal(left, []string{"old-high", "open-low", "recent-low"}) {
		t.Fatalf("pruned %d, left %v; want old-low only pruned", n, left)
	}
}

// TestCheckSourceIntegrity: another cluster, or a WAL position below the
// applied positions, is refused with the reset statement; a promoted
// standby is recorded.
func TestCheckSourceIntegrity(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	s := NewStore(pool, "tidemark", "srcchk")
	if err := s.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	a := capture.SourceIdentity{SystemID: "7100000000000000001", Timeline: 1, WALPos: 1000}
	if changed, err := s.CheckSource(ctx, a, "s"); err != nil || changed {
		t.Fatalf("first: %v %v", changed, err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO tidemark.integrity_state VALUES ('srcchk', 'pos', 'topic/0', '{"l": 900, "s": 1}')`); err != nil {
		t.Fatal(err)
	}
	b := a
	b.Timeline, b.WALPos = 2, 950
	if changed, err := s.CheckSource(ctx, b, "s"); err != nil || !changed {
		t.Fatalf("promoted: %v %v", changed, err)
	}
	b.WALPos = 850
	if _, err := s.CheckSource(ctx, b, "s"); !errors.Is(err, ErrOtherSource) || !strings.Contains(err.Error(), "DELETE FROM \"tidemark\".integrity_state WHERE consumer = 'srcchk'") {
		t.Fatalf("behind the applied positions: %v", err)
	}
	other := capture.SourceIdentity{SystemID: "7100000000000000009", Timeline: 1, WALPos: 5000}
	if _, err := s.CheckSource(ctx, other, "s"); !errors.Is(err, ErrOtherSource) || !strings.Contains(err.Error(), "system 7100000000000000001") {
		t.Fatalf("another cluster: %v", err)
	}
}
