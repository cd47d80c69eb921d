package invalidation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// The consumer runtime's contract (package doc): redelivered positions are
// skipped, offsets are held while effects are not durable, and dead letters
// carry what the README documents.

// changeAt is a change of table ("schema.table") at position lsn:seq.
func changeAt(table string, lsn, seq uint32) []byte {
	schema, name, _ := strings.Cut(table, ".")
	return fmt.Appendf(nil, `{"before":null,"after":{"id":%d},"op":"c","source":{"schema":%q,"table":%q,"lsn":%d,"txId":1},"transaction":{"total_order":%d}}`,
		seq, schema, name, lsn, seq+1)
}

// produce creates topic with one partition and writes msgs to it, in order.
func produce(t *testing.T, ctx context.Context, brokers []string, topic string, msgs ...kafkago.Message) {
	t.Helper()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...)}
	resp, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{
		{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := resp.Errors[topic]; err != nil {
		t.Fatalf("creating %s: %v", topic, err)
	}
	w := &kafkago.Writer{Addr: kafkago.TCP(brokers...), Topic: topic, RequiredAcks: kafkago.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	if err := w.WriteMessages(ctx, msgs...); err != nil {
		t.Fatal(err)
	}
}

// committed returns the group's committed offset of partition 0 of topic
// (-1: none, or no such group yet).
func committed(t *testing.T, ctx context.Context, brokers []string, group, topic string) int64 {
	t.Helper()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second}
	resp, err := client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: group, Topics: map[string][]int{topic: {0}}})
	if err == nil {
		err = resp.Error
	}
	if errors.Is(err, kafkago.GroupIdNotFound) {
		return -1 // no member joined yet
	}
	if err != nil {
		t.Fatalf("fetching the offsets of group %s: %v", group, err)
	}
	for _, p := range resp.Topics[topic] {
		if p.Partition == 0 {
			if p.Error != nil {
				t.Fatalf("fetching the offset of group %s on %s/0: %v", group, topic, p.Error)
			}
			return p.CommittedOffset
		}
	}
	t.Fatalf("group %s: no offset answered for %s/0", group, topic)
	return 0
}

// member is a running Consumer.
type member struct {
	c      *Consumer
	cancel context.CancelFunc
	done   chan error
}

// start runs a consumer of cfg until stop or the test's end.
func start(t *testing.T, cfg Config) *member {
	t.Helper()
	c, err := NewConsumer(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.grace = 300 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	m := &member{c: c, cancel: cancel, done: make(chan error, 1)}
	go func() { m.done <- c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-m.done })
	return m
}

// stop ends the member and returns what Run returned.
func (m *member) stop(t *testing.T) error {
	t.Helper()
	m.cancel()
	select {
	case err := <-m.done:
		m.done <- err // for the cleanup
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("the consumer did not stop within 30s")
		return nil
	}
}

// waitFor polls cond until it holds, failing with what() after timeout or
// when the member stops.
func waitFor(t *testing.T, m *member, timeout time.Duration, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.After(timeout)
	for !cond() {
		select {
		case err := <-m.done:
			m.done <- err
			t.Fatalf("the consumer stopped (%v); %s", err, what())
		case <-deadline:
			t.Fatalf("after %s: %s", timeout, what())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// recorder is a Handler (and Flusher) that remembers what it was handed;
// Handle fails for keys in failKeys, Flush fails while failFlush.
type recorder struct {
	failKeys  map[string]bool
	failFlush bool

	mu      sync.Mutex
	handled []*Message
	flushes int
}

func (r *recorder) Handle(_ context.Context, m *Message) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.failKeys[string(m.Key)] {
		return fmt.Errorf("handler refuses key %s", m.Key)
	}
	r.handled = append(r.handled, m)
	return nil
}

func (r *recorder) Flush(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.flushes++
	if r.failFlush {
		return errors.New("effects store down")
	}
	return nil
}

// positions returns "offset@position" of each handled message.
func (r *recorder) positions() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, m := range r.handled {
		out = append(out, fmt.Sprintf("%d@%s", m.Offset, m.Pos))
	}
	return out
}

func (r *recorder) flushCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.flushes
}

// dlqRecorder is a dead-letter Sink that keeps what it is given.
type dlqRecorder struct {
	mu   sync.Mutex
	msgs []pipeline.Message
}

func (d *dlqRecorder) Write(_ context.Context, msgs []pipeline.Message) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.msgs = append(d.msgs, msgs...)
	return nil
}

func (d *dlqRecorder) Close(context.Context) error { return nil }

