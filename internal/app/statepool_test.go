package app

import (
	"context"
	"testing"
)

// TestTargetsStatePoolFloor: a DSN asking for fewer than 4 state
// connections gets 4 (a publisher can hold two at once, and the full-set
// schedule two beside it); more stay as asked.
func TestTargetsStatePoolFloor(t *testing.T) {
	for _, c := range []struct {
		dsn  string
		want int32
	}{
		{"postgres://127.0.0.1:1/x?pool_max_conns=2", 4},
		{"postgres://127.0.0.1:1/x?pool_max_conns=9", 9},
	} {
		p, err := targetsStatePool(context.Background(), c.dsn, "test")
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Config().MaxConns; got != c.want {
			t.Errorf("%s: MaxConns %d, want %d", c.dsn, got, c.want)
		}
		p.Close()
	}
}
