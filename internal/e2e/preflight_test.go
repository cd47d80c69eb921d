package e2e

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/pipeline"
)

// Preflight (app.Check, which `tidemark check` prints, and app.Prepare,
// which `tidemark run` starts with) must list each problem with its table
// and fix, and change nothing in the database when it finds one: no
// publication, no replication slot.

// throwawayServer starts a Postgres server of the test's own, with settings
// over pgserver's defaults, and stops it in t.Cleanup. When one cannot be
// started the test is skipped with the reason, or failed under CI=true. It
// is started also when TIDEMARK_TEST_PG_DSN is set: that server cannot be
// reconfigured.
func throwawayServer(t *testing.T, settings map[string]string) *pgserver.Server {
	t.Helper()
	return throwawayServerWith(t, pgserver.Options{ExtraConfig: settings})
}

// envOn is an env on database postgres of srv, with an in-process Kafka
// of its own.
func envOn(t *testing.T, srv *pgserver.Server) *env {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), srv.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	kc, err := kafkatest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Close)
	return &env{t: t, dsn: srv.DSN("postgres"), pool: pool, kafka: kc}
}

// throwawayServerWith is throwawayServer with all of pgserver's options
// (TLS, pg_hba lines).
func throwawayServerWith(t *testing.T, opts pgserver.Options) *pgserver.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv, err := pgserver.Start(ctx, opts)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("starting a throwaway postgres: %v", err)
		}
		t.Skipf("no throwaway postgres: %v (set CI=true to make this a failure)", err)
	}
	t.Cleanup(func() {
		if err := srv.Stop(); err != nil {
			t.Errorf("stopping the throwaway postgres: %v", err)
		}
	})
	return srv
}

// checkUntouched asserts that preflight left no publication and no
// replication slot behind: neither the configured ones nor any other of
// this database.
func checkUntouched(t *testing.T, pool *pgxpool.Pool, cfg *config.Config) {
	t.Helper()
	ctx := context.Background()
	var slots, pubs int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 OR database = current_database()`,
		cfg.Postgres.Slot).Scan(&slots); err != nil {
		t.Fatal(err)
	}
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_publication`).Scan(&pubs); err != nil {
		t.Fatal(err)
	}
	if slots != 0 || pubs != 0 {
		t.Errorf("after a failed preflight: %d replication slots, %d publications; want none", slots, pubs)
	}
}

// checkRefused runs app.Check and app.Prepare on cfg: Check must report
// exactly want, and Prepare must fail with a PreflightError whose message
// holds each problem as printed (table, what, fix). Both are bounded: a
// preflight that lets a bad config through must fail the test, not leave
// Prepare waiting for a broker (the wal_level test's is unreachable).
func checkRefused(t *testing.T, cfg *config.Config, want []capture.Problem) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _, problems, err := app.Check(ctx, cfg)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if !slices.Equal(problems, want) {
		t.Errorf("Check problems:\n  %q\nwant\n  %q", problems, want)
	}
	_, err = app.Prepare(ctx, cfg, nil)
	var pe *capture.PreflightError
	if !errors.As(err, &pe) {
		t.Fatalf("Prepare = %v, want a PreflightError", err)
	}
	for _, p := range want {
		if !strings.Contains(err.Error(), "  - "+p.String()) {
			t.Errorf("Prepare error lacks %q:\n%s", p.String(), err)
		}
	}
}

// TestPreflightWalLevelNotLogical: on a server with wal_level=replica,
// preflight names the setting and its fix, and creates nothing.
func TestPreflightWalLevelNotLogical(t *testing.T) {
	srv := throwawayServer(t, map[string]string{"wal_level": "replica"})
	dsn := srv.DSN("postgres")
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	var level string
	if err := pool.QueryRow(context.Background(), "SHOW wal_level").Scan(&level); err != nil || level != "replica" {
		t.Fatalf("wal_level = %q (%v), want replica: the test would prove nothing", level, err)
	}
	if _, err := pool.Exec(context.Background(), `CREATE TABLE rooms (room_id text PRIMARY KEY, name text)`); err != nil {
		t.Fatal(err)
	}
	noHTTP := ""
	cfg := &config.Config{
		Postgres: config.Postgres{DSN: dsn, Slot: "wal_slot", Publication: "wal_pub", Tables: []string{"public.rooms"}},
		// Preflight fails before Kafka is used.
		Kafka: config.Kafka{Brokers: []string{"127.0.0.1:9"}, TopicPrefix: "wal"},
		HTTP:  config.HTTP{Listen: &noHTTP},
	}
	cfg.ApplyDefaults()
	if ps := cfg.Validate(); len(ps) > 0 {
		t.Fatalf("test config invalid: %v", ps)
	}
	checkRefused(t, cfg, []capture.Problem{{
		What: "wal_level is replica, logical replication needs logical",
		Fix:  "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
	}})
	checkUntouched(t, pool, cfg)
}

// TestPreflightMissingTable: every configured table that does not exist is
// named; the healthy one is not.
func TestPreflightMissingTable(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE present (id int PRIMARY KEY)`)
	cfg := e.config("missing", []string{"public.present", "public.absent_table", "nosuch.items"}, nil)
	checkRefused(t, cfg, []capture.Problem{
		{Table: "public.absent_table", What: "table does not exist"},
		{Table: "nosuch.items", What: "table does not exist"},
	})
	checkUntouched(t, e.pool, cfg)
}

// TestPreflightEntityStreamKeyNotInIdentity: an entity stream's key column
// must be in each table's replica identity, or deletes could not be routed
// (README, pipeline.entity_streams). Preflight names the table, the column
// and the fix; after running the fix, Prepare succeeds.
func TestPreflightEntityStreamKeyNotInIdentity(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE room_events (event_id text PRIMARY KEY, room_id text NOT NULL, body text);
CREATE TABLE room_members (room_id text, user_id text, PRIMARY KEY (room_id, user_id));
CREATE TABLE room_state (room_id text, state_key text, v text);
ALTER TABLE room_state REPLICA IDENTITY FULL`)
	tables := []string{"public.room_events", "public.room_members", "public.room_state"}
	cfg := e.config("rooms", tables, func(c *config.Config) {
		c.Pipeline.EntityStreams = []pipeline.EntityStream{{Name: "rooms", Key: "room_id", Tables: tables}}
	})
	checkRefused(t, cfg, []capture.Problem{{
		Table: "public.room_events",
		What:  `entity stream "rooms" keys on "room_id", which is not in the replica identity, so deletes could not be routed`,
		Fix:   `ALTER TABLE "public"."room_events" REPLICA IDENTITY FULL;`,
	}})
	checkUntouched(t, e.pool, cfg)

	e.exec(`ALTER TABLE "public"."room_events" REPLICA IDENTITY FULL;`)
	if _, err := app.Prepare(context.Background(), cfg, nil); err != nil {
		t.Fatalf("Prepare after the fix: %v", err)
	}
	if s := e.slotConfirmed(cfg.Postgres.Slot); s == 0 {
		t.Errorf("Prepare after the fix created no slot")
	}
}
