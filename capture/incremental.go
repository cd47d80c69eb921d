package capture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/tidemark/tidemark/pipeline"
)

// Incremental snapshots on demand (DESIGN §8; see watermark.go for how a
// chunk meets the stream). Requests come from the admin API, from
// `tidemark snapshot` and from rows inserted into the signal table
// <SnapshotSchema>.tidemark_signals (Debezium's signalling table shape:
// id, type, data). Each requested table becomes a row of
// <SnapshotSchema>.incremental_snapshots, which also holds its progress
// (the key of the last row of the last durable chunk): after a crash or a
// restart the runner continues from the next chunk.

// Incremental snapshot states.
const (
	IncrementalQueued    = "queued"
	IncrementalRunning   = "running"
	IncrementalDone      = "done"
	IncrementalFailed    = "failed"
	IncrementalCancelled = "cancelled"
)

const (
	incrementalTable = SnapshotSchema + ".incremental_snapshots"
	// SignalTable is the signal table: insert a row (type
	// 'execute-snapshot' or 'stop-snapshot', data as Debezium's) to
	// request or stop an incremental snapshot.
	SignalTable = SnapshotSchema + ".tidemark_signals"
)

// IncrementalConfig configures an Incremental runner.
type IncrementalConfig struct {
	DSN  string
	Slot string
	// Tables are the configured tables; only they can be snapshotted.
	Tables []TableInfo
	// KeyColumns by "schema.table", as Config.KeyColumns (the columns that
	// key the rows' messages).
	KeyColumns map[string][]string
	// ChunkSize is the most rows a chunk reads (default 2000).
	ChunkSize int
	// ChunkBytes ends a chunk early once its rows hold this many bytes
	// (default 8 MiB), so memory is bounded for any row size.
	ChunkBytes int64
	// MaxRowsPerSecond bounds the read rate (0: unbounded).
	MaxRowsPerSecond float64
	// SignalInterval is how often the signal table is read (default 1s).
	SignalInterval time.Duration
	// Board is shared with the Stream (Config.Chunks).
	Board *ChunkBoard
	// Acked returns what the pipeline acknowledged (Stream.AckedLSN).
	Acked func() pipeline.LSN
}

func (c *IncrementalConfig) defaults() {
	if c.ChunkSize <= 0 {
		c.ChunkSize = 2000
	}
	if c.ChunkBytes <= 0 {
		c.ChunkBytes = 8 << 20
	}
	if c.SignalInterval <= 0 {
		c.SignalInterval = time.Second
	}
}

// IncrementalStats are the runner's counters.
type IncrementalStats struct {
	Running atomic.Int64 // snapshots running (0 or 1) or queued
	Retries atomic.Uint64
	tables  sync.Map // table -> *TableSnapshotStats
}

// TableSnapshotStats are one table's incremental snapshot counters.
type TableSnapshotStats struct {
	Rows, Dropped, Chunks atomic.Uint64
}

// Table returns the counters of table.
func (st *IncrementalStats) Table(table string) *TableSnapshotStats {
	v, ok := st.tables.Load(table)
	if !ok {
		v, _ = st.tables.LoadOrStore(table, new(TableSnapshotStats))
	}
	return v.(*TableSnapshotStats)
}

// Tables returns the counters by table.
func (st *IncrementalStats) Tables() map[string]*TableSnapshotStats {
	out := map[string]*TableSnapshotStats{}
	st.tables.Range(func(k, v any) bool {
		out[k.(string)] = v.(*TableSnapshotStats)
		return true
	})
	return out
}

// Incremental runs the incremental snapshots of one slot's capture.
type Incremental struct {
	cfg    IncrementalConfig
	log    *zap.Logger
	tables map[string]TableInfo
	stats  IncrementalStats
	wake   chan struct{}
	dec    *decoder
	seq    atomic.Int64 // chunk attempts (watermark chunk numbers)
	limit  *rate.Limiter
	// progress counts durable chunks and handled signals (Run's retry
	// episodes end with progress).
	progress atomic.Int64
}

// NewIncremental builds a runner; Run starts it.
func NewIncremental(cfg IncrementalConfig, log *zap.Logger) *Incremental {
	cfg.defaults()
	if log == nil {
		log = zap.NewNop()
	}
	r := &Incremental{cfg: cfg, log: log, tables: map[string]TableInfo{}, wake: make(chan struct{}, 1), dec: newDecoder()}
	for _, t := range cfg.Tables {
		r.tables[t.Qualified()] = t
	}
	if cfg.MaxRowsPerSecond > 0 {
		r.limit = rate.NewLimiter(rate.Limit(cfg.MaxRowsPerSecond), max(cfg.ChunkSize, 1))
	}
	// Chunk numbers are unique per process: a watermark of an earlier
	// process never matches a chunk of this one.
	r.seq.Store(time.Now().UnixNano())
	return r
}

// Stats returns the runner's counters.
func (r *Incremental) Stats() *IncrementalStats { return &r.stats }

// SnapshotRequest asks for incremental snapshots of Tables, each limited
// by Where (an SQL condition; empty: every row).
type SnapshotRequest struct {
	Tables []string `json:"tables"`
	Where  string   `json:"where,omitempty"`
	// By says who asked (admin, cli, signal <id>), for the record.
	By string `json:"-"`
}

// RequestError is a request refused for what it asks (not for a failure
// to reach the database).
type RequestError struct{ Msg string }

func (e *RequestError) Error() string { return e.Msg }

// chunkColumns returns the columns by which ti is read in chunks and by
// which a chunk row is matched with live changes: the primary key when
// old-row images carry it, else the key's unique index (the replica
// identity index or a unique index over NOT NULL columns); nil when the
// table has none (it can then be snapshotted only with a where clause,
// whose rows are read as one chunk).
func chunkColumns(ti TableInfo) []string {
	if len(ti.PrimaryKey) > 0 && !slices.ContainsFunc(ti.PrimaryKey, func(c string) bool { return !ti.HasIdentityColumn(c) }) {
		return ti.PrimaryKey
	}
	if ti.Key != nil && (ti.Key.Source == "replica identity index" || strings.HasPrefix(ti.Key.Source, "unique index")) {
		return ti.Key.Columns
	}
	if ti.ReplicaIdentity == 'i' && len(ti.IdentityColumns) > 0 {
		return ti.IdentityColumns // the identity index (a configured key chose other columns)
	}
	return nil
}

