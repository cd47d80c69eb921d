// Package redis is Tidemark's Redis cache-invalidation sink: it deletes
// cache keys with DEL and, optionally, announces each deleted key with
// PUBLISH so that processes holding a local copy can drop it too.
//
// In ModeVersioned it also writes, with each DEL and in the same script, a
// short-lived marker holding the position of the change (InvalidateAt), so
// that readers filling the cache with the protocol of package redisfill
// never store a value they read before that change. The default,
// ModeDelete, sends plain DELs.
//
// It has the method set of the invalidation consumer's invalidator contract
// (Invalidate and Close) without importing that package; cmd/ connects them.
//
// Guarantees of Invalidate:
//
//   - Acknowledged: it returns nil only once Redis has acknowledged the DEL
//     of every key (and, with a Channel, every PUBLISH). An acknowledged DEL
//     is applied on the server; whether it survives a Redis crash depends on
//     the server's own persistence settings.
//   - At-least-once and idempotent: on an error some keys may already be
//     deleted (and published); the caller retries the whole call. Deleting
//     an absent key is not an error, and a retried batch may publish a key
//     again, so subscribers must tolerate duplicate messages.
//   - Ordered within one call: keys are sent in slice order, in batches of
//     Config.BatchSize commands pipelined on one connection, and a batch is
//     sent only after the previous one was fully acknowledged. A key's
//     PUBLISH directly follows its DEL, so a subscriber that re-reads the
//     key on the message already misses it. Separate concurrent calls are
//     not ordered with respect to each other.
//
// The go-redis client reconnects by itself: after Redis restarts, the next
// call dials again. Context deadlines bound every call, including socket
// reads and writes, so a dead or hung server yields an error, never a hang.
//
// Managed Redis: Config.TLS encrypts the connections and Config.Username
// authenticates as an ACL user. What waiting cannot fix (a rejected
// certificate, wrong credentials, a command the ACL user may not run) is
// found by Check before the first write; see Commands for what a user
// needs.
//
// Protocol: https://redis.io/docs/latest/commands/del/,
// https://redis.io/docs/latest/commands/publish/, and for ModeVersioned
// https://redis.io/docs/latest/commands/evalsha/ (the scripts are
// redisfill's).
package redis

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tidemark/tidemark/pipeline"
	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

// Defaults for the zero values of Config fields.
const (
	DefaultBatchSize    = 500
	DefaultDialTimeout  = 5 * time.Second
	DefaultWriteTimeout = 5 * time.Second
	DefaultMarkerTTL    = time.Minute
)

// Mode is how the sink invalidates a key.
type Mode string

// The modes.
const (
	// ModeDelete (the default) sends DEL key.
	ModeDelete Mode = "delete"
	// ModeVersioned runs redisfill.InvalidateScript: DEL key and set its
	// marker to the change's position unless the marker is newer.
	ModeVersioned Mode = "versioned"
)

// ErrClosed is returned after Close by the methods that talk to Redis.
var ErrClosed = errors.New("redis sink: closed")

// Config configures the sink. The zero value of each optional field means
// its default. Its String form, and its zap form, never show the password.
type Config struct {
	// Addr is the server's host:port (required).
	Addr string
	// Username for Redis ACL authentication (AUTH username password).
	// Default none.
	Username string
	// Password for AUTH. Default none. Never logged or put into errors.
	Password string
	// DB is the database number selected after connecting. Default 0.
	DB int
	// Channel, if set, receives a PUBLISH of each deleted key (the message
	// is the key itself). Default none: nothing is published.
	Channel string
	// BatchSize is the number of keys per pipelined round trip. Default 500.
	BatchSize int
	// DialTimeout bounds establishing one connection. Default 5s.
	DialTimeout time.Duration
	// WriteTimeout bounds writing one pipeline to the socket. Default 5s.
	WriteTimeout time.Duration
	// TLS, when set, makes every connection TLS with this client
	// configuration (an empty ServerName means the host of Addr). Default
	// nil: plaintext.
	TLS *tls.Config
	// Mode is ModeDelete or ModeVersioned. Default ModeDelete.
	Mode Mode
	// MarkerPrefix begins the marker keys of ModeVersioned (see
	// redisfill.MarkerKey); no cache key may begin with it. Default
	// redisfill.DefaultMarkerPrefix ("tidemark:marker:").
	MarkerPrefix string
	// MarkerTTL is how long a marker of ModeVersioned lives. It bounds the
	// markers' memory only: an expired marker makes a fill in flight
	// refused, never accepted. Default 1m.
	MarkerTTL time.Duration
}

