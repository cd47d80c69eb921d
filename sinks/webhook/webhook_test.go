package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// invalidator is the caller's contract (invalidation.Invalidator), restated
// here because this package must not import its caller.
type invalidator interface {
	Invalidate(ctx context.Context, keys []string) error
	Close() error
}

var _ invalidator = (*Sink)(nil)

// Values that must never show in an error or a log entry.
const (
	testSecret   = "whsec-T0p-s3cret-value"
	testPassword = "basic-Pa55word"
	testToken    = "query-t0ken"
)

func assertNoSecret(t *testing.T, what, s string) {
	t.Helper()
	for _, secret := range []string{testSecret, testPassword, testToken} {
		if strings.Contains(s, secret) {
			t.Errorf("%s shows a secret (%q): %s", what, secret, s)
		}
	}
}

// request is one request a receiver got.
type request struct {
	body []byte
}

// receiver is a webhook endpoint. It checks every request (method, content
// type, basic auth, query, and the signature with Verify) and records it;
// batches it acknowledges are recorded separately, in order.
type receiver struct {
	t   *testing.T
	srv *httptest.Server
	// fail, if set, may answer the n-th request (1-based) itself, with a
	// failure; it returns whether it did.
	fail func(n int, w http.ResponseWriter, r *http.Request) bool

	mu       sync.Mutex
	requests []request
	acked    [][]string // keys of acknowledged batches
	ackedRaw [][]byte   // their bodies
}

func newReceiver(t *testing.T, fail func(n int, w http.ResponseWriter, r *http.Request) bool) *receiver {
	t.Helper()
	rc := &receiver{t: t, fail: fail}
	rc.srv = httptest.NewServer(rc)
	t.Cleanup(rc.srv.Close)
	return rc
}

// url is the receiver's address with basic-auth userinfo and a query token,
// which must not leak either.
func (rc *receiver) url() string {
	return strings.Replace(rc.srv.URL, "http://", "http://tidemark:"+testPassword+"@", 1) + "/hook?token=" + testToken
}

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t := rc.t
	body, err := io.ReadAll(r.Body)
	if err != nil {
		t.Errorf("receiver: reading body: %v", err)
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/hook" || r.URL.Query().Get("token") != testToken {
		t.Errorf("receiver: got %s %s", r.Method, r.URL.Path)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("receiver: Content-Type = %q", ct)
	}
	if u, p, _ := r.BasicAuth(); u != "tidemark" || p != testPassword {
		t.Errorf("receiver: basic auth user %q, password ok: %v", u, p == testPassword)
	}
	if err := Verify(testSecret, r.Header.Get(TimestampHeader), string(body), r.Header.Get(DefaultHeader), time.Minute); err != nil {
		t.Errorf("receiver: Verify: %v", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	rc.mu.Lock()
	rc.requests = append(rc.requests, request{body: body})
	n := len(rc.requests)
	rc.mu.Unlock()
	if rc.fail != nil && rc.fail(n, w, r) {
		return
	}
	var p Payload
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		t.Errorf("receiver: decoding %s: %v", body, err)
	}
	if age := time.Since(p.SentAt); age < 0 || age > time.Minute || p.SentAt.Location() != time.UTC {
		t.Errorf("receiver: sent_at %v is not a recent UTC time", p.SentAt)
	}
	rc.mu.Lock()
	rc.acked = append(rc.acked, p.Keys)
	rc.ackedRaw = append(rc.ackedRaw, body)
	rc.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (rc *receiver) snapshot() (reqs []request, acked [][]string, ackedRaw [][]byte) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return slices.Clone(rc.requests), slices.Clone(rc.acked), slices.Clone(rc.ackedRaw)
}

// newSink builds a Sink for rc with fast retries; cfg's zero URL, Secret and
// MaxBackoff are filled in. Its logs are checked for secrets at cleanup.
func newSink(t *testing.T, rc *receiver, cfg Config, opts ...Option) *Sink {
	t.Helper()
	s, _ := newObservedSink(t, rc, cfg, opts...)
	return s
}

