package capture

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// The initial snapshot (DESIGN §8): when Tidemark creates its slot, it
// creates it on a replication connection with an exported snapshot
// (CREATE_REPLICATION_SLOT ... LOGICAL pgoutput EXPORT_SNAPSHOT), keeps
// that connection idle (any other command on it, or closing it, ends the
// export), and reads every configured table on an ordinary connection in
// a REPEATABLE READ READ ONLY transaction that imports the snapshot (SET
// TRANSACTION SNAPSHOT). The snapshot shows exactly the transactions that
// committed before the slot's consistent point, and the slot streams
// exactly those that commit at or after it: no change is missed and none
// is applied twice.
//
// Positions. Every snapshot row is one change of one synthetic
// transaction whose commit LSN is the consistent point minus one, with
// seq counting the rows (0, 1, 2, ... across all tables, in the order they
// are published; at most 2^32-1 rows). Every transaction the slot streams
// commits at or after the consistent point, so every snapshot position
// sorts before every live position: a consumer that skips positions at or
// below the last it applied (per partition or per key) applies the
// snapshot rows before the stream, and a live change of a key always wins
// over its snapshot row (last writer by position wins). A snapshot
// published again (after a crash before it completed, redone with a new
// slot) has a later consistent point, so its rows sort after the first
// attempt's and before its own stream. The transaction has xid 0; its
// BEGIN and END records go to the transactions topic like any other
// transaction's (END carries the per-table row counts), so consumers that
// wait for complete transactions see it complete at its last row.
//
// Completion is recorded in <SnapshotSchema>.snapshots on the source
// database: a row for the slot is written ("running") before the slot is
// created, and set to "done" once every snapshot record is durable in
// Kafka. The stream starts only after that, so the slot is never
// confirmed past its consistent point before the snapshot is durable. A
// start that finds the slot with a "running" row (Tidemark stopped
// mid-snapshot: the stream would lack the rows not yet published) refuses
// to stream (SnapshotIncompleteError).

// SnapshotSchema is the schema of the snapshot bookkeeping table on the
// source database (created when Tidemark first takes a snapshot).
const SnapshotSchema = "tidemark"

// Snapshot states in <SnapshotSchema>.snapshots.
const (
	SnapshotRunning = "running"
	SnapshotDone    = "done"
)

const snapshotTable = SnapshotSchema + ".snapshots"

// SnapshotRecord is the source database's record of a slot's initial
// snapshot.
type SnapshotRecord struct {
	Exists          bool
	State           string
	ConsistentPoint string // "" until the slot was created
	Rows            int64
}

// ReadSnapshotRecord reads the record of slot's initial snapshot; Exists
// is false when there is none (the slot was created without a snapshot,
// or before Tidemark took snapshots).
func ReadSnapshotRecord(ctx context.Context, conn *pgx.Conn, slot string) (SnapshotRecord, error) {
	var reg *string
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1)::text", snapshotTable).Scan(&reg); err != nil {
		return SnapshotRecord{}, fmt.Errorf("looking for %s: %w", snapshotTable, err)
	}
	if reg == nil {
		return SnapshotRecord{}, nil
	}
	var r SnapshotRecord
	err := conn.QueryRow(ctx, "SELECT true, state, coalesce(consistent_point::text, ''), rows FROM "+snapshotTable+" WHERE slot = $1", slot).
		Scan(&r.Exists, &r.State, &r.ConsistentPoint, &r.Rows)
	if errors.Is(err, pgx.ErrNoRows) {
		return SnapshotRecord{}, nil
	}
	if err != nil {
		return SnapshotRecord{}, fmt.Errorf("reading %s: %w", snapshotTable, err)
	}
	return r, nil
}

// forgetSnapshotRecord deletes the record of slot's initial snapshot, if
// any (a slot of that name is being created without one).
func forgetSnapshotRecord(ctx context.Context, conn *pgx.Conn, slot string) error {
	var reg *string
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1)::text", snapshotTable).Scan(&reg); err != nil {
		return fmt.Errorf("looking for %s: %w", snapshotTable, err)
	}
	if reg == nil {
		return nil
	}
	if _, err := conn.Exec(ctx, "DELETE FROM "+snapshotTable+" WHERE slot = $1", slot); err != nil {
		return fmt.Errorf("forgetting the initial snapshot of an earlier slot %q in %s: %w", slot, snapshotTable, err)
	}
	return nil
}

