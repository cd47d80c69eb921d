// Package redis is Tidemark's Redis cache-invalidation sink: it deletes
// cache keys with DEL and, optionally, announces each deleted key with
// PUBLISH so that processes holding a local copy can drop it too.
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
// Protocol: https://redis.io/docs/latest/commands/del/ and
// https://redis.io/docs/latest/commands/publish/.
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
)

// Defaults for the zero values of Config fields.
const (
	DefaultBatchSize    = 500
	DefaultDialTimeout  = 5 * time.Second
	DefaultWriteTimeout = 5 * time.Second
)

// ErrClosed is returned by Invalidate and Ping after Close.
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
	return c
}

// String describes c with the password masked.
func (c Config) String() string {
	return fmt.Sprintf("{Addr:%s Username:%s Password:%s DB:%d Channel:%s BatchSize:%d DialTimeout:%v WriteTimeout:%v TLS:%v}",
		c.Addr, c.Username, mask(c.Password), c.DB, c.Channel, c.BatchSize, c.DialTimeout, c.WriteTimeout, c.TLS != nil)
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

// Invalidate deletes keys (Redis DEL), in pipelined batches, and when a
// channel is configured also PUBLISHes each key on it. It returns only when
// every DEL has been acknowledged, or an error. It is idempotent (deleting
// an absent key is fine) and does not keep keys after returning. See the
// package documentation for ordering and retry semantics.
func (s *Sink) Invalidate(ctx context.Context, keys []string) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if len(keys) == 0 {
		return nil
	}
	for start := 0; start < len(keys); start += s.cfg.BatchSize {
		end := min(start+s.cfg.BatchSize, len(keys))
		if err := s.invalidateBatch(ctx, keys[start:end]); err != nil {
			switch {
			case start > 0:
				return fmt.Errorf("%s (keys %d-%d of %d; earlier batches done): %w", err.what, start+1, end, len(keys), err)
			case end < len(keys):
				return fmt.Errorf("%s (keys %d-%d of %d): %w", err.what, start+1, end, len(keys), err)
			}
			return fmt.Errorf("%s: %w", err.what, err)
		}
	}
	return nil
}

// batchError is a failure of one pipelined batch.
type batchError struct {
	what   string // "redis DEL of 37 keys"
	failed int    // commands that failed
	total  int    // commands sent
	err    error  // the first failure
}

func (e *batchError) Error() string {
	if e.failed == e.total {
		return e.err.Error()
	}
	return fmt.Sprintf("%d of %d failed, first: %v", e.failed, e.total, e.err)
}

func (e *batchError) Unwrap() error { return e.err }

// invalidateBatch sends one pipeline: DEL k (and PUBLISH channel k) for
// each key, in order, and checks every reply.
func (s *Sink) invalidateBatch(ctx context.Context, keys []string) *batchError {
	dels := make([]*goredis.IntCmd, len(keys))
	var pubs []*goredis.IntCmd
	if s.cfg.Channel != "" {
		pubs = make([]*goredis.IntCmd, len(keys))
	}
	pipe := s.client.Pipeline()
	for i, k := range keys {
		dels[i] = pipe.Del(ctx, k)
		if pubs != nil {
			pubs[i] = pipe.Publish(ctx, s.cfg.Channel, k)
		}
	}
	_, execErr := pipe.Exec(ctx)
	if execErr == nil {
		return nil
	}
	if failed, first := countFailed(dels); failed > 0 {
		return &batchError{what: fmt.Sprintf("redis DEL of %d keys", len(keys)), failed: failed, total: len(keys), err: first}
	}
	if failed, first := countFailed(pubs); failed > 0 {
		return &batchError{
			what:   fmt.Sprintf("redis PUBLISH of %d deleted keys on channel %q", len(keys), s.cfg.Channel),
			failed: failed, total: len(keys), err: first,
		}
	}
	// Exec failed without marking any command (not expected).
	return &batchError{what: fmt.Sprintf("redis DEL of %d keys", len(keys)), failed: 1, total: 1, err: execErr}
}

// countFailed returns how many cmds failed and the first error.
func countFailed(cmds []*goredis.IntCmd) (n int, first error) {
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