func (d *dlqRecorder) letters() []pipeline.Message {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.msgs)
}

// TestConsumerSkipsRedeliveredPositions: a record whose position is at or
// below the last one applied in its partition (the same change delivered
// twice, e.g. after a capture restart) is not handed to the handler and is
// counted in Stats.Skipped; the next position is applied.
func TestConsumerSkipsRedeliveredPositions(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type pos struct{ lsn, seq uint32 }
	cases := []struct {
		name        string
		records     []pos
		wantHandled []string // offset@position
		wantSkipped uint64
	}{
		{"same position twice", []pos{{100, 0}, {100, 0}}, []string{"0@100:0"}, 1},
		{"older position after a newer one", []pos{{200, 0}, {100, 5}}, []string{"0@200:0"}, 1},
		{"next position", []pos{{100, 0}, {100, 1}}, []string{"0@100:0", "1@100:1"}, 0},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			topic, group := fmt.Sprintf("dup%d.public.events", i), fmt.Sprintf("dup%d", i)
			var msgs []kafkago.Message
			for _, p := range tc.records {
				msgs = append(msgs, kafkago.Message{Key: []byte("k"), Value: changeAt("public.events", p.lsn, p.seq)})
			}
			produce(t, ctx, cl.Brokers(), topic, msgs...)
			h := &recorder{}
			m := start(t, Config{Brokers: cl.Brokers(), Group: group, Topics: map[string][]string{topic: {"public.events"}},
				Handlers: map[string]Handler{"public.events": h}, DLQTopic: group + ".dlq", DLQ: discardSink{}})
			st := m.c.Stats()
			n := uint64(len(tc.records))
			// Messages counts applied records once their offsets are
			// committed; Skipped counts at once.
			waitFor(t, m, 30*time.Second, func() bool { return st.Messages.Load()+st.Skipped.Load() >= n },
				func() string {
					return fmt.Sprintf("%d applied + %d skipped of %d records", st.Messages.Load(), st.Skipped.Load(), n)
				})
			if got := h.positions(); !slices.Equal(got, tc.wantHandled) {
				t.Errorf("handler saw %v, want %v", got, tc.wantHandled)
			}
			if got := st.Skipped.Load(); got != tc.wantSkipped {
				t.Errorf("Stats.Skipped = %d, want %d", got, tc.wantSkipped)
			}
			if got, want := st.Messages.Load(), uint64(len(tc.wantHandled)); got != want {
				t.Errorf("Stats.Messages = %d, want %d", got, want)
			}
			if off := committed(t, ctx, cl.Brokers(), group, topic); off != int64(n) {
				t.Errorf("committed offset %d, want %d (skipped records are committed too)", off, n)
			}
		})
	}
}

// TestConsumerHoldsOffsetsWhileFlushFails: while a handler's Flush fails,
// the consumer retries it without bound (MaxAttempts does not apply) and
// commits nothing, dead-letters nothing and does not stop; a member
// stopped meanwhile commits nothing, and the next member of the group is
// handed the same messages again.
func TestConsumerHoldsOffsetsWhileFlushFails(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const topic, group = "held.public.events", "held"
	produce(t, ctx, cl.Brokers(), topic,
		kafkago.Message{Key: []byte("a"), Value: changeAt("public.events", 100, 0)},
		kafkago.Message{Key: []byte("b"), Value: changeAt("public.events", 100, 1)})
	dlq := &dlqRecorder{}
	cfg := func(h Handler) Config {
		return Config{Brokers: cl.Brokers(), Group: group, Topics: map[string][]string{topic: {"public.events"}},
			Handlers: map[string]Handler{"public.events": h}, DLQTopic: "held.dlq", DLQ: dlq, MaxAttempts: 2}
	}

	first := &recorder{failFlush: true}
	m1 := start(t, cfg(first))
	st := m1.c.Stats()
	const flushes = 5 // well past MaxAttempts
	off := int64(-1)
	waitFor(t, m1, 30*time.Second, func() bool {
		off = committed(t, ctx, cl.Brokers(), group, topic)
		return first.flushCount() >= flushes || off != -1
	}, func() string { return fmt.Sprintf("%d flushes of %d", first.flushCount(), flushes) })
	if off != -1 {
		t.Errorf("committed offset %d while Flush fails, want none (-1)", off)
	}
	if got := first.positions(); len(got) == 0 || got[0] != "0@100:0" {
		t.Errorf("the first member handled %v, want 0@100:0 first", got)
	}
	if n := len(dlq.letters()); n != 0 || st.DLQ.Load() != 0 {
		t.Errorf("%d dead letters (Stats.DLQ %d) for a failing Flush, want none", n, st.DLQ.Load())
	}
	if st.Messages.Load() != 0 || st.Retries.Load() < flushes-1 {
		t.Errorf("Stats.Messages = %d, Retries = %d; want 0 applied and at least %d retries", st.Messages.Load(), st.Retries.Load(), flushes-1)
	}
	if err := m1.stop(t); err != nil {
		t.Errorf("stopping while Flush fails: %v", err)
	}
	if off := committed(t, ctx, cl.Brokers(), group, topic); off != -1 {
		t.Fatalf("committed offset %d after stopping with Flush failing, want none (-1)", off)
	}

	second := &recorder{}
	m2 := start(t, cfg(second))
	waitFor(t, m2, 30*time.Second, func() bool { return m2.c.Stats().Messages.Load() >= 2 },
		func() string { return fmt.Sprintf("the second member applied %v", second.positions()) })
	if got, want := second.positions(), []string{"0@100:0", "1@100:1"}; !slices.Equal(got, want) {
		t.Errorf("the second member handled %v, want %v", got, want)
	}
	if off := committed(t, ctx, cl.Brokers(), group, topic); off != 2 {
		t.Errorf("committed offset %d once Flush succeeds, want 2", off)
	}
	if n := len(dlq.letters()); n != 0 {
		t.Errorf("%d dead letters, want none", n)
	}
}

