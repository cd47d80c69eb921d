package capture

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tidemark/tidemark/internal/certtest"
)

// fakeTLSServer answers Postgres's SSLRequest with 'S' and then does a TLS
// handshake with cert, which is as far as a client that rejects the
// certificate gets. It returns the listener's port.
func fakeTLSServer(t *testing.T, cert tls.Certificate) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				req := make([]byte, 8)
				if _, err := io.ReadFull(c, req); err != nil {
					return
				}
				if _, err := c.Write([]byte{'S'}); err != nil {
					return
				}
				_ = tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}}).Handshake()
			}()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// ExplainTLS adds to a failed certificate check what it means for the DSN,
// keeps pgx's text and the error chain, adds nothing twice, and leaves other
// errors alone.
func TestExplainTLS(t *testing.T) {
	dir := t.TempDir()
	ca := certtest.New(t, dir, "pg")
	port := fakeTLSServer(t, ca.Server(t, "server", "localhost", "db.internal").TLS)
	other := certtest.New(t, dir, "other")
	connect := func(host, rootCert string) error {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		dsn := "postgres://tm:s3cret-pw@" + net.JoinHostPort(host, port) + "/db?sslmode=verify-full&sslrootcert=" + url.QueryEscape(rootCert)
		c, err := pgconn.Connect(ctx, dsn)
		if err == nil {
			c.Close(ctx)
			t.Fatalf("connecting to %s with verify-full succeeded against a fake server", host)
		}
		return err
	}
	for _, tc := range []struct {
		name, host, root string
		want             []string
	}{
		{"host not on the certificate", "127.0.0.1", ca.CertFile, []string{
			"x509:", "the server's TLS certificate is valid for localhost, db.internal, not 127.0.0.1",
			"sslmode=verify-full", "the DSN's host must be a name the certificate lists"}},
		{"another CA", "localhost", other.CertFile, []string{
			"x509:", "not signed by a CA in sslrootcert"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := connect(tc.host, tc.root)
			err := ExplainTLS(raw)
			msg := err.Error()
			if !strings.HasPrefix(msg, raw.Error()) {
				t.Errorf("explained error %q does not start with pgx's %q", msg, raw)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error lacks %q:\n%s", w, msg)
				}
			}
			if strings.Contains(msg, "s3cret-pw") {
				t.Errorf("error holds the password: %s", msg)
			}
			var ce *pgconn.ConnectError
			if !errors.As(err, &ce) {
				t.Errorf("explained error lost the *pgconn.ConnectError")
			}
			if again := ExplainTLS(err); again.Error() != msg {
				t.Errorf("explained twice:\n%s", again)
			}
			// As main sees it: wrapped by the caller.
			if wrapped := ExplainTLS(fmt.Errorf("connecting to postgres: %w", raw)); !strings.Contains(wrapped.Error(), tc.want[1]) {
				t.Errorf("a wrapped connect error is not explained: %s", wrapped)
			}
		})
	}
	if err := errors.New("x509: certificate signed by unknown authority"); ExplainTLS(err) != err {
		t.Errorf("an error that is no Postgres connection failure was changed")
	}
	if ExplainTLS(nil) != nil {
		t.Errorf("ExplainTLS(nil) != nil")
	}
}
