package integrity

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/internal/pgserver"
)

// countQueries is a pgx tracer counting statements.
type countQueries struct{ n atomic.Int64 }

func (q *countQueries) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	q.n.Add(1)
	return ctx
}
func (q *countQueries) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// TestOrphanConfirmedInOneStatement: an orphan (its parent present, its
// related row gone) is confirmed by one statement holding both EXISTS, so
// both are read in one snapshot; the answer is exact per key.
func TestOrphanConfirmedInOneStatement(t *testing.T) {
	cfg, err := pgxpool.ParseConfig(pgserver.ForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	tr := &countQueries{}
	cfg.ConnConfig.Tracer = tr
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
CREATE TABLE events (event_id text PRIMARY KEY, room_id text, sender text, type text, stream_ordering bigint, origin_ts bigint);
CREATE TABLE event_json (event_id text PRIMARY KEY, room_id text, json text);
INSERT INTO events(event_id) VALUES ('$orphan'), ('$healed');
INSERT INTO event_json(event_id) VALUES ('$healed'), ('$parentless');`); err != nil {
		t.Fatal(err)
	}
	rules := DefaultRules()[:1] // events_have_json, reverse
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, canonicalSchema())
	if err != nil {
		t.Fatal(err)
	}
	c := NewChecker(eng, nil, NewProber(pool, 1000, 100), Options{Group: "probe"}, nil, nil)
	var due []*pend
	for _, id := range []string{"$orphan", "$healed", "$parentless", "$neither"} {
		due = append(due, &pend{item: item{Rule: "events_have_json", Kind: KindOrphaned, Match: []string{id}}})
	}
	before := tr.n.Load()
	got, err := c.confirm(ctx, due)
	if err != nil {
		t.Fatal(err)
	}
	if n := tr.n.Load() - before; n != 1 {
		t.Errorf("confirming 4 orphans took %d statements, want 1", n)
	}
	want := []bool{true, false, false, false}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("%s: orphaned %v, want %v", due[i].Match[0], got[i], want[i])
		}
	}
}
