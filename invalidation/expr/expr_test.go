package expr

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
)

// row builds a Row from "col=value" pairs; "col" alone (no =) is NULL;
// columns not listed are absent.
func row(kv ...string) Row {
	m := map[string]*string{}
	for _, p := range kv {
		c, v, ok := strings.Cut(p, "=")
		if !ok {
			m[c] = nil
			continue
		}
		m[c] = &v
	}
	return func(col string) (string, bool, bool) {
		v, ok := m[col]
		if !ok {
			return "", false, false
		}
		if v == nil {
			return "", true, true
		}
		return *v, false, true
	}
}

func TestParseString(t *testing.T) {
	cases := []struct{ in, out string }{
		{"type = 'm.room.member'", "type = 'm.room.member'"},
		{"  type='m.room.member'  and state_key <> '' ", "type = 'm.room.member' AND state_key != ''"},
		{"kind IN ('a', 'b,c', 'd''e')", "kind IN ('a', 'b,c', 'd''e')"},
		{"kind not in ('x', 3, -4.5, TRUE)", "kind NOT IN ('x', 3, -4.5, true)"},
		{`"Mixed Case" = 1 AND "not" IS NULL AND "a""b" IS NOT NULL`, `"Mixed Case" = 1 AND "not" IS NULL AND "a""b" IS NOT NULL`},
		{`"plain" = 1`, `plain = 1`},
		// Precedence: NOT > AND > OR.
		{"a = 1 OR b = 2 AND c = 3", "a = 1 OR b = 2 AND c = 3"},
		{"(a = 1 OR b = 2) AND c = 3", "(a = 1 OR b = 2) AND c = 3"},
		{"NOT a = 1 AND b = 2", "NOT a = 1 AND b = 2"},
		{"NOT (a = 1 AND b = 2)", "NOT (a = 1 AND b = 2)"},
		{"a = 1 AND (b = 2 AND c = 3)", "a = 1 AND (b = 2 AND c = 3)"},
		{"((a = 1))", "a = 1"},
		{"x LIKE '%:example.org' AND y NOT LIKE 'a\\_b%'", "x LIKE '%:example.org' AND y NOT LIKE 'a\\_b%'"},
		{"n >= 10 and n<=20 and m<5 and m>-1", "n >= 10 AND n <= 20 AND m < 5 AND m > -1"},
		{"note = 'rock and roll'", "note = 'rock and roll'"},
	}
	for _, c := range cases {
		e, err := Parse(c.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", c.in, err)
			continue
		}
		if got := e.String(); got != c.out {
			t.Errorf("Parse(%q).String() = %q, want %q", c.in, got, c.out)
		}
	}
	// Tree shapes for precedence.
	e := MustParse("a = 1 OR b = 2 AND NOT c = 3")
	if e.Kind != Or || len(e.Kids) != 2 || e.Kids[1].Kind != And || e.Kids[1].Kids[1].Kind != Not {
		t.Errorf("precedence tree wrong: %#v", e)
	}
	if got := MustParse(`a = 1 AND "b" IN ('x') OR c IS NULL AND a LIKE 'z'`).Columns(); strings.Join(got, ",") != "a,b,c" {
		t.Errorf("Columns = %v", got)
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct{ in, want string }{
		{"", "at offset 0: empty expression"},
		{"   ", "at offset 0: empty expression"},
		{"type", `at offset 4: expected =, !=, <>, <, >, <=, >=, IS, IN, NOT IN, LIKE or NOT LIKE after column "type", found the end`},
		{"type = member", `at offset 7: expected a literal ('text', number, true or false), found column "member" (quote text with ')`},
		{"type = m.room", `at offset 8: unexpected character '.'`},
		{"type = 'a", "at offset 7: unterminated text"},
		{`"x = 1`, "at offset 0: unterminated quoted identifier"},
		{"type IN 'a'", `at offset 8: expected '(' after IN, found "'a'"`},
		{"type IN ()", `at offset 9: expected a literal ('text', number, true or false), found ")"`},
		{"type IN ('a' 'b')", `at offset 13: expected ',' or ')' in the IN list, found "'b'"`},
		{"1 = 1", `at offset 0: expected a column, NOT or '(', found "1"`},
		{"x = 'a'; DROP TABLE users", `at offset 7: unexpected character ';'`},
		{"x = NULL", "at offset 4: NULL is not a value: use IS NULL or IS NOT NULL"},
		{"x IS 'a'", `at offset 5: expected NULL after IS [NOT], found "'a'"`},
		{"x NOT = 1", `at offset 6: expected IN or LIKE after NOT, found "="`},
		{"x LIKE 3", `at offset 7: expected a 'quoted' pattern after LIKE, found "3"`},
		{`x LIKE 'ab\'`, `at offset 7: LIKE pattern must not end with the escape character \`},
		{"x < true", "at offset 2: only = and != compare with a boolean"},
		{"(a = 1", "at offset 6: expected ')' (or AND, OR), found the end"},
		{"a = 1 b = 2", `at offset 6: expected AND, OR or the end, found "b"`},
		{"a = 1 AND", "at offset 9: expected a column, NOT or '(', found the end"},
		{"a = 1.", `at offset 4: malformed number "1."`},
		{"a = 12x", `at offset 4: malformed number "12x"`},
		{`"" = 1`, "at offset 0: empty quoted identifier"},
		{"and = 1", `at offset 0: expected a column, NOT or '(', found "and"`},
		{strings.Repeat("(", 200) + "a = 1" + strings.Repeat(")", 200), "nested more than 100 deep"},
	}
	for _, c := range cases {
		e, err := Parse(c.in)
		if err == nil {
			t.Errorf("Parse(%q) = %v, want error %q", c.in, e, c.want)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("Parse(%q) error %q, want %q", c.in, err, c.want)
		}
	}
}

func TestEval(t *testing.T) {
	T, F, U, X := True, False, Unknown, Undecided
	cases := []struct {
		expr string
		row  Row
		want Outcome
	}{
		{"a = 'x'", row("a=x"), T},
		{"a = 'x'", row("a=y"), F},
		{"a = 'x'", row("a"), U},
		{"a = 'x'", row(), X},
		{"a != 'x'", row("a=y"), T},
		{"a != 'x'", row("a"), U},
		// Numbers compare numerically when the column is a decimal.
		{"n = 3", row("n=3.00"), T},
		{"n = 3", row("n=03"), T},
		{"n < 10", row("n=9"), T},
		{"n < 10", row("n=10.5"), F},
		{"n > -1", row("n=-0.5"), T},
		{"n > -1", row("n=-2"), F},
		{"n = 0", row("n=-0"), T},
		{"n < 0.5", row("n=.25"), T},
		{"n >= 100", row("n=99.999"), F},
		{"n <= -10", row("n=-10.0"), T},
		{"n < 10", row("n=9a"), F}, // text comparison: "9a" > "10"
		{"n = 3", row("n=three"), F},
		// Texts compare in byte order.
		{"s < 'b'", row("s=a"), T},
		{"s < 'b'", row("s=B"), T},
		{"s < 'b'", row("s=ba"), F},
		{"s >= 'é'", row("s=z"), F},
		// Booleans.
		{"f = true", row("f=t"), T},
		{"f = true", row("f=true"), T},
		{"f = true", row("f=false"), F},
		{"f = false", row("f=f"), T},
		{"f != true", row("f=f"), T},
		{"f != true", row("f"), U},
		// IS [NOT] NULL.
		{"a IS NULL", row("a"), T},
		{"a IS NULL", row("a="), F},
		{"a IS NOT NULL", row("a="), T},
		{"a IS NOT NULL", row(), T | F},
		// IN.
		{"a IN ('x', 'y')", row("a=y"), T},
		{"a IN ('x', 'y')", row("a=z"), F},
		{"a IN ('x', 'y')", row("a"), U},
		{"a NOT IN ('x', 'y')", row("a=z"), T},
		{"a NOT IN ('x', 'y')", row("a=x"), F},
		{"a NOT IN ('x', 'y')", row("a"), U},
		{"a IN ('x', 2)", row("a=2.0"), T},
		// LIKE (Postgres: % run, _ one character, \ escapes).
		{"u LIKE '%:example.org'", row("u=@a:example.org"), T},
		{"u LIKE '%:example.org'", row("u=@a:example.org.evil"), F},
		{"u LIKE 'a_c'", row("u=abc"), T},
		{"u LIKE 'a_c'", row("u=aéc"), T}, // _ is one character, not one byte
		{"u LIKE 'a_c'", row("u=ac"), F},
		{`u LIKE 'a\_c'`, row("u=abc"), F},
		{`u LIKE 'a\_c'`, row("u=a_c"), T},
		{`u LIKE '100\%'`, row("u=100%"), T},
		{`u LIKE '100\%'`, row("u=1000"), F},
		{`u LIKE 'a\\b'`, row(`u=a\b`), T},
		{`u LIKE '\a'`, row("u=a"), T},
		{"u LIKE '%a%b%'", row("u=xxaxxbxx"), T},
		{"u LIKE '%a%b%'", row("u=xxbxxaxx"), F},
		{"u LIKE ''", row("u="), T},
		{"u LIKE '%'", row("u="), T},
		{"u LIKE 'A%'", row("u=abc"), F}, // case-sensitive
		{"u NOT LIKE 'a%'", row("u=b"), T},
		{"u NOT LIKE 'a%'", row("u"), U},
		// Three-valued logic.
		{"a = 'x' AND b = 'y'", row("a=x", "b"), U},
		{"a = 'x' AND b = 'y'", row("a=z", "b"), F},
		{"a = 'x' OR b = 'y'", row("a=x", "b"), T},
		{"a = 'x' OR b = 'y'", row("a=z", "b"), U},
		{"NOT a = 'x'", row("a"), U},
		{"NOT (a = 'x' OR b = 'y')", row("a=z", "b=z"), T},
		// Precedence: NOT > AND > OR.
		{"a = '1' OR a = '2' AND b = '3'", row("a=1", "b=0"), T},
		{"(a = '1' OR a = '2') AND b = '3'", row("a=1", "b=0"), F},
		{"NOT a = '1' AND b = '3'", row("a=2", "b=3"), T},
		{"NOT (a = '1' AND b = '3')", row("a=1", "b=3"), F},
		// Absent columns leave the outcome open as far as they matter.
		{"a = 'x' AND b = 'y'", row("a=z"), F},
		{"a = 'x' AND b = 'y'", row("a=x"), X},
		{"a = 'x' AND b = 'y'", row("a"), F | U},
		{"a = 'x' OR b = 'y'", row("a=x"), T},
		{"NOT b = 'y'", row(), X},
		{"b IS NULL OR b IS NOT NULL", row(), T | F}, // sound, not exact: the column is read twice
	}
	for _, c := range cases {
		e, err := Parse(c.expr)
		if err != nil {
			t.Errorf("Parse(%q): %v", c.expr, err)
			continue
		}
		if got := e.Eval(c.row); got != c.want {
			t.Errorf("%s: Eval = %v, want %v", c.expr, got, c.want)
		}
	}
	if !True.Definitely() || !True.Possibly() || Undecided.Definitely() || !Undecided.Possibly() || (False | Unknown).Possibly() || Unknown.Possibly() {
		t.Error("Definitely/Possibly wrong")
	}
}

func TestSQL(t *testing.T) {
	cases := []struct {
		expr, sql string
		args      []any
	}{
		{"type = 'm.room.member'", `m."type"::text = $1::text`, []any{"m.room.member"}},
		{`"Kind" NOT IN ('x', 'y')`, `m."Kind"::text <> ALL($1::text[])`, []any{[]string{"x", "y"}}},
		{"k IN ('x', 1)", `(m."k"::text = $1::text OR CASE WHEN m."k"::text ~ $2::text THEN m."k"::text::numeric = $3::numeric ELSE m."k"::text = $4::text END)`,
			[]any{"x", DecimalPattern, "1", "1"}},
		{"s < 'b'", `m."s"::text < $1::text COLLATE "C"`, []any{"b"}},
		{"f != true", `m."f"::text <> ALL($1::text[])`, []any{[]string{"t", "true"}}},
		{"a IS NULL OR NOT a LIKE '%x' AND b IS NOT NULL", `(m."a" IS NULL OR (NOT (m."a"::text LIKE $1::text) AND m."b" IS NOT NULL))`, []any{"%x"}},
		{"NOT (a = 'x' OR a NOT LIKE 'y')", `NOT (m."a"::text = $1::text OR m."a"::text NOT LIKE $2::text)`, []any{"x", "y"}},
	}
	for _, c := range cases {
		var args []any
		got := MustParse(c.expr).SQL(func(col string) string { return `m."` + col + `"` },
			func(v any) string { args = append(args, v); return fmt.Sprintf("$%d", len(args)) })
		if got != c.sql {
			t.Errorf("%s: SQL\n got %s\nwant %s", c.expr, got, c.sql)
		}
		if fmt.Sprint(args) != fmt.Sprint(c.args) {
			t.Errorf("%s: args %v, want %v", c.expr, args, c.args)
		}
	}
}

var (
	quotedIdentRe = regexp.MustCompile(`"(?:[^"]|"")*"`)
	placeholderRe = regexp.MustCompile(`\$[0-9]+`)
)

// FuzzParse: whatever parses renders (String) to text that parses to the
// same tree; Eval never panics on any row; SQL carries no literal (no
// quote outside quoted identifiers, no digits outside placeholders and
// identifiers) and one placeholder per recorded value.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"type = 'm.room.member'", "a IN ('x', 'y''z') AND b != 3", "kind not in ('a,b') and flag = true",
		"x = ''", "a = 'and' AND b = ' AND '", "a = 1 OR b < -2.5 AND NOT (c IS NULL OR d LIKE '%\\_x')",
		`"we""ird" >= 'z' OR "1" NOT LIKE '_'`, "NOT NOT a IS NOT NULL", "(a = 1 OR b = 2) AND (c = 3 OR d = 4)",
	} {
		f.Add(s, "x", "3")
	}
	f.Fuzz(func(t *testing.T, s, v1, v2 string) {
		e, err := Parse(s)
		if err != nil {
			return
		}
		r := e.String()
		again, err := Parse(r)
		if err != nil {
			t.Fatalf("Parse(%q) renders %q, which does not parse: %v", s, r, err)
		}
		if again.String() != r || !equal(e, again) {
			t.Fatalf("Parse(%q) renders %q, which parses to %q", s, r, again.String())
		}
		for i := 0; i < 4; i++ {
			e.Eval(func(col string) (string, bool, bool) {
				switch (len(col) + i) % 4 {
				case 0:
					return v1, false, true
				case 1:
					return v2, false, true
				case 2:
					return "", true, true
				}
				return "", false, false
			})
		}
		n := 0
		sql := e.SQL(func(col string) string { return `m."` + strings.ReplaceAll(col, `"`, `""`) + `"` },
			func(v any) string { n++; return fmt.Sprintf("$%d", n) })
		noIdents := quotedIdentRe.ReplaceAllString(sql, `""`) // a quoted column may hold anything, "$1" included
		if strings.ContainsAny(placeholderRe.ReplaceAllString(noIdents, "$$"), "'0123456789") {
			t.Fatalf("Parse(%q).SQL() = %s inlines a literal", s, sql)
		}
		if got := len(placeholderRe.FindAllString(noIdents, -1)); got != n {
			t.Fatalf("SQL %s has %d placeholders for %d arguments", sql, got, n)
		}
	})
}

func equal(a, b *Expr) bool {
	if a.Kind != b.Kind || a.Col != b.Col || a.Op != b.Op || a.Neg != b.Neg || len(a.Kids) != len(b.Kids) || len(a.Lits) != len(b.Lits) {
		return false
	}
	for i := range a.Lits {
		if a.Lits[i] != b.Lits[i] {
			return false
		}
	}
	for i := range a.Kids {
		if !equal(a.Kids[i], b.Kids[i]) {
			return false
		}
	}
	return true
}
