package integrity

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

// canonicalSchema is the canonical chat schema with default replica
// identities (the primary keys).
func canonicalSchema() map[string]*TableSchema {
	text := `"pg_catalog"."text"`
	mk := func(name string, cols, ident []string) *TableSchema {
		ts := &TableSchema{Name: name, Columns: cols, Identity: ident, Types: map[string]string{}}
		for _, c := range cols {
			ts.Types[c] = text
		}
		if ts.has("stream_ordering") {
			ts.Types["stream_ordering"] = `"pg_catalog"."int8"`
		}
		if ts.has("updated_at") {
			ts.Types["updated_at"] = `"pg_catalog"."timestamptz"`
		}
		return ts
	}
	return map[string]*TableSchema{
		"public.events":       mk("public.events", []string{"event_id", "room_id", "sender", "type", "stream_ordering", "origin_ts"}, []string{"event_id"}),
		"public.event_json":   mk("public.event_json", []string{"event_id", "room_id", "json"}, []string{"event_id"}),
		"public.read_markers": mk("public.read_markers", []string{"user_id", "room_id", "event_id", "stream_ordering", "updated_at"}, []string{"user_id", "room_id"}),
	}
}

func newTestChecker(t *testing.T) *Checker {
	t.Helper()
	rules := DefaultRules()
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	return NewChecker(eng, nil, nil, Options{Group: "test"}, nil, nil)
}

// change builds a change message the way the consumer runtime does.
func change(table, op string, lsn uint64, seq uint32, key string, before, after map[string]any) *invalidation.Message {
	img := func(m map[string]any) map[string]json.RawMessage {
		if m == nil {
			return nil
		}
		out := map[string]json.RawMessage{}
		for k, v := range m {
			b, _ := json.Marshal(v)
			out[k] = b
		}
		return out
	}
	env := &pipeline.Envelope{Before: img(before), After: img(after), Op: op}
	env.Source.Schema, env.Source.Table = "public", table
	env.Source.LSN, env.Source.TsMs = lsn, int64(lsn)*1000
	env.Transaction.ID = fmt.Sprintf("%d:%d", lsn, lsn)
	env.Transaction.TotalOrder = seq + 1
	return &invalidation.Message{Topic: "t.public." + table, Partition: int(seq % 3), Key: []byte(key),
		Table: env.Table(), Pos: env.Position(), Env: env}
}

