package invalidation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// gateSink is an Invalidator (and PositionedInvalidator when positioned)
// that fails while down and records, in order, the keys it accepted.
type gateSink struct {
	name       string
	positioned bool
	down       atomic.Bool
	delay      time.Duration // per accepted call

	mu       sync.Mutex
	keys     []string
	batches  int
	attempts int
}

func (g *gateSink) SinkName() string { return g.name }

func (g *gateSink) Invalidate(ctx context.Context, keys []string) error {
	g.mu.Lock()
	g.attempts++
	g.mu.Unlock()
	if g.down.Load() {
		return errors.New(g.name + " is down")
	}
	if g.delay > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(g.delay):
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.keys = append(g.keys, keys...)
	g.batches++
	return nil
}

func (g *gateSink) Close() error { return nil }

func (g *gateSink) got() (keys []string, batches int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.keys), g.batches
}

func (g *gateSink) has(keys ...string) bool {
	got, _ := g.got()
	for _, k := range keys {
		if !slices.Contains(got, k) {
			return false
		}
	}
	return true
}

// positionedGate is a gateSink taking positions, like the topic sink.
type positionedGate struct{ gateSink }

func (p *positionedGate) InvalidateAt(ctx context.Context, at []KeyAt) error {
	keys := make([]string, len(at))
	for i, k := range at {
		keys[i] = k.Key
	}
	return p.Invalidate(ctx, keys)
}

func membersRule(t testing.TB) *Engine {
	t.Helper()
	eng, err := Compile([]Rule{{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members"}}}, testColumns)
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

// handleRoom hands h a membership change of room !r<i>.
func handleRoom(t *testing.T, h *RuleHandler, i int) {
	t.Helper()
	e := env(t, envelope("room_memberships", "c", "null", fmt.Sprintf(`{"room_id":"!r%d","user_id":"@a"}`, i)))
	if err := h.Handle(context.Background(), &Message{Table: "public.room_memberships", Env: e, Pos: pipeline.Position{CommitLSN: 100, Seq: uint32(i)}}); err != nil {
		t.Fatal(err)
	}
}

func roomKeys(from, to int) []string {
	var out []string
	for i := from; i < to; i++ {
		out = append(out, fmt.Sprintf("room:!r%d:members", i))
	}
	return out
}

func eventually(t *testing.T, within time.Duration, cond func() bool, what func() string) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", within, what())
		}
	}
}

// TestRuleHandlerSinksProgressIndependently: while one sink fails, the
// other receives every batch; Durable (what offsets may be committed up
// to) stays below the failing sink's first batch; once the sink recovers
// it receives every batch, in order, and Durable reaches the last token.
func TestRuleHandlerSinksProgressIndependently(t *testing.T) {
	redis := &gateSink{name: "redis"}
	topic := &positionedGate{gateSink{name: "topic"}}
	redis.down.Store(true)
	h := NewRuleHandler(membersRule(t), redis, topic)
	ctx, cancel := context.WithCancel(context.Background())
	var notified atomic.Int64
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx, func() { notified.Add(1) }) }()
	defer func() { cancel(); <-done }()

	const n = 10
	var last uint64
	for i := range n {
		handleRoom(t, h, i)
		fctx, fcancel := context.WithTimeout(ctx, 2*time.Second)
		tok, err := h.FlushAsync(fctx)
		fcancel()
		if err != nil {
			t.Fatalf("FlushAsync of batch %d while redis is down: %v", i, err)
		}
		if tok <= last {
			t.Fatalf("token %d after %d", tok, last)
		}
		last = tok
	}
	want := roomKeys(0, n)
	eventually(t, 5*time.Second, func() bool { return topic.has(want...) },
		func() string {
			k, _ := topic.got()
			return fmt.Sprintf("the topic sink got %q while redis is down, want %q", k, want)
		})
	if d := h.Durable(); d != 0 {
		t.Errorf("Durable() = %d while redis has none of the batches, want 0", d)
	}
	st := h.Stats()
	if st[0].Name != "redis" || !st[0].Failing.Load() || st[0].Errors.Load() == 0 || st[0].BacklogKeys.Load() != n {
		t.Errorf("redis stats: name %s failing %v errors %d backlog %d keys; want redis, true, >0, %d",
			st[0].Name, st[0].Failing.Load(), st[0].Errors.Load(), st[0].BacklogKeys.Load(), n)
	}
	if st[1].BacklogKeys.Load() != 0 || st[1].Failing.Load() {
		t.Errorf("topic stats: backlog %d failing %v, want 0, false", st[1].BacklogKeys.Load(), st[1].Failing.Load())
	}
	if h.Invalidated.Load() != 0 {
		t.Errorf("Invalidated = %d before redis has any key", h.Invalidated.Load())
	}

	redis.down.Store(false)
	eventually(t, 10*time.Second, func() bool { return h.Durable() == last },
		func() string { return fmt.Sprintf("Durable() = %d after redis recovered, want %d", h.Durable(), last) })
	if got, _ := redis.got(); !slices.Equal(got, want) {
		t.Errorf("redis got %q after recovering, want %q in order", got, want)
	}
	if got, _ := topic.got(); !slices.Equal(got, want) {
		t.Errorf("topic got %q, want %q once each, in order", got, want)
	}
	if h.Invalidated.Load() != n || st[0].BacklogKeys.Load() != 0 || st[0].BacklogBytes.Load() != 0 || st[0].Failing.Load() {
		t.Errorf("after recovery: Invalidated %d, redis backlog %d keys %d bytes, failing %v; want %d, 0, 0, false",
			h.Invalidated.Load(), st[0].BacklogKeys.Load(), st[0].BacklogBytes.Load(), st[0].Failing.Load(), n)
	}
	if notified.Load() == 0 {
		t.Error("Run never notified that Durable advanced")
	}
}

