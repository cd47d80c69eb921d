package kafkanet_test

import (
	"context"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/certtest"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/internal/kafkatest"
)

const (
	scramPass = "s3cret-scram-pw"
	plainPass = "s3cret-plain-pw"
)

// secured starts a TLS + SASL kfake whose certificate names localhost
// only, and returns it with the CA.
func secured(t *testing.T) (*kafkatest.Cluster, *certtest.CA) {
	t.Helper()
	ca := certtest.New(t, t.TempDir(), "kafka")
	srv := ca.Server(t, "broker", "localhost")
	cl := kafkatest.ForTestWith(t, kafkatest.Options{
		TLS: &tls.Config{Certificates: []tls.Certificate{srv.TLS}, MinVersion: tls.VersionTLS12},
		Superusers: []kafkatest.User{
			{Mechanism: kafkanet.ScramSHA256, Name: "tm", Password: scramPass},
			{Mechanism: kafkanet.Plain, Name: "tp", Password: plainPass},
		},
	})
	return cl, ca
}

func localhost(brokers []string) []string {
	out := make([]string, len(brokers))
	for i, b := range brokers {
		out[i] = strings.Replace(b, "127.0.0.1", "localhost", 1)
	}
	return out
}

func TestCheckSecured(t *testing.T) {
	cl, ca := secured(t)
	other := certtest.New(t, t.TempDir(), "other")
	mech := func(name, user, pw string) kafkanet.Settings {
		m, err := kafkanet.Mechanism(name, user, pw)
		if err != nil {
			t.Fatal(err)
		}
		return kafkanet.Settings{TLS: &tls.Config{RootCAs: ca.Pool()}, SASL: m, DialTimeout: 3 * time.Second}
	}
	good := localhost(cl.Brokers())
	for _, tc := range []struct {
		name    string
		brokers []string
		s       kafkanet.Settings
		what    string // "" = success
		detail  string
	}{
		{"scram", good, mech(kafkanet.ScramSHA256, "tm", scramPass), "", ""},
		{"plain", good, mech(kafkanet.Plain, "tp", plainPass), "", ""},
		{"wrong scram password", good, mech(kafkanet.ScramSHA256, "tm", "wrong-pw-1"), "SASL", "rejected the username or password"},
		{"wrong plain password", good, mech(kafkanet.Plain, "tp", "wrong-pw-2"), "SASL", "rejected the username or password"},
		{"unknown user", good, mech(kafkanet.ScramSHA512, "nobody", "wrong-pw-3"), "SASL", ""},
		{"unknown CA", good, func() kafkanet.Settings {
			s := mech(kafkanet.ScramSHA256, "tm", scramPass)
			s.TLS = &tls.Config{RootCAs: other.Pool()}
			return s
		}(), "TLS", "signed by an authority this client does not trust"},
		{"wrong server name", cl.Brokers(), mech(kafkanet.ScramSHA256, "tm", scramPass), "TLS", "does not carry the name dialled"},
		{"plaintext client", good, kafkanet.Settings{DialTimeout: 3 * time.Second}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			start := time.Now()
			err := kafkanet.Check(ctx, tc.brokers, tc.s, "test")
			took := time.Since(start)
			if took > 10*time.Second {
				t.Errorf("Check took %s", took)
			}
			if tc.name == "plaintext client" {
				if err == nil {
					t.Fatal("a plaintext client reached a TLS listener")
				}
				t.Logf("plaintext: %v", err)
				return
			}
			if tc.what == "" {
				if err != nil {
					t.Fatalf("Check: %v", err)
				}
				return
			}
			var a *kafkanet.AccessError
			if !errors.As(err, &a) {
				t.Fatalf("Check = %v (%T), want an AccessError", err, err)
			}
			msg := err.Error()
			t.Log(msg)
			if a.What != tc.what || !strings.Contains(msg, tc.detail) || !strings.Contains(msg, tc.brokers[0]) {
				t.Errorf("Check = %q, want a %s failure naming %s and saying %q", msg, tc.what, tc.brokers[0], tc.detail)
			}
			for _, pw := range []string{scramPass, plainPass, "wrong-pw"} {
				if strings.Contains(msg, pw) {
					t.Errorf("the error shows a password: %q", msg)
				}
			}
		})
	}
}
