// Package redistest runs a throwaway redis-server for tests and demos.
//
// Start runs the real `redis-server` binary (found on PATH, else
// /usr/bin/redis-server) in its own process group, listening only on
// 127.0.0.1 on a free TCP port — never the machine-wide server on 6379 —
// with persistence off (`--save "" --appendonly no`) and a fresh temporary
// working directory. It returns once PING answers and the answering server
// is the process it started. Stop shuts it down and removes the directory.
//
// For failure tests, Halt stops the process but keeps the address, Restart
// starts a fresh, empty server on the same port, and Freeze/Thaw suspend
// and resume it (a server that accepts connections but never answers).
//
// Like a managed Redis, it can accept only TLS connections (WithTLS) and
// have ACL users (WithUser), the default user then being password
// protected (Client knows the password).
//
// Tests should normally use ForTest (see testing.go) rather than Start.
package redistest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/tidemark/tidemark/internal/freeport"
)

const (
	readyTimeout    = 10 * time.Second
	stopGracePeriod = 5 * time.Second
	startAttempts   = 5 // retries when the chosen port was taken in the meantime
	logTailBytes    = 4096
	defaultBinary   = "/usr/bin/redis-server"
)

// errNotInstalled reports that no redis-server binary was found.
var errNotInstalled = errors.New("redistest: redis-server not found on PATH or at " + defaultBinary + "; install the redis-server package")

// errPortInUse reports that redis-server could not bind its port.
var errPortInUse = errors.New("port in use")

// errStopped is returned by methods called after Stop.
var errStopped = errors.New("redistest: server stopped")

// Server is a throwaway redis-server started by Start. Its methods are safe
// for concurrent use.
type Server struct {
	bin  string
	port int // fixed for the Server's life; Restart reuses it
	opts options

	mu      sync.Mutex
	proc    *process // nil while halted
	client  *redis.Client
	stopped bool
	stopErr error
}

// process is one run of redis-server.
type process struct {
	cmd     *exec.Cmd
	dir     string // --dir, removed when the process is gone
	out     *tailBuffer
	done    chan struct{} // closed once cmd.Wait returns
	waitErr error         // valid after done is closed
}

// Option configures Start and ForTest.
type Option func(*options)

type options struct {
	tls           *tlsFiles
	users         []user
	adminPassword string // the default user's, when there are users
}

type tlsFiles struct{ cert, key, ca string }

type user struct {
	name, password string
	rules          []string
}

// WithTLS makes the server accept only TLS connections on its port
// (--port 0 --tls-port PORT), with the PEM server certificate and key
// certFile and keyFile, which must be valid for 127.0.0.1. caFile is the
// PEM CA that signs it: the server is given it (--tls-ca-cert-file) but
// asks clients for no certificate (--tls-auth-clients no), and Client
// trusts it.
func WithTLS(certFile, keyFile, caFile string) Option {
	return func(o *options) { o.tls = &tlsFiles{cert: certFile, key: keyFile, ca: caFile} }
}

// WithUser adds the ACL user name, enabled, with password and rules in
// ACL SETUSER syntax (e.g. "~*", "-@all", "+del"; none: no permissions).
// With users, the default user keeps every permission but needs a random
// password, which Client uses. Names, passwords and rules must not contain
// spaces.
func WithUser(name, password string, rules ...string) Option {
	return func(o *options) { o.users = append(o.users, user{name: name, password: password, rules: rules}) }
}

// Start starts a redis-server on a free port of 127.0.0.1 and returns once
// it answers PING (or fails after 10 seconds, with the tail of the server's
// output in the error). ctx bounds the start only. The caller must call Stop.
func Start(ctx context.Context, opts ...Option) (*Server, error) {
	bin, err := findBinary()
	if err != nil {
		return nil, err
	}
	s := &Server{bin: bin}
	for _, o := range opts {
		o(&s.opts)
	}
	if len(s.opts.users) > 0 {
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		s.opts.adminPassword = hex.EncodeToString(b)
	}
	if _, err := s.opts.clientTLS(); err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		if s.port, err = freeport.Get(); err != nil {
			return nil, err
		}
		p, err := s.run(ctx)
		if err == nil {
			s.proc = p
			return s, nil
		}
		if !errors.Is(err, errPortInUse) || attempt >= startAttempts {
			return nil, err
		}
	}
}

