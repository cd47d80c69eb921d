package redistest

import (
	"context"
	"os"
	"testing"
	"time"
)

// ForTest starts a throwaway redis-server for test t, configured by opts
// (see Start), and registers its Stop with t.Cleanup. Every call starts its
// own server (a start takes a few milliseconds), so tests may Halt, Restart
// or Freeze it freely.
//
// If redis-server is not installed or fails to start (also when it was
// built without TLS and opts ask for it), the test is skipped with the
// reason, or failed when the environment has CI=true.
func ForTest(t testing.TB, opts ...Option) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, opts...)
	if err != nil {
		unavailable(t, "no throwaway redis-server: %v", err)
		return nil // unreachable with a real testing.TB
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("redistest: %v", err)
		}
	})
	return s
}

// unavailable skips the test, or fails it when CI=true.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("redistest: "+format, args...)
		return
	}
	t.Skipf("redistest: "+format+" (set CI=true to make this a failure)", args...)
}
