package targets

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

// memSets is an in-memory VersionedSets with the semantics sinks/redis
// implements (tested there against a real server).
type memSets struct {
	sets     map[string]map[string]bool
	versions map[string]uint64
	replaced []string
}

func newMemSets() *memSets {
	return &memSets{sets: map[string]map[string]bool{}, versions: map[string]uint64{}}
}

func (m *memSets) ApplySets(_ context.Context, ups []SetUpdate) ([]SetResult, error) {
	out := make([]SetResult, len(ups))
	for i, u := range ups {
		cur := m.versions[u.Key]
		switch {
		case cur >= u.Version:
			out[i] = SetSkipped
			continue
		case !u.Full && cur != u.Version-1:
			out[i] = SetGap
			continue
		}
		if u.Full {
			m.sets[u.Key] = map[string]bool{}
		}
		if m.sets[u.Key] == nil {
			m.sets[u.Key] = map[string]bool{}
		}
		for _, a := range u.Add {
			m.sets[u.Key][a] = true
		}
		for _, r := range u.Remove {
			delete(m.sets[u.Key], r)
		}
		m.versions[u.Key] = u.Version
	}
	return out, nil
}

func (m *memSets) ReplaceSetVersioned(_ context.Context, key string, version uint64, next func() ([]string, error)) (bool, error) {
	if m.versions[key] >= version {
		return false, nil
	}
	set := map[string]bool{}
	for {
		chunk, err := next()
		if err != nil {
			return false, err
		}
		if chunk == nil {
			break
		}
		for _, u := range chunk {
			set[u] = true
		}
	}
	m.sets[key], m.versions[key] = set, version
	m.replaced = append(m.replaced, key)
	return true, nil
}

// memSink records what a KafkaOutput writes.
type memSink struct{ msgs []pipeline.Message }

func (s *memSink) Write(_ context.Context, msgs []pipeline.Message) error {
	s.msgs = append(s.msgs, msgs...)
	return nil
}
func (s *memSink) Close(context.Context) error { return nil }