// newObservedSink is newSink that also returns the sink's logs.
func newObservedSink(t *testing.T, rc *receiver, cfg Config, opts ...Option) (*Sink, *observer.ObservedLogs) {
	t.Helper()
	if cfg.URL == "" {
		cfg.URL = rc.url()
	}
	if cfg.Secret == "" {
		cfg.Secret = testSecret
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 5 * time.Millisecond
	}
	core, logs := observer.New(zapcore.DebugLevel)
	s, err := New(cfg, zap.New(core), opts...)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		for _, e := range logs.All() {
			line := e.Message
			for k, v := range e.ContextMap() {
				line += fmt.Sprintf(" %s=%v", k, v)
			}
			assertNoSecret(t, "log entry", line)
		}
	})
	return s, logs
}

func makeKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("room:!r%d:members", i)
	}
	return keys
}

func chunk(keys []string, size int) [][]string {
	var out [][]string
	for c := range slices.Chunk(keys, size) {
		out = append(out, c)
	}
	return out
}

func TestInvalidateBatchesInOrder(t *testing.T) {
	odd := []string{`a<b>&c`, `room:!ü:members`, `quote"back\slash`, "tab\tnl\n", ""}
	for _, tc := range []struct {
		name      string
		batchSize int
		keys      []string
		want      [][]string
	}{
		{name: "no keys", batchSize: 3, keys: nil, want: nil},
		{name: "one batch", batchSize: 3, keys: makeKeys(3), want: [][]string{makeKeys(3)}},
		{name: "split with remainder", batchSize: 3, keys: makeKeys(10), want: chunk(makeKeys(10), 3)},
		{name: "exact multiple", batchSize: 2, keys: makeKeys(6), want: chunk(makeKeys(6), 2)},
		{name: "default batch size", keys: makeKeys(1201), want: chunk(makeKeys(1201), DefaultBatchSize)},
		{name: "keys sent exactly", batchSize: 2, keys: odd, want: chunk(odd, 2)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := newReceiver(t, nil)
			s := newSink(t, rc, Config{BatchSize: tc.batchSize})
			if err := s.Invalidate(context.Background(), tc.keys); err != nil {
				t.Fatalf("Invalidate: %v", err)
			}
			reqs, acked, raw := rc.snapshot()
			if len(reqs) != len(tc.want) {
				t.Errorf("got %d requests, want %d", len(reqs), len(tc.want))
			}
			if !slices.EqualFunc(acked, tc.want, slices.Equal) {
				t.Errorf("acknowledged batches %q, want %q", acked, tc.want)
			}
			for _, b := range raw {
				var fields map[string]json.RawMessage
				if err := json.Unmarshal(b, &fields); err != nil || len(fields) != 3 || fields["id"] == nil || fields["keys"] == nil || fields["sent_at"] == nil {
					t.Errorf("body %.200s: want exactly id, keys and sent_at (Invalidate has no positions) (err %v)", b, err)
				}
				var sentAt string
				_ = json.Unmarshal(fields["sent_at"], &sentAt)
				if _, err := time.Parse(time.RFC3339Nano, sentAt); err != nil {
					t.Errorf("sent_at %q is not RFC 3339: %v", sentAt, err)
				}
				if bytes.Contains(b, []byte(`\u003c`)) || bytes.HasSuffix(b, []byte("\n")) {
					t.Errorf("body %q: keys are HTML-escaped or it has a trailing newline", b)
				}
			}
		})
	}
}

