package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"sync/atomic"
	"time"

	"net/http"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// ErrLeadershipLost ends capture when its lock on the source database is
// gone or could not be confirmed in time: another process may be leader
// now, so this one must not write again.
var ErrLeadershipLost = errors.New("capture leadership lost")

// Leader elects one capture process per slot with a session-level advisory
// lock on the source database (DESIGN §7). The leader holds the lock on a
// connection of its own and confirms it every Retry; its sessions' idle
// timeout (LockTTL) makes Postgres drop the lock of a leader that stopped
// confirming (paused, partitioned), so a standby can take over. The leader
// may write only while its lease (the last confirmation plus half the TTL)
// runs: a leader that wakes after the TTL finds its lease expired and
// stops before its next write.
type Leader struct {
	DSN  string
	Slot string
	// Retry is how often a standby tries the lock and the leader confirms
	// it. Default 1s.
	Retry time.Duration
	// LockTTL is the lock session's idle_session_timeout. Default 5 x Retry
	// (at least 2s).
	LockTTL time.Duration
	Log     *zap.Logger

	conn      *pgx.Conn
	connected bool // a lock connection was made once
	leader    atomic.Bool
	standby   atomic.Bool // tried the lock and another process holds it
	// lease is when writes stop being allowed, in nanoseconds since epoch
	// (monotonic: a wall-clock step does not stretch it).
	lease atomic.Int64
	epoch time.Time
	key   int64
}

// since returns the monotonic nanoseconds from l.epoch to t.
func (l *Leader) since(t time.Time) int64 { return int64(t.Sub(l.epoch)) }

func (l *Leader) defaults() {
	if l.Retry <= 0 {
		l.Retry = time.Second
	}
	if l.LockTTL <= 0 {
		l.LockTTL = max(5*l.Retry, 2*time.Second)
	}
	if l.Log == nil {
		l.Log = zap.NewNop()
	}
	h := fnv.New64a()
	h.Write([]byte("tidemark capture\x00" + l.Slot))
	l.key = int64(h.Sum64())
	if l.epoch.IsZero() {
		l.epoch = time.Now()
	}
}

// Key is the advisory lock's key (after Acquire).
func (l *Leader) Key() int64 { return l.key }

// IsStandby reports whether this process tried the lock and another
// process holds it (before the first try it is neither leader nor
// standby).
func (l *Leader) IsStandby() bool { return l.standby.Load() }

// IsLeader reports whether this process holds the lock.
func (l *Leader) IsLeader() bool { return l.leader.Load() }

// Valid reports whether the leader may write now (its lease runs).
func (l *Leader) Valid() bool { return l.leader.Load() && l.since(time.Now()) < l.lease.Load() }

// Fence is nil while the leader may write, else ErrLeadershipLost (the
// Kafka sink calls it before every produce attempt).
func (l *Leader) Fence() error {
	if l.Valid() {
		return nil
	}
	return fmt.Errorf("%w: refusing to write to Kafka: the capture lease ran out", ErrLeadershipLost)
}

// Acquire waits until this process holds the lock (standing by meanwhile,
// trying every Retry) or ctx ends.
func (l *Leader) Acquire(ctx context.Context) error {
	l.defaults()
	standing, failing := false, false
	for {
		ok, err := l.try(ctx)
		var first *firstConnectError
		switch {
		case err != nil && ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &first):
			// The first connection fails: a bad DSN, certificate or
			// password does not heal by waiting (as before election,
			// the start fails and names it).
			return first.err
		case err != nil:
			if !failing {
				failing = true
				l.Log.Warn("cannot try the capture lock on the source database; retrying", zap.String("slot", l.Slot), zap.Error(err))
			}
		case ok:
			l.standby.Store(false)
			l.Log.Info("capture leader: holding the capture lock", zap.String("slot", l.Slot), zap.Int64("lock", l.key))
			return nil
		case !standing:
			standing = true
			l.standby.Store(true)
			l.Log.Info("standing by: another Tidemark process holds the capture lock for this slot; trying again every ha.retry",
				zap.String("slot", l.Slot), zap.Int64("lock", l.key), zap.Duration("retry", l.Retry))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(l.Retry):
		}
	}
}

