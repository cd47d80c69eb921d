package targets

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/pipeline"
)

// Store keeps the notification-target state in Postgres, in its own schema
// (default "tidemark"), never in a captured table:
//
//	notify_memberships (room_id, user_id, membership, joined, lsn, seq)  what the membership source says, per pair
//	notify_users       (user_id, active, lsn, seq)                       what the user source says, per user
//	notify_targets     (room_id, user_id, lsn, seq)                      the kept (published) targets
//	notify_rooms       (room_id, lsn, seq, dirty, version)               per room: latest position, whether
//	                                                                     notify_targets may lag the facts, and
//	                                                                     the number of updates published
//	notify_outbox      (id, room_id, payload)                            committed updates not yet published
//	notify_meta        (key, value, text_value)                          room_version_floor: the highest version
//	                                                                     of a pruned room (see Prune); source_*:
//	                                                                     the cluster the state is from (CheckSource)
//	notify_waits       (room_id, lsn)                                    per dirty room, the incomplete
//	                                                                     transactions (commit LSNs) it waits for
//	notify_txns        (lsn, first_record, progress)                     per such transaction, what the consumer
//	                                                                     has handled of it (so a restart goes on
//	                                                                     counting) and its records' time
//
// notify_rooms also holds per room: touched (the users whose facts changed
// since it was last settled), members (the number of kept targets),
// full_settle (its next settlement reads every fact, not only the touched
// users: after a truncate, a rebuild's merge, more than maxTouched touched
// users, or for a room new to the table) and full_version/full_at (the
// version whose full set was last published by PublishFullSets, and when).
//
// A settlement reads and writes only the touched users of a room (its
// delta), so a join costs the same in a room of 10 or of 500,000 members.
// A room with more kept targets than FullSetMax is large: its updates
// carry only their changes and the count (Partial), never the set; its
// full set goes out on a schedule (FullSetsDue, PublishFullSets) and when
// an output asks for it (ReadFull).
//
// Facts are last-writer-wins by position: a change applies only when its
// position is above the stored one, so replays and out-of-order delivery
// across partitions change nothing. notify_targets is derived from the facts
// (joined and active) when a room is settled; a room's settlement runs in one
// transaction holding the room's row lock and writes the update to the
// outbox, which is then published outside any transaction, under a
// per-room lease, and emptied (so outputs follow the committed state, in
// order, at least once; see Drain).
type Store struct {
	pool   *pgxpool.Pool
	schema string
	t      struct{ members, users, targets, rooms, outbox, meta, waits, txns string }
	// FullSetMax is the most kept targets a room may have and still carry
	// its full set in every update; above it the room is large (see Store).
	// 0 is DefaultFullSetMax. Set it before the first Settle.
	FullSetMax int
}

// DefaultFullSetMax is the default Store.FullSetMax: 10,000 members of
// 30-byte ids are a 300 KB set, rewritten on every change.
const DefaultFullSetMax = 10000

func (s *Store) fullSetMax() int {
	if s.FullSetMax > 0 {
		return s.FullSetMax
	}
	return DefaultFullSetMax
}

// NewStore uses pool and schema (default "tidemark"). It starts nothing.
func NewStore(pool *pgxpool.Pool, schema string) *Store {
	if schema == "" {
		schema = "tidemark"
	}
	s := &Store{pool: pool, schema: schema}
	q := func(n string) string { return pgx.Identifier{schema, n}.Sanitize() }
	s.t.members, s.t.users, s.t.targets, s.t.rooms = q("notify_memberships"), q("notify_users"), q("notify_targets"), q("notify_rooms")
	s.t.outbox, s.t.meta, s.t.waits, s.t.txns = q("notify_outbox"), q("notify_meta"), q("notify_waits"), q("notify_txns")
	return s
}

