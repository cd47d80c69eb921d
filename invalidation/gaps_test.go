package invalidation

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/kafkatest"
)

// fakeOffsets is an offsetSource whose answers the test sets.
type fakeOffsets struct {
	parts   map[string][]int
	commits map[partKey]int64
	starts  map[partKey]int64
	fail    int // calls that fail before the answers come
}

func (f *fakeOffsets) err() error {
	if f.fail > 0 {
		f.fail--
		return errors.New("broker unreachable")
	}
	return nil
}

func (f *fakeOffsets) partitions(context.Context, []string) (map[string][]int, error) {
	return f.parts, f.err()
}

func (f *fakeOffsets) committed(_ context.Context, _ string, parts map[string][]int) (map[partKey]int64, error) {
	out := map[partKey]int64{}
	for t, ps := range parts {
		for _, p := range ps {
			if c, ok := f.commits[partKey{t, p}]; ok {
				out[partKey{t, p}] = c
			} else {
				out[partKey{t, p}] = -1
			}
		}
	}
	return out, f.err()
}

func (f *fakeOffsets) logStarts(_ context.Context, parts map[string][]int) (map[partKey]int64, error) {
	out := map[partKey]int64{}
	for t, ps := range parts {
		for _, p := range ps {
			out[partKey{t, p}] = f.starts[partKey{t, p}]
		}
	}
	return out, f.err()
}

// TestGapWatch: a committed offset below the log start, found before
// joining or when a fetched record skips past the offset expected next, is
// counted and stops the consumer with a *GapError naming the partition (no
// OnGap), or runs OnGap once per gap and lets the record through; offset
// holes above the log start (compaction), a new group and redeliveries are
// no gap.
func TestGapWatch(t *testing.T) {
	type step struct {
		offset int64
		part   int
		starts int64 // the partition's log start from this record on
	}
	cases := []struct {
		name      string
		committed map[partKey]int64
		starts    map[partKey]int64
		steps     []step
		commitAt  map[int]int64 // step index -> the group's committed offset of its partition from then on (another member's commit)
		want      []Gap         // gaps reported, in order
	}{
		{name: "at start", committed: map[partKey]int64{{"t", 0}: 10, {"t", 1}: 5, {"t", 2}: -1},
			starts: map[partKey]int64{{"t", 0}: 15, {"t", 1}: 5, {"t", 2}: 40},
			want:   []Gap{{Group: "g", Topic: "t", Partition: 0, From: 10, LogStart: 15}}},
		{name: "while running", committed: map[partKey]int64{{"t", 0}: 0},
			steps: []step{{0, 0, 0}, {1, 0, 0}, {2, 0, 0}, {9, 0, 9}},
			want:  []Gap{{Group: "g", Topic: "t", Partition: 0, From: 3, LogStart: 9}}},
		{name: "compaction hole", committed: map[partKey]int64{{"t", 0}: 0},
			steps: []step{{0, 0, 0}, {1, 0, 0}, {7, 0, 0}, {8, 0, 0}}},
		{name: "partition seen first, committed below the log start", committed: map[partKey]int64{{"t", 0}: 0, {"t", 3}: 3},
			steps: []step{{0, 0, 0}, {7, 3, 7}},
			want:  []Gap{{Group: "g", Topic: "t", Partition: 3, From: 3, LogStart: 7}}},
		{name: "new group", steps: []step{{100, 0, 100}, {101, 0, 100}}},
		{name: "redelivery after a rebalance", committed: map[partKey]int64{{"t", 0}: 0},
			steps: []step{{0, 0, 0}, {1, 0, 0}, {2, 0, 0}, {1, 0, 0}, {2, 0, 0}, {3, 0, 0}}},
		{name: "partition back after another member consumed it", committed: map[partKey]int64{{"t", 0}: 0},
			steps: []step{{0, 0, 0}, {1, 0, 0}, {500, 0, 300}, {501, 0, 300}}, commitAt: map[int]int64{2: 500}},
		{name: "gap handled at start is not found again", committed: map[partKey]int64{{"t", 0}: 2},
			starts: map[partKey]int64{{"t", 0}: 6},
			steps:  []step{{6, 0, 6}, {7, 0, 6}},
			want:   []Gap{{Group: "g", Topic: "t", Partition: 0, From: 2, LogStart: 6}}},
	}
	for _, tc := range cases {
		for _, recover := range []bool{false, true} {
			name := tc.name + "/stop"
			if recover {
				name = tc.name + "/on_gap"
			}
			t.Run(name, func(t *testing.T) {
				ctx := context.Background()
				src := &fakeOffsets{parts: map[string][]int{"t": {0, 1, 2}}, commits: maps.Clone(tc.committed), starts: map[partKey]int64{}, fail: 2}
				for k, v := range tc.starts {
					src.starts[k] = v
				}
				var got []Gap
				cfg := Config{Brokers: []string{"b"}, Group: "g", Topics: map[string][]string{"t": {"x"}},
					Handlers: map[string]Handler{"x": &countingHandler{}}, DLQTopic: "dlq", DLQ: discardSink{}}
				if recover {
					failOnce := true
					cfg.OnGap = func(_ context.Context, g Gap) error {
						if failOnce { // a failing recovery is retried
							failOnce = false
							return errors.New("redis down")
						}
						got = append(got, g)
						return nil
					}
				}
				c, err := NewConsumer(cfg, nil)
				if err != nil {
					t.Fatal(err)
				}
				w := c.newGapWatch(src)
				err = w.atStart(ctx, []string{"t"})
				for i, s := range tc.steps {
					if err != nil {
						break
					}
					src.starts[partKey{"t", s.part}] = s.starts
					if c, ok := tc.commitAt[i]; ok {
						src.commits[partKey{"t", s.part}] = c
					}
					err = w.observe(ctx, &kafkago.Message{Topic: "t", Partition: s.part, Offset: s.offset})
				}
				var ge *GapError
				if errors.As(err, &ge) {
					got = append(got, ge.Gaps...)
					if !strings.Contains(ge.Error(), "--reset-offsets --to-earliest --topic t:") || !strings.Contains(ge.Error(), "partition") {
						t.Errorf("GapError %q does not name the partition and the reset", ge.Error())
					}
				} else if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if recover && ge != nil {
					t.Fatalf("with OnGap the consumer stopped: %v", ge)
				}
				want := tc.want
				if !recover && len(want) > 1 {
					want = want[:1]
				}
				if len(got) != len(want) {
					t.Fatalf("gaps = %+v, want %+v", got, want)
				}
				for i := range want {
					if got[i] != want[i] {
						t.Errorf("gap %d = %+v, want %+v", i, got[i], want[i])
					}
				}
				if n := c.Stats().OffsetGaps.Load(); n != uint64(len(want)) {
					t.Errorf("Stats.OffsetGaps = %d, want %d", n, len(want))
				}
				var lost int64
				for _, g := range want {
					lost += g.Records()
				}
				if n := c.Stats().OffsetGapRecords.Load(); n != uint64(lost) {
					t.Errorf("Stats.OffsetGapRecords = %d, want %d", n, lost)
				}
			})
		}
	}
}

