package invalidation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

var testColumns = map[string][]string{
	"public.room_memberships": {"room_id", "user_id", "membership", "event_id"},
	"public.read_markers":     {"user_id", "room_id", "event_id", "stream_ordering"},
}

func env(t testing.TB, js string) *pipeline.Envelope {
	t.Helper()
	e, err := pipeline.ParseEnvelope([]byte(js))
	if err != nil {
		t.Fatalf("%v: %s", err, js)
	}
	return e
}

func envelope(table, op, before, after string) string {
	return fmt.Sprintf(`{"before":%s,"after":%s,"op":%q,"source":{"schema":"public","table":%q,"lsn":100,"txId":1},"transaction":{"total_order":1}}`,
		before, after, op, table)
}

func TestEngineKeys(t *testing.T) {
	eng, err := Compile([]Rule{
		{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members", "user:{user_id}:rooms"}},
		{Table: "public.read_markers", Keys: []string{"unread:{user_id}:{room_id}"}, Ops: []string{"c", "u"}, Columns: []string{"stream_ordering"}},
	}, testColumns)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		js     string
		want   []string
		accept bool
	}{
		{"join", envelope("room_memberships", "c", "null", `{"room_id":"!r1","user_id":"@a","membership":"join"}`),
			[]string{"room:!r1:members", "user:@a:rooms"}, true},
		{"leave without old image", envelope("room_memberships", "u", "null", `{"room_id":"!r1","user_id":"@a","membership":"leave"}`),
			[]string{"room:!r1:members", "user:@a:rooms"}, true},
		{"moved between rooms", envelope("room_memberships", "u", `{"room_id":"!r1","user_id":"@a"}`, `{"room_id":"!r2","user_id":"@a","membership":"join"}`),
			[]string{"room:!r1:members", "room:!r2:members", "user:@a:rooms"}, true},
		{"delete uses the old image", envelope("room_memberships", "d", `{"room_id":"!r1","user_id":"@a"}`, "null"),
			[]string{"room:!r1:members", "user:@a:rooms"}, true},
		{"NULL column renders no key", envelope("room_memberships", "c", "null", `{"room_id":null,"user_id":"@a"}`),
			[]string{"user:@a:rooms"}, true},
		{"numbers render as written", envelope("room_memberships", "c", "null", `{"room_id":42,"user_id":"@a"}`),
			[]string{"room:42:members", "user:@a:rooms"}, true},
		{"read marker moved", envelope("read_markers", "u", `{"user_id":"@a","room_id":"!r1","stream_ordering":5}`, `{"user_id":"@a","room_id":"!r1","stream_ordering":6}`),
			[]string{"unread:@a:!r1"}, true},
		{"read marker unchanged column filtered", envelope("read_markers", "u", `{"user_id":"@a","room_id":"!r1","stream_ordering":5}`, `{"user_id":"@a","room_id":"!r1","stream_ordering":5}`),
			nil, true},
		{"op not in the rule", envelope("read_markers", "d", `{"user_id":"@a","room_id":"!r1"}`, "null"), nil, false},
		{"table without rules", envelope("events", "c", "null", `{"room_id":"!r1"}`), nil, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, ok := eng.Keys(env(t, c.js), nil)
			if ok != c.accept {
				t.Errorf("accepted = %v, want %v", ok, c.accept)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("keys = %q, want %q", got, c.want)
			}
		})
	}
}

