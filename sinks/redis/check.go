package redis

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"syscall"

	goredis "github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

// Use names what a caller does with a Sink, for Check and Commands.
type Use uint8

const (
	// UseInvalidate is Invalidate: DEL, and PUBLISH on Config.Channel.
	UseInvalidate Use = 1 << iota
	// UseReplaceSets is ReplaceSets: DEL and SADD in MULTI/EXEC.
	UseReplaceSets
	// UseVersionedSets is ApplySets and ReplaceSetVersioned: their scripts
	// (EVALSHA, EVAL) and what those and ReplaceSetVersioned run (GET, SET,
	// EXISTS, SADD, SREM, DEL, RENAME).
	UseVersionedSets
)

// Commands returns the Redis commands use needs, lower case: what an ACL
// user must be allowed to run. AUTH and HELLO, which every user may run,
// are not listed; SELECT is when Config.DB is not 0. (go-redis also sends
// CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS when it connects; it
// ignores their refusal.)
func (s *Sink) Commands(use Use) []string {
	var cmds []string
	add := func(cs ...string) {
		for _, c := range cs {
			if !slices.Contains(cmds, c) {
				cmds = append(cmds, c)
			}
		}
	}
	if s.cfg.DB != 0 {
		add("select")
	}
	if use&UseInvalidate != 0 {
		add("del")
		if s.cfg.Mode == ModeVersioned {
			// The scripts, and what they run (ACL applies inside scripts).
			add("evalsha", "eval", "get", "set")
		}
		if s.cfg.Channel != "" {
			add("publish")
		}
	}
	if use&UseReplaceSets != 0 {
		add("multi", "del", "sadd", "exec")
	}
	if use&UseVersionedSets != 0 {
		// ACL applies inside scripts too.
		add("evalsha", "eval", "get", "set", "exists", "sadd", "srem", "del", "rename")
	}
	if use&UsePattern != 0 {
		add("scan", "unlink")
	}
	return cmds
}

// ACLRules returns the ACL SETUSER rules granting use's commands and, with
// a Channel, that channel, e.g. "-@all +del +publish &inv". Key patterns
// ("~*", or the prefixes of the keys written) are the operator's choice.
func (s *Sink) ACLRules(use Use) string {
	rules := []string{"-@all"}
	for _, c := range s.Commands(use) {
		rules = append(rules, "+"+c)
	}
	if use&UseInvalidate != 0 && s.cfg.Channel != "" {
		rules = append(rules, "&"+s.cfg.Channel)
	}
	return strings.Join(rules, " ")
}

// checkKey is the key named by the commands Check queues (and never runs).
const checkKey = "tidemark:check"

