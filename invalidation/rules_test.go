package invalidation

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

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
	bad := env(t, envelope("room_memberships", "t", "null", "null"))
	if err := h.Handle(ctx, &Message{Table: "public.room_memberships", Env: bad}); err == nil {
		t.Error("a truncate was accepted by a rule without op t")
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
