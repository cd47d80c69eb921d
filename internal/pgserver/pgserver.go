// Package pgserver runs a throwaway PostgreSQL server for tests and demos.
//
// Start runs initdb into a fresh temporary directory and then starts the
// `postgres` binary directly, listening only on 127.0.0.1 on a free TCP port
// (never the machine-wide server on 5432) with wal_level=logical and
// durability switched off for speed. Stop shuts it down and removes every
// temporary file.
//
// The PostgreSQL binaries are looked up on PATH first and then in
// /usr/lib/postgresql/*/bin (highest major version wins), which is where
// Debian and Ubuntu install them. When the current process runs as root,
// initdb and postgres are run as the `postgres` OS user, because initdb
// refuses to run as root.
//
// With Options.TLS the server also accepts TLS connections (ssl=on) with
// the given certificate; pg_hba.conf, which Start writes, lets in both plain
// and TLS connections (host and hostssl, also for replication) from
// 127.0.0.1 and ::1 without a password, after any Options.HBA lines.
//
// Tests should normally use ForTest (see testing.go) rather than Start.
package pgserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tidemark/tidemark/internal/freeport"
)

const (
	readyTimeout    = 60 * time.Second
	stopGracePeriod = 10 * time.Second
	startAttempts   = 5 // retries when the chosen port was taken in the meantime
	logTailBytes    = 4096
	maxSocketPath   = 100 // sun_path is 108 bytes on Linux; leave some slack
)

// Options configures Start. The zero value gives the defaults.
type Options struct {
	// Logf, if non-nil, receives progress messages (binary location, data
	// directory, port, shutdown).
	Logf func(format string, args ...any)

	// ExtraConfig holds additional server settings, passed as
	// `-c key=value` after the defaults, so they can also override them.
	ExtraConfig map[string]string

	// TLS, if non-nil, turns TLS on (ssl=on) with these files.
	TLS *TLS

	// HBA holds pg_hba.conf lines put before the defaults (the first
	// matching line wins), e.g. to require TLS and a password of a role:
	//
	//	hostssl   all  app  127.0.0.1/32  scram-sha-256
	//	hostnossl all  app  all           reject
	HBA []string
}

// TLS names the PEM files of a server certificate. Start copies them into
// the data directory, the key readable only by the server's OS user (else
// Postgres refuses to start), so they may live anywhere readable by the
// current process.
type TLS struct {
	// CertFile and KeyFile are the server certificate (with any
	// intermediates) and its private key (required).
	CertFile, KeyFile string
	// CAFile, if set, becomes ssl_ca_file: the CAs whose client
	// certificates the server accepts (pg_hba's clientcert and cert).
	CAFile string
}

// Server is a running throwaway PostgreSQL server started by Start.
// Its methods are safe for concurrent use.
type Server struct {
	port    int
	baseDir string // temp dir holding data/, the log file and (usually) the socket dir
	dataDir string
	sockDir string // may be a separate temp dir if baseDir is too long for a socket path
	logPath string
	logf    func(format string, args ...any)

	cmd     *exec.Cmd
	done    chan struct{} // closed once cmd.Wait returns
	waitErr error         // valid after done is closed

	stopOnce sync.Once
	stopErr  error
}

