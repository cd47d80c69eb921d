// Package webhook is Tidemark's webhook cache-invalidation sink: it POSTs
// invalidated cache keys, in batches, as signed JSON to an HTTP endpoint.
//
// It has the method set of the invalidation consumer's invalidator contract
// (Invalidate and Close) and, with its own KeyAt, of its positioned
// variant (InvalidateAt), without importing that package; cmd/ connects
// them.
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
//	{"id":"9b2f…(32 hex digits)","keys":["room:!r1:members","unread:@u:hs:!r1"],
//	 "positions":["24631152:0","24631152:3"],"sent_at":"2026-01-01T00:00:00.123456789Z"}
//
// keys are the cache keys in the order given to Invalidate, exactly as given
// (no HTML escaping). positions (only from InvalidateAt) has one entry per
// key: the position of the change that invalidated it. id identifies the
// batch for receivers that dedupe. sent_at is when the batch was first sent,
// in UTC, RFC 3339 with nanoseconds (time.RFC3339Nano). A retry, and a
// resend from the dead-letter topic (Resend), sends the identical body with
// a fresh timestamp and signature. Payload describes the body; fields may be
// added, so receivers should ignore unknown ones.
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
// honoured up to Config.MaxBackoff). Other statuses are permanent: 4xx, and
// 3xx, since redirects are not followed (a POST redirected to a GET would be
// a false acknowledgement).
//
// What happens to a batch the receiver does not accept is Config.OnFailure:
//
//   - dlq (default): at most Config.MaxAttempts tries in all, one for a
//     permanent failure; then the batch goes to the dead-letter hook
//     (WithDeadLetter) and Invalidate continues with the next batch.
//     Without a hook Invalidate returns the error and the caller, which
//     holds its offsets, repeats the call later.
//   - hold: every failure, permanent ones included, is retried with backoff
//     and without bound until the receiver accepts the batch or ctx ends;
//     Invalidate blocks meanwhile, so the caller's offsets stay held.
//
// The first failed try after an accepted batch is logged (a warning), as is
// the first dead-lettered batch and the recovery; in between failures are
// only counted (Stats), so an outage of hours logs three lines.
//
// # Guarantees of Invalidate
//
//   - Acknowledged or dead-lettered: it returns nil only once every batch was
//     acknowledged by a 2xx or handed to the dead-letter hook, which returned
//     nil. In hold mode only a batch no receiver could take (a key that is
//     not valid UTF-8) is dead-lettered.
//   - Ordered within one call: batches are sent in slice order, and a batch
//     only after the previous one was acknowledged or dead-lettered. Separate
//     concurrent calls are not ordered with respect to each other.
//   - At-least-once and idempotent: a batch may be delivered more than once
//     (a retry after a lost response; the caller repeating a failed call from
//     its start; a replay from the dead-letter topic). Receivers must treat
//     invalidations as idempotent, or dedupe on the payload's id.
//
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
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
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

	"github.com/tidemark/tidemark/pipeline"
)

// ErrClosed is returned by Invalidate after Close.
var ErrClosed = errors.New("webhook sink: closed")

