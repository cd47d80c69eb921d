package e2e

import (
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
)

// freezingProxy forwards TCP connections to a target until freeze, after
// which the connections open at that moment forward nothing more in either
// direction while staying open (a proxy or NAT that silently stopped
// forwarding); later connections are forwarded normally.
type freezingProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []*proxied
}

type proxied struct {
	frozen atomic.Bool
	a, b   net.Conn
}

func startFreezingProxy(t *testing.T, target string) *freezingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezingProxy{ln: ln, target: target}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			pc := &proxied{a: c, b: u}
			p.mu.Lock()
			p.conns = append(p.conns, pc)
			p.mu.Unlock()
			go pc.pump(c, u)
			go pc.pump(u, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, pc := range p.conns {
			pc.a.Close()
			pc.b.Close()
		}
	})
	return p
}

// pump copies src to dst until either closes; once frozen, it drops what it
// reads (the peer never sees it) without closing anything.
func (pc *proxied) pump(src, dst net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !pc.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // closed (io.EOF or a reset)
		}
	}
}

func (p *freezingProxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pc := range p.conns {
		pc.frozen.Store(true)
	}
}

// TestHalfOpenReplicationConnection: a replication connection that stays
// open but carries nothing more (the proxy in between stopped forwarding)
// is noticed: after 2 x standby_interval of silence capture asks the server
// for a reply, and when none comes and the silence reaches the larger of 3 x
// standby_interval and wal_sender_timeout + standby_interval, it drops the
// connection and reconnects; changes committed meanwhile arrive.
// On a healthy idle connection the same request is answered and nothing is
// dropped.
func TestHalfOpenReplicationConnection(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	u, err := url.Parse(e.dsn)
	if err != nil {
		t.Fatal(err)
	}
	proxy := startFreezingProxy(t, u.Host)
	u.Host = proxy.ln.Addr().String()
	cfg := e.config("halfopen", []string{"public.notes"}, nil)
	cfg.Postgres.DSN = u.String()
	standby := cfg.Postgres.StandbyInterval
	r, logs := e.startObserved(cfg)
	e.exec(`INSERT INTO notes VALUES (1, 'before')`)
	e.waitRecords("halfopen.public.notes", 1, 20*time.Second)

	// Idle and healthy: requests for a reply are answered.
	st := r.Stream.Stats()
	for deadline := time.Now().Add(10 * standby); st.Probes.Load() < 2; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d keepalive requests in %s of idleness, want 2", st.Probes.Load(), 10*standby)
		}
	}
	if n := st.Reconnects.Load(); n != 0 {
		t.Fatalf("%d reconnects on a healthy idle connection", n)
	}

	proxy.freeze()
	frozen := time.Now()
	for deadline := frozen.Add(10 * standby); st.Reconnects.Load() == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a silent connection was not dropped within %s (keepalive requests: %d)", 10*standby, st.Probes.Load())
		}
	}
	// Documented bound: the larger of 3 x standby and the server's
	// wal_sender_timeout (5s here) + standby, plus a second of scheduling;
	// and not before the server's timeout (a busy walsender may stay
	// silent that long; the silence may have begun up to 2 x standby
	// before the freeze, when the last reply arrived).
	bound := max(3*standby, 5*time.Second+standby)
	d := time.Since(frozen)
	if d > bound+time.Second || d < 5*time.Second-2*standby {
		t.Errorf("half-open connection dropped after %s, want between %s and %s", d.Round(time.Millisecond), 5*time.Second-2*standby, bound+time.Second)
	}
	t.Logf("half-open connection dropped %s after the freeze (documented bound %s, keepalive requests %d)", d.Round(time.Millisecond), bound, st.Probes.Load())
	if w := warnings(logs, "reconnecting"); len(w) == 0 {
		t.Errorf("no warning when the half-open connection was dropped")
	}
	e.exec(`INSERT INTO notes VALUES (2, 'after the freeze')`)
	ids := map[int]bool{}
	for _, m := range e.waitRecords("halfopen.public.notes", 2, 60*time.Second) {
		ids[afterID(t, m)] = true
	}
	if !ids[1] || !ids[2] {
		t.Errorf("rows %v in the topic, want 1 and 2", ids)
	}
	t.Logf("the row committed after the reconnect arrived %s after the freeze", time.Since(frozen).Round(time.Millisecond))
}

// TestStandbyIntervalClampedToSenderTimeout: a standby_interval longer than
// a third of the server's wal_sender_timeout (5s on the test server) is
// used as that third, with one warning naming both, so the server never
// times the connection out between two status messages, nor has to ask for
// one (it asks after half its timeout without a word: capture may not be
// reading then, e.g. while it waits for a full pipeline).
func TestStandbyIntervalClampedToSenderTimeout(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	cfg := e.config("clamp", []string{"public.notes"}, func(c *config.Config) { c.Postgres.StandbyInterval = 10 * time.Second })
	r, logs := e.startObserved(cfg)
	for deadline := time.Now().Add(20 * time.Second); !r.Stream.Stats().Connected.Load(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("capture did not connect")
		}
	}
	w := warnings(logs, "more than a third of the server's wal_sender_timeout")
	if len(w) != 1 {
		t.Fatalf("%d clamp warnings, want 1", len(w))
	}
	f := w[0].ContextMap()
	if f["standby_interval"] != 10*time.Second || f["wal_sender_timeout"] != 5*time.Second || f["using"] != 5*time.Second/3 {
		t.Errorf("clamp warning fields %v", f)
	}
	// Idle for longer than the server's timeout: status messages keep the
	// connection alive (no reconnect), without the server asking for them.
	sent := r.Stream.Stats().StatusUpdates.Load()
	asked := r.Stream.Stats().ReplyRequests.Load()
	for deadline := time.Now().Add(20 * time.Second); r.Stream.Stats().StatusUpdates.Load() < sent+4; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d status messages in 20s", r.Stream.Stats().StatusUpdates.Load()-sent)
		}
	}
	if n := r.Stream.Stats().Reconnects.Load(); n != 0 {
		t.Errorf("%d reconnects while idle", n)
	}
	if n := r.Stream.Stats().ReplyRequests.Load() - asked; n != 0 {
		t.Errorf("the server asked for a status %d times while idle: status messages are not sent every third of its wal_sender_timeout", n)
	}
}
