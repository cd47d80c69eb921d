package capture

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// resolveTypes prepares the decoder for the column types of a Relation
// message (see decoder.resolveTypes) before any change of the relation is
// decoded. Built-in types need nothing; others are looked up once per
// stream, on a connection of their own (a replication connection cannot run
// queries while it streams). A failed lookup fails the session, which
// reconnects: the relation's values would otherwise be published in
// another form.
func (s *Stream) resolveTypes(ctx context.Context, m *pglogrepl.RelationMessage) error {
	oids := make([]uint32, len(m.Columns))
	for i, c := range m.Columns {
		oids[i] = c.DataType
	}
	if err := s.dec.resolveTypes(ctx, oids, s.lookupTypes); err != nil {
		return fmt.Errorf("resolving the column types of %s.%s: %w", m.Namespace, m.RelationName, err)
	}
	return nil
}

// typesQuery reads the pg_type rows of $1 and, recursively, of the domains'
// base types and the arrays' element types that are not built in (OIDs
// from 16384, firstNormalOID, up).
const typesQuery = `WITH RECURSIVE t(oid) AS (
	SELECT unnest($1::pg_catalog.oid[])
	UNION
	SELECT CASE WHEN p.typtype = 'd' THEN p.typbasetype ELSE p.typelem END
	FROM t JOIN pg_catalog.pg_type p ON p.oid = t.oid
	WHERE t.oid >= 16384
	  AND (p.typtype = 'd' OR p.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc)
)
SELECT p.oid, p.typtype = 'd', p.typbasetype,
	CASE WHEN p.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc THEN p.typelem ELSE 0::pg_catalog.oid END
FROM t JOIN pg_catalog.pg_type p ON p.oid = t.oid
WHERE t.oid >= 16384`

// lookupTypes is the stream's typeLookup: one short-lived connection per
// call (calls are rare: once per type that is not built in).
func (s *Stream) lookupTypes(ctx context.Context, oids []uint32) (map[uint32]pgType, error) {
	cfg, err := pgx.ParseConfig(s.cfg.DSN)
	if err != nil {
		return nil, errors.New("parsing the postgres DSN failed") // the DSN may hold a password
	}
	cfg.RuntimeParams["application_name"] = "tidemark-types"
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(cctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connecting: %w", ExplainTLS(err))
	}
	defer conn.Close(context.Background())
	return queryTypes(cctx, conn, oids)
}

// queryTypes runs typesQuery for oids on q (a connection or a
// transaction).
func queryTypes(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, oids []uint32) (map[uint32]pgType, error) {
	rows, err := q.Query(ctx, typesQuery, oids)
	if err != nil {
		return nil, err
	}
	out := map[uint32]pgType{}
	var oid uint32
	var t pgType
	_, err = pgx.ForEachRow(rows, []any{&oid, &t.Domain, &t.Base, &t.Elem}, func() error {
		out[oid] = t
		return nil
	})
	return out, err
}
