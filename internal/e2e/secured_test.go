package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/certtest"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation/cache"
)

const (
	securedScramPW = "Scram-e2e-Pw-7731"
	securedPlainPW = "Plain-e2e-Pw-1907"
)

// newSecuredEnv is newEnv with a Kafka that only speaks TLS (a
// certificate for "localhost" from a test CA) and SASL (a SCRAM-SHA-256
// user "tm" and a PLAIN user "tp"); the env's clients log in as tm.
func newSecuredEnv(t *testing.T) (*env, *certtest.CA) {
	t.Helper()
	dsn := pgserver.ForTest(t)
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(pool.Close)
	ca := certtest.New(t, t.TempDir(), "kafka")
	// kfake advertises its brokers as 127.0.0.1: the certificate carries
	// both names, as a real broker's carries its advertised name.
	srv := ca.Server(t, "broker", "localhost", "127.0.0.1")
	kc := kafkatest.ForTestWith(t, kafkatest.Options{
		TLS: &tls.Config{Certificates: []tls.Certificate{srv.TLS}, MinVersion: tls.VersionTLS12},
		Superusers: []kafkatest.User{
			{Mechanism: kafkanet.ScramSHA256, Name: "tm", Password: securedScramPW},
			{Mechanism: kafkanet.Plain, Name: "tp", Password: securedPlainPW},
		},
	})
	mech, err := kafkanet.Mechanism(kafkanet.ScramSHA256, "tm", securedScramPW)
	if err != nil {
		t.Fatal(err)
	}
	var brokers []string
	for _, b := range kc.Brokers() {
		brokers = append(brokers, strings.Replace(b, "127.0.0.1", "localhost", 1))
	}
	return &env{t: t, dsn: dsn, pool: pool, kafka: kc, secure: &secureKafka{caFile: ca.CertFile, mechanism: kafkanet.ScramSHA256,
		user: "tm", pw: securedScramPW, brokers: brokers, net: kafkanet.Settings{TLS: &tls.Config{RootCAs: ca.Pool()}, SASL: mech}}}, ca
}