func TestCompileReportsEveryProblem(t *testing.T) {
	_, err := Compile([]Rule{
		{Table: "public.nope", Keys: []string{"x"}},
		{Table: "public.room_memberships", Keys: []string{"room:{rooom_id}", "bad:{", "bad:}x", "a:{}"}, Ops: []string{"x"}, Columns: []string{"nope"}},
		{Table: "public.read_markers"},
	}, testColumns)
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{
		`invalidation.rules[0].table: "public.nope" is not a captured table`,
		`invalidation.rules[1].keys[0]: "room:{rooom_id}" uses column "rooom_id"`,
		`invalidation.rules[1].keys[1]: "bad:{": unclosed '{'`,
		`invalidation.rules[1].keys[2]: "bad:}x": unmatched '}'`,
		`invalidation.rules[1].keys[3]: "a:{}": bad column reference {}`,
		`invalidation.rules[1].ops[0]: "x" is not one of c, u, d, r`,
		`invalidation.rules[1].columns[0]: public.room_memberships has no column "nope"`,
		`invalidation.rules[2].keys: at least one key template is required`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

type recordingSink struct {
	calls [][]string
	at    [][]KeyAt
}

func (r *recordingSink) Invalidate(_ context.Context, keys []string) error {
	r.calls = append(r.calls, slices.Clone(keys))
	return nil
}
func (r *recordingSink) Close() error { return nil }

type positionedSink struct{ recordingSink }

func (p *positionedSink) InvalidateAt(_ context.Context, keys []KeyAt) error {
	p.at = append(p.at, slices.Clone(keys))
	return nil
}

func TestRuleHandlerBatchesAndDedupes(t *testing.T) {
	eng, err := Compile([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}}}, testColumns)
	if err != nil {
		t.Fatal(err)
	}
	plain, pos := &recordingSink{}, &positionedSink{}
	h := NewRuleHandler(eng, plain, pos)
	ctx := context.Background()
	for i, room := range []string{"!r1", "!r2", "!r1"} {
		e := env(t, envelope("room_memberships", "c", "null", fmt.Sprintf(`{"room_id":%q,"user_id":"@a"}`, room)))
		if err := h.Handle(ctx, &Message{Table: "public.room_memberships", Env: e, Pos: pipeline.Position{CommitLSN: 100, Seq: uint32(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if len(plain.calls) != 1 || !slices.Equal(plain.calls[0], []string{"room:!r1:members", "room:!r2:members"}) {
		t.Errorf("plain sink got %q", plain.calls)
	}
	if len(pos.at) != 1 || len(pos.calls) != 0 || pos.at[0][0].Pos.Seq != 2 || pos.at[0][1].Pos.Seq != 1 {
		t.Errorf("positioned sink got %+v (calls %q); want the latest position per key", pos.at, pos.calls)
	}
	if err := h.Flush(ctx); err != nil || len(plain.calls) != 1 {
		t.Errorf("an empty flush called the sink again")
	}
}

// pkTables: events keyed by event_id (the default identity: its primary
// key), room_memberships by (room_id, user_id), read_markers FULL.
var pkTables = map[string]Table{
	"public.events":           {Columns: []string{"event_id", "room_id", "sender"}, Identity: []string{"event_id"}},
	"public.room_memberships": {Columns: testColumns["public.room_memberships"], Identity: []string{"room_id", "user_id"}},
	"public.read_markers":     {Columns: testColumns["public.read_markers"], Identity: testColumns["public.read_markers"], Full: true},
}

// TestCompileRefusesTemplatesOldImagesLack: a template over a column that
// deletes (key-only identity) or updates (no old image) of the rule's ops
// do not carry is refused, naming the rule, the column and the fix; the
// same rule limited to inserts, on FULL, or over identity columns passes.
func TestCompileRefusesTemplatesOldImagesLack(t *testing.T) {
	refused := []struct {
		name string
		rule Rule
		want []string
		not  string
	}{
		{"delete and update", Rule{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}},
			[]string{`invalidation.rules[0] (public.events): its templates use column(s) room_id`, "a DELETE's old image carries only the replica identity",
				"an UPDATE carries no old image", "replica identity: event_id", "fix: ALTER TABLE public.events REPLICA IDENTITY FULL; or limit the rule to ops: [c]"}, ""},
		{"delete only", Rule{Table: "public.events", Keys: []string{"room:{room_id}:timeline", "event:{event_id}"}, Ops: []string{"c", "d"}},
			[]string{"column(s) room_id,", "a DELETE's old image", "ALTER TABLE public.events REPLICA IDENTITY FULL"}, "UPDATE"},
		{"update only", Rule{Table: "public.events", Keys: []string{"sender:{sender}"}, Ops: []string{"u"}},
			[]string{"column(s) sender,", "an UPDATE carries no old image unless an identity column changes"}, "DELETE"},
	}
	for _, c := range refused {
		t.Run(c.name, func(t *testing.T) {
			_, err := CompileTables([]Rule{c.rule}, pkTables, true)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if c.not != "" && strings.Contains(err.Error(), c.not) {
				t.Errorf("error mentions %s, which the rule does not cover:\n%v", c.not, err)
			}
		})
	}
	full := map[string]Table{"public.events": {Columns: pkTables["public.events"].Columns, Identity: pkTables["public.events"].Columns, Full: true}}
	for _, c := range []struct {
		name   string
		rule   Rule
		tables map[string]Table
	}{
		{"inserts only", Rule{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}, Ops: []string{"c", "r"}}, pkTables},
		{"identity columns", Rule{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members", "user:{user_id}:rooms"}}, pkTables},
		{"full identity", Rule{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}}, full},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := CompileTables([]Rule{c.rule}, c.tables, true); err != nil {
				t.Errorf("refused: %v", err)
			}
		})
	}
}

// TestCompileOnTruncate: on_truncate values, its default and that
// flush_pattern needs a pattern sink.
func TestCompileOnTruncate(t *testing.T) {
	r := Rule{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}}
	bad := r
	bad.OnTruncate = "drop"
	if _, err := CompileTables([]Rule{bad}, pkTables, true); err == nil || !strings.Contains(err.Error(), `invalidation.rules[0].on_truncate: "drop" is not one of flush_pattern, dlq, ignore`) {
		t.Errorf("bad value: %v", err)
	}
	fp := r
	fp.OnTruncate = TruncateFlushPattern
	if _, err := CompileTables([]Rule{fp}, pkTables, false); err == nil || !strings.Contains(err.Error(), "flush_pattern needs invalidation.redis") {
		t.Errorf("flush_pattern without Redis: %v", err)
	}
	for _, c := range []struct {
		redis bool
		want  TruncateAction
	}{{true, TruncateAction{Patterns: []string{"room:*:members"}}}, {false, TruncateAction{DLQ: []string{"invalidation.rules[0]"}}}} {
		eng, err := CompileTables([]Rule{r}, pkTables, c.redis)
		if err != nil {
			t.Fatal(err)
		}
		if got := eng.Truncate("public.room_memberships"); !slices.Equal(got.Patterns, c.want.Patterns) || !slices.Equal(got.DLQ, c.want.DLQ) {
			t.Errorf("redis %v: default action %+v, want %+v", c.redis, got, c.want)
		}
	}
}

func TestTemplatePattern(t *testing.T) {
	for in, want := range map[string]string{
		"room:{room_id}:members":  "room:*:members",
		"unread:{user_id}:{room}": "unread:*:*",
		`odd*?[x]\\:{id}`:         `odd\*\?\[x\]\\\\:*`,
		"plain":                   "plain",
	} {
		tm, err := parseTemplate(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := tm.pattern(); got != want {
			t.Errorf("pattern(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestResolveUnfillableChange: a change a rule accepts whose images lack a
// column of every template (a delete under a key-only identity, as
// Compile without identities lets through) is an error naming the rule and
// the column, and Handle marks it Permanent; a NULL column is no error.
func TestResolveUnfillableChange(t *testing.T) {
	eng, err := Compile([]Rule{{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}}},
		map[string][]string{"public.events": {"event_id", "room_id"}})
	if err != nil {
		t.Fatal(err)
	}
	del := env(t, envelope("events", "d", `{"event_id":"$e1"}`, "null"))
	keys, ok, err := eng.Resolve(del, nil)
	if err == nil || !ok || len(keys) != 0 {
		t.Fatalf("Resolve = %q, %v, %v; want an error", keys, ok, err)
	}
	for _, w := range []string{"invalidation.rules[0] (public.events)", `op "d"`, `column "room_id"`, "REPLICA IDENTITY FULL"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
	h := NewRuleHandler(eng)
	if err := h.Handle(context.Background(), &Message{Table: "public.events", Env: del}); !IsPermanent(err) {
		t.Errorf("Handle = %v, want a Permanent error", err)
	}
	if _, _, err := eng.Resolve(env(t, envelope("events", "c", "null", `{"event_id":"$e2","room_id":null}`)), nil); err != nil {
		t.Errorf("a NULL column: %v", err)
	}
}

type patternSink struct {
	recordingSink
	patterns [][]string
	fail     int // calls to fail first
}

func (p *patternSink) InvalidatePattern(_ context.Context, patterns []string) (int, error) {
	if p.fail > 0 {
		p.fail--
		return 0, errors.New("redis down")
	}
	p.patterns = append(p.patterns, slices.Clone(patterns))
	return 1, nil
}

// TestRuleHandlerExclusionsAndTruncates: an op the rules exclude is a
// counted skip; a truncate does its on_truncate action once per position
// (every partition delivers it), again for a later truncate.
func TestRuleHandlerExclusionsAndTruncates(t *testing.T) {
	ctx := context.Background()
	eng, err := CompileTables([]Rule{
		{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members", "user:{user_id}:rooms"}},
		{Table: "public.read_markers", Keys: []string{"unread:{user_id}:{room_id}"}, Ops: []string{"c", "u"}, OnTruncate: TruncateDLQ},
		{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}, Ops: []string{"c"}, OnTruncate: TruncateIgnore},
	}, pkTables, true)
	if err != nil {
		t.Fatal(err)
	}
	ps := &patternSink{fail: 1}
	h := NewRuleHandler(eng, ps)
	handle := func(table, op string, lsn uint64) error {
		t.Helper()
		_, name, _ := strings.Cut(table, ".")
		e := env(t, envelope(name, op, `{"user_id":"@a","room_id":"!r1"}`, "null"))
		return h.Handle(ctx, &Message{Table: table, Env: e, Pos: pipeline.Position{CommitLSN: pipeline.LSN(lsn)}})
	}
	var skip *SkipError
	if err := handle("public.read_markers", "d", 10); !errors.As(err, &skip) || skip.Reason != SkipOpExcluded {
		t.Errorf("excluded delete: %v, want Skip(%s)", err, SkipOpExcluded)
	}
	if len(h.pending) != 0 {
		t.Errorf("excluded delete collected keys %q", h.pending)
	}
	for part := 0; part < 3; part++ { // one truncate, from three partitions
		err := handle("public.room_memberships", "t", 20)
		switch {
		case part == 0 && err != nil:
			t.Errorf("truncate: %v", err)
		case part > 0 && (!errors.As(err, &skip) || skip.Reason != SkipTruncateDuplicate):
			t.Errorf("truncate again from partition %d: %v, want Skip(%s)", part, err, SkipTruncateDuplicate)
		}
	}
	// The patterns travel with the batch through the sink's queue: the
	// first delivery fails (the sink is down), the retry deletes them once.
	if len(ps.patterns) != 0 {
		t.Errorf("patterns flushed in Handle, before the batch: %q", ps.patterns)
	}
	if err := h.Flush(ctx); err == nil {
		t.Error("Flush with the pattern sink down returned nil")
	}
	if err := h.Flush(ctx); err != nil {
		t.Errorf("Flush after the sink is back: %v", err)
	}
	want := [][]string{{"room:*:members", "user:*:rooms"}}
	if !slices.EqualFunc(ps.patterns, want, slices.Equal) {
		t.Errorf("pattern flushes %q, want %q (once, after a failed attempt)", ps.patterns, want)
	}
	if err := handle("public.room_memberships", "t", 30); err != nil {
		t.Errorf("a later truncate: %v", err)
	}
	if err := h.Flush(ctx); err != nil || len(ps.patterns) != 2 {
		t.Errorf("a later truncate: Flush %v, flushes %q", err, ps.patterns)
	}
	if err := handle("public.read_markers", "t", 20); !IsPermanent(err) || !strings.Contains(err.Error(), "on_truncate: dlq (invalidation.rules[1])") {
		t.Errorf("on_truncate dlq: %v", err)
	}
	if err := handle("public.read_markers", "t", 20); !errors.As(err, &skip) || skip.Reason != SkipTruncateDuplicate {
		t.Errorf("on_truncate dlq, again: %v, want one dead letter", err)
	}
	if err := handle("public.events", "t", 20); !errors.As(err, &skip) || skip.Reason != SkipTruncateIgnored {
		t.Errorf("on_truncate ignore: %v", err)
	}
}

// BenchmarkRuleEngine: change -> keys for a membership change with two
// templates and both images.
func BenchmarkRuleEngine(b *testing.B) {
	eng, err := Compile([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members", "user:{user_id}:rooms"}}}, testColumns)
	if err != nil {
		b.Fatal(err)
	}
	e := env(b, envelope("room_memberships", "u", `{"room_id":"!r1:example.org","user_id":"@alice:example.org"}`,
		`{"room_id":"!r2:example.org","user_id":"@alice:example.org","membership":"join","event_id":"$abc"}`))
	var keys []string
	b.ReportAllocs()
	for b.Loop() {
		keys, _ = eng.Keys(e, keys[:0])
	}
	if len(keys) != 3 {
		b.Fatalf("keys %q", keys)
	}
}

// TestTruncateDoesNotHoldOtherSinks: a truncate's pattern flush goes
// through the sinks' queues like keys, so a Redis that is down holds only
// itself: another sink still receives the batch's keys, and Handle does
// not wait for Redis (before, it retried the pattern flush inside Handle,
// stalling every sink for the outage).
func TestTruncateDoesNotHoldOtherSinks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	eng, err := CompileTables([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}}}, pkTables, true)
	if err != nil {
		t.Fatal(err)
	}
	ps := &patternSink{fail: 1 << 30}
	other := &recordingSink{}
	h := NewRuleHandler(eng, ps, other)
	trunc := env(t, envelope("room_memberships", "t", "null", "null"))
	if err := h.Handle(ctx, &Message{Table: "public.room_memberships", Env: trunc, Pos: pipeline.Position{CommitLSN: 20}}); err != nil {
		t.Fatalf("truncate with the pattern sink down: %v", err)
	}
	ins := env(t, envelope("room_memberships", "c", `{"room_id":"!r1","user_id":"@a"}`, "null"))
	if err := h.Handle(ctx, &Message{Table: "public.room_memberships", Env: ins, Pos: pipeline.Position{CommitLSN: 30}}); err != nil {
		t.Fatal(err)
	}
	if err := h.Flush(ctx); err == nil {
		t.Error("Flush with the pattern sink down returned nil")
	}
	if ctx.Err() != nil {
		t.Fatal("the truncate waited for the pattern sink")
	}
	if want := [][]string{{"room:!r1:members"}}; !slices.EqualFunc(other.calls, want, slices.Equal) {
		t.Errorf("the other sink got %q, want %q", other.calls, want)
	}
}

// TestRuleHandlerKeepsNewestPosition: one batch mixes partitions, so a key
// can arrive from a lagging partition after a newer change of it; the
// batch carries the newest position (a versioned Redis marker written with
// the older one would keep a reader's token valid across the newer change).
func TestRuleHandlerKeepsNewestPosition(t *testing.T) {
	eng, err := Compile([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}}}, testColumns)
	if err != nil {
		t.Fatal(err)
	}
	pos := &positionedSink{}
	h := NewRuleHandler(eng, pos)
	ctx := context.Background()
	for _, lsn := range []pipeline.LSN{30, 20} { // partition 1's change, then partition 0's older one
		e := env(t, envelope("room_memberships", "c", "null", `{"room_id":"!r1","user_id":"@a"}`))
		if err := h.Handle(ctx, &Message{Table: "public.room_memberships", Env: e, Pos: pipeline.Position{CommitLSN: lsn}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if len(pos.at) != 1 || len(pos.at[0]) != 1 || pos.at[0][0].Pos.CommitLSN != 30 {
		t.Fatalf("sink got %+v, want room:!r1:members at 30", pos.at)
	}
}

// TestSnapshotRowsIgnoredByDefault: a snapshot row (op r) invalidates
// nothing under the default ops (c, u, d): nothing was cached from a state
// Tidemark had not seen yet; the handler counts it as op_excluded. A rule
// whose ops list r invalidates its keys.
func TestSnapshotRowsIgnoredByDefault(t *testing.T) {
	snap := env(t, envelope("room_memberships", "r", "null", `{"room_id":"!r1","user_id":"@a","membership":"join"}`))
	eng, err := Compile([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}}}, testColumns)
	if err != nil {
		t.Fatal(err)
	}
	if keys, ok, err := eng.Resolve(snap, nil); ok || err != nil || len(keys) != 0 {
		t.Errorf("default ops: snapshot row resolved to %v (accepted %v, %v), want excluded", keys, ok, err)
	}
	h := NewRuleHandler(eng, &recordingSink{})
	var skip *SkipError
	if err := h.Handle(context.Background(), &Message{Env: snap, Table: "public.room_memberships"}); !errors.As(err, &skip) || skip.Reason != SkipOpExcluded {
		t.Errorf("handler: %v, want Skip(%s)", err, SkipOpExcluded)
	}
	eng, err = Compile([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}, Ops: []string{"c", "u", "d", "r"}}}, testColumns)
	if err != nil {
		t.Fatal(err)
	}
	if keys, ok, err := eng.Resolve(snap, nil); !ok || err != nil || strings.Join(keys, ",") != "room:!r1:members" {
		t.Errorf("ops with r: snapshot row resolved to %v (accepted %v, %v), want room:!r1:members", keys, ok, err)
	}
}
