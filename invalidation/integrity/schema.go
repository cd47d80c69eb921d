package integrity

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Querier is the part of pgx (a conn or a pool) the schema loader uses.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// LoadSchema reads the columns and types (information_schema.columns) and
// the replica-identity columns of tables ("schema.table"). A table that
// does not exist is absent from the result.
func LoadSchema(ctx context.Context, q Querier, tables []string) (map[string]*TableSchema, error) {
	var schemas, names []string
	for _, t := range tables {
		s, n, ok := strings.Cut(t, ".")
		if !ok {
			return nil, fmt.Errorf("table %q is not schema.table", t)
		}
		schemas = append(schemas, s)
		names = append(names, n)
	}
	out := map[string]*TableSchema{}
	rows, err := q.Query(ctx, `
SELECT c.table_schema, c.table_name, c.column_name, c.udt_schema, c.udt_name
FROM information_schema.columns c
JOIN unnest($1::text[], $2::text[]) AS t(s, n) ON c.table_schema = t.s AND c.table_name = t.n
ORDER BY c.table_schema, c.table_name, c.ordinal_position`, schemas, names)
	if err != nil {
		return nil, fmt.Errorf("reading columns of %v: %w", tables, err)
	}
	for rows.Next() {
		var s, n, col, us, un string
		if err := rows.Scan(&s, &n, &col, &us, &un); err != nil {
			rows.Close()
			return nil, err
		}
		name := s + "." + n
		ts := out[name]
		if ts == nil {
			ts = &TableSchema{Name: name, Types: map[string]string{}}
			out[name] = ts
		}
		ts.Columns = append(ts.Columns, col)
		ts.Types[col] = pgx.Identifier{us, un}.Sanitize()
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading columns of %v: %w", tables, err)
	}
	// Old-row images carry the replica identity: all columns (FULL), the
	// identity index's (INDEX), the primary key's (DEFAULT) or none.
	rows, err = q.Query(ctx, `
SELECT n.nspname, c.relname, c.relreplident::text,
  coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum)
     FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
     WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))),
   '{}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN unnest($1::text[], $2::text[]) AS t(s, n) ON n.nspname = t.s AND c.relname = t.n`, schemas, names)
	if err != nil {
		return nil, fmt.Errorf("reading replica identities of %v: %w", tables, err)
	}
	defer rows.Close()
	for rows.Next() {
		var s, n, ident string
		var cols []string
		if err := rows.Scan(&s, &n, &ident, &cols); err != nil {
			return nil, err
		}
		ts := out[s+"."+n]
		if ts == nil {
			continue
		}
		if ident == "f" {
			ts.Identity = append([]string(nil), ts.Columns...)
		} else if ident != "n" {
			ts.Identity = cols
		}
	}
	return out, rows.Err()
}