// securedYAML writes a capture-only config for the binary; the password
// is not in it (the caller passes it in TIDEMARK_KAFKA_SASL_PASSWORD).
func securedYAML(t *testing.T, cfg *config.Config, brokers []string, caFile, mechanism, user, serverName string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "postgres:\n  dsn: %q\n  slot: %s\n  publication: %s\n  standby_interval: 1s\n  snapshot: %s\n  tables: [%s]\n",
		cfg.Postgres.DSN, cfg.Postgres.Slot, cfg.Postgres.Publication, cfg.Postgres.Snapshot, strings.Join(cfg.Postgres.Tables, ", "))
	fmt.Fprintf(&b, "kafka:\n  brokers: [%s]\n  topic_prefix: %s\n  partitions: %d\n", strings.Join(brokers, ", "), cfg.Kafka.TopicPrefix, cfg.Kafka.Partitions)
	fmt.Fprintf(&b, "  tls: {ca_file: %q, server_name: %q}\n  sasl: {mechanism: %s, username: %s}\n", caFile, serverName, mechanism, user)
	b.WriteString("http:\n  listen: \"\"\nlog:\n  level: info\n")
	path := filepath.Join(t.TempDir(), "tidemark.yml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestSecuredKafka: over TLS + SASL/SCRAM, the binary captures, the
// invalidation, targets and integrity consumers consume and commit, the
// embeddable cache follows the invalidations topic and status reads the
// groups' lag. A wrong password, an unknown CA and a wrong server name
// each make `tidemark run` and `tidemark check` exit non-zero within 10 s
// naming the cause; no password is ever printed.
func TestSecuredKafka(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	e, _ := newSecuredEnv(t)
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	on := true
	cfg := invalidationConfig(e, "sec", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Topic = &on
		c.Targets = &config.Targets{}
		c.Integrity = &config.Integrity{}
	})
	ctx := context.Background()
	// Capture: the real binary, password from the environment.
	bin := binary(t)
	path := securedYAML(t, cfg, e.secure.brokers, e.secure.caFile, kafkanet.ScramSHA256, "tm", "")
	cmd := exec.Command(bin, "run", "--config", path)
	cmd.Env = append(os.Environ(), config.EnvKafkaSASLPassword+"="+securedScramPW)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stopCapture := func() {
		if !stopped {
			stopped = true
			kill(t, cmd)
		}
	}
	t.Cleanup(func() {
		stopCapture()
		if t.Failed() {
			t.Logf("tidemark run printed:\n%s", out.String())
		}
	})
	topic := "sec.public.room_memberships"
	e.waitTopic(topic, 60*time.Second)

	// The consumers, in this process, over the same TLS + SASL settings.
	inv, _ := e.startInvalidation(cfg)
	tg, _ := e.startTargets(cfg)
	ig, err := app.PrepareIntegrity(ctx, cfg, nil)
	if err != nil {
		t.Fatalf("prepare integrity: %v", err)
	}
	runConsumer(t, "integrity", ig.Run)

	// The embeddable cache follows the invalidations topic.
	c, err := cache.New(cache.Config[string]{Brokers: e.secure.brokers, Topic: "sec.invalidations",
		TLS: &tls.Config{RootCAs: e.secure.net.TLS.RootCAs}, SASL: e.secure.net.SASL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	followed := make(chan error, 1)
	fctx, stopFollow := context.WithCancel(ctx)
	defer stopFollow()
	go func() { followed <- c.Follow(fctx) }()
	waitUntil(t, 30*time.Second, "the cache to be ready", func() bool { return c.Ready() })
	const cachedKey = "room:!s1:members"
	if _, err := c.GetOrLoad(ctx, cachedKey, func(context.Context) (string, error) { return "before", nil }); err != nil {
		t.Fatal(err)
	}
	rc := rd.Client()
	if err := rc.Set(ctx, cachedKey, "cached", 0).Err(); err != nil {
		t.Fatal(err)
	}

	e.exec(`INSERT INTO users(user_id) VALUES ('@s1'), ('@s2') ON CONFLICT DO NOTHING`)
	e.exec(`INSERT INTO rooms(room_id) VALUES ('!s1') ON CONFLICT DO NOTHING`)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!s1', '@s1', 'join'), ('!s1', '@s2', 'join')`)
	e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!s1' AND user_id = '@s2'`)

	recs := e.waitRecords(topic, 3, 60*time.Second)
	if len(recs) != 3 {
		t.Errorf("%s holds %d records, want 3", topic, len(recs))
	}
	waitUntil(t, 30*time.Second, "redis to lose "+cachedKey, func() bool {
		n, err := rc.Exists(ctx, cachedKey).Result()
		if err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
	waitUntil(t, 30*time.Second, "the embeddable cache to drop "+cachedKey, func() bool {
		_, ok := c.Get(cachedKey)
		return !ok
	})
	e.waitTargets(cfg, 60*time.Second)
	kept, err := tg.Store.Kept(ctx, []string{"!s1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(kept["!s1"]) != 1 || !kept["!s1"]["@s1"] {
		t.Errorf("targets of !s1 = %v, want only @s1", kept["!s1"])
	}
	for _, g := range []struct {
		group  string
		topics []string
	}{
		{cfg.Invalidation.Group, []string{topic}},
		{cfg.Targets.Group, targetTopics(cfg)},
		{cfg.Integrity.Group, []string{"sec.public.events", "sec.public.event_json", "sec.public.read_markers"}},
	} {
		e.waitGroupCaughtUp(g.group, g.topics, 60*time.Second)
	}
	if inv.Consumer.Stats().Messages.Load() == 0 || ig.Consumer.Stats().Messages.Load() == 0 {
		t.Errorf("invalidation applied %d, integrity %d records; want both > 0", inv.Consumer.Stats().Messages.Load(), ig.Consumer.Stats().Messages.Load())
	}
	st, err := app.CollectStatus(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range st.Groups {
		if g.Error != "" || g.Partitions == 0 {
			t.Errorf("status of group %s (%s): %d partitions committed, error %q", g.Group, g.Role, g.Partitions, g.Error)
		}
	}
	if len(st.Groups) != 3 {
		t.Errorf("status lists %d groups, want 3: %+v", len(st.Groups), st.Groups)
	}
	stopFollow()
	if err := <-followed; err != nil {
		t.Errorf("Follow: %v", err)
	}
	stopCapture()
	if strings.Contains(out.String(), securedScramPW) {
		t.Errorf("the binary printed the password:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "TLS, SASL SCRAM-SHA-256") {
		t.Errorf("the binary did not log the security it connected with:\n%s", out.String())
	}

	// What an operator gets wrong, each named within 10 s.
	other := certtest.New(t, t.TempDir(), "other")
	for _, tc := range []struct {
		name, path, pw, want string
	}{
		{"wrong scram password", securedYAML(t, cfg, e.secure.brokers, e.secure.caFile, kafkanet.ScramSHA256, "tm", ""), "not-the-password-1",
			"SASL failure"},
		{"wrong plain password", securedYAML(t, cfg, e.secure.brokers, e.secure.caFile, kafkanet.Plain, "tp", ""), "not-the-password-2",
			"SASL failure"},
		{"unknown CA", securedYAML(t, cfg, e.secure.brokers, other.CertFile, kafkanet.ScramSHA256, "tm", ""), securedScramPW,
			"signed by an authority this client does not trust"},
		{"wrong server name", securedYAML(t, cfg, e.secure.brokers, e.secure.caFile, kafkanet.ScramSHA256, "tm", "kafka.example.com"), securedScramPW,
			"does not carry the name dialled"},
	} {
		for _, sub := range []string{"check", "run"} {
			t.Run(tc.name+"/"+sub, func(t *testing.T) {
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				defer cancel()
				cmd := exec.CommandContext(cctx, bin, sub, "--config", tc.path)
				cmd.Env = append(os.Environ(), config.EnvKafkaSASLPassword+"="+tc.pw)
				start := time.Now()
				got, err := cmd.CombinedOutput()
				took := time.Since(start)
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
					t.Fatalf("%s: exit %v after %s, want a non-zero exit\n%s", sub, err, took, got)
				}
				if took > 10*time.Second {
					t.Errorf("%s took %s to fail, want under 10s", sub, took)
				}
				if !strings.Contains(string(got), tc.want) {
					t.Errorf("%s output does not say %q:\n%s", sub, tc.want, got)
				}
				for _, pw := range []string{securedScramPW, securedPlainPW, tc.pw} {
					if strings.Contains(string(got), pw) {
						t.Errorf("%s printed a password:\n%s", sub, got)
					}
				}
			})
		}
	}
}

// waitTopic waits until topic exists with partitions.
func (e *env) waitTopic(topic string, within time.Duration) {
	e.t.Helper()
	waitUntil(e.t, within, "topic "+topic, func() bool {
		n, err := kafkatest.PartitionCountVia(context.Background(), e.transport(), e.brokers(), topic)
		return err == nil && n > 0
	})
}

// waitUntil polls ok every 20ms until it holds or within passes.
func waitUntil(t *testing.T, within time.Duration, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !ok(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", within, what)
		}
	}
}