// checkCondition refuses a where clause that is not one condition: a ';',
// a comment, or parentheses that do not balance outside quoted text (a
// clause like "x = 1) OR (true" would undo the chunk's key bound).
func checkCondition(w string) error {
	depth := 0
	for i := 0; i < len(w); i++ {
		switch c := w[i]; c {
		case '\'', '"':
			j := i + 1
			for ; j < len(w); j++ {
				if w[j] == c {
					if j+1 < len(w) && w[j+1] == c { // a doubled quote
						j++
						continue
					}
					break
				}
			}
			if j >= len(w) {
				return fmt.Errorf("a %c quote is not closed", c)
			}
			i = j
		case '$':
			if i == 0 || !isIdentChar(w[i-1]) {
				return errors.New("it holds a '$' (dollar quoting, parameters): use single-quoted literals")
			}
		case ';':
			return errors.New("it holds a ';': give one condition")
		case '(':
			depth++
		case ')':
			depth--
			if depth < 0 {
				return errors.New("a ')' closes a '(' the condition did not open")
			}
		case '-':
			if i+1 < len(w) && w[i+1] == '-' {
				return errors.New("it holds a comment (--)")
			}
		case '/':
			if i+1 < len(w) && w[i+1] == '*' {
				return errors.New("it holds a comment (/*)")
			}
		}
	}
	if depth != 0 {
		return errors.New("its parentheses do not balance")
	}
	return nil
}

func isIdentChar(c byte) bool {
	return c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// ensureSchema creates the bookkeeping and signal tables.
func ensureIncrementalSchema(ctx context.Context, conn *pgx.Conn) error {
	var have bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL", incrementalTable, SignalTable).Scan(&have); err != nil {
		return err
	}
	if have {
		return nil // created before (possibly by an administrator: no CREATE needed)
	}
	if err := ensureSchema(ctx, conn); err != nil {
		return err
	}
	for _, q := range []string{
		"CREATE TABLE IF NOT EXISTS " + incrementalTable + ` (
			id bigserial PRIMARY KEY, slot text NOT NULL, table_name text NOT NULL, where_clause text,
			state text NOT NULL, last_key text[], rows bigint NOT NULL DEFAULT 0, dropped bigint NOT NULL DEFAULT 0,
			chunks bigint NOT NULL DEFAULT 0, estimate bigint, requested_by text, error text,
			requested_at timestamptz NOT NULL DEFAULT now(), started_at timestamptz, updated_at timestamptz, completed_at timestamptz)`,
		"CREATE TABLE IF NOT EXISTS " + SignalTable + ` (
			id text PRIMARY KEY DEFAULT gen_random_uuid()::text, type text NOT NULL, data jsonb,
			requested_at timestamptz NOT NULL DEFAULT now(), processed_at timestamptz, result text)`,
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			var pe *pgconn.PgError
			if errors.As(err, &pe) && pe.Code == "23505" {
				continue // created concurrently
			}
			return fmt.Errorf("creating %s and %s for incremental snapshots (the role needs CREATE on the database, or create them beforehand): %w", incrementalTable, SignalTable, err)
		}
	}
	return nil
}

// validate checks req against the configuration and the database (the
// where clause must compile): a *RequestError names what is wrong.
func (r *Incremental) validate(ctx context.Context, q interface {
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}, req SnapshotRequest) error {
	if len(req.Tables) == 0 {
		return &RequestError{"a snapshot request names no table"}
	}
	if err := checkCondition(req.Where); err != nil {
		return &RequestError{fmt.Sprintf("the where clause %q: %v", req.Where, err)}
	}
	for _, t := range req.Tables {
		name := pipeline.QualifyTable(t)
		ti, ok := r.tables[name]
		if !ok {
			known := make([]string, 0, len(r.tables))
			for k := range r.tables {
				known = append(known, k)
			}
			slices.Sort(known)
			return &RequestError{fmt.Sprintf("table %s is not in postgres.tables (%s): only captured tables can be snapshotted", t, strings.Join(known, ", "))}
		}
		if chunkColumns(ti) == nil && strings.TrimSpace(req.Where) == "" {
			return &RequestError{fmt.Sprintf("table %s has no primary key or unique index to read it in chunks by: give a where clause that selects at most snapshot.chunk_size rows, or add a primary key", name)}
		}
		if req.Where != "" {
			sql := "EXPLAIN SELECT 1 FROM " + pgx.Identifier{ti.Schema, ti.Table}.Sanitize() + " WHERE (" + req.Where + ")"
			if _, err := q.Exec(ctx, sql, pgx.QueryExecModeExec); err != nil {
				var pe *pgconn.PgError
				if errors.As(err, &pe) {
					return &RequestError{fmt.Sprintf("the where clause %q does not compile on %s: %s", req.Where, name, pe.Message)}
				}
				return err
			}
		}
	}
	return nil
}