// TestDeadLetterHeaders: each kind of dead letter (malformed, no handler,
// handler failing after MaxAttempts) goes to DLQTopic with the original
// key (or "topic/partition" without one), value and headers, plus exactly
// the documented tidemark-dlq-reason, tidemark-dlq-group and
// tidemark-dlq-source ("topic/partition@offset"); the partition moves on.
func TestDeadLetterHeaders(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const topic, group, dlqTopic = "dl.public.events", "dl-group", "dl.dlq"
	hdrs := func(kv ...string) []kafkago.Header {
		var hs []kafkago.Header
		for i := 0; i < len(kv); i += 2 {
			hs = append(hs, kafkago.Header{Key: kv[i], Value: []byte(kv[i+1])})
		}
		return hs
	}
	parseErr := func(v string) string {
		t.Helper()
		_, err := pipeline.ParseEnvelope([]byte(v))
		if err == nil {
			t.Fatalf("the malformed value %q parses", v)
		}
		return err.Error()
	}
	cases := []struct {
		name    string
		rec     kafkago.Message
		dead    bool
		wantKey string
		reason  string
	}{
		{"malformed", kafkago.Message{Key: []byte("bad"), Value: []byte("not json"), Headers: hdrs("tidemark-table", "public.events", "x-trace", "t0")},
			true, "bad", parseErr("not json")},
		{"no handler", kafkago.Message{Key: []byte("other"), Value: changeAt("public.other", 100, 1),
			Headers: hdrs("tidemark-table", "public.other", "tidemark-op", "c", "tidemark-lsn", "100", "tidemark-seq", "1", "x-trace", "t1")},
			true, "other", ErrNoHandler.Error() + ": table public.other on topic " + topic},
		{"handler fails", kafkago.Message{Key: []byte("fail"), Value: changeAt("public.events", 100, 2),
			Headers: hdrs("tidemark-table", "public.events", "tidemark-lsn", "100", "tidemark-seq", "2")},
			true, "fail", "after 2 attempts: handler refuses key fail"},
		{"no key", kafkago.Message{Value: []byte("garbage"), Headers: hdrs("x-trace", "t3")},
			true, topic + "/0", parseErr("garbage")},
		{"applied", kafkago.Message{Key: []byte("ok"), Value: changeAt("public.events", 100, 3)}, false, "", ""},
	}
	var recs []kafkago.Message
	for _, tc := range cases {
		recs = append(recs, tc.rec)
	}
	produce(t, ctx, cl.Brokers(), topic, recs...)
	dlq := &dlqRecorder{}
	h := &recorder{failKeys: map[string]bool{"fail": true}}
	m := start(t, Config{Brokers: cl.Brokers(), Group: group, Topics: map[string][]string{topic: {"public.events"}},
		Handlers: map[string]Handler{"public.events": h}, DLQTopic: dlqTopic, DLQ: dlq, MaxAttempts: 2})
	st := m.c.Stats()
	waitFor(t, m, 30*time.Second, func() bool { return st.Messages.Load() >= 1 },
		func() string { return fmt.Sprintf("applied %d, dead-lettered %d", st.Messages.Load(), st.DLQ.Load()) })

	letters := dlq.letters()
	bySource := map[string]pipeline.Message{}
	for _, l := range letters {
		src := headerValue(l.Headers, "tidemark-dlq-source")
		if _, dup := bySource[src]; dup {
			t.Errorf("two dead letters with tidemark-dlq-source %q", src)
		}
		bySource[src] = l
	}
	wantDead := 0
	for off, tc := range cases {
		src := fmt.Sprintf("%s/0@%d", topic, off)
		l, ok := bySource[src]
		if !tc.dead {
			if ok {
				t.Errorf("%s: dead-lettered (%s)", tc.name, headerValue(l.Headers, "tidemark-dlq-reason"))
			}
			continue
		}
		wantDead++
		if !ok {
			t.Errorf("%s: no dead letter with tidemark-dlq-source %s", tc.name, src)
			continue
		}
		if l.Topic != dlqTopic || string(l.Key) != tc.wantKey || string(l.Value) != string(tc.rec.Value) {
			t.Errorf("%s: dead letter to %s key %q value %q, want %s %q %q", tc.name, l.Topic, l.Key, l.Value, dlqTopic, tc.wantKey, tc.rec.Value)
		}
		// The original headers first, in order, then the documented ones.
		var want []pipeline.Header
		for _, h := range tc.rec.Headers {
			want = append(want, pipeline.Header{Key: h.Key, Value: h.Value})
		}
		want = append(want,
			pipeline.Header{Key: "tidemark-dlq-reason", Value: []byte(headerValue(l.Headers, "tidemark-dlq-reason"))},
			pipeline.Header{Key: "tidemark-dlq-group", Value: []byte(group)},
			pipeline.Header{Key: "tidemark-dlq-source", Value: []byte(src)})
		if got := fmtHeaders(l.Headers); got != fmtHeaders(want) {
			t.Errorf("%s: headers\n  %s\nwant\n  %s", tc.name, got, fmtHeaders(want))
		}
		reason := headerValue(l.Headers, "tidemark-dlq-reason")
		if reason != tc.reason {
			t.Errorf("%s: tidemark-dlq-reason %q, want %q", tc.name, reason, tc.reason)
		}
	}
	if len(letters) != wantDead || st.DLQ.Load() != uint64(wantDead) {
		t.Errorf("%d dead letters (Stats.DLQ %d), want %d", len(letters), st.DLQ.Load(), wantDead)
	}
	if off := committed(t, ctx, cl.Brokers(), group, topic); off != int64(len(cases)) {
		t.Errorf("committed offset %d, want %d: the partition moves on past dead letters", off, len(cases))
	}
}