// TestRuleHandlerBackpressureByBytes: once a failing sink's queue holds
// MaxBacklogBytes, FlushAsync blocks (the consumer stops fetching) and
// keeps the keys buffered; when the sink recovers, it goes on and nothing
// is lost.
func TestRuleHandlerBackpressureByBytes(t *testing.T) {
	redis := &gateSink{name: "redis"}
	topic := &positionedGate{gateSink{name: "topic"}}
	redis.down.Store(true)
	h := NewRuleHandler(membersRule(t), redis, topic)
	per := int64(len("room:!r0:members") + keyOverhead)
	h.MaxBacklogBytes = 3 * per
	core, logs := observer.New(zapcore.WarnLevel)
	h.Log = zap.New(core)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx, func() {}) }()
	defer func() { cancel(); <-done }()

	for i := range 3 {
		handleRoom(t, h, i)
		if _, err := h.FlushAsync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	handleRoom(t, h, 3)
	fctx, fcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err := h.FlushAsync(fctx)
	fcancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("FlushAsync with redis's backlog at %d of %d bytes returned %v, want to block until the deadline",
			h.Stats()[0].BacklogBytes.Load(), h.MaxBacklogBytes, err)
	}
	if b := h.Stats()[0].BacklogBytes.Load(); b > h.MaxBacklogBytes {
		t.Errorf("redis backlog %d bytes, above the bound %d", b, h.MaxBacklogBytes)
	}
	redis.down.Store(false)
	fctx, fcancel = context.WithTimeout(ctx, 10*time.Second)
	tok, err := h.FlushAsync(fctx)
	fcancel()
	if err != nil {
		t.Fatalf("FlushAsync after redis recovered: %v", err)
	}
	eventually(t, 10*time.Second, func() bool { return h.Durable() == tok },
		func() string { return fmt.Sprintf("Durable() = %d, want %d", h.Durable(), tok) })
	if got, want := func() []string { k, _ := redis.got(); return k }(), roomKeys(0, 4); !slices.Equal(got, want) {
		t.Errorf("redis got %q, want %q (the blocked batch kept)", got, want)
	}
	// A pause is warned once when it starts (the timed-out call; the last
	// call pauses too unless redis drained first) and once when it ends
	// (not per wait).
	full, resumed := logs.FilterMessageSnippet("backlog full").Len(), logs.FilterMessageSnippet("fetching resumes").Len()
	if full < 1 || full > 2 || resumed != full-1 {
		t.Errorf("%d 'backlog full' and %d 'fetching resumes' warnings, want 1 or 2 pauses, each warned at start and the completed ones at end", full, resumed)
	}
}

// TestRuleHandlerFlushWithoutRun: Flush without Run delivers to every sink
// itself; a failing sink does not stop the others, and the retry re-sends
// only to the sink that lacks the batch.
func TestRuleHandlerFlushWithoutRun(t *testing.T) {
	redis := &gateSink{name: "redis"}
	topic := &positionedGate{gateSink{name: "topic"}}
	redis.down.Store(true)
	h := NewRuleHandler(membersRule(t), redis, topic)
	ctx := context.Background()
	handleRoom(t, h, 1)
	if err := h.Flush(ctx); err == nil {
		t.Fatal("Flush with redis down succeeded")
	}
	if !topic.has("room:!r1:members") {
		t.Error("the topic sink did not get the key while redis failed")
	}
	redis.down.Store(false)
	if err := h.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, b := topic.got(); b != 1 {
		t.Errorf("the topic sink got %d batches, want 1 (not re-sent)", b)
	}
	if k, _ := redis.got(); !slices.Equal(k, []string{"room:!r1:members"}) {
		t.Errorf("redis got %q", k)
	}
}

