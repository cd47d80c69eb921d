package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/pipeline"
)

// snapshotInitial sets postgres.snapshot: initial (the harness defaults to
// never, for the tests written before snapshots).
func snapshotInitial(c *config.Config) { c.Postgres.Snapshot = config.SnapshotInitial }

// snapshotState reads the slot's row in tidemark.snapshots ("" when none).
func (e *env) snapshotState(slot string) (string, int64) {
	e.t.Helper()
	var state string
	var rows int64
	err := e.pool.QueryRow(context.Background(), `SELECT state, rows FROM tidemark.snapshots WHERE slot = $1`, slot).Scan(&state, &rows)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) && !strings.Contains(err.Error(), "does not exist") {
		e.t.Fatalf("reading tidemark.snapshots: %v", err)
	}
	return state, rows
}

func (e *env) waitSnapshotDone(r *running, slot string, timeout time.Duration) int64 {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if st, n := e.snapshotState(slot); st == capture.SnapshotDone {
			return n
		}
		select {
		case <-r.done:
			e.t.Fatalf("capture stopped before its initial snapshot completed: %v", r.err)
		default:
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("initial snapshot of %s not done after %s", slot, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// canonicalPK are the canonical tables' primary keys.
var canonicalPK = map[string][]string{
	"public.users": {"user_id"}, "public.rooms": {"room_id"}, "public.room_memberships": {"room_id", "user_id"},
	"public.events": {"event_id"}, "public.event_json": {"event_id"}, "public.read_markers": {"user_id", "room_id"},
}

func pkOf(img map[string]json.RawMessage, cols []string) string {
	parts := make([]string, len(cols))
	for i, c := range cols {
		parts[i] = string(img[c])
	}
	return strings.Join(parts, "|")
}

// sameValue compares a column's JSON from an envelope with to_jsonb's:
// timestamps by instant (the two render them differently), the rest
// exactly.
func sameValue(env, src json.RawMessage) bool {
	var a, b any
	if json.Unmarshal(env, &a) != nil || json.Unmarshal(src, &b) != nil {
		return false
	}
	if as, ok := a.(string); ok {
		if bs, ok := b.(string); ok {
			ta, err1 := time.Parse(time.RFC3339Nano, as)
			tb, err2 := time.Parse(time.RFC3339Nano, bs)
			if err1 == nil && err2 == nil {
				return ta.Equal(tb)
			}
		}
	}
	return reflect.DeepEqual(a, b)
}

// snapshotWorkload updates, deletes and inserts random rows of the
// canonical tables until stop.
func (e *env) snapshotWorkload(seed uint64, n *atomic.Int64) (stop func() int64) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(seed, seed+1))
		stmts := []string{
			`UPDATE room_memberships SET membership = (ARRAY['join','leave','invite','ban'])[1 + (random()*3)::int], updated_at = now() WHERE room_id = '!r' || $1::int AND user_id = '@u' || ($1::int % 5000)`,
			`DELETE FROM room_memberships WHERE room_id = '!r' || ($1::int % 1000) AND user_id = '@u' || ($1::int % 5000)`,
			`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r' || ($1::int % 1000), '@new' || $1::int, 'join') ON CONFLICT DO NOTHING`,
			`UPDATE users SET deactivated = NOT deactivated WHERE user_id = '@u' || ($1::int % 5000)`,
			`DELETE FROM events WHERE event_id = '$e' || ($1::int % 15000)`,
			`INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ('$live' || $1::int, '!r1', '@u1', 'm.room.message', $1::int) ON CONFLICT DO NOTHING`,
			`UPDATE event_json SET json = '{"edited":' || $1::int || '}' WHERE event_id = '$e' || ($1::int % 5000)`,
			`DELETE FROM read_markers WHERE user_id = '@u' || ($1::int % 4000) AND room_id = '!r' || ($1::int % 4000 % 1000)`,
			`UPDATE rooms SET created_at = now() WHERE room_id = '!r' || ($1::int % 1000)`,
		}
		for i := 0; ctx.Err() == nil; i++ {
			k := rng.IntN(20000)
			if _, err := e.pool.Exec(ctx, stmts[rng.IntN(len(stmts))], k); err != nil {
				if ctx.Err() == nil {
					werr = err
				}
				return
			}
			n.Add(1)
		}
	}()
	var once sync.Once
	stop = func() int64 {
		once.Do(func() {
			cancel()
			wg.Wait()
			if werr != nil {
				e.t.Errorf("workload: %v", werr)
			}
		})
		return n.Load()
	}
	e.t.Cleanup(func() { stop() })
	return stop
}

