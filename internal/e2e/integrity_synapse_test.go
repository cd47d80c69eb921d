package e2e

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

// synapseIntegritySchema is the part of Synapse's schema the README's examples use
// (simplified: the columns the rules read, and the keys).
const synapseIntegritySchema = `
CREATE TABLE rooms (room_id text PRIMARY KEY);
CREATE TABLE users (name text PRIMARY KEY, deactivated smallint NOT NULL DEFAULT 0);
CREATE TABLE events (event_id text PRIMARY KEY, room_id text NOT NULL, type text NOT NULL, state_key text, sender text NOT NULL);
CREATE TABLE event_json (event_id text PRIMARY KEY, room_id text NOT NULL, json text NOT NULL);
CREATE TABLE state_events (event_id text PRIMARY KEY, room_id text NOT NULL, type text NOT NULL, state_key text NOT NULL);
CREATE TABLE current_state_events (event_id text NOT NULL, room_id text NOT NULL, type text NOT NULL, state_key text NOT NULL,
  membership text, PRIMARY KEY (room_id, type, state_key));
CREATE TABLE local_current_membership (room_id text NOT NULL, user_id text NOT NULL, event_id text NOT NULL, membership text NOT NULL,
  PRIMARY KEY (user_id, room_id));
`

var synapseIntegrityTables = []string{"public.rooms", "public.users", "public.events", "public.event_json", "public.state_events",
	"public.current_state_events", "public.local_current_membership"}

// synapseIntegrityRules are the README's four Synapse examples, as YAML.
const synapseIntegrityRules = `
- name: events_have_json
  table: events
  expect: {table: event_json, match: {event_id: event_id}}
  within: same_transaction
- name: state_events_recorded
  table: events
  where: "state_key IS NOT NULL"
  expect: {table: state_events, match: {event_id: event_id}}
  within: same_transaction
- name: local_membership_mirrors_state
  table: current_state_events
  on: [insert, update]
  where: "type = 'm.room.member' AND membership = 'join' AND state_key LIKE '%:example.org'"
  expect:
    table: local_current_membership
    match: {room_id: room_id, state_key: user_id}
    where: "membership = 'join'"
  within: 2s
- name: deactivated_users_not_joined
  table: users
  where: "deactivated = 1"
  forbid:
    table: local_current_membership
    match: {name: user_id}
    where: "membership = 'join'"
  within: 2s
`

