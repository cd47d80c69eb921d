package targets

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// Rebuilder recomputes kept targets from the source database.
type Rebuilder struct {
	Mapping Mapping
	Source  *pgxpool.Pool // the captured database
	Store   *Store
	Publish Publisher
	Log     *zap.Logger
	// Chunk is the number of rooms per state transaction. Default 200.
	Chunk int
}

// RebuildReport says what a rebuild changed.
type RebuildReport struct {
	LSN     pipeline.LSN // the source was read as of this WAL position
	Rooms   int          // rooms recomputed
	Changed int          // rooms whose targets changed
	Added   int
	Removed int
	// Held are rooms left to the consumer: it holds them for a transaction
	// committed at or after LSN that it has not seen whole, so their facts
	// include part of a transaction the snapshot does not contain.
	// The snapshot's facts are merged; the consumer settles them once the
	// transaction is whole (or its hold expires).
	Held int
}

// Rebuild reads the source at a snapshot (see readSnapshot), merges what it
// read into the facts with a position just below the snapshot's LSN (last
// writer wins, so a change the consumer applies later from after the
// snapshot still wins, and one from before it is skipped as already
// reflected), recomputes the rooms' targets, writes the difference and
// publishes it with reason "rebuild". It is safe while the consumer runs:
// both serialise on the room's row lock, and positions decide every fact.
// A room the consumer holds for an incomplete transaction committed at or
// after the snapshot (notify_waits) is not settled: its facts include part
// of that transaction, which settling would publish as an intermediate
// state. Its facts are merged all the same, and it stays dirty for the
// consumer (RebuildReport.Held). A room held only for transactions before
// the snapshot is settled: the snapshot has them whole, and its facts
// supersede theirs.
//
// rooms limits it to those rooms; all recomputes every room and user.
func (b *Rebuilder) Rebuild(ctx context.Context, rooms []string, all bool) (RebuildReport, error) {
	c, err := compile(b.Mapping)
	if err != nil {
		return RebuildReport{}, err
	}
	if b.Chunk <= 0 {
		b.Chunk = 200
	}
	var rep RebuildReport
	err = readSnapshot(ctx, b.Source, func(stx pgx.Tx, lsn pipeline.LSN) error {
		rep.LSN = lsn
		stamp := stampBelow(lsn)
		if all {
			if err := b.rebuildAllUsers(ctx, c, stx, stamp); err != nil {
				return err
			}
			var err error
			if rooms, err = b.allRooms(ctx, c, stx); err != nil {
				return err
			}
		}
		rooms = dedupeSorted(rooms)
		for start := 0; start < len(rooms); start += b.Chunk {
			chunk := rooms[start:min(start+b.Chunk, len(rooms))]
			if err := b.rebuildRooms(ctx, c, stx, stamp, chunk, !all, &rep); err != nil {
				return err
			}
		}
		return nil
	})
	return rep, err
}

// allRooms lists every room the source or the kept state knows.
func (b *Rebuilder) allRooms(ctx context.Context, c *compiled, stx pgx.Tx) ([]string, error) {
	inner, args := c.memberRowsSQL(false)
	rows, err := stx.Query(ctx, `SELECT DISTINCT room FROM (`+inner+`) AS t(room, usr, membership, joined)`, args...)
	if err != nil {
		return nil, fmt.Errorf("listing source rooms: %w", err)
	}
	rooms, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	rows, err = b.Store.pool.Query(ctx, fmt.Sprintf(`SELECT room_id FROM %s UNION SELECT room_id FROM %s`, b.Store.t.members, b.Store.t.targets))
	if err != nil {
		return nil, fmt.Errorf("listing kept rooms: %w", err)
	}
	kept, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	return append(rooms, kept...), nil
}