// TestLargeRoomOutputs: a large room's updates reach Redis as versioned
// deltas and Kafka as change records only; a Redis set that lost its
// version is replaced whole from the state, once; PublishFullSets
// publishes the snapshot's version without waiting for the room's
// publishing lease (the outbox follows) and records the version; the
// full set read in chunks equals the kept set; a full set above
// MaxRecordBytes is published without its list.
func TestLargeRoomOutputs(t *testing.T) {
	s, pool := newTestStore(t)
	s.FullSetMax = 10
	ctx := context.Background()
	sets := newMemSets()
	gaps := 0
	ro := &RedisOutput{Sets: sets, Full: s.ReadFull, Gap: func(string) { gaps++ }}
	sink := &memSink{}
	ko := &KafkaOutput{Sink: sink, TargetsTopic: "t", ChangesTopic: "c"}
	publish := Publishers(ko.Publish, ro.Publish)
	lsn := pipeline.LSN(100)
	join := func(users ...string) {
		t.Helper()
		var fs []MemberFact
		for _, u := range users {
			lsn++
			fs = append(fs, MemberFact{Room: "!big", User: u, Membership: "join", Joined: true, Pos: pipeline.Position{CommitLSN: lsn}})
		}
		if _, err := s.Apply(ctx, fs, nil, nil, nil, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Settle(ctx, []string{"!big"}, nil, publish); err != nil {
			t.Fatal(err)
		}
	}
	var first []string
	for i := 0; i < 25; i++ {
		first = append(first, fmt.Sprintf("@u%02d", i))
	}
	join(first...) // a new room: settled in full, 25 > 10 members, so Partial
	redisKey := "notify_targets:!big"
	if got := sortedKeys(sets.sets[redisKey]); !slices.Equal(got, first) {
		t.Fatalf("Redis set after the fill: %v", got)
	}
	if len(sets.replaced) != 0 {
		t.Fatalf("the fill (version 1 over none) was not applied as a delta: replaced %d times", len(sets.replaced))
	}
	countTopic := func(topic string) int {
		n := 0
		for _, m := range sink.msgs {
			if m.Topic == topic {
				n++
			}
		}
		return n
	}
	if n := countTopic("t"); n != 0 {
		t.Fatalf("%d notify_targets records for a large room's update", n)
	}
	if n := countTopic("c"); n != 25 {
		t.Fatalf("%d change records, want 25", n)
	}
	join("@late")
	if !sets.sets[redisKey]["@late"] || sets.versions[redisKey] != 2 || len(sets.replaced) != 0 {
		t.Fatalf("delta not applied as a delta: member %v version %d replaced %d", sets.sets[redisKey]["@late"], sets.versions[redisKey], len(sets.replaced))
	}
	// Redis loses the set: the next delta is a gap, repaired whole.
	delete(sets.sets, redisKey)
	delete(sets.versions, redisKey)
	join("@after")
	if gaps != 1 || len(sets.sets[redisKey]) != 27 || sets.versions[redisKey] != 3 {
		t.Fatalf("after a gap: %d gaps, %d members, version %d; want 1, 27, 3", gaps, len(sets.sets[redisKey]), sets.versions[redisKey])
	}
	// The schedule: due once, published after the outbox, then not due.
	due, err := s.FullSetsDue(ctx, 0, 10)
	if err != nil || !slices.Equal(due, []string{"!big"}) {
		t.Fatalf("due %v (%v), want [!big]", due, err)
	}
	// Leave an unpublished update in the outbox: PublishFullSets sends it
	// first, then the full set at its version.
	lsn++
	if _, err := s.Apply(ctx, []MemberFact{{Room: "!big", User: "@u00", Membership: "leave", Pos: pipeline.Position{CommitLSN: lsn}}}, nil, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Settle(ctx, []string{"!big"}, nil, func(context.Context, []RoomUpdate) error { return fmt.Errorf("output down") }); err == nil {
		t.Fatal("settle with a failing output did not fail")
	}
	// The room's publishing lease is held elsewhere (a drain in progress):
	// the full set does not wait for it.
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	released := false
	defer func() {
		if !released {
			conn.Release() // else pool.Close, at cleanup, waits for it
		}
	}()
	held, err := s.leaseRooms(ctx, conn, s.leaseSpace(), []string{"!big"})
	if err != nil || len(held) != 1 {
		t.Fatalf("leasing !big: %v %v", held, err)
	}
	sink.msgs = nil
	ko.MaxRecordBytes = 1 << 20
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	n, err := s.PublishFullSets(pctx, due, FullPublishers(ko.PrepareFull))
	cancel()
	if err != nil || n != 1 {
		t.Fatalf("PublishFullSets while the room's lease is held: %d, %v", n, err)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_unlock_all()`); err != nil {
		t.Fatal(err)
	}
	conn.Release()
	released = true
	if len(sink.msgs) != 1 || sink.msgs[0].Topic != "t" {
		t.Fatalf("wrote %d records %v, want the full set alone", len(sink.msgs), topics(sink.msgs))
	}
	full := sink.msgs[0]
	if err := s.Drain(ctx, []string{"!big"}, publish); err != nil {
		t.Fatal(err)
	}
	if len(sink.msgs) != 2 || sink.msgs[1].Topic != "c" {
		t.Fatalf("the outbox's change record did not follow: %v", topics(sink.msgs))
	}
	var rec struct {
		Users   []string `json:"users"`
		Version uint64   `json:"version"`
	}
	if err := json.Unmarshal(full.Value, &rec); err != nil {
		t.Fatal(err)
	}
	kept, err := s.Kept(ctx, []string{"!big"})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Version != 4 || !slices.Equal(rec.Users, sortedKeys(kept["!big"])) || len(rec.Users) != 26 {
		t.Fatalf("full set record: version %d, %d users; want version 4 and the kept 26", rec.Version, len(rec.Users))
	}
	if sets.sets[redisKey]["@u00"] || sets.versions[redisKey] != 4 {
		t.Fatalf("Redis after the full set: @u00 %v version %d", sets.sets[redisKey]["@u00"], sets.versions[redisKey])
	}
	var fullVersion int64
	if err := pool.QueryRow(ctx, `SELECT full_version FROM tidemark.notify_rooms WHERE room_id = '!big'`).Scan(&fullVersion); err != nil || fullVersion != 4 {
		t.Fatalf("full_version %d (%v), want 4", fullVersion, err)
	}
	if due, err := s.FullSetsDue(ctx, 0, 10); err != nil || len(due) != 0 {
		t.Fatalf("due after publishing: %v (%v)", due, err)
	}
	// Chunked reading: more users than a chunk.
	var many []string
	for i := 0; i < fullChunk+5; i++ {
		many = append(many, fmt.Sprintf("@m%06d", i))
	}
	join(many...)
	err = s.ReadFull(ctx, "!big", func(fs *FullSet) error {
		next, done := fs.Users(ctx)
		defer done()
		var all []string
		chunks := 0
		for {
			c, err := next()
			if err != nil {
				return err
			}
			if c == nil {
				break
			}
			chunks++
			all = append(all, c...)
		}
		if chunks != 2 || len(all) != fs.Count || len(all) != 26+len(many) || !slices.IsSorted(all) {
			return fmt.Errorf("%d chunks, %d users (count %d), sorted %v", chunks, len(all), fs.Count, slices.IsSorted(all))
		}
		// Above MaxRecordBytes: without the list.
		sink.msgs = nil
		ko.MaxRecordBytes = 64 << 10
		send, err := ko.PrepareFull(ctx, fs)
		if err != nil {
			return err
		}
		if err := send(ctx); err != nil {
			return err
		}
		var r struct {
			Users     []string `json:"users"`
			Truncated bool     `json:"truncated"`
			Count     int      `json:"user_count"`
		}
		if err := json.Unmarshal(sink.msgs[0].Value, &r); err != nil {
			return err
		}
		if !r.Truncated || r.Users != nil || r.Count != fs.Count {
			return fmt.Errorf("over the bound: truncated %v, %d users listed, count %d", r.Truncated, len(r.Users), r.Count)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func topics(ms []pipeline.Message) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Topic)
	}
	return out
}

// TestFullSetScheduleEdges: a room that has versions keeps counting one by
// one when Prune's version floor is higher (only a room without versions
// starts there); a full set is sent after its snapshot has ended (no state
// transaction open while Kafka is written); a room that was large and
// shrank stays scheduled while it changes.
func TestFullSetScheduleEdges(t *testing.T) {
	s, pool := newTestStore(t)
	s.FullSetMax = 3
	ctx := context.Background()
	lsn := pipeline.LSN(100)
	member := func(user, mem string) {
		t.Helper()
		lsn++
		if _, err := s.Apply(ctx, []MemberFact{{Room: "!r", User: user, Membership: mem, Joined: mem == "join", Pos: pipeline.Position{CommitLSN: lsn}}}, nil, nil, nil, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Settle(ctx, []string{"!r"}, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, u := range []string{"@a", "@b", "@c", "@d"} {
		member(u, "join")
	}
	if _, err := pool.Exec(ctx, `INSERT INTO tidemark.notify_meta (key, value) VALUES ('room_version_floor', 500)`); err != nil {
		t.Fatal(err)
	}
	member("@e", "join")
	var version int64
	if err := pool.QueryRow(ctx, `SELECT version FROM tidemark.notify_rooms WHERE room_id = '!r'`).Scan(&version); err != nil || version != 5 {
		t.Fatalf("version after the floor was raised: %d (%v), want 5", version, err)
	}
	openTx := func() int {
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	sent := false
	probe := func(ctx context.Context, fs *FullSet) (func(context.Context) error, error) {
		if openTx() == 0 {
			return nil, fmt.Errorf("no snapshot open while preparing")
		}
		return func(context.Context) error {
			if n := openTx(); n != 0 {
				return fmt.Errorf("%d state transaction(s) open while sending", n)
			}
			sent = true
			return nil
		}, nil
	}
	if n, err := s.PublishFullSets(ctx, []string{"!r"}, probe); err != nil || n != 1 || !sent {
		t.Fatalf("PublishFullSets: %d, %v, sent %v", n, err, sent)
	}
	// Shrink below the bound: still scheduled while it changes.
	member("@a", "leave")
	member("@b", "leave")
	due, err := s.FullSetsDue(ctx, 0, 10)
	if err != nil || !slices.Equal(due, []string{"!r"}) {
		t.Fatalf("a room that shrank below the bound and changed: due %v (%v), want [!r]", due, err)
	}
	if _, err := s.PublishFullSets(ctx, due, probe); err != nil {
		t.Fatal(err)
	}
	if due, err := s.FullSetsDue(ctx, 0, 10); err != nil || len(due) != 0 {
		t.Fatalf("due after its full set: %v (%v)", due, err)
	}
}