// Setup creates the schema and tables when missing.
func (s *Store) Setup(ctx context.Context) error {
	ddl := fmt.Sprintf(`
CREATE TABLE IF NOT EXISTS %[1]s (room_id text NOT NULL, user_id text NOT NULL, membership text NOT NULL, joined boolean NOT NULL,
  lsn bigint NOT NULL, seq bigint NOT NULL, PRIMARY KEY (room_id, user_id));
CREATE INDEX IF NOT EXISTS notify_memberships_user ON %[1]s (user_id) WHERE joined;
CREATE TABLE IF NOT EXISTS %[2]s (user_id text PRIMARY KEY, active boolean NOT NULL, lsn bigint NOT NULL, seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS %[3]s (room_id text NOT NULL, user_id text NOT NULL, lsn bigint NOT NULL, seq bigint NOT NULL,
  PRIMARY KEY (room_id, user_id));
CREATE TABLE IF NOT EXISTS %[4]s (room_id text PRIMARY KEY, lsn bigint NOT NULL, seq bigint NOT NULL, dirty boolean NOT NULL,
  version bigint NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS notify_rooms_dirty ON %[4]s (room_id) WHERE dirty;
CREATE TABLE IF NOT EXISTS %[5]s (id bigserial PRIMARY KEY, room_id text NOT NULL, payload jsonb NOT NULL);
CREATE INDEX IF NOT EXISTS notify_outbox_room ON %[5]s (room_id, id);
CREATE TABLE IF NOT EXISTS %[6]s (key text PRIMARY KEY, value bigint NOT NULL DEFAULT 0, text_value text);
CREATE TABLE IF NOT EXISTS %[7]s (room_id text NOT NULL, lsn bigint NOT NULL, PRIMARY KEY (room_id, lsn));
CREATE INDEX IF NOT EXISTS notify_waits_lsn ON %[7]s (lsn);
CREATE TABLE IF NOT EXISTS %[8]s (lsn bigint PRIMARY KEY, first_record timestamptz, progress jsonb NOT NULL);
ALTER TABLE %[4]s ADD COLUMN IF NOT EXISTS touched text[],
  ADD COLUMN IF NOT EXISTS members bigint NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS full_settle boolean NOT NULL DEFAULT true,
  ADD COLUMN IF NOT EXISTS full_version bigint NOT NULL DEFAULT 0,
  ADD COLUMN IF NOT EXISTS full_at timestamptz;`,
		s.t.members, s.t.users, s.t.targets, s.t.rooms, s.t.outbox, s.t.meta, s.t.waits, s.t.txns)
	// CREATE ... IF NOT EXISTS races with itself: another part creating the
	// same schema (the integrity consumer shares "tidemark") may win, which
	// is fine; our own setups (the consumer and a rebuild starting
	// together) are serialised by an advisory lock.
	if _, err := s.pool.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{s.schema}.Sanitize()); err != nil {
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || (pe.Code != "23505" && pe.Code != "42P06") {
			return fmt.Errorf("creating schema %s: %w", s.schema, err)
		}
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('tidemark.notify_targets.setup'))`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, ddl)
		return err
	})
	if err != nil {
		return fmt.Errorf("creating the %s schema's notification-target tables: %w", s.schema, err)
	}
	return nil
}

// Schema returns the schema name.
func (s *Store) Schema() string { return s.schema }

// RoomPos is a room touched by a change at Pos: of User's fact, or of the
// whole room when User is "" (a truncate).
type RoomPos struct {
	Room string
	Pos  pipeline.Position
	User string
}

func lsnSeq(p pipeline.Position) (int64, int64) { return int64(p.CommitLSN), int64(p.Seq) }

func posOf(lsn, seq int64) pipeline.Position {
	return pipeline.Position{CommitLSN: pipeline.LSN(lsn), Seq: uint32(seq)}
}

// TxnProgress is what the consumer has handled of an incomplete
// transaction: kept with the rooms waiting for it, so that after a restart
// the rooms still wait for its END record and the count of its changes goes
// on where it stopped.
type TxnProgress struct {
	LSN pipeline.LSN // commit LSN
	// FirstRecord is the earliest timestamp of its records handled (zero:
	// unknown): the transactions topic is re-read from before it.
	FirstRecord time.Time
	Seen        map[string]int    // changes handled, per table
	Marks       map[string]uint32 // "topic/partition": the highest seq handled there
	Truncs      []uint32          // seqs of the truncates counted
	// Rooms (Waiting only) are the dirty rooms waiting for it.
	Rooms []string
	// HasRooms (Apply only) says rooms already wait for it, so its progress
	// is kept even when this batch touched none.
	HasRooms bool
}

type txnProgressJSON struct {
	Seen   map[string]int    `json:"seen,omitempty"`
	Marks  map[string]uint32 `json:"marks,omitempty"`
	Truncs []uint32          `json:"truncs,omitempty"`
}

// Apply stores facts (last writer wins by position) and marks the rooms
// whose facts changed dirty, in one transaction. It returns those rooms
// with the position of the change. Truncates (non-nil positions) mark every
// membership left, or every user active, unless newer.
//
// waiting are the incomplete transactions the batch handled changes of: in
// the same transaction, the rooms they touched are recorded as waiting for
// them (notify_waits) and the progress of those with rooms is kept
// (notify_txns), until Settle or Done is told they are done.
func (s *Store) Apply(ctx context.Context, members []MemberFact, users []UserFact, truncMembers, truncUsers *pipeline.Position, waiting map[pipeline.LSN]*TxnProgress) ([]RoomPos, error) {
	var touched []RoomPos
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var err error
		if touched, err = s.applyTx(ctx, tx, members, users, truncMembers, truncUsers); err != nil {
			return err
		}
		return s.waitTx(ctx, tx, touched, waiting)
	})
	if err != nil {
		return nil, fmt.Errorf("storing notification-target facts: %w", err)
	}
	return touched, nil
}

func (s *Store) applyTx(ctx context.Context, tx pgx.Tx, members []MemberFact, users []UserFact, truncMembers, truncUsers *pipeline.Position) ([]RoomPos, error) {
	var touched []RoomPos
	if truncMembers != nil {
		l, q := lsnSeq(*truncMembers)
		rows, err := tx.Query(ctx, fmt.Sprintf(`UPDATE %s SET joined = false, membership = '', lsn = $1, seq = $2
WHERE (lsn, seq) < ($1, $2) RETURNING room_id`, s.t.members), l, q)
		if err != nil {
			return nil, err
		}
		rooms, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return nil, err
		}
		for _, r := range rooms {
			touched = append(touched, RoomPos{Room: r, Pos: *truncMembers})
		}
	}
	if len(members) > 0 {
		members = latestMembers(members)
		rs, us, ms, js, ls, qs := make([]string, len(members)), make([]string, len(members)), make([]string, len(members)),
			make([]bool, len(members)), make([]int64, len(members)), make([]int64, len(members))
		for i, f := range members {
			rs[i], us[i], ms[i], js[i] = f.Room, f.User, f.Membership, f.Joined
			ls[i], qs[i] = lsnSeq(f.Pos)
		}
		rows, err := tx.Query(ctx, fmt.Sprintf(`INSERT INTO %s AS m (room_id, user_id, membership, joined, lsn, seq)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::bigint[], $6::bigint[]) ORDER BY 1, 2
ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, joined = excluded.joined, lsn = excluded.lsn, seq = excluded.seq
WHERE (m.lsn, m.seq) < (excluded.lsn, excluded.seq)
RETURNING room_id, lsn, seq, user_id`, s.t.members), rs, us, ms, js, ls, qs)
		if err != nil {
			return nil, err
		}
		if touched, err = collectRoomPos(rows, touched); err != nil {
			return nil, err
		}
	}
	var changedUsers []string
	userPos := map[string]pipeline.Position{}
	if truncUsers != nil {
		l, q := lsnSeq(*truncUsers)
		rows, err := tx.Query(ctx, fmt.Sprintf(`UPDATE %s SET active = true, lsn = $1, seq = $2 WHERE (lsn, seq) < ($1, $2) RETURNING user_id`, s.t.users), l, q)
		if err != nil {
			return nil, err
		}
		us, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return nil, err
		}
		for _, u := range us {
			changedUsers = append(changedUsers, u)
			userPos[u] = *truncUsers
		}
	}
	if len(users) > 0 {
		users = latestUsers(users)
		us, as, ls, qs := make([]string, len(users)), make([]bool, len(users)), make([]int64, len(users)), make([]int64, len(users))
		for i, f := range users {
			us[i], as[i] = f.User, f.Active
			ls[i], qs[i] = lsnSeq(f.Pos)
		}
		rows, err := tx.Query(ctx, fmt.Sprintf(`INSERT INTO %s AS u (user_id, active, lsn, seq)
