package invalidation

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/pipeline"
)

// TestNewBackOffFirstWait: the first wait is the configured initial
// interval (±50% jitter), not the library's 500ms default.
func TestNewBackOffFirstWait(t *testing.T) {
	for _, initial := range []time.Duration{50 * time.Millisecond, 100 * time.Millisecond} {
		for range 20 {
			bo := newBackOff(initial, 5*time.Second, 0)
			if w := bo.NextBackOff(); w < initial/2 || w > initial*3/2 {
				t.Fatalf("initial %v: first wait %v", initial, w)
			}
		}
	}
}

type nopSink struct{}

func (nopSink) Write(context.Context, []pipeline.Message) error { return nil }
func (nopSink) Close(context.Context) error                     { return nil }

// scripted fails Handle with errs in turn, then succeeds; Flush likewise
// with flushErrs.
type scripted struct {
	errs, flushErrs []error
	calls, flushes  int
}

func (s *scripted) Handle(context.Context, *Message) error {
	s.calls++
	if len(s.errs) == 0 {
		return nil
	}
	err := s.errs[0]
	s.errs = s.errs[1:]
	return err
}

func (s *scripted) Flush(context.Context) error {
	s.flushes++
	if len(s.flushErrs) == 0 {
		return nil
	}
	err := s.flushErrs[0]
	s.flushErrs = s.flushErrs[1:]
	return err
}

func testConsumer(t *testing.T, h Handler) *Consumer {
	t.Helper()
	c, err := NewConsumer(Config{Brokers: []string{"unused:9092"}, Group: "g", Topics: map[string][]string{"t": {"public.x"}},
		Handlers: map[string]Handler{"public.x": h}, DLQTopic: "dlq", DLQ: nopSink{}, MaxAttempts: 3}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestHandleOutcomes: a Permanent error is returned after one attempt, a
// Skip is counted by reason and handled, and a transient error is retried
// with waits that start at the 50ms initial interval (the library default
// of 500ms made three attempts take over 600ms).
func TestHandleOutcomes(t *testing.T) {
	ctx := context.Background()
	m := &Message{Table: "public.x"}

	h := &scripted{errs: []error{Permanent(errors.New("no key")), errors.New("unreached")}}
	c := testConsumer(t, h)
	if err := c.handle(ctx, h, m); !IsPermanent(err) || h.calls != 1 || c.stats.Retries.Load() != 0 {
		t.Errorf("permanent: err %v after %d calls, %d retries; want it at once", err, h.calls, c.stats.Retries.Load())
	}

	h = &scripted{errs: []error{Skip(SkipOpExcluded)}}
	c = testConsumer(t, h)
	if err := c.handle(ctx, h, m); err != nil || h.calls != 1 || c.stats.SkippedBy()[SkipOpExcluded] != 1 || c.stats.Skipped.Load() != 1 {
		t.Errorf("skip: err %v after %d calls, skipped %v", err, h.calls, c.stats.SkippedBy())
	}

	h = &scripted{errs: []error{errors.New("a"), errors.New("b"), errors.New("c")}}
	c = testConsumer(t, h)
	start := time.Now()
	err := c.handle(ctx, h, m)
	took := time.Since(start)
	if err == nil || h.calls != 3 || c.stats.Retries.Load() != 2 {
		t.Errorf("transient: err %v after %d calls, %d retries; want 3 attempts", err, h.calls, c.stats.Retries.Load())
	}
	if took > 400*time.Millisecond { // at most 75ms + 112ms of waits
		t.Errorf("three attempts took %v: the backoff does not start at its initial interval", took)
	}
}

// TestFlushBackoffStartsAtInitialInterval: one failed Flush is retried
// after about 100ms (±50%), not the library's 500ms (±50%) default.
func TestFlushBackoffStartsAtInitialInterval(t *testing.T) {
	h := &scripted{flushErrs: []error{errors.New("redis down")}}
	c := testConsumer(t, h)
	start := time.Now()
	if err := c.flush(context.Background()); err != nil || h.flushes != 2 {
		t.Fatalf("flush: %v after %d calls", err, h.flushes)
	}
	if took := time.Since(start); took > 240*time.Millisecond {
		t.Errorf("one retry took %v", took)
	}
}

// TestHandleTransientHasNoBound: an error marked Transient (infrastructure
// that waiting heals) is retried past MaxAttempts until it works, is never
// returned for dead-lettering, and is warned about once per streak; ctx
// still ends the wait.
func TestHandleTransientHasNoBound(t *testing.T) {
	ctx := context.Background()
	m := &Message{Table: "public.x", Topic: "t"}
	var errs []error
	for range 6 { // twice MaxAttempts
		errs = append(errs, Transient(errors.New("state database down")))
	}
	h := &scripted{errs: errs}
	c := testConsumer(t, h)
	core, logs := observer.New(zap.WarnLevel)
	c.log = zap.New(core)
	c.handleBackoff = func() *backoff.ExponentialBackOff { return newBackOff(time.Millisecond, 2*time.Millisecond, 0) }
	if err := c.handle(ctx, h, m); err != nil || h.calls != 7 || c.stats.Retries.Load() != 6 {
		t.Fatalf("transient: err %v after %d calls, %d retries; want success on call 7", err, h.calls, c.stats.Retries.Load())
	}
	if n := logs.Len(); n != 1 {
		t.Errorf("%d warnings for one streak, want 1: %v", n, logs.All())
	}

	// A non-transient error among them still counts toward MaxAttempts.
	h = &scripted{errs: []error{Transient(errors.New("down")), errors.New("a"), errors.New("b"), errors.New("c")}}
	c = testConsumer(t, h)
	c.handleBackoff = func() *backoff.ExponentialBackOff { return newBackOff(time.Millisecond, 2*time.Millisecond, 0) }
	if err := c.handle(ctx, h, m); err == nil || h.calls != 4 {
		t.Errorf("mixed: err %v after %d calls; want the third ordinary failure returned on call 4", err, h.calls)
	}

	// A stop ends the retries.
	h = &scripted{}
	for range 1000 {
		h.errs = append(h.errs, Transient(errors.New("down")))
	}
	c = testConsumer(t, h)
	cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := c.handle(cctx, h, m); !errors.Is(err, context.DeadlineExceeded) && cctx.Err() == nil {
		t.Errorf("after a stop: %v", err)
	}
}