func TestInvalidateRetriesTransientFailures(t *testing.T) {
	status := func(code int, hdr ...string) func(http.ResponseWriter) {
		return func(w http.ResponseWriter) {
			for i := 0; i+1 < len(hdr); i += 2 {
				w.Header().Set(hdr[i], hdr[i+1])
			}
			http.Error(w, "try later", code)
		}
	}
	hijack := func(reset bool) func(http.ResponseWriter) {
		return func(w http.ResponseWriter) {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err != nil {
				panic(err)
			}
			if tcp, ok := conn.(*net.TCPConn); ok && reset {
				_ = tcp.SetLinger(0) // close with RST
			}
			_ = conn.Close()
		}
	}
	// Five keys in batches of two: three batches.
	for _, tc := range []struct {
		name     string
		timeout  time.Duration
		failures map[int]func(http.ResponseWriter) // by request number
		wantReqs int
	}{
		{name: "503 twice then 200", failures: map[int]func(http.ResponseWriter){1: status(503), 2: status(503)}, wantReqs: 5},
		{
			name: "500, 429 with Retry-After, 408 in later batches",
			failures: map[int]func(http.ResponseWriter){
				2: status(500), 3: status(429, "Retry-After", "1"), 5: status(408),
			},
			wantReqs: 6,
		},
		{name: "connection reset", failures: map[int]func(http.ResponseWriter){1: hijack(true), 4: hijack(true)}, wantReqs: 5},
		{name: "connection closed without a response", failures: map[int]func(http.ResponseWriter){2: hijack(false)}, wantReqs: 4},
		{name: "no response within the timeout", timeout: 100 * time.Millisecond, failures: map[int]func(http.ResponseWriter){1: nil, 3: nil}, wantReqs: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) bool {
				f, ok := tc.failures[n]
				if !ok {
					return false
				}
				if f == nil { // hang until the client gives up
					select {
					case <-r.Context().Done():
					case <-time.After(5 * time.Second):
					}
					return true
				}
				f(w)
				return true
			})
			s := newSink(t, rc, Config{BatchSize: 2, Timeout: tc.timeout},
				WithDeadLetter(func(_ context.Context, _ []byte, keys []string, err error) error {
					t.Errorf("dead-lettered %q: %v", keys, err)
					return nil
				}))
			keys := makeKeys(5)
			if err := s.Invalidate(context.Background(), keys); err != nil {
				t.Fatalf("Invalidate: %v", err)
			}
			reqs, acked, raw := rc.snapshot()
			if want := chunk(keys, 2); !slices.EqualFunc(acked, want, slices.Equal) {
				t.Errorf("acknowledged batches %q, want %q", acked, want)
			}
			if len(reqs) != tc.wantReqs {
				t.Errorf("got %d requests, want %d", len(reqs), tc.wantReqs)
			}
			// A retry repeats its batch's body exactly.
			var distinct [][]byte
			for _, r := range reqs {
				if len(distinct) == 0 || !bytes.Equal(distinct[len(distinct)-1], r.body) {
					distinct = append(distinct, r.body)
				}
			}
			if !slices.EqualFunc(distinct, raw, bytes.Equal) {
				t.Errorf("request bodies %q, want each acknowledged body %q, repeated on retries", distinct, raw)
			}
		})
	}
}

// deadLetter records the hook's calls.
type deadLetter struct {
	mu    sync.Mutex
	calls []deadLetterCall
	err   error // returned by the hook
}

type deadLetterCall struct {
	body []byte
	keys []string
	err  error
}

func (d *deadLetter) hook(_ context.Context, body []byte, keys []string, err error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, deadLetterCall{body: body, keys: keys, err: err})
	return d.err
}

