package invalidation

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

// capturingSink records every message written; it fails the test when
// Write is called concurrently (the pipeline.Sink contract forbids it).
type capturingSink struct {
	t       *testing.T
	busy    atomic.Bool
	mu      sync.Mutex
	msgs    []pipeline.Message
	written chan struct{}
}

func (s *capturingSink) Write(_ context.Context, msgs []pipeline.Message) error {
	if !s.busy.CompareAndSwap(false, true) {
		s.t.Error("Sink.Write called concurrently")
	}
	defer s.busy.Store(false)
	time.Sleep(time.Millisecond) // widen the window for a concurrent call
	s.mu.Lock()
	s.msgs = append(s.msgs, msgs...)
	s.mu.Unlock()
	select {
	case s.written <- struct{}{}:
	default:
	}
	return nil
}

func (s *capturingSink) Close(context.Context) error { return nil }

// watermarks returns the watermark records written so far.
func (s *capturingSink) watermarks(t *testing.T) []Watermark {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Watermark
	for _, m := range s.msgs {
		if string(m.Key) != WatermarkKey {
			continue
		}
		if !m.Broadcast || len(m.Headers) != 1 || m.Headers[0].Key != ControlHeader || string(m.Headers[0].Value) != ControlWatermark {
			t.Fatalf("watermark record %+v: want Broadcast and the header %s: %s", m, ControlHeader, ControlWatermark)
		}
		var w Watermark
		if err := json.Unmarshal(m.Value, &w); err != nil {
			t.Fatalf("watermark value %q: %v", m.Value, err)
		}
		out = append(out, w)
	}
	return out
}

func waitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestTopicInvalidatorWatermarks: Run writes watermarks (broadcast, with the
// control header) also when idle, carrying the newest durable position; a
// change received and not yet durable holds them after one interval, and
// they resume at its position once Settled; writes are never concurrent.
func TestTopicInvalidatorWatermarks(t *testing.T) {
	sink := &capturingSink{t: t, written: make(chan struct{}, 1)}
	ti := &TopicInvalidator{Topic: "tm.invalidations", Sink: sink, WatermarkInterval: 10 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = ti.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()

	last := func() Watermark {
		ws := sink.watermarks(t)
		if len(ws) == 0 {
			return Watermark{}
		}
		return ws[len(ws)-1]
	}
	waitCond(t, "an idle watermark", func() bool { return len(sink.watermarks(t)) >= 2 })
	if w := last(); w.Position != (pipeline.Position{}).String() {
		t.Errorf("idle watermark position %q, want the zero position", w.Position)
	}
	if w := last(); time.Since(w.At) > time.Minute || w.At.Location() != time.UTC {
		t.Errorf("watermark at %v, want now in UTC", w.At)
	}

	// Invalidations made durable move the watermark; concurrent writes
	// with Run are serialised.
	p1 := pipeline.Position{CommitLSN: 100, Seq: 2}
	for range 20 {
		ti.Received(p1)
		ti.HandedOver()
		if err := ti.InvalidateAt(ctx, []KeyAt{{Key: "a", Pos: pipeline.Position{CommitLSN: 100, Seq: 1}}, {Key: "b", Pos: p1}}); err != nil {
			t.Fatal(err)
		}
	}
	waitCond(t, "a watermark at "+p1.String(), func() bool { return last().Position == p1.String() })

	// A received change whose invalidations are not durable holds them.
	p2 := pipeline.Position{CommitLSN: 200, Seq: 0}
	ti.Received(p2)
	waitCond(t, "watermarks held", func() bool { return ti.WatermarksHeld.Load() >= 3 })
	n := len(sink.watermarks(t))
	time.Sleep(50 * time.Millisecond)
	if got := len(sink.watermarks(t)); got != n {
		t.Errorf("%d watermarks written while a received change was not durable", got-n)
	}
	if w := last(); w.Position != p1.String() {
		t.Errorf("held watermark claims %q, want %q", w.Position, p1)
	}

	// Settled (the handler flushed every sink, also for changes without
	// keys): they resume at the received position.
	ti.Settled()
	waitCond(t, "a watermark at "+p2.String(), func() bool { return last().Position == p2.String() })
}

// TestTopicInvalidatorFlushesOnTruncate: a truncate's patterns reach the
// invalidations topic as one flush control record to every partition
// (before, the topic, and so every embedded cache, heard nothing of a
// truncate under on_truncate: flush_pattern).
func TestTopicInvalidatorFlushesOnTruncate(t *testing.T) {
	sink := &capturingSink{t: t, written: make(chan struct{}, 1)}
	topic := &TopicInvalidator{Topic: "tm.invalidations", Sink: sink}
	eng, err := CompileTables([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}, OnTruncate: TruncateFlushPattern}}, pkTables, true)
	if err != nil {
		t.Fatal(err)
	}
	h := NewRuleHandler(eng, topic)
	ctx := context.Background()
	trunc := env(t, envelope("room_memberships", "t", "null", "null"))
	if err := h.Handle(ctx, &Message{Table: "public.room_memberships", Env: trunc, Pos: pipeline.Position{CommitLSN: 20}}); err != nil {
		t.Fatal(err)
	}
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if len(sink.msgs) != 1 {
		t.Fatalf("wrote %d records, want one flush record", len(sink.msgs))
	}
	m := sink.msgs[0]
	var v FlushValue
	if string(m.Key) != FlushKey || !m.Broadcast || len(m.Headers) != 1 || string(m.Headers[0].Value) != ControlFlush ||
		json.Unmarshal(m.Value, &v) != nil || !strings.Contains(v.Reason, "room:*:members") {
		t.Fatalf("record %+v (%s), want a broadcast flush naming the pattern", m, m.Value)
	}
}

// TestTopicInvalidatorPausedHoldsWatermarks: while the consumer takes no
// changes (backpressure: too many wait for a failing output), changes that
// arrive are in no output, so watermarks stop after an interval and resume
// when it takes changes again (before, they went on, and embedded caches
// stayed Ready over changes nobody had read).
func TestTopicInvalidatorPausedHoldsWatermarks(t *testing.T) {
	sink := &capturingSink{t: t, written: make(chan struct{}, 1)}
	var paused atomic.Bool
	ti := &TopicInvalidator{Topic: "tm.invalidations", Sink: sink, WatermarkInterval: 10 * time.Millisecond, Paused: paused.Load}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = ti.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()
	waitCond(t, "an idle watermark", func() bool { return len(sink.watermarks(t)) >= 1 })
	paused.Store(true)
	waitCond(t, "watermarks held while paused", func() bool { return ti.WatermarksHeld.Load() >= 3 })
	n := len(sink.watermarks(t))
	time.Sleep(50 * time.Millisecond)
	if m := len(sink.watermarks(t)); m != n {
		t.Errorf("%d watermarks written while the consumer was paused", m-n)
	}
	paused.Store(false)
	waitCond(t, "watermarks again", func() bool { return len(sink.watermarks(t)) > n })
}