// end builds an END record of the transactions topic.
func end(t *testing.T, lsn uint64, counts map[string]int) *invalidation.Message {
	t.Helper()
	var dcs []string
	n := 0
	for tbl, c := range counts {
		dcs = append(dcs, fmt.Sprintf(`{"data_collection":%q,"event_count":%d}`, tbl, c))
		n += c
	}
	v := fmt.Sprintf(`{"status":"END","id":"%d:%d","txId":%d,"lsn":%d,"ts_ms":%d,"end_lsn":%d,"event_count":%d,"data_collections":[%s]}`,
		lsn, lsn, lsn, lsn, lsn*1000, lsn+1, n, strings.Join(dcs, ","))
	m, err := Decode(&kafkago.Message{Topic: "t.transactions", Value: []byte(v)})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func feed(t *testing.T, c *Checker, ms ...*invalidation.Message) {
	t.Helper()
	for _, m := range ms {
		if err := c.Handle(context.Background(), m); err != nil {
			t.Fatalf("handle %s %s: %v", m.Table, m.Pos, err)
		}
	}
}

func kinds(c *Checker) []string {
	var out []string
	for _, v := range c.violations {
		out = append(out, v.Rule+"/"+v.Kind)
	}
	return out
}

func ev(id string) map[string]any {
	return map[string]any{"event_id": id, "room_id": "!r", "sender": "@u", "type": "m"}
}
func js(id string) map[string]any {
	return map[string]any{"event_id": id, "room_id": "!r", "json": "{}"}
}
func key(id string) string { return `{"event_id":"` + id + `"}` }

// TestSameTransactionDecidedWhenComplete: whatever order the END record and
// the changes arrive in (different topics and partitions), a transaction is
// decided only once complete, and by its net effect.
func TestSameTransactionDecidedWhenComplete(t *testing.T) {
	both := map[string]int{"public.events": 1, "public.event_json": 1}
	cases := []struct {
		name     string
		msgs     func(t *testing.T) []*invalidation.Message
		want     []string
		open     int // transactions still undecided
		pending  int // expectations left for the database
		unseenOK bool
	}{
		{name: "END first", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{end(t, 10, both), change("events", "c", 10, 0, key("$a"), nil, ev("$a")),
				change("event_json", "c", 10, 1, key("$a"), nil, js("$a"))}
		}},
		{name: "END last", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("event_json", "c", 10, 1, key("$a"), nil, js("$a")),
				change("events", "c", 10, 0, key("$a"), nil, ev("$a")), end(t, 10, both)}
		}},
		{name: "event without event_json", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("events", "c", 10, 0, key("$a"), nil, ev("$a")), end(t, 10, map[string]int{"public.events": 1})}
		}, want: []string{"events_have_json/missing"}},
		{name: "event_json of another event", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{end(t, 10, both), change("events", "c", 10, 0, key("$a"), nil, ev("$a")),
				change("event_json", "c", 10, 1, key("$b"), nil, js("$b"))}
		}, want: []string{"events_have_json/missing"}},
		{name: "event_json not arrived yet", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("events", "c", 10, 0, key("$a"), nil, ev("$a")), end(t, 10, both)}
		}, open: 1},
		{name: "event_json inserted then deleted in the transaction", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("events", "c", 10, 0, key("$a"), nil, ev("$a")),
				change("event_json", "c", 10, 1, key("$a"), nil, js("$a")),
				change("event_json", "d", 10, 2, key("$a"), map[string]any{"event_id": "$a"}, nil),
				end(t, 10, map[string]int{"public.events": 1, "public.event_json": 2})}
		}, want: []string{"events_have_json/missing"}},
		{name: "event inserted then deleted in the transaction", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("events", "c", 10, 0, key("$a"), nil, ev("$a")),
				change("events", "d", 10, 1, key("$a"), map[string]any{"event_id": "$a"}, nil),
				end(t, 10, map[string]int{"public.events": 2})}
		}},
		{name: "event_json rewritten (delete, insert)", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("event_json", "d", 10, 0, key("$a"), map[string]any{"event_id": "$a"}, nil),
				change("event_json", "c", 10, 1, key("$a"), nil, js("$a")), end(t, 10, map[string]int{"public.event_json": 2})}
		}},
		{name: "event_json deleted with its event", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("event_json", "d", 10, 0, key("$a"), map[string]any{"event_id": "$a"}, nil),
				change("events", "d", 10, 1, key("$a"), map[string]any{"event_id": "$a"}, nil),
				end(t, 10, map[string]int{"public.event_json": 1, "public.events": 1})}
		}},
		{name: "event_json deleted alone: the database decides", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{change("event_json", "d", 10, 0, key("$a"), map[string]any{"event_id": "$a"}, nil),
				end(t, 10, map[string]int{"public.event_json": 1})}
		}, pending: 1},
		{name: "truncate copies counted once", msgs: func(t *testing.T) []*invalidation.Message {
			tr := func(p int) *invalidation.Message {
				m := change("events", "t", 10, 0, "", nil, nil)
				m.Partition = p
				return m
			}
			return []*invalidation.Message{tr(0), tr(1), change("events", "c", 10, 1, key("$a"), nil, ev("$a")), tr(2),
				end(t, 10, map[string]int{"public.events": 2})}
		}, want: []string{"events_have_json/missing"}},
		{name: "tables the checker does not read", msgs: func(t *testing.T) []*invalidation.Message {
			return []*invalidation.Message{end(t, 10, map[string]int{"public.rooms": 3})}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestChecker(t)
			feed(t, c, tc.msgs(t)...)
			if got := kinds(c); strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Errorf("violations %v, want %v", got, tc.want)
			}
			p := c.Progress()
			if p.OpenTransactions != tc.open || p.Pending != tc.pending {
				t.Errorf("open transactions %d, pending %d; want %d, %d", p.OpenTransactions, p.Pending, tc.open, tc.pending)
			}
		})
	}
}

