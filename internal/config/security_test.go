package config_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/internal/certtest"
	"github.com/tidemark/tidemark/internal/config"
)

func TestKafkaSecurity(t *testing.T) {
	dir := t.TempDir()
	ca := certtest.New(t, dir, "kafka")
	client := ca.Client(t, "client", "tidemark")
	pwFile := filepath.Join(dir, "pw")
	const secret = "Sc-ram/pw-42"
	if err := os.WriteFile(pwFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := "postgres:\n  dsn: postgres://u@db/chat\n  tables: [public.events]\nkafka:\n  brokers: [k:9093]\n"
	cases := []struct {
		name     string
		kafka    string
		env      map[string]string
		problems []string // field paths, in order
		password string
		tls      bool
		certs    int
	}{
		{name: "plaintext", kafka: ""},
		{name: "tls with a CA and a client certificate", kafka: fmt.Sprintf("  tls: {ca_file: %s, cert_file: %s, key_file: %s, server_name: kafka.internal}\n", ca.CertFile, client.CertFile, client.KeyFile),
			tls: true, certs: 1},
		{name: "tls enabled, system roots", kafka: "  tls: {enabled: true}\n", tls: true},
		{name: "listed but off", kafka: "  tls: {enabled: false, ca_file: \"\"}\n  sasl: {mechanism: \"\", username: \"\", password: \"\", password_file: \"\"}\n"},
		{name: "scram with a password file", kafka: "  sasl: {mechanism: SCRAM-SHA-512, username: tm, password_file: " + pwFile + "}\n", password: secret},
		{name: "the environment wins over the file", kafka: "  sasl: {mechanism: PLAIN, username: tm, password_file: /nonexistent}\n",
			env: map[string]string{config.EnvKafkaSASLPassword: "from-env"}, password: "from-env"},
		{name: "password only from the environment", kafka: "  sasl: {mechanism: scram-sha-256, username: tm}\n",
			env: map[string]string{config.EnvKafkaSASLPassword: "from-env"}, password: "from-env"},
		{name: "missing CA file", kafka: "  tls: {ca_file: /nonexistent/ca.pem}\n", problems: []string{"kafka.tls"}},
		{name: "CA file without PEM", kafka: "  tls: {ca_file: " + notPEM + "}\n", problems: []string{"kafka.tls"}},
		{name: "certificate without key", kafka: "  tls: {cert_file: " + client.CertFile + "}\n", problems: []string{"kafka.tls"}},
		{name: "unknown mechanism, no user, no password", kafka: "  sasl: {mechanism: GSSAPI}\n",
			problems: []string{"kafka.sasl.mechanism", "kafka.sasl.password", "kafka.sasl.username"}},
		{name: "no mechanism", kafka: "  sasl: {username: tm, password: " + secret + "}\n", problems: []string{"kafka.sasl.mechanism"}},
		{name: "unreadable password file", kafka: "  sasl: {mechanism: PLAIN, username: tm, password_file: /nonexistent/pw}\n", problems: []string{"kafka.sasl.password_file"}},
		{name: "empty password file", kafka: "  sasl: {mechanism: PLAIN, username: tm, password_file: " + empty + "}\n", problems: []string{"kafka.sasl.password_file"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.Parse("t.yml", []byte(base+tc.kafka), func(k string) string { return tc.env[k] })
			if len(tc.problems) > 0 {
				var ce *config.Error
				if err == nil || !errors.As(err, &ce) {
					t.Fatalf("Parse = %v, want problems at %v", err, tc.problems)
				}
				var paths []string
				for _, p := range ce.Problems {
					paths = append(paths, p.Path)
				}
				if strings.Join(paths, " ") != strings.Join(tc.problems, " ") {
					t.Errorf("problems at %v, want %v: %v", paths, tc.problems, err)
				}
				if strings.Contains(err.Error(), secret) {
					t.Errorf("the error shows the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			net, err := c.Kafka.Net()
			if err != nil {
				t.Fatal(err)
			}
			if (net.TLS != nil) != tc.tls {
				t.Errorf("TLS = %v, want on=%v", net.TLS, tc.tls)
			}
			if net.TLS != nil && len(net.TLS.Certificates) != tc.certs {
				t.Errorf("%d client certificates, want %d", len(net.TLS.Certificates), tc.certs)
			}
			if tc.password == "" {
				if net.SASL != nil {
					t.Errorf("SASL = %s, want none", net.SASL.Name())
				}
				return
			}
			if net.SASL == nil || c.Kafka.SASL.Password != tc.password {
				t.Fatalf("SASL %v with password %q, want %q", net.SASL, c.Kafka.SASL.Password, tc.password)
			}
			for _, verb := range []string{"%v", "%+v", "%#v", "%s"} {
				if out := fmt.Sprintf(verb, c.Kafka); strings.Contains(out, tc.password) {
					t.Errorf("%s of the kafka config shows the password: %s", verb, out)
				}
			}
		})
	}
}
