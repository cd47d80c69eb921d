package redis

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/redistest"
)

// invalidator is the caller's contract (invalidation.Invalidator), restated
// here because this package must not import its caller.
type invalidator interface {
	Invalidate(ctx context.Context, keys []string) error
	Close() error
}

var _ invalidator = (*Sink)(nil)

const testPassword = "s3cret-Pa55word"

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string // substrings of the error; none = valid
	}{
		{name: "minimal", cfg: Config{Addr: "127.0.0.1:6380"}},
		{name: "full", cfg: Config{Addr: "cache.internal:6379", Username: "u", Password: testPassword, DB: 3, Channel: "inv", BatchSize: 10, DialTimeout: time.Second, WriteTimeout: time.Second}},
		{name: "ipv6", cfg: Config{Addr: "[::1]:6379"}},
		{name: "no addr", cfg: Config{}, want: []string{"addr: required"}},
		{name: "no port", cfg: Config{Addr: "localhost"}, want: []string{`addr: "localhost" is not host:port`}},
		{name: "no host", cfg: Config{Addr: ":6379"}, want: []string{"has no host"}},
		{name: "bad port", cfg: Config{Addr: "h:http"}, want: []string{"port must be a number"}},
		{name: "port range", cfg: Config{Addr: "h:70000"}, want: []string{"port must be a number"}},
		{name: "url with password", cfg: Config{Addr: "redis://:" + testPassword + "@h:6379"}, want: []string{"not a URL"}},
		{name: "versioned", cfg: Config{Addr: "h:1", Mode: ModeVersioned, MarkerPrefix: "cache-marker:", MarkerTTL: time.Minute}},
		{
			name: "bad versioned fields",
			cfg:  Config{Addr: "h:1", Mode: "lease", MarkerPrefix: "m{", MarkerTTL: -time.Second},
			want: []string{`mode: "lease" is not delete or versioned`, `marker_prefix: "m{" must not contain {`, "marker_ttl: -1s"},
		},
		{
			name: "every bad field",
			cfg:  Config{Addr: "h:1", DB: -1, BatchSize: -2, DialTimeout: -time.Second, WriteTimeout: -time.Second},
			want: []string{"db: -1", "batch_size: -2", "dial_timeout: -1s", "write_timeout: -1s"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q, want it to contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), testPassword) {
				t.Errorf("Validate() error shows the password: %q", err)
			}
			if _, nerr := New(tc.cfg, nil); nerr == nil || !strings.Contains(nerr.Error(), tc.want[0]) {
				t.Errorf("New() = %v, want the validation error", nerr)
			}
		})
	}
}

func TestConfigHidesPassword(t *testing.T) {
	cfg := Config{Addr: "h:6379", Username: "u", Password: testPassword}
	core, logs := observer.New(zapcore.InfoLevel)
	zap.New(core).Info("config", zap.Any("redis", cfg), zap.Object("redis2", cfg))
	var sb strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintf(&sb, "%v", e.ContextMap())
	}
	for _, s := range []string{fmt.Sprint(cfg), fmt.Sprintf("%+v", cfg), fmt.Sprintf("%#v", cfg), sb.String()} {
		if strings.Contains(s, testPassword) {
			t.Errorf("password shown in %q", s)
		}
		if !strings.Contains(s, "xxxxx") || !strings.Contains(s, "h:6379") {
			t.Errorf("%q: want the address and a masked password", s)
		}
	}
}

// newSink returns a Sink for srv, closed at the end of the test.
func newSink(t *testing.T, srv *redistest.Server, cfg Config) *Sink {
	t.Helper()
	cfg.Addr = srv.Addr()
	s, err := New(cfg, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// setKeys creates keys (value "v") through the harness client.
func setKeys(t *testing.T, c *goredis.Client, keys []string) {
	t.Helper()
	ctx := context.Background()
	pipe := c.Pipeline()
	for _, k := range keys {
		pipe.Set(ctx, k, "v", 0)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("setting %d keys: %v", len(keys), err)
	}
}

// existing returns which of keys exist.
func existing(t *testing.T, c *goredis.Client, keys []string) []string {
	t.Helper()
	ctx := context.Background()
	pipe := c.Pipeline()
	cmds := make([]*goredis.IntCmd, len(keys))
	for i, k := range keys {
		cmds[i] = pipe.Exists(ctx, k)
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("EXISTS of %d keys: %v", len(keys), err)
	}
	var out []string
	for i, c := range cmds {
		if c.Val() == 1 {
			out = append(out, keys[i])
		}
	}
	return out
}

func keyRange(prefix string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s:%d", prefix, i)
	}
	return keys
}

// pipelineCounter records the number of commands of every pipeline of
// DELs (not the connection handshake, which go-redis also pipelines).
type pipelineCounter struct {
	mu    sync.Mutex
	sizes []int
}

func (p *pipelineCounter) DialHook(next goredis.DialHook) goredis.DialHook          { return next }
func (p *pipelineCounter) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook { return next }
func (p *pipelineCounter) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []goredis.Cmder) error {
		if len(cmds) > 0 && cmds[0].Name() == "del" {
			p.mu.Lock()
			p.sizes = append(p.sizes, len(cmds))
			p.mu.Unlock()
		}
		return next(ctx, cmds)
	}
}

