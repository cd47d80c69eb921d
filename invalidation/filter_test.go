package invalidation

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

// TestRuleFilter: a rule applies to a change when its before or its after
// image matches its filter (an image lacking a filter column matches when
// the missing value could); a change every accepting rule filters out is
// skipped with reason filtered, not op_excluded; a filter is checked
// against the table's columns.
func TestRuleFilter(t *testing.T) {
	cols := map[string][]string{"public.current_state_events": {"room_id", "type", "state_key", "membership"}}
	eng, err := Compile([]Rule{
		{Table: "public.current_state_events", Keys: []string{"room:{room_id}:members"},
			Filter: "type = 'm.room.member' AND state_key LIKE '%:example.org'"},
		{Table: "public.current_state_events", Keys: []string{"room:{room_id}:name"}, Filter: "type = 'm.room.name'", Ops: []string{"c", "u"}},
	}, cols)
	if err != nil {
		t.Fatal(err)
	}
	h := NewRuleHandler(eng, &recordingSink{})
	cases := []struct {
		name, op, before, after string
		keys                    []string
		skip                    string
	}{
		{"local member joins", "c", "null", `{"room_id":"!r","type":"m.room.member","state_key":"@a:example.org","membership":"join"}`, []string{"room:!r:members"}, ""},
		{"remote member joins", "c", "null", `{"room_id":"!r","type":"m.room.member","state_key":"@a:other.org","membership":"join"}`, nil, SkipFiltered},
		{"name changes", "u", `{"room_id":"!r","type":"m.room.name","state_key":"","membership":null}`, `{"room_id":"!r","type":"m.room.name","state_key":"","membership":null}`, []string{"room:!r:name"}, ""},
		{"a row leaves the filtered set", "u", `{"room_id":"!r","type":"m.room.member","state_key":"@a:example.org","membership":"join"}`,
			`{"room_id":"!r","type":"m.room.member","state_key":"@a:other.org","membership":"join"}`, []string{"room:!r:members"}, ""},
		{"key-only delete", "d", `{"room_id":"!r"}`, "null", []string{"room:!r:members"}, ""},
		{"full delete filtered out", "d", `{"room_id":"!r","type":"m.room.topic","state_key":"","membership":null}`, "null", nil, SkipFiltered},
		{"NULL state_key", "c", "null", `{"room_id":"!r","type":"m.room.member","state_key":null,"membership":null}`, nil, SkipFiltered},
	}
	for _, c := range cases {
		h.pending, h.seen, h.at = nil, map[string]int{}, nil
		e := env(t, envelope("current_state_events", c.op, c.before, c.after))
		err := h.Handle(context.Background(), &Message{Table: "public.current_state_events", Env: e, Pos: pipeline.Position{CommitLSN: 1}})
		var skip *SkipError
		switch {
		case c.skip != "" && (!errors.As(err, &skip) || skip.Reason != c.skip):
			t.Errorf("%s: %v, want Skip(%s)", c.name, err, c.skip)
		case c.skip == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		}
		if !slices.Equal(h.pending, c.keys) {
			t.Errorf("%s: keys %q, want %q", c.name, h.pending, c.keys)
		}
	}
	// A filter must parse and read only the table's columns.
	_, err = Compile([]Rule{{Table: "public.current_state_events", Keys: []string{"k:{room_id}"}, Filter: "kind = 1"},
		{Table: "public.current_state_events", Keys: []string{"k:{room_id}"}, Filter: "type ="}}, cols)
	for _, want := range []string{
		`invalidation.rules[0].filter: public.current_state_events has no column "kind"`,
		`invalidation.rules[1].filter: "type =": at offset 6: expected a literal`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Compile error lacks %q: %v", want, err)
		}
	}
}