// Addr returns the server's address, 127.0.0.1:PORT. It does not change
// across Halt and Restart.
func (s *Server) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

// Port returns the TCP port the server listens on (on 127.0.0.1).
func (s *Server) Port() int { return s.port }

// Client returns a go-redis client for the server, created on first use and
// shared by later calls: over TLS with WithTLS, as the default user (with
// every permission) with WithUser. It honours context deadlines. The
// Server owns it: do not Close it; Stop does. It reconnects by itself after
// Restart.
func (s *Server) Client() *redis.Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client == nil {
		s.client = s.newClient()
	}
	return s.client
}

// TLSConfig returns a client TLS configuration trusting the CA given to
// WithTLS (nil without WithTLS).
func (s *Server) TLSConfig() *tls.Config {
	c, _ := s.opts.clientTLS()
	return c
}

func (o *options) clientTLS() (*tls.Config, error) {
	if o.tls == nil {
		return nil, nil
	}
	pem, err := os.ReadFile(o.tls.ca)
	if err != nil {
		return nil, fmt.Errorf("redistest: CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("redistest: no PEM certificate in %s", o.tls.ca)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// Stop shuts the server down (SIGTERM to its process group; after 5 seconds
// SIGKILL), closes the Client and removes the temporary directory. It is
// idempotent: later calls return the first call's result.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return s.stopErr
	}
	s.stopped = true
	var errs []error
	if s.client != nil {
		_ = s.client.Close() // its error only says it was closed already
		s.client = nil
	}
	if s.proc != nil {
		errs = append(errs, s.proc.stop())
		s.proc = nil
	}
	s.stopErr = errors.Join(errs...)
	return s.stopErr
}

// Halt stops the redis-server process like Stop, but keeps the Server:
// Addr stays the same and Restart starts a new process on it. Halting a
// halted server does nothing. Stop is still required afterwards.
func (s *Server) Halt() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errStopped
	}
	if s.proc == nil {
		return nil
	}
	err := s.proc.stop()
	s.proc = nil
	return err
}

// Restart halts the server if it is running, then starts a fresh, empty
// redis-server on the same port and waits until it answers PING. It fails
// if another process took the port in the meantime.
func (s *Server) Restart(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errStopped
	}
	if s.proc != nil {
		if err := s.proc.stop(); err != nil {
			return err
		}
		s.proc = nil
	}
	p, err := s.run(ctx)
	if err != nil {
		return err
	}
	s.proc = p
	return nil
}

// Freeze suspends the server process (SIGSTOP): connections are still
// accepted by the kernel, but nothing is answered until Thaw.
func (s *Server) Freeze() error { return s.signal(syscall.SIGSTOP) }

// Thaw resumes a server suspended by Freeze (SIGCONT).
func (s *Server) Thaw() error { return s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errStopped
	}
	if s.proc == nil {
		return errors.New("redistest: server halted")
	}
	if err := syscall.Kill(-s.proc.cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("redistest: signal %v to redis-server: %w", sig, err)
	}
	return nil
}

// run starts redis-server on s.port in a new temp dir and waits until it is
// ready. On failure the process and its directory are gone when it returns.
func (s *Server) run(ctx context.Context) (_ *process, err error) {
	dir, err := os.MkdirTemp("", "tidemark-redis-")
	if err != nil {
		return nil, fmt.Errorf("redistest: create temp dir: %w", err)
	}
	p := &process{dir: dir, out: &tailBuffer{max: logTailBytes}, done: make(chan struct{})}
	var args []string
	if len(s.opts.users) > 0 {
		// In a file, not on the command line, which ps shows.
		conf := filepath.Join(dir, "users.conf")
		lines := []string{"user default on >" + s.opts.adminPassword + " ~* &* +@all"}
		for _, u := range s.opts.users {
			lines = append(lines, "user "+strings.Join(append([]string{u.name, "on", ">" + u.password}, u.rules...), " "))
		}
		if err := os.WriteFile(conf, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			_ = os.RemoveAll(dir)
			return nil, fmt.Errorf("redistest: write %s: %w", conf, err)
		}
		args = append(args, conf)
	}
	if t := s.opts.tls; t != nil {
		args = append(args, "--port", "0", "--tls-port", strconv.Itoa(s.port),
			"--tls-cert-file", t.cert, "--tls-key-file", t.key, "--tls-ca-cert-file", t.ca, "--tls-auth-clients", "no")
	} else {
		args = append(args, "--port", strconv.Itoa(s.port))
	}
	args = append(args,
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--daemonize", "no",
	)
	cmd := exec.Command(s.bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.WaitDelay = time.Second // do not wait forever for the output pipe
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// If this process dies without calling Stop (crash, test timeout),
		// redis-server goes too. Its data is throwaway.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("redistest: start %s: %w", s.bin, err)
	}
	p.cmd = cmd
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()

	if err := p.waitReady(ctx, s.Addr(), s.newClient); err != nil {
		_ = p.stop()
		out := p.out.String()
		if strings.Contains(out, "Address already in use") {
			return nil, fmt.Errorf("%w: %v", errPortInUse, err)
		}
		return nil, fmt.Errorf("%w\n--- redis-server output (tail) ---\n%s", err, out)
	}
	return p, nil
}

