package pipeline

import (
	"strings"
	"testing"
	"time"
)

// Capture builds a new *Relation for every Relation message (after each
// reconnect and each DDL): the router's cache keeps one entry per table and
// follows the latest shape.
func TestRouterCacheStaysOnePerTable(t *testing.T) {
	r, st, ch := benchChange()
	now := time.Now()
	for i := 0; i < 1000; i++ {
		rel := *ch.Rel // a fresh *Relation of the same table, as after a reconnect
		rel.OID = 16384
		c := *ch
		c.Rel = &rel
		if _, err := r.encodeChange(nil, st, &c, now); err != nil {
			t.Fatal(err)
		}
	}
	// After DDL: the same table with one more column.
	rel := *ch.Rel
	rel.OID = 16384
	rel.Columns = append(append([]Column(nil), rel.Columns...), Column{Name: "added", TypeOID: 25})
	c := *ch
	c.Rel = &rel
	c.After = append(append(Tuple(nil), ch.After...), Datum{Value: "new column"})
	msgs, err := r.encodeChange(nil, st, &c, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.cache) != 1 {
		t.Fatalf("router cache holds %d entries for one table after 1,001 Relation messages", len(r.cache))
	}
	if len(msgs) == 0 || !strings.Contains(string(msgs[0].Value), `"added":"new column"`) {
		t.Fatalf("after the shape changed the envelope is %s", msgs[0].Value)
	}
}