// markSnapshotRunning records, before the slot is created, that its
// initial snapshot is under way.
func markSnapshotRunning(ctx context.Context, conn *pgx.Conn, slot string) error {
	for _, q := range []string{
		"CREATE SCHEMA IF NOT EXISTS " + SnapshotSchema,
		"CREATE TABLE IF NOT EXISTS " + snapshotTable + ` (slot text PRIMARY KEY, state text NOT NULL, consistent_point pg_lsn,
			rows bigint NOT NULL DEFAULT 0, started_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz)`,
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			var pe *pgconn.PgError
			if errors.As(err, &pe) && pe.Code == "23505" {
				continue // created concurrently
			}
			return fmt.Errorf("creating %s for the initial snapshot's bookkeeping (the role needs CREATE on the database, or create it beforehand; or set postgres.snapshot: never): %w", snapshotTable, err)
		}
	}
	if _, err := conn.Exec(ctx, "INSERT INTO "+snapshotTable+` (slot, state) VALUES ($1, $2)
		ON CONFLICT (slot) DO UPDATE SET state = excluded.state, consistent_point = NULL, rows = 0, started_at = now(), completed_at = NULL`,
		slot, SnapshotRunning); err != nil {
		return fmt.Errorf("recording the initial snapshot in %s: %w", snapshotTable, err)
	}
	return nil
}

// SnapshotIncompleteError is a start that found the slot created for an
// initial snapshot that never completed.
type SnapshotIncompleteError struct {
	Slot            string
	ConsistentPoint string
	Rows            int64
}

func (e *SnapshotIncompleteError) Error() string {
	return fmt.Sprintf("the initial snapshot of replication slot %q (consistent point %s) did not complete: "+
		"Tidemark stopped before every snapshot row was durable in Kafka, so streaming from the slot now would leave out the rows not published; "+
		"to redo it, drop the slot (SELECT pg_drop_replication_slot('%s');) and start again: Tidemark creates a new slot and publishes a new initial snapshot, "+
		"whose positions sort after the incomplete one's",
		e.Slot, e.ConsistentPoint, e.Slot)
}

// CheckSnapshotComplete returns a *SnapshotIncompleteError when slot's
// initial snapshot was started and never completed.
func CheckSnapshotComplete(ctx context.Context, conn *pgx.Conn, slot string) error {
	r, err := ReadSnapshotRecord(ctx, conn, slot)
	if err != nil {
		return err
	}
	if r.Exists && r.State != SnapshotDone {
		return &SnapshotIncompleteError{Slot: slot, ConsistentPoint: r.ConsistentPoint, Rows: r.Rows}
	}
	return nil
}

// InitialSnapshot is a slot just created with an exported snapshot. Its
// replication connection stays open and idle until Close: the exported
// snapshot lives only as long as that.
type InitialSnapshot struct {
	Slot            string
	ConsistentPoint pipeline.LSN
	Name            string // the exported snapshot's name
	Time            time.Time
	dsn             string
	repl            *pgconn.PgConn
	closeOnce       sync.Once
}

// CreateSlotWithSnapshot records the snapshot as running (on conn) and
// creates the permanent pgoutput slot on a new replication connection with
// an exported snapshot.
func CreateSlotWithSnapshot(ctx context.Context, conn *pgx.Conn, dsn, slot string) (*InitialSnapshot, error) {
	if err := markSnapshotRunning(ctx, conn, slot); err != nil {
		return nil, err
	}
	pcfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("parsing the postgres DSN failed") // the DSN may hold a password
	}
	pcfg.RuntimeParams["replication"] = "database"
	pcfg.RuntimeParams["application_name"] = "tidemark-snapshot"
	repl, err := pgconn.ConnectConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("opening a replication connection to create slot %q with a snapshot: %w", slot, ExplainTLS(err))
	}
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{
		SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication,
	})
	if err != nil {
		repl.Close(context.Background())
		return nil, fmt.Errorf("creating replication slot %q with an exported snapshot: %w", slot, err)
	}
	cp, err := pipeline.ParseLSN(res.ConsistentPoint)
	if err != nil || res.SnapshotName == "" || cp == 0 {
		repl.Close(context.Background())
		return nil, fmt.Errorf("replication slot %q: consistent point %q, snapshot %q: the server exported no usable snapshot (%v)", slot, res.ConsistentPoint, res.SnapshotName, err)
	}
	if _, err := conn.Exec(ctx, "UPDATE "+snapshotTable+" SET consistent_point = $2::pg_lsn WHERE slot = $1", slot, cp.String()); err != nil {
		repl.Close(context.Background())
		return nil, fmt.Errorf("recording the initial snapshot in %s: %w", snapshotTable, err)
	}
	return &InitialSnapshot{Slot: slot, ConsistentPoint: cp, Name: res.SnapshotName, Time: time.Now(), dsn: dsn, repl: repl}, nil
}