// waitReady waits until the port accepts connections and PING answers, and
// checks that the server answering is this process.
func (p *process) waitReady(ctx context.Context, addr string, newClient func() *redis.Client) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	c := newClient()
	defer c.Close()
	var lastErr error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("redistest: redis-server exited during startup: %v", p.waitErr)
		default:
		}
		// A plain TCP probe first: go-redis logs every failed dial to stderr.
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			_ = conn.Close()
			err = c.Ping(ctx).Err()
		}
		if err == nil {
			err = p.checkOwner(ctx, c)
			if err == nil {
				return nil
			}
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("redistest: redis-server not ready on %s: %v (last error: %v)", addr, ctx.Err(), lastErr)
		case <-p.done: // loop around to report the exit
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkOwner verifies that the server answering PING is our process and
// not, say, someone else's that grabbed the port.
func (p *process) checkOwner(ctx context.Context, c *redis.Client) error {
	info, err := c.Info(ctx, "server").Result()
	if err != nil {
		return err
	}
	want := "process_id:" + strconv.Itoa(p.cmd.Process.Pid)
	for _, line := range strings.Split(info, "\n") {
		if strings.TrimSpace(line) == want {
			return nil
		}
	}
	return fmt.Errorf("a different redis-server (not pid %d) answers", p.cmd.Process.Pid)
}

// stop ends the process (SIGTERM to its group, SIGKILL after the grace
// period) and removes its directory.
func (p *process) stop() error {
	var errs []error
	select {
	case <-p.done:
	default:
		pgid := -p.cmd.Process.Pid // not reaped yet, so the pid cannot be reused
		_ = syscall.Kill(pgid, syscall.SIGTERM)
		_ = syscall.Kill(pgid, syscall.SIGCONT) // in case it is frozen
		select {
		case <-p.done:
		case <-time.After(stopGracePeriod):
			errs = append(errs, fmt.Errorf("redistest: redis-server did not exit within %v of SIGTERM; killed", stopGracePeriod))
			_ = syscall.Kill(pgid, syscall.SIGKILL)
			<-p.done
		}
	}
	if err := os.RemoveAll(p.dir); err != nil {
		errs = append(errs, fmt.Errorf("redistest: remove %s: %w", p.dir, err))
	}
	return errors.Join(errs...)
}

// newClient returns a client that honours context deadlines and does not
// probe for features a throwaway server lacks, over TLS and as the
// password-protected default user when the server has them.
func (s *Server) newClient() *redis.Client {
	tlsConfig, _ := s.opts.clientTLS() // checked by Start
	return redis.NewClient(&redis.Options{
		Addr:                     s.Addr(),
		Password:                 s.opts.adminPassword,
		TLSConfig:                tlsConfig,
		ContextTimeoutEnabled:    true,
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
}

// findBinary returns the path of redis-server.
func findBinary() (string, error) {
	if p, err := exec.LookPath("redis-server"); err == nil {
		return p, nil
	}
	if fi, err := os.Stat(defaultBinary); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
		return defaultBinary, nil
	}
	return "", errNotInstalled
}

// tailBuffer keeps roughly the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > 2*t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

// String returns the last max bytes written.
func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.b
	if len(b) > t.max {
		b = b[len(b)-t.max:]
	}
	return string(b)
}
