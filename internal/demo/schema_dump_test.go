package demo

import (
	"os"
	"strings"
	"testing"
)

// TestComposeSchemaIsTheDemos: the compose stack's Postgres runs
// internal/bench/schema.sql and then deploy/compose/identity.sql at its
// first start; together they are the demo's schema.
func TestComposeSchemaIsTheDemos(t *testing.T) {
	base, err := os.ReadFile("../bench/schema.sql")
	if err != nil {
		t.Fatal(err)
	}
	extra, err := os.ReadFile("../../deploy/compose/identity.sql")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(base) + string(extra); normalize(got) != normalize(Schema) {
		t.Errorf("internal/bench/schema.sql + deploy/compose/identity.sql differ from internal/demo's Schema")
	}
}

// normalize keeps the SQL statements' lines (no comments, no blank lines).
func normalize(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(s, "\n") {
		if l != "" && !strings.HasPrefix(l, "--") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}
