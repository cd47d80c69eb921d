package integrity

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/capture"
)

// GroupLock enforces the single member the integrity consumer needs: a
// transaction's changes are correlated across partitions, so two members of
// one group would each see part of every transaction and raise false
// alarms. The lock is a session-level advisory lock in the state database,
// keyed by the state schema and the group, held on a connection of its own
// for the consumer's life.
//
// A second member waits for the lock before it joins the group, warns once
// naming the holder, and shows it in Waiting. When the holding connection
// is lost, the lock is re-taken on a new connection within LossGrace; when
// another member took it meanwhile, or the database stays unreachable, Hold
// ends with an error naming the group, so this member stops instead of
// running beside another one.
type GroupLock struct {
	// Connect opens the lock's own connection (to the state database).
	Connect func(ctx context.Context) (*pgx.Conn, error)
	Schema  string
	Group   string
	// Poll is how often a waiting member tries again (default 2 s); Check
	// how often the holding connection is checked (default 5 s);
	// LossGrace how long a lost connection may take to be replaced
	// (default 30 s).
	Poll, Check, LossGrace time.Duration
	Log                    *zap.Logger

	mu      sync.Mutex // guards conn (read by pid)
	conn    *pgx.Conn
	waiting atomic.Bool
	waits   atomic.Uint64
}

// lockKeyClass is the first key of every integrity group lock (the second
// is the hash of schema and group).
const lockKeyClass = "tidemark.integrity.group"

func (l *GroupLock) defaults() {
	if l.Poll <= 0 {
		l.Poll = 2 * time.Second
	}
	if l.Check <= 0 {
		l.Check = 5 * time.Second
	}
	if l.LossGrace <= 0 {
		l.LossGrace = 30 * time.Second
	}
	if l.Log == nil {
		l.Log = zap.NewNop()
	}
}

// Waiting reports whether Acquire is waiting for another member's lock.
func (l *GroupLock) Waiting() bool { return l.waiting.Load() }

// Waits counts the times Acquire found the lock held by another member.
func (l *GroupLock) Waits() uint64 { return l.waits.Load() }

func (l *GroupLock) tryOn(ctx context.Context, conn *pgx.Conn) (bool, error) {
	var ok bool
	err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))`,
		lockKeyClass, l.Schema+"."+l.Group).Scan(&ok)
	return ok, err
}

// holder describes the session holding the lock, for the warning.
func (l *GroupLock) holder(ctx context.Context, conn *pgx.Conn) string {
	var pid int32
	var app, addr, since string
	err := conn.QueryRow(ctx, `