// TestConsumerCommitsWhatEverySinkHas: with a RuleHandler whose redis sink
// is down, the topic sink receives every change but the group commits
// nothing, also at a stop; a later member with redis up delivers every key
// to redis and the committed offset never passes a change redis lacks.
func TestConsumerCommitsWhatEverySinkHas(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const topicName, group, n = "async.public.room_memberships", "async", 40
	var msgs []kafkago.Message
	for i := range n {
		v := fmt.Sprintf(`{"before":null,"after":{"room_id":"!r%d","user_id":"@a"},"op":"c","source":{"schema":"public","table":"room_memberships","lsn":%d,"txId":1},"transaction":{"total_order":1}}`, i, 100+i)
		msgs = append(msgs, kafkago.Message{Key: fmt.Appendf(nil, "!r%d", i), Value: []byte(v)})
	}
	produce(t, ctx, cl.Brokers(), topicName, msgs...)
	want := roomKeys(0, n)
	cfg := func(h Handler) Config {
		return Config{Brokers: cl.Brokers(), Group: group, Topics: map[string][]string{topicName: {"public.room_memberships"}},
			Handlers: map[string]Handler{"public.room_memberships": h}, DLQTopic: "async.dlq", DLQ: &dlqRecorder{}, MaxBatch: 7}
	}

	redis := &gateSink{name: "redis"}
	topic := &positionedGate{gateSink{name: "topic"}}
	redis.down.Store(true)
	m1 := start(t, cfg(NewRuleHandler(membersRule(t), redis, topic)))
	waitFor(t, m1, 30*time.Second, func() bool { return topic.has(want...) },
		func() string {
			k, _ := topic.got()
			return fmt.Sprintf("the topic sink has %d of %d keys while redis is down", len(k), n)
		})
	for range 10 {
		if off := committed(t, ctx, cl.Brokers(), group, topicName); off != -1 {
			t.Fatalf("committed offset %d while redis has none of the keys, want none (-1)", off)
		}
		time.Sleep(30 * time.Millisecond)
	}
	if err := m1.stop(t); err != nil {
		t.Errorf("stopping with redis down: %v", err)
	}
	if off := committed(t, ctx, cl.Brokers(), group, topicName); off != -1 {
		t.Fatalf("committed offset %d after a stop with redis down, want none (-1)", off)
	}
	if m1.c.Stats().Messages.Load() != 0 {
		t.Errorf("Stats.Messages = %d with nothing durable in redis", m1.c.Stats().Messages.Load())
	}

	redis2 := &gateSink{name: "redis", delay: 20 * time.Millisecond}
	topic2 := &positionedGate{gateSink{name: "topic"}}
	m2 := start(t, cfg(NewRuleHandler(membersRule(t), redis2, topic2)))
	var off int64 = -1
	waitFor(t, m2, 30*time.Second, func() bool {
		off = committed(t, ctx, cl.Brokers(), group, topicName)
		// Read after the offset: redis must already hold every key below it.
		if off > 0 && !redis2.has(want[:off]...) {
			k, _ := redis2.got()
			t.Fatalf("committed offset %d while redis has only %d keys: committed ahead of redis", off, len(k))
		}
		return off == n
	}, func() string {
		k, _ := redis2.got()
		return fmt.Sprintf("committed %d, redis has %d of %d keys", off, len(k), n)
	})
	if got, _ := redis2.got(); !slices.Equal(got, want) {
		t.Errorf("redis got %q, want every key once, in order", got)
	}
	if m2.c.Stats().Messages.Load() != n {
		t.Errorf("Stats.Messages = %d, want %d", m2.c.Stats().Messages.Load(), n)
	}
}

// gatedFlusher is an AsyncFlusher whose batches become durable only up to
// what the test allows.
type gatedFlusher struct {
	mu      sync.Mutex
	handled int
	token   uint64
	allowed atomic.Uint64
	notify  func()
}

func (g *gatedFlusher) Handle(context.Context, *Message) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.handled++
	return nil
}

func (g *gatedFlusher) Flush(context.Context) error {
	return errors.New("Flush called on an AsyncFlusher")
}

func (g *gatedFlusher) FlushAsync(context.Context) (uint64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.token++
	return g.token, nil
}

func (g *gatedFlusher) Durable() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return min(g.allowed.Load(), g.token)
}