func TestInvalidateDeadLettersFailedBatches(t *testing.T) {
	// Three keys in batches of two; the receiver always answers status.
	for _, tc := range []struct {
		status    int
		wantTries int // per batch
		wantText  string
	}{
		{status: 500, wantTries: 3, wantText: "after 3 tries: status 500 Internal Server Error"},
		{status: 503, wantTries: 3, wantText: "after 3 tries: status 503"},
		{status: 429, wantTries: 3, wantText: "after 3 tries: status 429"},
		{status: 400, wantTries: 1, wantText: "not retried: status 400 Bad Request"},
		{status: 401, wantTries: 1, wantText: "not retried: status 401"},
		{status: 404, wantTries: 1, wantText: "not retried: status 404"},
		{status: 413, wantTries: 1, wantText: "not retried: status 413"},
		{status: 422, wantTries: 1, wantText: "not retried: status 422"},
		{status: 302, wantTries: 1, wantText: "not retried: status 302"},
	} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) bool {
				if tc.status == 302 {
					w.Header().Set("Location", "/elsewhere")
				}
				http.Error(w, "rejected: no such room", tc.status)
				return true
			})
			var dl deadLetter
			s := newSink(t, rc, Config{BatchSize: 2, MaxAttempts: 3, MaxBackoff: time.Millisecond}, WithDeadLetter(dl.hook))
			keys := makeKeys(3)
			if err := s.Invalidate(context.Background(), keys); err != nil {
				t.Fatalf("Invalidate = %v, want nil (every batch dead-lettered)", err)
			}
			reqs, _, _ := rc.snapshot()
			if len(reqs) != 2*tc.wantTries {
				t.Fatalf("got %d requests, want %d", len(reqs), 2*tc.wantTries)
			}
			want := chunk(keys, 2)
			if len(dl.calls) != len(want) {
				t.Fatalf("dead-letter hook called %d times, want %d", len(dl.calls), len(want))
			}
			for i, c := range dl.calls {
				if !slices.Equal(c.keys, want[i]) {
					t.Errorf("call %d: keys %q, want %q", i, c.keys, want[i])
				}
				for _, r := range reqs[i*tc.wantTries : (i+1)*tc.wantTries] {
					if !bytes.Equal(c.body, r.body) {
						t.Errorf("call %d: body %s, want the body sent, %s", i, c.body, r.body)
					}
				}
				var se *StatusError
				if !errors.As(c.err, &se) || se.StatusCode != tc.status {
					t.Errorf("call %d: error %v, want a *StatusError with status %d", i, c.err, tc.status)
				}
				if msg := c.err.Error(); !strings.Contains(msg, tc.wantText) || !strings.Contains(msg, "rejected: no such room") {
					t.Errorf("call %d: error %q, want it to contain %q and the response body", i, msg, tc.wantText)
				}
				if got, want := Retryable(c.err), tc.wantTries > 1; got != want {
					t.Errorf("Retryable(%v) = %v, want %v", c.err, got, want)
				}
				assertNoSecret(t, "dead-letter error", c.err.Error())
			}
		})
	}
}

func TestInvalidateWithoutDeadLetterReturnsError(t *testing.T) {
	for _, tc := range []struct {
		status        int
		wantTries     int
		wantRetryable bool
	}{
		{status: 500, wantTries: 2, wantRetryable: true},
		{status: 400, wantTries: 1, wantRetryable: false},
	} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			var healthy atomic.Bool
			rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) bool {
				if healthy.Load() {
					return false
				}
				w.WriteHeader(tc.status)
				return true
			})
			s := newSink(t, rc, Config{BatchSize: 2, MaxAttempts: 2, MaxBackoff: time.Millisecond})
			keys := makeKeys(3)
			err := s.Invalidate(context.Background(), keys)
			var se *StatusError
			if !errors.As(err, &se) || se.StatusCode != tc.status {
				t.Fatalf("Invalidate = %v, want a *StatusError with status %d", err, tc.status)
			}
			if Retryable(err) != tc.wantRetryable {
				t.Errorf("Retryable(%v) = %v, want %v", err, !tc.wantRetryable, tc.wantRetryable)
			}
			if !strings.Contains(err.Error(), "(keys 1-2 of 3)") {
				t.Errorf("error %q does not say which keys failed", err)
			}
			assertNoSecret(t, "error", err.Error())
			if reqs, _, _ := rc.snapshot(); len(reqs) != tc.wantTries {
				t.Errorf("got %d requests, want %d (the second batch must not be sent)", len(reqs), tc.wantTries)
			}
			// The caller holds its offsets and repeats the call later.
			healthy.Store(true)
			if err := s.Invalidate(context.Background(), keys); err != nil {
				t.Fatalf("repeated Invalidate: %v", err)
			}
			if _, acked, _ := rc.snapshot(); !slices.EqualFunc(acked, chunk(keys, 2), slices.Equal) {
				t.Errorf("acknowledged %q after the repeat", acked)
			}
		})
	}
}

