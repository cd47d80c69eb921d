package pipeline_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/leakcheck"
	"github.com/tidemark/tidemark/pipeline"
)

// TestMain fails the package when a test leaves goroutines of the code
// under test behind.
func TestMain(m *testing.M) { leakcheck.Main(m, "tidemark/pipeline.") }

// ---- fakes ----

var errDrained = errors.New("fake source: all events delivered and acknowledged")

// fakeSource replays a fixed list of events. Once they are exhausted, Next
// waits until the last transaction has been acknowledged and then returns
// errDrained, which ends the pipeline's Run; without a final commit it waits
// for ctx.
type fakeSource struct {
	mu      sync.Mutex
	events  []pipeline.Event
	calls   int
	acks    []pipeline.LSN
	final   pipeline.LSN
	drained chan struct{}
	// onNext runs at the start of every Next call (1-based), onAck at every
	// Ack, both without the source's lock.
	onNext func(call int)
	onAck  func(lsn pipeline.LSN)
}

func newFakeSource(evs []pipeline.Event) *fakeSource {
	s := &fakeSource{events: evs, drained: make(chan struct{})}
	for _, ev := range evs {
		if ev.Kind == pipeline.EventCommit {
			s.final = ev.Txn.EndLSN
		}
	}
	return s
}

func (s *fakeSource) Next(ctx context.Context) (pipeline.Event, error) {
	s.mu.Lock()
	s.calls++
	call := s.calls
	var ev pipeline.Event
	have := call <= len(s.events)
	if have {
		ev = s.events[call-1]
	}
	hook := s.onNext
	s.mu.Unlock()
	if hook != nil {
		hook(call)
	}
	if have {
		return ev, nil
	}
	if s.final == 0 {
		<-ctx.Done()
		return pipeline.Event{}, ctx.Err()
	}
	select {
	case <-s.drained:
		return pipeline.Event{}, errDrained
	case <-ctx.Done():
		return pipeline.Event{}, ctx.Err()
	}
}

func (s *fakeSource) Ack(lsn pipeline.LSN) {
	s.mu.Lock()
	s.acks = append(s.acks, lsn)
	if s.final != 0 && lsn >= s.final {
		select {
		case <-s.drained:
		default:
			close(s.drained)
		}
	}
	hook := s.onAck
	s.mu.Unlock()
	if hook != nil {
		hook(lsn)
	}
}

func (s *fakeSource) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

func (s *fakeSource) Acks() []pipeline.LSN {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]pipeline.LSN(nil), s.acks...)
}

// fakeSink records what it was given. It can block every Write until block is
// closed, and fail the failOn-th Write (1-based) with failErr.
type fakeSink struct {
	mu       sync.Mutex
	written  []pipeline.Message // messages of Writes that returned nil, in order
	calls    int
	holding  int // messages inside a Write that has not returned
	maxHeld  int
	failed   bool
	closed   bool
	block    chan struct{}
	entered  chan struct{}
	failOn   int
	failErr  error
	onWrite  func(msgs []pipeline.Message)
	inFlight bool
}

func newFakeSink() *fakeSink { return &fakeSink{entered: make(chan struct{}, 1)} }

func copyMessage(m pipeline.Message) pipeline.Message {
	c := m
	if m.Key != nil {
		c.Key = append([]byte{}, m.Key...)
	}
	c.Value = append([]byte(nil), m.Value...)
	c.Headers = nil
	for _, h := range m.Headers {
		c.Headers = append(c.Headers, pipeline.Header{Key: h.Key, Value: append([]byte(nil), h.Value...)})
	}
	return c
}

func (s *fakeSink) Write(ctx context.Context, msgs []pipeline.Message) error {
	cp := make([]pipeline.Message, len(msgs))
	for i := range msgs {
		cp[i] = copyMessage(msgs[i])
	}
	s.mu.Lock()
	if s.inFlight {
		s.mu.Unlock()
		panic("fakeSink: concurrent Write")
	}
	s.inFlight = true
	s.calls++
	call := s.calls
	s.holding += len(cp)
	s.maxHeld = max(s.maxHeld, s.holding)
	block, hook := s.block, s.onWrite
	s.mu.Unlock()
	if hook != nil {
		hook(cp)
	}
	select {
	case s.entered <- struct{}{}:
	default:
	}
	done := func(ok bool) {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.holding -= len(cp)
		s.inFlight = false
		if ok {
			s.written = append(s.written, cp...)
		}
	}
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			done(false)
			return ctx.Err()
		}
	}
	if call == s.failOn {
		s.mu.Lock()
		s.failed = true
		s.mu.Unlock()
		done(false)
		return s.failErr
	}
	done(true)
	return nil
}

