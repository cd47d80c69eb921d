package cache

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/kafkatest"
	inv "github.com/tidemark/tidemark/invalidation"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

// controlRecord is a control record as the invalidation role writes it.
func controlRecord(kind, key, value string, partition int) kafkago.Message {
	return kafkago.Message{Key: []byte(key), Value: []byte(value), Headers: []kafkago.Header{
		{Key: inv.ControlHeader, Value: []byte(kind)},
		{Key: testPartitionHeader, Value: []byte(strconv.Itoa(partition))},
	}}
}

func watermarkRecord(partition int) kafkago.Message {
	return controlRecord(inv.ControlWatermark, inv.WatermarkKey,
		`{"position":"100:0","at":"`+time.Now().UTC().Format(time.RFC3339Nano)+`"}`, partition)
}

// pulse writes a watermark to each of partitions every 50ms until the test
// ends.
func pulse(t *testing.T, w *kafkago.Writer, partitions int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			var msgs []kafkago.Message
			for p := range partitions {
				msgs = append(msgs, watermarkRecord(p))
			}
			_ = w.WriteMessages(ctx, msgs...)
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
}

func followForTest(t *testing.T, c *Cache[string]) {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	followed := make(chan error, 1)
	go func() { followed <- c.Follow(ctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-followed; err != nil {
			t.Errorf("Follow = %v", err)
		}
	})
}

func cached(c *Cache[string], key string) bool { _, ok := c.Get(key); return ok }

// TestFollowControlRecords: the cache is Ready only once every partition
// delivered a watermark; a control record is never applied as a cache key
// (its key may equal one); unknown kinds and malformed watermarks are
// skipped and counted; a flush record clears the cache and Ready stays.
func TestFollowControlRecords(t *testing.T) {
	cluster := kafkatest.ForTest(t)
	const topic = "tm.invalidations"
	w := invalidationsTopic(t, cluster.Brokers(), topic)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := New(Config[string]{Brokers: cluster.Brokers(), Topic: topic, MaxStaleness: time.Second}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	followForTest(t, c)
	waitFor(t, func() bool { return c.Stats().WatermarkAge > 0 }) // positioned

	// One partition's watermark is not enough.
	if err := w.WriteMessages(ctx, watermarkRecord(0)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		c.marksMu.Lock()
		defer c.marksMu.Unlock()
		return c.marks[0] != nil && c.marks[0].seen
	})
	time.Sleep(3 * c.freshCheck()) // several freshness checks
	if c.Ready() {
		t.Fatal("Ready with a watermark on partition 0 only")
	}
	pulse(t, w, 2)
	waitFor(t, c.Ready)

	load := func(context.Context) (string, error) { return "v", nil }
	for _, k := range []string{"k", "a", inv.WatermarkKey} {
		if _, err := c.GetOrLoad(ctx, k, load); err != nil {
			t.Fatal(err)
		}
		if !cached(c, k) {
			t.Fatalf("%s not cached", k)
		}
	}
	// An unknown kind keyed "k", a malformed watermark, then a sentinel:
	// once the sentinel is applied, the control records were read.
	if err := w.WriteMessages(ctx,
		controlRecord("from-the-future", "k", "{}", 0),
		controlRecord(inv.ControlWatermark, inv.WatermarkKey, "not json", 0),
		controlRecord("from-the-future", "k", "{}", 0),
		invalidation("s", 0, 200, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetOrLoad(ctx, "s", load); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return c.Stats().Invalidations >= 1 })
	st := c.Stats()
	if !cached(c, "k") || !cached(c, inv.WatermarkKey) {
		t.Error("a control record was applied as an invalidation of its key")
	}
	if st.Invalidations != 1 {
		t.Errorf("Invalidations = %d, want 1 (the sentinel; control records are not invalidations)", st.Invalidations)
	}
	if st.ControlSkipped != 3 {
		t.Errorf("ControlSkipped = %d, want 3", st.ControlSkipped)
	}
	if st.WatermarkPosition != "100:0" || st.WatermarkAt.IsZero() {
		t.Errorf("watermark position %q at %v, want 100:0 and a time", st.WatermarkPosition, st.WatermarkAt)
	}

	// A flush on one partition drops every key; the cache stays Ready and
	// fills again.
	if err := w.WriteMessages(ctx, controlRecord(inv.ControlFlush, inv.FlushKey,
		`{"reason":"test","at":"2026-01-01T00:00:00Z"}`, 1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return c.Stats().Flushes == 1 })
	for _, k := range []string{"k", "a", inv.WatermarkKey} {
		if cached(c, k) {
			t.Errorf("%s still cached after a flush record", k)
		}
	}
	if !c.Ready() {
		t.Error("not Ready after a flush record")
	}
	if _, err := c.GetOrLoad(ctx, "a", load); err != nil {
		t.Fatal(err)
	}
	if !cached(c, "a") {
		t.Error("a not cached again after the flush")
	}
}