func TestInvalidateDeadLetterHookFails(t *testing.T) {
	rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) bool {
		w.WriteHeader(http.StatusBadRequest)
		return true
	})
	hookErr := errors.New("dlq topic unavailable")
	dl := deadLetter{err: hookErr}
	s := newSink(t, rc, Config{BatchSize: 2}, WithDeadLetter(dl.hook))
	err := s.Invalidate(context.Background(), makeKeys(4))
	var se *StatusError
	if !errors.Is(err, hookErr) || !errors.As(err, &se) || se.StatusCode != 400 {
		t.Fatalf("Invalidate = %v, want the hook's error and the 400", err)
	}
	if !Retryable(err) {
		t.Errorf("Retryable(%v) = false; the hook may work next time", err)
	}
	if reqs, _, _ := rc.snapshot(); len(reqs) != 1 || len(dl.calls) != 1 {
		t.Errorf("%d requests, %d hook calls; want 1 and 1 (stop at the first batch)", len(reqs), len(dl.calls))
	}
}

func TestInvalidateHonoursContext(t *testing.T) {
	for _, tc := range []struct {
		name string
		fail func(http.ResponseWriter, *http.Request)
	}{
		{name: "during backoff", fail: func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Retry-After", "10")
			w.WriteHeader(http.StatusServiceUnavailable)
		}},
		{name: "during a request", fail: func(_ http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := newReceiver(t, func(_ int, w http.ResponseWriter, r *http.Request) bool {
				tc.fail(w, r)
				return true
			})
			s := newSink(t, rc, Config{MaxAttempts: 100, MaxBackoff: 10 * time.Second, Timeout: 10 * time.Second},
				WithDeadLetter(func(_ context.Context, _ []byte, _ []string, err error) error {
					t.Errorf("dead-lettered after the context ended: %v", err)
					return nil
				}))
			ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
			defer cancel()
			start := time.Now()
			err := s.Invalidate(ctx, makeKeys(3))
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Invalidate = %v, want context.DeadlineExceeded", err)
			}
			if !Retryable(err) {
				t.Errorf("Retryable(%v) = false", err)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("Invalidate returned %v after the start, long after its context ended", d)
			}
			assertNoSecret(t, "error", fmt.Sprint(err))
		})
	}
}

func TestInvalidateKeyNotUTF8(t *testing.T) {
	rc := newReceiver(t, nil)
	var dl deadLetter
	s := newSink(t, rc, Config{BatchSize: 2}, WithDeadLetter(dl.hook))
	keys := []string{"a", "b", "c\xff", "d"}
	if err := s.Invalidate(context.Background(), keys); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	if _, acked, _ := rc.snapshot(); !slices.EqualFunc(acked, [][]string{{"a", "b"}}, slices.Equal) {
		t.Errorf("acknowledged %q, want only the first batch", acked)
	}
	if len(dl.calls) != 1 || !slices.Equal(dl.calls[0].keys, keys[2:]) || Retryable(dl.calls[0].err) {
		t.Fatalf("dead-letter calls %+v, want the second batch with a permanent error", dl.calls)
	}
	if !strings.Contains(dl.calls[0].err.Error(), "not valid UTF-8") {
		t.Errorf("error %q", dl.calls[0].err)
	}
}