func (s *fakeSink) Close(context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	return nil
}

func (s *fakeSink) Written() []pipeline.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]pipeline.Message(nil), s.written...)
}

func (s *fakeSink) Failed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}

// ---- building events ----

var commitTime = time.Date(2024, 11, 22, 8, 0, 0, 0, time.UTC)

var fixedNow = time.Date(2024, 11, 22, 8, 0, 1, 0, time.UTC)

type txnSpec struct {
	xid     uint32
	commit  pipeline.LSN
	end     pipeline.LSN
	changes []pipeline.Change
}

// txnN builds transaction n (1-based) with increasing LSNs.
func txnN(n int, changes ...pipeline.Change) txnSpec {
	commit := pipeline.LSN(1000 * n)
	return txnSpec{xid: uint32(500 + n), commit: commit, end: commit + 8, changes: changes}
}

func buildEvents(txns ...txnSpec) []pipeline.Event {
	var evs []pipeline.Event
	for _, ts := range txns {
		info := &pipeline.TxnInfo{Xid: ts.xid, CommitLSN: ts.commit, EndLSN: ts.end,
			CommitTime: commitTime.Add(time.Duration(ts.xid) * time.Millisecond)}
		evs = append(evs, pipeline.Event{Kind: pipeline.EventBegin, Txn: info})
		for i, ch := range ts.changes {
			ch.WALLSN = ts.commit - 100 + pipeline.LSN(i)
			evs = append(evs, pipeline.Event{Kind: pipeline.EventChange, Txn: info, Change: ch})
		}
		evs = append(evs, pipeline.Event{Kind: pipeline.EventCommit, Txn: info})
	}
	return evs
}

var (
	relEvents = &pipeline.Relation{OID: 1, Schema: "public", Table: "events", ReplicaIdentity: 'd',
		Columns: []pipeline.Column{{Name: "event_id", Key: true}, {Name: "room_id"}, {Name: "content"}}}
	relMembers = &pipeline.Relation{OID: 2, Schema: "public", Table: "room_memberships", ReplicaIdentity: 'f',
		Columns: []pipeline.Column{{Name: "membership"}, {Name: "user_id", Key: true}, {Name: "room_id", Key: true}}}
	relUsers = &pipeline.Relation{OID: 3, Schema: "public", Table: "users", ReplicaIdentity: 'd',
		Columns: []pipeline.Column{{Name: "name", Key: true}, {Name: "deactivated"}}}
)

// row is a full image.
func row(vals ...any) pipeline.Tuple {
	t := make(pipeline.Tuple, len(vals))
	for i, v := range vals {
		t[i] = pipeline.Datum{Value: v}
	}
	return t
}

// keyRow is an old-key image: non-key columns absent.
func keyRow(rel *pipeline.Relation, vals ...any) pipeline.Tuple {
	t := row(vals...)
	for i := range t {
		if !rel.Columns[i].Key {
			t[i] = pipeline.Datum{Absent: true}
		}
	}
	return t
}

func insertEvent(id, room string) pipeline.Change {
	return pipeline.Change{Op: pipeline.OpCreate, Rel: relEvents, After: row(id, room, "body of "+id)}
}

// ---- running ----

func newPipeline(t *testing.T, cfg pipeline.Config, src pipeline.Source, sink pipeline.Sink) *pipeline.Pipeline {
	t.Helper()
	if cfg.Router.TopicPrefix == "" {
		cfg.Router.TopicPrefix = "tm"
	}
	if cfg.Router.Database == "" {
		cfg.Router.Database = "app"
	}
	p, err := pipeline.New(cfg, src, sink, pipeline.WithClock(func() time.Time { return fixedNow }))
	if err != nil {
		t.Fatalf("pipeline.New: %v", err)
	}
	return p
}