// Close ends the exported snapshot (closes the replication connection).
func (s *InitialSnapshot) Close() {
	s.closeOnce.Do(func() { s.repl.Close(context.Background()) })
}

// Complete records, once every snapshot record is durable, that the
// snapshot of rows rows is complete.
func (s *InitialSnapshot) Complete(ctx context.Context, rows int64) error {
	cfg, err := pgx.ParseConfig(s.dsn)
	if err != nil {
		return errors.New("parsing the postgres DSN failed")
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connecting to record the initial snapshot as complete: %w", ExplainTLS(err))
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "UPDATE "+snapshotTable+" SET state = $2, rows = $3, completed_at = now() WHERE slot = $1",
		s.Slot, SnapshotDone, rows); err != nil {
		return fmt.Errorf("recording the initial snapshot as complete in %s: %w", snapshotTable, err)
	}
	return nil
}

// SnapshotSourceConfig configures a SnapshotSource.
type SnapshotSourceConfig struct {
	// Tables to read, in order.
	Tables []TableInfo
	// KeyColumns by "schema.table", as Config.KeyColumns.
	KeyColumns map[string][]string
	// BatchBytes bounds the row bytes of one batch handed to the pipeline
	// (default 1 MiB); the pipeline's in-flight bounds hold the rest.
	BatchBytes int
	// FailAfter, when positive, makes the source fail after that many rows
	// (tests: a crash mid-snapshot).
	FailAfter int64
}

// ErrSnapshotDone ends a SnapshotSource: every row was read and the
// snapshot's transaction is durable in the sink.
var ErrSnapshotDone = errors.New("capture: initial snapshot published")

// SnapshotSource is a pipeline.BatchSource that publishes the rows of an
// InitialSnapshot as one transaction (see the package notes on positions),
// then, once the pipeline acknowledged it, returns ErrSnapshotDone.
type SnapshotSource struct {
	snap  *InitialSnapshot
	cfg   SnapshotSourceConfig
	log   *zap.Logger
	dec   *decoder
	conn  *pgx.Conn
	tx    pgx.Tx
	rows  pgx.Rows
	next  int // index of the next table to open
	rel   *pipeline.Relation
	txn   *pipeline.TxnInfo
	held  *pipeline.Change // the row read ahead (to mark the last one)
	count int64            // rows handed over
	began bool
	ended bool
	acked chan struct{}
	once  sync.Once
	// Rows counts rows read.
	Rows int64
	// PerTable counts rows read by table.
	PerTable map[string]int64
}

// NewSnapshotSource prepares a source over snap. It reads nothing yet.
func NewSnapshotSource(snap *InitialSnapshot, cfg SnapshotSourceConfig, log *zap.Logger) *SnapshotSource {
	if cfg.BatchBytes <= 0 {
		cfg.BatchBytes = 1 << 20
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &SnapshotSource{snap: snap, cfg: cfg, log: log, dec: newDecoder(), acked: make(chan struct{}), PerTable: map[string]int64{},
		txn: &pipeline.TxnInfo{Xid: 0, CommitLSN: snap.ConsistentPoint - 1, EndLSN: snap.ConsistentPoint - 1, CommitTime: snap.Time}}
}

// CommitLSN returns the commit LSN of the snapshot's rows (the consistent
// point minus one).
func (s *SnapshotSource) CommitLSN() pipeline.LSN { return s.txn.CommitLSN }

// open starts the snapshot transaction.
func (s *SnapshotSource) open(ctx context.Context) error {
	cfg, err := pgx.ParseConfig(s.snap.dsn)
	if err != nil {
		return errors.New("parsing the postgres DSN failed")
	}
	cfg.RuntimeParams["application_name"] = "tidemark-snapshot"
	// The values are decoded as pgoutput's (see textFormats): the same
	// session settings give the same text.
	pinTextFormats(cfg.RuntimeParams)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connecting to read the initial snapshot: %w", ExplainTLS(err))
	}
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		conn.Close(context.Background())
		return fmt.Errorf("starting the snapshot transaction: %w", err)
	}
	if _, err := tx.Exec(ctx, `SET TRANSACTION SNAPSHOT '`+strings.ReplaceAll(s.snap.Name, "'", "''")+`'`); err != nil {
		conn.Close(context.Background())
		return fmt.Errorf("importing snapshot %s of replication slot %q: %w", s.snap.Name, s.snap.Slot, err)
	}
	s.conn, s.tx = conn, tx
	return nil
}

