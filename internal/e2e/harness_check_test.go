package e2e

import (
	"strings"
	"testing"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// TestKeyOrderProblems checks the e2e order validator itself on
// hand-built records: each case's violation must be reported, and only it.
func TestKeyOrderProblems(t *testing.T) {
	rec := func(part int, off int64, key string, lsn pipeline.LSN, seq uint32, op string) msg {
		m := msg{Record: kafkatest.Record{Partition: part, Offset: off}, Pos: pipeline.Position{CommitLSN: lsn, Seq: seq}}
		if key != "" {
			m.Key = []byte(key)
		}
		m.Env.Op = op
		return m
	}
	cases := []struct {
		name   string
		parts  int
		replay bool
		ms     []msg
		want   []string // a fragment per expected problem, in order
	}{
		{name: "in order", parts: 2, ms: []msg{
			rec(0, 0, "a", 10, 0, "c"), rec(0, 1, "a", 20, 0, "u"), rec(1, 0, "b", 10, 1, "c"),
		}},
		{name: "key out of order", parts: 1, ms: []msg{
			rec(0, 0, "a", 20, 0, "c"), rec(0, 1, "a", 10, 0, "u"),
		}, want: []string{"key a position 10:0 arrived after 20:0"}},
		{name: "key in two partitions", parts: 2, ms: []msg{
			rec(0, 0, "a", 10, 0, "c"), rec(1, 0, "a", 20, 0, "u"),
		}, want: []string{"key a in partitions 0 and 1"}},
		{name: "repeat without replay", parts: 1, ms: []msg{
			rec(0, 0, "a", 10, 0, "c"), rec(0, 1, "a", 10, 0, "c"),
		}, want: []string{"key a position 10:0 arrived after 10:0"}},
		{name: "repeat with replay", parts: 1, replay: true, ms: []msg{
			rec(0, 0, "a", 10, 0, "c"), rec(0, 1, "a", 20, 0, "u"), rec(0, 2, "a", 10, 0, "c"), rec(0, 3, "a", 20, 0, "u"),
		}},
		{name: "new position after a later one, with replay", parts: 1, replay: true, ms: []msg{
			rec(0, 0, "a", 20, 0, "c"), rec(0, 1, "a", 10, 0, "u"),
		}, want: []string{"key a position 10:0 arrived after 20:0"}},
		{name: "truncate in every partition", parts: 2, ms: []msg{
			rec(0, 0, "a", 10, 0, "c"), rec(0, 1, "", 20, 0, "t"), rec(1, 0, "", 20, 0, "t"), rec(1, 1, "b", 30, 0, "c"),
		}},
		{name: "truncate missing from a partition", parts: 3, ms: []msg{
			rec(0, 0, "", 20, 0, "t"), rec(2, 0, "", 20, 0, "t"),
		}, want: []string{"truncate at 20:0 missing from partition 1 of 3"}},
		{name: "older change of another key after a truncate", parts: 1, ms: []msg{
			rec(0, 0, "", 20, 0, "t"), rec(0, 1, "b", 10, 0, "c"),
		}, want: []string{"key b position 10:0 arrived after the truncate at 20:0"}},
		{name: "truncate after a newer change of another key", parts: 1, ms: []msg{
			rec(0, 0, "b", 30, 0, "c"), rec(0, 1, "", 20, 0, "t"),
		}, want: []string{"truncate at 20:0 arrived after 30:0"}},
		{name: "truncate twice without replay", parts: 1, ms: []msg{
			rec(0, 0, "", 20, 0, "t"), rec(0, 1, "", 20, 0, "t"),
		}, want: []string{"truncate at 20:0 twice in partition 0"}},
		{name: "truncate replayed", parts: 1, replay: true, ms: []msg{
			rec(0, 0, "a", 10, 0, "c"), rec(0, 1, "", 20, 0, "t"), rec(0, 2, "a", 10, 0, "c"), rec(0, 3, "", 20, 0, "t"), rec(0, 4, "a", 30, 0, "c"),
		}},
		{name: "truncate with a key", parts: 1, ms: []msg{
			rec(0, 0, "k", 20, 0, "t"),
		}, want: []string{"truncate at 20:0 has key k"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := keyOrderProblems("topic", c.parts, c.ms, c.replay)
			if len(got) != len(c.want) {
				t.Fatalf("problems %q, want %d matching %q", got, len(c.want), c.want)
			}
			for i, w := range c.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("problem %d = %q, want it to contain %q", i, got[i], w)
				}
			}
		})
	}
}