// Start creates a fresh cluster with initdb and starts a postgres server on
// a free port of 127.0.0.1. It returns once the server accepts connections
// (or fails after 60 seconds, with the tail of the server log in the error).
// The caller must call Stop to shut the server down and delete its files.
func Start(ctx context.Context, opts Options) (_ *Server, err error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}

	binDir, err := findBinDir()
	if err != nil {
		return nil, err
	}
	logf("pgserver: using PostgreSQL binaries in %s", binDir)

	cred, owner, err := runAsCredential()
	if err != nil {
		return nil, err
	}

	s := &Server{logf: logf}
	defer func() {
		if err != nil {
			s.removeDirs()
		}
	}()

	if s.baseDir, err = os.MkdirTemp(os.TempDir(), "tidemark-pg-"); err != nil {
		return nil, fmt.Errorf("pgserver: create temp dir: %w", err)
	}
	s.dataDir = filepath.Join(s.baseDir, "data")
	s.sockDir = filepath.Join(s.baseDir, "sock")
	s.logPath = filepath.Join(s.baseDir, "postgres.log")
	if len(s.sockDir)+len("/.s.PGSQL.65535") > maxSocketPath {
		// os.TempDir() is too deep for a Unix socket path; fall back to /tmp.
		if s.sockDir, err = os.MkdirTemp("/tmp", "tmpg-"); err != nil {
			return nil, fmt.Errorf("pgserver: create socket dir: %w", err)
		}
	} else if err = os.Mkdir(s.sockDir, 0o700); err != nil {
		return nil, fmt.Errorf("pgserver: create socket dir: %w", err)
	}
	if err = os.Mkdir(s.dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("pgserver: create data dir: %w", err)
	}
	if owner != nil {
		for _, dir := range []string{s.baseDir, s.dataDir, s.sockDir} {
			if err = os.Chown(dir, owner.uid, owner.gid); err != nil {
				return nil, fmt.Errorf("pgserver: chown %s to %s: %w", dir, owner.name, err)
			}
		}
	}
	logFile, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("pgserver: create log file: %w", err)
	}
	defer logFile.Close() // the child processes keep their own copies

	// initdb
	logf("pgserver: initdb %s", s.dataDir)
	initdb := exec.CommandContext(ctx, filepath.Join(binDir, "initdb"),
		"-D", s.dataDir, "-U", "postgres", "-A", "trust", "-E", "UTF8",
		"--locale=C", "--no-sync")
	initdb.Dir = s.baseDir
	initdb.Env = childEnv()
	initdb.Stdout, initdb.Stderr = logFile, logFile
	initdb.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	if err = initdb.Run(); err != nil {
		return nil, fmt.Errorf("pgserver: initdb failed: %w\n%s", err, s.logTail())
	}
	if err = s.writeHBA(opts.HBA, owner); err != nil {
		return nil, err
	}
	settings := map[string]string{}
	if opts.TLS != nil {
		if settings, err = s.installTLS(*opts.TLS, owner); err != nil {
			return nil, err
		}
	}
	for k, v := range opts.ExtraConfig {
		settings[k] = v
	}

	// postgres; retried with a new port if another process grabbed ours.
	for attempt := 1; ; attempt++ {
		err = s.startPostgres(ctx, binDir, cred, logFile, settings)
		if err == nil {
			logf("pgserver: PostgreSQL ready on 127.0.0.1:%d (data %s)", s.port, s.dataDir)
			return s, nil
		}
		if !errors.Is(err, errPortInUse) || attempt >= startAttempts {
			return nil, err
		}
		logf("pgserver: port %d was taken, retrying with another port", s.port)
	}
}

var errPortInUse = errors.New("port in use")

// writeHBA replaces initdb's pg_hba.conf: the extra lines first, then
// passwordless local, host and hostssl connections (and replication) from
// 127.0.0.1 and ::1. (host matches TLS connections too; the hostssl lines
// say so explicitly for the lines above them that use hostnossl.)
func (s *Server) writeHBA(extra []string, owner *osUser) error {
	var b strings.Builder
	b.WriteString("# written by tidemark's pgserver\n")
	for _, l := range extra {
		b.WriteString(l + "\n")
	}
	b.WriteString("local all all trust\nlocal replication all trust\n")
	for _, typ := range []string{"hostssl", "host"} {
		for _, db := range []string{"all", "replication"} {
			for _, addr := range []string{"127.0.0.1/32", "::1/128"} {
				fmt.Fprintf(&b, "%s %s all %s trust\n", typ, db, addr)
			}
		}
	}
	return s.writeOwned("pg_hba.conf", []byte(b.String()), 0o600, owner)
}

// installTLS copies the TLS files into the data directory and returns the
// settings that use them.
func (s *Server) installTLS(t TLS, owner *osUser) (map[string]string, error) {
	if t.CertFile == "" || t.KeyFile == "" {
		return nil, errors.New("pgserver: TLS needs both CertFile and KeyFile")
	}
	settings := map[string]string{"ssl": "on"}
	for _, f := range []struct{ setting, from, to string }{
		{"ssl_cert_file", t.CertFile, "server.crt"},
		{"ssl_key_file", t.KeyFile, "server.key"},
		{"ssl_ca_file", t.CAFile, "root.crt"},
	} {
		if f.from == "" {
			continue
		}
		b, err := os.ReadFile(f.from)
		if err != nil {
			return nil, fmt.Errorf("pgserver: TLS: %w", err)
		}
		// The key must be 0600 (or 0640 owned by root) and owned by the
		// server's user; the rest may be too.
		if err := s.writeOwned(f.to, b, 0o600, owner); err != nil {
			return nil, err
		}
		settings[f.setting] = filepath.Join(s.dataDir, f.to)
	}
	return settings, nil
}

