package targets

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/pipeline"
)

func posAt(lsn uint64) pipeline.Position {
	return pipeline.Position{CommitLSN: pipeline.LSN(lsn), Seq: 1}
}

func count(t *testing.T, pool *pgxpool.Pool, table string) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), "SELECT count(*) FROM tidemark."+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestPrune: below the watermark, memberships that are not joined, active
// users and empty settled rooms are deleted; joined memberships,
// deactivated users and anything at or above the watermark stay; a pruned
// room that comes back continues above its old version.
func TestPrune(t *testing.T) {
	s, pool := newTestStore(t)
	ctx := context.Background()
	settle := func(rooms ...string) []RoomUpdate {
		t.Helper()
		ups, err := s.Settle(ctx, rooms, nil, func(context.Context, []RoomUpdate) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		return ups
	}
	apply := func(ms []MemberFact, us []UserFact) {
		t.Helper()
		if _, err := s.Apply(ctx, ms, us, nil, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	apply([]MemberFact{
		{Room: "!a", User: "@stay", Membership: "join", Joined: true, Pos: posAt(10)},
		{Room: "!a", User: "@left", Membership: "join", Joined: true, Pos: posAt(10)},
		{Room: "!gone", User: "@x", Membership: "join", Joined: true, Pos: posAt(10)},
	}, []UserFact{{User: "@active", Active: true, Pos: posAt(12)}, {User: "@off", Active: false, Pos: posAt(12)}})
	settle("!a", "!gone")
	apply([]MemberFact{
		{Room: "!a", User: "@left", Membership: "leave", Pos: posAt(20)},
		{Room: "!gone", User: "@x", Membership: "leave", Pos: posAt(20)},
	}, nil)
	ups := settle("!a", "!gone")
	var goneVersion uint64
	for _, u := range ups {
		if u.Room == "!gone" {
			goneVersion = u.Version
		}
	}
	if goneVersion == 0 {
		t.Fatalf("no update of !gone: %+v", ups)
	}
	apply([]MemberFact{{Room: "!a", User: "@late", Membership: "leave", Pos: posAt(40)}}, nil)
	settle("!a")

	// Below 20 only the active user's fact (12) goes; the leaves at 20
	// stay.
	rep, err := s.Prune(ctx, posAt(20))
	if err != nil {
		t.Fatal(err)
	}
	if rep != (PruneReport{Users: 1}) || count(t, pool, "notify_memberships") != 4 {
		t.Fatalf("below 20: %+v, %d memberships; want only the active user pruned", rep, count(t, pool, "notify_memberships"))
	}
	rep, err = s.Prune(ctx, posAt(30))
	if err != nil {
		t.Fatal(err)
	}
	if rep != (PruneReport{Memberships: 2, Rooms: 1}) {
		t.Fatalf("below 30: %+v; want the two leaves at 20 and room !gone", rep)
	}
	if n := count(t, pool, "notify_memberships"); n != 2 {
		t.Fatalf("%d memberships left, want @stay (joined) and @late (at 40)", n)
	}
	if n := count(t, pool, "notify_users"); n != 1 {
		t.Fatalf("%d users left, want the deactivated one", n)
	}
	if n := count(t, pool, "notify_rooms"); n != 1 {
		t.Fatalf("%d rooms left, want !a", n)
	}
	// The kept facts still guard against older changes: the deactivated
	// user stays deactivated and the late leave wins over an older join.
	apply([]MemberFact{{Room: "!a", User: "@late", Membership: "join", Joined: true, Pos: posAt(35)}}, nil)
	for _, u := range settle("!a") {
		for _, id := range u.Users {
			if id == "@late" {
				t.Fatalf("an older join resurrected @late: %+v", u)
			}
		}
	}
	// !gone comes back: its versions continue above the pruned one.
	apply([]MemberFact{{Room: "!gone", User: "@y", Membership: "join", Joined: true, Pos: posAt(50)}}, nil)
	ups = settle("!gone")
	if len(ups) != 1 || ups[0].Version <= goneVersion {
		t.Fatalf("!gone back with %+v, want a version above %d", ups, goneVersion)
	}
}

// TestPruneSkipsLockedRows: a room row, membership or user another
// transaction holds locked (a settlement, a batch) is left for a later
// round: Prune neither waits for the lock nor deletes the row.
func TestPruneSkipsLockedRows(t *testing.T) {
	s, pool := newTestStore(t)
	ctx := context.Background()
	if _, err := s.Apply(ctx, []MemberFact{{Room: "!e", User: "@x", Membership: "join", Joined: true, Pos: posAt(10)}},
		[]UserFact{{User: "@x", Active: true, Pos: posAt(10)}}, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Settle(ctx, []string{"!e"}, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply(ctx, []MemberFact{{Room: "!e", User: "@x", Membership: "leave", Pos: posAt(20)}}, nil, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Settle(ctx, []string{"!e"}, nil, nil); err != nil {
		t.Fatal(err)
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	for _, q := range []string{
		`SELECT 1 FROM tidemark.notify_rooms WHERE room_id = '!e' FOR UPDATE`,
		`SELECT 1 FROM tidemark.notify_memberships WHERE room_id = '!e' FOR UPDATE`,
		`SELECT 1 FROM tidemark.notify_users WHERE user_id = '@x' FOR UPDATE`,
	} {
		if _, err := tx.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	rep, err := s.Prune(pctx, posAt(30))
	cancel()
	if err != nil {
		t.Fatalf("Prune with the rows locked elsewhere: %v (it waited for the locks)", err)
	}
	if rep != (PruneReport{}) {
		t.Fatalf("pruned locked rows: %+v", rep)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	rep, err = s.Prune(ctx, posAt(30))
	if err != nil || rep != (PruneReport{Memberships: 1, Users: 1, Rooms: 1}) {
		t.Fatalf("after the locks are gone: %+v, %v; want one of each", rep, err)
	}
}
