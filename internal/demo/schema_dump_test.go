package demo

import (
	"os"
	"testing"
)

// TestComposeSchemaIsTheDemos: deploy/compose/schema.sql, which the compose
// stack's Postgres runs at its first start, is the demo's schema
// (TIDEMARK_UPDATE_SCHEMA=1 rewrites it).
func TestComposeSchemaIsTheDemos(t *testing.T) {
	const path = "../../deploy/compose/schema.sql"
	if os.Getenv("TIDEMARK_UPDATE_SCHEMA") == "1" {
		if err := os.WriteFile(path, []byte(Schema), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != Schema {
		t.Errorf("%s differs from internal/demo's Schema (TIDEMARK_UPDATE_SCHEMA=1 go test ./internal/demo rewrites it)", path)
	}
}