// Enqueue validates req and records its snapshots (one per table) as
// queued; the runner starts them in order. It returns their ids.
func (r *Incremental) Enqueue(ctx context.Context, req SnapshotRequest) ([]int64, error) {
	conn, err := r.connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	if err := ensureIncrementalSchema(ctx, conn); err != nil {
		return nil, err
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	ids, err := r.enqueueTx(ctx, tx, req)
	if err != nil {
		return nil, err
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, err
	}
	r.Wake()
	return ids, nil
}

func (r *Incremental) enqueueTx(ctx context.Context, tx pgx.Tx, req SnapshotRequest) ([]int64, error) {
	// Validation's errors must not abort the transaction.
	sp, err := tx.Begin(ctx)
	if err != nil {
		return nil, err
	}
	verr := r.validate(ctx, sp, req)
	_ = sp.Rollback(ctx)
	if verr != nil {
		return nil, verr
	}
	var ids []int64
	for _, t := range req.Tables {
		name := pipeline.QualifyTable(t)
		var where *string
		if w := strings.TrimSpace(req.Where); w != "" {
			where = &w
		}
		var id int64
		if err := tx.QueryRow(ctx, "INSERT INTO "+incrementalTable+` (slot, table_name, where_clause, state, requested_by)
			VALUES ($1, $2, $3, $4, $5) RETURNING id`, r.cfg.Slot, name, where, IncrementalQueued, req.By).Scan(&id); err != nil {
			return nil, fmt.Errorf("recording the snapshot of %s in %s: %w", name, incrementalTable, err)
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// ensureSchema creates SnapshotSchema unless it exists (CREATE SCHEMA IF
// NOT EXISTS needs CREATE on the database even when it does).
func ensureSchema(ctx context.Context, conn *pgx.Conn) error {
	var have bool
	if err := conn.QueryRow(ctx, "SELECT to_regnamespace($1) IS NOT NULL", SnapshotSchema).Scan(&have); err != nil {
		return err
	}
	if have {
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+SnapshotSchema); err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "23505" {
			return nil
		}
		return fmt.Errorf("creating schema %s (the role needs CREATE on the database, or create the schema for it): %w", SnapshotSchema, err)
	}
	return nil
}

// Wake makes the runner look for work at once.
func (r *Incremental) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *Incremental) connect(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(r.cfg.DSN)
	if err != nil {
		return nil, errors.New("parsing the postgres DSN failed") // the DSN may hold a password
	}
	cfg.RuntimeParams["application_name"] = "tidemark-incremental-snapshot"
	pinTextFormats(cfg.RuntimeParams)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connecting for incremental snapshots: %w", ExplainTLS(err))
	}
	return conn, nil
}

// IncrementalSnapshot is a row of <SnapshotSchema>.incremental_snapshots.
type IncrementalSnapshot struct {
	ID          int64      `json:"id"`
	Table       string     `json:"table"`
	Where       string     `json:"where,omitempty"`
	State       string     `json:"state"`
	LastKey     []string   `json:"last_key,omitempty"`
	Rows        int64      `json:"rows"`
	Dropped     int64      `json:"dropped"`
	Chunks      int64      `json:"chunks"`
	Estimate    *int64     `json:"estimate,omitempty"`
	RequestedBy string     `json:"requested_by,omitempty"`
	Error       string     `json:"error,omitempty"`
	RequestedAt time.Time  `json:"requested_at"`
	StartedAt   *time.Time `json:"started_at,omitempty"`
	UpdatedAt   *time.Time `json:"updated_at,omitempty"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	// Derived for display: percent done (of the estimate), rows per
	// second since the start, and the estimated time left.
	Percent *float64 `json:"percent,omitempty"`
	Rate    float64  `json:"rows_per_second,omitempty"`
	ETA     string   `json:"eta,omitempty"`
}

// ReadIncrementalSnapshots returns slot's incremental snapshots: every
// queued or running one and the last limit ended ones, newest first.
func ReadIncrementalSnapshots(ctx context.Context, conn *pgx.Conn, slot string, limit int) ([]IncrementalSnapshot, error) {
	var reg *string
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1)::text", incrementalTable).Scan(&reg); err != nil {
		return nil, fmt.Errorf("looking for %s: %w", incrementalTable, err)
	}
	if reg == nil {
		return nil, nil
	}
	rows, err := conn.Query(ctx, `SELECT id, table_name, coalesce(where_clause, ''), state, last_key, rows, dropped, chunks, estimate,
		coalesce(requested_by, ''), coalesce(error, ''), requested_at, started_at, updated_at, completed_at
		FROM `+incrementalTable+` WHERE slot = $1 AND (state IN ('queued', 'running') OR id IN (
			SELECT id FROM `+incrementalTable+` WHERE slot = $1 AND state NOT IN ('queued', 'running') ORDER BY id DESC LIMIT $2))
		ORDER BY id DESC`, slot, limit)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", incrementalTable, err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (IncrementalSnapshot, error) {
		var s IncrementalSnapshot
		err := row.Scan(&s.ID, &s.Table, &s.Where, &s.State, &s.LastKey, &s.Rows, &s.Dropped, &s.Chunks, &s.Estimate,
			&s.RequestedBy, &s.Error, &s.RequestedAt, &s.StartedAt, &s.UpdatedAt, &s.CompletedAt)
		return s, err
	})
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", incrementalTable, err)
	}
	now := time.Now()
	for i := range out {
		s := &out[i]
		if s.Estimate != nil && *s.Estimate > 0 {
			p := min(100, 100*float64(s.Rows+s.Dropped)/float64(*s.Estimate))
			if s.State == IncrementalDone {
				p = 100
			}
			s.Percent = &p
		}
		if s.StartedAt != nil {
			end := now
			if s.CompletedAt != nil {
				end = *s.CompletedAt
			}
			if d := end.Sub(*s.StartedAt).Seconds(); d > 0 {
				s.Rate = float64(s.Rows+s.Dropped) / d
			}
			if s.State == IncrementalRunning && s.Rate > 0 && s.Estimate != nil && *s.Estimate > s.Rows+s.Dropped {
				s.ETA = (time.Duration(float64(*s.Estimate-s.Rows-s.Dropped)/s.Rate) * time.Second).Round(time.Second).String()
			}
		}
	}
	return out, nil
}

// Run works the snapshots off, one at a time in request order, reading
// the signal table every SignalInterval, until ctx ends. Failures to reach
// the database are retried (with a warning and Stats.Retries); a snapshot
// that cannot go on (its table dropped, its where clause broken) is
// marked failed with the reason, and the others go on. Run returns only
// ctx's error.
func (r *Incremental) Run(ctx context.Context) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 500 * time.Millisecond
	bo.MaxInterval = 30 * time.Second
	bo.MaxElapsedTime = 0
	bo.Reset()
	failures := 0
	for {
		before := r.progress.Load()
		err := r.session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if r.progress.Load() != before {
			// The session got something done before it failed: a new
			// episode, warned about and backed off from afresh.
			failures = 0
			bo.Reset()
		}
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "42501" {
			// Waiting does not grant a privilege: the runner stops (the
			// stream goes on) and says what to grant.
			r.log.Error("incremental snapshots are off: Tidemark's role may not create or use their tables; grant CREATE on the database (or create the tidemark schema for the role) and restart, or set snapshot.incremental: false",
				zap.Error(err))
			return nil
		}
		r.stats.Retries.Add(1)
		failures++
		if failures == 1 || failures%10 == 0 {
			r.log.Warn("incremental snapshots: database unreachable or failing; retrying (tidemark_snapshot_retries_total)",
				zap.Error(err), zap.Int("attempts", failures))
		}
		select {
		case <-time.After(bo.NextBackOff()):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// session runs until ctx ends or the connection fails.
func (r *Incremental) session(ctx context.Context) error {
	conn, err := r.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if err := ensureIncrementalSchema(ctx, conn); err != nil {
		return err
	}
	// Snapshots left running by an earlier process continue where their
	// last durable chunk ended.
	lastSignals := time.Time{}
	for {
		if time.Since(lastSignals) >= r.cfg.SignalInterval {
			if err := r.processSignals(ctx, conn); err != nil {
				return err
			}
			lastSignals = time.Now()
		}
		snap, ok, err := r.next(ctx, conn)
		if err != nil {
			return err
		}
		if !ok {
			r.stats.Running.Store(0)
			select {
			case <-r.wake:
			case <-time.After(r.cfg.SignalInterval):
			case <-ctx.Done():
				return ctx.Err()
			}
			continue
		}
		if err := r.runOne(ctx, conn, &snap, &lastSignals); err != nil {
			return err
		}
	}
}

// next returns the oldest running or queued snapshot of the slot.
func (r *Incremental) next(ctx context.Context, conn *pgx.Conn) (IncrementalSnapshot, bool, error) {
	var s IncrementalSnapshot
	var n int64
	err := conn.QueryRow(ctx, `SELECT id, table_name, coalesce(where_clause, ''), state, last_key, rows, dropped, chunks,
		(SELECT count(*) FROM `+incrementalTable+` WHERE slot = $1 AND state IN ('queued', 'running'))
		FROM `+incrementalTable+` WHERE slot = $1 AND state IN ('queued', 'running') ORDER BY state = 'running' DESC, id LIMIT 1`, r.cfg.Slot).
		Scan(&s.ID, &s.Table, &s.Where, &s.State, &s.LastKey, &s.Rows, &s.Dropped, &s.Chunks, &n)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, false, nil
	}
	if err != nil {
		return s, false, fmt.Errorf("reading %s: %w", incrementalTable, err)
	}
	r.stats.Running.Store(n)
	return s, true, nil
}

// runOne runs snapshot s to its end (or until ctx ends or the connection
// fails), chunk after chunk.
func (r *Incremental) runOne(ctx context.Context, conn *pgx.Conn, s *IncrementalSnapshot, lastSignals *time.Time) error {
	ti, ok := r.tables[s.Table]
	if !ok {
		return r.fail(ctx, conn, s, fmt.Sprintf("table %s is no longer in postgres.tables", s.Table))
	}
	if s.State == IncrementalQueued {
		var est *int64
		if s.Where == "" {
			var n float64
			if err := conn.QueryRow(ctx, "SELECT reltuples FROM pg_class WHERE oid = $1", ti.OID).Scan(&n); err == nil && n > 0 {
				v := int64(n)
				est = &v
			}
		}
		if _, err := conn.Exec(ctx, "UPDATE "+incrementalTable+" SET state = $2, started_at = now(), updated_at = now(), estimate = $3 WHERE id = $1",
			s.ID, IncrementalRunning, est); err != nil {
			return err
		}
		s.State = IncrementalRunning
		r.log.Info("incremental snapshot started", zap.Int64("id", s.ID), zap.String("table", s.Table), zap.String("where", s.Where))
	} else {
		r.log.Info("incremental snapshot resumed after its last durable chunk", zap.Int64("id", s.ID), zap.String("table", s.Table),
			zap.Int64("rows", s.Rows), zap.Int64("chunks", s.Chunks))
	}
	retries, repairRounds := 0, 0
	var retrySince time.Time
	var repair [][]string // keys to read again before the next chunk
	lastChunk := false
	for {
		if time.Since(*lastSignals) >= r.cfg.SignalInterval {
			if err := r.processSignals(ctx, conn); err != nil {
				return err
			}
			*lastSignals = time.Now()
			var state string
			if err := conn.QueryRow(ctx, "SELECT state FROM "+incrementalTable+" WHERE id = $1", s.ID).Scan(&state); err != nil {
				return err
			}
			if state != IncrementalRunning {
				r.log.Info("incremental snapshot stopped", zap.Int64("id", s.ID), zap.String("table", s.Table), zap.String("state", state))
				return nil
			}
		}
		res, err := r.chunk(ctx, conn, s, ti, repair)
		if err != nil {
			var pe *pgconn.PgError
			if errors.As(err, &pe) && permanentSnapshotError(pe) || errors.As(err, new(*RequestError)) || errors.As(err, new(*permanentError)) {
				return r.fail(ctx, conn, s, err.Error())
			}
			return err
		}
		if res.retry {
			retries++
			r.stats.Retries.Add(1)
			if retries == 1 {
				retrySince = time.Now()
			}
			if retries == 1 || retries%100 == 0 {
				r.log.Warn("incremental snapshot: a transaction that had committed was not yet visible to a chunk's snapshot (waiting for a synchronous standby?); reading the chunk again",
					zap.Int64("id", s.ID), zap.String("table", s.Table), zap.Int("attempts", retries), zap.Uint32("xid", res.xid))
			}
			if time.Since(retrySince) > maxInvisibleWait {
				return r.fail(ctx, conn, s, fmt.Sprintf("transaction %d committed but stayed invisible to new snapshots for more than %s (a synchronous standby that does not answer?); request the snapshot again once it is visible",
					res.xid, maxInvisibleWait))
			}
			select {
			case <-time.After(min(time.Duration(retries)*5*time.Millisecond, time.Second)):
			case <-ctx.Done():
				return ctx.Err()
			}
			continue
		}
		retries = 0
		if repair != nil {
			repairRounds++
		} else {
			repairRounds, lastChunk = 0, res.done
		}
		if len(res.repair) > 0 && repairRounds < maxRepairRounds {
			// Rows left to live updates that did not carry all their
			// columns (unchanged TOAST): read them again.
			repair = res.repair
			continue
		}
		if len(res.repair) > 0 {
			r.log.Warn("incremental snapshot: rows kept changing with updates that leave TOASTed columns out; their topic records carry those columns only from earlier records",
				zap.Int64("id", s.ID), zap.String("table", s.Table), zap.Int("rows", len(res.repair)), zap.Int("rounds", repairRounds))
		}
		repair = nil
		if lastChunk {
			if _, err := conn.Exec(ctx, "UPDATE "+incrementalTable+" SET state = 'done', completed_at = now(), updated_at = now() WHERE id = $1 AND state = 'running'", s.ID); err != nil {
				return err
			}
			r.log.Info("incremental snapshot done", zap.Int64("id", s.ID), zap.String("table", s.Table),
				zap.Int64("rows", s.Rows), zap.Int64("dropped", s.Dropped), zap.Int64("chunks", s.Chunks))
			return nil
		}
	}
}

// permanentSnapshotError reports whether a chunk's error cannot heal by
// waiting: the table or a column is gone, the where clause is broken, the
// role lacks a privilege.
func permanentSnapshotError(pe *pgconn.PgError) bool {
	// Class 22 (data exception: a condition's cast failing on some row)
	// and 42 (syntax error or access rule violation: a table or column
	// gone, a privilege missing) do not heal by waiting.
	return strings.HasPrefix(pe.Code, "22") || strings.HasPrefix(pe.Code, "42")
}

func (r *Incremental) fail(ctx context.Context, conn *pgx.Conn, s *IncrementalSnapshot, why string) error {
	r.log.Error("incremental snapshot failed", zap.Int64("id", s.ID), zap.String("table", s.Table), zap.String("error", why))
	_, err := conn.Exec(ctx, "UPDATE "+incrementalTable+" SET state = $2, error = $3, updated_at = now(), completed_at = now() WHERE id = $1 AND state = 'running'",
		s.ID, IncrementalFailed, why)
	return err
}

type chunkResult struct {
	retry, done bool
	xid         uint32     // the invisible transaction a retry waits for
	repair      [][]string // keys to read again (see chunk.repairKeys)
}

// maxRepairRounds bounds how often rows left to partial live updates are
// read again after one chunk.
const maxRepairRounds = 3

// maxInvisibleWait bounds how long a chunk is read again while a committed
// transaction stays invisible to it.
const maxInvisibleWait = 10 * time.Minute

// permanentError is a chunk failure that reading again cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// describe builds the relation of ti as the table is now, with the
// columns' SQL types (for the chunk query's key casts).
func (r *Incremental) describe(ctx context.Context, tx pgx.Tx, ti TableInfo) (*pipeline.Relation, map[string]string, error) {
	rows, err := tx.Query(ctx, `SELECT attname, atttypid, format_type(atttypid, atttypmod), atttypmod FROM pg_catalog.pg_attribute
		WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`, ti.OID)
	if err != nil {
		return nil, nil, err
	}
	rel := &pipeline.Relation{OID: ti.OID, Schema: ti.Schema, Table: ti.Table, ReplicaIdentity: ti.ReplicaIdentity}
	keys := r.cfg.KeyColumns[ti.Qualified()]
	types := map[string]string{}
	var name, typ string
	var oid uint32
	var typmod int32
	if _, err := pgx.ForEachRow(rows, []any{&name, &oid, &typ, &typmod}, func() error {
		identity := slices.Contains(ti.IdentityColumns, name)
		key := identity
		if len(keys) > 0 {
			key = slices.Contains(keys, name)
		}
		rel.Columns = append(rel.Columns, pipeline.Column{Name: name, TypeOID: oid, TypeMod: typmod, Key: key, Identity: identity})
		types[name] = typ
		return nil
	}); err != nil {
		return nil, nil, err
	}
	if len(rel.Columns) == 0 {
		return nil, nil, &RequestError{fmt.Sprintf("table %s (relation %d) is gone", ti.Qualified(), ti.OID)}
	}
	oids := make([]uint32, len(rel.Columns))
	for i, c := range rel.Columns {
		oids[i] = c.TypeOID
	}
	lookup := func(ctx context.Context, oids []uint32) (map[uint32]pgType, error) { return queryTypes(ctx, tx, oids) }
	if err := r.dec.resolveTypes(ctx, oids, lookup); err != nil {
		return nil, nil, err
	}
	return rel, types, nil
}

// chunk reads, hands over and waits for one chunk of s, then records its
// progress.
func (r *Incremental) chunk(ctx context.Context, conn *pgx.Conn, s *IncrementalSnapshot, ti TableInfo, repair [][]string) (chunkResult, error) {
	cols := chunkColumns(ti)
	keyless := cols == nil
	if keyless {
		repair = nil
	}
	c := &chunk{key: chunkKey{s.ID, r.seq.Add(1)}, first: s.Rows == 0 && s.Chunks == 0, done: make(chan struct{})}
	durable := false
	defer func() {
		if !durable {
			c.abandoned.Store(true)
		}
		r.cfg.Board.remove(c)
	}()

	// The relation first (its own short transaction), so that the window
	// between the watermarks holds only the chunk's read.
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{AccessMode: pgx.ReadOnly})
	if err != nil {
		return chunkResult{}, err
	}
	rel, types, err := r.describe(ctx, tx, ti)
	_ = tx.Rollback(ctx)
	if err != nil {
		return chunkResult{}, err
	}
	if keyless {
		for _, col := range rel.Columns {
			cols = append(cols, col.Name)
		}
	}
	c.rel, c.cols = rel, cols
	r.cfg.Board.arm(c)

	wm := watermark{Slot: r.cfg.Slot, ID: c.key.id, Chunk: c.key.n, Kind: "low"}
	low, _ := json.Marshal(wm)
	if _, err := conn.Exec(ctx, "SELECT pg_logical_emit_message(false, $1, $2)", WatermarkPrefix, string(low)); err != nil {
		return chunkResult{}, fmt.Errorf("writing the low watermark of a chunk of %s: %w", s.Table, err)
	}

	// The chunk, in a short read-only transaction of its own.
	q, args := r.chunkQuery(rel, types, ti, cols, keyless, s, repair)
	tx, err = conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return chunkResult{}, err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	var snapText string
	if err := tx.QueryRow(ctx, "SELECT pg_current_snapshot()::text").Scan(&snapText); err != nil {
		return chunkResult{}, fmt.Errorf("reading the chunk's snapshot: %w", err)
	}
	snap, err := parseSnapshot(snapText)
	if err != nil {
		return chunkResult{}, err
	}
	// A transaction that the chunk's snapshot cannot see (in its xip, or
	// at or after its xmax) but whose commit record is written (it waits
	// for a synchronous standby) may have been streamed before the low
	// watermark: the chunk would lack its changes without the stream
	// recording them. Read the chunk again later. (The stream checks the
	// same for the commits it received shortly before the low watermark.)
	if x, err := invisibleCommitted(ctx, tx, snap); err != nil {
		return chunkResult{}, fmt.Errorf("checking the chunk's snapshot: %w", err)
	} else if x != 0 {
		return chunkResult{retry: true, xid: x}, nil
	}
	rows, err := tx.Query(ctx, q, append([]any{pgx.QueryExecModeExec, pgx.QueryResultFormats{pgx.TextFormatCode}}, args...)...)
	if err != nil {
		return chunkResult{}, fmt.Errorf("reading a chunk of %s: %w", s.Table, err)
	}
	keyIdx := columnIndexes(rel, cols)
	if slices.Contains(keyIdx, -1) {
		rows.Close()
		return chunkResult{}, &RequestError{fmt.Sprintf("table %s: a column of its key (%s) is not among the columns Tidemark publishes (generated or dropped?)", s.Table, strings.Join(cols, ", "))}
	}
	var tuples []pipeline.Tuple
	var keys [][]string
	var lastKey []string
	var bytes int64
	full := false
	for rows.Next() {
		raw := rows.RawValues()
		rc, n := copyRawRow(raw)
		t, err := r.dec.decodeTuple(rel, rc, false)
		if err != nil {
			rows.Close()
			return chunkResult{}, &permanentError{fmt.Errorf("decoding a row of %s: %w", s.Table, err)}
		}
		tuples = append(tuples, t)
		bytes += int64(n) + int64(len(raw))*16
		if !keyless {
			k := make([]string, len(keyIdx))
			for j, i := range keyIdx {
				k[j] = string(raw[i])
			}
			keys = append(keys, k)
			lastKey = k
		}
		if !keyless && repair == nil && (len(tuples) >= r.cfg.ChunkSize || bytes >= r.cfg.ChunkBytes) {
			full = true
			break
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return chunkResult{}, fmt.Errorf("reading a chunk of %s: %w", s.Table, err)
	}
	_ = tx.Rollback(ctx)
	if keyless && len(tuples) > r.cfg.ChunkSize {
		return chunkResult{}, &RequestError{fmt.Sprintf("table %s has no primary key or unique index to read it in chunks by, and more than snapshot.chunk_size (%d) rows match the where clause %q: narrow it, raise chunk_size, or add a primary key",
			s.Table, r.cfg.ChunkSize, s.Where)}
	}
	r.cfg.Board.setRows(c, tuples, keys, bytes)

	wm.Kind = "high"
	wm.Xip, wm.Xmax = snap.xids32()
	high, _ := json.Marshal(wm)
	// Committed with a local WAL flush whatever the database's
	// synchronous_commit: the walsender sends only flushed WAL, so under
	// synchronous_commit off the chunk would otherwise wait for the WAL
	// writer (wal_writer_delay, 200 ms by default) every time.
	if err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = local"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "SELECT pg_logical_emit_message(true, $1, $2)", WatermarkPrefix, string(high))
		return err
	}); err != nil {
		return chunkResult{}, fmt.Errorf("writing the high watermark of a chunk of %s: %w", s.Table, err)
	}
	// The stream publishes the chunk at the high watermark; wait until it
	// is durable.
	select {
	case <-c.done:
	case <-ctx.Done():
		return chunkResult{}, ctx.Err()
	}
	end := pipeline.LSN(c.end.Load())
	for r.cfg.Acked() < end {
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return chunkResult{}, ctx.Err()
		}
	}
	durable = true
	if c.retry.Load() {
		return chunkResult{retry: true, xid: c.retryXid.Load()}, nil
	}
	pub, drop := c.published.Load(), c.dropped.Load()
	st := r.stats.Table(s.Table)
	st.Rows.Add(uint64(pub))
	st.Dropped.Add(uint64(drop))
	st.Chunks.Add(1)
	s.Rows += pub
	s.Dropped += drop
	last := repair == nil && (keyless || !full)
	if repair == nil {
		s.Chunks++
	}
	state := IncrementalRunning
	if last && len(c.repairKeys) == 0 {
		state = IncrementalDone
	}
	var lk any = s.LastKey
	if repair == nil && len(lastKey) > 0 {
		lk = lastKey
		s.LastKey = slices.Clone(lastKey)
	}
	if _, err := conn.Exec(ctx, "UPDATE "+incrementalTable+` SET last_key = $2, rows = $3, dropped = $4, chunks = $5, state = $6, updated_at = now(),
		completed_at = CASE WHEN $6 = 'done' THEN now() END WHERE id = $1 AND state = 'running'`, s.ID, lk, s.Rows, s.Dropped, s.Chunks, state); err != nil {
		return chunkResult{}, fmt.Errorf("recording the progress of the snapshot of %s: %w", s.Table, err)
	}
	r.progress.Add(1)
	if r.limit != nil && len(tuples) > 0 {
		if err := r.limit.WaitN(ctx, min(len(tuples), r.limit.Burst())); err != nil {
			return chunkResult{}, ctx.Err()
		}
	}
	return chunkResult{done: last, repair: c.repairKeys}, nil
}

// chunkQuery returns the query of s's next chunk and its arguments.
// With repair, it reads exactly those keys (see chunk.repairKeys).
func (r *Incremental) chunkQuery(rel *pipeline.Relation, types map[string]string, ti TableInfo, cols []string, keyless bool, s *IncrementalSnapshot, repair [][]string) (string, []any) {
	sel := make([]string, len(rel.Columns))
	for i, c := range rel.Columns {
		sel[i] = pgx.Identifier{c.Name}.Sanitize()
	}
	q := "SELECT " + strings.Join(sel, ", ") + " FROM " + pgx.Identifier{ti.Schema, ti.Table}.Sanitize()
	var conds []string
	var args []any
	quoted := make([]string, len(cols))
	for i, c := range cols {
		quoted[i] = pgx.Identifier{c}.Sanitize()
	}
	switch {
	case repair != nil:
		tuples := make([]string, 0, len(repair))
		for _, k := range repair {
			ps := make([]string, len(cols))
			for i, c := range cols {
				args = append(args, k[i])
				ps[i] = "$" + strconv.Itoa(len(args)) + "::" + types[c]
			}
			tuples = append(tuples, "("+strings.Join(ps, ", ")+")")
		}
		conds = append(conds, "("+strings.Join(quoted, ", ")+") IN ("+strings.Join(tuples, ", ")+")")
	case !keyless && len(s.LastKey) == len(cols):
		l, rr := make([]string, len(cols)), make([]string, len(cols))
		for i, c := range cols {
			l[i] = pgx.Identifier{c}.Sanitize()
			rr[i] = "$" + strconv.Itoa(i+1) + "::" + types[c]
			args = append(args, s.LastKey[i])
		}
		conds = append(conds, "("+strings.Join(l, ", ")+") > ("+strings.Join(rr, ", ")+")")
	}
	if s.Where != "" {
		conds = append(conds, "("+s.Where+")")
	}
	if len(conds) > 0 {
		q += " WHERE " + strings.Join(conds, " AND ")
	}
	if keyless {
		return q + " LIMIT " + strconv.Itoa(r.cfg.ChunkSize+1), args
	}
	order := make([]string, len(cols))
	for i, c := range cols {
		order[i] = pgx.Identifier{c}.Sanitize()
	}
	return q + " ORDER BY " + strings.Join(order, ", ") + " LIMIT " + strconv.Itoa(r.cfg.ChunkSize), args
}

// invisibleCommitted returns a transaction that the transaction snapshot
// snapText cannot see although it has committed: its backend waits for a
// synchronous standby (wait event SyncRep), which happens only after the
// commit record is written; 0 when there is none. (pg_xact_status cannot
// tell: it reports a transaction still in the process array as in
// progress.) Other roles' sessions are visible in pg_stat_activity only
// with pg_read_all_stats (or pg_monitor): without it, the stream's check
// of recent commits is what remains.
func invisibleCommitted(ctx context.Context, tx pgx.Tx, snap pgSnapshot) (uint32, error) {
	rows, err := tx.Query(ctx, `SELECT backend_xid::text FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND wait_event = 'SyncRep'`)
	if err != nil {
		return 0, err
	}
	waiting, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return 0, err
	}
	for _, w := range waiting {
		x32, err := strconv.ParseUint(w, 10, 32)
		if err != nil {
			continue
		}
		// The full xid: the one with this low half nearest xmax.
		x := snap.xmax&^0xffffffff | x32
		switch {
		case x > snap.xmax+1<<31:
			x -= 1 << 32
		case x+1<<31 < snap.xmax:
			x += 1 << 32
		}
		if x >= snap.xmax || slices.Contains(snap.xip, x) {
			return uint32(x32), nil
		}
	}
	return 0, nil
}

// pgSnapshot is a pg_snapshot: its xmax and in-progress xids (full,
// 64-bit xids).
type pgSnapshot struct {
	xmax uint64
	xip  []uint64
}

// parseSnapshot parses a pg_snapshot's text form ("xmin:xmax:xip,...").
func parseSnapshot(s string) (pgSnapshot, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return pgSnapshot{}, fmt.Errorf("unexpected pg_current_snapshot() %q", s)
	}
	xmax, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil {
		return pgSnapshot{}, fmt.Errorf("unexpected pg_current_snapshot() %q: %w", s, err)
	}
	snap := pgSnapshot{xmax: xmax}
	if parts[2] == "" {
		return snap, nil
	}
	for _, x := range strings.Split(parts[2], ",") {
		v, err := strconv.ParseUint(x, 10, 64)
		if err != nil {
			return pgSnapshot{}, fmt.Errorf("unexpected pg_current_snapshot() %q: %w", s, err)
		}
		snap.xip = append(snap.xip, v)
	}
	return snap, nil
}

// xids32 returns the snapshot's in-progress xids and xmax as the 32-bit
// xids pgoutput's BEGIN carries (for the high watermark).
func (p pgSnapshot) xids32() ([]uint32, uint32) {
	var xip []uint32
	for _, x := range p.xip {
		xip = append(xip, uint32(x))
	}
	return xip, uint32(p.xmax)
}

// signalData is the data of an execute-snapshot or stop-snapshot signal,
// in Debezium's shape, plus an optional slot (the signal is for the
// Tidemark of that slot only).
type signalData struct {
	DataCollections      []string `json:"data-collections"`
	Type                 string   `json:"type"`
	AdditionalConditions []struct {
		DataCollection string `json:"data-collection"`
		Filter         string `json:"filter"`
	} `json:"additional-conditions"`
	Slot string `json:"slot"`
}

// processSignals handles the signal table's unprocessed rows: each is
// answered in its result column ("accepted: snapshot 12" or "refused:
// why") and stamped processed_at.
func (r *Incremental) processSignals(ctx context.Context, conn *pgx.Conn) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	rows, err := tx.Query(ctx, "SELECT id, type, coalesce(data::text, '') FROM "+SignalTable+
		" WHERE processed_at IS NULL AND (data->>'slot' IS NULL OR data->>'slot' = $1) ORDER BY requested_at, id LIMIT 100 FOR UPDATE SKIP LOCKED", r.cfg.Slot)
	if err != nil {
		return fmt.Errorf("reading %s: %w", SignalTable, err)
	}
	type sig struct{ id, typ, data string }
	sigs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (sig, error) {
		var s sig
		err := row.Scan(&s.id, &s.typ, &s.data)
		return s, err
	})
	if err != nil {
		return fmt.Errorf("reading %s: %w", SignalTable, err)
	}
	if len(sigs) == 0 {
		return nil
	}
	for _, sg := range sigs {
		var d signalData
		result := ""
		if sg.data != "" {
			if err := json.Unmarshal([]byte(sg.data), &d); err != nil {
				result = "refused: data is not the JSON of a signal: " + err.Error()
			}
		}
		if result == "" {
			switch sg.typ {
			case "execute-snapshot":
				result = r.executeSignal(ctx, tx, sg.id, d)
			case "stop-snapshot":
				result = r.stopSignal(ctx, tx, d)
			default:
				result = fmt.Sprintf("refused: unknown signal type %q (execute-snapshot, stop-snapshot)", sg.typ)
			}
		}
		if strings.HasPrefix(result, "refused") {
			r.log.Warn("signal refused", zap.String("id", sg.id), zap.String("type", sg.typ), zap.String("result", result))
		}
		if _, err := tx.Exec(ctx, "UPDATE "+SignalTable+" SET processed_at = now(), result = $2 WHERE id = $1", sg.id, result); err != nil {
			return fmt.Errorf("answering signal %s in %s: %w", sg.id, SignalTable, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	r.progress.Add(1)
	return nil
}

func (r *Incremental) executeSignal(ctx context.Context, tx pgx.Tx, id string, d signalData) string {
	if d.Type != "" && !strings.EqualFold(d.Type, "incremental") {
		return fmt.Sprintf("refused: snapshot type %q: only incremental snapshots can be requested while running", d.Type)
	}
	// One request per distinct condition (tables without one share it).
	byWhere := map[string][]string{}
	var order []string
	for _, t := range d.DataCollections {
		where := ""
		for _, c := range d.AdditionalConditions {
			if pipeline.QualifyTable(c.DataCollection) == pipeline.QualifyTable(t) {
				where = c.Filter
			}
		}
		if _, ok := byWhere[where]; !ok {
			order = append(order, where)
		}
		byWhere[where] = append(byWhere[where], t)
	}
	if len(order) == 0 {
		return "refused: data-collections names no table"
	}
	var ids []string
	for _, where := range order {
		got, err := r.enqueueTx(ctx, tx, SnapshotRequest{Tables: byWhere[where], Where: where, By: "signal " + id})
		if err != nil {
			return "refused: " + err.Error()
		}
		for _, g := range got {
			ids = append(ids, strconv.FormatInt(g, 10))
		}
	}
	r.Wake()
	return "accepted: snapshot " + strings.Join(ids, ", ")
}

func (r *Incremental) stopSignal(ctx context.Context, tx pgx.Tx, d signalData) string {
	tables := make([]string, len(d.DataCollections))
	for i, t := range d.DataCollections {
		tables[i] = pipeline.QualifyTable(t)
	}
	tag, err := tx.Exec(ctx, "UPDATE "+incrementalTable+` SET state = 'cancelled', updated_at = now(), completed_at = now()
		WHERE slot = $1 AND state IN ('queued', 'running') AND (cardinality($2::text[]) = 0 OR table_name = ANY($2))`, r.cfg.Slot, tables)
	if err != nil {
		return "refused: " + err.Error()
	}
	return fmt.Sprintf("accepted: %d snapshot(s) cancelled", tag.RowsAffected())
}

// InsertSignal inserts an execute-snapshot signal for req (what `tidemark
// snapshot` does) and returns its id.
func InsertSignal(ctx context.Context, conn *pgx.Conn, slot string, req SnapshotRequest) (string, error) {
	if err := ensureIncrementalSchema(ctx, conn); err != nil {
		return "", err
	}
	d := map[string]any{"data-collections": req.Tables, "type": "incremental", "slot": slot}
	if req.Where != "" {
		var conds []map[string]string
		for _, t := range req.Tables {
			conds = append(conds, map[string]string{"data-collection": t, "filter": req.Where})
		}
		d["additional-conditions"] = conds
	}
	data, _ := json.Marshal(d)
	var id string
	if err := conn.QueryRow(ctx, "INSERT INTO "+SignalTable+" (type, data) VALUES ('execute-snapshot', $1) RETURNING id", string(data)).Scan(&id); err != nil {
		return "", fmt.Errorf("inserting the signal into %s: %w", SignalTable, err)
	}
	return id, nil
}

// SignalResult returns a signal's result ("" while unprocessed).
func SignalResult(ctx context.Context, conn *pgx.Conn, id string) (string, error) {
	var res *string
	if err := conn.QueryRow(ctx, "SELECT result FROM "+SignalTable+" WHERE id = $1", id).Scan(&res); err != nil {
		return "", err
	}
	if res == nil {
		return "", nil
	}
	return *res, nil
}

const coveredTable = SnapshotSchema + ".snapshot_tables"

// NewTables records which configured tables a slot's topics cover, and
// returns those that are new: configured now, but not when the slot last
// started (a table added to postgres.tables). When the slot was just
// created (created), or when nothing is recorded for it yet (it predates
// this bookkeeping), every configured table counts as covered and none is
// new. The new tables are not recorded: call CoverTables once they are
// handled (their snapshot queued).
func NewTables(ctx context.Context, conn *pgx.Conn, slot string, configured []string, created bool) ([]string, error) {
	var have bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", coveredTable).Scan(&have); err != nil {
		return nil, err
	}
	if !have {
		if err := ensureSchema(ctx, conn); err != nil {
			return nil, err
		}
		if _, err := conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+coveredTable+` (slot text NOT NULL, table_name text NOT NULL, how text NOT NULL,
			covered_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (slot, table_name))`); err != nil {
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != "23505" {
				return nil, fmt.Errorf("creating %s (the tables a slot's topics cover; the role needs CREATE on the database): %w", coveredTable, err)
			}
		}
	}

	if created {
		_, err := conn.Exec(ctx, "DELETE FROM "+coveredTable+" WHERE slot = $1", slot)
		if err != nil {
			return nil, err
		}
		return nil, CoverTables(ctx, conn, slot, configured, "slot created")
	}
	rows, err := conn.Query(ctx, "SELECT table_name FROM "+coveredTable+" WHERE slot = $1", slot)
	if err != nil {
		return nil, err
	}
	known, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	if len(known) == 0 {
		return nil, CoverTables(ctx, conn, slot, configured, "recorded at start")
	}
	// A table no longer configured is not covered any more: added back
	// later, it is new again (its topic missed what happened meanwhile).
	if _, err := conn.Exec(ctx, "DELETE FROM "+coveredTable+" WHERE slot = $1 AND NOT table_name = ANY($2)", slot, configured); err != nil {
		return nil, err
	}
	var out []string
	for _, t := range configured {
		if !slices.Contains(known, t) {
			out = append(out, t)
		}
	}
	return out, nil
}

