package targets

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/pipeline"
)

// Auditor compares kept targets with the source database.
type Auditor struct {
	Mapping Mapping
	Source  *pgxpool.Pool
	Store   *Store
	// Passed blocks until the pipeline (capture and the targets consumer)
	// has applied every change committed before lsn, or ctx ends. Without
	// it a mismatch cannot be confirmed (the report is Unconfirmed).
	Passed func(ctx context.Context, lsn pipeline.LSN) error
	// Wait bounds the wait for the pipeline and for dirty rooms. Default 60s.
	Wait time.Duration
}

// Mismatch is one room whose kept targets differ from the database.
type Mismatch struct {
	Room    string
	Missing []string // in the database, not kept
	Extra   []string // kept, not in the database
}

// AuditReport is the outcome of an audit.
type AuditReport struct {
	LSN pipeline.LSN // the database was read as of this WAL position
	// WaitLSN is the position re-checks wait for the pipeline to pass:
	// LSN, since the snapshot holds exactly the transactions committed
	// before it (see readSnapshot).
	WaitLSN    pipeline.LSN
	Rooms      int // rooms compared
	Consistent int
	Ratio      float64 // Consistent / Rooms (1 when no room was compared)
	// Suspected counts rooms that differed at first sight and were
	// re-checked once the pipeline had passed LSN.
	Suspected  int
	Mismatches []Mismatch
	// Unconfirmed is set when mismatches could not be re-checked (the
	// pipeline did not pass WaitLSN within Wait): that is lag, not a
	// verdict. The suspects are then listed in Mismatches and counted in
	// Ratio as if inconsistent; a periodic audit must not report that
	// Ratio as the consistency of the kept state.
	Unconfirmed bool
}

// Audit compares sample rooms (all when sample <= 0) of the database with
// the kept targets. A first mismatch may be lag: the consumer has not yet
// applied a change the database already shows, or has applied one made
// after the snapshot. So each mismatching room is re-checked once the
// pipeline has passed every transaction the snapshot shows (WaitLSN, which
// is LSN: the snapshot holds exactly the transactions committed before
// it) and the room is settled, and a
// difference counts only for pairs whose facts are no newer than the
// snapshot: then the kept state must equal what the database said.
func (a *Auditor) Audit(ctx context.Context, sample int) (AuditReport, error) {
	c, err := compile(a.Mapping)
	if err != nil {
		return AuditReport{}, err
	}
	wait := a.Wait
	if wait <= 0 {
		wait = time.Minute
	}
	var rep AuditReport
	truth := map[string]map[string]bool{}      // of suspect rooms
	keptAtRead := map[string]map[string]bool{} // of suspect rooms
	var rooms, suspects []string
	err = readSnapshot(ctx, a.Source, func(stx pgx.Tx, lsn pipeline.LSN) error {
		rep.LSN = lsn
		// The snapshot holds exactly the transactions committed before
		// lsn, so the pipeline has applied all it shows once it passes lsn.
		rep.WaitLSN = lsn
		q, args := c.truthSQL(false)
		rows, err := stx.Query(ctx, `SELECT DISTINCT room FROM (`+q+`) AS x(room, usr)`, args...)
		if err != nil {
			return fmt.Errorf("listing source rooms: %w", err)
		}
		if rooms, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return err
		}
		rows, err = a.Store.pool.Query(ctx, fmt.Sprintf(`SELECT DISTINCT room_id FROM %s`, a.Store.t.targets))
		if err != nil {
			return fmt.Errorf("listing kept rooms: %w", err)
		}
		kept, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		rooms = dedupeSorted(append(rooms, kept...))
		if sample > 0 && sample < len(rooms) {
			rand.Shuffle(len(rooms), func(i, j int) { rooms[i], rooms[j] = rooms[j], rooms[i] })
			rooms = rooms[:sample]
			sort.Strings(rooms)
		}
		// Compare in chunks, keeping only the differing rooms' truth.
		q, args = c.truthSQL(true)
		for start := 0; start < len(rooms); start += 500 {
			chunk := rooms[start:min(start+500, len(rooms))]
			args[len(args)-1] = chunk
			rows, err = stx.Query(ctx, q, args...)
			if err != nil {
				return fmt.Errorf("reading source targets: %w", err)
			}
			part := map[string]map[string]bool{}
			var r, u string
			if _, err = pgx.ForEachRow(rows, []any{&r, &u}, func() error {
				if part[r] == nil {
					part[r] = map[string]bool{}
				}
				part[r][u] = true
				return nil
			}); err != nil {
				return err
			}
			kept, err := a.Store.Kept(ctx, chunk)
			if err != nil {
				return err
			}
			for _, r := range chunk {
				if !sameSet(part[r], kept[r]) {
					suspects = append(suspects, r)
					truth[r] = part[r]
					keptAtRead[r] = kept[r]
				}
			}
		}
		return nil
	})
	if err != nil {
		return rep, err
	}
	rep.Rooms = len(rooms)
	rep.Suspected = len(suspects)
	bad := map[string]Mismatch{}
	if len(suspects) > 0 {
		wctx, cancel := context.WithTimeout(ctx, wait)
		confirmed := a.Passed != nil && a.Passed(wctx, rep.WaitLSN) == nil && a.waitSettled(wctx, suspects) == nil
		cancel()
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
		if !confirmed {
			rep.Unconfirmed = true
			for _, r := range suspects {
				bad[r] = diff(r, truth[r], keptAtRead[r])
			}
		} else if bad, err = a.recheck(ctx, suspects, truth, stampBelow(rep.LSN)); err != nil {
			return rep, err
		}
	}
	for _, r := range rooms {
		if m, ok := bad[r]; ok {
			rep.Mismatches = append(rep.Mismatches, m)
		}
	}
	rep.Consistent = rep.Rooms - len(rep.Mismatches)
	rep.Ratio = 1
	if rep.Rooms > 0 {
		rep.Ratio = float64(rep.Consistent) / float64(rep.Rooms)
	}
	return rep, nil
}