SELECT * FROM unnest($1::text[], $2::boolean[], $3::bigint[], $4::bigint[]) ORDER BY 1
ON CONFLICT (user_id) DO UPDATE SET active = excluded.active, lsn = excluded.lsn, seq = excluded.seq
WHERE (u.lsn, u.seq) < (excluded.lsn, excluded.seq)
RETURNING user_id, lsn, seq`, s.t.users), us, as, ls, qs)
		if err != nil {
			return nil, err
		}
		var u string
		var l, q int64
		_, err = pgx.ForEachRow(rows, []any{&u, &l, &q}, func() error {
			changedUsers = append(changedUsers, u)
			userPos[u] = posOf(l, q)
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if len(changedUsers) > 0 {
		rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT room_id, user_id FROM %s WHERE user_id = ANY($1::text[]) AND joined`, s.t.members), changedUsers)
		if err != nil {
			return nil, err
		}
		var r, u string
		_, err = pgx.ForEachRow(rows, []any{&r, &u}, func() error {
			touched = append(touched, RoomPos{Room: r, Pos: userPos[u], User: u})
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if len(touched) == 0 {
		return nil, nil
	}
	return touched, s.markDirty(ctx, tx, touched)
}

// waitTx records the rooms touched by incomplete transactions as waiting
// for them, and keeps the progress of every incomplete transaction rooms
// wait for.
func (s *Store) waitTx(ctx context.Context, tx pgx.Tx, touched []RoomPos, waiting map[pipeline.LSN]*TxnProgress) error {
	if len(waiting) == 0 {
		return nil
	}
	type key struct {
		r string
		l pipeline.LSN
	}
	pairs := map[key]bool{}
	withRooms := map[pipeline.LSN]bool{}
	for _, rp := range touched {
		if waiting[rp.Pos.CommitLSN] != nil {
			pairs[key{rp.Room, rp.Pos.CommitLSN}] = true
			withRooms[rp.Pos.CommitLSN] = true
		}
	}
	if len(pairs) > 0 {
		rs, ls := make([]string, 0, len(pairs)), make([]int64, 0, len(pairs))
		for k := range pairs {
			rs, ls = append(rs, k.r), append(ls, int64(k.l))
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (room_id, lsn) SELECT * FROM unnest($1::text[], $2::bigint[]) ORDER BY 1, 2
ON CONFLICT DO NOTHING`, s.t.waits), rs, ls); err != nil {
			return err
		}
	}
	var ls []int64
	var ts []*time.Time
	var ps []string
	for lsn, p := range waiting {
		if !p.HasRooms && !withRooms[lsn] {
			continue
		}
		b, err := json.Marshal(txnProgressJSON{Seen: p.Seen, Marks: p.Marks, Truncs: p.Truncs})
		if err != nil {
			return err
		}
		var t *time.Time
		if !p.FirstRecord.IsZero() {
			ft := p.FirstRecord
			t = &ft
		}
		ls, ts, ps = append(ls, int64(lsn)), append(ts, t), append(ps, string(b))
	}
	if len(ls) == 0 {
		return nil
	}
	_, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s AS t (lsn, first_record, progress)
SELECT l, f, p::jsonb FROM unnest($1::bigint[], $2::timestamptz[], $3::text[]) AS u(l, f, p) ORDER BY 1
ON CONFLICT (lsn) DO UPDATE SET progress = excluded.progress,
  first_record = CASE WHEN t.first_record IS NULL OR excluded.first_record < t.first_record THEN coalesce(excluded.first_record, t.first_record) ELSE t.first_record END`, s.t.txns), ls, ts, ps)
	return err
}

// doneTx forgets the waits and progress of transactions that are done
// (settled: complete, or held too long).
func (s *Store) doneTx(ctx context.Context, tx pgx.Tx, done []pipeline.LSN) error {
	if len(done) == 0 {
		return nil
	}
	ls := make([]int64, len(done))
	for i, l := range done {
		ls[i] = int64(l)
	}
	if _, err := tx.Exec(ctx, fmt.Sprintf(`DELETE FROM %s WHERE lsn = ANY($1::bigint[])`, s.t.waits), ls); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, fmt.Sprintf(`DELETE FROM %s WHERE lsn = ANY($1::bigint[])`, s.t.txns), ls)
	return err
}

// Done forgets the waits and progress of transactions that are done, when
// no Settle carried them (their rooms were all held by other transactions).
func (s *Store) Done(ctx context.Context, done []pipeline.LSN) error {
	if len(done) == 0 {
		return nil
	}
	if err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return s.doneTx(ctx, tx, done) }); err != nil {
		return fmt.Errorf("forgetting %d settled transaction(s): %w", len(done), err)
	}
	return nil
}

// Waiting prunes waits of rooms no longer dirty and progress no room waits
// for (left by a crash between a settlement and forgetting its
// transactions), then returns the incomplete transactions dirty rooms wait
// for, with their rooms and progress, oldest first.
func (s *Store) Waiting(ctx context.Context) ([]TxnProgress, error) {
	var out []TxnProgress
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		out = nil
		if _, err := tx.Exec(ctx, fmt.Sprintf(`DELETE FROM %s w WHERE NOT EXISTS (SELECT 1 FROM %s r WHERE r.room_id = w.room_id AND r.dirty)`, s.t.waits, s.t.rooms)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`DELETE FROM %s t WHERE NOT EXISTS (SELECT 1 FROM %s w WHERE w.lsn = t.lsn)`, s.t.txns, s.t.waits)); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT w.lsn, t.first_record, coalesce(t.progress, '{}'::jsonb)::text, array_agg(w.room_id ORDER BY w.room_id)