// CoverTables records tables as covered by slot's topics.
func CoverTables(ctx context.Context, conn *pgx.Conn, slot string, tables []string, how string) error {
	// One statement, one transaction.
	if _, err := conn.Exec(ctx, "INSERT INTO "+coveredTable+" (slot, table_name, how) SELECT $1, t, $3 FROM unnest($2::text[]) t ON CONFLICT DO NOTHING", slot, tables, how); err != nil {
		return fmt.Errorf("recording %v in %s: %w", tables, coveredTable, err)
	}
	return nil
}

// SyncRepVisibility returns a warning when incremental snapshots cannot
// see every session waiting for a synchronous standby: the server has
// synchronous_standby_names set, and the role is neither a superuser nor
// a member of pg_read_all_stats, so pg_stat_activity hides other roles'
// sessions (see invisibleCommitted). "" when there is nothing to say.
func SyncRepVisibility(ctx context.Context, conn *pgx.Conn) (string, error) {
	var names string
	var sees bool
	err := conn.QueryRow(ctx, `SELECT current_setting('synchronous_standby_names'),
		(SELECT rolsuper FROM pg_roles WHERE rolname = current_user) OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')`).Scan(&names, &sees)
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(names) == "" || sees {
		return "", nil
	}
	return fmt.Sprintf("synchronous_standby_names is set (%q) but Tidemark's role cannot see other roles' sessions in pg_stat_activity: "+
		"an incremental snapshot chunk then cannot tell that a committed transaction still waits for a standby, and relies on the stream's memory of recent commits (lost on restart); "+
		"GRANT pg_read_all_stats TO <tidemark role>", names), nil
}