func (l *Leader) try(ctx context.Context) (bool, error) {
	if l.conn == nil {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		cfg, err := pgx.ParseConfig(l.DSN)
		if err != nil {
			return false, err
		}
		cfg.RuntimeParams["application_name"] = "tidemark-leader"
		// A session that stops confirming (its process paused or cut
		// off) is ended by Postgres, which releases its lock.
		cfg.RuntimeParams["idle_session_timeout"] = strconv.FormatInt(l.LockTTL.Milliseconds(), 10)
		conn, err := pgx.ConnectConfig(cctx, cfg)
		if err != nil {
			err = fmt.Errorf("connecting for the capture lock: %w", err)
			if !l.connected {
				return false, &firstConnectError{err}
			}
			return false, err
		}
		l.conn, l.connected = conn, true
	}
	sent := time.Now()
	qctx, cancel := context.WithTimeout(ctx, l.LockTTL/2)
	defer cancel()
	var ok bool
	if err := l.conn.QueryRow(qctx, "SELECT pg_try_advisory_lock($1)", l.key).Scan(&ok); err != nil {
		l.conn.Close(context.Background())
		l.conn = nil
		return false, err
	}
	if ok {
		l.lease.Store(l.since(sent.Add(l.LockTTL / 2)))
		l.leader.Store(true)
	}
	return ok, nil
}

// Hold confirms the lock every Retry until ctx ends (nil) or the lock
// cannot be confirmed (ErrLeadershipLost): the caller must then stop
// writing at once.
func (l *Leader) Hold(ctx context.Context) error {
	t := time.NewTicker(l.Retry)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if !l.Valid() {
			l.leader.Store(false)
			return fmt.Errorf("%w: the lease ran out before the lock was confirmed again (the process was paused or starved for more than %s)", ErrLeadershipLost, l.LockTTL/2)
		}
		sent := time.Now()
		qctx, cancel := context.WithTimeout(ctx, l.LockTTL/2)
		var held bool
		err := l.conn.QueryRow(qctx, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
			AND granted AND classid = (($1::bigint >> 32) & 4294967295)::oid AND objid = ($1::bigint & 4294967295)::oid AND objsubid = 1)`, l.key).Scan(&held)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil || !held {
			l.leader.Store(false)
			if err == nil {
				err = errors.New("the lock is not held by this session")
			}
			return fmt.Errorf("%w: %v", ErrLeadershipLost, err)
		}
		l.lease.Store(l.since(sent.Add(l.LockTTL / 2)))
	}
}

// Close releases the lock (by closing its session).
func (l *Leader) Close() {
	l.leader.Store(false)
	if l.conn != nil {
		l.conn.Close(context.Background())
		l.conn = nil
	}
}

// Role is "leader" or "standby".
func (l *Leader) Role() string {
	if l.IsLeader() {
		return "leader"
	}
	return "standby"
}

// Handler serves GET /leader: {"role": "leader"|"standby", "slot": ...}.
func (l *Leader) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"role": l.Role(), "slot": l.Slot})
	})
}

// Register exports tidemark_leader (1 while this process holds the capture
// lock, 0 while it stands by).
func (l *Leader) Register(reg prometheus.Registerer) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Name: "leader",
		Help: "1 while this process holds the capture lock of its slot (ha), 0 while it stands by."},
		func() float64 {
			if l.IsLeader() {
				return 1
			}
			return 0
		}))
}

// firstConnectError is the failure of the first lock connection.
type firstConnectError struct{ err error }

func (e *firstConnectError) Error() string { return e.err.Error() }