func fmtHeaders(hs []pipeline.Header) string {
	var b strings.Builder
	for i, h := range hs {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s=%q", h.Key, h.Value)
	}
	return b.String()
}

// TestSessionTimeoutTimings: the group timings follow Config.SessionTimeout
// and default to 10s session and rebalance timeouts with 1s heartbeats.
func TestSessionTimeoutTimings(t *testing.T) {
	cases := []struct {
		session                            time.Duration
		wantHeartbeat, wantSession, wantRb time.Duration
	}{
		{0, time.Second, 10 * time.Second, 10 * time.Second},
		{30 * time.Second, time.Second, 30 * time.Second, 30 * time.Second},
		{6 * time.Second, 600 * time.Millisecond, 6 * time.Second, 6 * time.Second},
		{500 * time.Millisecond, 50 * time.Millisecond, 500 * time.Millisecond, 500 * time.Millisecond},
		{5 * time.Millisecond, time.Millisecond, 5 * time.Millisecond, 5 * time.Millisecond},
	}
	for _, tc := range cases {
		c, err := NewConsumer(Config{Brokers: []string{"127.0.0.1:9092"}, Group: "g", Topics: map[string][]string{"t": {"public.a"}},
			Handlers: map[string]Handler{"public.a": &recorder{}}, DLQTopic: "d", DLQ: discardSink{}, SessionTimeout: tc.session}, nil)
		if err != nil {
			t.Fatal(err)
		}
		rc := c.readerConfig([]string{"t"})
		if rc.HeartbeatInterval != tc.wantHeartbeat || rc.SessionTimeout != tc.wantSession || rc.RebalanceTimeout != tc.wantRb {
			t.Errorf("SessionTimeout %s: heartbeat %s, session %s, rebalance %s; want %s, %s, %s", tc.session,
				rc.HeartbeatInterval, rc.SessionTimeout, rc.RebalanceTimeout, tc.wantHeartbeat, tc.wantSession, tc.wantRb)
		}
	}
}
