package integrity

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"
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
// have a row in t whose cols equal them and whose where columns hold the
// given values. The result is indexed like keys.
func (p *Prober) Existing(ctx context.Context, t *TableSchema, cols []string, where map[string]string, keys [][]string) ([]bool, error) {
	out := make([]bool, len(keys))
	sql := existsSQL(t, cols, where)
	wcols := sortedKeys(where)
	for start := 0; start < len(keys); start += p.chunk {
		end := min(start+p.chunk, len(keys))
		if err := p.lim.WaitN(ctx, end-start); err != nil {
			return nil, err
		}
		idx := make([]int32, 0, end-start)
		arrays := make([][]string, len(cols))
		for i := start; i < end; i++ {
			idx = append(idx, int32(i))
			for j := range cols {
				arrays[j] = append(arrays[j], keys[i][j])
			}
		}
		args := []any{idx}
		for _, a := range arrays {
			args = append(args, a)
		}
		for _, c := range wcols {
			args = append(args, where[c])
		}
		rows, err := p.pool.Query(ctx, sql, args...)
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", t.Name, err)
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
			return nil, fmt.Errorf("checking %s: %w", t.Name, err)
		}
	}
	return out, nil
}

// existsSQL builds
//
//	SELECT k.i FROM unnest($1::int4[], $2::text[], ...) AS k(i, c0, ...)
//	WHERE EXISTS (SELECT 1 FROM t r WHERE r.col0 = k.c0::type0 AND ... AND r.w = $n::typew)
//
// Casting the text parameter to the column's type keeps the column's index
// usable.
func existsSQL(t *TableSchema, cols []string, where map[string]string) string {
	schema, name, _ := strings.Cut(t.Name, ".")
	var b strings.Builder
	b.WriteString("SELECT k.i FROM unnest($1::int4[]")
	for j := range cols {
		fmt.Fprintf(&b, ", $%d::text[]", j+2)
	}
	b.WriteString(") AS k(i")
	for j := range cols {
		b.WriteString(", c" + strconv.Itoa(j))
	}
	b.WriteString(") WHERE EXISTS (SELECT 1 FROM " + pgx.Identifier{schema, name}.Sanitize() + " r WHERE ")
	var conds []string
	for j, c := range cols {
		conds = append(conds, fmt.Sprintf("r.%s = k.c%d::%s", pgx.Identifier{c}.Sanitize(), j, t.Types[c]))
	}
	wcols := make([]string, 0, len(where))
	for c := range where {
		wcols = append(wcols, c)
	}
	sort.Strings(wcols)
	for j, c := range wcols {
		conds = append(conds, fmt.Sprintf("r.%s::text = $%d", pgx.Identifier{c}.Sanitize(), len(cols)+2+j))
	}
	b.WriteString(strings.Join(conds, " AND "))
	b.WriteString(")")
	return b.String()
}
