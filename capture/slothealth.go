package capture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// HeartbeatPrefix is the pg_logical_emit_message prefix of Tidemark's
// heartbeats; their content is the emit time in Unix nanoseconds, a space
// and the slot of the Tidemark that wrote it (every slot of the database
// decodes every heartbeat; each counts only its own).
const HeartbeatPrefix = "tidemark.heartbeat"

func heartbeatContent(at time.Time, slot string) string {
	return strconv.FormatInt(at.UnixNano(), 10) + " " + slot
}

// parseHeartbeat returns the emit time of a heartbeat written for slot.
func parseHeartbeat(content []byte, slot string) (int64, bool) {
	ts, s, ok := strings.Cut(string(content), " ")
	if !ok || s != slot {
		return 0, false
	}
	n, err := strconv.ParseInt(ts, 10, 64)
	return n, err == nil
}

// SlotHealth is what the server says about a slot's WAL retention (DESIGN
// §6): how much WAL it pins, and how close it is to being invalidated by
// max_slot_wal_keep_size.
type SlotHealth struct {
	Slot           string       `json:"slot"`
	Exists         bool         `json:"exists"`
	Active         bool         `json:"active"`
	ActivePID      int          `json:"active_pid,omitempty"`
	ConfirmedFlush pipeline.LSN `json:"-"`
	RestartLSN     pipeline.LSN `json:"-"`
	CurrentLSN     pipeline.LSN `json:"-"`
	// RetainedBytes is WAL kept for the slot (current LSN - restart_lsn).
	RetainedBytes int64 `json:"retained_wal_bytes"`
	// LagBytes is WAL not yet confirmed (current LSN - confirmed_flush_lsn).
	LagBytes int64 `json:"lag_bytes"`
	// WALStatus: reserved, extended, unreserved or lost (pg_replication_slots).
	WALStatus string `json:"wal_status"`
	// SafeWALSize is the WAL that can still be written before the slot is
	// in danger of invalidation (negative once it is unreserved); nil when
	// max_slot_wal_keep_size is unlimited, the slot is lost, or the server
	// predates Postgres 13.
	SafeWALSize *int64 `json:"safe_wal_size_bytes"`
	// MaxSlotWALKeepSize in bytes; -1 is unlimited.
	MaxSlotWALKeepSize int64     `json:"max_slot_wal_keep_size_bytes"`
	CheckedAt          time.Time `json:"checked_at"`
}

// MarshalJSON adds the LSNs in their text form.
func (h SlotHealth) MarshalJSON() ([]byte, error) {
	type plain SlotHealth
	return json.Marshal(struct {
		plain
		ConfirmedFlush string `json:"confirmed_flush_lsn"`
		RestartLSN     string `json:"restart_lsn"`
		CurrentLSN     string `json:"current_wal_lsn"`
	}{plain(h), h.ConfirmedFlush.String(), h.RestartLSN.String(), h.CurrentLSN.String()})
}

// safeWarnFraction: below this share of max_slot_wal_keep_size left, the
// slot is reported at risk.
const safeWarnFraction = 0.2

// SlotProblem is one condition an operator must act on: ID names the
// condition (stable while it lasts, so it is logged once), Text says it
// with the current figures.
type SlotProblem struct {
	ID   string // missing, lost, unreserved, extended, near_limit
	Text string
}

// Problems describes, one sentence each, what an operator must act on.
func (h SlotHealth) Problems() []string {
	var out []string
	for _, p := range h.problems() {
		out = append(out, p.Text)
	}
	return out
}

func (h SlotHealth) problems() []SlotProblem {
	if !h.Exists {
		return []SlotProblem{{"missing", fmt.Sprintf("replication slot %q does not exist", h.Slot)}}
	}
	var ps []SlotProblem
	switch h.WALStatus {
	case "lost":
		ps = append(ps, SlotProblem{"lost", fmt.Sprintf("replication slot %q is invalidated (wal_status lost): %s", h.Slot, LostSlotAdvice(h.Slot))})
	case "unreserved":
		ps = append(ps, SlotProblem{"unreserved", fmt.Sprintf("replication slot %q retains %s of WAL, beyond max_slot_wal_keep_size: the next checkpoint invalidates it unless capture catches up", h.Slot, bytesText(h.RetainedBytes))})
	case "extended":
		ps = append(ps, SlotProblem{"extended", fmt.Sprintf("replication slot %q retains %s of WAL, beyond max_wal_size (wal_status extended): capture is behind", h.Slot, bytesText(h.RetainedBytes))})
	}
	if h.WALStatus != "lost" && h.WALStatus != "unreserved" && h.MaxSlotWALKeepSize > 0 && h.SafeWALSize != nil && *h.SafeWALSize >= 0 &&
		float64(*h.SafeWALSize) < safeWarnFraction*float64(h.MaxSlotWALKeepSize) {
		ps = append(ps, SlotProblem{"near_limit", fmt.Sprintf("replication slot %q: only %s of WAL left before max_slot_wal_keep_size (%s) invalidates it",
			h.Slot, bytesText(*h.SafeWALSize), bytesText(h.MaxSlotWALKeepSize))})
	}
	return ps
}

