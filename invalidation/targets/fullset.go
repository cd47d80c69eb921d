package targets

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/pipeline"
)

// FullSet is a room's whole kept target set at one version, read from one
// snapshot of the state.
type FullSet struct {
	Room    string
	Version uint64
	Pos     pipeline.Position
	Count   int
	tx      pgx.Tx
	s       *Store
}

// fullChunk is how many users a FullSet iterator returns at once.
const fullChunk = 10000

// Users iterates over the set in sorted chunks of at most 10,000 users:
// next returns nil, nil at the end. It may be called again for another
// pass; close must be called when the iteration stops early. Memory is
// one chunk, whatever the room's size.
func (f *FullSet) Users(ctx context.Context) (next func() ([]string, error), close func()) {
	rows, err := f.tx.Query(ctx, fmt.Sprintf(`SELECT user_id FROM %s WHERE room_id = $1 ORDER BY user_id`, f.s.t.targets), f.Room)
	if err != nil {
		return func() ([]string, error) { return nil, err }, func() {}
	}
	done := false
	next = func() ([]string, error) {
		if done {
			return nil, nil
		}
		var chunk []string
		for len(chunk) < fullChunk && rows.Next() {
			var u string
			if err := rows.Scan(&u); err != nil {
				rows.Close()
				done = true
				return nil, err
			}
			chunk = append(chunk, u)
		}
		if len(chunk) < fullChunk {
			rows.Close()
			done = true
			if err := rows.Err(); err != nil {
				return nil, fmt.Errorf("reading the targets of %s: %w", f.Room, err)
			}
		}
		if len(chunk) == 0 {
			return nil, nil
		}
		return chunk, nil
	}
	return next, rows.Close
}

// FullPublisher prepares a room's full set for an output while the
// snapshot is open (bounded memory: see KafkaOutput.PrepareFull) and
// returns what sends it, which PublishFullSets calls after the snapshot
// has ended (no state transaction stays open while an output is slow or
// down). send returns once the output has it.
type FullPublisher func(ctx context.Context, fs *FullSet) (send func(context.Context) error, err error)

// ReadFull calls fn with the full set of room as committed now (a
// repeatable-read snapshot held while fn runs).
func (s *Store) ReadFull(ctx context.Context, room string, fn func(fs *FullSet) error) error {
	tx, err := s.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return fmt.Errorf("reading the full set of %s: %w", room, err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	fs := &FullSet{Room: room, tx: tx, s: s}
	var ver, l, q, n int64
	err = tx.QueryRow(ctx, fmt.Sprintf(`SELECT version, lsn, seq, members FROM %s WHERE room_id = $1`, s.t.rooms), room).Scan(&ver, &l, &q, &n)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		// Never settled (or pruned): the empty set, at version 0.
	case err != nil:
		return fmt.Errorf("reading the full set of %s: %w", room, err)
	default:
		fs.Version, fs.Pos, fs.Count = uint64(ver), posOf(l, q), int(n)
	}
	return fn(fs)
}

// FullSetsDue lists up to limit large rooms (more than FullSetMax kept
// targets), and rooms that were large once, whose full set was not
// published at their current version and not within interval, the longest
// waiting first. A room that shrank keeps getting scheduled full sets while
// it changes: its own updates carry the set again, but one of them may
// have reached the compacted topic before a scheduled set of an older
// version, and the schedule's next round puts a current one after it.
func (s *Store) FullSetsDue(ctx context.Context, interval time.Duration, limit int) ([]string, error) {
	rows, err := s.pool.Query(ctx, fmt.Sprintf(`SELECT room_id FROM %s
WHERE (members > $1 OR full_version > 0) AND version > full_version AND (full_at IS NULL OR full_at < now() - $2::interval)
ORDER BY full_at NULLS FIRST, room_id LIMIT $3`, s.t.rooms), s.fullSetMax(), interval.String(), limit)
	if err != nil {
		return nil, fmt.Errorf("listing rooms due a full set: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// PublishFullSets publishes the full set of each room with publishFull:
// from a snapshot, at the version the room has in it, and records it
// (full_version, full_at). It does not hold the room's publishing lease
// (Drain): a large room's full set can take a second to read and write,
// and its changes keep flowing meanwhile. So a room's change records up
// to the full set's version may reach the outputs after it; a consumer
// that takes the full set of version V skips changes at or below V. One
// publisher of a room's full set runs at a time (a lease of its own).
func (s *Store) PublishFullSets(ctx context.Context, rooms []string, publishFull FullPublisher) (int, error) {
	done := 0
	for _, room := range dedupeSorted(rooms) {
		err := s.leased(ctx, s.fullSetSpace(), []string{room}, func(conn *pgxpool.Conn) error {
			var version uint64
			var send func(context.Context) error
			err := s.ReadFull(ctx, room, func(fs *FullSet) error {
				version = fs.Version
				var err error
				send, err = publishFull(ctx, fs)
				return err
			})
			if err != nil {
				return err
			}
			if err := send(ctx); err != nil {
				return err
			}
			_, err = conn.Exec(ctx, fmt.Sprintf(`UPDATE %s SET full_version = greatest(full_version, $2), full_at = now() WHERE room_id = $1`, s.t.rooms), room, int64(version))
			return err
		})
		if err != nil {
			return done, fmt.Errorf("publishing the full set of %s: %w", room, err)
		}
		done++
	}
	return done, nil
}
