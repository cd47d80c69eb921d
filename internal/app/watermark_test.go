package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

// flakyTopicSink accepts watermark records always and invalidation records
// only while up; it remembers the newest watermark's position.
type flakyTopicSink struct {
	up   atomic.Bool
	mu   sync.Mutex
	last string
	n    int
}

func (s *flakyTopicSink) Write(_ context.Context, msgs []pipeline.Message) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range msgs {
		if string(m.Key) != invalidation.WatermarkKey && !s.up.Load() {
			return errors.New("partition leader unavailable")
		}
	}
	for _, m := range msgs {
		if string(m.Key) == invalidation.WatermarkKey {
			var w invalidation.Watermark
			if err := json.Unmarshal(m.Value, &w); err != nil {
				return err
			}
			s.last, s.n = w.Position, s.n+1
		}
	}
	return nil
}

func (s *flakyTopicSink) Close(context.Context) error { return nil }

func (s *flakyTopicSink) watermark() (string, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last, s.n
}

// TestWatermarkedHandler: the invalidation role's handler holds the
// watermarks while a change it took cannot be made durable in the topic
// (Flush failing), and releases them at that change's position once Flush
// succeeds, also for a change that maps to no key.
func TestWatermarkedHandler(t *testing.T) {
	eng, err := invalidation.Compile([]invalidation.Rule{{Table: "public.rooms", Keys: []string{"room:{room_id}"}, Ops: []string{"c", "u"}}},
		map[string][]string{"public.rooms": {"room_id"}})
	if err != nil {
		t.Fatal(err)
	}
	sink := &flakyTopicSink{}
	ti := &invalidation.TopicInvalidator{Topic: "tm.invalidations", Sink: sink, WatermarkInterval: 10 * time.Millisecond}
	var h invalidation.Handler = &watermarkedHandler{RuleHandler: invalidation.NewRuleHandler(eng, ti), topic: ti}
	f, ok := h.(invalidation.Flusher)
	if !ok {
		t.Fatal("the wrapped handler is not a Flusher")
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = ti.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()

	change := func(op string, lsn uint64) *invalidation.Message { return roomChange(t, op, "!r", lsn) }
	wait := func(what string, cond func() bool) { t.Helper(); waitFor(t, what, cond) }

	m := change("c", 100)
	if err := h.Handle(ctx, m); err != nil {
		t.Fatal(err)
	}
	if err := f.Flush(ctx); err == nil {
		t.Fatal("Flush succeeded with the topic down")
	}
	wait("watermarks held", func() bool { return ti.WatermarksHeld.Load() >= 3 })
	_, n := sink.watermark()
	time.Sleep(50 * time.Millisecond)
	if _, n2 := sink.watermark(); n2 != n {
		t.Errorf("%d watermarks written while a change taken was not durable in the topic", n2-n)
	}

	sink.up.Store(true)
	if err := f.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	wait("a watermark at "+m.Pos.String(), func() bool { p, _ := sink.watermark(); return p == m.Pos.String() })

	// A delete no rule covers maps to no key: once Flush returns, the
	// watermark covers it too.
	d := change("d", 200)
	if err := h.Handle(ctx, d); err == nil {
		t.Log("the excluded delete was accepted (a counted no-op)")
	}
	if err := f.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	wait("a watermark at "+d.Pos.String(), func() bool { p, _ := sink.watermark(); return p == d.Pos.String() })
}

// TestWatermarkMetrics: the writer's counters are exported.
func TestWatermarkMetrics(t *testing.T) {
	sink := &flakyTopicSink{}
	ti := &invalidation.TopicInvalidator{Topic: "tm.invalidations", Sink: sink}
	reg := prometheus.NewRegistry()
	registerWatermarkMetrics(reg, ti)
	for range 2 {
		if err := ti.WriteWatermark(context.Background(), pipeline.Position{}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "tidemark_invalidation_watermarks_total" {
			found = true
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 2 {
				t.Errorf("tidemark_invalidation_watermarks_total = %v, want 2", v)
			}
		}
	}
	if !found || len(mfs) != 3 {
		t.Errorf("gathered %d metric families (watermarks_total found: %v), want 3", len(mfs), found)
	}
}

// downSink is an invalidation sink that always fails (Redis down).
type downSink struct{}

func (downSink) Invalidate(context.Context, []string) error {
	return errors.New("redis: connection refused")
}
func (downSink) Close() error { return nil }

// TestWatermarkedHandlerAsync: with the sinks running on their own
// (AsyncFlusher), a failing Redis does not stop the watermarks, which
// follow the topic; a topic that cannot be written holds them while its
// keys wait, and they resume at the newest position once it writes again.
func TestWatermarkedHandlerAsync(t *testing.T) {
	eng, err := invalidation.Compile([]invalidation.Rule{{Table: "public.rooms", Keys: []string{"room:{room_id}"}, OnTruncate: invalidation.TruncateFlushPattern}},
		map[string][]string{"public.rooms": {"room_id"}})
	if err != nil {
		t.Fatal(err)
	}
	sink := &flakyTopicSink{}
	sink.up.Store(true)
	ti := &invalidation.TopicInvalidator{Topic: "tm.invalidations", Sink: sink, WatermarkInterval: 10 * time.Millisecond}
	h := newWatermarkedHandler(invalidation.NewRuleHandler(eng, downSink{}, ti), ti)
	var af invalidation.AsyncFlusher = h
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = af.Run(ctx, func() {}) })
	wg.Go(func() { _ = ti.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()

	change := func(lsn uint64) *invalidation.Message { return roomChange(t, "c", fmt.Sprintf("!r%d", lsn), lsn) }
	wait := func(what string, cond func() bool) { t.Helper(); waitFor(t, what, cond) }
	submit := func(m *invalidation.Message) {
		t.Helper()
		if err := h.Handle(ctx, m); err != nil {
			t.Fatal(err)
		}
		if _, err := af.FlushAsync(ctx); err != nil {
			t.Fatal(err)
		}
	}

	m1 := change(100)
	submit(m1)
	wait("a watermark at "+m1.Pos.String()+" with Redis down", func() bool { p, _ := sink.watermark(); return p == m1.Pos.String() })

	sink.up.Store(false)
	m2 := change(200)
	submit(m2)
	wait("watermarks held", func() bool { return ti.WatermarksHeld.Load() >= 3 })
	if p, _ := sink.watermark(); p != m1.Pos.String() {
		t.Errorf("watermark claims %s while the topic lacks %s", p, m2.Pos)
	}
	sink.up.Store(true)
	wait("a watermark at "+m2.Pos.String(), func() bool { p, _ := sink.watermark(); return p == m2.Pos.String() })

	// A truncate's job has patterns and no keys: the watermark must not
	// claim it before its flush record is in the topic.
	sink.up.Store(false)
	trunc, err := pipeline.ParseEnvelope([]byte(`{"before":null,"after":null,"op":"t","source":{"schema":"public","table":"rooms","lsn":300,"txId":2},"transaction":{"total_order":1}}`))
	if err != nil {
		t.Fatal(err)
	}
	submit(&invalidation.Message{Table: "public.rooms", Pos: trunc.Position(), Env: trunc})
	held := ti.WatermarksHeld.Load()
	wait("watermarks held for the truncate", func() bool { return ti.WatermarksHeld.Load() >= held+3 })
	if p, _ := sink.watermark(); p != m2.Pos.String() {
		t.Errorf("watermark claims %s while the truncate's flush record is not in the topic", p)
	}
	sink.up.Store(true)
	wait("a watermark at "+trunc.Position().String(), func() bool { p, _ := sink.watermark(); return p == trunc.Position().String() })
}

// roomChange is a change of public.rooms (room_id room) at lsn.
func roomChange(t *testing.T, op, room string, lsn uint64) *invalidation.Message {
	t.Helper()
	js := fmt.Sprintf(`{"before":null,"after":{"room_id":%q},"op":%q,"source":{"schema":"public","table":"rooms","lsn":%d,"txId":1},"transaction":{"total_order":1}}`, room, op, lsn)
	env, err := pipeline.ParseEnvelope([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return &invalidation.Message{Table: "public.rooms", Pos: env.Position(), Env: env}
}

// waitFor waits up to 5 s for cond.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
	}
}