// TestSameTransactionLateChangeDecides: an undecided transaction is decided
// by the change it was waiting for.
func TestSameTransactionLateChangeDecides(t *testing.T) {
	c := newTestChecker(t)
	feed(t, c, change("events", "c", 10, 0, key("$a"), nil, ev("$a")),
		end(t, 10, map[string]int{"public.events": 1, "public.event_json": 1}))
	if p := c.Progress(); p.OpenTransactions != 1 {
		t.Fatalf("decided before its event_json arrived: %+v", p)
	}
	feed(t, c, change("event_json", "c", 10, 1, key("$a"), nil, js("$a")))
	if p := c.Progress(); p.OpenTransactions != 0 || len(c.violations) != 0 {
		t.Fatalf("progress %+v, violations %v", p, kinds(c))
	}
	// A redelivered change of a decided transaction changes nothing.
	feed(t, c, change("events", "c", 10, 0, key("$a"), nil, ev("$a")))
	if p := c.Progress(); p.OpenTransactions != 0 {
		t.Errorf("a redelivery reopened its transaction: %+v", p)
	}
}

func marker(user, room, event string, so any) map[string]any {
	return map[string]any{"user_id": user, "room_id": room, "event_id": event, "stream_ordering": so}
}

func mkey(user, room string) string { return `{"user_id":"` + user + `","room_id":"` + room + `"}` }

// TestMonotonic: a value below the last one seen for the key is flagged,
// from the before image when present, else from the kept value; deletes
// reset the key; redeliveries are ignored.
func TestMonotonic(t *testing.T) {
	c := newTestChecker(t)
	k := mkey("@a", "!r")
	// Markers point at events the stream has shown, so only the monotonic
	// rule speaks.
	feed(t, c, change("events", "c", 1, 0, key("$e"), nil, ev("$e")), change("event_json", "c", 1, 1, key("$e"), nil, js("$e")),
		end(t, 1, map[string]int{"public.events": 1, "public.event_json": 1}))
	step := func(lsn uint64, op string, before, after map[string]any, want int) {
		t.Helper()
		feed(t, c, change("read_markers", op, lsn, 0, k, before, after))
		if n := len(c.violations); n != want {
			t.Fatalf("after lsn %d: %d violations (%v), want %d", lsn, n, kinds(c), want)
		}
	}
	step(10, "c", nil, marker("@a", "!r", "$e", 100), 0)
	step(11, "u", nil, marker("@a", "!r", "$e", 200), 0)
	step(11, "u", nil, marker("@a", "!r", "$e", 50), 0) // same position again: skipped
	step(12, "u", nil, marker("@a", "!r", "$e", 150), 1)
	if v := c.violations[0]; v.Kind != KindRegressed || !strings.Contains(v.Detail, "from 200 to 150") {
		t.Errorf("violation %+v", v)
	}
	step(13, "u", nil, marker("@a", "!r", "$e", 160), 1)                            // forward from the last value
	step(14, "u", marker("@a", "!r", "$e", 1000), marker("@a", "!r", "$e", 900), 2) // the before image wins
	step(15, "d", map[string]any{"user_id": "@a", "room_id": "!r"}, nil, 2)
	step(16, "c", nil, marker("@a", "!r", "$e", 5), 2) // a new marker starts anywhere
	step(17, "u", nil, marker("@a", "!r", "$e", "9007199254740993"), 2)
	step(18, "u", nil, marker("@a", "!r", "$e", "9007199254740992"), 3) // exact beyond 2^53
}

// TestWindowedSatisfiedByStream: a read marker's event seen in the stream,
// before or after the marker, satisfies it without the database; a newer
// change of the marker supersedes its older expectation.
func TestWindowedSatisfiedByStream(t *testing.T) {
	c := newTestChecker(t)
	feed(t, c, change("read_markers", "c", 10, 0, mkey("@a", "!r"), nil, marker("@a", "!r", "$later", 1)))
	if p := c.Progress(); p.Pending != 1 {
		t.Fatalf("pending %d, want 1", p.Pending)
	}
	feed(t, c, change("events", "c", 11, 0, key("$later"), nil, ev("$later")))
	if p := c.Progress(); p.Pending != 0 {
		t.Fatalf("the event did not satisfy the marker: pending %d", p.Pending)
	}
	feed(t, c, change("read_markers", "c", 12, 0, mkey("@b", "!r"), nil, marker("@b", "!r", "$later", 1)))
	if p := c.Progress(); p.Pending != 0 {
		t.Fatalf("an event seen earlier in the stream did not satisfy the marker: pending %d", p.Pending)
	}
	feed(t, c, change("read_markers", "u", 13, 0, mkey("@b", "!r"), nil, marker("@b", "!r", "$x", 2)),
		change("read_markers", "u", 14, 0, mkey("@b", "!r"), nil, marker("@b", "!r", "$y", 3)))
	if p := c.Progress(); p.Pending != 1 {
		t.Fatalf("pending %d, want 1 (the marker's latest reference)", p.Pending)
	}
	for _, p := range c.pending {
		if p.Match[0] != "$y" || p.Deadline != 14*1000+30000 {
			t.Errorf("pending %+v, want $y due 30s after its commit", p)
		}
	}
	// The deadline is in stream time: with records arriving, the wall clock
	// does not move it.
	c.opt.Now = func() time.Time { return time.Now().Add(time.Hour) }
	c.recvAt = c.opt.Now()
	if now := c.streamNowMs(); now != 14*1000 {
		t.Errorf("stream time %d while records arrive, want the latest commit 14000", now)
	}
}

