package capture

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
)

// TableInfo is what preflight learned about one configured table.
type TableInfo struct {
	Schema, Table string
	// ReplicaIdentity is relreplident: 'd' default, 'n' nothing, 'f' full,
	// 'i' index.
	ReplicaIdentity byte
	// IdentityColumns are the columns Postgres sends in old-row images
	// (all columns under FULL); empty when the table has no usable identity.
	IdentityColumns []string
	// PrimaryKey lists the primary key columns (empty without one).
	PrimaryKey []string
	Columns    []string
}

// KeyColumns returns the columns that key the table's messages: the primary
// key, or the replica identity when there is none.
func (t TableInfo) KeyColumns() []string {
	if len(t.PrimaryKey) > 0 {
		return t.PrimaryKey
	}
	return t.IdentityColumns
}

// Qualified returns "schema.table".
func (t TableInfo) Qualified() string { return t.Schema + "." + t.Table }

// HasIdentityColumn reports whether col is sent in old-row images.
func (t TableInfo) HasIdentityColumn(col string) bool {
	for _, c := range t.IdentityColumns {
		if c == col {
			return true
		}
	}
	return false
}

// Problem is one preflight finding that prevents capture.
type Problem struct {
	Table string // "schema.table", empty for server-wide problems
	What  string
	// Fix is the exact statement or setting that resolves it, when known.
	Fix string
}

func (p Problem) String() string {
	s := p.What
	if p.Table != "" {
		s = p.Table + ": " + s
	}
	if p.Fix != "" {
		s += "; fix: " + p.Fix
	}
	return s
}

// PreflightError lists every problem found.
type PreflightError struct{ Problems []Problem }

func (e *PreflightError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = "  - " + p.String()
	}
	return "capture preflight failed:\n" + strings.Join(lines, "\n")
}

// splitTable splits "schema.table" (schema defaults to public).
func splitTable(name string) (schema, table string) {
	if i := strings.IndexByte(name, '.'); i >= 0 {
		return name[:i], name[i+1:]
	}
	return "public", name
}

func quoteIdent(s string) string { return pgx.Identifier{s}.Sanitize() }

func quoteTable(schema, table string) string { return pgx.Identifier{schema, table}.Sanitize() }

// MinServerVersion is the oldest Postgres Tidemark runs against (as
// server_version_num): capture asks pgoutput for logical messages (the
// messages option, added in 14) and reads pg_replication_slots.wal_status
// (added in 13).
const MinServerVersion = 140000

// versionProblem is the problem with a server of version num (text: its
// server_version), or nil.
func versionProblem(num int, text string) *Problem {
	if num >= MinServerVersion {
		return nil
	}
	return &Problem{What: fmt.Sprintf("Postgres %s is too old: Tidemark needs 14 or later (pgoutput's messages option, pg_replication_slots.wal_status)", text),
		Fix: "upgrade the server to Postgres 14 or later"}
}

// Inspect reads the server settings and the configured tables' shapes and
// replica identities. It returns every problem found, including tables whose
// UPDATE and DELETE would start failing if they were published (no replica
// identity), each with the ALTER TABLE statement that fixes it.
func Inspect(ctx context.Context, conn *pgx.Conn, tables []string) (map[string]TableInfo, []Problem, error) {
	var problems []Problem
	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		return nil, nil, fmt.Errorf("reading wal_level: %w", err)
	}
	if walLevel != "logical" {
		problems = append(problems, Problem{What: "wal_level is " + walLevel + ", logical replication needs logical",
			Fix: "ALTER SYSTEM SET wal_level = logical; then restart Postgres"})
	}
	var versionNum int
	var version string
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int, current_setting('server_version')").Scan(&versionNum, &version); err != nil {
		return nil, nil, fmt.Errorf("reading server_version_num: %w", err)
	}
	if p := versionProblem(versionNum, version); p != nil {
		problems = append(problems, *p)
	}
	infos := map[string]TableInfo{}
	for _, name := range tables {
		schema, table := splitTable(name)
		ti, p, err := inspectTable(ctx, conn, schema, table)
		if err != nil {
			return nil, nil, err
		}
		if p != nil {
			problems = append(problems, *p)
		}
		if ti != nil {
			infos[ti.Qualified()] = *ti
		}
	}
	return infos, problems, nil
}

