package capture

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// KeyChoice is what keys a table's messages, and why.
type KeyChoice struct {
	Columns []string
	// Source says where the columns come from: "postgres.key_columns",
	// "primary key", "replica identity index", "unique index <name>" or
	// "whole row".
	Source string
	// Warning, when set, is what an operator should know about the choice
	// (a table keyed by its whole row).
	Warning string
}

// ChooseKey picks the columns that key ti's messages: configured (from
// postgres.key_columns) when given; else the primary key when deletes carry
// it; else the replica identity index; else unique, the columns of a unique
// index over NOT NULL columns (see UniqueNotNullIndex); else the whole row,
// with a warning (under REPLICA IDENTITY FULL every update that changes a
// column is then a new key: a delete and an insert, possibly in different
// partitions). Every choice must be carried by deletes (be in the replica
// identity): a configured key that is not is a problem with its fix.
func ChooseKey(ti TableInfo, configured []string, uniqueName string, unique []string) (KeyChoice, []Problem) {
	q := ti.Qualified()
	if len(configured) > 0 {
		var ps []Problem
		for _, c := range configured {
			if !slices.Contains(ti.Columns, c) {
				ps = append(ps, Problem{Table: q, What: fmt.Sprintf("postgres.key_columns names column %q, which the table does not have", c)})
			} else if !ti.HasIdentityColumn(c) {
				ps = append(ps, Problem{Table: q, What: fmt.Sprintf("key column %q (postgres.key_columns) is not in the replica identity, so deletes would not carry it", c),
					Fix: fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL;", quoteTable(ti.Schema, ti.Table))})
			}
		}
		return KeyChoice{Columns: configured, Source: "postgres.key_columns"}, ps
	}
	if len(ti.PrimaryKey) > 0 && allIn(ti.PrimaryKey, ti.IdentityColumns) {
		return KeyChoice{Columns: ti.PrimaryKey, Source: "primary key"}, nil
	}
	if ti.ReplicaIdentity == 'i' && len(ti.IdentityColumns) > 0 {
		return KeyChoice{Columns: ti.IdentityColumns, Source: "replica identity index"}, nil
	}
	if len(ti.PrimaryKey) > 0 {
		// No usable identity: Inspect reports that table as a problem.
		return KeyChoice{Columns: ti.PrimaryKey, Source: "primary key"}, nil
	}
	if len(unique) > 0 && allIn(unique, ti.IdentityColumns) {
		return KeyChoice{Columns: unique, Source: "unique index " + uniqueName}, nil
	}
	return KeyChoice{Columns: ti.IdentityColumns, Source: "whole row",
		Warning: "keyed by its whole row (no primary key, replica identity index or unique index over NOT NULL columns): an update is published as a delete and an insert under a new key, possibly in another partition; set postgres.key_columns for it, or add such an index"}, nil
}

func allIn(cols, set []string) bool {
	for _, c := range cols {
		if !slices.Contains(set, c) {
			return false
		}
	}
	return true
}

// UniqueNotNullIndex returns the name and columns (in index order) of the
// table's unique index with the fewest columns (then the first by name)
// that is valid, not partial, on plain columns only, all NOT NULL; "" and
// nil when there is none.
func UniqueNotNullIndex(ctx context.Context, conn *pgx.Conn, oid uint32) (string, []string, error) {
	var name string
	var cols []string
	err := conn.QueryRow(ctx, `SELECT ic.relname, array_agg(a.attname ORDER BY k.ord)
		FROM pg_index i
		JOIN pg_class ic ON ic.oid = i.indexrelid
		JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
			AND k.ord <= i.indnkeyatts
		GROUP BY ic.relname
		HAVING bool_and(a.attnotnull)
		ORDER BY count(*), ic.relname LIMIT 1`, oid).Scan(&name, &cols)
	if err == pgx.ErrNoRows {
		return "", nil, nil
	}
	if err != nil {
		return "", nil, fmt.Errorf("reading unique indexes: %w", err)
	}
	return name, cols, nil
}

// String describes the choice for tidemark check's table lines.
func (k KeyChoice) String() string {
	return fmt.Sprintf("key (%s) from the %s", strings.Join(k.Columns, ", "), k.Source)
}
