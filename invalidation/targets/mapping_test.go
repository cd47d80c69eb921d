package targets

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

func img(kv ...string) map[string]json.RawMessage {
	m := map[string]json.RawMessage{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = json.RawMessage(kv[i+1])
	}
	return m
}

func TestParseFilter(t *testing.T) {
	good := []struct{ in, out string }{
		{"", ""},
		{"type = 'm.room.member'", "type = 'm.room.member'"},
		{"  type='m.room.member'  AND state_key != '' ", "type = 'm.room.member' AND state_key != ''"},
		{"kind IN ('a', 'b,c', 'd''e')", "kind IN ('a', 'b,c', 'd''e')"},
		{"kind not in ('x', 'y') and active = true and n <> 3", "kind NOT IN ('x', 'y') AND active = true AND n != 3"},
		{"note = 'rock and roll'", "note = 'rock and roll'"},
		// Beyond the language before expr:
		{"type LIKE 'm.%'", "type LIKE 'm.%'"},
		{"type = 'a' OR type = 'b'", "type = 'a' OR type = 'b'"},
		{`"kind" IS NOT NULL AND NOT (n < 3)`, "kind IS NOT NULL AND NOT n < 3"},
	}
	for _, g := range good {
		f, err := ParseFilter(g.in)
		if err != nil {
			t.Errorf("ParseFilter(%q): %v", g.in, err)
			continue
		}
		if got := f.String(); got != g.out {
			t.Errorf("ParseFilter(%q) = %q, want %q", g.in, got, g.out)
		}
	}
	for _, bad := range []string{"type", "type = m.room.member", "type LIKE m", "type IN 'a'", "type IN ()", "1 = 1", "type = 'a' OR", "x = 'a'; DROP TABLE users"} {
		if f, err := ParseFilter(bad); err == nil {
			t.Errorf("ParseFilter(%q) = %v, want an error", bad, f)
		}
	}
}

func TestFilterMatch(t *testing.T) {
	f, err := ParseFilter("type = 'm.room.member' AND kind NOT IN ('x', 'y')")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		img    map[string]json.RawMessage
		absent bool
		want   bool
	}{
		{img("type", `"m.room.member"`, "kind", `"z"`), false, true},
		{img("type", `"m.room.name"`, "kind", `"z"`), false, false},
		{img("type", `"m.room.member"`, "kind", `"x"`), false, false},
		{img("type", `"m.room.member"`, "kind", `null`), false, false}, // NULL matches no condition
		{img("type", `"m.room.member"`), false, false},                 // absent column
		{img("type", `"m.room.member"`), true, true},                   // absent in a key-only old image
		{img("type", `null`), true, false},
	}
	for i, c := range cases {
		if got := f.Match(c.img, c.absent); got != c.want {
			t.Errorf("case %d: Match = %v, want %v", i, got, c.want)
		}
	}
	or, _ := ParseFilter("type = 'm.room.member' OR kind IS NULL")
	if !or.Match(img("kind", `null`), false) || or.Match(img("kind", `"x"`), false) || !or.Match(img("kind", `"x"`), true) || or.Match(img("type", `"m"`, "kind", `"x"`), true) {
		t.Error("OR filter wrong")
	}
	var none Filter
	if !none.Match(nil, false) {
		t.Error("an empty filter must match every row")
	}
}

func TestFilterSQL(t *testing.T) {
	f, _ := ParseFilter(`type = 'm.room.member' AND "kind" NOT IN ('x', 'y')`)
	sql, args := f.SQL("m", []any{"first"})
	if sql != `(m."type"::text = $2::text AND m."kind"::text <> ALL($3::text[]))` {
		t.Errorf("SQL = %s", sql)
	}
	if len(args) != 3 || args[1] != "m.room.member" || !slices.Equal(args[2].([]string), []string{"x", "y"}) {
		t.Errorf("args = %v", args)
	}
}

