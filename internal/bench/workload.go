// Package bench implements `tidemark bench`: the canonical workload
// (../shared/bench: 70% event+event_json, 20% read marker, 10% membership),
// a backlog drain timed against pg_recvlogical, and a live latency run.
package bench

import (
	"context"
	_ "embed"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Schema and Seed are the canonical benchmark schema and seed data (500
// rooms x 20 members, 2,000 users), copied from shared/bench.
//
//go:embed schema.sql
var Schema string

//go:embed seed.sql
var Seed string

// Tables are the canonical tables.
var Tables = []string{"public.users", "public.rooms", "public.room_memberships", "public.events", "public.event_json", "public.read_markers"}

const (
	sqlMessage = `WITH e AS (
  INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ($1, $2, $3, 'm.room.message', $4)
  RETURNING event_id, room_id)
INSERT INTO event_json(event_id, room_id, json)
  SELECT event_id, room_id, '{"type":"m.room.message","content":{"msgtype":"m.text","body":"hello from bench, a message of ordinary length for a chat room"}}' FROM e`
	sqlRead = `INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering)
  SELECT $1, room_id, event_id, stream_ordering FROM events
  WHERE room_id = $2 ORDER BY stream_ordering DESC LIMIT 1
ON CONFLICT (user_id, room_id) DO UPDATE SET event_id = EXCLUDED.event_id, stream_ordering = EXCLUDED.stream_ordering, updated_at = now()
  WHERE read_markers.stream_ordering < EXCLUDED.stream_ordering`
	sqlMember = `INSERT INTO room_memberships(room_id, user_id, membership, event_id) VALUES ($1, $2, $3, $4)
  ON CONFLICT (room_id, user_id) DO UPDATE SET membership = EXCLUDED.membership, event_id = EXCLUDED.event_id, updated_at = now()`
)

// Tally counts what a workload committed.
type Tally struct {
	Transactions atomic.Int64 // transactions that changed rows
	Changes      atomic.Int64 // row changes they made
}

// generator runs canonical transactions.
type generator struct {
	pool   *pgxpool.Pool
	prefix string
	seq    atomic.Int64
	tally  *Tally
	// onEvent, when set, is called with each event id after its commit
	// returned.
	onEvent func(id string, committed time.Time)
}

// one runs one transaction of the mix.
func (g *generator) one(ctx context.Context, rng *rand.Rand) error {
	room := fmt.Sprintf("!r%d:bench.test", 1+rng.IntN(500))
	user := fmt.Sprintf("@u%d:bench.test", 1+rng.IntN(2000))
	n := g.seq.Add(1)
	switch p := rng.IntN(10); {
	case p < 7:
		id := fmt.Sprintf("$%s%d:bench.test", g.prefix, n)
		if _, err := g.pool.Exec(ctx, sqlMessage, id, room, user, time.Now().UnixMilli()); err != nil {
			return fmt.Errorf("message transaction: %w", err)
		}
		if g.onEvent != nil {
			g.onEvent(id, time.Now())
		}
		g.tally.Transactions.Add(1)
		g.tally.Changes.Add(2)
	case p < 9:
		tag, err := g.pool.Exec(ctx, sqlRead, user, room)
		if err != nil {
			return fmt.Errorf("read-marker transaction: %w", err)
		}
		if rows := tag.RowsAffected(); rows > 0 {
			g.tally.Transactions.Add(1)
			g.tally.Changes.Add(rows)
		}
	default:
		m := "join"
		if rng.IntN(2) == 0 {
			m = "leave"
		}
		if _, err := g.pool.Exec(ctx, sqlMember, room, user, m, fmt.Sprintf("$m%s%d", g.prefix, n)); err != nil {
			return fmt.Errorf("membership transaction: %w", err)
		}
		g.tally.Transactions.Add(1)
		g.tally.Changes.Add(1)
	}
	return nil
}

// runCount runs total transactions on workers connections, as fast as
// possible, calling progress now and then.
func (g *generator) runCount(ctx context.Context, total, workers int, progress func(done int64)) error {
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	var done atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w)+1, uint64(time.Now().UnixNano())))
			for done.Add(1) <= int64(total) {
				if err := g.one(ctx, rng); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	stop := make(chan struct{})
	go func() {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				progress(min(done.Load(), int64(total)))
			}
		}
	}()
	wg.Wait()
	close(stop)
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// runRate runs the mix at rate transactions per second for d. It returns
// how many ticks could not be served because every worker was busy.
func (g *generator) runRate(ctx context.Context, rate, workers int, d time.Duration) (behind int64, err error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	jobs := make(chan struct{}, workers*4)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w)+101, uint64(time.Now().UnixNano())))
			for range jobs {
				if err := g.one(ctx, rng); err != nil {
					if ctx.Err() == nil {
						errs <- err
					}
					return
				}
			}
		}(w)
	}
	start := time.Now()
	var sent int64
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case now := <-t.C:
			due := int64(now.Sub(start).Seconds() * float64(rate))
			for ; sent < due; sent++ {
				select {
				case jobs <- struct{}{}:
				default:
					behind++
				}
			}
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err = <-errs:
	default:
	}
	return behind, err
}