func bytesText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d bytes", n)
}

// Querier is the part of pgx.Conn and pgxpool.Pool ReadSlotHealth uses.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ReadSlotHealth reads pg_replication_slots and max_slot_wal_keep_size. A
// missing slot is not an error: Exists is false.
func ReadSlotHealth(ctx context.Context, q Querier, slot string) (SlotHealth, error) {
	h := SlotHealth{Slot: slot, CheckedAt: time.Now(), MaxSlotWALKeepSize: -1}
	var cur, confirmed, restart string
	var version int
	var keepMB int64
	err := q.QueryRow(ctx, `SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END)::text,
		current_setting('server_version_num')::int`).Scan(&cur, &version)
	if err != nil {
		return h, fmt.Errorf("reading the server's WAL position: %w", err)
	}
	if h.CurrentLSN, err = pipeline.ParseLSN(cur); err != nil {
		return h, err
	}
	// wal_status, safe_wal_size and max_slot_wal_keep_size exist from
	// Postgres 13 on.
	retention := `'', NULL::bigint, -1::bigint`
	if version >= 130000 {
		retention = `coalesce(s.wal_status, ''), s.safe_wal_size,
		coalesce((SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'), -1)`
	}
	err = q.QueryRow(ctx, `SELECT s.active, coalesce(s.active_pid, 0), coalesce(s.confirmed_flush_lsn::text, '0/0'),
		coalesce(s.restart_lsn::text, '0/0'), `+retention+`
		FROM pg_replication_slots s WHERE s.slot_name = $1`, slot).
		Scan(&h.Active, &h.ActivePID, &confirmed, &restart, &h.WALStatus, &h.SafeWALSize, &keepMB)
	if errors.Is(err, pgx.ErrNoRows) {
		return h, nil
	}
	if err != nil {
		return h, fmt.Errorf("reading replication slot %q: %w", slot, err)
	}
	h.Exists = true
	if h.ConfirmedFlush, err = pipeline.ParseLSN(confirmed); err != nil {
		return h, err
	}
	if h.RestartLSN, err = pipeline.ParseLSN(restart); err != nil {
		return h, err
	}
	if keepMB >= 0 {
		h.MaxSlotWALKeepSize = keepMB << 20
	}
	if h.RestartLSN > 0 && h.CurrentLSN > h.RestartLSN {
		h.RetainedBytes = int64(h.CurrentLSN - h.RestartLSN)
	}
	if h.ConfirmedFlush > 0 && h.CurrentLSN > h.ConfirmedFlush {
		h.LagBytes = int64(h.CurrentLSN - h.ConfirmedFlush)
	}
	return h, nil
}

// WatcherConfig configures a Watcher.
type WatcherConfig struct {
	// DSN of the captured database (a normal connection, not replication).
	DSN  string
	Slot string
	// Interval between slot checks. Default 10s.
	Interval time.Duration
	// Heartbeat is the interval between heartbeat messages; 0 disables.
	Heartbeat time.Duration
}

// WatcherStats are the watcher's counters, safe to read concurrently.
type WatcherStats struct {
	Checks          atomic.Uint64
	CheckErrors     atomic.Uint64
	Heartbeats      atomic.Uint64 // heartbeat messages written
	HeartbeatErrors atomic.Uint64
}

// Watcher checks the slot's WAL retention periodically, warns (once per
// change, again every RepeatWarning while it lasts) when the slot is at risk,
// and writes heartbeats. It never stops capture: a failing check is
// counted and logged, and retried on the next tick.
type Watcher struct {
	cfg   WatcherConfig
	log   *zap.Logger
	last  atomic.Pointer[SlotHealth]
	stats WatcherStats

	// Owned by Run.
	conn        *pgx.Conn
	warned      map[string]time.Time // by SlotProblem.ID
	connFailed  bool
	checkFailed bool
	hbFailed    bool
}

// RepeatWarning is how often a lasting slot problem is logged again.
const RepeatWarning = 10 * time.Minute

// NewWatcher builds a Watcher; it starts nothing.
func NewWatcher(cfg WatcherConfig, log *zap.Logger) *Watcher {
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Watcher{cfg: cfg, log: log, warned: map[string]time.Time{}}
}

// Last is the latest successful check, or nil before the first.
func (w *Watcher) Last() *SlotHealth { return w.last.Load() }

// Stats returns the live counters.
func (w *Watcher) Stats() *WatcherStats { return &w.stats }

