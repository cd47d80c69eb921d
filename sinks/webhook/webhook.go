// Package webhook is Tidemark's webhook cache-invalidation sink: it POSTs
// invalidated cache keys, in batches, as signed JSON to an HTTP endpoint.
//
// It has the method set of the invalidation consumer's invalidator contract
// (Invalidate and Close) without importing that package; cmd/ connects them.
//
// # Request
//
// Each batch of up to Config.BatchSize keys is one request:
//
//	POST /hook HTTP/1.1
//	Content-Type: application/json
//	X-Tidemark-Timestamp: 1767225600
//	X-Tidemark-Signature: sha256=3f1c…(64 hex digits)
//
//	{"keys":["room:!r1:members","unread:@u:hs:!r1"],"sent_at":"2026-01-01T00:00:00.123456789Z"}
//
// keys are the cache keys in the order given to Invalidate, exactly as given
// (no HTML escaping). sent_at is when the batch was first sent, in UTC,
// RFC 3339 with nanoseconds (time.RFC3339Nano). A retry sends the identical
// body with a fresh timestamp and signature. Payload describes the body.
//
// # Signature
//
// The signature header (Config.Header, default X-Tidemark-Signature) is
//
//	"sha256=" + lowercase hex( HMAC-SHA256( key = secret, message = timestamp + "." + body ) )
//
// where timestamp is the X-Tidemark-Timestamp value as sent (decimal Unix
// seconds) and body the raw request body. Receivers call Verify with the raw
// body before decoding it: it compares in constant time and rejects
// timestamps too far from the local clock, which stops replays of captured
// requests. Sign computes the value.
//
// # Responses and retries
//
// Any 2xx acknowledges the batch; the response body is ignored. Transport
// failures (refused or reset connections, no response within
// Config.Timeout), 408, 429 and 5xx are retried with exponential backoff
// (100ms doubling up to Config.MaxBackoff, jittered; a Retry-After is
// honoured up to Config.MaxBackoff), at most Config.MaxAttempts tries in
// all. Other statuses are permanent and not retried: 4xx, and 3xx, since
// redirects are not followed (a POST redirected to a GET would be a false
// acknowledgement).
//
// # Guarantees of Invalidate
//
//   - Acknowledged or dead-lettered: it returns nil only once every batch was
//     acknowledged by a 2xx or handed to the dead-letter hook (WithDeadLetter),
//     which returned nil.
//   - Ordered within one call: batches are sent in slice order, and a batch
//     only after the previous one was acknowledged or dead-lettered. Separate
//     concurrent calls are not ordered with respect to each other.
//   - At-least-once and idempotent: a batch may be delivered more than once
//     (a retry after a lost response; the caller repeating a failed call from
//     its start). Receivers must treat invalidations as idempotent.
//
// A batch that fails MaxAttempts times, or permanently, goes to the
// dead-letter hook if one is set, and Invalidate continues with the next
// batch. Without a hook Invalidate returns the error and the caller, which
// holds its offsets, repeats the call later; a receiver that rejects a batch
// for good then blocks the caller, so production setups should set a hook.
// If ctx ends, Invalidate returns ctx's error and dead-letters nothing.
//
// The secret is never logged or put into errors; neither are the URL's
// userinfo and query.
//
// Protocol: HMAC, RFC 2104 (https://www.rfc-editor.org/rfc/rfc2104);
// Retry-After, RFC 9110 section 10.2.3.
package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"
)

// ErrClosed is returned by Invalidate after Close.
var ErrClosed = errors.New("webhook sink: closed")

// Payload is the JSON body of a request.
type Payload struct {
	// Keys are the invalidated cache keys, in order.
	Keys []string `json:"keys"`
	// SentAt is when the batch was first sent (UTC).
	SentAt time.Time `json:"sent_at"`
}

// DeadLetterFunc receives a batch that could not be delivered: the request
// body as sent, its keys, and the error of the last try. It is called from
// Invalidate's goroutine, before the next batch is sent; it may keep body
// and keys. If it returns nil the batch counts as handled; an error stops
// Invalidate, which returns it together with the delivery error.
type DeadLetterFunc func(ctx context.Context, body []byte, keys []string, err error) error

// Option configures optional parts of a Sink.
type Option interface{ apply(*options) }