FROM %s w LEFT JOIN %s t ON t.lsn = w.lsn GROUP BY w.lsn, t.first_record, t.progress ORDER BY w.lsn`, s.t.waits, s.t.txns))
		if err != nil {
			return err
		}
		var l int64
		var first *time.Time
		var prog string
		var rooms []string
		_, err = pgx.ForEachRow(rows, []any{&l, &first, &prog, &rooms}, func() error {
			var pj txnProgressJSON
			if err := json.Unmarshal([]byte(prog), &pj); err != nil {
				return fmt.Errorf("progress of transaction %d: %w", l, err)
			}
			tp := TxnProgress{LSN: pipeline.LSN(l), Seen: pj.Seen, Marks: pj.Marks, Truncs: pj.Truncs, Rooms: append([]string(nil), rooms...)}
			if first != nil {
				tp.FirstRecord = *first
			}
			out = append(out, tp)
			return nil
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("reading the transactions dirty rooms wait for: %w", err)
	}
	return out, nil
}

// collectRoomPos reads rows of (room_id, lsn, seq, user_id).
func collectRoomPos(rows pgx.Rows, dst []RoomPos) ([]RoomPos, error) {
	var r, u string
	var l, q int64
	_, err := pgx.ForEachRow(rows, []any{&r, &l, &q, &u}, func() error {
		dst = append(dst, RoomPos{Room: r, Pos: posOf(l, q), User: u})
		return nil
	})
	return dst, err
}

// maxTouched bounds the touched users a room keeps between settlements;
// past it the room is settled in full (as cheap, by then, as reading the
// touched users one by one).
const maxTouched = 1000

// markDirty records that the rooms' targets must be recomputed, raising
// their positions: the touched users of each room are added to its
// touched list, and a room touched as a whole (User "") or by more than
// maxTouched users is settled in full next time.
func (s *Store) markDirty(ctx context.Context, tx pgx.Tx, touched []RoomPos) error {
	latest := map[string]pipeline.Position{}
	full := map[string]bool{}
	users := map[string]map[string]bool{}
	for _, rp := range touched {
		if p, ok := latest[rp.Room]; !ok || p.Less(rp.Pos) {
			latest[rp.Room] = rp.Pos
		}
		switch {
		case rp.User == "":
			full[rp.Room] = true
		case !full[rp.Room]:
			if users[rp.Room] == nil {
				users[rp.Room] = map[string]bool{}
			}
			users[rp.Room][rp.User] = true
			if len(users[rp.Room]) > maxTouched {
				full[rp.Room] = true
			}
		}
	}
	rooms := sortedKeys(latest)
	ls, qs := make([]int64, len(rooms)), make([]int64, len(rooms))
	var pr, pu []string
	for i, r := range rooms {
		ls[i], qs[i] = lsnSeq(latest[r])
		if !full[r] {
			for _, u := range sortedKeys(users[r]) {
				pr, pu = append(pr, r), append(pu, u)
			}
		}
	}
	// A room without touched users here (NULL) is settled in full: touched
	// as a whole, too many, or new to the table (full_settle defaults to
	// true: a new room, or one pruned and back, has no history to trust).
	_, err := tx.Exec(ctx, fmt.Sprintf(`WITH p AS (SELECT room_id, array_agg(user_id) AS users FROM unnest($4::text[], $5::text[]) AS x(room_id, user_id) GROUP BY room_id)
INSERT INTO %s AS r (room_id, lsn, seq, dirty, touched)
SELECT t.room_id, t.lsn, t.seq, true, p.users FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t(room_id, lsn, seq) LEFT JOIN p USING (room_id) ORDER BY 1
ON CONFLICT (room_id) DO UPDATE SET dirty = true,
  full_settle = r.full_settle OR excluded.touched IS NULL OR coalesce(cardinality(r.touched), 0) + cardinality(excluded.touched) > $6,
  touched = CASE WHEN r.full_settle OR excluded.touched IS NULL OR coalesce(cardinality(r.touched), 0) + cardinality(excluded.touched) > $6
    THEN NULL ELSE coalesce(r.touched, '{}') || excluded.touched END,
  lsn = CASE WHEN (r.lsn, r.seq) < (excluded.lsn, excluded.seq) THEN excluded.lsn ELSE r.lsn END,
  seq = CASE WHEN (r.lsn, r.seq) < (excluded.lsn, excluded.seq) THEN excluded.seq ELSE r.seq END`, s.t.rooms), rooms, ls, qs, pr, pu, maxTouched)
	return err
}

// markFullTx makes the next settlement of rooms read every fact.
func (s *Store) markFullTx(ctx context.Context, tx pgx.Tx, rooms []string) error {
	// Rows locked in name order, as settleTx takes them.
	_, err := tx.Exec(ctx, fmt.Sprintf(`UPDATE %[1]s r SET full_settle = true, touched = NULL
