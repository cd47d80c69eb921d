package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLS configures a TLS client connection (to Kafka brokers or Redis).
type TLS struct {
	// Enabled turns TLS on. The other fields imply it when set.
	Enabled bool `yaml:"enabled"`
	// CAFile is a PEM bundle of the CAs that sign the server's
	// certificate. Default: the system's roots.
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are a PEM client certificate and its key, for
	// servers that require mutual TLS (both or neither).
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName is the name the server's certificate must carry. Default:
	// the host of the address dialled.
	ServerName string `yaml:"server_name"`
	// InsecureSkipVerify accepts any server certificate (tests only: it
	// gives up the protection TLS exists for; Tidemark warns at start).
	InsecureSkipVerify bool `yaml:"insecure_skip_verify"`
}

// On reports whether t asks for TLS.
func (t *TLS) On() bool {
	return t != nil && (t.Enabled || t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" || t.ServerName != "" || t.InsecureSkipVerify)
}

// Config builds the client TLS configuration (nil when t is off). Errors
// name the file and what is wrong with it, never its contents.
func (t *TLS) Config() (*tls.Config, error) {
	if !t.On() {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify} //nolint:gosec // opt-in, warned about
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s holds no PEM certificate", t.CAFile)
		}
		c.RootCAs = pool
	}
	switch {
	case t.CertFile != "" && t.KeyFile != "":
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("cert_file %s / key_file %s: %w", t.CertFile, t.KeyFile, hidePEM(err))
		}
		c.Certificates = []tls.Certificate{cert}
	case t.CertFile != "" || t.KeyFile != "":
		return nil, errors.New("cert_file and key_file go together: set both or neither")
	}
	return c, nil
}

// hidePEM keeps key material out of an error (crypto/tls's errors do not
// quote it, but a wrapped parse error is reduced to its message anyway).
func hidePEM(err error) error { return errors.New(err.Error()) }

// validateTLS checks t's files at path (e.g. "kafka.tls").
func validateTLS(path string, t *TLS, add func(path, format string, args ...any)) {
	if !t.On() {
		return
	}
	if _, err := t.Config(); err != nil {
		add(path, "%v", err)
	}
}