// testCtx bounds a test so that a bug cannot hang it.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// runAll runs a pipeline over evs until the source is drained (or fails) and
// returns what the sink made durable, the acks, and Run's error (nil when
// the source drained).
func runAll(t *testing.T, cfg pipeline.Config, evs []pipeline.Event) ([]pipeline.Message, []pipeline.LSN, error) {
	t.Helper()
	src, sink := newFakeSource(evs), newFakeSink()
	p := newPipeline(t, cfg, src, sink)
	err := p.Run(testCtx(t))
	if errors.Is(err, errDrained) {
		err = nil
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run did not finish: %v", err)
	}
	return sink.Written(), src.Acks(), err
}

func header(m pipeline.Message, key string) (string, bool) {
	for _, h := range m.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}

// changeMessages drops transaction records.
func changeMessages(msgs []pipeline.Message) []pipeline.Message {
	var out []pipeline.Message
	for _, m := range msgs {
		if !strings.HasSuffix(m.Topic, ".transaction") {
			out = append(out, m)
		}
	}
	return out
}

// checkOrder is an ordering validator: within every (topic, key) positions
// strictly increase in the order the sink received them, except for copies
// of one change to several routes (same position, different topic).
func checkOrder(t *testing.T, msgs []pipeline.Message) {
	t.Helper()
	last := map[string]pipeline.Position{}
	for i, m := range changeMessages(msgs) {
		k := m.Topic + "\x00" + string(m.Key)
		if prev, ok := last[k]; ok && !prev.Less(m.Pos) {
			t.Errorf("message %d on %s key %s: position %s not after %s", i, m.Topic, m.Key, m.Pos, prev)
		}
		last[k] = m.Pos
	}
}

// ---- tests ----

func TestNewRequiresTopicPrefix(t *testing.T) {
	if _, err := pipeline.New(pipeline.Config{}, newFakeSource(nil), newFakeSink()); err == nil {
		t.Fatal("New accepted a config without Router.TopicPrefix")
	}
}

func TestPipelinePositions(t *testing.T) {
	txns := []txnSpec{
		txnN(1, insertEvent("$1", "!a"), insertEvent("$2", "!a"), insertEvent("$3", "!b")),
		txnN(2,
			pipeline.Change{Op: pipeline.OpCreate, Rel: relUsers, After: row("@u", false)},
			// changes the primary key: becomes a delete and a create
			pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, Before: keyRow(relEvents, "$1", nil, nil), After: row("$9", "!a", "x")},
			pipeline.Change{Op: pipeline.OpDelete, Rel: relEvents, Before: keyRow(relEvents, "$2", nil, nil)},
		),
		txnN(3, pipeline.Change{Op: pipeline.OpUpdate, Rel: relUsers, After: row("@u", true)}),
	}
	wantPerTxn := []int{3, 4, 1}
	for _, txnTopic := range []bool{false, true} {
		t.Run("transactions_topic="+strconv.FormatBool(txnTopic), func(t *testing.T) {
			cfg := pipeline.Config{Router: pipeline.RouterConfig{TransactionsTopic: txnTopic}, MaxBatchMessages: 2}
			msgs, acks, err := runAll(t, cfg, buildEvents(txns...))
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			checkOrder(t, msgs)
			var prev *pipeline.Position
			next := map[pipeline.LSN]uint32{}
			for _, m := range changeMessages(msgs) {
				if prev != nil && !prev.Less(m.Pos) {
					t.Errorf("position %s after %s: not strictly increasing", m.Pos, *prev)
				}
				pos := m.Pos
				prev = &pos
				if want := next[m.Pos.CommitLSN]; m.Pos.Seq != want {
					t.Errorf("%s: seq %d, want %d (0-based, consecutive per transaction)", m.Topic, m.Pos.Seq, want)
				}
				next[m.Pos.CommitLSN] = m.Pos.Seq + 1
				if h, _ := header(m, "tidemark-lsn"); h != strconv.FormatUint(uint64(m.Pos.CommitLSN), 10) {
					t.Errorf("tidemark-lsn header %q, want %d", h, m.Pos.CommitLSN)
				}
				if h, _ := header(m, "tidemark-seq"); h != strconv.FormatUint(uint64(m.Pos.Seq), 10) {
					t.Errorf("tidemark-seq header %q, want %d", h, m.Pos.Seq)
				}
			}
			for i, ts := range txns {
				if got := next[ts.commit]; int(got) != wantPerTxn[i] {
					t.Errorf("txn %d: %d positions, want %d", i+1, got, wantPerTxn[i])
				}
			}
			if len(next) != len(txns) {
				t.Errorf("positions carry %d commit LSNs, want %d: %v", len(next), len(txns), next)
			}
			if want := []pipeline.LSN{txns[2].end}; acks[len(acks)-1] != want[0] {
				t.Errorf("last ack %v, want %v", acks[len(acks)-1], want[0])
			}
		})
	}
}