func TestCompileNamesRuleAndColumn(t *testing.T) {
	rules := []Rule{
		{Name: "json", Table: "public.events", Expect: &Expect{Table: "public.event_json", Match: map[string]string{"event_id": "id"}}, Reverse: true},
		{Name: "mono", Table: "public.read_markers", Monotonic: &Monotonic{Column: "position", Key: []string{"user_id"}}},
		{Name: "del", Table: "public.read_markers", On: []string{"delete"}, Expect: &Expect{Table: "public.events", Match: map[string]string{"event_id": "event_id"}}},
		{Name: "nowhere", Table: "public.nope", Monotonic: &Monotonic{Column: "x", Key: []string{"y"}}},
	}
	ApplyDefaults(rules)
	if ps := Validate("integrity.rules", rules); len(ps) > 0 {
		t.Fatalf("structurally invalid: %v", ps)
	}
	_, err := Compile("integrity.rules", rules, canonicalSchema())
	if err == nil {
		t.Fatal("compiled rules with unknown columns")
	}
	for _, want := range []string{
		`integrity.rules[0] (json).expect.match: public.event_json has no column "id"`,
		`integrity.rules[0] (json).reverse: deletes of public.event_json do not carry column "id"`,
		`integrity.rules[1] (mono).monotonic.column: public.read_markers has no column "position"`,
		`integrity.rules[2] (del).on: deletes of public.read_markers do not carry column "event_id"`,
		`integrity.rules[3] (nowhere).table: public.nope does not exist`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// TestMonotonicOrderByType: values are compared by the column's type:
// timestamps as instants whatever their fraction's length, numbers exactly
// (beyond float64), text as text even when it looks like a number.
func TestMonotonicOrderByType(t *testing.T) {
	for _, tc := range []struct {
		typ, a, b string
		want      int
		ok        bool
	}{
		{"timestamptz", "2026-01-01T00:00:00.1Z", "2026-01-01T00:00:00.123Z", -1, true},
		{"timestamptz", "2026-01-01T00:00:00.5Z", "2026-01-01T00:00:00.25Z", 1, true},
		{"timestamptz", "2026-01-01T01:00:00+01:00", "2026-01-01T00:00:00Z", 0, true},
		{"timestamptz", "2026-01-01T00:00:00Z", "infinity", -1, true},
		{"timestamptz", "1767225600123456", "1767225600100000", 1, true}, // Debezium micros
		{"timestamp", "2026-01-01T00:00:00.1", "2026-01-01T00:00:00.123", -1, true},
		{"date", "2026-01-02", "2025-12-31", 1, true},
		{"numeric", "9", "10", -1, true},
		{"numeric", "1.50", "1.5", 0, true},
		{"numeric", "0.30000000000000000001", "0.3", 1, true}, // equal as float64
		{"numeric", "NaN", "1e300", 1, true},
		{"int8", "9007199254740993", "9007199254740992", 1, true},
		{"float8", "-5", "3", -1, true},
		{"text", "9", "10", 1, true},
		{"text", "b", "a", 1, true},
		{"numeric", "x", "1", 0, false},
		{"timestamptz", "2026-01-01T00:00:00Z", "soon", 0, false},
	} {
		order, _ := orderFor(`"pg_catalog"."` + tc.typ + `"`)
		if order == nil {
			t.Fatalf("%s has no order", tc.typ)
		}
		if got, ok := order(tc.a, tc.b); got != tc.want || ok != tc.ok {
			t.Errorf("%s: compare(%q, %q) = %d, %v; want %d, %v", tc.typ, tc.a, tc.b, got, ok, tc.want, tc.ok)
		}
	}
}

// TestMonotonicTimestamptzFraction: a timestamptz moving forward from .1 s
// to .123 s is not a regression (as text it would be); moving back is.
func TestMonotonicTimestamptzFraction(t *testing.T) {
	rules := []Rule{{Name: "seen_at", Table: "public.read_markers", Monotonic: &Monotonic{Column: "updated_at", Key: []string{"user_id", "room_id"}}}}
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(eng, nil, nil, Options{Group: "test"}, nil, nil)
	k := mkey("@a", "!r")
	at := func(ts string) map[string]any {
		return map[string]any{"user_id": "@a", "room_id": "!r", "updated_at": ts}
	}
	feed(t, c, change("read_markers", "c", 10, 0, k, nil, at("2026-01-01T00:00:00.1Z")),
		change("read_markers", "u", 11, 0, k, nil, at("2026-01-01T00:00:00.123Z")))
	if len(c.violations) != 0 {
		t.Fatalf("false alarm: %v %+v", kinds(c), c.violations[0])
	}
	feed(t, c, change("read_markers", "u", 12, 0, k, nil, at("2026-01-01T00:00:00.12Z")))
	if len(c.violations) != 1 {
		t.Fatalf("regression .123 -> .12 not flagged: %v", kinds(c))
	}
}

// TestCompileRefusesMonotonicItCannotOrderOrSee: a monotonic column of a
// type without an order, or a rule on updates of a table whose updates
// carry no old row, is refused naming rule, column, type and the fix.
func TestCompileRefusesMonotonicItCannotOrderOrSee(t *testing.T) {
	schema := canonicalSchema()
	schema["public.read_markers"].Types["event_id"] = `"pg_catalog"."jsonb"`
	schema["public.logs"] = &TableSchema{Name: "public.logs", Columns: []string{"stream", "n"},
		Types: map[string]string{"stream": `"pg_catalog"."text"`, "n": `"pg_catalog"."int8"`}}
	rules := []Rule{
		{Name: "js", Table: "public.read_markers", Monotonic: &Monotonic{Column: "event_id", Key: []string{"user_id"}}},
		{Name: "keyless", Table: "public.logs", Monotonic: &Monotonic{Column: "n", Key: []string{"stream"}}},
		{Name: "inserts_only", Table: "public.logs", On: []string{"insert"}, Monotonic: &Monotonic{Column: "n", Key: []string{"stream"}}},
	}
	ApplyDefaults(rules)
	_, err := Compile("integrity.rules", rules, schema)
	if err == nil {
		t.Fatal("compiled")
	}
	for _, want := range []string{
		`integrity.rules[0] (js).monotonic.column: public.read_markers.event_id has type "pg_catalog"."jsonb", which has no order`,
		`integrity.rules[1] (keyless).on: updates of public.logs carry no old row`,
		`run ALTER TABLE public.logs REPLICA IDENTITY FULL`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "inserts_only") {
		t.Errorf("a monotonic rule on inserts only was refused:\n%v", err)
	}
}

func TestBoundsForget(t *testing.T) {
	s := newFIFOSet(3)
	for i := 0; i < 5; i++ {
		s.add(fmt.Sprint(i))
	}
	if s.len() != 3 || s.has("0") || s.has("1") || !s.has("4") || s.Evicted != 2 {
		t.Errorf("fifo set: len %d evicted %d", s.len(), s.Evicted)
	}
	l := newLRU(2)
	l.put("a", monoVal{V: "1"})
	l.put("b", monoVal{V: "2"})
	l.get("a")
	if k, v, ok := l.put("c", monoVal{V: "3"}); !ok || k != "b" || v.V != "2" {
		t.Errorf("lru evicted %q %v %v, want b", k, v, ok)
	}
	c := newTestChecker(t)
	c.opt.MaxPending = 2
	for i := 0; i < 3; i++ {
		u := fmt.Sprintf("@u%d", i)
		feed(t, c, change("read_markers", "c", uint64(10+i), 0, mkey(u, "!r"), nil, marker(u, "!r", "$none", 1)))
	}
	if p := c.Progress(); p.Pending != 2 {
		t.Errorf("pending %d beyond its bound 2", p.Pending)
	}
}

// TestLargeTransactionBounded: a transaction beyond MaxTransactionItems is
// counted to completion but holds nothing and decides nothing.
func TestLargeTransactionBounded(t *testing.T) {
	c := newTestChecker(t)
	c.opt.MaxTransactionItems = 10
	for i := 0; i < 50; i++ {
		id := fmt.Sprintf("$big%d", i)
		feed(t, c, change("events", "c", 10, uint32(i), key(id), nil, ev(id)))
	}
	if tx := c.txns[10]; tx == nil || !tx.Overflow || len(tx.Items)+len(tx.Net) != 0 {
		t.Fatalf("transaction state %+v, want overflowed and empty", tx)
	}
	feed(t, c, end(t, 10, map[string]int{"public.events": 50}))
	if p := c.Progress(); p.OpenTransactions != 0 || len(c.violations) != 0 {
		t.Errorf("progress %+v, violations %v: want decided without flags", p, kinds(c))
	}
}

// TestNoTransactionsTrackedWithoutSameTransactionRules: with only windowed
// and monotonic rules, nothing waits for END records.
func TestNoTransactionsTrackedWithoutSameTransactionRules(t *testing.T) {
	rules := DefaultRules()[1:]
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(eng, nil, nil, Options{Group: "test"}, nil, nil)
	for i := 0; i < 100; i++ {
		feed(t, c, change("events", "c", uint64(10+i), 0, key(fmt.Sprint(i)), nil, ev(fmt.Sprint(i))))
	}
	if p := c.Progress(); p.OpenTransactions != 0 || len(c.dirtyTxn) != 0 {
		t.Errorf("%d transactions held, %d dirty, want none", p.OpenTransactions, len(c.dirtyTxn))
	}
}

// TestMonotonicKeylessFullTable: on a table without a key under REPLICA
// IDENTITY FULL, an update's regression is flagged whether it arrives as one
// u with a before image or, keyed by the whole row, as a delete and an
// insert of one transaction (in either order); a row deleted in one
// transaction and inserted in a later one starts anywhere.
func TestMonotonicKeylessFullTable(t *testing.T) {
	logs := &TableSchema{Name: "public.logs", Columns: []string{"stream", "n"}, Identity: []string{"stream", "n"},
		Types: map[string]string{"stream": `"pg_catalog"."text"`, "n": `"pg_catalog"."numeric"`}}
	rules := []Rule{{Name: "logs_n", Table: "public.logs", Monotonic: &Monotonic{Column: "n", Key: []string{"stream"}}}}
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, map[string]*TableSchema{"public.logs": logs})
	if err != nil {
		t.Fatal(err)
	}
	row := func(n string) map[string]any { return map[string]any{"stream": "s", "n": n} }
	rk := func(n string) string { return `{"stream":"s","n":"` + n + `"}` } // the whole row is the key
	lg := func(op string, lsn uint64, seq uint32, before, after map[string]any) *invalidation.Message {
		k := after
		if k == nil {
			k = before
		}
		return change("logs", op, lsn, seq, rk(k["n"].(string)), before, after)
	}
	for _, tc := range []struct {
		name string
		msgs []*invalidation.Message
		want int
	}{
		{"u with before image", []*invalidation.Message{lg("c", 10, 0, nil, row("10")), lg("u", 11, 0, row("10"), row("5"))}, 1},
		{"u with only its before image", []*invalidation.Message{lg("u", 11, 0, row("10"), row("5"))}, 1},
		{"u forward", []*invalidation.Message{lg("c", 10, 0, nil, row("10")), lg("u", 11, 0, row("10"), row("10.5"))}, 0},
		{"delete then insert", []*invalidation.Message{lg("c", 10, 0, nil, row("20")), lg("d", 11, 0, row("20"), nil), lg("c", 11, 1, nil, row("15"))}, 1},
		{"insert before its delete", []*invalidation.Message{lg("c", 10, 0, nil, row("20")), lg("c", 11, 1, nil, row("15")), lg("d", 11, 0, row("20"), nil)}, 1},
		{"first row deleted then insert", []*invalidation.Message{lg("d", 11, 0, row("20"), nil), lg("c", 11, 1, nil, row("19.99"))}, 1},
		{"delete then insert forward", []*invalidation.Message{lg("d", 11, 0, row("20"), nil), lg("c", 11, 1, nil, row("20.01"))}, 0},
		{"split updates interleaved across partitions", []*invalidation.Message{lg("c", 12, 1, nil, row("5")), lg("c", 11, 1, nil, row("10.5")),
			lg("d", 12, 0, row("10.5"), nil), lg("c", 10, 0, nil, row("10")), lg("d", 11, 0, row("10"), nil)}, 1},
		{"deleted, inserted later", []*invalidation.Message{lg("c", 10, 0, nil, row("20")), lg("d", 11, 0, row("20"), nil), lg("c", 12, 0, nil, row("1"))}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := NewChecker(eng, nil, nil, Options{Group: "test"}, nil, nil)
			feed(t, c, tc.msgs...)
			if len(c.violations) != tc.want {
				t.Fatalf("%d violations (%v), want %d", len(c.violations), kinds(c), tc.want)
			}
		})
	}
	// A split update's violation is the same (id) whichever half arrives first.
	ids := map[string]bool{}
	for _, msgs := range [][]*invalidation.Message{
		{lg("c", 10, 0, nil, row("20")), lg("d", 11, 0, row("20"), nil), lg("c", 11, 1, nil, row("15"))},
		{lg("c", 10, 0, nil, row("20")), lg("c", 11, 1, nil, row("15")), lg("d", 11, 0, row("20"), nil)},
		{lg("c", 11, 1, nil, row("15")), lg("d", 11, 0, row("20"), nil), lg("c", 10, 0, nil, row("20"))},
	} {
		c := NewChecker(eng, nil, nil, Options{Group: "test"}, nil, nil)
		feed(t, c, msgs...)
		if len(c.violations) != 1 {
			t.Fatalf("%d violations (%v), want 1", len(c.violations), kinds(c))
		}
		ids[c.violations[0].ID] = true
	}
	if len(ids) != 1 {
		t.Errorf("one regression, %d violation ids across arrival orders", len(ids))
	}
}