// TestSnapshotInitialUnderWorkload (issue 16, acceptance 1): 50,000 rows
// exist across the canonical tables when capture first starts, and a
// workload updates, deletes and inserts rows while the initial snapshot is
// read. After catch-up, folding each topic by key (the record with the
// highest position wins, a delete removes the key) equals the source table
// exactly, column by column, for every table; every snapshot row sorts
// before every live change of its key; the snapshot is marked first ...
// last, op r, before null.
//
// Without the snapshot (postgres.snapshot: never) the fold lacks the rows
// that existed before; with snapshot positions after the stream's, live
// changes would be overwritten by older snapshot rows.
func TestSnapshotInitialUnderWorkload(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	e.exec(`INSERT INTO users(user_id) SELECT '@u' || g FROM generate_series(0, 4999) g;
INSERT INTO rooms(room_id) SELECT '!r' || g FROM generate_series(0, 999) g;
INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!r' || r, '@u' || ((r * 20 + m) % 5000), CASE WHEN m % 3 = 0 THEN 'leave' ELSE 'join' END
  FROM generate_series(0, 999) r, generate_series(0, 19) m;
INSERT INTO events(event_id, room_id, sender, type, origin_ts)
  SELECT '$e' || g, '!r' || (g % 1000), '@u' || (g % 5000), 'm.room.message', g FROM generate_series(0, 14999) g;
INSERT INTO event_json(event_id, room_id, json) SELECT '$e' || g, '!r' || (g % 1000), '{"n":' || g || '}' FROM generate_series(0, 4999) g;
INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering)
  SELECT '@u' || g, '!r' || (g % 1000), '$e' || g, g FROM generate_series(0, 3999) g`)
	var existing int64
	if err := e.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM rooms) +
		(SELECT count(*) FROM room_memberships) + (SELECT count(*) FROM events) + (SELECT count(*) FROM event_json) +
		(SELECT count(*) FROM read_markers)`).Scan(&existing); err != nil || existing != 50000 {
		t.Fatalf("seeded %d rows (%v), want 50000", existing, err)
	}
	cfg := e.config("snapw", demo.Tables, func(c *config.Config) {
		snapshotInitial(c)
		// The smallest in-flight budget: the snapshot streams through it.
		c.Pipeline.MaxInFlightBytes = 1 << 20
	})
	var statements atomic.Int64
	stop := e.snapshotWorkload(rand.Uint64(), &statements)
	time.Sleep(200 * time.Millisecond)
	r := e.start(cfg)
	atStart := statements.Load()
	done0 := time.Now()
	snapRows := e.waitSnapshotDone(r, cfg.Postgres.Slot, 120*time.Second)
	during := statements.Load() - atStart
	t.Logf("initial snapshot: %d rows in %s; %d workload statements committed meanwhile", snapRows, time.Since(done0), during)
	if during == 0 {
		t.Errorf("no workload statement ran while the snapshot was read")
	}
	time.Sleep(500 * time.Millisecond) // live changes after the snapshot, too
	ops := stop()
	end := e.currentLSN()
	e.waitSlot(cfg.Postgres.Slot, end, 60*time.Second)

	var firsts, lasts, reads int
	var snapLSN pipeline.LSN
	for _, table := range demo.Tables {
		ms := e.read(cfg.Kafka.TopicPrefix + "." + table)
		sortByPosition(ms)
		pk := canonicalPK[table]
		fold := map[string]map[string]json.RawMessage{}
		lastRead := map[string]pipeline.Position{}
		firstLive := map[string]pipeline.Position{}
		for _, m := range ms {
			img := m.Env.After
			if m.Env.Op == "d" {
				img = m.Env.Before
			}
			k := pkOf(img, pk)
			switch m.Env.Op {
			case "r":
				reads++
				if m.Env.Before != nil {
					t.Errorf("%s: snapshot row with a before image: %s", table, m.Value)
				}
				switch m.Env.Source.Snapshot {
				case "first":
					firsts++
				case "last":
					lasts++
				case "true":
				default:
					t.Errorf("%s: snapshot row with source.snapshot %q", table, m.Env.Source.Snapshot)
				}
				if snapLSN == 0 {
					snapLSN = m.Pos.CommitLSN
				} else if m.Pos.CommitLSN != snapLSN {
					t.Errorf("%s: snapshot rows at commit LSNs %d and %d", table, snapLSN, m.Pos.CommitLSN)
				}
				lastRead[k] = m.Pos
				fold[k] = m.Env.After
			case "c", "u":
				if m.Env.Source.Snapshot != "false" {
					t.Errorf("%s: live change with source.snapshot %q", table, m.Env.Source.Snapshot)
				}
				if _, ok := firstLive[k]; !ok {
					firstLive[k] = m.Pos
				}
				fold[k] = m.Env.After
			case "d":
				if _, ok := firstLive[k]; !ok {
					firstLive[k] = m.Pos
				}
				delete(fold, k)
			default:
				t.Fatalf("%s: op %q", table, m.Env.Op)
			}
		}
		for k, rp := range lastRead {
			if lp, ok := firstLive[k]; ok && !rp.Less(lp) {
				t.Errorf("%s key %s: snapshot row at %s, not before the live change at %s", table, k, rp, lp)
			}
		}
		// The source table, as JSON by column.
		rows, err := e.pool.Query(context.Background(), "SELECT to_jsonb(t)::text FROM "+table+" t")
		if err != nil {
			t.Fatal(err)
		}
		src := map[string]map[string]json.RawMessage{}
		var text string
		if _, err := pgx.ForEachRow(rows, []any{&text}, func() error {
			var img map[string]json.RawMessage
			if err := json.Unmarshal([]byte(text), &img); err != nil {
				return err
			}
			src[pkOf(img, pk)] = img
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		var missing, extra, differ []string
		for k, img := range src {
			got, ok := fold[k]
			if !ok {
				missing = append(missing, k)
				continue
			}
			for col, v := range img {
				if !sameValue(got[col], v) {
					differ = append(differ, fmt.Sprintf("%s.%s: topic %s, table %s", k, col, got[col], v))
				}
			}
		}
		for k := range fold {
			if _, ok := src[k]; !ok {
				extra = append(extra, k)
			}
		}
		if len(missing)+len(extra)+len(differ) > 0 {
			t.Errorf("%s: the fold of the topic differs from the table (%d rows): %d missing (e.g. %v), %d extra (e.g. %v), %d values differ (e.g. %v)",
				table, len(src), len(missing), missing[:min(3, len(missing))], len(extra), extra[:min(3, len(extra))], len(differ), differ[:min(3, len(differ))])
		}
		t.Logf("%s: %d rows, %d records", table, len(src), len(ms))
	}
	if int64(reads) != snapRows || firsts != 1 || lasts != 1 {
		t.Errorf("snapshot records: %d (recorded %d), %d first, %d last; want equal, 1, 1", reads, snapRows, firsts, lasts)
	}
	var cp string
	if err := e.pool.QueryRow(context.Background(), `SELECT consistent_point::text FROM tidemark.snapshots WHERE slot = $1`, cfg.Postgres.Slot).Scan(&cp); err != nil {
		t.Fatal(err)
	}
	if want, _ := pipeline.ParseLSN(cp); snapLSN+1 != want {
		t.Errorf("snapshot rows at commit LSN %s, want the consistent point %s minus one", snapLSN, cp)
	}
	if snapRows < 45000 {
		t.Errorf("the snapshot read %d rows, want about 50000", snapRows)
	}
	t.Logf("workload: %d statements", ops)
}

// TestSnapshotBootstrapsTargets (issue 16, acceptance 5): capture starts
// on a database that already has memberships and users; the targets role
// starts after it, from nothing, and learns every membership from the
// initial snapshot: the audit reports 1.0 with no rebuild. Without the
// snapshot (postgres.snapshot: never) the targets are empty and the audit
// reports 0.
func TestSnapshotBootstrapsTargets(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	e.exec(`INSERT INTO users(user_id, deactivated) SELECT '@u' || g, g = 7 FROM generate_series(1, 8) g;
INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!s' || r, '@u' || u, CASE WHEN u <= 5 OR u = 7 THEN 'join' ELSE 'leave' END FROM generate_series(1, 30) r, generate_series(1, 8) u`)
	cfg := e.config("snapt", []string{"public.users", "public.room_memberships"}, func(c *config.Config) {
		snapshotInitial(c)
		c.Targets = &config.Targets{}
	})
	r := e.start(cfg)
	e.waitSnapshotDone(r, cfg.Postgres.Slot, 60*time.Second)
	_, stop := e.startTargets(cfg)
	defer stop()
	// A live change after the snapshot, too.
	e.exec(`UPDATE room_memberships SET membership = 'join' WHERE room_id = '!s1' AND user_id = '@u6'`)
	e.waitTargets(cfg, 60*time.Second)
	rep, err := app.AuditTargets(context.Background(), cfg, 0, 30*time.Second)
	if err != nil {
		t.Fatalf("audit: %v", err)
	}
	if rep.Ratio != 1 || rep.Rooms != 30 {
		t.Fatalf("audit after the initial snapshot: %d rooms, ratio %v, mismatches %v; want 30 rooms, 1.0", rep.Rooms, rep.Ratio, rep.Mismatches[:min(3, len(rep.Mismatches))])
	}
	got := e.pairs(keptSQL(cfg))
	if len(got) != 30*5+1 {
		t.Errorf("%d targets kept, want %d", len(got), 30*5+1)
	}
}