SELECT a.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'),
       coalesce(to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')
  FROM pg_locks k JOIN pg_stat_activity a ON a.pid = k.pid
 WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
   AND k.classid = hashtext($1)::oid AND k.objid = hashtext($2)::oid
 LIMIT 1`, lockKeyClass, l.Schema+"."+l.Group).Scan(&pid, &app, &addr, &since)
	if err != nil {
		return "unknown session"
	}
	return fmt.Sprintf("backend pid %d (application_name %q, client %s, connected %s)", pid, app, addr, since)
}

// Acquire waits until this member holds the group's lock, or ctx ends.
func (l *GroupLock) Acquire(ctx context.Context) error {
	l.defaults()
	start := time.Now()
	warned, failing := false, 0
	var conn *pgx.Conn
	for {
		var ok bool
		var err error
		if conn == nil {
			conn, err = l.Connect(ctx)
		}
		if err == nil {
			ok, err = l.tryOn(ctx, conn)
		}
		if err != nil {
			if conn != nil {
				_ = conn.Close(context.Background())
				conn = nil
			}
			if ctx.Err() != nil {
				l.waiting.Store(false)
				return ctx.Err()
			}
			if capture.IsAccessDenied(err) {
				l.waiting.Store(false)
				return fmt.Errorf("integrity: taking the lock of group %q: %w", l.Group, err)
			}
			// The state database is down or restarting: waiting heals it.
			if failing++; failing == 1 || failing%30 == 0 {
				l.Log.Warn("taking the integrity group lock failed; retrying", zap.String("group", l.Group), zap.Error(err), zap.Int("attempt", failing))
			}
			select {
			case <-ctx.Done():
				l.waiting.Store(false)
				return ctx.Err()
			case <-time.After(l.Poll):
			}
			continue
		}
		failing = 0
		if ok {
			l.setConn(conn)
			l.waiting.Store(false)
			if warned {
				l.Log.Info("integrity group lock taken; this member now consumes",
					zap.String("group", l.Group), zap.Duration("waited", time.Since(start).Round(time.Millisecond)))
			}
			return nil
		}
		if !warned {
			warned = true
			l.waits.Add(1)
			l.waiting.Store(true)
			l.Log.Warn("another integrity member of this group is running; integrity needs exactly one, so this member waits until that one stops",
				zap.String("group", l.Group), zap.String("schema", l.Schema), zap.String("holder", l.holder(ctx, conn)))
		}
		select {
		case <-ctx.Done():
			_ = conn.Close(context.Background())
			l.waiting.Store(false)
			return ctx.Err()
		case <-time.After(l.Poll):
		}
	}
}

// ErrLockLost ends Hold when the lock cannot be kept.
var ErrLockLost = errors.New("integrity group lock lost")

// Hold keeps the lock until ctx ends, then releases it. It returns an error
// wrapping ErrLockLost when the lock was lost and could not be re-taken
// within LossGrace (another member took it, or the database stayed
// unreachable).
func (l *GroupLock) Hold(ctx context.Context) error {
	l.defaults()
	defer l.release()
	t := time.NewTicker(l.Check)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		// Bounded: a half-open connection must not hide a lost lock.
		cctx, cancel := context.WithTimeout(ctx, l.Check)
		_, err := l.conn.Exec(cctx, "SELECT 1")
		cancel()
		if err == nil {
			continue
		} else if ctx.Err() != nil {
			return nil
		} else if err := l.retake(ctx, err); err != nil {
			return err
		}
	}
}

// retake replaces a lost lock connection and takes the lock again.
func (l *GroupLock) retake(ctx context.Context, cause error) error {
	_ = l.conn.Close(context.Background())
	l.Log.Warn("the connection holding the integrity group lock failed; taking the lock again on a new one",
		zap.String("group", l.Group), zap.Error(cause), zap.Duration("grace", l.LossGrace))
	deadline := time.Now().Add(l.LossGrace)
	last := cause
	for time.Now().Before(deadline) {
		cctx, cancel := context.WithDeadline(ctx, deadline)
		conn, err := l.Connect(cctx)
		if err == nil {
			var ok bool
			ok, err = l.tryOn(cctx, conn)
			if err == nil && ok {
				cancel()
				l.setConn(conn)
				l.Log.Info("integrity group lock taken again", zap.String("group", l.Group))
				return nil
			}
			if err == nil {
				h := l.holder(cctx, conn)
				cancel()
				_ = conn.Close(context.Background())
				return fmt.Errorf("%w: while its connection was replaced, another member of group %q took it (%s); this member stops so that only one runs",
					ErrLockLost, l.Group, h)
			}
			_ = conn.Close(context.Background())
		}
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(l.Poll):
		}
	}
	return fmt.Errorf("%w: the state database was unreachable for %s, so this member of group %q stops (a restarted member waits for the lock): %v",
		ErrLockLost, l.LossGrace, l.Group, last)
}

func (l *GroupLock) setConn(c *pgx.Conn) {
	l.mu.Lock()
	l.conn = c
	l.mu.Unlock()
}

// pid is the backend holding the lock (0 when none).
func (l *GroupLock) pid() uint32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn == nil {
		return 0
	}
	return l.conn.PgConn().PID()
}

func (l *GroupLock) release() {
	if l.conn == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Closing the session releases the lock; the explicit unlock makes it
	// prompt even when the close is delayed.
	_, _ = l.conn.Exec(ctx, `SELECT pg_advisory_unlock(hashtext($1), hashtext($2))`, lockKeyClass, l.Schema+"."+l.Group)
	_ = l.conn.Close(ctx)
	l.setConn(nil)
}