// Run checks at once, then every Interval, and writes heartbeats, until ctx
// ends. It returns nil then.
func (w *Watcher) Run(ctx context.Context) error {
	defer func() {
		if w.conn != nil {
			_ = w.conn.Close(context.Background())
		}
	}()
	check := time.NewTicker(w.cfg.Interval)
	defer check.Stop()
	var hb <-chan time.Time
	if w.cfg.Heartbeat > 0 {
		t := time.NewTicker(w.cfg.Heartbeat)
		defer t.Stop()
		hb = t.C
		w.heartbeat(ctx)
	}
	w.check(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-check.C:
			w.check(ctx)
		case <-hb:
			w.heartbeat(ctx)
		}
	}
}

// connect returns the watcher's connection, (re)connecting when needed. A
// connection failure is logged once per streak.
func (w *Watcher) connect(ctx context.Context) (*pgx.Conn, error) {
	if w.conn != nil && !w.conn.IsClosed() {
		return w.conn, nil
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(w.cfg.DSN)
	if err != nil {
		return nil, errors.New("parsing the postgres DSN failed") // the DSN may hold a password
	}
	cfg.RuntimeParams["application_name"] = "tidemark-watch"
	conn, err := pgx.ConnectConfig(cctx, cfg)
	if err != nil {
		err = ExplainTLS(err)
		if !w.connFailed && ctx.Err() == nil {
			w.log.Warn("slot watcher cannot connect to postgres; retrying", zap.Error(err))
		}
		w.connFailed = true
		return nil, err
	}
	if w.connFailed {
		w.log.Info("slot watcher reconnected")
	}
	w.connFailed = false
	w.conn = conn
	return conn, nil
}

func (w *Watcher) dropConn() {
	if w.conn != nil {
		_ = w.conn.Close(context.Background())
		w.conn = nil
	}
}

func (w *Watcher) check(ctx context.Context) {
	conn, err := w.connect(ctx)
	if err != nil {
		w.stats.CheckErrors.Add(1)
		return
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	h, err := ReadSlotHealth(qctx, conn, w.cfg.Slot)
	if err != nil {
		if ctx.Err() == nil {
			w.stats.CheckErrors.Add(1)
			if !w.checkFailed {
				w.log.Warn("slot check failed; retrying every interval", zap.String("slot", w.cfg.Slot), zap.Error(err))
			}
			w.checkFailed = true
		}
		w.dropConn()
		return
	}
	if w.checkFailed {
		w.log.Info("slot checks work again", zap.String("slot", w.cfg.Slot))
	}
	w.checkFailed = false
	w.stats.Checks.Add(1)
	w.last.Store(&h)
	w.report(h.problems(), h)
}

// report logs each problem when it first appears and every RepeatWarning
// while it lasts, and once when all have cleared.
func (w *Watcher) report(problems []SlotProblem, h SlotHealth) {
	now := time.Now()
	current := map[string]bool{}
	for _, p := range problems {
		current[p.ID] = true
		if last, ok := w.warned[p.ID]; ok && now.Sub(last) < RepeatWarning {
			continue
		}
		w.warned[p.ID] = now
		lvl := w.log.Warn
		if p.ID == "lost" {
			lvl = w.log.Error
		}
		fields := []zap.Field{zap.String("slot", h.Slot), zap.String("wal_status", h.WALStatus), zap.Int64("retained_wal_bytes", h.RetainedBytes)}
		if h.SafeWALSize != nil {
			fields = append(fields, zap.Int64("safe_wal_size_bytes", *h.SafeWALSize))
		}
		lvl(p.Text, fields...)
	}
	cleared := false
	for p := range w.warned {
		if !current[p] {
			delete(w.warned, p)
			cleared = true
		}
	}
	if cleared && len(current) == 0 {
		w.log.Info("replication slot healthy again", zap.String("slot", h.Slot), zap.String("wal_status", h.WALStatus),
			zap.Int64("retained_wal_bytes", h.RetainedBytes))
	}
}

// heartbeat writes one non-transactional logical message. Its failure (e.g.
// no EXECUTE privilege, or a standby) is logged once per streak with the
// fix.
func (w *Watcher) heartbeat(ctx context.Context) {
	conn, err := w.connect(ctx)
	if err != nil {
		w.stats.HeartbeatErrors.Add(1)
		return
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = conn.Exec(qctx, "SELECT pg_logical_emit_message(false, $1, $2)", HeartbeatPrefix, heartbeatContent(time.Now(), w.cfg.Slot))
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		w.stats.HeartbeatErrors.Add(1)
		if !w.hbFailed {
			msg := err.Error()
			var pe *pgconn.PgError
			if errors.As(err, &pe) && pe.Code == "42501" {
				msg += "; grant EXECUTE on pg_logical_emit_message to Tidemark's user (\\df pg_logical_emit_message shows its signature) or set postgres.heartbeat_interval: 0s"
			}
			w.log.Warn("heartbeat failed; retrying every interval", zap.String("error", msg))
		}
		w.hbFailed = true
		if conn.IsClosed() {
			w.dropConn()
		}
		return
	}
	if w.hbFailed {
		w.log.Info("heartbeats written again")
	}
	w.hbFailed = false
	w.stats.Heartbeats.Add(1)
}