// Validate reports every problem of c, each by field name. Values that
// could hold a secret are not echoed.
func (c Config) Validate() error {
	var errs []error
	switch {
	case c.Addr == "":
		errs = append(errs, errors.New("addr: required (host:port)"))
	case strings.Contains(c.Addr, "://") || strings.Contains(c.Addr, "@"):
		// A URL may carry credentials: do not echo it.
		errs = append(errs, errors.New("addr: must be host:port, not a URL (set username and password separately)"))
	default:
		host, port, err := net.SplitHostPort(c.Addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("addr: %q is not host:port: %w", c.Addr, err))
			break
		}
		if host == "" {
			errs = append(errs, fmt.Errorf("addr: %q has no host", c.Addr))
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			errs = append(errs, fmt.Errorf("addr: %q: port must be a number from 1 to 65535", c.Addr))
		}
	}
	if c.DB < 0 {
		errs = append(errs, fmt.Errorf("db: %d is negative", c.DB))
	}
	if c.BatchSize < 0 {
		errs = append(errs, fmt.Errorf("batch_size: %d is negative (0 means the default, %d)", c.BatchSize, DefaultBatchSize))
	}
	if c.DialTimeout < 0 {
		errs = append(errs, fmt.Errorf("dial_timeout: %v is negative (0 means the default, %v)", c.DialTimeout, DefaultDialTimeout))
	}
	if c.WriteTimeout < 0 {
		errs = append(errs, fmt.Errorf("write_timeout: %v is negative (0 means the default, %v)", c.WriteTimeout, DefaultWriteTimeout))
	}
	switch c.Mode {
	case "", ModeDelete, ModeVersioned:
	default:
		errs = append(errs, fmt.Errorf("mode: %q is not %s or %s", c.Mode, ModeDelete, ModeVersioned))
	}
	if err := redisfill.ValidatePrefix(c.MarkerPrefix); err != nil {
		errs = append(errs, fmt.Errorf("marker_prefix: %w", err))
	}
	if c.MarkerTTL < 0 || (c.MarkerTTL > 0 && c.MarkerTTL < time.Millisecond) {
		errs = append(errs, fmt.Errorf("marker_ttl: %v must be at least 1ms (0 means the default, %v)", c.MarkerTTL, DefaultMarkerTTL))
	}
	return errors.Join(errs...)
}

// withDefaults returns c with its zero values replaced by the defaults.
func (c Config) withDefaults() Config {
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.Mode == "" {
		c.Mode = ModeDelete
	}
	if c.MarkerPrefix == "" {
		c.MarkerPrefix = redisfill.DefaultMarkerPrefix
	}
	if c.MarkerTTL == 0 {
		c.MarkerTTL = DefaultMarkerTTL
	}
	return c
}

// String describes c with the password masked.
func (c Config) String() string {
	return fmt.Sprintf("{Addr:%s Username:%s Password:%s DB:%d Channel:%s BatchSize:%d DialTimeout:%v WriteTimeout:%v TLS:%v Mode:%s MarkerPrefix:%s MarkerTTL:%v}",
		c.Addr, c.Username, mask(c.Password), c.DB, c.Channel, c.BatchSize, c.DialTimeout, c.WriteTimeout, c.TLS != nil,
		c.Mode, c.MarkerPrefix, c.MarkerTTL)
}

// GoString is like String, for the %#v verb.
func (c Config) GoString() string { return "redis.Config" + c.String() }

// MarshalLogObject lets zap log c (zap.Any, zap.Object) with the password
// masked.
func (c Config) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("addr", c.Addr)
	enc.AddString("username", c.Username)
	enc.AddString("password", mask(c.Password))
	enc.AddInt("db", c.DB)
	enc.AddString("channel", c.Channel)
	enc.AddInt("batch_size", c.BatchSize)
	enc.AddDuration("dial_timeout", c.DialTimeout)
	enc.AddDuration("write_timeout", c.WriteTimeout)
	enc.AddBool("tls", c.TLS != nil)
	enc.AddString("mode", string(c.Mode))
	enc.AddString("marker_prefix", c.MarkerPrefix)
	enc.AddDuration("marker_ttl", c.MarkerTTL)
	return nil
}

func mask(password string) string {
	if password == "" {
		return ""
	}
	return "xxxxx"
}