// waitSettled waits until none of rooms is dirty.
func (a *Auditor) waitSettled(ctx context.Context, rooms []string) error {
	for {
		var n int
		if err := a.Store.pool.QueryRow(ctx, fmt.Sprintf(`SELECT count(*) FROM %s WHERE dirty AND room_id = ANY($1::text[])`, a.Store.t.rooms), rooms).Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// recheck compares the kept targets of rooms with the database's, pair by
// pair, ignoring pairs whose facts changed after the snapshot (stamp).
func (a *Auditor) recheck(ctx context.Context, rooms []string, truth map[string]map[string]bool, stamp pipeline.Position) (map[string]Mismatch, error) {
	kept, err := a.Store.Kept(ctx, rooms)
	if err != nil {
		return nil, err
	}
	newer := map[string]map[string]bool{}
	rows, err := a.Store.pool.Query(ctx, fmt.Sprintf(`SELECT m.room_id, m.user_id FROM %s m LEFT JOIN %s u ON u.user_id = m.user_id
WHERE m.room_id = ANY($1::text[]) AND ((m.lsn, m.seq) > ($2, $3) OR (coalesce(u.lsn, 0), coalesce(u.seq, 0)) > ($2, $3))`,
		a.Store.t.members, a.Store.t.users), rooms, int64(stamp.CommitLSN), int64(stamp.Seq))
	if err != nil {
		return nil, fmt.Errorf("reading fact positions: %w", err)
	}
	var r, u string
	if _, err := pgx.ForEachRow(rows, []any{&r, &u}, func() error {
		if newer[r] == nil {
			newer[r] = map[string]bool{}
		}
		newer[r][u] = true
		return nil
	}); err != nil {
		return nil, err
	}
	bad := map[string]Mismatch{}
	for _, room := range rooms {
		m := diff(room, truth[room], kept[room])
		m.Missing = without(m.Missing, newer[room])
		m.Extra = without(m.Extra, newer[room])
		if len(m.Missing)+len(m.Extra) > 0 {
			bad[room] = m
		}
	}
	return bad, nil
}

func without(us []string, skip map[string]bool) []string {
	out := us[:0]
	for _, u := range us {
		if !skip[u] {
			out = append(out, u)
		}
	}
	return out
}

func sameSet(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func diff(room string, truth, kept map[string]bool) Mismatch {
	m := Mismatch{Room: room}
	for u := range truth {
		if !kept[u] {
			m.Missing = append(m.Missing, u)
		}
	}
	for u := range kept {
		if !truth[u] {
			m.Extra = append(m.Extra, u)
		}
	}
	sort.Strings(m.Missing)
	sort.Strings(m.Extra)
	return m
}
