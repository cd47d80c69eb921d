// Package demo holds the chat schema and a small mixed workload used by
// `tidemark demo` and by integration tests.
package demo

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/internal/bench"
)

// Schema is the canonical chat schema (users, rooms, room_memberships,
// events, event_json, read_markers; the benchmark's), with full replica
// identity on events and event_json: the demo routes them into the per-room
// entity stream, so their deletes must carry room_id.
var Schema = bench.Schema + `
ALTER TABLE events REPLICA IDENTITY FULL;
ALTER TABLE event_json REPLICA IDENTITY FULL;
`

// Tables are the canonical tables, schema-qualified.
var Tables = []string{"public.users", "public.rooms", "public.room_memberships", "public.events", "public.event_json", "public.read_markers"}

// Sizes of the seeded data.
const (
	Users = 200
	Rooms = 20
)

// UserID and RoomID name the seeded rows.
func UserID(i int) string { return fmt.Sprintf("@u%d:demo.test", i) }

// RoomID names a seeded room.
func RoomID(i int) string { return fmt.Sprintf("!r%d:demo.test", i) }

// Setup creates the schema and seeds users, rooms and memberships.
func Setup(ctx context.Context, pool *pgxpool.Pool) error {
	if _, err := pool.Exec(ctx, Schema); err != nil {
		return fmt.Errorf("creating schema: %w", err)
	}
	return nil
}

// Seed inserts users, rooms and 10 members per room, in one transaction.
func Seed(ctx context.Context, pool *pgxpool.Pool) error {
	_, err := pool.Exec(ctx, fmt.Sprintf(`
INSERT INTO users(user_id) SELECT '@u'||g||':demo.test' FROM generate_series(1,%d) g ON CONFLICT DO NOTHING;
INSERT INTO rooms(room_id) SELECT '!r'||g||':demo.test' FROM generate_series(1,%d) g ON CONFLICT DO NOTHING;
INSERT INTO room_memberships(room_id,user_id,membership)
  SELECT '!r'||r||':demo.test', '@u'||(((r*7+m*13) %% %d)+1)||':demo.test', 'join'
  FROM generate_series(1,%d) r, generate_series(1,10) m ON CONFLICT DO NOTHING;`, Users, Rooms, Users, Rooms))
	if err != nil {
		return fmt.Errorf("seeding: %w", err)
	}
	return nil
}

// Counts are the transactions a workload committed that changed rows.
type Counts struct {
	Transactions atomic.Int64
	Messages     atomic.Int64 // event + event_json transactions
	Reads        atomic.Int64
	Members      atomic.Int64
	Errors       atomic.Int64
}

// Workload drives the canonical mix (70% message, 20% read marker, 10%
// membership) at rate transactions per second (0: as fast as possible) until
// ctx ends.
func Workload(ctx context.Context, pool *pgxpool.Pool, rate int, seed uint64, c *Counts) error {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var tick <-chan time.Time
	if rate > 0 {
		t := time.NewTicker(time.Second / time.Duration(rate))
		defer t.Stop()
		tick = t.C
	}
	n := 0
	for {
		if tick != nil {
			select {
			case <-ctx.Done():
				return nil
			case <-tick:
			}
		} else if ctx.Err() != nil {
			return nil
		}
		n++
		room := RoomID(1 + rng.IntN(Rooms))
		user := UserID(1 + rng.IntN(Users))
		var err error
		wrote := true
		switch p := rng.IntN(10); {
		case p < 7:
			err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				id := fmt.Sprintf("$e%d-%d:demo.test", seed, n)
				if _, err := tx.Exec(ctx, `INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ($1,$2,$3,'m.room.message',$4)`,
					id, room, user, time.Now().UnixMilli()); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, `INSERT INTO event_json(event_id, room_id, json) VALUES ($1,$2,$3)`,
					id, room, fmt.Sprintf(`{"type":"m.room.message","content":{"msgtype":"m.text","body":"hello %d"}}`, n))
				return err
			})
			if err == nil {
				c.Messages.Add(1)
			}
		case p < 9:
			var tag pgconn.CommandTag
			tag, err = pool.Exec(ctx, `INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering)
  SELECT $1, room_id, event_id, stream_ordering FROM events WHERE room_id = $2 ORDER BY stream_ordering DESC LIMIT 1
ON CONFLICT (user_id, room_id) DO UPDATE SET event_id = EXCLUDED.event_id, stream_ordering = EXCLUDED.stream_ordering, updated_at = now()
  WHERE read_markers.stream_ordering < EXCLUDED.stream_ordering`, user, room)
			// No newer event: nothing is written, and no transaction reaches
			// the WAL.
			wrote = err == nil && tag.RowsAffected() > 0
			if wrote {
				c.Reads.Add(1)
			}
		default:
			m := "join"
			if rng.IntN(2) == 0 {
				m = "leave"
			}
			_, err = pool.Exec(ctx, `INSERT INTO room_memberships(room_id, user_id, membership, event_id) VALUES ($1,$2,$3,$4)
  ON CONFLICT (room_id, user_id) DO UPDATE SET membership = EXCLUDED.membership, event_id = EXCLUDED.event_id, updated_at = now()`,
				room, user, m, fmt.Sprintf("$m%d-%d", seed, n))
			if err == nil {
				c.Members.Add(1)
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			c.Errors.Add(1)
			return fmt.Errorf("workload transaction %d: %w", n, err)
		}
		if wrote {
			c.Transactions.Add(1)
		}
	}
}