func inspectTable(ctx context.Context, conn *pgx.Conn, schema, table string) (*TableInfo, *Problem, error) {
	qualified := schema + "." + table
	var oid uint32
	var ident string
	err := conn.QueryRow(ctx, `SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','p')`, schema, table).Scan(&oid, &ident)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, &Problem{Table: qualified, What: "table does not exist"}, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("inspecting %s: %w", qualified, err)
	}
	ti := &TableInfo{Schema: schema, Table: table, ReplicaIdentity: ident[0]}
	rows, err := conn.Query(ctx, `SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, oid)
	if err != nil {
		return nil, nil, fmt.Errorf("reading columns of %s: %w", qualified, err)
	}
	ti.Columns, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, nil, fmt.Errorf("reading columns of %s: %w", qualified, err)
	}
	indexCols := func(cond string) ([]string, error) {
		rows, err := conn.Query(ctx, `SELECT a.attname FROM pg_index i
			JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
			JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
			WHERE i.indrelid = $1 AND `+cond+` ORDER BY k.ord`, oid)
		if err != nil {
			return nil, err
		}
		return pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if ti.PrimaryKey, err = indexCols("i.indisprimary"); err != nil {
		return nil, nil, fmt.Errorf("reading primary key of %s: %w", qualified, err)
	}
	switch ti.ReplicaIdentity {
	case 'f':
		ti.IdentityColumns = ti.Columns
	case 'd':
		ti.IdentityColumns = ti.PrimaryKey
	case 'i':
		ti.IdentityColumns, err = indexCols("i.indisreplident")
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading replica identity of %s: %w", qualified, err)
	}
	if len(ti.IdentityColumns) > 0 {
		return ti, nil, nil
	}
	// No usable identity: publishing UPDATE/DELETE would make the
	// application's own UPDATE and DELETE fail. Suggest the cheapest fix.
	fix := fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL;", quoteTable(schema, table))
	var idx string
	err = conn.QueryRow(ctx, `SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
		WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
		  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k WHERE NOT a.attnotnull)
		ORDER BY ic.relname LIMIT 1`, oid).Scan(&idx)
	if err == nil {
		fix = fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY USING INDEX %s;", quoteTable(schema, table), quoteIdent(idx))
	} else if !errors.Is(err, pgx.ErrNoRows) {
		return nil, nil, fmt.Errorf("looking for a unique index on %s: %w", qualified, err)
	}
	what := "has no replica identity (no primary key)"
	if ti.ReplicaIdentity == 'n' {
		what = "has REPLICA IDENTITY NOTHING"
	} else if ti.ReplicaIdentity == 'i' {
		what = "has REPLICA IDENTITY USING INDEX but the index is gone"
	}
	what += "; publishing it would make the application's UPDATE and DELETE on it fail, so Tidemark refuses to capture it"
	return ti, &Problem{Table: qualified, What: what, Fix: fix}, nil
}

// EnsurePublication makes the publication cover exactly the tables (when
// manage is true) or verifies that it exists and covers them. It must only
// be called after Inspect reported no problem for these tables.
func EnsurePublication(ctx context.Context, conn *pgx.Conn, name string, tables []string, manage bool) error {
	var exists, all, upd, del bool
	err := conn.QueryRow(ctx, `SELECT true, puballtables, pubupdate, pubdelete FROM pg_publication WHERE pubname = $1`, name).Scan(&exists, &all, &upd, &del)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("reading publication %q: %w", name, err)
	}
	quoted := make([]string, len(tables))
	for i, t := range tables {
		quoted[i] = quoteTable(splitTable(t))
	}
	if !exists {
		if !manage {
			return fmt.Errorf("publication %q does not exist; create it with: CREATE PUBLICATION %s FOR TABLE %s; (or set postgres.manage_publication: true)",
				name, quoteIdent(name), strings.Join(quoted, ", "))
		}
		if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s", quoteIdent(name), strings.Join(quoted, ", "))); err != nil {
			return fmt.Errorf("creating publication %q: %w", name, err)
		}
		return nil
	}
	if all {
		return nil
	}
	rows, err := conn.Query(ctx, `SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1`, name)
	if err != nil {
		return fmt.Errorf("reading tables of publication %q: %w", name, err)
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("reading tables of publication %q: %w", name, err)
	}
	haveSet := map[string]bool{}
	for _, h := range have {
		haveSet[h] = true
	}
	var missing []string
	for _, t := range tables {
		s, tb := splitTable(t)
		if !haveSet[s+"."+tb] {
			missing = append(missing, quoteTable(s, tb))
		}
	}
	if len(missing) == 0 && (!manage || len(have) == len(tables)) {
		return nil
	}
	if !manage {
		sort.Strings(missing)
		return fmt.Errorf("publication %q does not cover %s; add with: ALTER PUBLICATION %s ADD TABLE %s; (or set postgres.manage_publication: true)",
			name, strings.Join(missing, ", "), quoteIdent(name), strings.Join(missing, ", "))
	}
	if _, err := conn.Exec(ctx, fmt.Sprintf("ALTER PUBLICATION %s SET TABLE %s", quoteIdent(name), strings.Join(quoted, ", "))); err != nil {
		return fmt.Errorf("updating publication %q: %w", name, err)
	}
	return nil
}

// SlotState is the server's record of a replication slot.
type SlotState struct {
	Exists         bool
	Plugin         string
	Database       string
	Active         bool
	ConfirmedFlush string
	WALStatus      string
	RetainedBytes  int64
}

// ReadSlot reads pg_replication_slots for the named slot.
func ReadSlot(ctx context.Context, conn *pgx.Conn, slot string) (SlotState, error) {
	var s SlotState
	err := conn.QueryRow(ctx, `SELECT true, coalesce(plugin,''), coalesce(database,''), active,
		coalesce(confirmed_flush_lsn::text,''), coalesce(wal_status,''),
		coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn),0)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, slot).
		Scan(&s.Exists, &s.Plugin, &s.Database, &s.Active, &s.ConfirmedFlush, &s.WALStatus, &s.RetainedBytes)
	if errors.Is(err, pgx.ErrNoRows) {
		return SlotState{}, nil
	}
	if err != nil {
		return s, fmt.Errorf("reading replication slot %q: %w", slot, err)
	}
	return s, nil
}

// EnsureSlot creates the permanent pgoutput slot when missing and verifies an
// existing one belongs to this database and plugin.
func EnsureSlot(ctx context.Context, conn *pgx.Conn, slot string) (created bool, err error) {
	s, err := ReadSlot(ctx, conn, slot)
	if err != nil {
		return false, err
	}
	var db string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
		return false, fmt.Errorf("reading current database: %w", err)
	}
	if s.Exists {
		if s.Plugin != "pgoutput" {
			return false, fmt.Errorf("replication slot %q uses plugin %q, Tidemark needs pgoutput; choose another postgres.slot", slot, s.Plugin)
		}
		if s.Database != db {
			return false, fmt.Errorf("replication slot %q belongs to database %q, not %q; choose another postgres.slot", slot, s.Database, db)
		}
		if s.WALStatus == "lost" {
			return false, fmt.Errorf("replication slot %q is invalidated (wal_status lost): changes were lost; drop it and re-snapshot", slot)
		}
		return false, nil
	}
	if _, err := conn.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot); err != nil {
		return false, fmt.Errorf("creating replication slot %q: %w", slot, err)
	}
	return true, nil
}
