package integrity

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/pipeline"
)

// Store keeps violations and the consumer's state in Postgres, in one
// schema (default "tidemark"):
//
//	<schema>.violations       one row per violation id (idempotent upsert)
//	<schema>.integrity_state  the consumer's state, by consumer group
//	<schema>.violation_outbox violations-topic records committed, not yet published
type Store struct {
	pool     *pgxpool.Pool
	schema   string
	consumer string
}

// NewStore uses pool (which must allow writes) for schema, keeping the
// state of consumer (the consumer group).
func NewStore(pool *pgxpool.Pool, schema, consumer string) *Store {
	return &Store{pool: pool, schema: pgx.Identifier{schema}.Sanitize(), consumer: consumer}
}

func (s *Store) t(name string) string { return s.schema + "." + name }

// Setup creates the schema and tables when missing.
func (s *Store) Setup(ctx context.Context) error {
	ddl := strings.NewReplacer("$S", s.schema).Replace(`
CREATE TABLE IF NOT EXISTS $S.violations (
  id             text PRIMARY KEY,
  rule           text NOT NULL,
  kind           text NOT NULL,
  severity       text NOT NULL,
  table_name     text NOT NULL,
  row_key        jsonb NOT NULL,
  position       text NOT NULL,
  commit_lsn     pg_lsn NOT NULL,
  seq            integer NOT NULL,
  transaction_id text NOT NULL,
  committed_at   timestamptz NOT NULL,
  detected_at    timestamptz NOT NULL,
  related_table  text,
  match          jsonb,
  match_key      text NOT NULL,
  detail         text NOT NULL,
  status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
  resolved_at    timestamptz,
  resolved_by    text
);
CREATE INDEX IF NOT EXISTS violations_rule_detected ON $S.violations (rule, detected_at);
CREATE INDEX IF NOT EXISTS violations_open ON $S.violations (detected_at) WHERE status = 'open';
CREATE TABLE IF NOT EXISTS $S.integrity_state (
  consumer text NOT NULL,
  kind     text NOT NULL,
  key      text NOT NULL,
  value    jsonb NOT NULL,
  PRIMARY KEY (consumer, kind, key)
);
CREATE TABLE IF NOT EXISTS $S.violation_outbox (
  id       bigserial PRIMARY KEY,
  consumer text NOT NULL,
  messages jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS violation_outbox_consumer ON $S.violation_outbox (consumer, id);`)
	// CREATE SCHEMA IF NOT EXISTS races with itself: another part creating
	// the same schema (the notification-targets store shares "tidemark")
	// may win, which is fine.
	if _, err := s.pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+s.schema); err != nil {
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || (pe.Code != "23505" && pe.Code != "42P06") {
			return fmt.Errorf("integrity store: creating schema %s: %w", s.schema, err)
		}
	}
	// Concurrent starts: serialize the DDL.
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("integrity store: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('tidemark-integrity-setup'))"); err != nil {
		return fmt.Errorf("integrity store: %w", err)
	}
	if _, err := tx.Exec(ctx, ddl); err != nil {
		return fmt.Errorf("integrity store: creating %s tables: %w", s.schema, err)
	}
	return tx.Commit(ctx)
}

// stateKey addresses one state row.
type stateKey struct{ kind, key string }

// LoadState returns the consumer's state rows.
func (s *Store) LoadState(ctx context.Context) (map[stateKey][]byte, error) {
	rows, err := s.pool.Query(ctx, "SELECT kind, key, value::text FROM "+s.t("integrity_state")+" WHERE consumer = $1", s.consumer)
	if err != nil {
		return nil, fmt.Errorf("loading integrity state: %w", err)
	}
	out := map[stateKey][]byte{}
	for rows.Next() {
		var k stateKey
		var v string
		if err := rows.Scan(&k.kind, &k.key, &v); err != nil {
			rows.Close()
			return nil, err
		}
		out[k] = []byte(v)
	}
	rows.Close()
	return out, rows.Err()
}