FROM (SELECT room_id FROM %[1]s WHERE room_id = ANY($1::text[]) ORDER BY room_id FOR UPDATE) l WHERE r.room_id = l.room_id`, s.t.rooms), rooms)
	return err
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// latestMembers keeps the latest fact per (room, user), sorted by key.
func latestMembers(fs []MemberFact) []MemberFact {
	type key struct{ r, u string }
	idx := map[key]int{}
	out := fs[:0:0]
	for _, f := range fs {
		k := key{f.Room, f.User}
		if i, ok := idx[k]; ok {
			if !f.Pos.Less(out[i].Pos) {
				out[i] = f
			}
			continue
		}
		idx[k] = len(out)
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Room != out[j].Room {
			return out[i].Room < out[j].Room
		}
		return out[i].User < out[j].User
	})
	return out
}

func latestUsers(fs []UserFact) []UserFact {
	idx := map[string]int{}
	out := fs[:0:0]
	for _, f := range fs {
		if i, ok := idx[f.User]; ok {
			if !f.Pos.Less(out[i].Pos) {
				out[i] = f
			}
			continue
		}
		idx[f.User] = len(out)
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].User < out[j].User })
	return out
}

// DirtyRooms lists rooms whose kept targets may lag their facts, or whose
// outbox holds unpublished records (at most limit).
func (s *Store) DirtyRooms(ctx context.Context, limit int) ([]string, error) {
	rows, err := s.pool.Query(ctx, fmt.Sprintf(`SELECT room_id FROM %s WHERE dirty UNION SELECT room_id FROM %s ORDER BY 1 LIMIT $1`, s.t.rooms, s.t.outbox), limit)
	if err != nil {
		return nil, fmt.Errorf("listing dirty rooms: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// Change is one added or removed target.
type Change struct {
	User   string
	Added  bool
	Reason Reason
	Pos    pipeline.Position
}

// RoomUpdate is a room whose targets changed: the full new set and the
// changes that led to it.
type RoomUpdate struct {
	Room  string
	Users []string // sorted
	// Pos is the room's position: the latest change applied to it.
	Pos pipeline.Position
	// Version numbers the room's updates 1, 2, 3, ... in the order they
	// are committed and published; a record published again after a crash
	// repeats its version, so consumers skip versions they have seen.
	Version uint64
	Changes []Change
	// Count is the number of users in the new set.
	Count int
	// Partial: the room is large (see Store.FullSetMax) and Users is nil;
	// Changes alone say what changed. Its full set is published on a
	// schedule (PublishFullSets).
	Partial bool
}

// Publisher makes room updates durable in the outputs (topics, Redis),
// returning once they are. It MUST tolerate an update published again
// after a failure (at least once), and is never called concurrently for
// the same room.
type Publisher func(ctx context.Context, ups []RoomUpdate) error

// Settle recomputes the kept targets of rooms from the facts and commits
// the difference together with its outbox records, then publishes the
// rooms' outbox (Drain). The outputs never get ahead of the committed
// state: a crash or a failed publish leaves the records in the outbox, and
// settling the room again publishes them, in order. ups are the committed
// updates, also when publishing failed.
//
// done are transactions settled with it (complete, or held too long): their
// waits and progress are forgotten in the same transaction.
func (s *Store) Settle(ctx context.Context, rooms []string, done []pipeline.LSN, publish Publisher) (ups []RoomUpdate, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var err error
		if ups, err = s.settleTx(ctx, tx, rooms, "", nil); err != nil {
			return err
		}
		if err := s.doneTx(ctx, tx, done); err != nil {
			return err
		}
		return s.writeOutbox(ctx, tx, ups)
	})
	if err != nil {
		return nil, fmt.Errorf("settling %d room(s): %w", len(rooms), err)
	}
	return ups, s.Drain(ctx, rooms, publish)
}

// outboxRecord is a RoomUpdate as stored in notify_outbox.
type outboxRecord struct {
	Users   []string       `json:"users"`
	Partial bool           `json:"partial,omitempty"`
	Count   int            `json:"user_count"`
	Version uint64         `json:"version"`
	LSN     uint64         `json:"lsn"`
	Seq     uint32         `json:"seq"`
	Changes []outboxChange `json:"changes"`
}

type outboxChange struct {
	User   string `json:"user"`
	Added  bool   `json:"added"`
	Reason Reason `json:"reason"`
	LSN    uint64 `json:"lsn"`
	Seq    uint32 `json:"seq"`
}

// writeOutbox stores updates for publishing, in the transaction that
// commits them.
func (s *Store) writeOutbox(ctx context.Context, tx pgx.Tx, ups []RoomUpdate) error {
	if len(ups) == 0 {
		return nil
	}
	rooms := make([]string, len(ups))
	payloads := make([]string, len(ups))
	for i, u := range ups {
		rec := outboxRecord{Users: u.Users, Partial: u.Partial, Count: u.Count, Version: u.Version, LSN: uint64(u.Pos.CommitLSN), Seq: u.Pos.Seq}
		if rec.Users == nil && !rec.Partial {
			rec.Users = []string{}
		}
		for _, c := range u.Changes {
			rec.Changes = append(rec.Changes, outboxChange{User: c.User, Added: c.Added, Reason: c.Reason, LSN: uint64(c.Pos.CommitLSN), Seq: c.Pos.Seq})
		}
		b, err := json.Marshal(rec)
		if err != nil {
			return err
		}
		rooms[i], payloads[i] = u.Room, string(b)
	}
	_, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (room_id, payload) SELECT r, p::jsonb FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(r, p, o) ORDER BY o`, s.t.outbox), rooms, payloads)
	return err
}

// Drain publishes the outbox records of rooms (nil: every room with
// records) in commit order and deletes them once publish returned. It holds
// no database transaction while publishing: the rooms are leased with
// session-level advisory locks (taken with pg_try_advisory_lock, so no
// statement waits on a lock either), the records are read and deleted in
// short statements, and a lease dies with its connection. Two processes
// therefore never publish one room's records at once, and a room's records
// go out in version order. At least once: a crash between publish and
// delete republishes the same records, with the same versions.
func (s *Store) Drain(ctx context.Context, rooms []string, publish Publisher) error {
	if rooms == nil {
		rows, err := s.pool.Query(ctx, fmt.Sprintf(`SELECT DISTINCT room_id FROM %s`, s.t.outbox))
		if err != nil {
			return fmt.Errorf("listing outbox rooms: %w", err)
		}
		if rooms, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return err
		}
	}
	if len(rooms) == 0 {
		return nil
	}
	rooms = dedupeSorted(rooms)
	if err := s.drain(ctx, rooms, publish); err != nil {
		return fmt.Errorf("publishing the outbox of %d room(s): %w", len(rooms), err)
	}
	return nil
}