// Close ends the snapshot transaction and its connection (not the
// InitialSnapshot's replication connection).
func (s *SnapshotSource) Close() {
	if s.rows != nil {
		s.rows.Close()
		s.rows = nil
	}
	if s.tx != nil {
		_ = s.tx.Rollback(context.Background())
		s.tx = nil
	}
	if s.conn != nil {
		s.conn.Close(context.Background())
		s.conn = nil
	}
}

// openTable starts reading the next table; false when none is left.
func (s *SnapshotSource) openTable(ctx context.Context) (bool, error) {
	if s.next >= len(s.cfg.Tables) {
		return false, nil
	}
	ti := s.cfg.Tables[s.next]
	s.next++
	name := ti.Schema + "." + ti.Table
	// The columns pgoutput sends: not dropped, not generated.
	rows, err := s.tx.Query(ctx, `SELECT attname, atttypid, atttypmod FROM pg_catalog.pg_attribute
		WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`, ti.OID)
	if err != nil {
		return false, fmt.Errorf("reading the columns of %s: %w", name, err)
	}
	rel := &pipeline.Relation{OID: ti.OID, Schema: ti.Schema, Table: ti.Table, ReplicaIdentity: ti.ReplicaIdentity}
	keys := s.cfg.KeyColumns[name]
	var cname string
	var oid uint32
	var typmod int32
	if _, err := pgx.ForEachRow(rows, []any{&cname, &oid, &typmod}, func() error {
		identity := slices.Contains(ti.IdentityColumns, cname)
		key := identity
		if len(keys) > 0 {
			key = slices.Contains(keys, cname)
		}
		rel.Columns = append(rel.Columns, pipeline.Column{Name: cname, TypeOID: oid, TypeMod: typmod, Key: key, Identity: identity})
		return nil
	}); err != nil {
		return false, fmt.Errorf("reading the columns of %s: %w", name, err)
	}
	oids := make([]uint32, len(rel.Columns))
	cols := make([]string, len(rel.Columns))
	for i, c := range rel.Columns {
		oids[i] = c.TypeOID
		cols[i] = pgx.Identifier{c.Name}.Sanitize()
	}
	if err := s.dec.resolveTypes(ctx, oids, s.lookupTypes); err != nil {
		return false, fmt.Errorf("resolving the column types of %s: %w", name, err)
	}
	// Text format, as pgoutput sends values, decoded by the same decoder.
	// Rows stream from the server as they are read (pgx reads a result
	// row by row), so memory does not grow with the table.
	q := "SELECT " + strings.Join(cols, ", ") + " FROM " + pgx.Identifier{ti.Schema, ti.Table}.Sanitize()
	r, err := s.tx.Query(ctx, q, pgx.QueryResultFormats{pgx.TextFormatCode})
	if err != nil {
		return false, fmt.Errorf("reading %s in the snapshot: %w", name, err)
	}
	s.rows, s.rel = r, rel
	return true, nil
}

// lookupTypes is the decoder's typeLookup, on the snapshot transaction
// (called between tables, never while a table's rows are read).
func (s *SnapshotSource) lookupTypes(ctx context.Context, oids []uint32) (map[uint32]pgType, error) {
	return queryTypes(ctx, s.tx, oids)
}

// copyRawRow copies a text-format result row (pgx reuses its buffers) into
// one buffer that the decoded values may alias, and returns its columns
// and their byte count.
func copyRawRow(raw [][]byte) ([]rawCol, int) {
	n := 0
	for _, v := range raw {
		n += len(v)
	}
	buf := make([]byte, 0, n)
	cols := make([]rawCol, len(raw))
	for i, v := range raw {
		if v == nil {
			cols[i] = rawCol{kind: pglogrepl.TupleDataTypeNull}
			continue
		}
		start := len(buf)
		buf = append(buf, v...)
		cols[i] = rawCol{kind: pglogrepl.TupleDataTypeText, data: buf[start:len(buf):len(buf)]}
	}
	return cols, n
}