// Sink deletes (and optionally publishes) cache keys in Redis. It is safe
// for concurrent use. Create it with New.
type Sink struct {
	cfg    Config // with defaults applied
	log    *zap.Logger
	client *goredis.Client

	// markersKept counts versioned invalidations that found a marker at
	// least as new as theirs (redeliveries).
	markersKept atomic.Uint64

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// New validates cfg and builds a Sink. It does not connect: the first
// Invalidate or Ping does, and the client reconnects by itself after a
// connection breaks (Check verifies at start what reconnecting cannot
// fix). A nil log means a no-op logger.
func New(cfg Config, log *zap.Logger) (*Sink, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("redis sink config: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	cfg = cfg.withDefaults()
	return &Sink{
		cfg:    cfg,
		log:    log.With(zap.String("component", "sinks/redis"), zap.String("addr", cfg.Addr)),
		client: goredis.NewClient(cfg.options()),
	}, nil
}

// options are the go-redis client options for c (defaults applied).
func (c Config) options() *goredis.Options {
	return &goredis.Options{
		Addr:         c.Addr,
		Username:     c.Username,
		Password:     c.Password,
		DB:           c.DB,
		DialTimeout:  c.DialTimeout,
		WriteTimeout: c.WriteTimeout,
		TLSConfig:    c.TLS.Clone(),
		// The caller's deadline also bounds socket reads and writes; without
		// it go-redis ignores ctx once a command is on the wire.
		ContextTimeoutEnabled: true,
	}
}

// Ping checks that the server answers (and that authentication works).
func (s *Sink) Ping(ctx context.Context) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if err := s.client.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis PING %s: %w", s.cfg.Addr, err)
	}
	return nil
}

// KeyAt is a key to invalidate and the position of the change that
// invalidated it (the invalidation consumer's KeyAt, restated because this
// package must not import its caller).
type KeyAt struct {
	Key string
	Pos pipeline.Position
}

// Invalidate deletes keys (Redis DEL), in pipelined batches, and when a
// channel is configured also PUBLISHes each key on it. It returns only when
// every DEL has been acknowledged, or an error. It is idempotent (deleting
// an absent key is fine) and does not keep keys after returning. See the
// package documentation for ordering and retry semantics.
//
// In ModeVersioned, where it has no positions, it deletes each key's marker
// too (redisfill.DeleteScript), which refuses every fill in flight.
func (s *Sink) Invalidate(ctx context.Context, keys []string) error {
	return s.invalidate(ctx, len(keys), func(i int) string { return keys[i] },
		func(ctx context.Context, p goredis.Pipeliner, i int, eval bool) goredis.Cmder {
			if s.cfg.Mode != ModeVersioned {
				return p.Del(ctx, keys[i])
			}
			return s.runScript(ctx, p, redisfill.DeleteScript, eval, keys[i])
		})
}

// InvalidateAt is Invalidate with each key's position. In ModeVersioned it
// deletes each key and sets its marker to redisfill.Marker(Pos), unless the
// marker already holds an equal or later position (a redelivery), in one
// script per key; in ModeDelete it is Invalidate.
func (s *Sink) InvalidateAt(ctx context.Context, keys []KeyAt) error {
	if s.cfg.Mode != ModeVersioned {
		plain := make([]string, len(keys))
		for i, k := range keys {
			plain[i] = k.Key
		}
		return s.Invalidate(ctx, plain)
	}
	ttl := s.cfg.MarkerTTL.Milliseconds()
	return s.invalidate(ctx, len(keys), func(i int) string { return keys[i].Key },
		func(ctx context.Context, p goredis.Pipeliner, i int, eval bool) goredis.Cmder {
			return s.runScript(ctx, p, redisfill.InvalidateScript, eval, keys[i].Key, redisfill.Marker(keys[i].Pos), ttl)
		})
}

// Mode is the sink's mode (ModeDelete when not configured).
func (s *Sink) Mode() Mode { return s.cfg.Mode }

// MarkersKept counts the versioned invalidations that kept a marker at
// least as new as their own position (redelivered changes).
func (s *Sink) MarkersKept() uint64 { return s.markersKept.Load() }

// runScript queues sc on p for key and its marker: EVALSHA, or EVAL when
// the server did not know the script (eval).
func (s *Sink) runScript(ctx context.Context, p goredis.Pipeliner, sc *goredis.Script, eval bool, key string, args ...any) goredis.Cmder {
	return evalScript(ctx, p, sc, eval, []string{key, redisfill.MarkerKey(s.cfg.MarkerPrefix, key)}, args...)
}

// evalScript queues (on a pipeline) or runs (on a client) sc with keys and
// args: EVALSHA, or EVAL when the server did not know the script (eval).
func evalScript(ctx context.Context, c goredis.Scripter, sc *goredis.Script, eval bool, keys []string, args ...any) *goredis.Cmd {
	if eval {
		return sc.Eval(ctx, c, keys, args...)
	}
	return sc.EvalSha(ctx, c, keys, args...)
}

