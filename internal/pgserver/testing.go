package pgserver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvTestDSN names the environment variable that points tests at an existing
// server instead of a throwaway one. It must be a superuser DSN to a server
// running with wal_level=logical.
const EnvTestDSN = "TIDEMARK_TEST_PG_DSN"

var shared struct {
	mu     sync.Mutex
	server *Server
	err    error // sticky start error, so a broken setup fails fast
}

// ForTest returns a DSN to a fresh, empty database (named tm_<random>) on a
// server with wal_level=logical, for test t.
//
// If TIDEMARK_TEST_PG_DSN is set, the database is created on that server and
// dropped again in t.Cleanup (after dropping its inactive replication slots
// and terminating its connections). Otherwise one throwaway server is
// started lazily per test binary and shared by all calls; the database is
// not dropped (the whole server goes away). Packages using ForTest must stop
// the shared server from TestMain:
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		pgserver.StopShared()
//		os.Exit(code)
//	}
//
// If no server can be had (PostgreSQL not installed, start failed, the
// configured server is unreachable or not wal_level=logical), the test is
// skipped with the reason, or failed when the environment has CI=true.
func ForTest(t testing.TB) string {
	t.Helper()
	_, dsn := ServerForTest(t)
	return dsn
}

// ServerForTest is like ForTest but also returns the shared throwaway
// *Server (nil when TIDEMARK_TEST_PG_DSN is used).
func ServerForTest(t testing.TB) (*Server, string) {
	t.Helper()
	name := randomDBName(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	if admin := os.Getenv(EnvTestDSN); admin != "" {
		return nil, forTestExternal(ctx, t, admin, name)
	}

	srv, err := sharedServer(ctx)
	if err != nil {
		unavailable(t, "no throwaway PostgreSQL server: %v", err)
	}
	dsn, err := srv.CreateDatabase(ctx, name)
	if err != nil {
		t.Fatalf("pgserver: %v", err)
	}
	// Drop it (and its replication slots) afterwards, so a long test run does
	// not exhaust max_replication_slots or pin WAL.
	t.Cleanup(func() {
		if err := dropDatabase(srv.DSN("postgres"), name); err != nil {
			t.Errorf("pgserver: %v", err)
		}
	})
	return srv, dsn
}

// StopShared stops the throwaway server shared by ForTest, if one was
// started, and deletes its files. Call it from TestMain after m.Run.
// A later ForTest call starts a new server.
func StopShared() {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.server != nil {
		if err := shared.server.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "pgserver: stopping shared server: %v\n", err)
		}
	}
	shared.server, shared.err = nil, nil
}

func sharedServer(ctx context.Context) (*Server, error) {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.server == nil && shared.err == nil {
		shared.server, shared.err = Start(ctx, Options{})
	}
	return shared.server, shared.err
}

// forTestExternal creates database name on the server at adminDSN and
// registers its removal.
func forTestExternal(ctx context.Context, t testing.TB, adminDSN, name string) string {
	t.Helper()
	conn, err := pgx.Connect(ctx, adminDSN)
	if err != nil {
		unavailable(t, "cannot connect to %s: %v", EnvTestDSN, err)
	}
	defer conn.Close(context.Background())
	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		unavailable(t, "%s: SHOW wal_level: %v", EnvTestDSN, err)
	}
	if walLevel != "logical" {
		unavailable(t, "%s points to a server with wal_level=%s; tests need wal_level=logical", EnvTestDSN, walLevel)
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgserver: create database %s on %s: %v", name, EnvTestDSN, err)
	}
	t.Cleanup(func() {
		if err := dropDatabase(adminDSN, name); err != nil {
			t.Errorf("pgserver: %v", err)
		}
	})
	dsn, err := withDatabase(adminDSN, name)
	if err != nil {
		t.Fatalf("pgserver: %v", err)
	}
	return dsn
}

// dropDatabase drops the database name, first removing what would block it:
// connections (including walsenders) and replication slots.
func dropDatabase(adminDSN, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, adminDSN)
	if err != nil {
		return fmt.Errorf("drop database %s: connect: %w", name, err)
	}
	defer conn.Close(context.Background())

	var lastErr error
	for attempt := 0; attempt < 20; attempt++ {
		if attempt > 0 {
			time.Sleep(250 * time.Millisecond)
		}
		if _, err := conn.Exec(ctx,
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			 WHERE datname = $1 AND pid <> pg_backend_pid()`, name); err != nil {
			lastErr = err
			continue
		}
		if _, err := conn.Exec(ctx,
			`SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
			 WHERE database = $1 AND NOT active`, name); err != nil {
			lastErr = err
			continue
		}
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			lastErr = err
			continue
		}
		return nil
	}
	return fmt.Errorf("drop database %s: %w", name, lastErr)
}

// withDatabase returns dsn (URL or keyword/value form) with its database
// replaced by name.
func withDatabase(dsn, name string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("parse %s: %w", EnvTestDSN, err)
		}
		u.Path, u.RawPath = "/"+name, ""
		q := u.Query()
		if q.Has("dbname") {
			q.Set("dbname", name)
			u.RawQuery = q.Encode()
		}
		return u.String(), nil
	}
	// Keyword/value form: a later setting overrides an earlier one.
	return strings.TrimSpace(dsn) + " dbname='" + name + "'", nil
}

func randomDBName(t testing.TB) string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("pgserver: random name: %v", err)
	}
	return "tm_" + hex.EncodeToString(b)
}

// unavailable skips the test, or fails it when CI=true.
func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("pgserver: "+format, args...)
	}
	t.Skipf("pgserver: "+format+" (set CI=true to make this a failure)", args...)
}
