package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/internal/certtest"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
)

// pgTLSPassword is the tidemark role's password on the TLS server; no
// output may contain it.
const pgTLSPassword = "tls-Secret-7f3a"

// TestPGTLSVerifyFull: against a Postgres with ssl=on and a certificate from
// a test CA issued for "localhost" only, which lets the tidemark role in
// only over TLS and with its password, `tidemark check` and `tidemark run`
// with sslmode=verify-full and sslrootcert capture into Kafka, every
// connection of the run (the replication connection, the slot watcher's,
// the type lookups') uses TLS, and with the host 127.0.0.1, which the
// certificate does not name, both exit non-zero within 10 s naming the
// certificate's host-name problem, without the password.
func TestPGTLSVerifyFull(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and starts a server of its own; skipped in -short")
	}
	dir := t.TempDir()
	ca := certtest.New(t, dir, "pgtls")
	cert := ca.Server(t, "pgtls-server", "localhost") // not 127.0.0.1
	var hba []string
	for _, addr := range []string{"127.0.0.1/32", "::1/128"} {
		hba = append(hba,
			"hostssl all tidemark "+addr+" scram-sha-256",
			"hostssl replication tidemark "+addr+" scram-sha-256")
	}
	// Without TLS the role gets nowhere, whatever its connection is for.
	hba = append(hba, "hostnossl all tidemark all reject", "hostnossl replication tidemark all reject")
	srv := throwawayServerWith(t, pgserver.Options{
		TLS: &pgserver.TLS{CertFile: cert.CertFile, KeyFile: cert.KeyFile},
		HBA: hba,
	})

	ctx := context.Background()
	adminDSN, err := srv.CreateDatabase(ctx, "tls_db")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(ctx, adminDSN) // the test's own, plain, as postgres
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	kc, err := kafkatest.Start("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Close)
	e := &env{t: t, dsn: adminDSN, pool: pool, kafka: kc}
	e.exec(`CREATE ROLE tidemark LOGIN SUPERUSER PASSWORD '` + pgTLSPassword + `'`)
	// A domain column makes capture look its type up on a connection of
	// its own.
	e.exec(`CREATE DOMAIN label AS text CHECK (length(VALUE) < 100);
CREATE TABLE notes (id int PRIMARY KEY, body text, tag label)`)

	// tlsDSN is the operator's DSN: host, verify-full, the CA file; the
	// password in it only when withPassword (else TIDEMARK_POSTGRES_PASSWORD).
	tlsDSN := func(host string, withPassword bool) string {
		u := url.URL{Scheme: "postgres", User: url.User("tidemark"),
			Host: net.JoinHostPort(host, strconv.Itoa(srv.Port())), Path: "/tls_db",
			RawQuery: "sslmode=verify-full&sslrootcert=" + url.QueryEscape(ca.CertFile)}
		if withPassword {
			u.User = url.UserPassword("tidemark", pgTLSPassword)
		}
		return u.String()
	}
	configFor := func(dsn string) string {
		return writeConfig(t, e.config("pgtls", []string{"public.notes"}, func(c *config.Config) { c.Postgres.DSN = dsn }))
	}
	bin := binary(t)
	passwordEnv := append(os.Environ(), config.EnvPostgresPassword+"="+pgTLSPassword)

	// check, with the host on the certificate.
	goodPath := configFor(tlsDSN("localhost", false))
	check := exec.Command(bin, "check", "--config", goodPath)
	check.Env = passwordEnv
	if out, err := check.CombinedOutput(); err != nil || !strings.Contains(string(out), "no problems found") {
		t.Fatalf("tidemark check with verify-full and host localhost: %v\n%s", err, out)
	} else if strings.Contains(string(out), pgTLSPassword) {
		t.Errorf("tidemark check printed the password:\n%s", out)
	}

	// run, with the host on the certificate.
	logPath := filepath.Join(t.TempDir(), "run.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	// The log is also checked for the password: an unreadable log must
	// fail the test, not pass that check empty.
	runLog := func() string {
		t.Helper()
		b, err := os.ReadFile(logPath)
		if err != nil {
			t.Fatalf("reading the log of tidemark run: %v", err)
		}
		return string(b)
	}
	run := exec.Command(bin, "run", "--config", goodPath)
	run.Env = passwordEnv
	run.Stdout, run.Stderr = logFile, logFile
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var runErr error
	go func() { runErr = run.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			_ = run.Process.Kill()
			<-exited
		}
	})

	// Every connection of the tidemark role, once both the walsender and
	// the slot watcher are there, must be TLS.
	type backend struct {
		pid           int
		app, typ      string
		ssl           bool
		version       string
		replicationOK bool // listed in pg_stat_replication
	}
	var seen []backend
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		select {
		case <-exited:
			t.Fatalf("tidemark run exited (%v) before streaming:\n%s", runErr, runLog())
		default:
		}
		seen = nil
		rows, err := pool.Query(ctx, `SELECT a.pid, coalesce(a.application_name, ''), a.backend_type, s.ssl, coalesce(s.version, ''), r.pid IS NOT NULL
			FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid LEFT JOIN pg_stat_replication r ON r.pid = a.pid
			WHERE a.usename = 'tidemark' ORDER BY a.pid`)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var b backend
			if err := rows.Scan(&b.pid, &b.app, &b.typ, &b.ssl, &b.version, &b.replicationOK); err != nil {
				t.Fatal(err)
			}
			seen = append(seen, b)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		var walsender, watcher bool
		for _, b := range seen {
			walsender = walsender || (b.app == "tidemark" && b.typ == "walsender" && b.replicationOK)
			watcher = watcher || b.app == "tidemark-watch"
		}
		if walsender && watcher {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no replication connection and slot watcher of tidemark after 30s: %+v\n%s", seen, runLog())
		}
	}
	for _, b := range seen {
		if !b.ssl || !strings.HasPrefix(b.version, "TLS") {
			t.Errorf("connection %d (%s, %s) of tidemark: ssl %v version %q, want TLS", b.pid, b.app, b.typ, b.ssl, b.version)
		}
	}
	t.Logf("tidemark's connections: %+v", seen)

	e.exec(`INSERT INTO notes VALUES (1, 'over tls', 'a'), (2, 'verified', 'b')`)
	e.exec(`UPDATE notes SET body = 'still verified' WHERE id = 2`)
	ms := e.waitRecords("pgtls.public.notes", 3, 30*time.Second)
	ops := map[string]int{}
	for _, m := range ms {
		ops[m.Env.Op]++
		if m.Env.Source.DB != "tls_db" {
			t.Errorf("record from database %q, want tls_db", m.Env.Source.DB)
		}
	}
	if ops["c"] != 2 || ops["u"] != 1 || len(ms) != 3 {
		t.Errorf("records by op %v (%d records), want 2 creates and 1 update", ops, len(ms))
	}
	var tag string
	if err := json.Unmarshal(ms[0].Env.After["tag"], &tag); err != nil || (tag != "a" && tag != "b") {
		t.Errorf("domain column tag = %s (%v), want its text", ms[0].Env.After["tag"], err)
	}

	if err := run.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("tidemark run did not stop within 30s of SIGTERM:\n%s", runLog())
	}
	if strings.Contains(runLog(), pgTLSPassword) {
		t.Errorf("tidemark run printed the password:\n%s", runLog())
	}

	// The host 127.0.0.1 is not on the certificate: both commands fail
	// fast, saying so, without the password (which is in the DSN now).
	badPath := configFor(tlsDSN("127.0.0.1", true))
	for _, command := range []string{"check", "run"} {
		t.Run(command+" with the wrong host", func(t *testing.T) {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			start := time.Now()
			out, err := exec.CommandContext(cctx, bin, command, "--config", badPath).CombinedOutput()
			if cctx.Err() != nil {
				t.Fatalf("tidemark %s still running after 10s with a certificate that does not name its host:\n%s", command, out)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("tidemark %s: %v, want a non-zero exit\n%s", command, err, out)
			}
			for _, want := range []string{
				"x509: cannot validate certificate for 127.0.0.1",
				"the server's TLS certificate is valid for localhost, not 127.0.0.1",
				"sslmode=verify-full",
			} {
				if !strings.Contains(string(out), want) {
					t.Errorf("tidemark %s output lacks %q:\n%s", command, want, out)
				}
			}
			if strings.Contains(string(out), pgTLSPassword) {
				t.Errorf("tidemark %s printed the password:\n%s", command, out)
			}
			t.Logf("exit %d after %s: %s", ee.ExitCode(), time.Since(start).Round(time.Millisecond), strings.TrimSpace(string(out)))
		})
	}
}
