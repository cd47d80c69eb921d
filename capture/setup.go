package capture

import (
	"context"
	"errors"
	"fmt"
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
	// OID is the table's pg_class oid.
	OID uint32
	// Partitioned reports a partitioned table (relkind 'p'). Its rows live
	// in its leaf partitions; Tidemark captures their changes under the
	// partitioned table's name (publish_via_partition_root), and its
	// IdentityColumns are those every leaf sends in old-row images.
	Partitioned bool
	// Key is the key chosen for the table's messages (ChooseKey), once
	// chosen.
	Key *KeyChoice
}

// KeyColumns returns the columns that key the table's messages: Key's when
// it was chosen (see ChooseKey), else the primary key, or the replica
// identity when there is none.
func (t TableInfo) KeyColumns() []string {
	if t.Key != nil {
		return t.Key.Columns
	}
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
		ti, ps, err := inspectTable(ctx, conn, schema, table)
		if err != nil {
			return nil, nil, err
		}
		problems = append(problems, ps...)
		if ti != nil {
			infos[ti.Qualified()] = *ti
		}
	}
	return infos, problems, nil
}

func inspectTable(ctx context.Context, conn *pgx.Conn, schema, table string) (*TableInfo, []Problem, error) {
	qualified := schema + "." + table
	var oid uint32
	var ident, kind string
	err := conn.QueryRow(ctx, `SELECT c.oid, c.relreplident::text, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r','p')`, schema, table).Scan(&oid, &ident, &kind)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, []Problem{{Table: qualified, What: "table does not exist"}}, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("inspecting %s: %w", qualified, err)
	}
	ti := &TableInfo{Schema: schema, Table: table, ReplicaIdentity: ident[0], OID: oid, Partitioned: kind == "p"}
	if err := readIdentity(ctx, conn, ti); err != nil {
		return nil, nil, err
	}
	if ti.Partitioned {
		return inspectPartitions(ctx, conn, ti)
	}
	p, err := identityProblem(ctx, conn, ti)
	if err != nil || p == nil {
		return ti, nil, err
	}
	return ti, []Problem{*p}, nil
}

