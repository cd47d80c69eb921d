package targets

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgserver.StopShared()
	os.Exit(code)
}

// recorder is a Publisher that remembers change records.
type recorder struct{ changes []string }

func (r *recorder) publish(_ context.Context, ups []RoomUpdate) error {
	for _, u := range ups {
		for _, c := range u.Changes {
			op := "removed"
			if c.Added {
				op = "added"
			}
			r.changes = append(r.changes, fmt.Sprintf("%s %s %s %s", u.Room, c.User, op, c.Reason))
		}
	}
	return nil
}

func (r *recorder) take() []string {
	out := r.changes
	r.changes = nil
	sort.Strings(out)
	return out
}

func newTestStore(t *testing.T) (*Store, *pgxpool.Pool) {
	t.Helper()
	dsn := pgserver.ForTest(t)
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	s := NewStore(pool, "tidemark")
	if err := s.Setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	return s, pool
}

func change(table, op string, before, after map[string]json.RawMessage, lsn pipeline.LSN, seq uint32) *invalidation.Message {
	schema, name := "public", table
	e := &pipeline.Envelope{Op: op, Before: before, After: after}
	e.Source.Schema, e.Source.Table = schema, name
	return &invalidation.Message{Table: schema + "." + name, Pos: pipeline.Position{CommitLSN: lsn, Seq: seq}, Env: e}
}

func membership(room, user, mem string) map[string]json.RawMessage {
	return img("room_id", `"`+room+`"`, "user_id", `"`+user+`"`, "membership", `"`+mem+`"`)
}

func userRow(user string, deactivated bool) map[string]json.RawMessage {
	return img("user_id", `"`+user+`"`, "deactivated", fmt.Sprint(deactivated))
}

func end(x *TxnIndex, lsn int, members, users int) {
	x.add(fmt.Appendf(nil, `{"status":"END","lsn":%d,"data_collections":[{"data_collection":"public.room_memberships","event_count":%d},{"data_collection":"public.users","event_count":%d}]}`, lsn, members, users))
}