// queueFunc queues the invalidation of the i-th key on p; eval asks for
// EVAL rather than EVALSHA.
type queueFunc func(ctx context.Context, p goredis.Pipeliner, i int, eval bool) goredis.Cmder

// invalidate sends the n keys in batches of BatchSize, each after the
// previous one was acknowledged.
func (s *Sink) invalidate(ctx context.Context, n int, key func(int) string, queue queueFunc) error {
	if s.closed.Load() {
		return ErrClosed
	}
	for start := 0; start < n; start += s.cfg.BatchSize {
		end := min(start+s.cfg.BatchSize, n)
		err := s.invalidateBatch(ctx, start, end, key, queue, false)
		if err != nil && err.noScript {
			// A restarted (or flushed) server forgot the scripts: EVAL sends
			// the source, which also caches it. The batch is idempotent.
			err = s.invalidateBatch(ctx, start, end, key, queue, true)
		}
		if err != nil {
			switch {
			case start > 0:
				return fmt.Errorf("%s (keys %d-%d of %d; earlier batches done): %w", err.what, start+1, end, n, err)
			case end < n:
				return fmt.Errorf("%s (keys %d-%d of %d): %w", err.what, start+1, end, n, err)
			}
			return fmt.Errorf("%s: %w", err.what, err)
		}
	}
	return nil
}

// batchError is a failure of one pipelined batch.
type batchError struct {
	what     string // "redis DEL of 37 keys"
	failed   int    // commands that failed
	total    int    // commands sent
	err      error  // the first failure
	noScript bool   // a script was not in the server's cache
}

func (e *batchError) Error() string {
	if e.failed == e.total {
		return e.err.Error()
	}
	return fmt.Sprintf("%d of %d failed, first: %v", e.failed, e.total, e.err)
}

func (e *batchError) Unwrap() error { return e.err }

// invalidateBatch sends one pipeline: the invalidation of keys start to
// end-1 (and PUBLISH channel k after each), in order, and checks every
// reply.
func (s *Sink) invalidateBatch(ctx context.Context, start, end int, key func(int) string, queue queueFunc, eval bool) *batchError {
	n := end - start
	invs := make([]goredis.Cmder, n)
	var pubs []goredis.Cmder
	if s.cfg.Channel != "" {
		pubs = make([]goredis.Cmder, n)
	}
	pipe := s.client.Pipeline()
	for i := range n {
		invs[i] = queue(ctx, pipe, start+i, eval)
		if pubs != nil {
			pubs[i] = pipe.Publish(ctx, s.cfg.Channel, key(start+i))
		}
	}
	what := fmt.Sprintf("redis DEL of %d keys", n)
	if s.cfg.Mode == ModeVersioned {
		what = fmt.Sprintf("redis versioned invalidation (DEL and marker) of %d keys", n)
	}
	_, execErr := pipe.Exec(ctx)
	if execErr == nil {
		if s.cfg.Mode == ModeVersioned {
			for _, c := range invs {
				if c, ok := c.(*goredis.Cmd); ok {
					if v, _ := c.Int64(); v == 0 {
						s.markersKept.Add(1)
					}
				}
			}
		}
		return nil
	}
	if failed, first := countFailed(invs); failed > 0 {
		return &batchError{what: what, failed: failed, total: n, err: first,
			noScript: goredis.HasErrorPrefix(first, "NOSCRIPT")}
	}
	if failed, first := countFailed(pubs); failed > 0 {
		return &batchError{
			what:   fmt.Sprintf("redis PUBLISH of %d deleted keys on channel %q", n, s.cfg.Channel),
			failed: failed, total: n, err: first,
		}
	}
	// Exec failed without marking any command (not expected).
	return &batchError{what: what, failed: 1, total: 1, err: execErr}
}

// countFailed returns how many cmds failed and the first error.
func countFailed(cmds []goredis.Cmder) (n int, first error) {
	for _, c := range cmds {
		if err := c.Err(); err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	return n, first
}

// Close closes the connections. Calls of Invalidate still in flight may
// fail; later ones return ErrClosed. Close is idempotent: later calls
// return the first call's result.
func (s *Sink) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		if err := s.client.Close(); err != nil {
			s.closeErr = fmt.Errorf("redis sink: close: %w", err)
		}
		s.log.Info("redis sink closed")
	})
	return s.closeErr
}
