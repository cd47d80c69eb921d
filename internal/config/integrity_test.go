package config_test

import (
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

func TestIntegrityDefaults(t *testing.T) {
	clearEnv(t)
	c, err := config.Load(filepath.Join("testdata", "integrity_good.yml"))
	if err != nil {
		t.Fatal(err)
	}
	in := c.Integrity
	want := integrity.DefaultRules()
	integrity.ApplyDefaults(want)
	if !reflect.DeepEqual(in.Rules, want) {
		t.Errorf("rules %+v, want the canonical defaults %+v", in.Rules, want)
	}
	if in.Group != "tidemark-integrity" || in.DSN != c.Postgres.DSN || in.Schema != "tidemark" || !*in.Topic ||
		in.MaxAttempts != 5 || in.CheckRate != 500 || in.MaxPending != 100000 || in.MaxKeys != 100000 {
		t.Errorf("defaults not applied: %+v", in)
	}
}

func TestIntegrityEnvOverridesDSN(t *testing.T) {
	c, err := config.Parse("x.yml", readFile(t, "integrity_good.yml"), env(map[string]string{
		config.EnvIntegrityDSN: "postgres://audit@other:5432/violations"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Integrity.DSN != "postgres://audit@other:5432/violations" {
		t.Errorf("integrity.dsn %q, want the environment's", c.Integrity.DSN)
	}
}

// TestIntegrityBadConfig: every problem of the file, by field path.
func TestIntegrityBadConfig(t *testing.T) {
	_, err := config.Parse("integrity_rules.invalid.yml", readFile(t, "integrity_rules.invalid.yml"), noEnv)
	got := problemPaths(t, err)
	want := []string{
		"integrity.check_rate",
		"integrity.rules",
		"integrity.rules[0].on[1]",
		"integrity.rules[0].severity",
		"integrity.rules[1].expect.match",
		"integrity.rules[1].expect.table",
		"integrity.rules[1].name",
		"integrity.rules[1].within",
		"integrity.rules[2].monotonic.key",
		"integrity.rules[2].within",
		"integrity.rules[3]",
		"integrity.rules[4].forbid.table",
		"integrity.rules[4].on[0]",
		"integrity.rules[4].where",
		"integrity.schema",
	}
	if !slices.Equal(got, want) {
		t.Errorf("problem paths\n got %q\nwant %q\n%s", got, want, err)
	}
	for _, s := range []string{
		`"upsert" is not one of insert, update, delete`,
		`"fatal" is not one of info, warning, error, critical`,
		`"events_have_json" is also the name of integrity.rules[0]`,
		`"soon" is neither same_transaction nor a positive duration`,
		`"public.missing_table" is not in postgres.tables`,
		`sets both expect and monotonic`,
		`"public.missing_forbid" is not in postgres.tables`,
		`a deleted row cannot hold a forbidden related row`,
		`integrity.rules[4].where: "deactivated =": at offset 13: expected a literal`,
		`set pipeline.transactions_topic: true`,
	} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error lacks %q:\n%s", s, err)
		}
	}
	if strings.Contains(err.Error(), "db.internal") {
		t.Errorf("error shows the DSN: %s", err)
	}
}
