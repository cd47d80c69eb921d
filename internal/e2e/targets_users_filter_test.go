package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/app"
)

// TestTargetsUsersFilter: with users.filter "name LIKE '%:example.org'"
// on a Synapse-like layout, only local users are targets, including local
// users without a row in the users table, and remote members never are;
// the audit agrees (ratio 1.0) and a rebuild changes nothing.
func TestTargetsUsersFilter(t *testing.T) {
	e := newEnv(t, "")
	e.exec(synapseSchema)
	tc := synapseTargets()
	tc.Users.Filter = "name LIKE '%:example.org'"
	cfg := targetsConfig(e, "ufilt", []string{"public.synapse_users", "public.current_state_events"}, tc)
	e.start(cfg)
	e.startTargets(cfg)
	e.exec(`INSERT INTO synapse_users(name) VALUES ('@a:example.org'), ('@gone:example.org');
INSERT INTO current_state_events(event_id, room_id, type, state_key, membership) VALUES
  ('$1', '!r', 'm.room.member', '@a:example.org', 'join'),
  ('$2', '!r', 'm.room.member', '@b:example.org', 'join'),
  ('$3', '!r', 'm.room.member', '@remote:other.org', 'join'),
  ('$4', '!s', 'm.room.member', '@remote:other.org', 'join'),
  ('$5', '!s', 'm.room.member', '@gone:example.org', 'join')`)
	e.waitTargets(cfg, 30*time.Second)
	// A remote user's membership changes go on being ignored.
	e.exec(`DELETE FROM current_state_events WHERE event_id = '$4';
INSERT INTO current_state_events(event_id, room_id, type, state_key, membership) VALUES ('$6', '!s', 'm.room.member', '@remote:other.org', 'join');
UPDATE synapse_users SET deactivated = 1 WHERE name = '@gone:example.org'`)
	e.waitTargets(cfg, 30*time.Second)
	want := []string{"!r @a:example.org", "!r @b:example.org"}
	if kept := e.pairs(keptSQL(cfg)); !slices.Equal(kept, want) {
		t.Fatalf("kept targets %v, want the local, active members %v", kept, want)
	}
	latest := e.latestTargets(cfg.Kafka.TopicPrefix + ".notify_targets")
	if got := latest["!r"]; !slices.Equal(got, []string{"@a:example.org", "@b:example.org"}) {
		t.Errorf("notify_targets of !r = %v", got)
	}
	ctx := context.Background()
	rep, err := app.AuditTargets(ctx, cfg, 0, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Ratio != 1 || len(rep.Mismatches) != 0 {
		t.Fatalf("audit with users.filter: ratio %v, mismatches %v", rep.Ratio, rep.Mismatches)
	}
	rb, err := app.RebuildTargets(ctx, cfg, nil, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	if rb.Changed != 0 || rb.Added != 0 || rb.Removed != 0 {
		t.Fatalf("rebuild with users.filter changed %d rooms (+%d -%d): the consumer and the rebuild disagree", rb.Changed, rb.Added, rb.Removed)
	}
}

// TestTargetsUsersFilterChecked: a users.filter reading another column is
// refused, naming it.
func TestTargetsUsersFilterChecked(t *testing.T) {
	tc := synapseTargets()
	tc.Users.Filter = "deactivated = 0"
	m := tc.Mapping()
	m.ApplyDefaults()
	probs := m.Validate("targets")
	found := false
	for _, p := range probs {
		if p == `targets.users.filter: reads column "deactivated"; it may read only the user id, users.user_column ("name")` {
			found = true
		}
	}
	if !found {
		t.Fatalf("problems %v lack the users.filter refusal", probs)
	}
}
