package redis

import (
	"context"
	"crypto/tls"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/certtest"
	"github.com/tidemark/tidemark/internal/redistest"
)

// tidemarkACL is the ACL the README documents for a user of both the
// invalidation (channel "inv") and the targets sinks.
var tidemarkACL = []string{"resetkeys", "~*", "resetchannels", "&inv", "-@all", "+del", "+publish", "+multi", "+exec", "+sadd", "+scan", "+unlink"}

const userPassword = "Tidemark-Pa55word"

// tlsRedis starts a TLS-only redis-server with the ACL users "tidemark"
// (tidemarkACL) and those in more, and returns it with a client TLS
// configuration trusting its CA.
func tlsRedis(t *testing.T, more ...redistest.Option) (*redistest.Server, *tls.Config) {
	t.Helper()
	dir := t.TempDir()
	ca := certtest.New(t, dir, "redis")
	cert := ca.Server(t, "redis-server", "127.0.0.1", "localhost")
	opts := append([]redistest.Option{redistest.WithTLS(cert.CertFile, cert.KeyFile, ca.CertFile),
		redistest.WithUser("tidemark", userPassword, tidemarkACL...)}, more...)
	srv := redistest.ForTest(t, opts...)
	return srv, &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12}
}

// Over TLS, as an ACL user with only the documented permissions: Check
// passes without side effects, and deletes, publishes and set replacements
// land.
func TestTLSAndACLUser(t *testing.T) {
	t.Parallel()
	srv, tlsConfig := tlsRedis(t)
	admin := srv.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sub := admin.Subscribe(ctx, "inv")
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatalf("SUBSCRIBE: %v", err)
	}

	s := newSink(t, srv, Config{Username: "tidemark", Password: userPassword, TLS: tlsConfig, Channel: "inv"})
	if err := s.Check(ctx, UseInvalidate|UseReplaceSets); err != nil {
		t.Fatalf("Check: %v", err)
	}
	keys := keyRange("cache", 5)
	setKeys(t, admin, append([]string{"kept"}, keys...))
	if err := s.Invalidate(ctx, keys); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	if left := existing(t, admin, keys); len(left) > 0 {
		t.Errorf("keys survived: %v", left)
	}
	if got := existing(t, admin, []string{"kept"}); len(got) != 1 {
		t.Errorf("an unrelated key was deleted")
	}
	// The first message is the first invalidated key: Check published nothing.
	for i, want := range keys {
		msg, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if msg.Payload != want {
			t.Fatalf("message %d = %q, want %q", i, msg.Payload, want)
		}
	}
	if n := admin.Exists(ctx, checkKey).Val(); n != 0 {
		t.Errorf("Check left the key %s", checkKey)
	}

	if err := s.ReplaceSets(ctx, []string{"set:a", "set:b"}, [][]string{{"x", "y"}, nil}); err != nil {
		t.Fatalf("ReplaceSets: %v", err)
	}
	if m, err := admin.SMembers(ctx, "set:a").Result(); err != nil || !slices.Equal(sortedCopy(m), []string{"x", "y"}) {
		t.Errorf("set:a = %v, %v; want [x y]", m, err)
	}
}

func sortedCopy(s []string) []string {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}