func TestPipelineStats(t *testing.T) {
	src := newFakeSource(buildEvents(
		txnN(1, insertEvent("$1", "!a"), insertEvent("$2", "!a")),
		txnN(2, insertEvent("$3", "!a")),
	))
	sink := newFakeSink()
	p := newPipeline(t, pipeline.Config{Router: pipeline.RouterConfig{TransactionsTopic: true}}, src, sink)
	if err := p.Run(testCtx(t)); !errors.Is(err, errDrained) {
		t.Fatalf("Run: %v", err)
	}
	st := p.Stats()
	for _, c := range []struct {
		name      string
		got, want int64
	}{
		{"Changes", int64(st.Changes.Load()), 3},
		{"Transactions", int64(st.Transactions.Load()), 2},
		{"Published", int64(st.Published.Load()), int64(len(sink.Written()))},
		{"Published (3 changes + 2 BEGIN + 2 END)", int64(st.Published.Load()), 7},
		{"AckedLSN", int64(st.AckedLSN.Load()), 2008},
		{"ReceivedLSN", int64(st.ReceivedLSN.Load()), 2000},
		{"InFlight after Run", st.InFlight.Load(), 0},
		{"InFlightSize after Run", st.InFlightSize.Load(), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// TestPipelineAcks checks that a transaction is acknowledged with its end LSN
// only after the Write holding its last message returned, that acks only
// grow, and that the last transaction is acknowledged.
func TestPipelineAcks(t *testing.T) {
	var txns []txnSpec
	wantChanges := map[pipeline.LSN]int{}
	for n := 1; n <= 20; n++ {
		var chs []pipeline.Change
		for i := 0; i <= n%3; i++ {
			chs = append(chs, insertEvent(fmt.Sprintf("$%d.%d", n, i), "!r"))
		}
		txns = append(txns, txnN(n, chs...))
		wantChanges[txns[n-1].commit] = len(chs)
	}
	for _, tc := range []struct {
		batch    int
		txnTopic bool
	}{{1, false}, {1, true}, {2, false}, {2, true}, {5, true}, {1000, false}, {1000, true}} {
		t.Run(fmt.Sprintf("batch=%d/transactions_topic=%v", tc.batch, tc.txnTopic), func(t *testing.T) {
			src, sink := newFakeSource(buildEvents(txns...)), newFakeSink()
			var mu sync.Mutex
			var problems []string
			var last pipeline.LSN
			src.onAck = func(lsn pipeline.LSN) {
				mu.Lock()
				defer mu.Unlock()
				if lsn <= last {
					problems = append(problems, fmt.Sprintf("ack %d after ack %d", lsn, last))
				}
				last = lsn
				k := -1
				for i, ts := range txns {
					if ts.end == lsn {
						k = i
					}
				}
				if k < 0 {
					problems = append(problems, fmt.Sprintf("ack %d is no transaction's end LSN", lsn))
					return
				}
				written := sink.Written()
				got := map[pipeline.LSN]int{}
				ends := map[string]bool{}
				for _, m := range written {
					if strings.HasSuffix(m.Topic, ".transaction") {
						if s, _ := header(m, "tidemark-status"); s == "END" {
							ends[string(m.Key)] = true
						}
						continue
					}
					got[m.Pos.CommitLSN]++
				}
				for _, ts := range txns[:k+1] {
					if got[ts.commit] != wantChanges[ts.commit] {
						problems = append(problems, fmt.Sprintf("ack %d before txn %d's changes were written (%d of %d)",
							lsn, ts.xid, got[ts.commit], wantChanges[ts.commit]))
					}
				}
				if tc.txnTopic {
					key := fmt.Sprintf(`{"id":"%d:%d"}`, txns[k].xid, txns[k].commit)
					if !ends[key] {
						problems = append(problems, fmt.Sprintf("ack %d before the END record %s was written", lsn, key))
					}
				}
			}
			p := newPipeline(t, pipeline.Config{
				Router:           pipeline.RouterConfig{TransactionsTopic: tc.txnTopic},
				MaxBatchMessages: tc.batch,
			}, src, sink)
			if err := p.Run(testCtx(t)); !errors.Is(err, errDrained) {
				t.Fatalf("Run: %v", err)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, p := range problems {
				t.Error(p)
			}
			acks := src.Acks()
			if len(acks) == 0 || acks[len(acks)-1] != txns[len(txns)-1].end {
				t.Errorf("acks %v do not end with the last end LSN %d", acks, txns[len(txns)-1].end)
			}
			if tc.batch == 1 && len(acks) != len(txns) {
				t.Errorf("with one entry per Write, got %d acks, want one per transaction (%d)", len(acks), len(txns))
			}
			checkOrder(t, sink.Written())
		})
	}
}

// TestPipelineBackpressure blocks the sink and checks that the reader stops
// calling Next once MaxInFlightMessages entries are held, and that the bound
// holds for the whole run.
func TestPipelineBackpressure(t *testing.T) {
	var txns []txnSpec
	for n := 1; n <= 30; n++ {
		txns = append(txns, txnN(n, insertEvent(fmt.Sprintf("$%d.a", n), "!r"), insertEvent(fmt.Sprintf("$%d.b", n), "!r")))
	}
	evs := buildEvents(txns...)
	for _, tc := range []struct{ max, batch int }{{1, 1}, {4, 1}, {4, 3}, {9, 3}, {9, 100}} {
		t.Run(fmt.Sprintf("max=%d/batch=%d", tc.max, tc.batch), func(t *testing.T) {
			// With the transactions topic on, every Change and Commit
			// becomes one queue entry carrying one message, and a Begin's
			// BEGIN record is queued with its first change: messages
			// accepted = Next calls - 1 at the start of a call, less one
			// when the last event returned was a Begin.
			src, sink := newFakeSource(evs), newFakeSink()
			sink.block = make(chan struct{})
			p := newPipeline(t, pipeline.Config{
				Router:              pipeline.RouterConfig{TransactionsTopic: true},
				MaxInFlightMessages: tc.max,
				MaxBatchMessages:    tc.batch,
			}, src, sink)
			var mu sync.Mutex
			var problems []string
			report := func(format string, args ...any) {
				mu.Lock()
				problems = append(problems, fmt.Sprintf(format, args...))
				mu.Unlock()
			}
			src.onNext = func(call int) {
				sink.mu.Lock()
				durable := len(sink.written)
				sink.mu.Unlock()
				// Entries accepted and not yet durable can only be fewer
				// than accepted - returned; more means the bound was broken.
				accepted := call - 1
				if call >= 2 && evs[call-2].Kind == pipeline.EventBegin {
					accepted--
				}
				if open := accepted - durable; open > tc.max {
					report("Next call %d with %d messages accepted and not durable (max %d)", call, open, tc.max)
				}
				if in := p.Stats().InFlight.Load(); in > int64(tc.max) {
					report("Next call %d: Stats().InFlight = %d > %d", call, in, tc.max)
				}
			}
			sink.onWrite = func(msgs []pipeline.Message) {
				if len(msgs) > tc.batch {
					report("Write of %d messages > MaxBatchMessages %d", len(msgs), tc.batch)
				}
				if in := p.Stats().InFlight.Load(); in > int64(tc.max) {
					report("Write: Stats().InFlight = %d > %d", in, tc.max)
				}
			}
			ctx := testCtx(t)
			done := make(chan error, 1)
			go func() { done <- p.Run(ctx) }()

			// The reader holds the first event whose entries would exceed
			// the bound (a Begin has none; a first change also carries its
			// transaction's BEGIN record).
			wantCalls, queued, begun := 0, 0, false
		walk:
			for i, ev := range evs {
				entries := 1
				switch {
				case ev.Kind == pipeline.EventBegin:
					entries, begun = 0, false
				case ev.Kind == pipeline.EventChange && !begun:
					entries, begun = 2, true
				}
				for range entries {
					if queued == tc.max {
						wantCalls = i + 1
						break walk
					}
					queued++
				}
			}
			// Wait (polling, bounded by ctx) until the reader is stuck: the
			// sink holds the first batch and the queue is full.
			sinkCalls := func() int { sink.mu.Lock(); defer sink.mu.Unlock(); return sink.calls }
			for src.Calls() < wantCalls || p.Stats().InFlight.Load() < int64(tc.max) || sinkCalls() == 0 {
				select {
				case <-ctx.Done():
					t.Fatalf("reader never filled the queue: %d Next calls, InFlight %d", src.Calls(), p.Stats().InFlight.Load())
				case err := <-done:
					t.Fatalf("Run returned early: %v", err)
				case <-time.After(time.Millisecond):
				}
			}
			if got := src.Calls(); got != wantCalls {
				t.Errorf("reader made %d Next calls while the sink was blocked, want %d (up to the event it holds)", got, wantCalls)
			}
			if got := p.Stats().InFlight.Load(); got != int64(tc.max) {
				t.Errorf("Stats().InFlight = %d while blocked, want %d", got, tc.max)
			}
			sink.mu.Lock()
			held, calls := sink.holding, sink.calls
			sink.mu.Unlock()
			if calls != 1 || held < 1 || held > min(tc.max, tc.batch) {
				t.Errorf("blocked sink: %d Write calls holding %d messages, want 1 call holding 1..%d", calls, held, min(tc.max, tc.batch))
			}
			if len(src.Acks()) != 0 {
				t.Errorf("acks %v while nothing was durable", src.Acks())
			}

			close(sink.block)
			select {
			case err := <-done:
				if !errors.Is(err, errDrained) {
					t.Fatalf("Run: %v", err)
				}
			case <-ctx.Done():
				t.Fatal("Run did not finish after the sink was unblocked")
			}
			mu.Lock()
			for _, p := range problems {
				t.Error(p)
			}
			mu.Unlock()
			if got := len(sink.Written()); got != len(evs) {
				t.Errorf("%d messages written, want %d", got, len(evs))
			}
			if sink.maxHeld > tc.max {
				t.Errorf("sink held %d messages at once, max in flight %d", sink.maxHeld, tc.max)
			}
		})
	}
}

// TestPipelineSinkError checks that a failed Write stops Run with that error
// and that nothing is acknowledged after it.
func TestPipelineSinkError(t *testing.T) {
	errBoom := errors.New("boom: broker unreachable")
	var txns []txnSpec
	for n := 1; n <= 10; n++ {
		txns = append(txns, txnN(n, insertEvent(fmt.Sprintf("$%d", n), "!r")))
	}
	for _, failOn := range []int{1, 2, 3, 5} {
		t.Run(fmt.Sprintf("fail_on_write=%d", failOn), func(t *testing.T) {
			src, sink := newFakeSource(buildEvents(txns...)), newFakeSink()
			sink.failOn, sink.failErr = failOn, errBoom
			// MaxBatchMessages 2 splits each 3-message transaction (BEGIN,
			// change, END) across Writes.
			var mu sync.Mutex
			var problems []string
			src.onAck = func(lsn pipeline.LSN) {
				if sink.Failed() {
					mu.Lock()
					problems = append(problems, fmt.Sprintf("ack %d after the sink failed", lsn))
					mu.Unlock()
				}
				ends := 0
				for _, m := range sink.Written() {
					if s, _ := header(m, "tidemark-status"); s == "END" && strings.HasPrefix(string(m.Key), fmt.Sprintf(`{"id":"%d:`, 500+int(lsn/1000))) {
						ends++
					}
				}
				if ends != 1 {
					mu.Lock()
					problems = append(problems, fmt.Sprintf("ack %d without its END record written", lsn))
					mu.Unlock()
				}
			}
			p := newPipeline(t, pipeline.Config{
				Router:           pipeline.RouterConfig{TransactionsTopic: true},
				MaxBatchMessages: 2,
			}, src, sink)
			err := p.Run(testCtx(t))
			if !errors.Is(err, errBoom) {
				t.Fatalf("Run = %v, want the sink's error", err)
			}
			mu.Lock()
			for _, p := range problems {
				t.Error(p)
			}
			mu.Unlock()
			if !sink.Failed() {
				t.Fatal("sink never failed")
			}
			written := sink.Written()
			if got := p.Stats().Published.Load(); got != uint64(len(written)) {
				t.Errorf("Stats().Published = %d, sink made %d durable", got, len(written))
			}
			// Every ack covers only transactions whose END is durable.
			acks := src.Acks()
			if failOn == 1 && len(acks) != 0 {
				t.Errorf("acks %v although the first Write failed", acks)
			}
			if len(acks) > 0 {
				lastAck := acks[len(acks)-1]
				for _, ts := range txns {
					if ts.end > lastAck {
						continue
					}
					found := false
					for _, m := range written {
						if m.Pos.CommitLSN == ts.commit {
							found = true
						}
					}
					if !found {
						t.Errorf("txn %d acknowledged (ack %d) but its change was never written", ts.xid, lastAck)
					}
				}
			}
		})
	}
}

// TestPipelineRedelivery: a Begin while a transaction is open means the
// source reconnected and delivers the open transaction again; its positions
// must be the same the second time.
func TestPipelineRedelivery(t *testing.T) {
	ts := txnN(1, insertEvent("$1", "!a"), insertEvent("$2", "!a"))
	partial := buildEvents(txnSpec{xid: ts.xid, commit: ts.commit, end: ts.end, changes: ts.changes[:1]})
	partial = partial[:len(partial)-1] // no commit: the connection dropped
	evs := append(partial, buildEvents(ts, txnN(2, insertEvent("$3", "!b")))...)
	msgs, acks, err := runAll(t, pipeline.Config{}, evs)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	var got []string
	for _, m := range msgs {
		got = append(got, fmt.Sprintf("%s %s", m.Key, m.Pos))
	}
	want := []string{
		`{"event_id":"$1"} 1000:0`, // first delivery, abandoned
		`{"event_id":"$1"} 1000:0`, // again, same position
		`{"event_id":"$2"} 1000:1`,
		`{"event_id":"$3"} 2000:0`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("messages:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(msgs) == 4 && string(msgs[0].Value) != string(msgs[1].Value) {
		t.Errorf("redelivered change differs:\n%s\n%s", msgs[0].Value, msgs[1].Value)
	}
	for _, a := range acks {
		if a != ts.end && a != 2008 {
			t.Errorf("ack %d is not an end LSN", a)
		}
	}
}

func TestPipelineRejectsBrokenEventStreams(t *testing.T) {
	info := &pipeline.TxnInfo{Xid: 1, CommitLSN: 100, EndLSN: 108}
	other := &pipeline.TxnInfo{Xid: 2, CommitLSN: 200, EndLSN: 208}
	cases := []struct {
		name string
		evs  []pipeline.Event
		want string
	}{
		{"change without begin", []pipeline.Event{{Kind: pipeline.EventChange, Txn: info, Change: insertEvent("$1", "!a")}}, "outside its transaction"},
		{"commit without begin", []pipeline.Event{{Kind: pipeline.EventCommit, Txn: info}}, "commit without its begin"},
		{"commit of another txn", []pipeline.Event{{Kind: pipeline.EventBegin, Txn: info}, {Kind: pipeline.EventCommit, Txn: other}}, "commit without its begin"},
		{"unknown kind", []pipeline.Event{{Kind: 99, Txn: info}}, "unknown event kind"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, acks, err := runAll(t, pipeline.Config{}, tc.evs)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Run = %v, want an error containing %q", err, tc.want)
			}
			if len(acks) != 0 {
				t.Errorf("acks %v", acks)
			}
		})
	}
}

// TestEmptyTransactionPublishesNothing: a transaction without a captured
// change (Postgres 14 and older send empty ones; capture may have skipped
// all of its changes) publishes no BEGIN and no END record, and is still
// acknowledged; the transactions around it publish theirs.
func TestEmptyTransactionPublishesNothing(t *testing.T) {
	evs := buildEvents(txnN(1, insertEvent("$1", "!r")), txnN(2), txnN(3, insertEvent("$3", "!r")))
	src, sink := newFakeSource(evs), newFakeSink()
	p := newPipeline(t, pipeline.Config{Router: pipeline.RouterConfig{TransactionsTopic: true}}, src, sink)
	if err := p.Run(testCtx(t)); !errors.Is(err, errDrained) {
		t.Fatalf("Run: %v", err)
	}
	var txnRecords []string
	for _, m := range sink.Written() {
		if strings.HasSuffix(m.Topic, ".transaction") {
			r, err := pipeline.ParseTxnRecord(m.Value)
			if err != nil {
				t.Fatal(err)
			}
			txnRecords = append(txnRecords, fmt.Sprintf("%s %d", r.Status, r.TxID))
		}
	}
	if want := []string{"BEGIN 501", "END 501", "BEGIN 503", "END 503"}; !slices.Equal(txnRecords, want) {
		t.Errorf("transaction records %v, want %v", txnRecords, want)
	}
	// Acknowledgements are cumulative: the last covers the empty one too.
	if acks := src.Acks(); len(acks) == 0 || acks[len(acks)-1] != txnN(3).end {
		t.Errorf("acks %v, want the last at %s", acks, txnN(3).end)
	}
}

// TestPipelineDrainsOnStop: when Run's ctx ends, reading stops and the
// writer still writes and acknowledges what is queued (a clean stop leaves
// nothing durable unacknowledged); with DrainTimeout < 0 it stops at once;
// a sink that never returns is given up after DrainTimeout.
func TestPipelineDrainsOnStop(t *testing.T) {
	evs := buildEvents(txnN(3, insertEvent("$1", "!a")), txnN(3, insertEvent("$2", "!b")), txnN(3, insertEvent("$3", "!c")))
	var final pipeline.LSN
	for _, ev := range evs {
		if ev.Kind == pipeline.EventCommit {
			final = ev.Txn.EndLSN
		}
	}
	run := func(t *testing.T, drain time.Duration, release bool) ([]pipeline.LSN, time.Duration) {
		src, sink := newFakeSource(evs), newFakeSink()
		sink.block = make(chan struct{})
		p := newPipeline(t, pipeline.Config{MaxBatchMessages: 1, Linger: -1, DrainTimeout: drain}, src, sink)
		ctx, cancel := context.WithCancel(testCtx(t))
		done := make(chan error, 1)
		go func() { done <- p.Run(ctx) }()
		<-sink.entered // the first write is in flight
		// Everything is queued before the stop.
		for deadline := time.Now().Add(5 * time.Second); src.Calls() <= len(evs); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the source was read %d times, want all %d events", src.Calls(), len(evs))
			}
		}
		cancel()
		stopped := time.Now()
		if release {
			time.Sleep(20 * time.Millisecond) // the stop is seen first
			close(sink.block)
		}
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run after a stop: %v, want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Run did not return after the stop")
		}
		return src.Acks(), time.Since(stopped)
	}
	t.Run("drains", func(t *testing.T) {
		acks, _ := run(t, 0, true)
		if len(acks) == 0 || acks[len(acks)-1] != final {
			t.Errorf("acks after a clean stop %v, want the last to be the final transaction's end %s", acks, final)
		}
	})
	t.Run("no drain", func(t *testing.T) {
		acks, _ := run(t, -1, true)
		if len(acks) > 0 && acks[len(acks)-1] == final {
			t.Errorf("with DrainTimeout < 0 the queue was still drained: acks %v", acks)
		}
	})
	t.Run("gives up", func(t *testing.T) {
		acks, took := run(t, 200*time.Millisecond, false)
		if len(acks) > 0 {
			t.Errorf("acks %v from a sink that never returned", acks)
		}
		if took < 150*time.Millisecond {
			t.Errorf("gave up after %s, before the 200ms drain timeout", took)
		}
	})
}