// stateValue reads one state row.
func (s *Store) stateValue(ctx context.Context, k stateKey) ([]byte, bool, error) {
	var v string
	err := s.pool.QueryRow(ctx, "SELECT value::text FROM "+s.t("integrity_state")+" WHERE consumer = $1 AND kind = $2 AND key = $3",
		s.consumer, k.kind, k.key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("reading integrity state: %w", err)
	}
	return []byte(v), true, nil
}

const violationCols = `id, rule, kind, severity, table_name, row_key, position, commit_lsn, seq, transaction_id,
  committed_at, detected_at, related_table, match, match_key, detail, status, resolved_at, resolved_by`

// violationRow is the JSON shape jsonb_to_recordset reads.
type violationRow struct {
	ID            string            `json:"id"`
	Rule          string            `json:"rule"`
	Kind          string            `json:"kind"`
	Severity      string            `json:"severity"`
	TableName     string            `json:"table_name"`
	RowKey        json.RawMessage   `json:"row_key"`
	Position      string            `json:"position"`
	CommitLSN     string            `json:"commit_lsn"`
	Seq           uint32            `json:"seq"`
	TransactionID string            `json:"transaction_id"`
	CommittedAt   time.Time         `json:"committed_at"`
	DetectedAt    time.Time         `json:"detected_at"`
	RelatedTable  *string           `json:"related_table"`
	Match         map[string]string `json:"match"`
	MatchKey      string            `json:"match_key"`
	Detail        string            `json:"detail"`
}

// LoadOpen returns up to limit open violations, newest first.
func (s *Store) LoadOpen(ctx context.Context, limit int) ([]*Violation, error) {
	return List(ctx, s.pool, s.schema, Filter{Status: StatusOpen, Limit: limit})
}

// Filter selects violations to list.
type Filter struct {
	Rule   string    // "" for all
	Since  time.Time // zero for all
	Status string    // "" for all
	Limit  int       // 0 for no limit
}