// TestIntegritySynapseExamples (issue 15, acceptance 8): the README's four
// Synapse rules, over a Synapse-like schema and a clean workload that
// exercises each rule's conditions (message events without state rows,
// remote joins, deactivations that leave their rooms, in the same
// transaction or within the window), flag exactly the injected faults.
func TestIntegritySynapseExamples(t *testing.T) {
	var rules []integrity.Rule
	if err := yaml.Unmarshal([]byte(synapseIntegrityRules), &rules); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, "")
	e.exec(synapseIntegritySchema)
	cfg := e.config("syn", synapseIntegrityTables, func(c *config.Config) { c.Integrity = &config.Integrity{Rules: rules} })
	ie := &integrityEnv{env: e, cfg: cfg, prefix: "syn"}
	e.start(cfg)
	ig, _ := ie.startIntegrity("syn-integrity")

	n := 0
	eventID := func() string { n++; return fmt.Sprintf("$e%d", n) }
	type stmt struct {
		sql  string
		args []any
	}
	tx := func(stmts ...stmt) {
		t.Helper()
		b := e.pool
		txn, err := b.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range stmts {
			if _, err := txn.Exec(t.Context(), s.sql, s.args...); err != nil {
				t.Fatalf("%s: %v", s.sql, err)
			}
		}
		if err := txn.Commit(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	event := func(id, room, typ string, stateKey any) stmt {
		return stmt{`INSERT INTO events(event_id, room_id, type, state_key, sender) VALUES ($1, $2, $3, $4, '@s:example.org')`, []any{id, room, typ, stateKey}}
	}
	eventJSON := func(id, room string) stmt {
		return stmt{`INSERT INTO event_json(event_id, room_id, json) VALUES ($1, $2, '{}')`, []any{id, room}}
	}
	stateEvent := func(id, room, typ, stateKey string) stmt {
		return stmt{`INSERT INTO state_events(event_id, room_id, type, state_key) VALUES ($1, $2, $3, $4)`, []any{id, room, typ, stateKey}}
	}
	current := func(id, room, user, membership string) stmt {
		return stmt{`INSERT INTO current_state_events(event_id, room_id, type, state_key, membership) VALUES ($1, $2, 'm.room.member', $3, $4)
ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = EXCLUDED.event_id, membership = EXCLUDED.membership`, []any{id, room, user, membership}}
	}
	local := func(id, room, user, membership string) stmt {
		return stmt{`INSERT INTO local_current_membership(event_id, room_id, user_id, membership) VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id, room_id) DO UPDATE SET event_id = EXCLUDED.event_id, membership = EXCLUDED.membership`, []any{id, room, user, membership}}
	}
	// member writes a membership event the way Synapse does: the event,
	// its JSON, its state row, current state and (local users) the local
	// membership, in one transaction; skip leaves some out.
	member := func(room, user, membership string, skip ...string) string {
		id := eventID()
		var ss []stmt
		for _, s := range []struct {
			name string
			s    stmt
		}{
			{"event", event(id, room, "m.room.member", user)}, {"json", eventJSON(id, room)}, {"state", stateEvent(id, room, "m.room.member", user)},
			{"current", current(id, room, user, membership)}, {"local", local(id, room, user, membership)},
		} {
			if slices.Contains(skip, s.name) || s.name == "local" && !strings.HasSuffix(user, ":example.org") {
				continue
			}
			ss = append(ss, s.s)
		}
		tx(ss...)
		return id
	}
	message := func(room string, skip ...string) string {
		id := eventID()
		ss := []stmt{event(id, room, "m.room.message", nil)}
		if !slices.Contains(skip, "json") {
			ss = append(ss, eventJSON(id, room))
		}
		tx(ss...)
		return id
	}
	deactivate := func(user string) stmt {
		return stmt{`UPDATE users SET deactivated = 1 WHERE name = $1`, []any{user}}
	}

	// The clean workload.
	const nRooms, nUsers = 6, 12
	for r := 0; r < nRooms; r++ {
		e.exec(`INSERT INTO rooms VALUES ($1)`, fmt.Sprintf("!r%d:example.org", r))
	}
	for u := 0; u < nUsers; u++ {
		e.exec(`INSERT INTO users(name) VALUES ($1)`, fmt.Sprintf("@u%d:example.org", u))
	}
	room := func(i int) string { return fmt.Sprintf("!r%d:example.org", i%nRooms) }
	user := func(i int) string { return fmt.Sprintf("@u%d:example.org", i%nUsers) }
	for i := 0; i < nUsers; i++ {
		member(room(i), user(i), "join")
		member(room(i+1), user(i), "join")
		member(room(i), fmt.Sprintf("@remote%d:other.org", i), "join") // no local membership: not a local user
	}
	for i := 0; i < 60; i++ {
		message(room(i))
	}
	// A local join whose local membership row follows within the window.
	late := member(room(2), "@slow:example.org", "join", "local")
	time.Sleep(300 * time.Millisecond)
	tx(local(late, room(2), "@slow:example.org", "join"))
	// Deactivations that leave the rooms: in the same transaction, and
	// within the window.
	tx(deactivate(user(0)), local("$x0", room(0), user(0), "leave"), local("$x1", room(1), user(0), "leave"),
		current("$x0", room(0), user(0), "leave"), current("$x1", room(1), user(0), "leave"))
	tx(deactivate(user(1)))
	time.Sleep(300 * time.Millisecond)
	tx(local("$x2", room(1), user(1), "leave"), local("$x3", room(2), user(1), "leave"),
		current("$x2", room(1), user(1), "leave"), current("$x3", room(2), user(1), "leave"))

	// The faults.
	want := map[string]bool{}
	for i := 0; i < 3; i++ {
		want["events_have_json|missing|event_id="+message(room(i), "json")] = true
	}
	for i := 0; i < 3; i++ {
		want["state_events_recorded|missing|event_id="+member(room(i), fmt.Sprintf("@nostate%d:other.org", i), "join", "state")] = true
	}
	for i := 0; i < 2; i++ {
		u := fmt.Sprintf("@nolocal%d:example.org", i)
		member(room(i), u, "join", "local")
		want["local_membership_mirrors_state|missing|room_id="+room(i)+",user_id="+u] = true
	}
	// A local membership that says leave while current state says join.
	u := "@stale:example.org"
	id := member(room(3), u, "join", "local")
	tx(local(id, room(3), u, "leave"))
	want["local_membership_mirrors_state|missing|room_id="+room(3)+",user_id="+u] = true
	// Deactivated users still joined: deactivated, and a join written for
	// a user deactivated before.
	for i := 2; i < 4; i++ {
		tx(deactivate(user(i)))
		want["deactivated_users_not_joined|forbidden|user_id="+user(i)] = true
	}
	tx(local("$x4", room(4), user(0), "join"))
	want["deactivated_users_not_joined|forbidden|user_id="+user(0)] = true

	ie.settle(ig, 2*time.Second, 3*time.Minute)
	got := map[string]bool{}
	for _, v := range ie.violations() {
		var kv []string
		for k, val := range v.Match {
			kv = append(kv, k+"="+val)
		}
		sort.Strings(kv)
		id := v.Rule + "|" + v.Kind + "|" + strings.Join(kv, ",")
		if got[id] {
			t.Errorf("flagged twice: %s", id)
		}
		got[id] = true
		t.Logf("flagged %s: %s", id, v.Detail)
	}
	for id := range want {
		if !got[id] {
			t.Errorf("missed: %s", id)
		}
	}
	for id := range got {
		if !want[id] {
			t.Errorf("false alarm: %s", id)
		}
	}
}