// writeOwned writes name in the data directory with mode perm, owned by
// the server's OS user.
func (s *Server) writeOwned(name string, b []byte, perm os.FileMode, owner *osUser) error {
	path := filepath.Join(s.dataDir, name)
	if err := os.WriteFile(path, b, perm); err != nil {
		return fmt.Errorf("pgserver: write %s: %w", path, err)
	}
	if err := os.Chmod(path, perm); err != nil { // WriteFile keeps an existing file's mode
		return fmt.Errorf("pgserver: chmod %s: %w", path, err)
	}
	if owner != nil {
		if err := os.Chown(path, owner.uid, owner.gid); err != nil {
			return fmt.Errorf("pgserver: chown %s to %s: %w", path, owner.name, err)
		}
	}
	return nil
}

// startPostgres starts the postmaster on a fresh port and waits until it is
// ready. On failure the process is gone when it returns.
func (s *Server) startPostgres(ctx context.Context, binDir string, cred *syscall.Credential, logFile *os.File, extra map[string]string) error {
	port, err := freeport.Get()
	if err != nil {
		return err
	}
	s.port = port
	logStart := fileSize(s.logPath)

	args := []string{
		"-D", s.dataDir,
		"-p", strconv.Itoa(port),
		"-k", s.sockDir,
		"-c", "listen_addresses=127.0.0.1",
		"-c", "wal_level=logical",
		"-c", "max_replication_slots=50",
		"-c", "max_wal_senders=50",
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "shared_buffers=128MB",
		"-c", "max_connections=200",
		// Short, so tests notice a client that stops answering keepalives.
		"-c", "wal_sender_timeout=5s",
	}
	keys := make([]string, 0, len(extra))
	for k := range extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "-c", k+"="+extra[k])
	}

	cmd := exec.Command(filepath.Join(binDir, "postgres"), args...)
	cmd.Dir = s.baseDir
	cmd.Env = childEnv()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:    true,
		Credential: cred,
		// If this process dies without calling Stop (crash, test timeout),
		// the postmaster does an immediate shutdown instead of lingering.
		Pdeathsig: syscall.SIGQUIT,
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("pgserver: start postgres: %w", err)
	}
	s.cmd = cmd
	s.done = make(chan struct{})
	go func() {
		s.waitErr = cmd.Wait()
		close(s.done)
	}()

	if err := s.waitReady(ctx); err != nil {
		s.kill()
		newLog := s.logSince(logStart)
		if strings.Contains(newLog, "could not bind") || strings.Contains(newLog, "could not create any TCP/IP sockets") {
			_ = os.Remove(filepath.Join(s.dataDir, "postmaster.pid"))
			return fmt.Errorf("%w: %v", errPortInUse, err)
		}
		return fmt.Errorf("%w\n--- postgres log (tail) ---\n%s", err, s.logTail())
	}
	return nil
}

