package capture

import (
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// ExplainTLS returns err with what a failed check of the Postgres server's
// certificate means for the DSN and how to fix it, when err is a failed
// Postgres connection (*pgconn.ConnectError) for that reason; otherwise err
// unchanged. pgx's own text stays in front (it names the address and the
// x509 failure), the explanation follows in parentheses. It holds no part
// of the DSN but its host, so no password.
func ExplainTLS(err error) error {
	var ce *pgconn.ConnectError
	var done *tlsExplained
	if err == nil || !errors.As(err, &ce) || errors.As(err, &done) {
		return err
	}
	var (
		host x509.HostnameError
		ua   x509.UnknownAuthorityError
		inv  x509.CertificateInvalidError
	)
	var hint string
	switch {
	case errors.As(err, &host):
		names := certNames(host.Certificate)
		if len(names) == 0 {
			names = "no host names"
		}
		hint = fmt.Sprintf("the server's TLS certificate is valid for %s, not %s: with sslmode=verify-full the DSN's host must be a name the certificate lists; connect by that name, or have the certificate reissued for %s",
			names, host.Host, host.Host)
	case errors.As(err, &ua):
		hint = "the server's TLS certificate is not signed by a CA in sslrootcert (the system's CAs when sslrootcert is not set): point sslrootcert at the CA certificate (PEM) that issued it"
	case errors.As(err, &inv):
		hint = "the server's TLS certificate failed verification (expired, not yet valid, or not for server use)"
	default:
		return err
	}
	return &tlsExplained{err: err, hint: hint}
}

type tlsExplained struct {
	err  error
	hint string
}

func (e *tlsExplained) Error() string { return e.err.Error() + " (" + e.hint + ")" }
func (e *tlsExplained) Unwrap() error { return e.err }

// certNames lists the certificate's DNS names and IP addresses, or its
// common name when it has neither.
func certNames(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	var names []string
	names = append(names, c.DNSNames...)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 && c.Subject.CommonName != "" {
		names = append(names, c.Subject.CommonName)
	}
	return strings.Join(names, ", ")
}