func TestMappingValidateAndCheck(t *testing.T) {
	var m Mapping
	m.ApplyDefaults()
	if ps := m.Validate("targets"); len(ps) != 0 {
		t.Fatalf("defaults invalid: %v", ps)
	}
	if m.Membership.Table != "public.room_memberships" || m.Users.DeactivatedColumn != "deactivated" || !slices.Equal(m.Membership.Joined, []string{"join"}) {
		t.Errorf("defaults %+v", m)
	}
	bad := Mapping{
		Membership: MembershipSource{Table: "a.b.c", RoomColumn: "room id", UserColumn: "u", MembershipColumn: "m", Joined: []string{""}, Filter: "x LIKE y"},
		Users:      UserSource{Table: "users", UserColumn: "u", DeactivatedColumn: "d", ActiveColumn: "a"},
	}
	bad.ApplyDefaults()
	got := strings.Join(bad.Validate("targets"), "\n")
	for _, want := range []string{
		`targets.membership.table: "a.b.c" is not schema.table`,
		`targets.membership.room_column: "room id" is not a column name`,
		`targets.membership.joined[0]: empty value`,
		`targets.membership.filter: "x LIKE y": at offset 7: expected a 'quoted' pattern after LIKE`,
		`targets.users.active_column: set either deactivated_column or active_column, not both`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("problems lack %q:\n%s", want, got)
		}
	}
	m.Membership.Filter = "type = 'm.room.member'"
	tables := map[string]TableInfo{
		"public.room_memberships": {Columns: []string{"room_id", "user_id", "membership"}, Identity: []string{"room_id"}},
		"public.users":            {Columns: []string{"user_id", "is_active"}, Identity: []string{"user_id"}},
	}
	got = strings.Join(m.Check("targets", tables), "\n")
	for _, want := range []string{
		`targets.membership.user_column: "user_id" is not in public.room_memberships's replica identity`,
		`ALTER TABLE "public"."room_memberships" REPLICA IDENTITY FULL;`,
		`targets.membership.filter: public.room_memberships has no column "type"`,
		`targets.users.deactivated_column: public.users has no column "deactivated"`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("check lacks %q:\n%s", want, got)
		}
	}
	if ps := m.Check("targets", map[string]TableInfo{}); len(ps) != 2 {
		t.Errorf("uncaptured tables: %v", ps)
	}
}

func env(op string, before, after map[string]json.RawMessage) *pipeline.Envelope {
	e := &pipeline.Envelope{Op: op, Before: before, After: after}
	e.Source.Schema, e.Source.Table = "public", "current_state_events"
	return e
}

