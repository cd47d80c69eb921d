package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/pipeline"
)

// levels counts log entries by level.
func levels(logs *observer.ObservedLogs) map[zapcore.Level]int {
	n := map[zapcore.Level]int{}
	for _, e := range logs.All() {
		n[e.Level]++
	}
	return n
}

// TestHoldRetriesUntilAccepted: in hold mode a receiver that fails in every
// way (5xx, a permanent 4xx, a reset connection) for many tries gets each
// batch exactly once, in order, once it accepts; nothing is dead-lettered,
// and the outage logs one warning and one recovery line, not one per try.
func TestHoldRetriesUntilAccepted(t *testing.T) {
	const refusals = 12
	rc := newReceiver(t, func(n int, w http.ResponseWriter, _ *http.Request) bool {
		if n > refusals {
			return false
		}
		switch n % 3 {
		case 0:
			http.Error(w, "down", http.StatusServiceUnavailable)
		case 1:
			http.Error(w, "no such route (deploying)", http.StatusNotFound)
		default:
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.Close()
			}
		}
		return true
	})
	var dl deadLetter
	s, logs := newObservedSink(t, rc, Config{BatchSize: 2, OnFailure: OnFailureHold, MaxBackoff: time.Millisecond}, WithDeadLetter(dl.hook))
	keys := makeKeys(5)
	if err := s.Invalidate(context.Background(), keys); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	reqs, acked, _ := rc.snapshot()
	if want := chunk(keys, 2); !slices.EqualFunc(acked, want, slices.Equal) {
		t.Errorf("acknowledged batches %q, want %q, each once", acked, want)
	}
	if len(reqs) != refusals+3 {
		t.Errorf("%d requests, want %d refused + 3 accepted", len(reqs), refusals)
	}
	if len(dl.calls) != 0 {
		t.Errorf("hold dead-lettered %d batches", len(dl.calls))
	}
	st := s.Stats()
	if st.Retries.Load() != refusals || st.Delivered.Load() != 3 || st.DeadLettered.Load() != 0 || st.Failing.Load() {
		t.Errorf("stats: retries %d delivered %d dead-lettered %d failing %v; want %d, 3, 0, false",
			st.Retries.Load(), st.Delivered.Load(), st.DeadLettered.Load(), st.Failing.Load(), refusals)
	}
	if n := levels(logs); n[zapcore.WarnLevel] != 1 || n[zapcore.ErrorLevel] != 0 ||
		logs.FilterMessageSnippet("accepting again").Len() != 1 {
		t.Errorf("logs %v by level (%d lines), want one warning and one recovery line for the outage", n, logs.Len())
	}
}

// TestHoldHonoursContext: a hold that never succeeds ends with ctx, reports
// the failure in Stats and dead-letters nothing.
func TestHoldHonoursContext(t *testing.T) {
	rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) bool {
		w.WriteHeader(http.StatusBadRequest)
		return true
	})
	var dl deadLetter
	s := newSink(t, rc, Config{OnFailure: OnFailureHold, MaxBackoff: time.Millisecond}, WithDeadLetter(dl.hook))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err := s.Invalidate(ctx, makeKeys(2))
	if !errors.Is(err, context.DeadlineExceeded) || !Retryable(err) {
		t.Errorf("Invalidate = %v, want a retryable context.DeadlineExceeded", err)
	}
	if reqs, _, _ := rc.snapshot(); len(reqs) < 5 {
		t.Errorf("%d tries in 200ms; hold should keep trying", len(reqs))
	}
	if len(dl.calls) != 0 || !s.Stats().Failing.Load() {
		t.Errorf("%d dead letters, failing %v; want 0 and true", len(dl.calls), s.Stats().Failing.Load())
	}
}

// TestDeadLettersLogOncePerOutage: in dlq mode a receiver that is down
// dead-letters every batch, counted; one warning and one error are logged
// for the whole outage.
func TestDeadLettersLogOncePerOutage(t *testing.T) {
	rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) bool {
		w.WriteHeader(http.StatusBadGateway)
		return true
	})
	var dl deadLetter
	s, logs := newObservedSink(t, rc, Config{BatchSize: 1, MaxAttempts: 2, MaxBackoff: time.Millisecond}, WithDeadLetter(dl.hook))
	for range 3 {
		if err := s.Invalidate(context.Background(), makeKeys(2)); err != nil {
			t.Fatalf("Invalidate: %v", err)
		}
	}
	if len(dl.calls) != 6 || s.Stats().DeadLettered.Load() != 6 || s.Stats().Retries.Load() != 6 {
		t.Errorf("%d dead-letter calls, stats %d dead-lettered %d retries; want 6, 6, 6",
			len(dl.calls), s.Stats().DeadLettered.Load(), s.Stats().Retries.Load())
	}
	if n := levels(logs); n[zapcore.WarnLevel] != 1 || n[zapcore.ErrorLevel] != 1 {
		t.Errorf("logs %v by level, want one warning and one error for the outage", n)
	}
	if e := logs.FilterLevelExact(zapcore.ErrorLevel).All(); len(e) == 1 && !strings.Contains(e[0].Message, "tidemark dlq replay") {
		t.Errorf("the dead-letter error %q does not say how to resend", e[0].Message)
	}
}