// TestMonotonicDeletedValueForgotten: the value a delete leaves behind for
// its transaction's insert is forgotten once every partition has applied a
// later transaction (the state stays bounded).
func TestMonotonicDeletedValueForgotten(t *testing.T) {
	c := newTestChecker(t)
	full := marker("@a", "!r", "$e", 7)
	feed(t, c, change("read_markers", "d", 20, 0, mkey("@a", "!r"), full, nil)) // partition 0
	if len(c.monoGone) != 1 {
		t.Fatalf("deleted value not kept: %v", c.monoGone)
	}
	c.pruneGone()
	if len(c.monoGone) != 1 {
		t.Fatal("forgotten before the other partitions passed its transaction")
	}
	for seq := uint32(0); seq < 3; seq++ { // a later transaction on every partition
		feed(t, c, change("read_markers", "c", 21, seq, mkey("@b"+fmt.Sprint(seq), "!r"), nil, marker("@b"+fmt.Sprint(seq), "!r", "$e", 1)))
	}
	c.pruneGone()
	if _, ok := c.mono.peek("read_marker_monotonic|" + matchKey([]string{"@a", "!r"})); ok || len(c.monoGone) != 0 {
		t.Fatalf("deleted value kept after every partition passed it: %v", c.monoGone)
	}
}