func TestMemberFacts(t *testing.T) {
	c, err := compile(Mapping{Membership: MembershipSource{Table: "public.current_state_events", UserColumn: "state_key", Filter: "type = 'm.room.member'"}})
	if err != nil {
		t.Fatal(err)
	}
	member := func(room, user, mem string) map[string]json.RawMessage {
		return img("room_id", `"`+room+`"`, "state_key", `"`+user+`"`, "type", `"m.room.member"`, "membership", `"`+mem+`"`)
	}
	other := img("room_id", `"!r"`, "state_key", `"@a"`, "type", `"m.room.name"`, "membership", `"join"`)
	pos := pipeline.Position{CommitLSN: 100, Seq: 2}
	cases := []struct {
		name string
		env  *pipeline.Envelope
		want []MemberFact
	}{
		{"insert join", env("c", nil, member("!r", "@a", "join")), []MemberFact{{Room: "!r", User: "@a", Membership: "join", Joined: true, Pos: pos}}},
		{"insert invite", env("c", nil, member("!r", "@a", "invite")), []MemberFact{{Room: "!r", User: "@a", Membership: "invite", Pos: pos}}},
		{"snapshot read", env("r", nil, member("!r", "@a", "join")), []MemberFact{{Room: "!r", User: "@a", Membership: "join", Joined: true, Pos: pos}}},
		{"delete", env("d", member("!r", "@a", "join"), nil), []MemberFact{{Room: "!r", User: "@a", Pos: pos}}},
		{"key-only delete", env("d", img("room_id", `"!r"`, "state_key", `"@a"`), nil), []MemberFact{{Room: "!r", User: "@a", Pos: pos}}},
		{"filtered insert", env("c", nil, other), nil},
		{"filtered delete", env("d", other, nil), nil},
		{"update moves the row", env("u", member("!r", "@a", "join"), member("!r2", "@a", "join")),
			[]MemberFact{{Room: "!r", User: "@a", Pos: pos}, {Room: "!r2", User: "@a", Membership: "join", Joined: true, Pos: pos}}},
		{"update out of the filter", env("u", member("!r", "@a", "join"), other), []MemberFact{{Room: "!r", User: "@a", Pos: pos}}},
		{"truncate", env("t", nil, nil), nil},
	}
	for _, tc := range cases {
		got := c.memberFacts(tc.env, pos, nil)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: facts %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

func TestUserFact(t *testing.T) {
	deact, _ := compile(Mapping{})
	active, _ := compile(Mapping{Users: UserSource{Table: "public.zerver_userprofile", UserColumn: "id", ActiveColumn: "is_active"}})
	cases := []struct {
		c    *compiled
		env  *pipeline.Envelope
		user string
		want bool
	}{
		{deact, env("c", nil, img("user_id", `"@a"`, "deactivated", "false")), "@a", true},
		{deact, env("u", nil, img("user_id", `"@a"`, "deactivated", "true")), "@a", false},
		{deact, env("u", nil, img("user_id", `"@a"`, "deactivated", "1")), "@a", false}, // Synapse's smallint
		{deact, env("u", nil, img("user_id", `"@a"`, "deactivated", "null")), "@a", true},
		{deact, env("d", img("user_id", `"@a"`), nil), "@a", true}, // no row: active
		{active, env("u", nil, img("id", "42", "is_active", "false")), "42", false},
		{active, env("u", nil, img("id", "42", "is_active", "true")), "42", true},
	}
	for i, tc := range cases {
		f, ok := tc.c.userFact(tc.env, pipeline.Position{CommitLSN: 1})
		if !ok || f.User != tc.user || f.Active != tc.want {
			t.Errorf("case %d: fact %+v (ok %v), want user %s active %v", i, f, ok, tc.user, tc.want)
		}
	}
}

func TestTxnIndex(t *testing.T) {
	x := &TxnIndex{Tables: []string{"public.room_memberships", "public.users"}, Max: 2}
	x.add([]byte(`{"status":"BEGIN","lsn":10,"data_collections":null}`))
	x.add([]byte(`{"status":"END","lsn":10,"data_collections":[{"data_collection":"public.events","event_count":3}]}`))
	x.add([]byte(`{"status":"END","lsn":11,"data_collections":[{"data_collection":"public.room_memberships","event_count":2},{"data_collection":"public.events","event_count":1}]}`))
	x.add([]byte(`not json`))
	if _, ok := x.Lookup(10); ok {
		t.Error("a transaction without mapped tables must not be kept")
	}
	c, ok := x.Lookup(11)
	if !ok || len(c) != 1 || c["public.room_memberships"] != 2 {
		t.Errorf("Lookup(11) = %v, %v", c, ok)
	}
	x.add([]byte(`{"status":"END","lsn":12,"data_collections":[{"data_collection":"public.users","event_count":1}]}`))
	x.add([]byte(`{"status":"END","lsn":13,"data_collections":[{"data_collection":"public.users","event_count":1}]}`))
	if _, ok := x.Lookup(11); ok {
		t.Error("the oldest transaction must be dropped beyond Max")
	}
	x.Forget(12)
	if _, ok := x.Lookup(12); ok {
		t.Error("Forget kept the transaction")
	}
	if _, ok := x.Lookup(13); !ok {
		t.Error("lost the newest transaction")
	}
	// The index started at the first END it read (LSN 10, a transaction
	// without mapped tables counts): older transactions are not covered.
	if !x.Started() || x.Covers(9) || !x.Covers(10) || !x.Covers(1000) {
		t.Errorf("Started %v, Covers(9) %v, Covers(10) %v", x.Started(), x.Covers(9), x.Covers(10))
	}
}
