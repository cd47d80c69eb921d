package integrity

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// TestWhereForms: where is an expression string or, as before, a mapping
// meaning the AND of text equalities; both round-trip through YAML.
func TestWhereForms(t *testing.T) {
	var r struct {
		A Where `yaml:"a"`
		B Where `yaml:"b"`
		C Where `yaml:"c,omitempty"`
	}
	src := "a: \"type = 'm.room.member' AND state_key IS NOT NULL\"\nb: {type: m.room.member, \"o'k\": \"it's\"}\n"
	if err := yaml.Unmarshal([]byte(src), &r); err != nil {
		t.Fatal(err)
	}
	if r.A.Expr != "type = 'm.room.member' AND state_key IS NOT NULL" || len(r.A.Equal) != 0 {
		t.Errorf("string form: %+v", r.A)
	}
	if got := r.B.String(); got != `"o'k" = 'it''s' AND "type" = 'm.room.member'` {
		t.Errorf("mapping form renders %q", got)
	}
	if !r.C.IsZero() {
		t.Errorf("absent where: %+v", r.C)
	}
	out, err := yaml.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var again struct {
		A Where `yaml:"a"`
		B Where `yaml:"b"`
	}
	if err := yaml.Unmarshal(out, &again); err != nil || again.A.String() != r.A.String() || again.B.String() != r.B.String() {
		t.Errorf("round trip %s: %+v (%v)", out, again, err)
	}
	if err := yaml.Unmarshal([]byte("a: [x]\n"), &r); err == nil || !strings.Contains(err.Error(), "expression string or a mapping") {
		t.Errorf("a list: %v", err)
	}

	img := func(s string) map[string]json.RawMessage {
		var m map[string]json.RawMessage
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	eq, _ := WhereEqual(map[string]string{"type": "m.room.member", "n": "3"}).parse()
	ex, _ := WhereExpr("type = 'm.room.member' AND (state_key IS NULL OR state_key LIKE '%:example.org')").parse()
	cases := []struct {
		name    string
		w       bool // eq (true) or ex
		img     string
		lenient bool
		want    bool
	}{
		{"equal", true, `{"type":"m.room.member","n":3}`, false, true},
		{"equal as text", true, `{"type":"m.room.member","n":"3"}`, false, true},
		{"not equal", true, `{"type":"m.room.name","n":3}`, false, false},
		{"NULL", true, `{"type":null,"n":3}`, false, false},
		{"absent", true, `{"n":3}`, false, false},
		{"absent, lenient", true, `{"n":3}`, true, true},
		{"NULL, lenient", true, `{"type":null}`, true, false},
		{"expr local", false, `{"type":"m.room.member","state_key":"@a:example.org"}`, false, true},
		{"expr remote", false, `{"type":"m.room.member","state_key":"@a:other.org"}`, false, false},
		{"expr NULL state_key", false, `{"type":"m.room.member","state_key":null}`, false, true},
		{"expr absent, lenient", false, `{"type":"m.room.member"}`, true, true},
		{"expr absent", false, `{"type":"m.room.member"}`, false, false},
	}
	for _, c := range cases {
		e := ex
		if c.w {
			e = eq
		}
		if got := holds(e, img(c.img), c.lenient); got != c.want {
			t.Errorf("%s: holds = %v, want %v", c.name, got, c.want)
		}
	}
	if !holds(nil, nil, false) {
		t.Error("no where holds for every row")
	}
}

// TestWhereChecked: Validate reports expressions that do not parse, Compile
// every column an expression reads that the table lacks, on both sides.
func TestWhereChecked(t *testing.T) {
	rules := []Rule{
		{Name: "bad", Table: "public.events", Where: WhereExpr("type = "),
			Expect: &Expect{Table: "public.event_json", Match: map[string]string{"event_id": "event_id"}, Where: WhereExpr("json LIKE")}},
	}
	ApplyDefaults(rules)
	var got []string
	for _, p := range Validate("integrity.rules", rules) {
		got = append(got, p.Error())
	}
	want := []string{
		`integrity.rules[0].where: "type =": at offset 6: expected a literal ('text', number, true or false), found the end`,
		`integrity.rules[0].expect.where: "json LIKE": at offset 9: expected a 'quoted' pattern after LIKE, found the end`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("Validate:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	rules = []Rule{
		{Name: "cols", Table: "public.events", Where: WhereExpr("type = 'x' OR kind IS NULL"),
			Expect: &Expect{Table: "public.event_json", Match: map[string]string{"event_id": "event_id"}, Where: WhereExpr(`NOT "Json" LIKE '{%'`)}},
		{Name: "forbid", Table: "public.events", Where: WhereExpr("sender LIKE '%:x'"),
			Forbid: &Forbid{Table: "public.read_markers", Match: map[string]string{"event_id": "event_id"}, Where: WhereExpr("stream < 0")}, Within: "10s"},
	}
	ApplyDefaults(rules)
	if ps := Validate("integrity.rules", rules); len(ps) != 0 {
		t.Fatalf("Validate: %v", ps)
	}
	_, err := Compile("integrity.rules", rules, canonicalSchema())
	for _, w := range []string{
		`integrity.rules[0] (cols).where: public.events has no column "kind"`,
		`integrity.rules[0] (cols).expect.where: public.event_json has no column "Json"`,
		`integrity.rules[1] (forbid).forbid.where: public.read_markers has no column "stream"`,
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("Compile error lacks %q: %v", w, err)
		}
	}
}

// TestProbeExpression: the database check renders where expressions as
// parameterized SQL on both sides, with the columns' own types.
func TestProbeExpression(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
CREATE TABLE users (name text PRIMARY KEY, deactivated smallint);
CREATE TABLE memberships (room_id text, user_id text, membership text, PRIMARY KEY (room_id, user_id));
INSERT INTO users VALUES ('@a', 1), ('@b', 1), ('@c', 0), ('@d', NULL), ('@e''x', 1);
INSERT INTO memberships VALUES ('!r', '@a', 'join'), ('!r', '@b', 'leave'), ('!r', '@c', 'join'), ('!r', '@d', 'join'), ('!s', '@e''x', 'join');`); err != nil {
		t.Fatal(err)
	}
	schema, err := LoadSchema(ctx, pool, []string{"public.users", "public.memberships"})
	if err != nil {
		t.Fatal(err)
	}
	rules := []Rule{{Name: "deactivated_not_joined", Table: "public.users", Where: WhereExpr("deactivated = 1"),
		Forbid: &Forbid{Table: "public.memberships", Match: map[string]string{"name": "user_id"}, Where: WhereExpr("membership IN ('join', 'invite') AND room_id NOT LIKE '!s%'")}}}
	ApplyDefaults(rules)
	eng, err := Compile("integrity.rules", rules, schema)
	if err != nil {
		t.Fatal(err)
	}
	r := eng.rules[0]
	p := NewProber(pool, 1000, 2)
	keys := [][]string{{"@a"}, {"@b"}, {"@c"}, {"@d"}, {"@e'x"}, {"@none"}}
	got, err := p.Forbidden(ctx, r.table, r.cols, r.where, r.related, r.relCols, r.relWhere, keys)
	if err != nil {
		t.Fatal(err)
	}
	want := []bool{true, false, false, false, false, false}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("%s: forbidden %v, want %v", keys[i][0], got[i], want[i])
		}
	}
	ex, err := p.Existing(ctx, r.related, r.relCols, r.relWhere, keys)
	if err != nil {
		t.Fatal(err)
	}
	want = []bool{true, false, true, true, false, false}
	for i := range want {
		if ex[i] != want[i] {
			t.Errorf("%s: related exists %v, want %v", keys[i][0], ex[i], want[i])
		}
	}
	sql, args := pairSQL(r.table, r.cols, r.where, r.related, r.relCols, r.relWhere, false)
	if strings.Contains(sql, "'") || len(args) != 5 {
		t.Errorf("SQL inlines a literal or has %d parameters: %s", len(args), sql)
	}
}

// TestForbidConfirmedInDatabase: a forbid rule schedules a database check
// when either side enters the forbidden state (the user is deactivated, or
// a join is written for a deactivated user), waits for its window in stream
// time, and flags only what the database then confirms: a membership left
// within the window is not flagged although the stream saw it joined, and
// an update that keeps a user deactivated schedules nothing.
func TestForbidConfirmedInDatabase(t *testing.T) {
	pool := testPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `
CREATE TABLE users (name text PRIMARY KEY, deactivated smallint, note text);
CREATE TABLE memberships (room_id text, user_id text, membership text, PRIMARY KEY (room_id, user_id));
INSERT INTO users VALUES ('@bad', 1), ('@fixed', 1), ('@active', 0), ('@late', 1), ('@still', 1);
INSERT INTO memberships VALUES ('!r', '@bad', 'join'), ('!r', '@fixed', 'leave'), ('!r', '@active', 'join'), ('!r', '@late', 'join'), ('!r', '@still', 'join');`); err != nil {
		t.Fatal(err)
	}
	schema, err := LoadSchema(ctx, pool, []string{"public.users", "public.memberships"})
	if err != nil {
		t.Fatal(err)
	}
	rules := []Rule{{Name: "deactivated_not_joined", Table: "public.users", Where: WhereEqual(map[string]string{"deactivated": "1"}),
		Forbid: &Forbid{Table: "public.memberships", Match: map[string]string{"name": "user_id"}, Where: WhereExpr("membership = 'join'")}, Within: "30s"}}
	ApplyDefaults(rules)
	if ps := Validate("integrity.rules", rules); len(ps) > 0 {
		t.Fatal(ps)
	}
	eng, err := Compile("integrity.rules", rules, schema)
	if err != nil {
		t.Fatal(err)
	}
	now := time.UnixMilli(1_000_000)
	c := NewChecker(eng, NewStore(pool, "tidemark", "forbid"), NewProber(pool, 100, 10),
		Options{Group: "forbid", Now: func() time.Time { return now }}, nil, nil)
	if err := c.Load(ctx); err != nil {
		t.Fatal(err)
	}
	user := func(name string, deact int) map[string]any {
		return map[string]any{"name": name, "deactivated": deact, "note": nil}
	}
	mem := func(u, m string) map[string]any {
		return map[string]any{"room_id": "!r", "user_id": u, "membership": m}
	}
	ukey := func(n string) string { return `{"name":"` + n + `"}` }
	feed(t, c,
		change("users", "u", 10, 0, ukey("@bad"), user("@bad", 0), user("@bad", 1)),
		change("users", "u", 11, 0, ukey("@fixed"), user("@fixed", 0), user("@fixed", 1)),
		change("memberships", "u", 15, 0, mkey("@fixed", "!r"), mem("@fixed", "join"), mem("@fixed", "leave")),
		change("users", "u", 16, 0, ukey("@active"), user("@active", 1), user("@active", 0)),
		change("memberships", "c", 20, 0, mkey("@late", "!r"), nil, mem("@late", "join")),
		change("users", "u", 21, 0, ukey("@still"), user("@still", 1), user("@still", 1)),
	)
	if p := c.Progress(); p.Pending != 3 {
		t.Fatalf("pending %d, want 3 (@bad, @fixed, @late)", p.Pending)
	}
	if n, err := c.Tick(ctx); err != nil || n != 0 {
		t.Fatalf("tick inside the window decided %d (%v)", n, err)
	}
	feed(t, c, change("users", "u", 100, 0, ukey("@active"), user("@active", 0), user("@active", 0))) // stream time moves past the windows
	if n, err := c.Tick(ctx); err != nil || n != 3 {
		t.Fatalf("tick after the window decided %d (%v), want 3", n, err)
	}
	vs, err := List(ctx, pool, "tidemark", Filter{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, v := range vs {
		got = append(got, v.Kind+" "+v.Table+" "+v.Match["user_id"])
	}
	slices.Sort(got)
	if want := []string{"forbidden public.memberships @late", "forbidden public.users @bad"}; !slices.Equal(got, want) {
		t.Errorf("violations %v, want %v", got, want)
	}
}
