package e2e

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/certtest"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/redistest"
)

// redisACL is the ACL the README gives the Redis user of both consumers
// (invalidation with channel "cache-inval", and targets): no more.
var redisACL = []string{"resetkeys", "~*", "resetchannels", "&cache-inval", "-@all", "+del", "+publish", "+multi", "+exec", "+sadd", "+scan", "+unlink",
	"+evalsha", "+eval", "+get", "+set", "+exists", "+srem", "+rename"}

const redisUserPassword = "e2e-Redis-Pa55word"

// TestRedisTLSAndACLUser (issue 12, acceptance 4): against a redis-server
// that accepts only TLS and whose default user is password protected, the
// invalidation consumer (DEL and PUBLISH) and the targets consumer (the
// room's set) write as the ACL user "tidemark", which has only the
// documented permissions, verifying the certificate against the test CA
// under tls.server_name. A wrong password or an untrusted CA fails their
// start, naming the config path, the address and the cause.
func TestRedisTLSAndACLUser(t *testing.T) {
	dir := t.TempDir()
	ca := certtest.New(t, dir, "redis")
	cert := ca.Server(t, "redis-server", "localhost", "127.0.0.1")
	rd := redistest.ForTest(t, redistest.WithTLS(cert.CertFile, cert.KeyFile, ca.CertFile),
		redistest.WithUser("tidemark", redisUserPassword, redisACL...))
	e := newEnv(t, "")
	e.exec(demo.Schema)
	redisConfig := func(caFile, password string) config.Redis {
		return config.Redis{Addr: rd.Addr(), Username: "tidemark", Password: password,
			TLS: &config.TLS{Enabled: true, CAFile: caFile, ServerName: "localhost"}}
	}
	cfg := invalidationConfig(e, "rtls", rd.Addr(), func(c *config.Config) {
		r := redisConfig(ca.CertFile, redisUserPassword)
		r.Channel = "cache-inval"
		c.Invalidation.Redis = &r
		c.Targets = &config.Targets{Redis: &config.TargetsRedis{Redis: redisConfig(ca.CertFile, redisUserPassword)}}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The user is as narrow as documented: it may not even read a set.
	user := redis.NewClient(&redis.Options{Addr: rd.Addr(), Username: "tidemark", Password: redisUserPassword,
		TLSConfig: rd.TLSConfig(), DisableIdentity: true})
	defer user.Close()
	if err := user.SMembers(ctx, "k").Err(); !redis.IsPermissionError(err) {
		t.Fatalf("SMEMBERS as the tidemark user = %v, want NOPERM (the server's ACL is not the documented one)", err)
	}

	// What cannot heal fails the start, clearly and without the password.
	other := certtest.New(t, t.TempDir(), "other")
	for _, tc := range []struct {
		name    string
		prepare func(*config.Config) error
		mod     func(*config.Config)
		want    []string
	}{
		{
			name:    "invalidation, wrong password",
			prepare: func(c *config.Config) error { _, err := app.PrepareInvalidation(ctx, c, nil); return err },
			mod:     func(c *config.Config) { c.Invalidation.Redis.Password = "wrong-" + redisUserPassword },
			want: []string{"invalidation.redis: redis " + rd.Addr() + ` (user "tidemark"): authentication failed`, "WRONGPASS",
				config.EnvRedisPassword},
		},
		{
			name:    "targets, untrusted CA",
			prepare: func(c *config.Config) error { _, err := app.PrepareTargets(ctx, c, nil); return err },
			mod:     func(c *config.Config) { c.Targets.Redis.TLS.CAFile = other.CertFile },
			want:    []string{"targets.redis: redis " + rd.Addr(), "not signed by a trusted CA", "tls.ca_file"},
		},
	} {
		bad := *cfg
		inv, tg := *cfg.Invalidation, *cfg.Targets
		ir, tr := *inv.Redis, *tg.Redis
		itls, ttls := *ir.TLS, *tr.TLS
		ir.TLS, tr.TLS = &itls, &ttls
		inv.Redis, tg.Redis = &ir, &tr
		bad.Invalidation, bad.Targets = &inv, &tg
		tc.mod(&bad)
		err := tc.prepare(&bad)
		if err == nil {
			t.Errorf("%s: the start succeeded", tc.name)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q lacks %q", tc.name, err, w)
			}
		}
		if strings.Contains(err.Error(), redisUserPassword) {
			t.Errorf("%s: error shows the password: %q", tc.name, err)
		}
	}

	admin := rd.Client()
	sub := admin.Subscribe(ctx, "cache-inval")
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatalf("SUBSCRIBE: %v", err)
	}
	e.start(cfg)
	e.startInvalidation(cfg)
	e.startTargets(cfg)

	cached := []string{"room:!r1:members", "user:@a:rooms", "user:@b:rooms"}
	for _, k := range cached {
		if err := admin.Set(ctx, k, "cached", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	e.exec(`INSERT INTO users(user_id) VALUES ('@a'), ('@b');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'join'), ('!r1', '@b', 'invite')`)
	e.waitTargets(cfg, 30*time.Second)
	waitDeleted := func(keys ...string) {
		t.Helper()
		for {
			n, err := admin.Exists(ctx, keys...).Result()
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				return
			}
			if ctx.Err() != nil {
				t.Fatalf("invalidation: %d of %v not deleted through TLS as the ACL user", n, keys)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitDeleted(cached...)
	if members, err := admin.SMembers(ctx, "notify_targets:!r1").Result(); err != nil || !slices.Equal(members, []string{"@a"}) {
		t.Errorf("targets: set notify_targets:!r1 = %v, %v; want [@a]", members, err)
	}
	published := map[string]bool{}
	for !published["room:!r1:members"] || !published["user:@a:rooms"] {
		msg, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("invalidation: PUBLISH on cache-inval: %v (got %v)", err, published)
		}
		published[msg.Payload] = true
	}

	// A second change: the invite accepted.
	if err := admin.Set(ctx, "user:@b:rooms", "cached", 0).Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`UPDATE room_memberships SET membership = 'join' WHERE room_id = '!r1' AND user_id = '@b'`)
	e.waitTargets(cfg, 30*time.Second)
	members, err := admin.SMembers(ctx, "notify_targets:!r1").Result()
	slices.Sort(members)
	if err != nil || !slices.Equal(members, []string{"@a", "@b"}) {
		t.Errorf("targets: set notify_targets:!r1 = %v, %v; want [@a @b]", members, err)
	}
	waitDeleted("user:@b:rooms")
}