// drainBatch bounds the records read and published at once.
const drainBatch = 1000

func (s *Store) drain(ctx context.Context, rooms []string, publish Publisher) (err error) {
	return s.leased(ctx, s.leaseSpace(), rooms, func(conn *pgxpool.Conn) error { return s.drainLeased(ctx, conn, rooms, publish) })
}

// leased runs fn holding the leases of rooms in space (see Drain) on conn.
func (s *Store) leased(ctx context.Context, space int32, rooms []string, fn func(conn *pgxpool.Conn) error) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	keys, err := s.leaseRooms(ctx, conn, space, rooms)
	defer func() {
		// Unlock what was taken; a connection that cannot say so is closed,
		// which ends its locks.
		if len(keys) > 0 {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if _, uerr := conn.Exec(uctx, `SELECT pg_advisory_unlock($1, k) FROM unnest($2::int4[]) k`, space, keys); uerr != nil {
				_ = conn.Conn().Close(uctx)
			}
		}
		conn.Release()
	}()
	if err != nil {
		return err
	}
	return fn(conn)
}

// drainLeased publishes the outbox of rooms, whose lease conn holds.
func (s *Store) drainLeased(ctx context.Context, conn *pgxpool.Conn, rooms []string, publish Publisher) error {
	for {
		rows, err := conn.Query(ctx, fmt.Sprintf(`SELECT id, room_id, payload::text FROM %s WHERE room_id = ANY($1::text[]) ORDER BY id LIMIT %d`, s.t.outbox, drainBatch), rooms)
		if err != nil {
			return err
		}
		var ids []int64
		var ups []RoomUpdate
		var id int64
		var room, payload string
		if _, err := pgx.ForEachRow(rows, []any{&id, &room, &payload}, func() error {
			var rec outboxRecord
			if err := json.Unmarshal([]byte(payload), &rec); err != nil {
				return fmt.Errorf("outbox record %d: %w", id, err)
			}
			u := RoomUpdate{Room: room, Users: rec.Users, Partial: rec.Partial, Count: rec.Count, Version: rec.Version, Pos: pipeline.Position{CommitLSN: pipeline.LSN(rec.LSN), Seq: rec.Seq}}
			if !u.Partial && u.Count == 0 {
				u.Count = len(u.Users) // a record from before user_count
			}
			for _, c := range rec.Changes {
				u.Changes = append(u.Changes, Change{User: c.User, Added: c.Added, Reason: c.Reason, Pos: pipeline.Position{CommitLSN: pipeline.LSN(c.LSN), Seq: c.Seq}})
			}
			ids = append(ids, id)
			ups = append(ups, u)
			return nil
		}); err != nil {
			return err
		}
		if len(ids) == 0 {
			return nil
		}
		if publish != nil {
			if err := publish(ctx, ups); err != nil {
				return err
			}
		}
		if _, err := conn.Exec(ctx, fmt.Sprintf(`DELETE FROM %s WHERE id = ANY($1::bigint[])`, s.t.outbox), ids); err != nil {
			return err
		}
		if len(ids) < drainBatch {
			return nil
		}
	}
}

// leaseSpace is the first key of the rooms' advisory locks, per schema.
func (s *Store) leaseSpace() int32 { return s.space(".notify_outbox") }

// fullSetSpace is the first key of the rooms' full-set leases (one
// full-set publisher per room at a time; see PublishFullSets).
func (s *Store) fullSetSpace() int32 { return s.space(".notify_full_set") }

func (s *Store) space(name string) int32 {
	h := fnv.New32a()
	h.Write([]byte(s.schema + name))
	return int32(h.Sum32())
}

// leaseRooms takes the advisory lock of every room on conn, in key order (so
// two drains never wait on each other in a cycle), polling for locks held
// by another process. It returns the keys it holds, also on error.
func (s *Store) leaseRooms(ctx context.Context, conn *pgxpool.Conn, space int32, rooms []string) ([]int32, error) {
	var want []int32
	if err := conn.QueryRow(ctx, `SELECT coalesce(array_agg(DISTINCT hashtext(r) ORDER BY hashtext(r)), '{}') FROM unnest($1::text[]) r`, rooms).Scan(&want); err != nil {
		return nil, err
	}
	held := make([]int32, 0, len(want))
	wait := 10 * time.Millisecond
	for len(held) < len(want) {
		var got int
		// Takes keys in order and stops at the first one held elsewhere.
		err := conn.QueryRow(ctx, `WITH RECURSIVE t(i, ok) AS (
  SELECT 0, true
  UNION ALL
  SELECT i + 1, pg_try_advisory_lock($1, ($2::int4[])[i + 1]) FROM t WHERE ok AND i < cardinality($2::int4[]))
SELECT count(*) FILTER (WHERE ok) - 1 FROM t`, space, want[len(held):]).Scan(&got)
		if err != nil {
			return held, err
		}
		held = append(held, want[len(held):len(held)+got]...)
		if len(held) == len(want) {
			break
		}
		select {
		case <-ctx.Done():
			return held, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 500*time.Millisecond)
	}
	return held, nil
}

// Pending counts rooms waiting to be settled and outbox records waiting to
// be published.
func (s *Store) Pending(ctx context.Context) (dirty, outbox int, err error) {
	err = s.pool.QueryRow(ctx, fmt.Sprintf(`SELECT (SELECT count(*) FROM %s WHERE dirty), (SELECT count(*) FROM %s)`, s.t.rooms, s.t.outbox)).Scan(&dirty, &outbox)
	return dirty, outbox, err
}

type factRow struct {
	user       string
	membership string
	joined     bool
	mpos       pipeline.Position
	active     bool
	upos       pipeline.Position
}