// TestConsumerRetentionGap, against kfake: a group that committed 10
// records of a partition whose log start then moved to 15 (DeleteRecords,
// as retention does) is not moved there silently. Without OnGap, Run stops
// before applying anything with a *GapError naming the partition and the
// offsets; with OnGap, the recovery runs once, then the records from the
// log start are applied.
func TestConsumerRetentionGap(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const topic = "gap.public.events"
	client := &kafkago.Client{Addr: kafkago.TCP(cl.Brokers()...)}
	if _, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{
		{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}}); err != nil {
		t.Fatal(err)
	}
	w := &kafkago.Writer{Addr: kafkago.TCP(cl.Brokers()...), Topic: topic, RequiredAcks: kafkago.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	write := func(from, to int) {
		t.Helper()
		var msgs []kafkago.Message
		for i := from; i < to; i++ {
			v := fmt.Sprintf(`{"before":null,"after":{"event_id":"$e%d"},"op":"c","source":{"schema":"public","table":"events","lsn":%d,"txId":1},"transaction":{"total_order":1}}`, i, 100+i)
			msgs = append(msgs, kafkago.Message{Key: []byte{byte(i)}, Value: []byte(v)})
		}
		if err := w.WriteMessages(ctx, msgs...); err != nil {
			t.Fatal(err)
		}
	}
	run := func(h *countingHandler, onGap func(context.Context, Gap) error, until func() bool) (*Consumer, error) {
		t.Helper()
		c, err := NewConsumer(Config{Brokers: cl.Brokers(), Group: "gap", Topics: map[string][]string{topic: {"public.events"}},
			Handlers: map[string]Handler{"public.events": h}, DLQTopic: "gap.dlq", DLQ: discardSink{}, OnGap: onGap}, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		rctx, stop := context.WithCancel(ctx)
		defer stop()
		done := make(chan error, 1)
		go func() { done <- c.Run(rctx) }()
		for !until() {
			select {
			case err := <-done:
				return c, err
			case <-ctx.Done():
				t.Fatalf("timed out; handled %d", h.n.Load())
			case <-time.After(20 * time.Millisecond):
			}
		}
		stop()
		return c, <-done
	}
	write(0, 10)
	first := &countingHandler{}
	if _, err := run(first, nil, func() bool { return first.n.Load() == 10 }); err != nil {
		t.Fatal(err)
	}
	write(10, 20)
	if err := kafkatest.DeleteRecords(ctx, cl.Brokers(), topic, 0, 15); err != nil {
		t.Fatal(err)
	}

	stopped := &countingHandler{}
	c, err := run(stopped, nil, func() bool { return false })
	var ge *GapError
	if !errors.As(err, &ge) || len(ge.Gaps) != 1 || ge.Gaps[0] != (Gap{Group: "gap", Topic: topic, Partition: 0, From: 10, LogStart: 15}) {
		t.Fatalf("Run = %v, want a GapError for %s partition 0 from 10 to 15", err, topic)
	}
	for _, want := range []string{topic + " partition 0", "offset 10", "starts at 15", "--reset-offsets --to-earliest --topic " + topic + ":0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if stopped.n.Load() != 0 || c.Stats().OffsetGaps.Load() != 1 || c.Stats().OffsetGapRecords.Load() != 5 {
		t.Errorf("handled %d, gaps %d, records %d; want 0, 1, 5", stopped.n.Load(), c.Stats().OffsetGaps.Load(), c.Stats().OffsetGapRecords.Load())
	}

	recovered := &countingHandler{}
	var gaps []Gap
	c, err = run(recovered, func(_ context.Context, g Gap) error {
		if recovered.n.Load() != 0 {
			t.Errorf("OnGap ran after %d records were applied", recovered.n.Load())
		}
		gaps = append(gaps, g)
		return nil
	}, func() bool { return recovered.n.Load() == 5 })
	if err != nil {
		t.Fatal(err)
	}
	if len(gaps) != 1 || gaps[0].From != 10 || gaps[0].LogStart != 15 || c.Stats().OffsetGaps.Load() != 1 {
		t.Errorf("OnGap calls %+v, Stats.OffsetGaps %d; want one gap from 10 to 15", gaps, c.Stats().OffsetGaps.Load())
	}
}