// waitReady polls until the server accepts connections and is really ours.
func (s *Server) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	wantDir, _ := filepath.EvalSymlinks(s.dataDir)
	dsn := s.DSN("postgres") + "&connect_timeout=2"
	var lastErr error
	for {
		select {
		case <-s.done:
			return fmt.Errorf("pgserver: postgres exited during startup: %v", s.waitErr)
		default:
		}
		conn, err := pgconn.Connect(ctx, dsn)
		if err == nil {
			res, qerr := conn.Exec(ctx, "SHOW data_directory").ReadAll()
			_ = conn.Close(context.Background())
			if qerr != nil {
				lastErr = qerr
			} else if len(res) == 1 && len(res[0].Rows) == 1 {
				got := string(res[0].Rows[0][0])
				if g, _ := filepath.EvalSymlinks(got); g == wantDir || got == s.dataDir {
					return nil
				}
				// Someone else's server answered on our port: ours must have
				// failed to bind. Let the done/log check above report it.
				lastErr = fmt.Errorf("a different server (data_directory %s) answers on port %d", got, s.port)
			}
		} else {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgserver: postgres not ready on port %d: %v (last error: %v)", s.port, ctx.Err(), lastErr)
		case <-s.done:
			// loop around to report the exit
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// DSN returns a connection string for database on this server, connecting
// as the superuser "postgres" over TCP without a password:
// postgres://postgres@127.0.0.1:PORT/DATABASE?sslmode=disable
func (s *Server) DSN(database string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)),
		Path:     "/" + database,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// CreateDatabase creates the database name (quoted as an identifier, so any
// name is allowed) and returns its DSN.
func (s *Server) CreateDatabase(ctx context.Context, name string) (dsn string, err error) {
	conn, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		return "", fmt.Errorf("pgserver: connect: %w", err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", fmt.Errorf("pgserver: create database %q: %w", name, err)
	}
	return s.DSN(name), nil
}

// Port returns the TCP port the server listens on (on 127.0.0.1).
func (s *Server) Port() int { return s.port }

// Stop shuts the server down (fast shutdown: SIGINT to the postmaster; after
// 10 seconds the whole process group is killed) and removes the temporary
// directories. It is idempotent: later calls return the first call's result.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		if s.cmd != nil {
			select {
			case <-s.done:
			default:
				s.logf("pgserver: stopping PostgreSQL on port %d", s.port)
				_ = s.cmd.Process.Signal(syscall.SIGINT)
				select {
				case <-s.done:
				case <-time.After(stopGracePeriod):
					s.stopErr = fmt.Errorf("pgserver: postgres did not shut down within %v; killed", stopGracePeriod)
					s.kill()
				}
			}
		}
		if err := s.removeDirs(); err != nil && s.stopErr == nil {
			s.stopErr = err
		}
	})
	return s.stopErr
}

// kill SIGKILLs the postmaster's process group and waits for the postmaster.
func (s *Server) kill() {
	select {
	case <-s.done:
		return
	default:
	}
	// The postmaster is not reaped yet, so its pid (= pgid) cannot be reused.
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
	}
}

func (s *Server) removeDirs() error {
	var errs []error
	for _, dir := range []string{s.baseDir, s.sockDir} {
		if dir == "" {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("pgserver: remove %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// logTail returns the last few KB of the server log.
func (s *Server) logTail() string {
	f, err := os.Open(s.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > logTailBytes {
		_, _ = f.Seek(fi.Size()-logTailBytes, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// logSince returns the log contents written after offset.
func (s *Server) logSince(offset int64) string {
	f, err := os.Open(s.logPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	_, _ = f.Seek(offset, io.SeekStart)
	b, _ := io.ReadAll(f)
	return string(b)
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// childEnv is the environment for initdb/postgres: ours minus libpq/PG
// variables that could redirect them elsewhere.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

type osUser struct {
	name     string
	uid, gid int
}

// runAsCredential returns the credential to run initdb/postgres with: nil
// (the current user) unless we are root, in which case the postgres user.
func runAsCredential() (*syscall.Credential, *osUser, error) {
	if os.Geteuid() != 0 {
		return nil, nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, nil, fmt.Errorf("pgserver: running as root, and initdb refuses to run as root, but there is no postgres OS user to run it as: %w", err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return nil, nil, fmt.Errorf("pgserver: postgres user uid %q: %w", u.Uid, err)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return nil, nil, fmt.Errorf("pgserver: postgres user gid %q: %w", u.Gid, err)
	}
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	return cred, &osUser{name: u.Username, uid: uid, gid: gid}, nil
}

// errNotInstalled reports that no PostgreSQL server binaries were found.
var errNotInstalled = errors.New("pgserver: PostgreSQL server binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; install the postgresql package")

// findBinDir returns the directory holding initdb and postgres.
func findBinDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		dir := filepath.Dir(p)
		if isExecutable(filepath.Join(dir, "postgres")) {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { // highest version first
		return versionOf(dirs[i]) > versionOf(dirs[j])
	})
	for _, dir := range dirs {
		if isExecutable(filepath.Join(dir, "initdb")) && isExecutable(filepath.Join(dir, "postgres")) {
			return dir, nil
		}
	}
	return "", errNotInstalled
}

// versionOf turns /usr/lib/postgresql/15/bin (or 9.6) into a sortable number.
func versionOf(binDir string) float64 {
	v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	if err != nil {
		return -1
	}
	return v
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}