// settleTx locks the rooms (sorted), derives each room's targets from the
// facts and rewrites notify_targets where they differ. A room marked
// full_settle (and every room when override is set) is derived from all
// its facts; any other from its touched users alone (notify_rooms.touched), so
// the work is that of the change, not of the room. override, when set, is
// the reason of every change and at (when not nil) raises the rooms'
// positions.
func (s *Store) settleTx(ctx context.Context, tx pgx.Tx, rooms []string, override Reason, at *pipeline.Position) ([]RoomUpdate, error) {
	if len(rooms) == 0 {
		return nil, nil
	}
	rooms = dedupeSorted(rooms)
	if _, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (room_id, lsn, seq, dirty) SELECT r, 0, 0, false FROM unnest($1::text[]) r ORDER BY 1
ON CONFLICT (room_id) DO NOTHING`, s.t.rooms), rooms); err != nil {
		return nil, err
	}
	roomPos := map[string]pipeline.Position{}
	roomVersion := map[string]int64{}
	roomMembers := map[string]int64{}
	var fullRooms []string
	// A room pruned and back continues above the versions it had (Prune
	// keeps the highest pruned version as a floor). Only a room without
	// versions starts at the floor: a room that has them keeps counting
	// one by one (a jump would look like a lost update to a versioned
	// output).
	rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT room_id, lsn, seq,
  CASE WHEN version = 0 THEN coalesce((SELECT value FROM %s WHERE key = 'room_version_floor'), 0) ELSE version END,
  members, full_settle, coalesce(touched, '{}')
FROM %s WHERE room_id = ANY($1::text[]) ORDER BY room_id FOR UPDATE`, s.t.meta, s.t.rooms), rooms)
	if err != nil {
		return nil, err
	}
	var r, u, mem string
	var l, q, ul, uq, ver, members int64
	var joined, active, full bool
	var touched []string
	var tr, tu []string // the delta rooms' touched pairs
	if _, err = pgx.ForEachRow(rows, []any{&r, &l, &q, &ver, &members, &full, &touched}, func() error {
		roomPos[r], roomVersion[r], roomMembers[r] = posOf(l, q), ver, members
		if full || override != "" {
			fullRooms = append(fullRooms, r)
			return nil
		}
		for _, u := range dedupeSorted(touched) {
			tr, tu = append(tr, r), append(tu, u)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if at != nil {
		for rm, p := range roomPos {
			if p.Less(*at) {
				roomPos[rm] = *at
			}
		}
	}
	// facts are the rooms' facts to derive from (all of a full room's, the
	// touched users' of a delta room); kept is what notify_targets holds
	// of the same users. A touched user with no fact row has fact.none.
	facts := map[string]map[string]factRow{}
	kept := map[string]map[string]bool{}
	addFact := func(f factRow, room string) {
		if facts[room] == nil {
			facts[room] = map[string]factRow{}
		}
		facts[room][f.user] = f
	}
	addKept := func(room, user string) {
		if kept[room] == nil {
			kept[room] = map[string]bool{}
		}
		kept[room][user] = true
	}
	if len(fullRooms) > 0 {
		rows, err = tx.Query(ctx, fmt.Sprintf(`SELECT m.room_id, m.user_id, m.membership, m.joined, m.lsn, m.seq,
  coalesce(u.active, true), coalesce(u.lsn, 0), coalesce(u.seq, 0)
FROM %s m LEFT JOIN %s u ON u.user_id = m.user_id WHERE m.room_id = ANY($1::text[])`, s.t.members, s.t.users), fullRooms)
		if err != nil {
			return nil, err
		}
		if _, err = pgx.ForEachRow(rows, []any{&r, &u, &mem, &joined, &l, &q, &active, &ul, &uq}, func() error {
			addFact(factRow{user: u, membership: mem, joined: joined, mpos: posOf(l, q), active: active, upos: posOf(ul, uq)}, r)
			return nil
		}); err != nil {
			return nil, err
		}
		rows, err = tx.Query(ctx, fmt.Sprintf(`SELECT room_id, user_id FROM %s WHERE room_id = ANY($1::text[])`, s.t.targets), fullRooms)
		if err != nil {
			return nil, err
		}
		if _, err = pgx.ForEachRow(rows, []any{&r, &u}, func() error { addKept(r, u); return nil }); err != nil {
			return nil, err
		}
	}
	if len(tr) > 0 {
		// Point lookups of the touched pairs (the arrays keep the planner
		// on the primary keys, however large the room).
		var hasFact, isKept bool
		rows, err = tx.Query(ctx, fmt.Sprintf(`SELECT t.room_id, t.user_id, m.room_id IS NOT NULL, coalesce(m.membership, ''), coalesce(m.joined, false),
  coalesce(m.lsn, 0), coalesce(m.seq, 0), coalesce(u.active, true), coalesce(u.lsn, 0), coalesce(u.seq, 0), k.room_id IS NOT NULL
FROM unnest($1::text[], $2::text[]) AS t(room_id, user_id)
LEFT JOIN %s m ON m.room_id = t.room_id AND m.user_id = t.user_id
LEFT JOIN %s u ON u.user_id = t.user_id
LEFT JOIN %s k ON k.room_id = t.room_id AND k.user_id = t.user_id`, s.t.members, s.t.users, s.t.targets), tr, tu)
		if err != nil {
			return nil, err
		}
		if _, err = pgx.ForEachRow(rows, []any{&r, &u, &hasFact, &mem, &joined, &l, &q, &active, &ul, &uq, &isKept}, func() error {
			if hasFact {
				addFact(factRow{user: u, membership: mem, joined: joined, mpos: posOf(l, q), active: active, upos: posOf(ul, uq)}, r)
			}
			if isKept {
				addKept(r, u)
			}
			return nil
		}); err != nil {
			return nil, err
		}
	}
	isFull := make(map[string]bool, len(fullRooms))
	for _, rm := range fullRooms {
		isFull[rm] = true
	}
	var ups []RoomUpdate
	var addR, addU, delR, delU []string
	var addL, addQ []int64
	var listRooms []string // delta rooms small enough to carry their set: read after the writes
	for _, room := range rooms {
		up := RoomUpdate{Room: room, Pos: roomPos[room]}
		var want int64
		for user, f := range facts[room] {
			w := f.joined && f.active
			if w {
				want++
				if isFull[room] {
					up.Users = append(up.Users, user)
				}
			}
			if w == kept[room][user] {
				continue
			}
			c := Change{User: user, Added: w, Pos: f.mpos}
			if f.mpos.Less(f.upos) {
				c.Pos = f.upos
			}
			switch {
			case override != "":
				c.Reason = override
			case w && f.mpos.Less(f.upos):
				c.Reason = ReasonReactivated
			case w:
				c.Reason = ReasonJoin
			case f.joined:
				c.Reason = ReasonDeactivated
			case f.membership == "ban":
				c.Reason = ReasonBan
			default:
				c.Reason = ReasonLeave
			}
			if override != "" && at != nil {
				c.Pos = *at
			}
			up.Changes = append(up.Changes, c)
		}
		for user := range kept[room] {
			if _, ok := facts[room][user]; !ok {
				reason := ReasonLeave
				if override != "" {
					reason = override
				}
				up.Changes = append(up.Changes, Change{User: user, Reason: reason, Pos: up.Pos})
			}
		}
		if isFull[room] {
			roomMembers[room] = want
		} else {
			for _, c := range up.Changes {
				if c.Added {
					roomMembers[room]++
				} else {
					roomMembers[room]--
				}
			}
		}
		if len(up.Changes) == 0 {
			continue
		}
		up.Count = int(roomMembers[room])
		switch {
		case up.Count > s.fullSetMax():
			up.Users, up.Partial = nil, true
		case isFull[room]:
			sort.Strings(up.Users)
		default:
			listRooms = append(listRooms, room)
		}
		roomVersion[room]++
		up.Version = uint64(roomVersion[room])
		sort.Slice(up.Changes, func(i, j int) bool { return up.Changes[i].User < up.Changes[j].User })
		for _, c := range up.Changes {
			if c.Added {
				cl, cq := lsnSeq(c.Pos)
				addR, addU, addL, addQ = append(addR, room), append(addU, c.User), append(addL, cl), append(addQ, cq)
			} else {
				delR, delU = append(delR, room), append(delU, c.User)
			}
		}
		ups = append(ups, up)
	}
	if len(delR) > 0 {
		if _, err := tx.Exec(ctx, fmt.Sprintf(`DELETE FROM %s t USING unnest($1::text[], $2::text[]) AS d(room_id, user_id)
WHERE t.room_id = d.room_id AND t.user_id = d.user_id`, s.t.targets), delR, delU); err != nil {
			return nil, err
		}
	}
	if len(addR) > 0 {
		if _, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (room_id, user_id, lsn, seq)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) ORDER BY 1, 2 ON CONFLICT DO NOTHING`, s.t.targets), addR, addU, addL, addQ); err != nil {
			return nil, err
		}
	}
	if len(listRooms) > 0 {
		sets := map[string][]string{}
		rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT room_id, user_id FROM %s WHERE room_id = ANY($1::text[]) ORDER BY 1, 2`, s.t.targets), listRooms)
		if err != nil {
			return nil, err
		}
		if _, err = pgx.ForEachRow(rows, []any{&r, &u}, func() error { sets[r] = append(sets[r], u); return nil }); err != nil {
			return nil, err
		}
		for i := range ups {
			if !ups[i].Partial && !isFull[ups[i].Room] {
				ups[i].Users = sets[ups[i].Room]
			}
		}
	}
	ls, qs, vs, ms := make([]int64, len(rooms)), make([]int64, len(rooms)), make([]int64, len(rooms)), make([]int64, len(rooms))
	for i, room := range rooms {
		ls[i], qs[i] = lsnSeq(roomPos[room])
		vs[i], ms[i] = roomVersion[room], roomMembers[room]
	}
	if _, err := tx.Exec(ctx, fmt.Sprintf(`UPDATE %s r SET dirty = false, full_settle = false, touched = NULL, lsn = t.lsn, seq = t.seq, version = t.version, members = t.members
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) AS t(room_id, lsn, seq, version, members) WHERE r.room_id = t.room_id`, s.t.rooms), rooms, ls, qs, vs, ms); err != nil {
		return nil, err
	}
	return ups, nil
}