// Payload is the JSON body of a request.
type Payload struct {
	// ID identifies the batch, 32 hex digits. Retries and resends from the
	// dead-letter topic (tidemark dlq replay) carry the same ID. With
	// Positions it is derived from the keys and positions, so the same
	// batch of the same changes, cut again after a consumer restart, has
	// the same ID too; without, it is random. Receivers that must act once
	// per batch dedupe on it; a new ID does not mean new changes.
	ID string `json:"id"`
	// Keys are the invalidated cache keys, in order.
	Keys []string `json:"keys"`
	// Positions, when present, has one entry per key: the position
	// ("commitLSN:seq", decimal, as in the <prefix>.invalidations topic) of
	// the latest change in the batch that invalidated Keys[i]. Absent for
	// keys given without positions (Invalidate).
	Positions []string `json:"positions,omitempty"`
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
	stats     Stats

	mu           sync.Mutex
	failingSince time.Time // zero while the receiver accepts
	failedTries  int       // since failingSince
	deadSinceOK  int       // batches dead-lettered since the last accepted one
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

// KeyAt is an invalidated key and the position of the change that
// invalidated it (the invalidation consumer's invalidation.KeyAt, restated:
// this package does not import its caller).
type KeyAt struct {
	Key string
	Pos pipeline.Position
}

// Invalidate POSTs keys to the webhook in batches of Config.BatchSize, in
// order, and returns once every batch was acknowledged or dead-lettered, or
// an error. Its payloads carry no positions. It does not keep keys after
// returning (except through the dead-letter hook's copy). See the package
// documentation for ordering, retries and dead-lettering.
func (s *Sink) Invalidate(ctx context.Context, keys []string) error {
	return s.invalidate(ctx, keys, nil)
}

// InvalidateAt is Invalidate for keys with the positions of the changes
// that invalidated them: each payload carries the positions, and its id is
// derived from the keys and positions (see Payload).
func (s *Sink) InvalidateAt(ctx context.Context, keys []KeyAt) error {
	ks := make([]string, len(keys))
	pos := make([]string, len(keys))
	for i, k := range keys {
		ks[i], pos[i] = k.Key, k.Pos.String()
	}
	return s.invalidate(ctx, ks, pos)
}

// invalidate sends keys (with pos, one per key, or none) in batches.
func (s *Sink) invalidate(ctx context.Context, keys, pos []string) error {
	if s.closed.Load() {
		return ErrClosed
	}
	for start := 0; start < len(keys); start += s.cfg.BatchSize {
		end := min(start+s.cfg.BatchSize, len(keys))
		batch := keys[start:end]
		var batchPos []string
		if pos != nil {
			batchPos = pos[start:end]
		}
		body, err := encode(batch, batchPos)
		if err == nil {
			err = s.deliver(ctx, body)
		}
		if err == nil {
			s.delivered()
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
		s.deadLettered(len(batch), err)
	}
	return nil
}

// Resend POSTs body, a request body this package built (read back from the
// dead-letter topic, say), once more: unchanged, so its id and sent_at stay,
// and signed anew with the current secret and a fresh timestamp. It retries
// as Invalidate does (in hold mode without bound) and dead-letters nothing:
// a batch still refused comes back as the error. A body that is not a JSON
// object with a "keys" array is refused without sending.
func (s *Sink) Resend(ctx context.Context, body []byte) error {
	if s.closed.Load() {
		return ErrClosed
	}
	var p struct {
		Keys *[]string `json:"keys"`
	}
	if err := json.Unmarshal(body, &p); err != nil || p.Keys == nil {
		return &permanentError{errors.New("not a webhook batch (want a JSON object with a keys array); not sent")}
	}
	if err := s.deliver(ctx, body); err != nil {
		return fmt.Errorf("webhook POST %s (%d keys): %w", s.where, len(*p.Keys), err)
	}
	s.delivered()
	return nil
}

// encode builds a batch's request body. Keys that JSON cannot carry
// exactly (not valid UTF-8) make a permanent error; the body is still
// returned, for the dead-letter hook.
func encode(keys, pos []string) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(Payload{ID: batchID(keys, pos), Keys: keys, Positions: pos, SentAt: time.Now().UTC()}); err != nil {
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

// batchID is a batch's Payload.ID: with positions, a hash of the keys and
// positions (the same batch of the same changes gets the same id); without,
// random (two such batches must never look like one).
func batchID(keys, pos []string) string {
	if pos == nil {
		var b [16]byte
		_, _ = rand.Read(b[:])
		return hex.EncodeToString(b[:])
	}
	h := sha256.New()
	for i, k := range keys {
		h.Write([]byte(k))
		h.Write([]byte{0})
		h.Write([]byte(pos[i]))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// deliver POSTs body until it is acknowledged or ctx ends; in dlq mode also
// until MaxAttempts tries failed or a try failed permanently.
func (s *Sink) deliver(ctx context.Context, body []byte) error {
	hold := s.cfg.OnFailure == OnFailureHold
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = min(100*time.Millisecond, s.cfg.MaxBackoff)
	bo.Multiplier = 2
	bo.MaxInterval = s.cfg.MaxBackoff
	bo.MaxElapsedTime = 0
	bo.Reset()
	for attempt := 1; ; attempt++ {
		err := s.post(ctx, body)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			// Stopped: the stop is the outcome (retryable), whatever the
			// last try answered (a 400 must not read as permanent).
			return fmt.Errorf("try %d (%v): %w", attempt, err, ctx.Err())
		}
		if !hold {
			if !Retryable(err) {
				s.failed(err)
				return fmt.Errorf("not retried: %w", err)
			}
			if attempt >= s.cfg.MaxAttempts {
				s.failed(err)
				if attempt == 1 {
					return fmt.Errorf("after 1 try: %w", err)
				}
				return fmt.Errorf("after %d tries: %w", attempt, err)
			}
		}
		wait := bo.NextBackOff()
		if se := (*StatusError)(nil); errors.As(err, &se) && se.RetryAfter > wait {
			wait = min(se.RetryAfter, s.cfg.MaxBackoff)
		}
		s.failed(err)
		s.stats.Retries.Add(1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("waiting to retry after try %d (%v): %w", attempt, err, ctx.Err())
		case <-t.C:
		}
	}
}

// failed notes a failed try. The first failure after a success (or since
// the start) is logged; later ones only counted, until a batch is accepted.
func (s *Sink) failed(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failingSince.IsZero() {
		s.failingSince = time.Now()
		s.stats.Failing.Store(true)
		if s.cfg.OnFailure == OnFailureHold {
			s.log.Warn("webhook receiver failing; holding its batches and retrying with backoff until it accepts (offsets are held; logged again when it recovers)",
				zap.Error(err))
		} else {
			then := "dead-lettered"
			if s.deadLetter == nil {
				then = "given up (an error to the caller)"
			}
			s.log.Warn("webhook receiver failing; each batch is tried up to max_attempts times, then "+then+" (logged again when it recovers)",
				zap.Error(err), zap.Int("max_attempts", s.cfg.MaxAttempts))
		}
	}
	s.failedTries++
}

// delivered notes an accepted batch, and logs a recovery.
func (s *Sink) delivered() {
	s.stats.Delivered.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.failingSince.IsZero() {
		s.log.Info("webhook receiver accepting again", zap.Duration("failed_for", time.Since(s.failingSince).Round(time.Millisecond)),
			zap.Int("failed_tries", s.failedTries), zap.Int("dead_lettered_batches", s.deadSinceOK))
	}
	s.failingSince, s.failedTries, s.deadSinceOK = time.Time{}, 0, 0
	s.stats.Failing.Store(false)
}

// deadLettered notes a dead-lettered batch: the first one since the last
// accepted batch is logged, the rest counted.
func (s *Sink) deadLettered(keys int, err error) {
	s.stats.DeadLettered.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deadSinceOK++
	if s.deadSinceOK == 1 {
		s.log.Error("webhook batch dead-lettered; later ones are counted (tidemark_webhook_dead_lettered_total), not logged, until a batch is accepted; resend them with `tidemark dlq replay --source webhook`",
			zap.Int("keys", keys), zap.Error(err))
	}
}

// Stats are the sink's counters, safe to read at any time.
type Stats struct {
	// Delivered counts batches the receiver acknowledged.
	Delivered atomic.Uint64
	// Retries counts failed tries that were retried.
	Retries atomic.Uint64
	// DeadLettered counts batches handed to the dead-letter hook.
	DeadLettered atomic.Uint64
	// Failing is true from a failed try until the next acknowledged batch.
	Failing atomic.Bool
}

// Stats returns the sink's counters.
func (s *Sink) Stats() *Stats { return &s.stats }

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