// TestInvalidateAtCarriesPositions: InvalidateAt's payloads carry one
// position per key and an id derived from keys and positions; Invalidate's
// ids are random.
func TestInvalidateAtCarriesPositions(t *testing.T) {
	rc := newReceiver(t, nil)
	s := newSink(t, rc, Config{BatchSize: 2})
	at := []KeyAt{
		{Key: "room:!a:members", Pos: pipeline.Position{CommitLSN: 100, Seq: 0}},
		{Key: "user:@u:rooms", Pos: pipeline.Position{CommitLSN: 100, Seq: 1}},
		{Key: "room:!b:members", Pos: pipeline.Position{CommitLSN: 4294967396, Seq: 7}},
	}
	ctx := context.Background()
	for range 2 { // the same changes twice
		if err := s.InvalidateAt(ctx, at); err != nil {
			t.Fatal(err)
		}
	}
	moved := slices.Clone(at)
	moved[0].Pos.CommitLSN = 200 // a later change of the same key
	if err := s.InvalidateAt(ctx, moved); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := s.Invalidate(ctx, []string{"k"}); err != nil {
			t.Fatal(err)
		}
	}
	_, _, raw := rc.snapshot()
	if len(raw) != 8 {
		t.Fatalf("%d batches, want 8", len(raw))
	}
	ps := make([]Payload, len(raw))
	for i, b := range raw {
		if err := json.Unmarshal(b, &ps[i]); err != nil {
			t.Fatal(err)
		}
		if len(ps[i].ID) != 32 {
			t.Errorf("batch %d: id %q, want 32 hex digits", i, ps[i].ID)
		}
	}
	if want := []string{"100:0", "100:1"}; !slices.Equal(ps[0].Positions, want) || !slices.Equal(ps[0].Keys, []string{at[0].Key, at[1].Key}) {
		t.Errorf("first batch keys %q positions %q, want positions %q", ps[0].Keys, ps[0].Positions, want)
	}
	if want := []string{"4294967396:7"}; !slices.Equal(ps[1].Positions, want) {
		t.Errorf("second batch positions %q, want %q", ps[1].Positions, want)
	}
	if ps[0].ID != ps[2].ID || ps[1].ID != ps[3].ID || ps[0].ID == ps[1].ID {
		t.Errorf("ids %s %s %s %s: want the same for the same changes, different for others", ps[0].ID, ps[1].ID, ps[2].ID, ps[3].ID)
	}
	if ps[4].ID == ps[0].ID || ps[5].ID != ps[1].ID {
		t.Errorf("a later change of a key kept the batch id (%s), or an unchanged batch changed it", ps[4].ID)
	}
	if ps[6].ID == ps[7].ID || ps[6].Positions != nil || bytes.Contains(raw[6], []byte("positions")) {
		t.Errorf("Invalidate's batches: ids %s %s, body %s; want random ids and no positions", ps[6].ID, ps[7].ID, raw[6])
	}
}

// TestResend: a dead-lettered body is sent again unchanged, signed anew
// (the receiver verifies it with a fresh timestamp); a body that is not a
// batch is refused without a request.
func TestResend(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) bool {
		if down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	var dl deadLetter
	s := newSink(t, rc, Config{MaxAttempts: 1}, WithDeadLetter(dl.hook))
	if err := s.InvalidateAt(context.Background(), []KeyAt{{Key: "k", Pos: pipeline.Position{CommitLSN: 9}}}); err != nil {
		t.Fatal(err)
	}
	if len(dl.calls) != 1 {
		t.Fatalf("%d dead letters, want 1", len(dl.calls))
	}
	body := dl.calls[0].body
	if err := s.Resend(context.Background(), body); err == nil || !Retryable(err) {
		t.Errorf("Resend to a receiver still down = %v, want a retryable error", err)
	}
	down.Store(false)
	if err := s.Resend(context.Background(), body); err != nil {
		t.Fatalf("Resend: %v", err)
	}
	if _, _, raw := rc.snapshot(); len(raw) != 1 || !bytes.Equal(raw[0], body) {
		t.Errorf("acknowledged %q, want the dead-lettered body %q once", raw, body)
	}
	before, _, _ := rc.snapshot()
	for _, bad := range []string{`not json`, `{"id":"x"}`, `["keys"]`} {
		if err := s.Resend(context.Background(), []byte(bad)); err == nil || Retryable(err) {
			t.Errorf("Resend(%s) = %v, want a permanent error", bad, err)
		}
	}
	if after, _, _ := rc.snapshot(); len(after) != len(before) {
		t.Errorf("bodies that are not batches were sent")
	}
}