func dedupeSorted(in []string) []string {
	out := append([]string(nil), in...)
	sort.Strings(out)
	j := 0
	for i := range out {
		if i == 0 || out[i] != out[i-1] {
			out[j] = out[i]
			j++
		}
	}
	return out[:j]
}

// Kept returns the kept targets of rooms (nil: every room).
func (s *Store) Kept(ctx context.Context, rooms []string) (map[string]map[string]bool, error) {
	q := fmt.Sprintf(`SELECT room_id, user_id FROM %s`, s.t.targets)
	var args []any
	if rooms != nil {
		q += ` WHERE room_id = ANY($1::text[])`
		args = append(args, rooms)
	}
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading kept targets: %w", err)
	}
	out := map[string]map[string]bool{}
	var r, u string
	_, err = pgx.ForEachRow(rows, []any{&r, &u}, func() error {
		if out[r] == nil {
			out[r] = map[string]bool{}
		}
		out[r][u] = true
		return nil
	})
	return out, err
}

// stampBelow returns the position just below every change committed at or
// after lsn: the position rebuild and audit give to what they read from a
// snapshot that holds exactly the transactions committed before lsn (see
// readSnapshot): a change with a commit LSN below lsn is in the snapshot and
// loses to the stamp, one at or after lsn is not and wins.
func stampBelow(lsn pipeline.LSN) pipeline.Position {
	return pipeline.Position{CommitLSN: lsn - 1, Seq: math.MaxUint32}
}