// TestSnapshotCrashRefusesRestart: Tidemark stops after 1,000 of 3,000
// snapshot rows (a test hook, as a crash mid-snapshot). The next start
// finds the slot but the snapshot incomplete and refuses, saying how to
// redo it; done as it says (drop the slot, start again), a new snapshot
// publishes every row, at positions after the incomplete one's. Without
// the completion check the restart streams from the slot without the
// 2,000 rows never published.
func TestSnapshotCrashRefusesRestart(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 3000) g`)
	cfg := e.config("snapc", []string{"public.items"}, snapshotInitial)
	log := zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel))
	ctx := context.Background()
	a, err := app.Prepare(ctx, cfg, log, app.SnapshotFailAfter(1000))
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := a.Run(rctx); err == nil || !strings.Contains(err.Error(), "FailAfter") {
		t.Fatalf("run with the hook: %v, want the hook's failure", err)
	}
	if st, _ := e.snapshotState(cfg.Postgres.Slot); st != capture.SnapshotRunning {
		t.Fatalf("snapshot state %q after the failure, want running", st)
	}
	e.exec(`UPDATE items SET v = 'live' WHERE id = 3000`)

	_, err = app.Prepare(ctx, cfg, log)
	var inc *capture.SnapshotIncompleteError
	if !errors.As(err, &inc) {
		t.Fatalf("restart after an incomplete snapshot: %v, want a SnapshotIncompleteError", err)
	}
	want := fmt.Sprintf("drop the slot (SELECT pg_drop_replication_slot('%s');) and start again", cfg.Postgres.Slot)
	if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "did not complete") {
		t.Fatalf("refusal %q does not say %q", err, want)
	}
	t.Logf("refusal: %v", err)
	partial := e.read("snapc.public.items")

	e.exec(fmt.Sprintf(`SELECT pg_drop_replication_slot('%s')`, cfg.Postgres.Slot))
	r := e.start(cfg)
	if n := e.waitSnapshotDone(r, cfg.Postgres.Slot, 60*time.Second); n != 3000 {
		t.Errorf("redone snapshot: %d rows, want 3000", n)
	}
	ms := e.read("snapc.public.items")
	var maxPartial pipeline.Position
	for _, m := range partial {
		if maxPartial.Less(m.Pos) {
			maxPartial = m.Pos
		}
	}
	vals := map[string]string{}
	for _, m := range ms {
		if m.Pos.CommitLSN == maxPartial.CommitLSN {
			continue // the incomplete snapshot's
		}
		if m.Env.Op != "r" || !maxPartial.Less(m.Pos) {
			t.Fatalf("redone snapshot record %s at %s, not a snapshot row after the incomplete one's (up to %s)", m.Env.Op, m.Pos, maxPartial)
		}
		vals[string(m.Env.After["id"])] = str(t, m.Env.After["v"])
	}
	if len(vals) != 3000 || vals["3000"] != "live" || vals["1"] != "v1" {
		t.Errorf("redone snapshot: %d rows, id 3000 = %q, id 1 = %q; want 3000, live, v1", len(vals), vals["3000"], vals["1"])
	}
	if len(partial) >= 3000 || len(ms) != len(partial)+3000 {
		t.Errorf("incomplete snapshot published %d records, the redone one %d; want fewer than 3000 (as many as were written before the failure), then 3000", len(partial), len(ms)-len(partial))
	}
	t.Logf("incomplete snapshot published %d records; the redone one %d", len(partial), len(ms)-len(partial))
}

// TestSnapshotTypesMatchLive: a snapshot row and a live insert of the same
// values publish byte-identical "after" values, for every type of
// TestTypeFidelity's table (numeric, timestamptz, arrays, bytea, json,
// bool, domains, ...): the snapshot reads text under the same pinned
// formats and decodes it with capture's decoder.
func TestSnapshotTypesMatchLive(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
CREATE DOMAIN label AS text;
CREATE DOMAIN amount AS numeric(10,2);
CREATE TABLE typed (
  id int4 PRIMARY KEY,
  i2 int2, i4 int4, i8 int8, n numeric, t text, b bool, f8 float8, f4 float4,
  ts timestamptz, tsl timestamp, d date, u uuid, j json, jb jsonb, by bytea,
  arr int8[], tarr text[], e mood, iv interval, nul text,
  m int4[], dp posint, dl label, da amount, dpa posint[]
)`)
	values := []string{
		`32767, -2147483648, 42, 12.50, 'héllo "q"', true, 1.5, 1.1, '2024-03-01 12:34:56.123456+02', '2024-03-01 12:34:56.5', '2024-02-29',
		 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": {"c": null}}', '\xdeadbeef', '{1,2,9007199254740993}', '{"x","y z"}',
		 'sad', '1 day 02:03:04', NULL, '{{1,2},{3,4}}', 7, 'hi', 12.5, '{1,NULL,2}'`,
		`-1, 0, 9223372036854775807, 'NaN', E'line\nbreak', false, 'NaN', '-Infinity', 'infinity', '-infinity', '-infinity',
		 NULL, '[]', '[]', '\x', '{}', ARRAY['a', NULL, 'NULL', 'say "hi"', 'back\slash', ''], 'happy', '-1 year -2 mons +3 days -04:05:06.5', 'x',
		 '[0:2]={1,2,3}', 1, '', 0, '{}'`,
		`1, 1, -9007199254740992, 123456789012345678901234567890.123456789, '', NULL, 0.30000000000000004, 3.4028235e38,
		 '2024-12-31 23:59:59.5-05', '2024-01-02 03:04:05', '2024-01-02', NULL, 'null', '"s"', '\x00ff5c', '{NULL,1}', NULL, NULL, '0', NULL,
		 '{{1,NULL},{NULL,4}}', NULL, NULL, NULL, NULL`,
	}
	const cols = `i2, i4, i8, n, t, b, f8, f4, ts, tsl, d, u, j, jb, by, arr, tarr, e, iv, nul, m, dp, dl, da, dpa`
	for i, v := range values {
		e.exec(fmt.Sprintf("INSERT INTO typed (id, %s) VALUES (%d, %s)", cols, i+1, v))
	}
	// The database's defaults choose other output formats; the snapshot's
	// session pins the ones the decoder reads, as the replication
	// connection does (without the pins, bytea would arrive in escape
	// format and times in another zone and style).
	var db string
	if err := e.pool.QueryRow(context.Background(), "SELECT current_database()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	e.exec(fmt.Sprintf(`ALTER DATABASE %[1]s SET bytea_output = 'escape'; ALTER DATABASE %[1]s SET TimeZone = 'Asia/Tokyo';
ALTER DATABASE %[1]s SET IntervalStyle = 'iso_8601'; ALTER DATABASE %[1]s SET DateStyle = 'SQL, DMY'; ALTER DATABASE %[1]s SET extra_float_digits = 0`,
		pgx.Identifier{db}.Sanitize()))
	t.Cleanup(func() {
		_, _ = e.pool.Exec(context.Background(), fmt.Sprintf("ALTER DATABASE %s RESET ALL", pgx.Identifier{db}.Sanitize()))
	})
	cfg := e.config("snapty", []string{"public.typed"}, snapshotInitial)
	r := e.start(cfg)
	e.waitSnapshotDone(r, cfg.Postgres.Slot, 60*time.Second)
	for i, v := range values {
		e.exec(fmt.Sprintf("INSERT INTO typed (id, %s) VALUES (%d, %s)", cols, 101+i, v))
	}
	waitCaptured(e, r, cfg.Postgres.Slot)
	byID := map[string]map[string]json.RawMessage{}
	ops := map[string]string{}
	for _, m := range e.read("snapty.public.typed") {
		id := string(m.Env.After["id"])
		byID[id] = m.Env.After
		ops[id] = m.Env.Op
	}
	for i := range values {
		snap, live := fmt.Sprint(i+1), fmt.Sprint(101+i)
		if ops[snap] != "r" || ops[live] != "c" {
			t.Fatalf("row %d: ops %q (snapshot) and %q (live), want r and c", i+1, ops[snap], ops[live])
		}
		a, b := byID[snap], byID[live]
		if len(a) != 26 || len(b) != 26 {
			t.Errorf("row %d: %d and %d columns, want 26", i+1, len(a), len(b))
		}
		for col, sv := range a {
			if col == "id" {
				continue
			}
			if lv := b[col]; string(sv) != string(lv) {
				t.Errorf("row %d column %s: snapshot %s, live %s", i+1, col, sv, lv)
			}
		}
	}
}

// TestSnapshotInitialOnly: postgres.snapshot: initial_only publishes the
// existing rows, records the snapshot and returns without streaming: the
// slot stays at its consistent point, and a change committed meanwhile
// is published by the next (streaming) start, after the snapshot rows.
// Without initial_only's stop, Run would stream and publish the change.
func TestSnapshotInitialOnly(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 500) g`)
	cfg := e.config("snapo", []string{"public.items"}, func(c *config.Config) { c.Postgres.Snapshot = config.SnapshotInitialOnly })
	r := e.start(cfg)
	select {
	case <-r.done:
		if r.err != nil {
			t.Fatalf("initial_only run: %v", r.err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("initial_only run did not return")
	}
	if st, n := e.snapshotState(cfg.Postgres.Slot); st != capture.SnapshotDone || n != 500 {
		t.Fatalf("snapshot %q with %d rows, want done with 500", st, n)
	}
	e.exec(`UPDATE items SET v = 'live' WHERE id = 1`)
	time.Sleep(300 * time.Millisecond)
	if ms := e.read("snapo.public.items"); len(ms) != 500 {
		t.Fatalf("%d records after initial_only, want the 500 snapshot rows", len(ms))
	}
	cfg.Postgres.Snapshot = config.SnapshotInitial
	r = e.start(cfg)
	waitCaptured(e, r, cfg.Postgres.Slot)
	ms := e.read("snapo.public.items")
	if len(ms) != 501 {
		t.Fatalf("%d records after the streaming start, want 501", len(ms))
	}
	var snapMax pipeline.Position
	var live *msg
	for i := range ms {
		if ms[i].Env.Op == "r" {
			if snapMax.Less(ms[i].Pos) {
				snapMax = ms[i].Pos
			}
		} else {
			live = &ms[i]
		}
	}
	if live == nil || live.Env.Op != "u" || str(t, live.Env.After["v"]) != "live" || !snapMax.Less(live.Pos) {
		t.Fatalf("the live update: %+v, want op u after the snapshot rows (up to %s)", live, snapMax)
	}
}
