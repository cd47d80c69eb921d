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

// The canonical transactions (shared/bench), parameterised. SQLMessage:
// ($1 event id, $2 room, $3 sender, $4 origin_ts); SQLRead: ($1 user, $2
// room), a read marker to the room's latest event that never moves
// backwards; SQLMember: ($1 room, $2 user, $3 membership, $4 event id).
const (
	SQLMessage = `WITH e AS (
  INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ($1, $2, $3, 'm.room.message', $4)
  RETURNING event_id, room_id)
INSERT INTO event_json(event_id, room_id, json)
  SELECT event_id, room_id, '{"type":"m.room.message","content":{"msgtype":"m.text","body":"hello from bench, a message of ordinary length for a chat room"}}' FROM e`
	SQLRead = `INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering)
  SELECT $1, room_id, event_id, stream_ordering FROM events
  WHERE room_id = $2 ORDER BY stream_ordering DESC LIMIT 1
ON CONFLICT (user_id, room_id) DO UPDATE SET event_id = EXCLUDED.event_id, stream_ordering = EXCLUDED.stream_ordering, updated_at = now()
  WHERE read_markers.stream_ordering < EXCLUDED.stream_ordering`
	SQLMember = `INSERT INTO room_memberships(room_id, user_id, membership, event_id) VALUES ($1, $2, $3, $4)
  ON CONFLICT (room_id, user_id) DO UPDATE SET membership = EXCLUDED.membership, event_id = EXCLUDED.event_id, updated_at = now()`
)

// Tally counts what a workload committed.
type Tally struct {
	Transactions atomic.Int64 // transactions that changed rows
	Changes      atomic.Int64 // row changes they made
}

// Workload runs the canonical mix (70% event + event_json, 20% read
// marker, 10% membership) for tests and tools.
type Workload struct {
	Pool *pgxpool.Pool
	// Prefix makes event ids "$<Prefix><n>:bench.test".
	Prefix string
	// Rooms: "!r1:bench.test" .. "!r<Rooms>:bench.test". Default 500.
	Rooms int
	// OnEvent, when set, is called with each event id after its commit.
	OnEvent func(id string, committed time.Time)
}

// Run commits total transactions on workers connections.
func (w *Workload) Run(ctx context.Context, total, workers int) error {
	g := &generator{pool: w.Pool, prefix: w.Prefix, rooms: w.Rooms, tally: &Tally{}, onEvent: w.OnEvent}
	return g.runCount(ctx, total, workers, nil)
}

// generator runs canonical transactions.
type generator struct {
	pool   *pgxpool.Pool
	prefix string
	rooms  int // default 500
	seq    atomic.Int64
	tally  *Tally
	// onEvent, when set, is called with each event id after its commit
	// returned.
	onEvent func(id string, committed time.Time)
}

// one runs one transaction of the mix.
func (g *generator) one(ctx context.Context, rng *rand.Rand) error {
	rooms := g.rooms
	if rooms <= 0 {
		rooms = 500
	}
	room := fmt.Sprintf("!r%d:bench.test", 1+rng.IntN(rooms))
	user := fmt.Sprintf("@u%d:bench.test", 1+rng.IntN(2000))
	n := g.seq.Add(1)
	switch p := rng.IntN(10); {
	case p < 7:
		id := fmt.Sprintf("$%s%d:bench.test", g.prefix, n)
		if _, err := g.pool.Exec(ctx, SQLMessage, id, room, user, time.Now().UnixMilli()); err != nil {
			return fmt.Errorf("message transaction: %w", err)
		}
		if g.onEvent != nil {
			g.onEvent(id, time.Now())
		}
		g.tally.Transactions.Add(1)
		g.tally.Changes.Add(2)
	case p < 9:
		tag, err := g.pool.Exec(ctx, SQLRead, user, room)
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
		if _, err := g.pool.Exec(ctx, SQLMember, room, user, m, fmt.Sprintf("$m%s%d", g.prefix, n)); err != nil {
			return fmt.Errorf("membership transaction: %w", err)
		}
		g.tally.Transactions.Add(1)
		g.tally.Changes.Add(1)
	}
	return nil
}

// runCount runs total transactions on workers connections, as fast as
// possible, calling progress (when set) now and then.
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
				if progress != nil {
					progress(min(done.Load(), int64(total)))
				}
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