// TestSnapshotRowsSkipped: snapshot rows (op r, the initial snapshot's
// transaction, xid 0) decide no rule: an event read without its
// event_json raises nothing, its END record opens no transaction, and the
// rows are counted. A live transaction after it is decided as usual.
func TestSnapshotRowsSkipped(t *testing.T) {
	c := newTestChecker(t)
	snap := func(seq uint32, id string) *invalidation.Message {
		m := change("events", "r", 9, seq, key(id), nil, ev(id))
		m.Env.Transaction.ID = "0:9"
		return m
	}
	endSnap := end(t, 9, map[string]int{"public.events": 2})
	endSnap.Value = []byte(strings.Replace(string(endSnap.Value), `"id":"9:9","txId":9`, `"id":"0:9","txId":0`, 1))
	feed(t, c, snap(0, "$s1"), snap(1, "$s2"), endSnap,
		change("events", "c", 10, 0, key("$a"), nil, ev("$a")), end(t, 10, map[string]int{"public.events": 1}))
	if got := kinds(c); strings.Join(got, ",") != "events_have_json/missing" {
		t.Errorf("violations %v, want only the live event's", got)
	}
	if p := c.Progress(); p.OpenTransactions != 0 || p.Pending != 0 {
		t.Errorf("open transactions %d, pending %d; want 0, 0", p.OpenTransactions, p.Pending)
	}
	if c.stats.SnapshotSkipped != 2 {
		t.Errorf("snapshot rows skipped %d, want 2", c.stats.SnapshotSkipped)
	}
}