// batch hands the messages to h as one consumer batch.
func batch(t *testing.T, h *Handler, ms ...*invalidation.Message) {
	t.Helper()
	ctx := context.Background()
	for _, m := range ms {
		if err := h.Handle(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

func expect(t *testing.T, step string, r *recorder, want ...string) {
	t.Helper()
	sort.Strings(want)
	if got := r.take(); !slices.Equal(got, want) {
		t.Errorf("%s: published %v, want %v", step, got, want)
	}
}

// TestHandlerNetEffectAcrossBatches: a DELETE+INSERT rewrite split over
// two consumer batches publishes nothing, because the room waits until the
// transaction's END record says all its changes were seen; an incomplete
// transaction is settled once the hold has passed, not before. The clock is
// fake: time passes only where the test says so.
func TestHandlerNetEffectAcrossBatches(t *testing.T) {
	s, _ := newTestStore(t)
	r := &recorder{}
	x := &TxnIndex{Tables: []string{"public.room_memberships", "public.users"}}
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	const hold = 300 * time.Millisecond
	h, err := NewHandler(HandlerConfig{Store: s, Publish: r.publish, Ends: x, Hold: hold, Now: func() time.Time { return now }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A transaction older than the index's first END record (a backlog
	// from before it started) is settled at the end of its batch.
	end(x, 40, 0, 0)
	batch(t, h, change("room_memberships", "c", nil, membership("!old", "@a", "join"), 30, 0))
	expect(t, "before the index", r, "!old @a added join")
	end(x, 50, 2, 0)
	batch(t, h, change("room_memberships", "c", nil, membership("!r", "@a", "join"), 50, 0),
		change("room_memberships", "c", nil, membership("!r", "@b", "join"), 50, 1))
	expect(t, "join", r, "!r @a added join", "!r @b added join")

	end(x, 100, 2, 0)
	batch(t, h, change("room_memberships", "d", membership("!r", "@a", "join"), nil, 100, 0))
	expect(t, "first half of a rewrite", r)
	batch(t, h, change("room_memberships", "c", nil, membership("!r", "@a", "join"), 100, 1))
	expect(t, "second half of a rewrite", r)

	// The rewrite's END has not arrived yet: the room waits for it.
	batch(t, h, change("room_memberships", "d", membership("!r", "@b", "join"), nil, 120, 0))
	expect(t, "delete before its END", r)
	end(x, 120, 2, 0)
	batch(t, h, change("room_memberships", "c", nil, membership("!r", "@b", "leave"), 120, 1))
	expect(t, "rewrite to leave", r, "!r @b removed leave")

	// A transaction whose other changes never come is settled after the hold.
	end(x, 130, 2, 0)
	batch(t, h, change("room_memberships", "u", membership("!r", "@a", "join"), membership("!r", "@a", "ban"), 130, 0))
	expect(t, "incomplete transaction", r)
	settle := func() {
		h.mu.Lock()
		h.settleReady(context.Background())
		h.mu.Unlock()
	}
	now = now.Add(hold - time.Millisecond)
	settle()
	expect(t, "just before the hold ends", r)
	now = now.Add(time.Millisecond)
	settle()
	expect(t, "after the hold", r, "!r @a removed ban")
	if n := h.Stats().HeldExpired.Load(); n != 1 {
		t.Errorf("HeldExpired = %d, want 1", n)
	}
	if len(h.pending) != 0 {
		t.Errorf("pending transactions left: %d", len(h.pending))
	}
}

// TestHandlerPositionsDecide: replays and out-of-order deliveries change
// nothing; deactivation removes the user from every room they are in, and
// reactivation restores the rooms where they are still joined; a truncate
// empties every room.
func TestHandlerPositionsDecide(t *testing.T) {
	s, pool := newTestStore(t)
	r := &recorder{}
	h, err := NewHandler(HandlerConfig{Store: s, Publish: r.publish}, nil)
	if err != nil {
		t.Fatal(err)
	}
	batch(t, h, change("room_memberships", "c", nil, membership("!r1", "@a", "join"), 300, 0),
		change("room_memberships", "c", nil, membership("!r2", "@a", "join"), 300, 1),
		change("room_memberships", "c", nil, membership("!r3", "@a", "leave"), 300, 2),
		change("room_memberships", "c", nil, membership("!r3", "@b", "join"), 300, 3))
	expect(t, "joins", r, "!r1 @a added join", "!r2 @a added join", "!r3 @b added join")
	// An older change delivered late (another partition) loses.
	batch(t, h, change("room_memberships", "d", membership("!r1", "@a", "join"), nil, 200, 0))
	expect(t, "older delete", r)
	// The same transaction again (a replay) changes nothing.
	batch(t, h, change("room_memberships", "c", nil, membership("!r1", "@a", "join"), 300, 0))
	expect(t, "replay", r)

	batch(t, h, change("users", "u", userRow("@a", false), userRow("@a", true), 400, 0))
	expect(t, "deactivate", r, "!r1 @a removed deactivated", "!r2 @a removed deactivated")
	batch(t, h, change("room_memberships", "u", membership("!r2", "@a", "join"), membership("!r2", "@a", "leave"), 405, 0))
	expect(t, "leave while deactivated", r)
	batch(t, h, change("users", "u", userRow("@a", false), userRow("@a", true), 400, 0))
	expect(t, "replayed deactivation", r)
	batch(t, h, change("users", "u", userRow("@a", true), userRow("@a", false), 410, 0))
	expect(t, "reactivate", r, "!r1 @a added reactivated")
	batch(t, h, change("users", "u", userRow("@a", false), userRow("@a", true), 400, 0))
	expect(t, "replayed deactivation after reactivation", r)

	batch(t, h, change("room_memberships", "t", nil, nil, 500, 0), change("room_memberships", "t", nil, nil, 500, 0))
	expect(t, "truncate", r, "!r1 @a removed leave", "!r3 @b removed leave")
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.notify_targets`).Scan(&n); err != nil || n != 0 {
		t.Errorf("kept targets after truncate: %d (%v)", n, err)
	}
	var lsn, seq int64
	if err := pool.QueryRow(context.Background(), `SELECT lsn, seq FROM tidemark.notify_rooms WHERE room_id = '!r1'`).Scan(&lsn, &seq); err != nil || lsn != 500 {
		t.Errorf("room position %d:%d (%v), want 500:0", lsn, seq, err)
	}
}

// TestHandlerOutputDown: while an output fails, facts and kept targets are
// still committed (the consumer moves on), the updates wait in the outbox
// and only the rooms, not every transaction, are remembered in memory;
// once the output recovers, every committed change is published in order.
func TestHandlerOutputDown(t *testing.T) {
	s, pool := newTestStore(t)
	r := &recorder{}
	down := true
	publish := func(ctx context.Context, ups []RoomUpdate) error {
		if down {
			return fmt.Errorf("output down")
		}
		return r.publish(ctx, ups)
	}
	h, err := NewHandler(HandlerConfig{Store: s, Publish: publish, Hold: 50 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		mem := "join"
		if i%2 == 1 {
			mem = "leave"
		}
		batch(t, h, change("room_memberships", "u", nil, membership(fmt.Sprintf("!r%d", i%3), "@a", mem), pipeline.LSN(1000+i), 0))
	}
	if n := len(h.pending); n > 2 {
		t.Errorf("%d pending entries while the output is down, want at most the retry entry", n)
	}
	if n := h.Stats().SettleErrors.Load(); n == 0 {
		t.Error("no settle errors counted")
	}
	// The kept state is committed; the outputs are behind, never ahead.
	var dirty int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.notify_rooms WHERE dirty`).Scan(&dirty); err != nil || dirty != 0 {
		t.Errorf("dirty rooms %d (%v), want 0", dirty, err)
	}
	if len(r.changes) != 0 {
		t.Errorf("published while down: %v", r.changes)
	}
	var outbox int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.notify_outbox`).Scan(&outbox); err != nil || outbox == 0 {
		t.Errorf("outbox holds %d records (%v) while the output is down", outbox, err)
	}
	down = false
	h.mu.Lock()
	h.settleReady(context.Background())
	h.mu.Unlock()
	// Every committed change is published, in order: folding them per room
	// flips the state each time and ends at the kept state (the last
	// changes: i=197 !r2 leave, 198 !r0 join, 199 !r1 leave).
	state := map[string]bool{}
	for _, c := range r.changes {
		f := strings.Fields(c)
		key, added := f[0]+" "+f[1], f[2] == "added"
		if state[key] == added {
			t.Fatalf("change %q does not change the state: out of order or duplicated", c)
		}
		state[key] = added
	}
	if len(r.changes) != 199 || !state["!r0 @a"] || state["!r1 @a"] || state["!r2 @a"] {
		t.Errorf("%d changes published, final %v; want 199 ending with only !r0", len(r.changes), state)
	}
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.notify_outbox`).Scan(&outbox); err != nil || outbox != 0 {
		t.Errorf("outbox holds %d records (%v) after recovery", outbox, err)
	}
	if len(h.pending) != 0 {
		t.Errorf("pending entries left: %d", len(h.pending))
	}
}

func TestJSONStringSizeMatchesEncoder(t *testing.T) {
	for _, s := range []string{"", "@a:example.org", "quote\"back\\slash", "ctl\x01\n\r\t", "bad\xffutf8", "line\u2028sep\u2029", "中文用户", "\x00"} {
		if got, want := jsonStringSize(s), int64(len(pipeline.AppendJSONString(nil, s))); got != want {
			t.Errorf("jsonStringSize(%q) = %d, encoder writes %d", s, got, want)
		}
	}
	users := []string{"@a", "@b\"", "@c\xff"}
	if got, real := targetsSize("!r", users), int64(len(TargetsJSON("!r", users, 123456789, pipeline.Position{CommitLSN: 1 << 40, Seq: 99999}))); got < real || got > real+100 {
		t.Errorf("targetsSize = %d, record is %d bytes", got, real)
	}
}

// at places a change on a topic partition, as the consumer delivers it.
func at(m *invalidation.Message, topic string, partition int) *invalidation.Message {
	m.Topic, m.Partition = topic, partition
	return m
}

// TestHandlerRecoverWaits: a consumer stopped between the two halves of a
// rewrite (on different partitions) keeps what the room waits for; a new
// one recovers it, does not count the redelivered first half again, waits
// for the END record and the second half (not for the hold, which is long),
// and publishes nothing. Dirty rooms waiting for nothing settle at once.
func TestHandlerRecoverWaits(t *testing.T) {
	s, pool := newTestStore(t)
	ctx := context.Background()
	r := &recorder{}
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	newHandler := func(x *TxnIndex) *Handler {
		h, err := NewHandler(HandlerConfig{Store: s, Publish: r.publish, Ends: x, Hold: time.Hour, Now: clock}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	settle := func(h *Handler) {
		h.mu.Lock()
		h.settleReady(ctx)
		h.mu.Unlock()
	}
	x1 := &TxnIndex{Tables: []string{"public.room_memberships", "public.users"}}
	h1 := newHandler(x1)
	end(x1, 10, 2, 0)
	batch(t, h1, at(change("room_memberships", "c", nil, membership("!r", "@a", "join"), 10, 0), "m", 0),
		at(change("room_memberships", "c", nil, membership("!q", "@a", "join"), 10, 1), "m", 1))
	expect(t, "seed", r, "!r @a added join", "!q @a added join")
	// The DELETE half of a rewrite at 20, and a join of !q at 30 settled
	// by neither (its room is left dirty, as a crash before settling does).
	del := at(change("room_memberships", "d", membership("!r", "@a", "join"), nil, 20, 0), "m", 2)
	del.Time = now.Add(-time.Hour)
	batch(t, h1, del)
	expect(t, "first half", r)
	var waits int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM tidemark.notify_waits WHERE room_id = '!r' AND lsn = 20`).Scan(&waits); err != nil || waits != 1 {
		t.Fatalf("notify_waits rows for !r at 20: %d (%v), want 1", waits, err)
	}
	if _, err := pool.Exec(ctx, `UPDATE tidemark.notify_rooms SET dirty = true WHERE room_id = '!q'`); err != nil {
		t.Fatal(err)
	}

	// A new run.
	waiting, err := s.Waiting(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(waiting) != 1 || waiting[0].LSN != 20 || !slices.Equal(waiting[0].Rooms, []string{"!r"}) ||
		waiting[0].Seen["public.room_memberships"] != 1 || !waiting[0].FirstRecord.Equal(now.Add(-time.Hour)) {
		t.Fatalf("waiting = %+v", waiting)
	}
	dirty, err := s.DirtyRooms(ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	x2 := &TxnIndex{Tables: []string{"public.room_memberships", "public.users"}}
	h2 := newHandler(x2)
	h2.Recover(dirty, waiting)
	end(x2, 10, 2, 0)
	settle(h2)
	expect(t, "recovered !q (waits for nothing)", r)
	if n := countDirty(t, pool); n != 1 {
		t.Errorf("dirty rooms after settling the recovered: %d, want 1 (!r)", n)
	}
	end(x2, 20, 2, 0)
	// The first half again (its offset was not committed): not counted twice.
	batch(t, h2, at(change("room_memberships", "d", membership("!r", "@a", "join"), nil, 20, 0), "m", 2))
	expect(t, "redelivered first half", r)
	if n := countDirty(t, pool); n != 1 {
		t.Errorf("dirty rooms after the redelivered first half: %d, want 1", n)
	}
	batch(t, h2, at(change("room_memberships", "c", nil, membership("!r", "@a", "join"), 20, 1), "m", 0))
	expect(t, "second half", r)
	if n := countDirty(t, pool); n != 0 {
		t.Errorf("dirty rooms after the second half: %d, want 0", n)
	}
	if n := h2.Stats().HeldExpired.Load(); n != 0 {
		t.Errorf("HeldExpired = %d, want 0", n)
	}
	if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM tidemark.notify_waits) + (SELECT count(*) FROM tidemark.notify_txns)`).Scan(&waits); err != nil || waits != 0 {
		t.Errorf("kept waits after settling: %d (%v), want 0", waits, err)
	}
}

func countDirty(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.notify_rooms WHERE dirty`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestHeldRooms: rebuild leaves to the consumer a dirty room it holds for
// a transaction after the snapshot, and settles the others.
func TestHeldRooms(t *testing.T) {
	s, pool := newTestStore(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO tidemark.notify_rooms (room_id, lsn, seq, dirty) VALUES ('!held', 0, 0, true), ('!old', 0, 0, true), ('!clean', 0, 0, false);
INSERT INTO tidemark.notify_waits (room_id, lsn) VALUES ('!held', 500), ('!old', 300), ('!clean', 500)`); err != nil {
		t.Fatal(err)
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	held, err := s.heldRoomsTx(ctx, tx, []string{"!old", "!held", "!clean", "!none"}, 400)
	if err != nil {
		t.Fatal(err)
	}
	if len(held) != 1 || !held["!held"] {
		t.Errorf("held = %v, want only !held", held)
	}
}