func TestRedirectIsNotAnAcknowledgement(t *testing.T) {
	var gets atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("POST /hook", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/done", http.StatusSeeOther)
	})
	mux.HandleFunc("/done", func(w http.ResponseWriter, r *http.Request) {
		gets.Add(1)
		w.WriteHeader(http.StatusOK)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	for _, tc := range []struct {
		name     string
		opts     []Option
		wantText string
		wantGets int32
	}{
		{name: "default client does not follow", wantText: "status 303"},
		{name: "a client that follows", opts: []Option{WithHTTPClient(&http.Client{})}, wantText: "redirected and became a GET", wantGets: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gets.Store(0)
			s, err := New(Config{URL: srv.URL + "/hook", Secret: testSecret, MaxAttempts: 3}, nil, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			err = s.Invalidate(context.Background(), []string{"k"})
			if err == nil || !strings.Contains(err.Error(), tc.wantText) || Retryable(err) {
				t.Errorf("Invalidate = %v, want a permanent error containing %q", err, tc.wantText)
			}
			if gets.Load() != tc.wantGets {
				t.Errorf("%d GETs of the redirect target, want %d", gets.Load(), tc.wantGets)
			}
		})
	}
}

// TestErrorsHideSecrets checks errors of every kind for the secret, the
// URL's password and its query token (logs are checked by newSink).
func TestErrorsHideSecrets(t *testing.T) {
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := strings.Replace(closed.URL, "http://", "http://u:"+testPassword+"@", 1) + "/?token=" + testToken
	closed.Close()

	rc := newReceiver(t, func(_ int, w http.ResponseWriter, r *http.Request) bool {
		switch r.Header.Get("X-Test") {
		case "":
			http.Error(w, "bad", http.StatusBadRequest)
		case "hang":
			<-r.Context().Done()
		}
		return true
	})
	ctx := context.Background()
	var errs []error
	for _, cfg := range []Config{
		{URL: closedURL, Secret: testSecret, MaxAttempts: 2}, // connection refused
		{Secret: testSecret}, // 400
		{Secret: testSecret, Timeout: 20 * time.Millisecond, MaxAttempts: 1},
	} {
		var opts []Option
		if cfg.Timeout > 0 {
			opts = append(opts, WithHTTPClient(&http.Client{Transport: headerTransport{"X-Test", "hang"}}))
		}
		s := newSink(t, rc, cfg, opts...)
		errs = append(errs, s.Invalidate(ctx, []string{"k"}))
	}
	for _, cfg := range []Config{
		{URL: "https://u:" + testPassword + "@h:bad-port/?token=" + testToken, Secret: testSecret},
		{URL: "ftp://u:" + testPassword + "@h/?token=" + testToken, Secret: testSecret},
		{URL: "https://u:" + testPassword + "@/?token=" + testToken, Secret: testSecret, BatchSize: -1},
	} {
		_, err := New(cfg, nil)
		errs = append(errs, err)
	}
	for i, err := range errs {
		if err == nil {
			t.Errorf("case %d: no error", i)
			continue
		}
		assertNoSecret(t, fmt.Sprintf("case %d error", i), err.Error())
	}
	if !strings.Contains(errs[0].Error(), "refused") {
		t.Errorf("connection refused error: %v", errs[0])
	}
	if !strings.Contains(errs[2].Error(), "no response within 20ms") {
		t.Errorf("timeout error: %v", errs[2])
	}
}

// headerTransport adds a header to every request.
type headerTransport struct{ key, value string }

func (h headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(h.key, h.value)
	return http.DefaultTransport.RoundTrip(r)
}

func TestClose(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSink(t, rc, Config{})
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Invalidate(context.Background(), []string{"k"}); !errors.Is(err, ErrClosed) || Retryable(err) {
		t.Errorf("Invalidate after Close = %v, want ErrClosed", err)
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"", 0}, {"3", 3 * time.Second}, {"-1", 0}, {"soon", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0},
	} {
		if got := retryAfter(tc.in, now); got != tc.want {
			t.Errorf("retryAfter(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