type options struct {
	client     *http.Client
	deadLetter DeadLetterFunc
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

// WithHTTPClient makes the sink send through c (for its transport: proxies,
// TLS settings, connection pools). Config.Timeout still bounds each
// request. c should not follow redirects; if it follows one that turns the
// POST into another method, the response is treated as a permanent
// failure. Default: a client on http.DefaultTransport that follows no
// redirects. A nil c means the default.
func WithHTTPClient(c *http.Client) Option {
	return optionFunc(func(o *options) { o.client = c })
}

// WithDeadLetter sets the hook that receives batches that could not be
// delivered (see DeadLetterFunc). Default none: Invalidate returns the
// error instead.
func WithDeadLetter(fn DeadLetterFunc) Option {
	return optionFunc(func(o *options) { o.deadLetter = fn })
}

// Sink POSTs invalidated cache keys to a webhook. It is safe for concurrent
// use. Create it with New.
type Sink struct {
	cfg        Config // with defaults applied
	where      string // the URL without userinfo and query, for logs and errors
	log        *zap.Logger
	client     *http.Client
	ownClient  bool
	deadLetter DeadLetterFunc

	closed    atomic.Bool
	closeOnce sync.Once
}

// New validates cfg and builds a Sink. It does not connect: the first
// Invalidate does. A nil log means a no-op logger.
func New(cfg Config, log *zap.Logger, opts ...Option) (*Sink, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("webhook sink config: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	var o options
	for _, opt := range opts {
		opt.apply(&o)
	}
	cfg = cfg.withDefaults()
	s := &Sink{
		cfg:        cfg,
		where:      safeURL(cfg.URL),
		client:     o.client,
		deadLetter: o.deadLetter,
	}
	if s.client == nil {
		s.client = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		s.ownClient = true
	}
	s.log = log.With(zap.String("component", "sinks/webhook"), zap.String("url", s.where))
	return s, nil
}

// Invalidate POSTs keys to the webhook in batches of Config.BatchSize, in
// order, and returns once every batch was acknowledged or dead-lettered, or
// an error. It does not keep keys after returning (except through the
// dead-letter hook's copy). See the package documentation for ordering,
// retries and dead-lettering.
func (s *Sink) Invalidate(ctx context.Context, keys []string) error {
	if s.closed.Load() {
		return ErrClosed
	}
	for start := 0; start < len(keys); start += s.cfg.BatchSize {
		end := min(start+s.cfg.BatchSize, len(keys))
		batch := keys[start:end]
		body, err := encode(batch)
		if err == nil {
			err = s.deliver(ctx, body)
		}
		if err == nil {
			continue
		}
		what := fmt.Sprintf("webhook POST %s", s.where)
		switch {
		case start > 0:
			what += fmt.Sprintf(" (keys %d-%d of %d; earlier batches done)", start+1, end, len(keys))
		case end < len(keys):
			what += fmt.Sprintf(" (keys %d-%d of %d)", start+1, end, len(keys))
		default:
			what += fmt.Sprintf(" (%d keys)", len(keys))
		}
		err = fmt.Errorf("%s: %w", what, err)
		if ctx.Err() != nil || s.deadLetter == nil {
			return err
		}
		if dlErr := s.deadLetter(ctx, body, slices.Clone(batch), err); dlErr != nil {
			return &deadLetterError{hook: dlErr, delivery: err}
		}
		s.log.Error("webhook batch dead-lettered", zap.Int("keys", len(batch)), zap.Error(err))
	}
	return nil
}

// encode builds a batch's request body. Keys that JSON cannot carry
// exactly (not valid UTF-8) make a permanent error; the body is still
// returned, for the dead-letter hook.
func encode(keys []string) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(Payload{Keys: keys, SentAt: time.Now().UTC()}); err != nil {
		return nil, &permanentError{fmt.Errorf("encoding the request body: %w", err)}
	}
	body := bytes.TrimSuffix(buf.Bytes(), []byte{'\n'})
	for i, k := range keys {
		if !utf8.ValidString(k) {
			return body, &permanentError{fmt.Errorf("key %d of the batch is not valid UTF-8, which JSON cannot carry exactly; not sent", i+1)}
		}
	}
	return body, nil
}

// deliver POSTs body until it is acknowledged, MaxAttempts tries failed, a
// try failed permanently or ctx ended.
func (s *Sink) deliver(ctx context.Context, body []byte) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = min(100*time.Millisecond, s.cfg.MaxBackoff)
	bo.Multiplier = 2
	bo.MaxInterval = s.cfg.MaxBackoff
	bo.MaxElapsedTime = 0
	bo.Reset()
	for attempt := 1; ; attempt++ {
		err := s.post(ctx, body)
		if err == nil {
			if attempt > 1 {
				s.log.Info("webhook batch delivered after retries", zap.Int("attempts", attempt))
			}
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("try %d: %w", attempt, err)
		}
		if !Retryable(err) {
			return fmt.Errorf("not retried: %w", err)
		}
		if attempt >= s.cfg.MaxAttempts {
			if attempt == 1 {
				return fmt.Errorf("after 1 try: %w", err)
			}
			return fmt.Errorf("after %d tries: %w", attempt, err)
		}
		wait := bo.NextBackOff()
		if se := (*StatusError)(nil); errors.As(err, &se) && se.RetryAfter > wait {
			wait = min(se.RetryAfter, s.cfg.MaxBackoff)
		}
		if attempt == 1 {
			s.log.Warn("webhook request failed; retrying", zap.Error(err), zap.Int("attempt", attempt),
				zap.Int("max_attempts", s.cfg.MaxAttempts), zap.Duration("backoff", wait))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("waiting to retry after try %d (%v): %w", attempt, err, ctx.Err())
		case <-t.C:
		}
	}
}

