package targets

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	kafkago "github.com/segmentio/kafka-go"

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
//     only records after its committed offset, whose positions are above
//     the record just before it (a partition is in commit order).
//
// The watermark is the lower of the two; facts strictly below it are
// pruned. Resetting the group's offsets to an earlier point breaks the
// second premise: that needs `tidemark rebuild targets --all` anyway.

// PruneWatermark returns the position below which no change of the group's
// fact topics can reach it again, or the zero position and why not (no
// slot, a partition with records the group has not committed on).
// transport carries the connection security (nil: kafka-go's default).
func PruneWatermark(ctx context.Context, src *pgxpool.Pool, slot string, brokers []string, transport kafkago.RoundTripper,
	group string, topics []string) (pipeline.Position, string, error) {
	var confirmed *string
	err := src.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed)
	if errors.Is(err, pgx.ErrNoRows) {
		return pipeline.Position{}, fmt.Sprintf("replication slot %s does not exist", slot), nil
	}
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("reading slot %s: %w", slot, err)
	}
	if confirmed == nil {
		return pipeline.Position{}, fmt.Sprintf("replication slot %s has confirmed nothing yet", slot), nil
	}
	c, err := pipeline.ParseLSN(*confirmed)
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("slot %s: %w", slot, err)
	}
	w := pipeline.Position{CommitLSN: c}

	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second, Transport: transport}
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("reading topic metadata: %w", err)
	}
	req := map[string][]kafkago.OffsetRequest{}
	parts := map[string][]int{}
	for _, t := range meta.Topics {
		if t.Error != nil {
			return pipeline.Position{}, "", fmt.Errorf("topic %s: %w", t.Name, t.Error)
		}
		for _, p := range t.Partitions {
			req[t.Name] = append(req[t.Name], kafkago.LastOffsetOf(p.ID))
			parts[t.Name] = append(parts[t.Name], p.ID)
		}
	}
	offs, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: req})
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("listing end offsets: %w", err)
	}
	resp, err := client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: group, Topics: parts})
	if err == nil {
		err = resp.Error
	}
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("reading the committed offsets of group %s: %w", group, err)
	}
	committed := map[string]map[int]int64{}
	for t, ps := range resp.Topics {
		committed[t] = map[int]int64{}
		for _, p := range ps {
			if p.Error == nil {
				committed[t][p.Partition] = p.CommittedOffset
			}
		}
	}
	names := make([]string, 0, len(offs.Topics))
	for t := range offs.Topics {
		names = append(names, t)
	}
	sort.Strings(names)
	for _, t := range names {
		for _, p := range offs.Topics[t] {
			if p.Error != nil {
				return pipeline.Position{}, "", fmt.Errorf("end offset of %s/%d: %w", t, p.Partition, p.Error)
			}
			end := p.LastOffset
			if end <= 0 {
				continue // never written: nothing there to replay
			}
			co, ok := committed[t][p.Partition]
			if !ok || co <= 0 {
				return pipeline.Position{}, fmt.Sprintf("group %s has committed nothing on %s/%d", group, t, p.Partition), nil
			}
			pos, err := positionAt(ctx, client, t, p.Partition, co-1)
			if err != nil {
				return pipeline.Position{}, "", err
			}
			if pos.Less(w) {
				w = pos
			}
		}
	}
	return w, "", nil
}

// positionAt reads the position headers of the record at offset.
func positionAt(ctx context.Context, client *kafkago.Client, topic string, partition int, offset int64) (pipeline.Position, error) {
	resp, err := client.Fetch(ctx, &kafkago.FetchRequest{Topic: topic, Partition: partition, Offset: offset, MinBytes: 1, MaxBytes: 1 << 20, MaxWait: time.Second})
	if err == nil {
		err = resp.Error
	}
	if err != nil {
		return pipeline.Position{}, fmt.Errorf("reading %s/%d@%d: %w", topic, partition, offset, err)
	}
	for {
		rec, err := resp.Records.ReadRecord()
		if errors.Is(err, io.EOF) {
			return pipeline.Position{}, fmt.Errorf("reading %s/%d@%d: no record there (deleted by retention?)", topic, partition, offset)
		}
		if err != nil {
			return pipeline.Position{}, fmt.Errorf("reading %s/%d@%d: %w", topic, partition, offset, err)
		}
		if rec.Offset < offset {
			continue // a batch begins before the offset asked for
		}
		var lsn, seq string
		for _, h := range rec.Headers {
			switch h.Key {
			case "tidemark-lsn":
				lsn = string(h.Value)
			case "tidemark-seq":
				seq = string(h.Value)
			}
		}
		l, err1 := strconv.ParseUint(lsn, 10, 64)
		q, err2 := strconv.ParseUint(seq, 10, 32)
		if err1 != nil || err2 != nil {
			return pipeline.Position{}, fmt.Errorf("%s/%d@%d carries no position headers (tidemark-lsn %q, tidemark-seq %q)", topic, partition, rec.Offset, lsn, seq)
		}
		return pipeline.Position{CommitLSN: pipeline.LSN(l), Seq: uint32(q)}, nil
	}
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
// versions they have seen). Each batch is its own short transaction.
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
  SELECT ctid FROM %[1]s WHERE NOT joined AND (lsn, seq) < ($1, $2) LIMIT $3)) AND NOT joined AND (lsn, seq) < ($1, $2)`, s.t.members), &rep.Memberships); err != nil {
		return rep, fmt.Errorf("pruning %s: %w", s.t.members, err)
	}
	if err := loop(fmt.Sprintf(`DELETE FROM %[1]s WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM %[1]s WHERE active AND (lsn, seq) < ($1, $2) LIMIT $3)) AND active AND (lsn, seq) < ($1, $2)`, s.t.users), &rep.Users); err != nil {
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
     LIMIT $3))
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