// TestFollowStaleWhileCutOff (acceptance 6): the invalidation role's
// TopicInvalidator writes watermarks through the Kafka sink; the broker
// stops for longer than MaxStaleness: the cache becomes not Ready, serves
// no cached value and caches no load; after the broker is back it is Ready
// and caches again.
func TestFollowStaleWhileCutOff(t *testing.T) {
	cluster, err := kafkatest.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cluster.Close)
	brokers := cluster.Brokers()
	const topic = "tm.invalidations"
	createTopic(t, brokers, topic, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	sink, err := kafkasink.New(kafkasink.Config{Brokers: brokers, MaxBackoff: 200 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.EnsureTopics(ctx, []string{topic}, nil); err != nil {
		t.Fatal(err)
	}
	ti := &inv.TopicInvalidator{Topic: topic, Sink: sink, WatermarkInterval: 50 * time.Millisecond}
	wctx, stopWatermarks := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = ti.Run(wctx) })
	t.Cleanup(func() {
		stopWatermarks()
		wg.Wait()
		_ = sink.Close(context.Background())
	})

	const maxStale = time.Second
	c, err := New(Config[string]{Brokers: brokers, Topic: topic, MaxStaleness: maxStale}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	followForTest(t, c)
	waitFor(t, c.Ready)
	loads := 0
	load := func(context.Context) (string, error) { loads++; return "v" + strconv.Itoa(loads), nil }
	if _, err := c.GetOrLoad(ctx, "k", load); err != nil {
		t.Fatal(err)
	}
	if !cached(c, "k") {
		t.Fatal("k not cached while fresh")
	}

	cluster.Stop()
	stopped := time.Now()
	waitUntil(t, maxStale+5*time.Second, func() bool { return !c.Ready() })
	if d := time.Since(stopped); d < maxStale/2 {
		t.Errorf("not Ready %s after the broker stopped, before the staleness bound %s", d, maxStale)
	}
	if cached(c, "k") {
		t.Error("k still served from the cache while its watermarks are stale")
	}
	before := loads
	if v, err := c.GetOrLoad(ctx, "k", load); err != nil || v == "" {
		t.Fatalf("GetOrLoad while stale = %q, %v", v, err)
	}
	if loads != before+1 || cached(c, "k") {
		t.Errorf("while stale: %d loads (want %d), cached %v (want false)", loads, before+1, cached(c, "k"))
	}
	st := c.Stats()
	if st.Stale != 1 || st.WatermarkAge <= maxStale {
		t.Errorf("Stats while stale: Stale %d (want 1), WatermarkAge %s (want > %s)", st.Stale, st.WatermarkAge, maxStale)
	}

	if err := cluster.Restart(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, c.Ready)
	if _, err := c.GetOrLoad(ctx, "k", load); err != nil {
		t.Fatal(err)
	}
	if !cached(c, "k") {
		t.Error("k not cached after the watermarks are fresh again")
	}
	if age := c.Stats().WatermarkAge; age > maxStale {
		t.Errorf("WatermarkAge %s after reconnecting, want <= %s", age, maxStale)
	}
}

// TestFollowRecreatedByID: the topic is deleted and recreated and the new
// one grows past Follow's old position before Follow looks, so its reader
// reads on from the old offset and no end falls below its position; the
// changed topic id still clears the cache and repositions.
func TestFollowRecreatedByID(t *testing.T) {
	cluster := kafkatest.ForTest(t)
	brokers := cluster.Brokers()
	const topic = "tm.invalidations"
	createTopic(t, brokers, topic, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := New(Config[string]{Brokers: brokers, Topic: topic, MaxStaleness: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.refresh = time.Hour
	c.recheck = make(chan struct{})
	followForTest(t, c)
	waitFor(t, c.Ready)

	var old []kafkago.Message
	for i := range 5 {
		old = append(old, invalidation("x"+strconv.Itoa(i), 0, uint64(100+i), 0))
	}
	if err := newWriter(t, brokers, topic).WriteMessages(ctx, old...); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return c.Stats().Invalidations == 5 })
	if _, err := c.GetOrLoad(ctx, "r", func(context.Context) (string, error) { return "v", nil }); err != nil {
		t.Fatal(err)
	}

	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second}
	if _, err := client.DeleteTopics(ctx, &kafkago.DeleteTopicsRequest{Topics: []string{topic}}); err != nil {
		t.Fatal(err)
	}
	createTopic(t, brokers, topic, 1)
	var recs []kafkago.Message
	for i := range 20 {
		recs = append(recs, invalidation("y"+strconv.Itoa(i), 0, uint64(200+i), 0))
	}
	if err := newWriter(t, brokers, topic).WriteMessages(ctx, recs...); err != nil {
		t.Fatal(err)
	}
	// The reader went on at offset 5 of the new topic: 15 records applied,
	// the first 5 never, and nothing names "r".
	waitUntil(t, 15*time.Second, func() bool { return c.Stats().Invalidations == 20 })
	if !cached(c, "r") {
		t.Fatal("r was dropped before the check (the test no longer forces the silent case)")
	}
	c.recheck <- struct{}{}
	waitFor(t, func() bool { return !cached(c, "r") })
	if n := c.Stats().Recreations; n != 1 {
		t.Errorf("Recreations = %d, want 1", n)
	}
	waitFor(t, c.Ready)
}

func waitUntil(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFollowNewPartitionWithoutWatermark: a partition added while Follow
// runs does not count until its first watermark (the writer learns new
// partitions later), so the cache stays Ready on the others' watermarks.
func TestFollowNewPartitionWithoutWatermark(t *testing.T) {
	cluster := kafkatest.ForTest(t)
	brokers := cluster.Brokers()
	const topic = "tm.invalidations"
	createTopic(t, brokers, topic, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const maxStale = 300 * time.Millisecond
	c, err := New(Config[string]{Brokers: brokers, Topic: topic, MaxStaleness: maxStale}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.refresh = 50 * time.Millisecond
	pulse(t, newWriter(t, brokers, topic), 1)
	followForTest(t, c)
	waitFor(t, c.Ready)

	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second}
	if _, err := client.CreatePartitions(ctx, &kafkago.CreatePartitionsRequest{
		Topics: []kafkago.TopicPartitionsConfig{{Name: topic, Count: 2}}}); err != nil {
		t.Fatalf("adding a partition: %v", err)
	}
	waitFor(t, func() bool { c.marksMu.Lock(); defer c.marksMu.Unlock(); return c.marks[1] != nil })
	for end := time.Now().Add(3 * maxStale); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if !c.Ready() {
			t.Fatal("not Ready: a new partition without a watermark yet counted as stale")
		}
	}
	if n := c.Stats().Stale; n != 0 {
		t.Errorf("Stale = %d, want 0", n)
	}
}