func TestInvalidate(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	for _, tc := range []struct {
		name       string
		batchSize  int
		n          int
		wantRounds []int // commands per pipeline
	}{
		{name: "one key", n: 1, wantRounds: []int{1}},
		{name: "one default batch", n: 500, wantRounds: []int{500}},
		{name: "default batches", n: 1234, wantRounds: []int{500, 500, 234}},
		{name: "small batches", batchSize: 10, n: 95, wantRounds: []int{10, 10, 10, 10, 10, 10, 10, 10, 10, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSink(t, srv, Config{BatchSize: tc.batchSize})
			counter := &pipelineCounter{}
			s.client.AddHook(counter)

			doomed := keyRange("doomed:"+tc.name, tc.n)
			kept := keyRange("kept:"+tc.name, 20)
			setKeys(t, c, doomed)
			setKeys(t, c, kept)

			if err := s.Invalidate(ctx, doomed); err != nil {
				t.Fatalf("Invalidate: %v", err)
			}
			if left := existing(t, c, doomed); len(left) > 0 {
				t.Errorf("%d of %d keys survived, e.g. %s", len(left), tc.n, left[0])
			}
			if got := existing(t, c, kept); len(got) != len(kept) {
				t.Errorf("only %d of %d unrelated keys left alone", len(got), len(kept))
			}
			if fmt.Sprint(counter.sizes) != fmt.Sprint(tc.wantRounds) {
				t.Errorf("pipelines of %v commands, want %v", counter.sizes, tc.wantRounds)
			}
		})
	}
}

func TestInvalidateIdempotent(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{BatchSize: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	keys := []string{"a", "b", "a", "c", "never-existed", "b"} // duplicates too
	setKeys(t, c, []string{"a", "b", "c"})
	for i := range 3 {
		if err := s.Invalidate(ctx, keys); err != nil {
			t.Fatalf("Invalidate #%d: %v", i+1, err)
		}
	}
	if left := existing(t, c, keys); len(left) > 0 {
		t.Fatalf("keys survived: %v", left)
	}
	if err := s.Invalidate(ctx, nil); err != nil {
		t.Fatalf("Invalidate(nil): %v", err)
	}
}

func TestInvalidatePublishes(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	sub := c.Subscribe(ctx, "cache-inval")
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil { // the subscription confirmation
		t.Fatalf("SUBSCRIBE: %v", err)
	}

	s := newSink(t, srv, Config{Channel: "cache-inval", BatchSize: 4})
	keys := keyRange("room", 10)
	setKeys(t, c, keys)
	if err := s.Invalidate(ctx, keys); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	for i, want := range keys {
		msg, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if msg.Channel != "cache-inval" || msg.Payload != want {
			t.Fatalf("message %d = %s on %s, want %s on cache-inval (in key order)", i, msg.Payload, msg.Channel, want)
		}
		// The DEL precedes the PUBLISH: a subscriber re-reading misses.
		if n := c.Exists(ctx, want).Val(); n != 0 {
			t.Fatalf("key %s still exists when its message arrives", want)
		}
	}

	// Without a Channel nothing is published.
	quiet := newSink(t, srv, Config{})
	if err := quiet.Invalidate(ctx, []string{"x"}); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	if msg, err := sub.ReceiveTimeout(ctx, 100*time.Millisecond); err == nil {
		t.Fatalf("unexpected message %v from a sink without a channel", msg)
	}
}

// A dead or hung server gives an error within the caller's deadline.
func TestInvalidateServerDown(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		down func(*redistest.Server) error
		up   func(*redistest.Server) error
	}{
		{name: "stopped", down: (*redistest.Server).Halt, up: func(s *redistest.Server) error { return s.Restart(context.Background()) }},
		{name: "frozen", down: (*redistest.Server).Freeze, up: (*redistest.Server).Thaw},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := redistest.ForTest(t)
			s := newSink(t, srv, Config{Channel: "c"})
			keys := keyRange("k", 37)
			if err := s.Invalidate(context.Background(), keys); err != nil {
				t.Fatalf("Invalidate while up: %v", err)
			}

			if err := tc.down(srv); err != nil {
				t.Fatalf("taking the server down: %v", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			start := time.Now()
			err := s.Invalidate(ctx, keys)
			cancel()
			if err == nil {
				t.Fatalf("Invalidate succeeded with the server %s", tc.name)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("Invalidate took %v despite a 300ms deadline", d)
			} else {
				t.Logf("server %s: error after %v: %v", tc.name, d.Round(time.Millisecond), err)
			}
			if !strings.HasPrefix(err.Error(), "redis DEL of 37 keys: ") {
				t.Errorf("error %q does not say what was being done", err)
			}
			ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
			err = s.Ping(ctx)
			cancel()
			if err == nil || !strings.HasPrefix(err.Error(), "redis PING "+srv.Addr()+": ") {
				t.Errorf("Ping with the server %s = %v, want a PING error", tc.name, err)
			}

			if err := tc.up(srv); err != nil {
				t.Fatalf("bringing the server back: %v", err)
			}
			// Reconnect: the same Sink works again without being told.
			upAt := time.Now()
			setKeys(t, srv.Client(), keys)
			deadline := time.Now().Add(5 * time.Second)
			for {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				err = s.Invalidate(ctx, keys)
				cancel()
				if err == nil || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("Invalidate after the server came back: %v", err)
			}
			t.Logf("working again %v after the server came back", time.Since(upAt).Round(time.Millisecond))
			if left := existing(t, srv.Client(), keys); len(left) > 0 {
				t.Fatalf("keys survived after reconnect: %v", left)
			}
		})
	}
}