func (g *gatedFlusher) Run(ctx context.Context, notify func()) error {
	g.mu.Lock()
	g.notify = notify
	g.mu.Unlock()
	<-ctx.Done()
	return nil
}

func (g *gatedFlusher) allow(tok uint64) {
	g.allowed.Store(tok)
	g.mu.Lock()
	n := g.notify
	g.mu.Unlock()
	if n != nil {
		n()
	}
}

func (g *gatedFlusher) count() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.handled
}

// TestConsumerStopsFetchingAtPendingBound: with an AsyncFlusher that makes
// nothing durable, the consumer applies no more than its bound of pending
// messages (it stops fetching, commits nothing); once batches become
// durable it commits them in order and goes on.
func TestConsumerStopsFetchingAtPendingBound(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const topic, group, n = "bound.public.events", "bound", 30
	var msgs []kafkago.Message
	for i := range n {
		msgs = append(msgs, kafkago.Message{Key: fmt.Appendf(nil, "k%d", i), Value: changeAt("public.events", uint32(100+i), 0)})
	}
	produce(t, ctx, cl.Brokers(), topic, msgs...)
	g := &gatedFlusher{}
	c, err := NewConsumer(Config{Brokers: cl.Brokers(), Group: group, Topics: map[string][]string{topic: {"public.events"}},
		Handlers: map[string]Handler{"public.events": g}, DLQTopic: "bound.dlq", DLQ: &dlqRecorder{}, MaxBatch: 5}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.grace = 300 * time.Millisecond
	c.maxPending = 10
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(rctx) }()
	defer func() { stop(); <-done }()

	eventually(t, 30*time.Second, func() bool { return g.count() >= 10 },
		func() string { return fmt.Sprintf("handled %d, want 10", g.count()) })
	time.Sleep(500 * time.Millisecond) // room to overrun the bound
	if h := g.count(); h >= n {
		t.Fatalf("handled all %d messages with none durable and a bound of %d pending: the consumer did not stop fetching", h, c.maxPending)
	}
	if !c.Stats().FetchPaused.Load() {
		t.Error("Stats.FetchPaused is false at the pending bound (the watermark writer relies on it)")
	}
	if off := committed(t, ctx, cl.Brokers(), group, topic); off != -1 {
		t.Fatalf("committed %d with nothing durable", off)
	}
	g.allow(1)
	eventually(t, 10*time.Second, func() bool { return committed(t, ctx, cl.Brokers(), group, topic) > 0 },
		func() string { return "token 1 durable, nothing committed" })
	time.Sleep(200 * time.Millisecond) // room for a wrong later commit
	if off := committed(t, ctx, cl.Brokers(), group, topic); off > 5 {
		t.Fatalf("committed %d after only the first batch (at most MaxBatch 5 messages) became durable", off)
	}
	g.allow(1 << 62)
	eventually(t, 20*time.Second, func() bool { return committed(t, ctx, cl.Brokers(), group, topic) == n },
		func() string {
			return fmt.Sprintf("committed %d of %d, handled %d", committed(t, ctx, cl.Brokers(), group, topic), n, g.count())
		})
	if c.Stats().Messages.Load() != n {
		t.Errorf("Stats.Messages = %d, want %d", c.Stats().Messages.Load(), n)
	}
}

// TestConsumerStopDrainsWithinGrace: at a stop, batches that become durable
// within the grace period are still committed; Run returns after that.
func TestConsumerStopDrainsWithinGrace(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const topic, group, n = "drain.public.events", "drain", 12
	var msgs []kafkago.Message
	for i := range n {
		msgs = append(msgs, kafkago.Message{Key: fmt.Appendf(nil, "k%d", i), Value: changeAt("public.events", uint32(100+i), 0)})
	}
	produce(t, ctx, cl.Brokers(), topic, msgs...)
	g := &gatedFlusher{}
	c, err := NewConsumer(Config{Brokers: cl.Brokers(), Group: group, Topics: map[string][]string{topic: {"public.events"}},
		Handlers: map[string]Handler{"public.events": g}, DLQTopic: "drain.dlq", DLQ: &dlqRecorder{}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.grace = 5 * time.Second
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Run(rctx) }()
	eventually(t, 30*time.Second, func() bool { return g.count() == n },
		func() string { return fmt.Sprintf("handled %d of %d", g.count(), n) })
	stop()
	time.Sleep(300 * time.Millisecond)
	g.allow(1 << 62) // durable during the grace period
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of the stop")
	}
	if off := committed(t, ctx, cl.Brokers(), group, topic); off != n {
		t.Errorf("committed %d after a stop whose batches became durable within the grace period, want %d", off, n)
	}
}