// rebuildAllUsers merges every source user, streaming them in chunks, and
// marks active the users the facts hold as inactive but the source no
// longer has (a user without a row is active).
func (b *Rebuilder) rebuildAllUsers(ctx context.Context, c *compiled, stx pgx.Tx, stamp pipeline.Position) error {
	const chunk = 5000
	merge := func(src map[string]bool) error {
		if len(src) == 0 {
			return nil
		}
		return b.stateTx(ctx, func(tx pgx.Tx) error {
			changed, err := b.Store.mergeUsersTx(ctx, tx, stamp, sortedKeys(src), src)
			if err != nil || len(changed) == 0 {
				return err
			}
			// Their rooms are settled in full by the rooms' pass below; if
			// the rebuild stops before it, by the consumer's next
			// settlement of them.
			rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT DISTINCT room_id FROM %s WHERE user_id = ANY($1::text[]) AND joined ORDER BY 1`, b.Store.t.members), changed)
			if err != nil {
				return err
			}
			rooms, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil || len(rooms) == 0 {
				return err
			}
			return b.Store.markFullTx(ctx, tx, rooms)
		})
	}
	rows, err := stx.Query(ctx, c.usersSQL(true)+" ORDER BY 1")
	if err != nil {
		return fmt.Errorf("reading source users: %w", err)
	}
	src := map[string]bool{}
	var u string
	var active bool
	_, err = pgx.ForEachRow(rows, []any{&u, &active}, func() error {
		src[u] = active
		if len(src) < chunk {
			return nil
		}
		err := merge(src)
		src = map[string]bool{}
		return err
	})
	if err == nil {
		err = merge(src)
	}
	if err != nil {
		return fmt.Errorf("merging source users: %w", err)
	}
	rows, err = b.Store.pool.Query(ctx, fmt.Sprintf(`SELECT user_id FROM %s WHERE NOT active ORDER BY 1`, b.Store.t.users))
	if err != nil {
		return err
	}
	inactive, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for start := 0; start < len(inactive); start += chunk {
		part := inactive[start:min(start+chunk, len(inactive))]
		rows, err := stx.Query(ctx, c.usersSQL(false), part)
		if err != nil {
			return fmt.Errorf("reading source users: %w", err)
		}
		present := map[string]bool{}
		if _, err := pgx.ForEachRow(rows, []any{&u, &active}, func() error { present[u] = true; return nil }); err != nil {
			return err
		}
		gone := map[string]bool{}
		for _, u := range part {
			if !present[u] {
				gone[u] = true // no row: active
			}
		}
		if err := merge(gone); err != nil {
			return err
		}
	}
	return nil
}

// rebuildRooms merges the rooms' memberships (and, with withUsers, their
// users) and settles them in one state transaction.
func (b *Rebuilder) rebuildRooms(ctx context.Context, c *compiled, stx pgx.Tx, stamp pipeline.Position, rooms []string, withUsers bool, rep *RebuildReport) error {
	q, args := c.memberRowsSQL(true)
	args[len(args)-1] = rooms
	rows, err := stx.Query(ctx, q, args...)
	if err != nil {
		return fmt.Errorf("reading source memberships: %w", err)
	}
	var src []MemberFact
	var f MemberFact
	if _, err := pgx.ForEachRow(rows, []any{&f.Room, &f.User, &f.Membership, &f.Joined}, func() error {
		f.Pos = stamp
		src = append(src, f)
		return nil
	}); err != nil {
		return fmt.Errorf("reading source memberships: %w", err)
	}
	var srcUsers map[string]bool
	var scope []string
	if withUsers {
		rows, err := b.Store.pool.Query(ctx, fmt.Sprintf(`SELECT DISTINCT user_id FROM %s WHERE room_id = ANY($1::text[])`, b.Store.t.members), rooms)
		if err != nil {
			return err
		}
		if scope, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return err
		}
		for _, m := range src {
			scope = append(scope, m.User)
		}
		scope = dedupeSorted(scope)
		rows, err = stx.Query(ctx, c.usersSQL(false), scope)
		if err != nil {
			return fmt.Errorf("reading source users: %w", err)
		}
		srcUsers = map[string]bool{}
		var u string
		var active bool
		if _, err := pgx.ForEachRow(rows, []any{&u, &active}, func() error { srcUsers[u] = active; return nil }); err != nil {
			return err
		}
	}
	var settled []string
	var res RebuildReport
	err = b.stateTx(ctx, func(tx pgx.Tx) error {
		res = RebuildReport{}
		if err := b.Store.mergeMembersTx(ctx, tx, stamp, rooms, src); err != nil {
			return err
		}
		settle := rooms
		if withUsers {
			changed, err := b.Store.mergeUsersTx(ctx, tx, stamp, scope, srcUsers)
			if err != nil {
				return err
			}
			if len(changed) > 0 {
				rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT DISTINCT room_id FROM %s WHERE user_id = ANY($1::text[]) AND joined`, b.Store.t.members), changed)
				if err != nil {
					return err
				}
				more, err := pgx.CollectRows(rows, pgx.RowTo[string])
				if err != nil {
					return err
				}
				settle = append(append([]string(nil), rooms...), more...)
			}
		}
		held, err := b.Store.heldRoomsTx(ctx, tx, settle, stamp.CommitLSN)
		if err != nil {
			return err
		}
		res.Held = len(held)
		if len(held) > 0 {
			// Their facts changed here without touched users: the
			// consumer's settlement of them reads every fact.
			if err := b.Store.markFullTx(ctx, tx, sortedKeys(held)); err != nil {
				return err
			}
			settle = slices.DeleteFunc(dedupeSorted(settle), func(r string) bool { return held[r] })
		}
		ups, err := b.Store.settleTx(ctx, tx, settle, ReasonRebuild, &stamp)
		if err != nil {
			return err
		}
		if err := b.Store.writeOutbox(ctx, tx, ups); err != nil {
			return err
		}
		settled = dedupeSorted(settle)
		res.Rooms, res.Changed = len(settled), len(ups)
		for _, u := range ups {
			for _, ch := range u.Changes {
				if ch.Added {
					res.Added++
				} else {
					res.Removed++
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	rep.Rooms += res.Rooms
	rep.Changed += res.Changed
	rep.Added += res.Added
	rep.Removed += res.Removed
	rep.Held += res.Held
	return b.Store.Drain(ctx, settled, b.Publish)
}

// stateTx runs fn in a state transaction, retrying transient failures
// (deadlocks with the consumer, lost connections) with backoff.
func (b *Rebuilder) stateTx(ctx context.Context, fn func(tx pgx.Tx) error) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 50 * time.Millisecond
	bo.MaxElapsedTime = time.Minute
	return backoff.Retry(func() error {
		err := pgx.BeginFunc(ctx, b.Store.pool, fn)
		if err != nil && ctx.Err() != nil {
			return backoff.Permanent(err)
		}
		return err
	}, backoff.WithContext(bo, ctx))
}

// heldRoomsTx locks the rows of rooms (sorted, as settleTx does) and
// returns those the consumer holds, dirty, for a transaction committed
// after lsn. Under the lock no consumer batch can add a wait meanwhile: a
// batch marks its rooms dirty (the same rows) in the transaction that
// records what they wait for.
func (s *Store) heldRoomsTx(ctx context.Context, tx pgx.Tx, rooms []string, lsn pipeline.LSN) (map[string]bool, error) {
	if len(rooms) == 0 {
		return nil, nil
	}
	rooms = dedupeSorted(rooms)
	if _, err := tx.Exec(ctx, fmt.Sprintf(`SELECT 1 FROM %s WHERE room_id = ANY($1::text[]) ORDER BY room_id FOR UPDATE`, s.t.rooms), rooms); err != nil {
		return nil, err
	}
	rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT DISTINCT w.room_id FROM %s w JOIN %s r ON r.room_id = w.room_id
WHERE w.room_id = ANY($1::text[]) AND w.lsn > $2 AND r.dirty`, s.t.waits, s.t.rooms), rooms, int64(lsn))
	if err != nil {
		return nil, err
	}
	held, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, r := range held {
		out[r] = true
	}
	return out, nil
}

// mergeMembersTx writes the source's memberships of rooms as facts at stamp
// (unless newer facts exist); facts of those rooms the source lacks become
// "left".
func (s *Store) mergeMembersTx(ctx context.Context, tx pgx.Tx, stamp pipeline.Position, rooms []string, src []MemberFact) error {
	rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT room_id, user_id FROM %s WHERE room_id = ANY($1::text[])`, s.t.members), rooms)
	if err != nil {
		return err
	}
	type key struct{ r, u string }
	have := map[key]bool{}
	for _, f := range src {
		have[key{f.Room, f.User}] = true
	}
	facts := append([]MemberFact(nil), src...)
	var r, u string
	if _, err := pgx.ForEachRow(rows, []any{&r, &u}, func() error {
		if !have[key{r, u}] {
			facts = append(facts, MemberFact{Room: r, User: u, Pos: stamp})
		}
		return nil
	}); err != nil {
		return err
	}
	if len(facts) == 0 {
		return nil
	}
	facts = latestMembers(facts)
	n := len(facts)
	rs, us, ms, js, ls, qs := make([]string, n), make([]string, n), make([]string, n), make([]bool, n), make([]int64, n), make([]int64, n)
	for i, f := range facts {
		rs[i], us[i], ms[i], js[i] = f.Room, f.User, f.Membership, f.Joined
		ls[i], qs[i] = lsnSeq(f.Pos)
	}
	_, err = tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s AS m (room_id, user_id, membership, joined, lsn, seq)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], $5::bigint[], $6::bigint[]) ORDER BY 1, 2
ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, joined = excluded.joined, lsn = excluded.lsn, seq = excluded.seq
WHERE (m.lsn, m.seq) < (excluded.lsn, excluded.seq)`, s.t.members), rs, us, ms, js, ls, qs)
	return err
}

// mergeUsersTx writes the activity of the users in scope at stamp (a user
// src lacks is active), unless newer facts exist, and returns the users
// whose activity changed.
func (s *Store) mergeUsersTx(ctx context.Context, tx pgx.Tx, stamp pipeline.Position, scope []string, src map[string]bool) ([]string, error) {
	if len(scope) == 0 {
		return nil, nil
	}
	rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT user_id, active FROM %s WHERE user_id = ANY($1::text[])`, s.t.users), scope)
	if err != nil {
		return nil, err
	}
	old := map[string]bool{}
	var u string
	var a bool
	if _, err := pgx.ForEachRow(rows, []any{&u, &a}, func() error { old[u] = a; return nil }); err != nil {
		return nil, err
	}
	scope = dedupeSorted(scope)
	as := make([]bool, len(scope))
	ls, qs := make([]int64, len(scope)), make([]int64, len(scope))
	for i, u := range scope {
		active, ok := src[u]
		as[i] = active || !ok
		ls[i], qs[i] = lsnSeq(stamp)
	}
	rows, err = tx.Query(ctx, fmt.Sprintf(`INSERT INTO %s AS u (user_id, active, lsn, seq)
SELECT * FROM unnest($1::text[], $2::boolean[], $3::bigint[], $4::bigint[]) ORDER BY 1
ON CONFLICT (user_id) DO UPDATE SET active = excluded.active, lsn = excluded.lsn, seq = excluded.seq
WHERE (u.lsn, u.seq) < (excluded.lsn, excluded.seq)
RETURNING user_id, active`, s.t.users), scope, as, ls, qs)
	if err != nil {
		return nil, err
	}
	var changed []string
	_, err = pgx.ForEachRow(rows, []any{&u, &a}, func() error {
		was, ok := old[u]
		if !ok {
			was = true
		}
		if was != a {
			changed = append(changed, u)
		}
		return nil
	})
	return changed, err
}