// What waiting cannot fix fails Check as permanent, naming the address, the
// user and the cause, never the password; what it may fix does not count
// as permanent.
func TestCheckFailures(t *testing.T) {
	t.Parallel()
	srv, tlsConfig := tlsRedis(t,
		redistest.WithUser("nosadd", userPassword, "~*", "&*", "-@all", "+del", "+multi", "+exec"),
		redistest.WithUser("nochannel", userPassword, "~*", "resetchannels", "&other", "-@all", "+del", "+publish", "+multi"),
		redistest.WithUser("noselect", userPassword, "~*", "-@all", "+del", "+multi"))
	plain := redistest.ForTest(t)
	other := certtest.New(t, t.TempDir(), "other")
	down := redistest.ForTest(t)
	if err := down.Halt(); err != nil {
		t.Fatal(err)
	}
	yes, no := true, false
	wrongName := tlsConfig.Clone()
	wrongName.ServerName = "redis.example"
	for _, tc := range []struct {
		name      string
		srv       *redistest.Server
		cfg       Config
		use       Use
		permanent *bool    // nil: either
		want      []string // substrings of the error
	}{
		{name: "wrong password", srv: srv, cfg: Config{Username: "tidemark", Password: "wrong-" + userPassword, TLS: tlsConfig},
			permanent: &yes, want: []string{`(user "tidemark"): authentication failed`, "WRONGPASS", "check the username and the password"}},
		{name: "unknown user", srv: srv, cfg: Config{Username: "nobody", Password: userPassword, TLS: tlsConfig},
			permanent: &yes, want: []string{"authentication failed", "WRONGPASS"}},
		{name: "no username", srv: srv, cfg: Config{Password: userPassword, TLS: tlsConfig},
			permanent: &yes, want: []string{"authentication failed", "authenticates as the default user"}},
		{name: "no password", srv: srv, cfg: Config{TLS: tlsConfig},
			permanent: &yes, want: []string{"authentication failed", "NOAUTH", "requires a password"}},
		{name: "unknown CA", srv: srv, cfg: Config{Username: "tidemark", Password: userPassword, TLS: &tls.Config{RootCAs: other.Pool(), MinVersion: tls.VersionTLS12}},
			permanent: &yes, want: []string{"TLS: the server's certificate is not signed by a trusted CA", "unknown authority", "tls.ca_file"}},
		{name: "wrong server name", srv: srv, cfg: Config{Username: "tidemark", Password: userPassword, TLS: wrongName},
			permanent: &yes, want: []string{"not for the name dialled", "redis.example", "tls.server_name"}},
		{name: "command refused", srv: srv, cfg: Config{Username: "nosadd", Password: userPassword, TLS: tlsConfig}, use: UseReplaceSets,
			permanent: &yes, want: []string{"the user may not run SADD", "NOPERM", "ACL SETUSER nosadd -@all +multi +del +sadd +exec"}},
		{name: "channel refused", srv: srv, cfg: Config{Username: "nochannel", Password: userPassword, TLS: tlsConfig, Channel: "inv"}, use: UseInvalidate,
			permanent: &yes, want: []string{`may not publish on channel "inv"`, "ACL SETUSER nochannel &inv"}},
		{name: "select refused", srv: srv, cfg: Config{Username: "noselect", Password: userPassword, TLS: tlsConfig, DB: 1}, use: UseInvalidate,
			permanent: &yes, want: []string{"the user may not run SELECT", "+select"}},
		// The plaintext server answers the ClientHello only if it happens to
		// hold a newline byte (else the handshake times out).
		{name: "TLS to a plaintext port", srv: plain, cfg: Config{TLS: tlsConfig, DialTimeout: time.Second},
			want: []string{"does not speak TLS", "turn tls off"}},
		{name: "plaintext to a TLS port", srv: srv, cfg: Config{Username: "tidemark", Password: userPassword},
			permanent: &no, want: []string{"set tls.enabled"}},
		{name: "server down", srv: down, cfg: Config{Username: "tidemark", Password: userPassword, TLS: tlsConfig},
			permanent: &no, want: []string{"cannot use the server", "connection refused"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSink(t, tc.srv, tc.cfg)
			use := tc.use
			if use == 0 {
				use = UseInvalidate | UseReplaceSets
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := s.Check(ctx, use)
			if err == nil {
				t.Fatalf("Check succeeded")
			}
			t.Logf("Check: %v", err)
			if tc.permanent != nil && IsPermanent(err) != *tc.permanent {
				t.Errorf("IsPermanent = %v, want %v", IsPermanent(err), *tc.permanent)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "redis "+tc.srv.Addr()) {
				t.Errorf("error %q does not start with the address", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q lacks %q", msg, w)
				}
			}
			if strings.Contains(msg, userPassword) {
				t.Errorf("error shows the password: %q", msg)
			}
		})
	}
}

// A user refused MULTI (which Invalidate does not need) passes Check with a
// warning, and so does one whose key patterns refuse the probe key.
func TestCheckInconclusive(t *testing.T) {
	t.Parallel()
	srv, tlsConfig := tlsRedis(t,
		redistest.WithUser("nomulti", userPassword, "~*", "&*", "-@all", "+del", "+publish"),
		redistest.WithUser("cacheonly", userPassword, "~cache:*", "&*", "-@all", "+del", "+publish", "+multi"))
	for _, tc := range []struct{ user, want string }{
		{user: "nomulti", want: "may not run MULTI"},
		{user: "cacheonly", want: "may not write the probe key"},
	} {
		t.Run(tc.user, func(t *testing.T) {
			core, logs := observer.New(zapcore.WarnLevel)
			s, err := New(Config{Addr: srv.Addr(), Username: tc.user, Password: userPassword, TLS: tlsConfig, Channel: "inv"}, zap.New(core))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := s.Check(ctx, UseInvalidate); err != nil {
				t.Fatalf("Check: %v", err)
			}
			var got []string
			for _, e := range logs.All() {
				got = append(got, e.Message)
			}
			if len(got) != 1 || !strings.Contains(got[0], tc.want) {
				t.Errorf("warnings %q, want one saying %q", got, tc.want)
			}
			if err := s.Invalidate(ctx, []string{"cache:1"}); err != nil {
				t.Errorf("Invalidate: %v", err)
			}
		})
	}
}

func TestCommands(t *testing.T) {
	s, err := New(Config{Addr: "h:6379", Username: "u", Channel: "inv", DB: 2}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		use  Use
		want string
	}{
		{UseInvalidate, "-@all +select +del +publish &inv"},
		{UseReplaceSets, "-@all +select +multi +del +sadd +exec"},
		{UseInvalidate | UseReplaceSets, "-@all +select +del +publish +multi +sadd +exec &inv"},
		{UseVersionedSets, "-@all +select +evalsha +eval +get +set +exists +sadd +srem +del +rename"},
		{UseReplaceSets | UseVersionedSets, "-@all +select +multi +del +sadd +exec +evalsha +eval +get +set +exists +srem +rename"},
		{UseInvalidate | UseVersionedSets, "-@all +select +del +publish +evalsha +eval +get +set +exists +sadd +srem +rename &inv"},
	} {
		if got := s.ACLRules(tc.use); got != tc.want {
			t.Errorf("ACLRules(%d) = %q, want %q", tc.use, got, tc.want)
		}
	}
}
