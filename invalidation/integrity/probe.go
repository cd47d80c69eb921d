package integrity

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/tidemark/tidemark/invalidation/expr"
)

// Prober confirms expectations against the database: read-only (the pool
// should set default_transaction_read_only), pooled and rate-limited.
type Prober struct {
	pool  *pgxpool.Pool
	lim   *rate.Limiter
	chunk int
}

// NewProber checks at most perSecond rows per second (bursts of up to
// burst rows, which is also the most rows one query asks about).
func NewProber(pool *pgxpool.Pool, perSecond float64, burst int) *Prober {
	if burst < 1 {
		burst = 1
	}
	return &Prober{pool: pool, lim: rate.NewLimiter(rate.Limit(perSecond), burst), chunk: burst}
}

// Existing reports which keys (values of cols, as text, in cols' order)
// have a row in t whose cols equal them and that matches where (nil: any
// row). The result is indexed like keys.
func (p *Prober) Existing(ctx context.Context, t *TableSchema, cols []string, where *expr.Expr, keys [][]string) ([]bool, error) {
	sql, extra := existsSQL(t, cols, where)
	return p.query(ctx, t.Name, sql, len(cols), extra, keys)
}

// Orphaned reports which keys have a parent row (in parent, matching
// parCols and parWhere) but no related row (in rel, relCols and relWhere),
// both EXISTS in one statement, so both are read in one snapshot.
func (p *Prober) Orphaned(ctx context.Context, parent *TableSchema, parCols []string, parWhere *expr.Expr,
	rel *TableSchema, relCols []string, relWhere *expr.Expr, keys [][]string) ([]bool, error) {
	sql, extra := pairSQL(parent, parCols, parWhere, rel, relCols, relWhere, true)
	return p.query(ctx, parent.Name+" and "+rel.Name, sql, len(parCols), extra, keys)
}

// Forbidden reports which keys have both a parent row (in parent, matching
// parCols and parWhere) and a forbidden related row (in rel, relCols and
// relWhere), both EXISTS in one statement (one snapshot).
func (p *Prober) Forbidden(ctx context.Context, parent *TableSchema, parCols []string, parWhere *expr.Expr,
	rel *TableSchema, relCols []string, relWhere *expr.Expr, keys [][]string) ([]bool, error) {
	sql, extra := pairSQL(parent, parCols, parWhere, rel, relCols, relWhere, false)
	return p.query(ctx, parent.Name+" and "+rel.Name, sql, len(parCols), extra, keys)
}

// query runs sql over keys in rate-limited chunks: $1 the keys' indexes,
// $2.. one text array per key column, then the conditions' parameters
// (extra).
func (p *Prober) query(ctx context.Context, what, sql string, ncols int, extra []any, keys [][]string) ([]bool, error) {
	out := make([]bool, len(keys))
	for start := 0; start < len(keys); start += p.chunk {
		end := min(start+p.chunk, len(keys))
		if err := p.lim.WaitN(ctx, end-start); err != nil {
			return nil, err
		}
		idx := make([]int32, 0, end-start)
		arrays := make([][]string, ncols)
		for i := start; i < end; i++ {
			idx = append(idx, int32(i))
			for j := range ncols {
				arrays[j] = append(arrays[j], keys[i][j])
			}
		}
		args := []any{idx}
		for _, a := range arrays {
			args = append(args, a)
		}
		args = append(args, extra...)
		rows, err := p.pool.Query(ctx, sql, args...)
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", what, err)
		}
		for rows.Next() {
			var i int32
			if err := rows.Scan(&i); err != nil {
				rows.Close()
				return nil, err
			}
			out[i] = true
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("checking %s: %w", what, err)
		}
	}
	return out, nil
}

// existsSQL builds
//
//	SELECT k.i FROM unnest($1::int4[], $2::text[], ...) AS k(i, c0, ...)
//	WHERE EXISTS (SELECT 1 FROM t r WHERE r.col0 = k.c0::type0 AND ... AND <where>)
//
// with where rendered parameterized (its values returned, for the
// parameters after the key arrays). Casting the text parameter to the
// column's type keeps the column's index usable.
func existsSQL(t *TableSchema, cols []string, where *expr.Expr) (string, []any) {
	var extra []any
	cond := existsCond(t, cols, where, len(cols)+1, &extra)
	return keysSQL(len(cols)) + " WHERE " + cond, extra
}

// pairSQL is existsSQL's statement with EXISTS (parent) AND [NOT] EXISTS
// (related): the parent's parameters come first, then the related's.
func pairSQL(parent *TableSchema, parCols []string, parWhere *expr.Expr, rel *TableSchema, relCols []string, relWhere *expr.Expr, not bool) (string, []any) {
	var extra []any
	par := existsCond(parent, parCols, parWhere, len(parCols)+1, &extra)
	r := existsCond(rel, relCols, relWhere, len(parCols)+1, &extra)
	op := " AND "
	if not {
		op = " AND NOT "
	}
	return keysSQL(len(parCols)) + " WHERE " + par + op + r, extra
}

func keysSQL(ncols int) string {
	var b strings.Builder
	b.WriteString("SELECT k.i FROM unnest($1::int4[]")
	for j := range ncols {
		fmt.Fprintf(&b, ", $%d::text[]", j+2)
	}
	b.WriteString(") AS k(i")
	for j := range ncols {
		b.WriteString(", c" + strconv.Itoa(j))
	}
	b.WriteString(")")
	return b.String()
}

// existsCond is "EXISTS (SELECT 1 FROM t r WHERE r.col_j = k.c_j::type AND
// (where))", where's values appended to extra as parameters numbered after
// the first fixed ones (the index and key arrays).
func existsCond(t *TableSchema, cols []string, where *expr.Expr, fixed int, extra *[]any) string {
	schema, name, _ := strings.Cut(t.Name, ".")
	var conds []string
	for j, c := range cols {
		conds = append(conds, fmt.Sprintf("r.%s = k.c%d::%s", pgx.Identifier{c}.Sanitize(), j, t.Types[c]))
	}
	if where != nil {
		conds = append(conds, where.SQL(func(c string) string { return "r." + pgx.Identifier{c}.Sanitize() },
			func(v any) string { *extra = append(*extra, v); return "$" + strconv.Itoa(fixed+len(*extra)) }))
	}
	return "EXISTS (SELECT 1 FROM " + pgx.Identifier{schema, name}.Sanitize() + " r WHERE " + strings.Join(conds, " AND ") + ")"
}