// Batches after a failed one are not attempted, and the error says where
// the call stopped.
func TestInvalidateErrorNamesBatch(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	s := newSink(t, srv, Config{BatchSize: 10})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Let the second pipeline fail.
	fail := errors.New("injected failure")
	s.client.AddHook(failPipeline{n: 2, err: fail})
	err := s.Invalidate(ctx, keyRange("k", 25))
	if !errors.Is(err, fail) {
		t.Fatalf("Invalidate = %v, want the injected failure", err)
	}
	if want := "redis DEL of 10 keys (keys 11-20 of 25; earlier batches done): injected failure"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
}

// failPipeline fails the n-th pipeline (1-based) with err, per command.
type failPipeline struct {
	n   int
	err error
}

func (f failPipeline) DialHook(next goredis.DialHook) goredis.DialHook          { return next }
func (f failPipeline) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook { return next }
func (f failPipeline) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	calls := 0
	return func(ctx context.Context, cmds []goredis.Cmder) error {
		calls++
		if calls == f.n {
			for _, c := range cmds {
				c.SetErr(f.err)
			}
			return f.err
		}
		return next(ctx, cmds)
	}
}

func TestAuth(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	admin := srv.Client()
	if err := admin.ConfigSet(ctx, "requirepass", testPassword).Err(); err != nil {
		t.Fatalf("CONFIG SET requirepass: %v", err)
	}

	good := newSink(t, srv, Config{Password: testPassword})
	if err := good.Ping(ctx); err != nil {
		t.Fatalf("Ping with the password: %v", err)
	}
	if err := good.Invalidate(ctx, []string{"a"}); err != nil {
		t.Fatalf("Invalidate with the password: %v", err)
	}

	bad := newSink(t, srv, Config{Username: "default", Password: testPassword + "-wrong"})
	for _, err := range []error{bad.Ping(ctx), bad.Invalidate(ctx, []string{"a"})} {
		if err == nil {
			t.Fatalf("wrong password accepted")
		}
		if strings.Contains(err.Error(), testPassword) {
			t.Errorf("error shows the password: %q", err)
		}
	}
}

func TestClose(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	core, logs := observer.New(zapcore.InfoLevel)
	s, err := New(Config{Addr: srv.Addr(), Password: testPassword}, zap.New(core))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx := context.Background()
	if err := s.Invalidate(ctx, []string{"a"}); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Invalidate(ctx, []string{"a"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Invalidate after Close = %v, want ErrClosed", err)
	}
	if err := s.Ping(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Ping after Close = %v, want ErrClosed", err)
	}
	if _, err := s.ApplySets(ctx, []SetUpdate{{Key: "s", Version: 1}}); !errors.Is(err, ErrClosed) {
		t.Errorf("ApplySets after Close = %v, want ErrClosed", err)
	}
	if _, err := s.ReplaceSetVersioned(ctx, "s", 1, func() ([]string, error) { return nil, nil }); !errors.Is(err, ErrClosed) {
		t.Errorf("ReplaceSetVersioned after Close = %v, want ErrClosed", err)
	}
	if err := s.ReplaceSets(ctx, []string{"s"}, [][]string{nil}); !errors.Is(err, ErrClosed) {
		t.Errorf("ReplaceSets after Close = %v, want ErrClosed", err)
	}
	if n := logs.FilterMessage("redis sink closed").Len(); n != 1 {
		t.Errorf("logged %d close messages, want 1", n)
	}
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprint(e.ContextMap()), testPassword) {
			t.Errorf("log entry shows the password: %v", e.ContextMap())
		}
	}
}

// New does not connect: a sink for an address nobody listens on is built
// fine, and an empty Invalidate does not touch the network.
func TestNewDoesNotConnect(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	if err := srv.Halt(); err != nil {
		t.Fatalf("Halt: %v", err)
	}
	s := newSink(t, srv, Config{})
	if err := s.Invalidate(context.Background(), nil); err != nil {
		t.Fatalf("empty Invalidate: %v", err)
	}
}
