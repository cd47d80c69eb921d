package config_test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
)

func TestTargetsDefaults(t *testing.T) {
	clearEnv(t)
	c, err := config.Load(filepath.Join("testdata", "targets_good.yml"))
	if err != nil {
		t.Fatal(err)
	}
	tg := c.Targets
	m := tg.Mapping()
	if m.Membership.Table != "public.room_memberships" || m.Membership.RoomColumn != "room_id" || m.Membership.UserColumn != "user_id" ||
		m.Membership.MembershipColumn != "membership" || !slices.Equal(m.Membership.Joined, []string{"join"}) || m.Membership.Filter != "" {
		t.Errorf("membership defaults: %+v", m.Membership)
	}
	if m.Users.Table != "public.users" || m.Users.UserColumn != "user_id" || m.Users.DeactivatedColumn != "deactivated" || m.Users.ActiveColumn != "" {
		t.Errorf("users defaults: %+v", m.Users)
	}
	if tg.Group != "tidemark-targets" || tg.MaxAttempts != 5 || tg.Hold != 2*time.Second || !*tg.Topics ||
		tg.Postgres.DSN != c.Postgres.DSN || tg.Postgres.Schema != "tidemark" || tg.Redis.Key != "notify_targets:{room_id}" ||
		tg.AuditInterval != 0 || tg.AuditSample != 100 || tg.AuditWait != time.Minute {
		t.Errorf("defaults not applied: %+v", tg)
	}
}

func TestTargetsZulipMapping(t *testing.T) {
	c, err := config.Parse("targets_zulip.yml", readFile(t, "targets_zulip.yml"), env(map[string]string{
		config.EnvTargetsPostgresDSN: "postgres://other@state2:5432/tidemark"}))
	if err != nil {
		t.Fatal(err)
	}
	m := c.Targets.Mapping()
	if m.Membership.Table != "public.zerver_subscription" || m.Users.ActiveColumn != "is_active" || m.Users.DeactivatedColumn != "" {
		t.Errorf("mapping %+v", m)
	}
	if c.Targets.Group != "zulip-targets" || c.Targets.Postgres.Schema != "notify" || c.Targets.Postgres.DSN != "postgres://other@state2:5432/tidemark" {
		t.Errorf("targets %+v", c.Targets)
	}
}

// TestTargetsBadConfig: every problem of the file, by field path.
func TestTargetsBadConfig(t *testing.T) {
	_, err := config.Parse("targets_mapping.invalid.yml", readFile(t, "targets_mapping.invalid.yml"), noEnv)
	got := problemPaths(t, err)
	want := []string{
		"targets",
		"targets.audit_wait",
		"targets.hold",
		"targets.max_attempts",
		"targets.membership.joined[0]",
		"targets.membership.room_column",
		"targets.membership.table",
		"targets.membership.filter",
		"targets.membership.user_column",
		"targets.postgres.schema",
		"targets.redis.addr",
		"targets.redis.key",
		"targets.users.active_column",
	}
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("problem paths\n got %q\nwant %q\n%v", got, want, err)
	}
	for _, s := range []string{`"public.current_state_events" is not in postgres.tables`, `"tidemark" holds the captured table tidemark.outbox`,
		`type LIKE 'm.%'`, "set pipeline.table_topics: true"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error lacks %q:\n%v", s, err)
		}
	}
}
