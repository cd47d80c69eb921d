package pgserver

import (
	"context"
	"errors"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tidemark/tidemark/internal/certtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	StopShared()
	os.Exit(code)
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func TestForTest(t *testing.T) {
	ctx := context.Background()
	dsn := ForTest(t)
	conn := connect(t, dsn)

	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		t.Fatal(err)
	}
	if walLevel != "logical" {
		t.Fatalf("wal_level = %q, want logical", walLevel)
	}

	var slot string
	if err := conn.QueryRow(ctx, "SELECT slot_name::text FROM pg_create_logical_replication_slot('s', 'pgoutput')").Scan(&slot); err != nil {
		t.Fatalf("create logical slot: %v", err)
	}
	if slot != "s" {
		t.Fatalf("slot name = %q", slot)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot('s')"); err != nil {
		t.Fatalf("drop slot: %v", err)
	}

	// A second call gives a different, empty database.
	dsn2 := ForTest(t)
	if dsn2 == dsn {
		t.Fatalf("two ForTest calls returned the same DSN %s", dsn)
	}
	var db1, db2 string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db1); err != nil {
		t.Fatal(err)
	}
	if err := connect(t, dsn2).QueryRow(ctx, "SELECT current_database()").Scan(&db2); err != nil {
		t.Fatal(err)
	}
	if db1 == db2 {
		t.Fatalf("both ForTest databases are %q", db1)
	}
}

func TestStartStop(t *testing.T) {
	if _, err := findBinDir(); err != nil {
		unavailable(t, "%v", err)
	}
	ctx := context.Background()
	srv, err := Start(ctx, Options{
		Logf:        t.Logf,
		ExtraConfig: map[string]string{"application_name": "pgserver_test"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	if srv.Port() == 0 || srv.Port() == 5432 {
		t.Fatalf("unexpected port %d", srv.Port())
	}

	// Identifiers are quoted, so odd names work.
	name := `Odd "name"; x`
	dsn, err := srv.CreateDatabase(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	conn := connect(t, dsn)
	var got, app string
	if err := conn.QueryRow(ctx, "SELECT current_database(), current_setting('application_name')").Scan(&got, &app); err != nil {
		t.Fatal(err)
	}
	if got != name {
		t.Fatalf("current_database() = %q, want %q", got, name)
	}
	if app != "pgserver_test" {
		t.Fatalf("ExtraConfig not applied: application_name = %q", app)
	}
	conn.Close(ctx)

	pid := srv.cmd.Process.Pid
	if err := srv.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := srv.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	for _, dir := range []string{srv.baseDir, srv.sockDir} {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after Stop (err=%v)", dir, err)
		}
	}
	if err := syscall.Kill(-pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process group %d still alive after Stop (err=%v)", pid, err)
	}
}

// dropDatabase (the TIDEMARK_TEST_PG_DSN cleanup) must cope with leftover
// connections and replication slots in the database.
func TestDropDatabase(t *testing.T) {
	ctx := context.Background()
	srv, dsn := ServerForTest(t)
	admin := os.Getenv(EnvTestDSN)
	if srv != nil {
		admin = srv.DSN("postgres")
	}
	conn := connect(t, dsn) // stays open: DROP must terminate it
	var name string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&name); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_create_logical_replication_slot('leftover', 'pgoutput')"); err != nil {
		t.Fatal(err)
	}
	if err := dropDatabase(admin, name); err != nil {
		t.Fatal(err)
	}
	adminConn := connect(t, admin)
	var dbs, slots int
	if err := adminConn.QueryRow(ctx,
		"SELECT (SELECT count(*) FROM pg_database WHERE datname = $1), (SELECT count(*) FROM pg_replication_slots WHERE database = $1)",
		name).Scan(&dbs, &slots); err != nil {
		t.Fatal(err)
	}
	if dbs != 0 || slots != 0 {
		t.Fatalf("after dropDatabase: %d databases, %d slots named %s remain", dbs, slots, name)
	}
}

// With Options.TLS the server takes TLS connections with the given
// certificate (issued for localhost only, so verify-full needs that name),
// plain connections still work, and Options.HBA lines come first.
func TestStartTLS(t *testing.T) {
	if _, err := findBinDir(); err != nil {
		unavailable(t, "%v", err)
	}
	dir := t.TempDir()
	ca := certtest.New(t, dir, "pg")
	cert := ca.Server(t, "server", "localhost")
	ctx := context.Background()
	srv, err := Start(ctx, Options{
		Logf: t.Logf,
		TLS:  &TLS{CertFile: cert.CertFile, KeyFile: cert.KeyFile, CAFile: ca.CertFile},
		HBA:  []string{"hostnossl all tlsonly all reject"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	port := strconv.Itoa(srv.Port())
	dsn := func(user, host, query string) string {
		return "postgres://" + user + "@" + host + ":" + port + "/postgres?connect_timeout=5&" + query
	}
	verifyFull := "sslmode=verify-full&sslrootcert=" + url.QueryEscape(ca.CertFile)

	conn := connect(t, dsn("postgres", "localhost", verifyFull))
	var ssl bool
	var version string
	if err := conn.QueryRow(ctx, "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&ssl, &version); err != nil {
		t.Fatal(err)
	}
	if !ssl {
		t.Fatalf("verify-full connection: pg_stat_ssl.ssl = false")
	}
	var caFile string
	if err := conn.QueryRow(ctx, "SHOW ssl_ca_file").Scan(&caFile); err != nil || caFile == "" {
		t.Errorf("ssl_ca_file = %q (%v), want the copied CA", caFile, err)
	}
	if _, err := conn.Exec(ctx, "CREATE ROLE tlsonly LOGIN"); err != nil {
		t.Fatal(err)
	}

	// The certificate does not name 127.0.0.1.
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if c, err := pgx.Connect(cctx, dsn("postgres", "127.0.0.1", verifyFull)); err == nil {
		c.Close(ctx)
		t.Fatal("verify-full to 127.0.0.1 connected; the certificate names only localhost")
	} else if !strings.Contains(err.Error(), "x509: cannot validate certificate for 127.0.0.1") {
		t.Errorf("verify-full to 127.0.0.1: %v, want the host-name mismatch", err)
	}

	// Plain connections are still let in (host lines), except where an HBA
	// line says otherwise.
	plain := connect(t, srv.DSN("postgres"))
	if err := plain.QueryRow(ctx, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&ssl); err != nil || ssl {
		t.Errorf("sslmode=disable connection: ssl = %v (%v), want false", ssl, err)
	}
	if c, err := pgx.Connect(cctx, dsn("tlsonly", "127.0.0.1", "sslmode=disable")); err == nil {
		c.Close(ctx)
		t.Error("tlsonly connected without TLS despite the HBA reject line")
	}
	connect(t, dsn("tlsonly", "localhost", verifyFull))
	// Replication connections over TLS are let in too.
	rc, err := pgconn.Connect(cctx, dsn("postgres", "localhost", verifyFull+"&replication=database"))
	if err != nil {
		t.Fatalf("replication connection over TLS: %v", err)
	}
	rc.Close(ctx)
}
