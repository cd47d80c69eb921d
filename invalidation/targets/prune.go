package targets

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

// State pruning. Facts are last-writer-wins by position, so a stored fact
// also guards against an older change arriving later (a replay). A fact
// whose meaning equals having no row (a membership that is not joined, a
// user that is active, a room with nothing in it) can be deleted once no
// change older than it can reach the consumer again:
//
//   - capture re-sends only transactions committed after the slot's
//     confirmed_flush_lsn (a restart replays from there), and
//   - the consumer group is handed, on every partition of its fact topics,
//     only records after its committed offset; the floor is at most the
//     lowest position among them (a re-sent transaction sits at a later
//     offset with an older position) and the record just before it.
//
// The watermark is the lower of the two; facts strictly below it are
// pruned. Resetting the group's offsets to an earlier point breaks the
// second premise: that needs `tidemark rebuild targets --all` anyway.

// PruneWatermark returns the position below which no change of the group's
// fact topics can reach it again, or the zero position and why not (see
// invalidation.ReplayFloor).
func PruneWatermark(ctx context.Context, src *pgxpool.Pool, slot string, brokers []string, transport kafkago.RoundTripper,
	group string, topics []string) (pipeline.Position, string, error) {
	return invalidation.ReplayFloor(ctx, src, slot, brokers, transport, group, topics)
}

// PruneReport counts the rows one Prune deleted.
type PruneReport struct {
	Memberships, Users, Rooms int64
}

// pruneBatch bounds the rows one statement deletes (short transactions).
const pruneBatch = 5000

// Prune deletes the facts below the watermark whose meaning equals having
// no row: memberships not joined, users active (a user without a row is
// active), and rooms that are settled, with no membership, no target and
// nothing in the outbox. The highest version of a deleted room is kept as
// a floor, so a room that comes back continues above it (consumers skip
// versions they have seen). Each batch is its own short transaction, and
// takes only rows no one else has locked (SKIP LOCKED): a row a settlement
// or a batch is writing is left for the next round, so pruning never waits
// on them, nor they on it in an order that could deadlock.
func (s *Store) Prune(ctx context.Context, below pipeline.Position) (PruneReport, error) {
	var rep PruneReport
	if below == (pipeline.Position{}) {
		return rep, nil
	}
	l, q := lsnSeq(below)
	loop := func(sql string, n *int64) error {
		for {
			tag, err := s.pool.Exec(ctx, sql, l, q, pruneBatch)
			if err != nil {
				return err
			}
			*n += tag.RowsAffected()
			if tag.RowsAffected() < pruneBatch {
				return nil
			}
		}
	}
	if err := loop(fmt.Sprintf(`DELETE FROM %[1]s WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM %[1]s WHERE NOT joined AND (lsn, seq) < ($1, $2) LIMIT $3 FOR UPDATE SKIP LOCKED)) AND NOT joined AND (lsn, seq) < ($1, $2)`, s.t.members), &rep.Memberships); err != nil {
		return rep, fmt.Errorf("pruning %s: %w", s.t.members, err)
	}
	if err := loop(fmt.Sprintf(`DELETE FROM %[1]s WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM %[1]s WHERE active AND (lsn, seq) < ($1, $2) LIMIT $3 FOR UPDATE SKIP LOCKED)) AND active AND (lsn, seq) < ($1, $2)`, s.t.users), &rep.Users); err != nil {
		return rep, fmt.Errorf("pruning %s: %w", s.t.users, err)
	}
	// The emptiness conditions are checked again on the deleted row (a
	// concurrent change marks the room dirty first, in its transaction).
	roomsSQL := fmt.Sprintf(`WITH d AS (
  DELETE FROM %[1]s r WHERE r.room_id = ANY(ARRAY(
    SELECT room_id FROM %[1]s x WHERE NOT x.dirty AND (x.lsn, x.seq) < ($1, $2)
       AND NOT EXISTS (SELECT 1 FROM %[2]s m WHERE m.room_id = x.room_id)
       AND NOT EXISTS (SELECT 1 FROM %[3]s t WHERE t.room_id = x.room_id)
       AND NOT EXISTS (SELECT 1 FROM %[4]s o WHERE o.room_id = x.room_id)
     LIMIT $3 FOR UPDATE SKIP LOCKED))
   AND NOT r.dirty AND (r.lsn, r.seq) < ($1, $2)
   AND NOT EXISTS (SELECT 1 FROM %[2]s m WHERE m.room_id = r.room_id)
   AND NOT EXISTS (SELECT 1 FROM %[3]s t WHERE t.room_id = r.room_id)
   AND NOT EXISTS (SELECT 1 FROM %[4]s o WHERE o.room_id = r.room_id)
  RETURNING version),
f AS (INSERT INTO %[5]s (key, value) SELECT 'room_version_floor', max(version) FROM d HAVING count(*) > 0
  ON CONFLICT (key) DO UPDATE SET value = greatest(%[5]s.value, excluded.value))
SELECT count(*) FROM d`, s.t.rooms, s.t.members, s.t.targets, s.t.outbox, s.t.meta)
	for {
		var n int64
		if err := s.pool.QueryRow(ctx, roomsSQL, l, q, pruneBatch).Scan(&n); err != nil {
			return rep, fmt.Errorf("pruning %s: %w", s.t.rooms, err)
		}
		rep.Rooms += n
		if n < pruneBatch {
			break
		}
	}
	return rep, nil
}
