package targets

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

// TestDeltaSettleMatchesTruth drives the store with random membership and
// user facts (replays and out-of-order positions included, a truncate now
// and then) and settles random subsets of the dirty rooms. After every
// settlement each settled room's kept targets equal what its facts say
// (joined and active), the published changes applied one after another
// rebuild exactly that set, a full update's list equals it, and Count is
// its size. FullSetMax is small, so rooms cross between carrying their set
// and being large (Partial) both ways.
func TestDeltaSettleMatchesTruth(t *testing.T) {
	s, pool := newTestStore(t)
	s.FullSetMax = 4
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 11))
	rooms := []string{"!a", "!b", "!c", "!d"}
	users := make([]string, 12)
	for i := range users {
		users[i] = fmt.Sprintf("@u%02d", i)
	}
	model := map[string]map[string]bool{} // what the published updates say
	versions := map[string]uint64{}
	partials, fulls := 0, 0
	publish := func(_ context.Context, ups []RoomUpdate) error {
		for _, u := range ups {
			if u.Version != versions[u.Room]+1 {
				return fmt.Errorf("room %s: version %d after %d", u.Room, u.Version, versions[u.Room])
			}
			versions[u.Room] = u.Version
			m := model[u.Room]
			if m == nil {
				m = map[string]bool{}
				model[u.Room] = m
			}
			for _, c := range u.Changes {
				if c.Added {
					m[c.User] = true
				} else {
					delete(m, c.User)
				}
			}
			if len(m) != u.Count {
				return fmt.Errorf("room %s version %d: Count %d, changes give %d", u.Room, u.Version, u.Count, len(m))
			}
			if u.Partial {
				partials++
				if u.Users != nil || u.Count <= s.fullSetMax() {
					return fmt.Errorf("room %s version %d: partial with %d users listed, count %d", u.Room, u.Version, len(u.Users), u.Count)
				}
				continue
			}
			fulls++
			if !slices.Equal(u.Users, sortedKeys(m)) {
				return fmt.Errorf("room %s version %d: users %v, changes give %v", u.Room, u.Version, u.Users, sortedKeys(m))
			}
		}
		return nil
	}
	lsn := pipeline.LSN(1000)
	for step := 0; step < 400; step++ {
		var members []MemberFact
		var us []UserFact
		var truncM, truncU *pipeline.Position
		for n := rng.IntN(6); n >= 0; n-- {
			lsn += pipeline.LSN(1 + rng.IntN(3))
			pos := pipeline.Position{CommitLSN: lsn}
			if rng.IntN(5) == 0 {
				pos.CommitLSN -= pipeline.LSN(rng.IntN(20)) // older than what may be stored: a replay or another partition
			}
			switch k := rng.IntN(20); {
			case k < 13:
				mem := []string{"join", "join", "leave", "ban", "invite"}[rng.IntN(5)]
				members = append(members, MemberFact{Room: rooms[rng.IntN(len(rooms))], User: users[rng.IntN(len(users))],
					Membership: mem, Joined: mem == "join", Pos: pos})
			case k < 19:
				us = append(us, UserFact{User: users[rng.IntN(len(users))], Active: rng.IntN(3) > 0, Pos: pos})
			case rng.IntN(2) == 0:
				truncM = &pos
			default:
				truncU = &pos
			}
		}
		if _, err := s.Apply(ctx, members, us, truncM, truncU, nil); err != nil {
			t.Fatal(err)
		}
		dirty, err := s.DirtyRooms(ctx, 100)
		if err != nil {
			t.Fatal(err)
		}
		var pick []string
		for _, r := range dirty {
			if rng.IntN(3) > 0 {
				pick = append(pick, r)
			}
		}
		if _, err := s.Settle(ctx, pick, nil, publish); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		kept, err := s.Kept(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range pick {
			rows, err := pool.Query(ctx, `SELECT m.user_id FROM tidemark.notify_memberships m LEFT JOIN tidemark.notify_users u USING (user_id)
WHERE m.room_id = $1 AND m.joined AND coalesce(u.active, true) ORDER BY 1`, r)
			if err != nil {
				t.Fatal(err)
			}
			var truth []string
			for rows.Next() {
				var u string
				if err := rows.Scan(&u); err != nil {
					t.Fatal(err)
				}
				truth = append(truth, u)
			}
			rows.Close()
			if got := sortedKeys(kept[r]); !slices.Equal(got, truth) {
				t.Fatalf("step %d room %s: kept %v, facts say %v", step, r, got, truth)
			}
			if got := sortedKeys(model[r]); !slices.Equal(got, truth) {
				t.Fatalf("step %d room %s: published changes give %v, facts say %v", step, r, got, truth)
			}
			var members int
			var full bool
			if err := pool.QueryRow(ctx, `SELECT members, full_settle FROM tidemark.notify_rooms WHERE room_id = $1`, r).Scan(&members, &full); err != nil {
				t.Fatal(err)
			}
			if members != len(truth) || full {
				t.Fatalf("step %d room %s: notify_rooms members %d full_settle %v, want %d false", step, r, members, full, len(truth))
			}
		}
	}
	var left int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM tidemark.notify_rooms WHERE NOT dirty AND (touched IS NOT NULL OR full_settle)`).Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Errorf("%d settled rooms keep touched users or full_settle", left)
	}
	// More touched users than maxTouched: settled in full, not listed.
	var many []MemberFact
	for i := 0; i <= maxTouched; i++ {
		lsn++
		many = append(many, MemberFact{Room: "!a", User: fmt.Sprintf("@many%04d", i), Membership: "join", Joined: true, Pos: pipeline.Position{CommitLSN: lsn}})
	}
	if _, err := s.Apply(ctx, many[:10], nil, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply(ctx, many[10:], nil, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	var full bool
	var listed int
	if err := pool.QueryRow(ctx, `SELECT full_settle, coalesce(cardinality(touched), 0) FROM tidemark.notify_rooms WHERE room_id = '!a'`).Scan(&full, &listed); err != nil {
		t.Fatal(err)
	}
	if !full || listed != 0 {
		t.Fatalf("%d touched users: full_settle %v with %d listed, want full and none listed", maxTouched+1, full, listed)
	}
	if _, err := s.Settle(ctx, []string{"!a"}, nil, publish); err != nil {
		t.Fatal(err)
	}
	if kept, err := s.Kept(ctx, []string{"!a"}); err != nil || len(kept["!a"]) < maxTouched+1 {
		t.Fatalf("after the full settlement !a keeps %d (%v)", len(kept["!a"]), err)
	}
	if partials == 0 || fulls == 0 {
		t.Errorf("%d partial and %d full updates: the test did not exercise both", partials, fulls)
	}
	t.Logf("%d full and %d partial updates", fulls, partials)
}

// TestDeactivationSettledInSlices: a deactivation touching many rooms is
// settled MaxSettleRooms at a time; a change in another room that arrives
// meanwhile is settled in the next Flush, ahead of the rest of the
// backlog, and the backlog is finished by later Flushes or ticks.
func TestDeactivationSettledInSlices(t *testing.T) {
	s, _ := newTestStore(t)
	r := &recorder{}
	h, err := NewHandler(HandlerConfig{Store: s, Publish: r.publish, MaxSettleRooms: 10}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var joins []*invalidation.Message
	for i := 0; i < 35; i++ {
		joins = append(joins, change("room_memberships", "c", nil, membership(fmt.Sprintf("!r%02d", i), "@d", "join"), 100, uint32(i)))
	}
	batch(t, h, joins...)
	for h.Stats().PendingRooms.Load() > 0 {
		batch(t, h)
	}
	r.take()
	batch(t, h, change("users", "c", nil, userRow("@d", true), 200, 0))
	if got := len(r.take()); got != 10 {
		t.Fatalf("the deactivation's Flush settled %d rooms, want 10 (the budget)", got)
	}
	batch(t, h, change("room_memberships", "c", nil, membership("!other", "@o", "join"), 300, 0))
	got := r.take()
	if !slices.Contains(got, "!other @o added join") || len(got) != 10 {
		t.Fatalf("the next Flush published %d changes (%v...), want !other's join among 10", len(got), got[:min(3, len(got))])
	}
	flushes := 0
	removed := 19
	for h.Stats().PendingRooms.Load() > 0 {
		batch(t, h)
		removed += len(r.take())
		flushes++
	}
	if removed != 35 || flushes != 2 {
		t.Fatalf("removed %d in all, over %d more Flushes; want 35 over 2", removed, flushes)
	}
}