// readIdentity fills ti's columns, primary key and identity columns.
func readIdentity(ctx context.Context, conn *pgx.Conn, ti *TableInfo) error {
	qualified := ti.Qualified()
	rows, err := conn.Query(ctx, `SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, ti.OID)
	if err != nil {
		return fmt.Errorf("reading columns of %s: %w", qualified, err)
	}
	ti.Columns, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("reading columns of %s: %w", qualified, err)
	}
	indexCols := func(cond string) ([]string, error) {
		rows, err := conn.Query(ctx, `SELECT a.attname FROM pg_index i
			JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
			JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
			WHERE i.indrelid = $1 AND `+cond+` ORDER BY k.ord`, ti.OID)
		if err != nil {
			return nil, err
		}
		return pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if ti.PrimaryKey, err = indexCols("i.indisprimary"); err != nil {
		return fmt.Errorf("reading primary key of %s: %w", qualified, err)
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
		return fmt.Errorf("reading replica identity of %s: %w", qualified, err)
	}
	return nil
}

// identityProblem is the problem of a table without a usable replica
// identity (nil when it has one): publishing UPDATE/DELETE would make the
// application's own UPDATE and DELETE on it fail. It suggests the cheapest
// fix.
func identityProblem(ctx context.Context, conn *pgx.Conn, ti *TableInfo) (*Problem, error) {
	if len(ti.IdentityColumns) > 0 {
		return nil, nil
	}
	qualified := ti.Qualified()
	fix := fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL;", quoteTable(ti.Schema, ti.Table))
	var idx string
	err := conn.QueryRow(ctx, `SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
		WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
		  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k WHERE NOT a.attnotnull)
		ORDER BY ic.relname LIMIT 1`, ti.OID).Scan(&idx)
	if err == nil {
		fix = fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY USING INDEX %s;", quoteTable(ti.Schema, ti.Table), quoteIdent(idx))
	} else if !errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("looking for a unique index on %s: %w", qualified, err)
	}
	what := "has no replica identity (no primary key)"
	if ti.ReplicaIdentity == 'n' {
		what = "has REPLICA IDENTITY NOTHING"
	} else if ti.ReplicaIdentity == 'i' {
		what = "has REPLICA IDENTITY USING INDEX but the index is gone"
	}
	what += "; publishing it would make the application's UPDATE and DELETE on it fail, so Tidemark refuses to capture it"
	return &Problem{Table: qualified, What: what, Fix: fix}, nil
}

// inspectPartitions checks the leaf partitions of the partitioned table ti.
// Postgres checks the replica identity of the partition a row is in, not the
// partitioned table's own setting (ALTER TABLE on the partitioned table does
// not change its partitions), so each leaf needs one; the old-row images of
// ti carry the columns every leaf sends. Without partitions, ti's own
// identity decides.
func inspectPartitions(ctx context.Context, conn *pgx.Conn, ti *TableInfo) (*TableInfo, []Problem, error) {
	rows, err := conn.Query(ctx, `SELECT n.nspname, c.relname FROM pg_partition_tree($1) t
		JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE t.isleaf AND c.relkind = 'r' ORDER BY 1, 2`, ti.OID)
	if err != nil {
		return nil, nil, fmt.Errorf("reading the partitions of %s: %w", ti.Qualified(), err)
	}
	type leaf struct{ schema, table string }
	leaves, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (leaf, error) {
		var l leaf
		return l, r.Scan(&l.schema, &l.table)
	})
	if err != nil {
		return nil, nil, fmt.Errorf("reading the partitions of %s: %w", ti.Qualified(), err)
	}
	if len(leaves) == 0 {
		p, err := identityProblem(ctx, conn, ti)
		if err != nil || p == nil {
			return ti, nil, err
		}
		return ti, []Problem{*p}, nil
	}
	var problems []Problem
	ids := ti.Columns
	for _, l := range leaves {
		lt, ps, err := inspectTable(ctx, conn, l.schema, l.table)
		if err != nil {
			return nil, nil, err
		}
		if lt == nil {
			continue // dropped meanwhile
		}
		for _, p := range ps {
			p.What = "partition of " + ti.Qualified() + " " + p.What
			problems = append(problems, p)
		}
		var keep []string
		for _, c := range ids {
			if lt.HasIdentityColumn(c) {
				keep = append(keep, c)
			}
		}
		ids = keep
	}
	ti.IdentityColumns = ids
	return ti, problems, nil
}

// PublishOps is the publish option capture needs: an operation a
// publication does not publish is silently missing from the topics.
const PublishOps = "insert, update, delete, truncate"

// Publication is the server's record of a publication (pg_publication).
type Publication struct {
	Name   string
	OID    uint32
	Exists bool
	// AllTables is FOR ALL TABLES.
	AllTables                        bool
	Insert, Update, Delete, Truncate bool
	// ViaRoot is publish_via_partition_root: the changes of a partition are
	// published as its partitioned table's (the root's). Off, they carry the
	// partitions' own names, which are not captured.
	ViaRoot bool
}

// MissingOps lists, in PublishOps order, the operations p does not publish.
func (p Publication) MissingOps() []string {
	var out []string
	for _, op := range []struct {
		name string
		on   bool
	}{{"insert", p.Insert}, {"update", p.Update}, {"delete", p.Delete}, {"truncate", p.Truncate}} {
		if !op.on {
			out = append(out, op.name)
		}
	}
	return out
}

// ReadPublication reads pg_publication for the named publication; Exists is
// false when there is none.
func ReadPublication(ctx context.Context, conn *pgx.Conn, name string) (Publication, error) {
	p := Publication{Name: name}
	err := conn.QueryRow(ctx, `SELECT oid, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot
		FROM pg_publication WHERE pubname = $1`, name).
		Scan(&p.OID, &p.AllTables, &p.Insert, &p.Update, &p.Delete, &p.Truncate, &p.ViaRoot)
	if errors.Is(err, pgx.ErrNoRows) {
		return Publication{Name: name}, nil
	}
	if err != nil {
		return Publication{}, fmt.Errorf("reading publication %q: %w", name, err)
	}
	p.Exists = true
	return p, nil
}

func serverVersion(ctx context.Context, conn *pgx.Conn) (int, error) {
	var v int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&v); err != nil {
		return 0, fmt.Errorf("reading server_version_num: %w", err)
	}
	return v, nil
}

func quoteTables(tables []TableInfo) []string {
	out := make([]string, len(tables))
	for i, t := range tables {
		out[i] = quoteTable(t.Schema, t.Table)
	}
	return out
}

// ExtraTables lists ("schema.table", sorted) the tables the publication
// publishes that are none of tables nor a partition of one (which
// pg_partition_ancestors lists only for partitions): their changes
// reach capture, which skips or refuses them (postgres.unknown_tables).
// Nothing when the publication does not exist.
func ExtraTables(ctx context.Context, conn *pgx.Conn, name string, tables []TableInfo) ([]string, error) {
	oids := make([]uint32, len(tables))
	for i, t := range tables {
		oids[i] = t.OID
	}
	rows, err := conn.Query(ctx, `SELECT pt.schemaname || '.' || pt.tablename
		FROM pg_publication_tables pt
		JOIN pg_namespace n ON n.nspname = pt.schemaname
		JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
		WHERE pt.pubname = $1
		  AND c.oid <> ALL ($2::oid[])
		  AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a WHERE a.relid = ANY ($2::oid[]))
		ORDER BY 1`, name, oids)
	if err != nil {
		return nil, fmt.Errorf("reading the tables of publication %q: %w", name, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("reading the tables of publication %q: %w", name, err)
	}
	return out, nil
}

// PublicationProblems checks a publication that Tidemark does not manage
// against the tables (as Inspect found them, in the configured order) and
// changes nothing. Each problem is something that would make capture miss
// changes silently, with the statement that fixes it: the publication is
// missing, does not cover a table, does not publish insert, update, delete
// and truncate, publishes a partitioned table under its partitions' names
// (publish_via_partition_root off), or (Postgres 15 and later) has a row
// filter or column list on a captured table. On a server older than
// MinServerVersion it reports nothing (Inspect reports the version).
func PublicationProblems(ctx context.Context, conn *pgx.Conn, name string, tables []TableInfo) ([]Problem, error) {
	version, err := serverVersion(ctx, conn)
	if err != nil || version < MinServerVersion {
		return nil, err
	}
	pub, err := ReadPublication(ctx, conn, name)
	if err != nil {
		return nil, err
	}
	var partitioned []string
	for _, t := range tables {
		if t.Partitioned {
			partitioned = append(partitioned, t.Qualified())
		}
	}
	if !pub.Exists {
		with := ""
		if len(partitioned) > 0 {
			with = " WITH (publish_via_partition_root = true)"
		}
		return []Problem{{What: fmt.Sprintf("publication %q does not exist (postgres.manage_publication is false, so Tidemark does not create it)", name),
			Fix: fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s%s;", quoteIdent(name), strings.Join(quoteTables(tables), ", "), with)}}, nil
	}
	var ps []Problem
	if missing := pub.MissingOps(); len(missing) > 0 {
		ps = append(ps, Problem{
			What: fmt.Sprintf("publication %q does not publish %s: those changes would not be captured", name, strings.Join(missing, ", ")),
			Fix:  fmt.Sprintf("ALTER PUBLICATION %s SET (publish = '%s');", quoteIdent(name), PublishOps)})
	}
	var uncovered []string
	var covered []TableInfo
	for _, t := range tables {
		ok, err := covers(ctx, conn, pub, t, version)
		if err != nil {
			return nil, err
		}
		if ok {
			covered = append(covered, t)
		} else {
			uncovered = append(uncovered, quoteTable(t.Schema, t.Table))
		}
	}
	if len(uncovered) > 0 {
		ps = append(ps, Problem{
			What: fmt.Sprintf("publication %q does not cover %s: their changes would not be captured", name, strings.Join(uncovered, ", ")),
			Fix:  fmt.Sprintf("ALTER PUBLICATION %s ADD TABLE %s;", quoteIdent(name), strings.Join(uncovered, ", "))})
	}
	if !pub.ViaRoot && len(partitioned) > 0 {
		ps = append(ps, Problem{
			What: fmt.Sprintf("publication %q has publish_via_partition_root off: the changes of partitioned table(s) %s would be published under their partitions' names and not reach their topics",
				name, strings.Join(partitioned, ", ")),
			Fix: fmt.Sprintf("ALTER PUBLICATION %s SET (publish_via_partition_root = true);", quoteIdent(name))})
	}
	if version >= 150000 {
		for _, t := range covered {
			fps, err := filterProblems(ctx, conn, pub, t)
			if err != nil {
				return nil, err
			}
			ps = append(ps, fps...)
		}
	}
	return ps, nil
}

// covers reports whether pub publishes the changes of t: pg_publication_tables
// lists it, or (a partitioned table, whose partitions pg_publication_tables
// lists instead while publish_via_partition_root is off) it or an ancestor
// is a member, itself or (Postgres 15 and later) through its schema.
func covers(ctx context.Context, conn *pgx.Conn, pub Publication, t TableInfo, version int) (bool, error) {
	if pub.AllTables {
		return true, nil
	}
	q := `SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)
		OR EXISTS (SELECT 1 FROM pg_publication_rel WHERE prpubid = $4 AND prrelid IN (SELECT relid FROM pg_partition_ancestors($5)))`
	if version >= 150000 {
		q += `
		OR EXISTS (SELECT 1 FROM pg_publication_namespace pn JOIN pg_class c ON c.relnamespace = pn.pnnspid
			WHERE pn.pnpubid = $4 AND c.oid IN (SELECT relid FROM pg_partition_ancestors($5)))`
	}
	var ok bool
	if err := conn.QueryRow(ctx, q, pub.Name, t.Schema, t.Table, pub.OID, t.OID).Scan(&ok); err != nil {
		return false, fmt.Errorf("reading whether publication %q covers %s: %w", pub.Name, t.Qualified(), err)
	}
	return ok, nil
}

// filterProblems reports the row filters and column lists (Postgres 15 and
// later) of pub on t, its ancestors and its partitions: each makes capture
// miss changes silently.
func filterProblems(ctx context.Context, conn *pgx.Conn, pub Publication, t TableInfo) ([]Problem, error) {
	rows, err := conn.Query(ctx, `SELECT n.nspname, c.relname, pg_get_expr(pr.prqual, pr.prrelid),
			(SELECT string_agg(a.attname, ', ' ORDER BY a.attnum) FROM pg_attribute a
			 WHERE a.attrelid = pr.prrelid AND a.attnum = ANY (pr.prattrs::int2[]))
		FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE pr.prpubid = $1 AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL)
		  AND (pr.prrelid = $2 OR pr.prrelid IN (SELECT relid FROM pg_partition_ancestors($2))
		       OR pr.prrelid IN (SELECT relid FROM pg_partition_tree($2)))
		ORDER BY 1, 2`, pub.OID, t.OID)
	if err != nil {
		return nil, fmt.Errorf("reading the row filters and column lists of publication %q: %w", pub.Name, err)
	}
	var ps []Problem
	for rows.Next() {
		var schema, table string
		var qual, cols *string
		if err := rows.Scan(&schema, &table, &qual, &cols); err != nil {
			rows.Close()
			return nil, fmt.Errorf("reading the row filters and column lists of publication %q: %w", pub.Name, err)
		}
		var only []string
		if qual != nil {
			only = append(only, "the rows WHERE "+*qual)
		}
		if cols != nil {
			only = append(only, "the columns "+*cols)
		}
		of := ""
		if schema != t.Schema || table != t.Table {
			of = " of " + schema + "." + table
		}
		rel := quoteTable(schema, table)
		ps = append(ps, Problem{Table: t.Qualified(),
			What: fmt.Sprintf("publication %q publishes only %s%s: the other changes would silently not be captured", pub.Name, strings.Join(only, " and only "), of),
			Fix: fmt.Sprintf("BEGIN; ALTER PUBLICATION %s DROP TABLE %s; ALTER PUBLICATION %s ADD TABLE %s; COMMIT;",
				quoteIdent(pub.Name), rel, quoteIdent(pub.Name), rel)})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading the row filters and column lists of publication %q: %w", pub.Name, err)
	}
	return ps, nil
}

// EnsurePublication, when manage is true, creates the publication or
// alters it to publish exactly the tables (as Inspect found them), without
// row filters or column lists, with publish = PublishOps and
// publish_via_partition_root = true (a FOR ALL TABLES publication keeps its
// tables). When manage is false it changes nothing and returns a
// *PreflightError listing PublicationProblems, if any. It must only be
// called after Inspect reported no problem for these tables.
func EnsurePublication(ctx context.Context, conn *pgx.Conn, name string, tables []TableInfo, manage bool) error {
	if !manage {
		ps, err := PublicationProblems(ctx, conn, name, tables)
		if err != nil {
			return err
		}
		if len(ps) > 0 {
			return &PreflightError{Problems: ps}
		}
		return nil
	}
	pub, err := ReadPublication(ctx, conn, name)
	if err != nil {
		return err
	}
	list := strings.Join(quoteTables(tables), ", ")
	if !pub.Exists {
		if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish = '%s', publish_via_partition_root = true)",
			quoteIdent(name), list, PublishOps)); err != nil {
			return fmt.Errorf("creating publication %q: %w", name, err)
		}
		return nil
	}
	if !pub.AllTables {
		same, err := publishesExactly(ctx, conn, pub, tables)
		if err != nil {
			return err
		}
		if !same {
			// SET TABLE also drops row filters, column lists and schemas.
			if _, err := conn.Exec(ctx, fmt.Sprintf("ALTER PUBLICATION %s SET TABLE %s", quoteIdent(name), list)); err != nil {
				return fmt.Errorf("updating publication %q: %w", name, err)
			}
		}
	}
	if len(pub.MissingOps()) > 0 || !pub.ViaRoot {
		if _, err := conn.Exec(ctx, fmt.Sprintf("ALTER PUBLICATION %s SET (publish = '%s', publish_via_partition_root = true)",
			quoteIdent(name), PublishOps)); err != nil {
			return fmt.Errorf("updating publication %q: %w", name, err)
		}
	}
	return nil
}

// publishesExactly reports whether pub's members are exactly tables, with
// no row filter, column list or (Postgres 15 and later) schema.
func publishesExactly(ctx context.Context, conn *pgx.Conn, pub Publication, tables []TableInfo) (bool, error) {
	version, err := serverVersion(ctx, conn)
	if err != nil {
		return false, err
	}
	filtered := "false"
	if version >= 150000 {
		var schemas int
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_publication_namespace WHERE pnpubid = $1", pub.OID).Scan(&schemas); err != nil {
			return false, fmt.Errorf("reading the schemas of publication %q: %w", pub.Name, err)
		}
		if schemas > 0 {
			return false, nil
		}
		filtered = "prqual IS NOT NULL OR prattrs IS NOT NULL"
	}
	type member struct {
		oid      uint32
		filtered bool
	}
	rows, err := conn.Query(ctx, "SELECT prrelid, "+filtered+" FROM pg_publication_rel WHERE prpubid = $1", pub.OID)
	if err != nil {
		return false, fmt.Errorf("reading the tables of publication %q: %w", pub.Name, err)
	}
	members, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (member, error) {
		var m member
		return m, r.Scan(&m.oid, &m.filtered)
	})
	if err != nil {
		return false, fmt.Errorf("reading the tables of publication %q: %w", pub.Name, err)
	}
	if len(members) != len(tables) {
		return false, nil
	}
	want := map[uint32]bool{}
	for _, t := range tables {
		want[t.OID] = true
	}
	for _, m := range members {
		if m.filtered || !want[m.oid] {
			return false, nil
		}
	}
	return true, nil
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

// EnsureSlot verifies that an existing slot belongs to this database and
// plugin and is not invalidated, or creates the permanent pgoutput slot when
// it is missing. A new slot starts at the current WAL position: whatever was
// committed before is never decoded. So before creating one it calls
// mayCreate (when not nil), and creates nothing when that returns an error,
// which it returns.
func EnsureSlot(ctx context.Context, conn *pgx.Conn, slot string, mayCreate func(context.Context) error) (created bool, err error) {
	return EnsureSlotWith(ctx, conn, slot, mayCreate, nil)
}

// EnsureSlotWith is EnsureSlot creating a missing slot with create (when
// not nil) instead of pg_create_logical_replication_slot: see
// CreateSlotWithSnapshot.
func EnsureSlotWith(ctx context.Context, conn *pgx.Conn, slot string, mayCreate, create func(context.Context) error) (created bool, err error) {
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
			return false, fmt.Errorf("replication slot %q is invalidated (wal_status lost): %s", slot, LostSlotAdvice(slot))
		}
		return false, nil
	}
	if mayCreate != nil {
		if err := mayCreate(ctx); err != nil {
			return false, err
		}
	}
	if create != nil {
		if err := create(ctx); err != nil {
			return false, err
		}
		return true, nil
	}
	if err := CreateSlot(ctx, conn, slot); err != nil {
		return false, err
	}
	return true, nil
}

// CreateSlot creates the permanent pgoutput slot without a snapshot, and
// forgets any record of an initial snapshot of an earlier slot of that
// name (see CheckSnapshotComplete).
func CreateSlot(ctx context.Context, conn *pgx.Conn, slot string) error {
	if err := forgetSnapshotRecord(ctx, conn, slot); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot); err != nil {
		return fmt.Errorf("creating replication slot %q: %w", slot, err)
	}
	return nil
}

// LostSlotAdvice says what an invalidated slot means and how to go on.
func LostSlotAdvice(slot string) string {
	return fmt.Sprintf("Postgres removed WAL it still needed, so changes committed after its confirmed_flush_lsn are lost to capture; "+
		"to continue from now, leaving that gap, drop it (SELECT pg_drop_replication_slot('%s');) and start with `tidemark run --accept-gap`, "+
		"or start with `tidemark run --resnapshot`, which drops it and publishes every table again from a snapshot at the new slot's start", slot)
}
