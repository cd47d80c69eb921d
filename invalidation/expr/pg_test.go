package expr

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/internal/pgserver"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgserver.StopShared()
	os.Exit(code)
}

// TestSQLAgreesWithEval runs every expression both ways, on Postgres over a
// table of rows (text, integer, numeric and boolean columns, NULLs) and with
// Eval on the same rows' text forms, and requires the same matching rows.
func TestSQLAgreesWithEval(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgserver.ForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// s has a linguistic collation where the server has one (ICU), so that
	// a comparison without COLLATE "C" would disagree with Eval's byte order.
	coll := ""
	var icu bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu')`).Scan(&icu); err != nil {
		t.Fatal(err)
	}
	if icu {
		coll = ` COLLATE "und-x-icu"`
	} else {
		t.Log("no ICU collation: s uses the database's default collation")
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE r (id int PRIMARY KEY, s text`+coll+`, i int, d numeric, b boolean)`); err != nil {
		t.Fatal(err)
	}
	texts := []any{"a", "b", "B", "ba", "é", "", "10", "9", "9a", "-0.5", "+.5", "1.", "a_c", "abc", "a%", `a\b`, "@u:example.org", "t", "true", "f", nil}
	ints := []any{-2, 0, 3, 9, 10, 100, nil}
	nums := []any{"3.00", "-0.5", "0.25", "99.999", "-10.0", "1e3", nil}
	bools := []any{true, false, nil}
	for id := 0; id < len(texts)*3; id++ {
		_, err := conn.Exec(ctx, `INSERT INTO r VALUES ($1, $2, $3, $4::numeric, $5)`,
			id, texts[id%len(texts)], ints[id%len(ints)], nums[id%len(nums)], bools[id%len(bools)])
		if err != nil {
			t.Fatal(err)
		}
	}
	rows, err := conn.Query(ctx, `SELECT id, s, i::text, d::text, b::text FROM r ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	images := map[int]map[string]*string{}
	for rows.Next() {
		var id int
		var s, i, d, b *string
		if err := rows.Scan(&id, &s, &i, &d, &b); err != nil {
			t.Fatal(err)
		}
		images[id] = map[string]*string{"s": s, "i": i, "d": d, "b": b}
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	for _, src := range []string{
		"s = 'a'", "s != 'a'", "s < 'b'", "s >= 'b'", "s > 'B'", "s <= ''", "s < 10", "s > -1", "s = 1", "s >= 0.5", "s = true", "s != false",
		"i = 3", "i < 10", "i >= 9.5", "i != 0", "i IN (3, 'x', 10)", "i NOT IN (0, 100)", "i > 'a'",
		"d = 3", "d < 0", "d > -1", "d <= 1000", "d = '3.00'", "d IN (0.25, 3)",
		"b = true", "b = false", "b != true", "b IS NULL", "b IS NOT NULL",
		"s LIKE 'a%'", `s LIKE 'a\_c'`, "s LIKE 'a_c'", `s LIKE 'a\\b'`, `s LIKE 'a\%'`, "s NOT LIKE '%:example.org'", "s LIKE '_'",
		"s IN ('a', 'b')", "s NOT IN ('a', 'b')",
		"s = 'a' OR i = 3", "NOT (s = 'a' OR i = 3)", "s = 'a' AND NOT i = 3", "NOT b = true OR d IS NULL", "(s IS NULL OR i IS NULL) AND NOT d > 0",
	} {
		e := MustParse(src)
		var args []any
		where := e.SQL(func(c string) string { return pgx.Identifier{c}.Sanitize() },
			func(v any) string { args = append(args, v); return fmt.Sprintf("$%d", len(args)) })
		rows, err := conn.Query(ctx, "SELECT id FROM r WHERE "+where+" ORDER BY id", args...)
		if err != nil {
			t.Fatalf("%s: %s: %v", src, where, err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[int])
		if err != nil {
			t.Fatalf("%s: %s: %v", src, where, err)
		}
		var want []int
		for id := 0; id < len(images); id++ {
			img := images[id]
			if e.Eval(func(c string) (string, bool, bool) {
				v, ok := img[c]
				if !ok {
					return "", false, false
				}
				if v == nil {
					return "", true, true
				}
				return *v, false, true
			}).Definitely() {
				want = append(want, id)
			}
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: Postgres (%s) matches %v, Eval matches %v", src, where, got, want)
		}
	}
}