// readRow returns the next row of the snapshot, or nil after the last.
func (s *SnapshotSource) readRow(ctx context.Context) (*pipeline.Change, int, error) {
	for {
		if s.rows == nil {
			ok, err := s.openTable(ctx)
			if err != nil || !ok {
				return nil, 0, err
			}
		}
		if s.rows.Next() {
			cols, n := copyRawRow(s.rows.RawValues())
			t, err := s.dec.decodeTuple(s.rel, cols, false)
			if err != nil {
				return nil, 0, err
			}
			s.Rows++
			s.PerTable[s.rel.QualifiedName()]++
			return &pipeline.Change{Op: pipeline.OpRead, Rel: s.rel, After: t, WALLSN: s.txn.CommitLSN}, n, nil
		}
		err := s.rows.Err()
		s.rows.Close()
		s.rows = nil
		if err != nil {
			return nil, 0, fmt.Errorf("reading %s in the snapshot: %w", s.rel.QualifiedName(), err)
		}
	}
}

// Next implements pipeline.Source.
func (s *SnapshotSource) Next(ctx context.Context) (pipeline.Event, error) {
	evs, err := s.NextBatch(ctx, nil)
	if err != nil {
		return pipeline.Event{}, err
	}
	if len(evs) != 1 {
		return pipeline.Event{}, errors.New("capture: snapshot: Next needs NextBatch")
	}
	return evs[0], nil
}

// maxSnapshotBatch bounds the events of one batch.
const maxSnapshotBatch = 512

// NextBatch implements pipeline.BatchSource.
func (s *SnapshotSource) NextBatch(ctx context.Context, dst []pipeline.Event) ([]pipeline.Event, error) {
	if s.ended {
		// Everything is queued: wait for the END to be durable.
		select {
		case <-s.acked:
			return dst, ErrSnapshotDone
		case <-ctx.Done():
			return dst, ctx.Err()
		}
	}
	if !s.began {
		if err := s.open(ctx); err != nil {
			return dst, err
		}
		s.began = true
		s.log.Info("initial snapshot: reading", zap.String("slot", s.snap.Slot), zap.Stringer("consistent_point", s.snap.ConsistentPoint),
			zap.Int("tables", len(s.cfg.Tables)))
		dst = append(dst, pipeline.Event{Kind: pipeline.EventBegin, Txn: s.txn})
	}
	bytes := 0
	for len(dst) < maxSnapshotBatch && bytes < s.cfg.BatchBytes {
		if s.cfg.FailAfter > 0 && s.Rows >= s.cfg.FailAfter {
			return dst, fmt.Errorf("capture: initial snapshot stopped after %d rows (test hook FailAfter)", s.Rows)
		}
		ch, n, err := s.readRow(ctx)
		if err != nil {
			return dst, err
		}
		bytes += n
		if ch == nil {
			if s.held != nil {
				s.held.Snapshot = pipeline.SnapshotLast
				dst = append(dst, pipeline.Event{Kind: pipeline.EventChange, Txn: s.txn, Change: *s.held})
				s.held = nil
			}
			dst = append(dst, pipeline.Event{Kind: pipeline.EventCommit, Txn: s.txn})
			s.ended = true
			s.log.Info("initial snapshot: read every table", zap.Int64("rows", s.Rows))
			return dst, nil
		}
		if s.Rows > math.MaxUint32 {
			return dst, fmt.Errorf("capture: the initial snapshot has more than %d rows, which positions (commit LSN, 32-bit seq) cannot number; set postgres.snapshot: never", uint64(math.MaxUint32))
		}
		if s.held != nil {
			dst = s.release(dst)
		}
		s.held = ch
	}
	return dst, nil
}

// release appends the held row with its mark.
func (s *SnapshotSource) release(dst []pipeline.Event) []pipeline.Event {
	s.held.Snapshot = pipeline.SnapshotRow
	if s.count == 0 {
		s.held.Snapshot = pipeline.SnapshotFirst
	}
	s.count++
	dst = append(dst, pipeline.Event{Kind: pipeline.EventChange, Txn: s.txn, Change: *s.held})
	s.held = nil
	return dst
}

// Ack implements pipeline.Source: the snapshot's transaction is durable.
func (s *SnapshotSource) Ack(lsn pipeline.LSN) {
	if lsn >= s.txn.EndLSN { // only the snapshot's commit carries an ack
		s.once.Do(func() { close(s.acked) })
	}
}
