package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tidemark/tidemark/internal/certtest"
)

func TestStartStop(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Start(ctx)
	if err != nil {
		unavailable(t, "%v", err)
	}
	host, port, err := net.SplitHostPort(s.Addr())
	if err != nil || host != "127.0.0.1" || port == "6379" || port != fmt.Sprint(s.Port()) {
		t.Fatalf("Addr() = %q, want 127.0.0.1 on a free port (not 6379)", s.Addr())
	}
	pid, dir := s.proc.cmd.Process.Pid, s.proc.dir

	c := s.Client()
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("GET = %q, %v; want v", got, err)
	}
	if got, err := c.ConfigGet(ctx, "save").Result(); err != nil || got["save"] != "" {
		t.Errorf("CONFIG GET save = %v, %v; want persistence off", got, err)
	}

	if err := s.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("redis-server pid %d still exists after Stop (kill 0: %v)", pid, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("temp dir %s still exists after Stop (stat: %v)", dir, err)
	}
	if err := s.Restart(ctx); err == nil {
		t.Errorf("Restart after Stop succeeded, want an error")
	}
}

func TestHaltRestart(t *testing.T) {
	s := ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr := s.Addr()
	c := s.Client()
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}

	if err := s.Halt(); err != nil {
		t.Fatalf("Halt: %v", err)
	}
	if err := s.Halt(); err != nil {
		t.Fatalf("second Halt: %v", err)
	}
	if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		conn.Close()
		t.Fatalf("%s still accepts connections after Halt", addr)
	}

	if err := s.Restart(ctx); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	if s.Addr() != addr {
		t.Fatalf("Addr after Restart = %s, want %s", s.Addr(), addr)
	}
	// The shared client reconnects by itself; the new server starts empty.
	if n, err := c.Exists(ctx, "k").Result(); err != nil || n != 0 {
		t.Fatalf("EXISTS k after Restart = %d, %v; want 0, nil", n, err)
	}
}

func TestFreezeThaw(t *testing.T) {
	s := ForTest(t)
	c := s.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING: %v", err)
	}
	if err := s.Freeze(); err != nil {
		t.Fatalf("Freeze: %v", err)
	}
	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	start := time.Now()
	err := c.Ping(short).Err()
	cancelShort()
	if err == nil {
		t.Fatalf("PING to a frozen server succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("PING to a frozen server took %v despite a 200ms deadline", d)
	}
	if err := s.Thaw(); err != nil {
		t.Fatalf("Thaw: %v", err)
	}
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING after Thaw: %v", err)
	}
}

// A server frozen at Stop still goes away (SIGCONT follows SIGTERM).
func TestStopFrozen(t *testing.T) {
	s := ForTest(t)
	if err := s.Freeze(); err != nil {
		t.Fatalf("Freeze: %v", err)
	}
	start := time.Now()
	if err := s.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Stop of a frozen server took %v", d)
	}
}

func TestTailBuffer(t *testing.T) {
	b := &tailBuffer{max: 4}
	for _, s := range []string{"ab", "cdef", "ghijklmnop", "q"} {
		b.Write([]byte(s))
	}
	if got := b.String(); got != "nopq" {
		t.Fatalf("tail = %q, want %q", got, "nopq")
	}
}

// recordTB captures Skipf/Fatalf instead of acting on them.
type recordTB struct {
	testing.TB
	skipped, failed string
}

func (r *recordTB) Helper()                           {}
func (r *recordTB) Skipf(format string, args ...any)  { r.skipped = fmt.Sprintf(format, args...) }
func (r *recordTB) Fatalf(format string, args ...any) { r.failed = fmt.Sprintf(format, args...) }

func TestUnavailable(t *testing.T) {
	for _, tc := range []struct {
		ci                 string
		wantSkip, wantFail bool
	}{
		{ci: "", wantSkip: true},
		{ci: "false", wantSkip: true},
		{ci: "true", wantFail: true},
	} {
		t.Run("CI="+tc.ci, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			r := &recordTB{TB: t}
			unavailable(r, "no server: %v", errNotInstalled)
			if (r.skipped != "") != tc.wantSkip || (r.failed != "") != tc.wantFail {
				t.Fatalf("skipped=%q failed=%q; want skip=%v fail=%v", r.skipped, r.failed, tc.wantSkip, tc.wantFail)
			}
			if msg := r.skipped + r.failed; !strings.Contains(msg, "redis-server not found") {
				t.Errorf("message %q does not carry the reason", msg)
			}
		})
	}
}

// WithTLS and WithUser: only TLS connections are accepted, the ACL user
// has exactly its rules, the default user needs the password Client has,
// and Restart keeps all of it.
func TestTLSAndUser(t *testing.T) {
	dir := t.TempDir()
	ca := certtest.New(t, dir, "redistest")
	cert := ca.Server(t, "redis", "127.0.0.1")
	s := ForTest(t, WithTLS(cert.CertFile, cert.KeyFile, ca.CertFile), WithUser("app", "app-pw", "~*", "-@all", "+del"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	check := func() {
		t.Helper()
		if err := s.Client().Set(ctx, "k", "v", 0).Err(); err != nil {
			t.Fatalf("SET through Client: %v", err)
		}
		user := redis.NewClient(&redis.Options{Addr: s.Addr(), Username: "app", Password: "app-pw", TLSConfig: s.TLSConfig(), DisableIdentity: true})
		defer user.Close()
		if n, err := user.Del(ctx, "k").Result(); err != nil || n != 1 {
			t.Fatalf("DEL as app = %d, %v; want 1", n, err)
		}
		if err := user.Set(ctx, "k", "v", 0).Err(); !redis.IsPermissionError(err) {
			t.Fatalf("SET as app = %v, want NOPERM", err)
		}
		anon := redis.NewClient(&redis.Options{Addr: s.Addr(), TLSConfig: s.TLSConfig(), DisableIdentity: true})
		defer anon.Close()
		if err := anon.Set(ctx, "k", "v", 0).Err(); !redis.IsAuthError(err) {
			t.Fatalf("SET without a password = %v, want NOAUTH", err)
		}
		plain := redis.NewClient(&redis.Options{Addr: s.Addr(), Username: "app", Password: "app-pw", MaxRetries: -1, DisableIdentity: true})
		defer plain.Close()
		if err := plain.Del(ctx, "k").Err(); err == nil {
			t.Fatalf("a plaintext connection was served")
		}
	}
	check()
	if err := s.Restart(ctx); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	check()
}