// Check connects once, on a connection of its own, and verifies what no
// retry can fix: the TLS handshake (the server's certificate),
// authentication, the DB index, and the ACL permissions of the commands use
// needs. It queues those commands in a MULTI that never runs (after a
// deliberately malformed command, so that even the probing EXEC is refused
// with EXECABORT): it changes nothing and publishes nothing.
//
// Its error is a *CheckError naming the address, the user and the cause,
// never the password. IsPermanent tells the causes waiting cannot fix
// (certificate, credentials, permissions, DB index) from those it may (the
// server unreachable, slow or still loading), after which writes are
// retried as usual.
//
// A user refused MULTI (which only ReplaceSets needs) leaves the other
// commands unchecked, and a key pattern refusing the probe key is only
// warned about (key patterns are the operator's, the probe key is not one
// Tidemark writes).
func (s *Sink) Check(ctx context.Context, use Use) error {
	if s.closed.Load() {
		return ErrClosed
	}
	opts := s.cfg.options()
	opts.PoolSize = 1
	opts.MaxRetries = -1   // report the first failure, as it is
	opts.DialerRetries = 1 // (the client's own default is 5)
	client := goredis.NewClient(opts)
	defer func() { _ = client.Close() }() // also drops the queued transaction
	conn := client.Conn()
	defer func() { _ = conn.Close() }()

	// The first command connects: TLS handshake, HELLO or AUTH, SELECT.
	if err := conn.Do(ctx, "multi").Err(); err != nil {
		if cmd, _ := noperm(err); cmd == "multi" && use&UseReplaceSets == 0 {
			s.log.Warn("the Redis user may not run MULTI, so the permissions of "+strings.ToUpper(strings.Join(s.Commands(use), ", "))+
				" could not be checked at start; a missing one shows at the first write (retried, with a warning)",
				zap.String("username", s.cfg.Username), zap.Error(err))
			return nil
		}
		return s.checkError(err, use)
	}
	type probe struct {
		name     string // "" for the deliberate error
		cmd      *goredis.Cmd
		optional bool // refusal is not an error
	}
	var probes []probe
	_, _ = conn.Pipelined(ctx, func(p goredis.Pipeliner) error {
		probes = append(probes, probe{name: "del", cmd: p.Do(ctx, "del", checkKey)})
		if use&UseInvalidate != 0 && s.cfg.Mode == ModeVersioned {
			// Queued, never run: the server checks the ACL as it queues.
			marker := redisfill.MarkerKey(s.cfg.MarkerPrefix, checkKey)
			probes = append(probes,
				probe{name: "get", cmd: p.Do(ctx, "get", marker)},
				probe{name: "set", cmd: p.Do(ctx, "set", marker, "check")},
				probe{name: "evalsha", cmd: p.Do(ctx, "evalsha", redisfill.InvalidateScript.Hash(), 2, checkKey, marker, "check", 1)},
				probe{name: "eval", cmd: p.Do(ctx, "eval", redisfill.DeleteSource, 2, checkKey, marker)})
		}
		if use&UseInvalidate != 0 && s.cfg.Channel != "" {
			probes = append(probes, probe{name: "publish", cmd: p.Do(ctx, "publish", s.cfg.Channel, checkKey)})
		}
		if use&UsePattern != 0 {
			probes = append(probes, probe{name: "scan", cmd: p.Do(ctx, "scan", "0", "match", checkKey)},
				probe{name: "unlink", cmd: p.Do(ctx, "unlink", checkKey)})
		}
		if use&UseVersionedSets != 0 {
			// Queued, never run. The commands the scripts run are probed
			// themselves: the server checks those only as a script runs.
			ver, tmp := checkKey+VersionSuffix, checkKey+BuildingSuffix
			probes = append(probes,
				probe{name: "get", cmd: p.Do(ctx, "get", ver)},
				probe{name: "set", cmd: p.Do(ctx, "set", ver, "1")},
				probe{name: "exists", cmd: p.Do(ctx, "exists", tmp)},
				probe{name: "sadd", cmd: p.Do(ctx, "sadd", tmp, "check")},
				probe{name: "srem", cmd: p.Do(ctx, "srem", checkKey, "check")},
				probe{name: "rename", cmd: p.Do(ctx, "rename", tmp, checkKey)},
				probe{name: "evalsha", cmd: p.Do(ctx, "evalsha", applySetScript.Hash(), 2, checkKey, ver, "1", "0", "delta", 0)},
				probe{name: "eval", cmd: p.Do(ctx, "eval", switchSetSource, 3, checkKey, ver, tmp, "1")})
		}
		if use&UseReplaceSets != 0 {
			probes = append(probes, probe{name: "sadd", cmd: p.Do(ctx, "sadd", checkKey, "check")})
			// DEL without a key is refused (wrong number of arguments), which
			// makes the server refuse the EXEC below with EXECABORT, unless
			// the user may not run EXEC at all (NOPERM).
			probes = append(probes, probe{cmd: p.Do(ctx, "del")},
				probe{name: "exec", cmd: p.Do(ctx, "exec"), optional: true})
		}
		return nil
	})
	for _, p := range probes {
		err := p.cmd.Err()
		if err == nil {
			continue
		}
		if !isRedisError(err) {
			return s.checkError(err, use) // the connection failed
		}
		cmd, what := noperm(err)
		switch {
		case what == "key":
			s.log.Warn("the Redis user may not write the probe key "+checkKey+" (only the commands were checked): make sure its key patterns (~...) cover every key Tidemark writes",
				zap.String("username", s.cfg.Username), zap.String("command", strings.ToUpper(p.name)), zap.Error(err))
		case what != "" || cmd != "":
			return s.checkError(err, use)
		case p.name == "" || p.optional:
			// The deliberate error, and EXECABORT: expected.
		default:
			return s.checkError(fmt.Errorf("%s: %w", strings.ToUpper(p.name), err), use)
		}
	}
	return nil
}

// CauseAuth is the Cause of a CheckError for refused credentials.
const CauseAuth = "authentication failed"

// CheckError is what Check found wrong.
type CheckError struct {
	Addr     string
	Username string // "" for the default user
	// Cause says what is wrong, e.g. "authentication failed".
	Cause string
	// Hint says how to fix it ("" when there is nothing to add).
	Hint string
	// Permanent is true when waiting cannot fix it: a rejected
	// certificate, credentials, permissions, a missing DB.
	Permanent bool
	Err       error
}

func (e *CheckError) Error() string {
	who := e.Addr
	if e.Username != "" {
		who += fmt.Sprintf(" (user %q)", e.Username)
	}
	s := fmt.Sprintf("redis %s: %s: %v", who, e.Cause, e.Err)
	if e.Hint != "" {
		s += "; " + e.Hint
	}
	return s
}

func (e *CheckError) Unwrap() error { return e.Err }

// IsPermanent reports whether err is a CheckError that waiting cannot fix.
func IsPermanent(err error) bool {
	var ce *CheckError
	return errors.As(err, &ce) && ce.Permanent
}