// List returns violations from schema (an already quoted or plain
// identifier), newest first.
func List(ctx context.Context, q Querier, schema string, f Filter) ([]*Violation, error) {
	if !strings.HasPrefix(schema, `"`) {
		schema = pgx.Identifier{schema}.Sanitize()
	}
	sql := "SELECT " + violationCols + " FROM " + schema + ".violations WHERE ($1 = '' OR rule = $1) AND ($2::timestamptz IS NULL OR detected_at >= $2) AND ($3 = '' OR status = $3) ORDER BY detected_at DESC, id"
	var since *time.Time
	if !f.Since.IsZero() {
		since = &f.Since
	}
	args := []any{f.Rule, since, f.Status}
	if f.Limit > 0 {
		sql += " LIMIT $4"
		args = append(args, f.Limit)
	}
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("listing violations: %w", err)
	}
	defer rows.Close()
	var out []*Violation
	for rows.Next() {
		v := &Violation{}
		var related, resolvedBy *string
		var lsn string
		if err := rows.Scan(&v.ID, &v.Rule, &v.Kind, &v.Severity, &v.Table, &v.RowKey, &v.Position, &lsn, &v.Seq, &v.TransactionID,
			&v.CommittedAt, &v.DetectedAt, &related, &v.Match, &v.MatchKey, &v.Detail, &v.Status, &v.ResolvedAt, &resolvedBy); err != nil {
			return nil, err
		}
		v.CommitLSN = lsn
		if related != nil {
			v.Related = *related
		}
		if resolvedBy != nil {
			v.ResolvedBy = *resolvedBy
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// resolution marks an open violation resolved.
type resolution struct {
	ID string    `json:"id"`
	At time.Time `json:"at"`
	By string    `json:"by"`
}

// stateRow is one state upsert.
type stateRow struct {
	Kind  string          `json:"kind"`
	Key   string          `json:"key"`
	Value json.RawMessage `json:"value"`
}

// batch is what one commit makes durable.
type batch struct {
	violations []*Violation
	resolved   []resolution
	upserts    map[stateKey][]byte
	deletes    map[stateKey]bool
}

func (b *batch) empty() bool {
	return len(b.violations) == 0 && len(b.resolved) == 0 && len(b.upserts) == 0 && len(b.deletes) == 0
}

// commitResult reports what a commit changed.
type commitResult struct {
	inserted map[string]bool // violation ids that were new
	resolved map[string]bool // violation ids that went from open to resolved
	status   map[string]string
	outboxed bool // records went to the outbox: drain it
}

// commit writes b in one transaction: the statements go in one round trip
// (a pgx batch). When there is something to publish, records is called
// inside the transaction, after the violations' stored statuses are known,
// and what it returns is stored in the outbox by the same transaction, so
// the topic never misses what the table holds; the caller publishes the
// outbox after the commit (drainOutbox), never inside a transaction.
func (s *Store) commit(ctx context.Context, b *batch, records func(res *commitResult) []pipeline.Message) (*commitResult, error) {
	res := &commitResult{inserted: map[string]bool{}, resolved: map[string]bool{}, status: map[string]string{}}
	pb := &pgx.Batch{}
	if len(b.violations) > 0 {
		rows := make([]violationRow, len(b.violations))
		for i, v := range b.violations {
			rows[i] = violationRow{ID: v.ID, Rule: v.Rule, Kind: v.Kind, Severity: v.Severity, TableName: v.Table, RowKey: v.RowKey,
				Position: v.Position, CommitLSN: v.CommitLSN, Seq: v.Seq, TransactionID: v.TransactionID, CommittedAt: v.CommittedAt,
				DetectedAt: v.DetectedAt, Match: v.Match, MatchKey: v.MatchKey, Detail: v.Detail}
			if v.Related != "" {
				rows[i].RelatedTable = &v.Related
			}
		}
		js, err := json.Marshal(rows)
		if err != nil {
			return nil, err
		}
		pb.Queue(`INSERT INTO `+s.t("violations")+` (id, rule, kind, severity, table_name, row_key, position, commit_lsn, seq,
  transaction_id, committed_at, detected_at, related_table, match, match_key, detail)
SELECT x.id, x.rule, x.kind, x.severity, x.table_name, x.row_key, x.position, x.commit_lsn::pg_lsn, x.seq,
  x.transaction_id, x.committed_at, x.detected_at, x.related_table, x.match, x.match_key, x.detail
FROM jsonb_to_recordset($1::jsonb) AS x(id text, rule text, kind text, severity text, table_name text, row_key jsonb, position text,
  commit_lsn text, seq integer, transaction_id text, committed_at timestamptz, detected_at timestamptz, related_table text,
  match jsonb, match_key text, detail text)
ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id
RETURNING id, status, xmax = 0`, js).Query(func(r pgx.Rows) error {
			for r.Next() {
				var id, st string
				var ins bool
				if err := r.Scan(&id, &st, &ins); err != nil {
					return err
				}
				res.status[id] = st
				if ins {
					res.inserted[id] = true
				}
			}
			if err := r.Err(); err != nil {
				return fmt.Errorf("integrity store: upserting %d violations: %w", len(rows), err)
			}
			return nil
		})
	}
	if len(b.resolved) > 0 {
		js, err := json.Marshal(b.resolved)
		if err != nil {
			return nil, err
		}
		pb.Queue(`UPDATE `+s.t("violations")+` v SET status = 'resolved', resolved_at = x.at, resolved_by = x.by
FROM jsonb_to_recordset($1::jsonb) AS x(id text, at timestamptz, by text)
WHERE v.id = x.id AND v.status = 'open' RETURNING v.id`, js).Query(func(r pgx.Rows) error {
			for r.Next() {
				var id string
				if err := r.Scan(&id); err != nil {
					return err
				}
				res.resolved[id] = true
				res.status[id] = StatusResolved
			}
			if err := r.Err(); err != nil {
				return fmt.Errorf("integrity store: resolving violations: %w", err)
			}
			return nil
		})
	}
	if len(b.deletes) > 0 {
		var kinds, keys []string
		for k := range b.deletes {
			kinds = append(kinds, k.kind)
			keys = append(keys, k.key)
		}
		pb.Queue(`DELETE FROM `+s.t("integrity_state")+` WHERE consumer = $1 AND (kind, key) IN
  (SELECT * FROM unnest($2::text[], $3::text[]))`, s.consumer, kinds, keys)
	}
	if len(b.upserts) > 0 {
		rows := make([]stateRow, 0, len(b.upserts))
		for k, v := range b.upserts {
			rows = append(rows, stateRow{Kind: k.kind, Key: k.key, Value: v})
		}
		js, err := json.Marshal(rows)
		if err != nil {
			return nil, err
		}
		pb.Queue(`INSERT INTO `+s.t("integrity_state")+` (consumer, kind, key, value)
SELECT $1, x.kind, x.key, x.value FROM jsonb_to_recordset($2::jsonb) AS x(kind text, key text, value jsonb)
ON CONFLICT (consumer, kind, key) DO UPDATE SET value = EXCLUDED.value`, s.consumer, js)
	}
	if records == nil {
		// One round trip; a batch runs in one implicit transaction.
		if err := s.pool.SendBatch(ctx, pb).Close(); err != nil {
			return nil, fmt.Errorf("integrity store: %w", err)
		}
		return res, nil
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("integrity store: begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if err := tx.SendBatch(ctx, pb).Close(); err != nil {
		return nil, fmt.Errorf("integrity store: %w", err)
	}
	if msgs := records(res); len(msgs) > 0 {
		js, err := json.Marshal(msgs)
		if err != nil {
			return nil, err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+s.t("violation_outbox")+` (consumer, messages) VALUES ($1, $2::jsonb)`, s.consumer, js); err != nil {
			return nil, fmt.Errorf("integrity store: storing %d violation records for publishing: %w", len(msgs), err)
		}
		res.outboxed = true
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("integrity store: commit: %w", err)
	}
	return res, nil
}

// drainOutbox publishes the consumer's outbox in commit order, outside any
// transaction, deleting each record set once sink acknowledged it. At
// least once: a crash or a failure between publish and delete publishes
// the same records again (same keys and values: violation ids are
// deterministic, so consumers of the topic see a repeat, not a change).
func (s *Store) drainOutbox(ctx context.Context, sink pipeline.Sink) error {
	for {
		rows, err := s.pool.Query(ctx, `SELECT id, messages::text FROM `+s.t("violation_outbox")+` WHERE consumer = $1 ORDER BY id LIMIT 100`, s.consumer)
		if err != nil {
			return fmt.Errorf("integrity store: reading the violation outbox: %w", err)
		}
		type rec struct {
			id   int64
			msgs string
		}
		recs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (rec, error) {
			var x rec
			return x, r.Scan(&x.id, &x.msgs)
		})
		if err != nil {
			return fmt.Errorf("integrity store: reading the violation outbox: %w", err)
		}
		for _, r := range recs {
			var msgs []pipeline.Message
			if err := json.Unmarshal([]byte(r.msgs), &msgs); err != nil {
				return fmt.Errorf("integrity store: violation outbox record %d: %w", r.id, err)
			}
			if err := sink.Write(ctx, msgs); err != nil {
				return fmt.Errorf("publishing %d violation records: %w", len(msgs), err)
			}
			if _, err := s.pool.Exec(ctx, `DELETE FROM `+s.t("violation_outbox")+` WHERE id = $1`, r.id); err != nil {
				return fmt.Errorf("integrity store: emptying the violation outbox: %w", err)
			}
		}
		if len(recs) < 100 {
			return nil
		}
	}
}

// pruneBatch bounds the rows one pruning statement deletes.
const pruneBatch = 5000

// PruneResolved deletes violations resolved before resolvedBefore whose
// change is below the watermark (no replay can find them again, so none
// comes back as a new open violation), in short batches. It returns how
// many it deleted.
func (s *Store) PruneResolved(ctx context.Context, below pipeline.Position, resolvedBefore time.Time) (int64, error) {
	if below == (pipeline.Position{}) {
		return 0, nil
	}
	sql := fmt.Sprintf(`DELETE FROM %[1]s WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM %[1]s WHERE status = 'resolved' AND resolved_at < $3 AND (commit_lsn, seq) < ($1::pg_lsn, $2) LIMIT $4))
  AND status = 'resolved'`, s.t("violations"))
	var n int64
	for {
		tag, err := s.pool.Exec(ctx, sql, below.CommitLSN.String(), int64(below.Seq), resolvedBefore, pruneBatch)
		if err != nil {
			return n, fmt.Errorf("integrity store: pruning resolved violations: %w", err)
		}
		n += tag.RowsAffected()
		if tag.RowsAffected() < pruneBatch {
			return n, nil
		}
	}
}

// ErrOtherSource is returned by CheckSource when the consumer's state was
// built from another cluster, or from a history the source no longer has.
var ErrOtherSource = errors.New("the integrity state is from another source")

// CheckSource compares the source the consumer's state was built from
// (kind "source") with src, recording src on first use. It refuses, with
// ErrOtherSource, another system_identifier or a WAL position below the
// newest applied position (kind "pos"): positions of the two are
// unrelated, so every new change would be skipped as applied before. A new
// timeline with positions continuing (a promoted standby) is recorded.
func (s *Store) CheckSource(ctx context.Context, src capture.SourceIdentity, slot string) (changed bool, err error) {
	reset := fmt.Sprintf("if the switch is intended, stop the integrity consumer, run "+
		"DELETE FROM %s WHERE consumer = '%s'; reset group %s's offsets to the topics' latest "+
		"(kafka-consumer-groups --reset-offsets --to-latest --group %s --all-topics --execute) and start it again "+
		"(open violations stay; rows written before the switch are not checked again)",
		s.t("integrity_state"), strings.ReplaceAll(s.consumer, "'", "''"), s.consumer, s.consumer)
	var stored struct {
		System   string `json:"system"`
		Timeline int32  `json:"timeline"`
		Slot     string `json:"slot"`
	}
	var raw []byte
	err = s.pool.QueryRow(ctx, "SELECT value::text FROM "+s.t("integrity_state")+" WHERE consumer = $1 AND kind = 'source' AND key = 'identity'", s.consumer).Scan(&raw)
	found := err == nil
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return false, fmt.Errorf("integrity store: reading the source identity: %w", err)
	}
	if found {
		if err := json.Unmarshal(raw, &stored); err != nil {
			return false, fmt.Errorf("integrity store: the stored source identity %q: %w", raw, err)
		}
		if stored.System != src.SystemID {
			return false, fmt.Errorf("%w: consumer %s's state was built from database system %s (slot %s), but postgres.dsn is now system %s; %s",
				ErrOtherSource, s.consumer, stored.System, stored.Slot, src.SystemID, reset)
		}
	}
	var newest uint64
	if err := s.pool.QueryRow(ctx, "SELECT coalesce(max((value->>'l')::numeric), 0)::text::bigint FROM "+s.t("integrity_state")+
		" WHERE consumer = $1 AND kind = 'pos'", s.consumer).Scan(&newest); err != nil {
		return false, fmt.Errorf("integrity store: reading applied positions: %w", err)
	}
	if pipeline.LSN(newest) > src.WALPos {
		return false, fmt.Errorf("%w: consumer %s has applied positions up to %s, beyond the source's current WAL position %s (%s): "+
			"the source was restored to an earlier point or is another cluster; %s", ErrOtherSource, s.consumer, pipeline.LSN(newest), src.WALPos, src, reset)
	}
	if found && stored.Timeline == src.Timeline && stored.Slot == slot {
		return false, nil
	}
	stored.System, stored.Timeline, stored.Slot = src.SystemID, src.Timeline, slot
	v, _ := json.Marshal(stored)
	if _, err := s.pool.Exec(ctx, "INSERT INTO "+s.t("integrity_state")+" (consumer, kind, key, value) VALUES ($1, 'source', 'identity', $2::jsonb) "+
		"ON CONFLICT (consumer, kind, key) DO UPDATE SET value = excluded.value", s.consumer, string(v)); err != nil {
		return false, fmt.Errorf("integrity store: recording the source identity: %w", err)
	}
	return found, nil
}