// post makes one try: it signs body with a fresh timestamp, sends it and
// reads the response.
func (s *Sink) post(ctx context.Context, body []byte) error {
	rctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, s.cfg.URL, bytes.NewReader(body))
	if err != nil {
		// The URL was validated; this is not expected. Its error may show the
		// URL, so it is not wrapped.
		return &permanentError{errors.New("building the request failed")}
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "tidemark-webhook")
	req.Header.Set(TimestampHeader, ts)
	req.Header.Set(s.cfg.Header, Sign(s.cfg.Secret, ts, body))
	resp, err := s.client.Do(req)
	if err != nil {
		// A *url.Error repeats the URL, userinfo included: keep only its cause.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("no response within %v (webhook timeout): %w", s.cfg.Timeout, err)
		}
		return err
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	// Drain a little more so that the connection can be reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.Request != nil && resp.Request.Method != http.MethodPost {
		return &permanentError{fmt.Errorf("the request was redirected and became a %s; set url to the final address", resp.Request.Method)}
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	return &StatusError{
		StatusCode: resp.StatusCode,
		Body:       strings.ToValidUTF8(string(snippet), "\uFFFD"),
		RetryAfter: retryAfter(resp.Header.Get("Retry-After"), time.Now()),
	}
}

// retryAfter parses a Retry-After value (seconds or an HTTP date); 0 if
// absent or invalid.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil {
		if n < 0 {
			return 0
		}
		return time.Duration(min(n, 24*3600)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// StatusError is a response with a status other than 2xx.
type StatusError struct {
	// StatusCode is the HTTP status.
	StatusCode int
	// Body is the start of the response body (at most 256 bytes).
	Body string
	// RetryAfter is the response's Retry-After, 0 if none.
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	s := fmt.Sprintf("status %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	if b := strings.TrimSpace(e.Body); b != "" {
		s += fmt.Sprintf(": %q", b)
	}
	return s
}

// Retryable reports whether the status may pass on a later try: 408, 429
// and 5xx.
func (e *StatusError) Retryable() bool {
	return e.StatusCode == http.StatusRequestTimeout || e.StatusCode == http.StatusTooManyRequests || e.StatusCode >= 500
}

// permanentError marks a failure that a later try would repeat.
type permanentError struct{ err error }

func (e *permanentError) Error() string   { return e.err.Error() }
func (e *permanentError) Unwrap() error   { return e.err }
func (e *permanentError) Retryable() bool { return false }

// deadLetterError is a batch that was neither delivered nor dead-lettered.
type deadLetterError struct{ hook, delivery error }

func (e *deadLetterError) Error() string {
	return fmt.Sprintf("dead-letter hook failed: %v; the batch it was given: %v", e.hook, e.delivery)
}
func (e *deadLetterError) Unwrap() []error { return []error{e.hook, e.delivery} }

// Retryable is true: the hook may work next time, whatever the delivery
// error was.
func (e *deadLetterError) Retryable() bool { return true }

// Retryable reports whether repeating the call that returned err may
// succeed: false for nil, ErrClosed and permanent failures (a 4xx other
// than 408 and 429, a redirect, a key JSON cannot carry), true otherwise
// (transport failures, timeouts, 408, 429, 5xx, an ended context, a failing
// dead-letter hook).
func Retryable(err error) bool {
	if err == nil || errors.Is(err, ErrClosed) {
		return false
	}
	var r interface{ Retryable() bool }
	if errors.As(err, &r) {
		return r.Retryable()
	}
	return true
}

// Close marks the sink closed: later calls of Invalidate return ErrClosed;
// calls in flight finish. It closes the default client's idle connections
// (not those of a client given with WithHTTPClient). It is idempotent and
// returns nil.
func (s *Sink) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		if s.ownClient {
			s.client.CloseIdleConnections()
		}
		s.log.Info("webhook sink closed")
	})
	return nil
}