// checkError classifies err, from connecting or from a probe command.
func (s *Sink) checkError(err error, use Use) *CheckError {
	e := &CheckError{Addr: s.cfg.Addr, Username: s.cfg.Username, Err: err, Permanent: true}
	var (
		hostErr    x509.HostnameError
		authority  x509.UnknownAuthorityError
		invalid    x509.CertificateInvalidError
		verify     *tls.CertificateVerificationError
		header     tls.RecordHeaderError
		alert      tls.AlertError
		redisError goredis.Error
	)
	cmd, what := noperm(err)
	switch {
	case errors.As(err, &hostErr):
		e.Cause = "TLS: the server's certificate is not for the name dialled"
		e.Hint = "set tls.server_name to a name the certificate carries, or dial one"
	case errors.As(err, &authority):
		e.Cause = "TLS: the server's certificate is not signed by a trusted CA"
		e.Hint = "set tls.ca_file to the CA that signs it"
	case errors.As(err, &invalid):
		e.Cause = "TLS: the server's certificate is not valid (expired, not yet valid, or not for a server)"
	case errors.As(err, &verify):
		e.Cause = "TLS: the server's certificate was not accepted"
	case errors.As(err, &header):
		e.Cause = "TLS: the server does not speak TLS on this port"
		e.Hint = "use the server's TLS port, or turn tls off"
	case errors.As(err, &alert):
		e.Cause = "TLS: the server refused the handshake"
		e.Hint = "if it requires client certificates, set tls.cert_file and tls.key_file"
	case goredis.IsAuthError(err) || (errors.As(err, &redisError) && isAuthReply(redisError.Error())):
		e.Cause = CauseAuth
		switch {
		case s.cfg.Password == "":
			e.Hint = "the server requires a password: set password (and username for an ACL user)"
		case s.cfg.Username == "":
			e.Hint = "check the password; without a username it authenticates as the default user"
		default:
			e.Hint = "check the username and the password (an unknown or disabled user is refused the same way)"
		}
	case what == "channel":
		e.Cause = fmt.Sprintf("the user may not publish on channel %q", s.cfg.Channel)
		e.Hint = "grant it: ACL SETUSER " + s.userName() + " &" + s.cfg.Channel
	case cmd != "" || what != "":
		name := cmd
		if name == "" {
			name = "a command Tidemark needs"
		} else {
			name = strings.ToUpper(name)
		}
		e.Cause = "the user may not run " + name
		e.Hint = "grant what Tidemark needs: ACL SETUSER " + s.userName() + " " + s.ACLRules(use) + " plus key patterns (~...)"
	case errors.As(err, &redisError) && strings.HasPrefix(redisError.Error(), "ERR DB index is out of range"):
		e.Cause = fmt.Sprintf("db %d does not exist on the server", s.cfg.DB)
	default:
		e.Permanent = false
		e.Cause = "cannot use the server (yet)"
		var netErr net.Error
		switch {
		case isRedisError(err):
			e.Cause = "the server refused the check"
		case errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, context.DeadlineExceeded):
			e.Cause = "no answer"
			if s.cfg.TLS != nil {
				e.Hint = "if this port does not speak TLS, the handshake gets no answer: use the server's TLS port, or turn tls off"
			}
		case s.cfg.TLS == nil && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)):
			e.Cause = "the server closed the connection"
			e.Hint = "if it accepts only TLS connections, set tls.enabled"
		}
	}
	return e
}

func (s *Sink) userName() string {
	if s.cfg.Username == "" {
		return "default"
	}
	return s.cfg.Username
}

// isAuthReply recognises authentication refusals go-redis does not
// classify, e.g. "ERR AUTH <password> called without any password
// configured for the default user" (the text is the server's; it quotes
// no password).
func isAuthReply(msg string) bool {
	msg = strings.TrimPrefix(msg, "ERR ")
	return strings.HasPrefix(msg, "AUTH") || strings.HasPrefix(msg, "invalid password") || strings.HasPrefix(msg, "Client sent AUTH")
}

func isRedisError(err error) bool {
	var re goredis.Error
	return errors.As(err, &re)
}

// noperm reads a NOPERM reply: the command it names (lower case), or what
// else it refuses ("key" or "channel"). Redis 6.2 to 7.0 say "this user has
// no permissions to run the 'del' command" and "... to access one of the
// keys used as arguments"; 7.2 and later "User u has no permissions to run
// the 'del' command" and "No permissions to access a key".
func noperm(err error) (command, what string) {
	if !goredis.IsPermissionError(err) {
		return "", ""
	}
	msg := err.Error()
	if i := strings.Index(msg, "run the '"); i >= 0 {
		rest := msg[i+len("run the '"):]
		if j := strings.IndexByte(rest, '\''); j > 0 {
			return strings.ToLower(rest[:j]), ""
		}
	}
	switch {
	case strings.Contains(msg, "channel"):
		return "", "channel"
	case strings.Contains(msg, "key"):
		return "", "key"
	}
	return "", "command"
}
