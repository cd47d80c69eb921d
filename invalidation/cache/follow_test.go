package cache

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/kafkatest"
)

const testPartitionHeader = "test-partition"

// invalidationsTopic creates a compacted topic with two partitions and
// returns a writer for it (see newWriter).
func invalidationsTopic(t *testing.T, brokers []string, topic string) *kafkago.Writer {
	t.Helper()
	createTopic(t, brokers, topic, 2)
	return newWriter(t, brokers, topic)
}

func createTopic(t *testing.T, brokers []string, topic string, partitions int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second}
	resp, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{{
		Topic: topic, NumPartitions: partitions, ReplicationFactor: 1,
		ConfigEntries: []kafkago.ConfigEntry{{ConfigName: "cleanup.policy", ConfigValue: "compact"}},
	}}})
	if err != nil {
		t.Fatalf("creating %s: %v", topic, err)
	}
	if err := resp.Errors[topic]; err != nil {
		t.Fatalf("creating %s: %v", topic, err)
	}
}

// newWriter returns a writer (acks=all, as the pipeline writes) that sends
// each record to the partition named by its test-partition header. A writer
// caches the partition list: make a new one after partitions change.
func newWriter(t *testing.T, brokers []string, topic string) *kafkago.Writer {
	t.Helper()
	tr := &kafkago.Transport{} // not the shared default: its metadata cache would hide new partitions
	w := &kafkago.Writer{
		Addr:         kafkago.TCP(brokers...),
		Transport:    tr,
		Topic:        topic,
		RequiredAcks: kafkago.RequireAll,
		BatchTimeout: 5 * time.Millisecond,
		Balancer: kafkago.BalancerFunc(func(m kafkago.Message, partitions ...int) int {
			for _, h := range m.Headers {
				if h.Key == testPartitionHeader {
					p, _ := strconv.Atoi(string(h.Value))
					return p
				}
			}
			return partitions[0]
		}),
	}
	t.Cleanup(func() { _ = w.Close(); tr.CloseIdleConnections() })
	return w
}

// invalidation is a record as invalidation.TopicInvalidator writes it.
func invalidation(key string, partition int, lsn uint64, seq int) kafkago.Message {
	return kafkago.Message{
		Key:   []byte(key),
		Value: []byte(strconv.FormatUint(lsn, 10) + ":" + strconv.Itoa(seq)),
		Headers: []kafkago.Header{
			{Key: "tidemark-lsn", Value: []byte(strconv.FormatUint(lsn, 10))},
			{Key: testPartitionHeader, Value: []byte(strconv.Itoa(partition))},
		},
	}
}

// TestFollow runs Follow against an in-process Kafka (kfake).
func TestFollow(t *testing.T) {
	cluster := kafkatest.ForTest(t)
	const topic = "tm.invalidations"
	w := invalidationsTopic(t, cluster.Brokers(), topic)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()

	// Written before Follow starts: never applied, because Follow starts at
	// the end offsets (the cache is empty then, so there is nothing they
	// could make stale).
	if err := w.WriteMessages(ctx, invalidation("a", 0, 100, 0), invalidation("a", 1, 100, 1)); err != nil {
		t.Fatalf("writing: %v", err)
	}

	c, err := New(Config[string]{Brokers: cluster.Brokers(), Topic: topic, MaxStaleness: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fctx, stop := context.WithCancel(ctx)
	followed := make(chan error, 1)
	go func() { followed <- c.Follow(fctx) }()
	waitFor(t, c.Ready)
	if err := c.Follow(fctx); !errors.Is(err, ErrFollowing) {
		t.Errorf("second Follow = %v, want ErrFollowing", err)
	}
	if err := c.SetReady(false); !errors.Is(err, ErrFollowing) {
		t.Errorf("SetReady during Follow = %v, want ErrFollowing", err)
	}

	for _, k := range []string{"a", "s0", "s1"} {
		if _, err := c.GetOrLoad(ctx, k, func(context.Context) (string, error) { return "v-" + k, nil }); err != nil {
			t.Fatal(err)
		}
		if _, ok := c.Get(k); !ok {
			t.Fatalf("%s not cached", k)
		}
	}

	// Sentinels on both partitions: once they are applied, Follow has read
	// everything before them, so the earlier records of "a" were skipped.
	if err := w.WriteMessages(ctx, invalidation("s0", 0, 200, 0), invalidation("s1", 1, 200, 1)); err != nil {
		t.Fatalf("writing: %v", err)
	}
	waitFor(t, func() bool { _, ok0 := c.Get("s0"); _, ok1 := c.Get("s1"); return !ok0 && !ok1 })
	if _, ok := c.Get("a"); !ok {
		t.Fatal(`records written before Follow started were applied: "a" was invalidated`)
	}
	if n := c.Stats().Invalidations; n != 2 {
		t.Errorf("Invalidations = %d, want 2 (only the records written after positioning)", n)
	}

	// A new invalidation of "a", on the other partition than its last one.
	if err := w.WriteMessages(ctx, invalidation("a", 1, 300, 0)); err != nil {
		t.Fatalf("writing: %v", err)
	}
	waitFor(t, func() bool { _, ok := c.Get("a"); return !ok })

	// Stopping Follow clears the cache and stops filling.
	if _, err := c.GetOrLoad(ctx, "b", func(context.Context) (string, error) { return "v", nil }); err != nil {
		t.Fatal(err)
	}
	stop()
	select {
	case err := <-followed:
		if err != nil {
			t.Fatalf("Follow returned %v on cancel, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Follow did not return after cancel")
	}
	if c.Ready() {
		t.Error("Ready after Follow returned")
	}
	if _, ok := c.Get("b"); ok {
		t.Error("the cache was not cleared when Follow returned")
	}
}

// TestFollowPartitionChanges: a partition added while Follow runs is read
// from its start; a topic deleted and recreated (its ends fall below Follow's
// position) clears the cache and Follow positions again.
func TestFollowPartitionChanges(t *testing.T) {
	cluster := kafkatest.ForTest(t)
	brokers := cluster.Brokers()
	const topic = "tm.invalidations"
	createTopic(t, brokers, topic, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second}

	c, err := New(Config[string]{Brokers: brokers, Topic: topic, MaxStaleness: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.refresh = 50 * time.Millisecond
	fctx, stop := context.WithCancel(ctx)
	followed := make(chan error, 1)
	go func() { followed <- c.Follow(fctx) }()
	defer func() {
		stop()
		if err := <-followed; err != nil {
			t.Errorf("Follow = %v", err)
		}
	}()
	waitFor(t, c.Ready)
	load := func(context.Context) (string, error) { return "v", nil }

	// A third partition: its first record is applied.
	if _, err := c.GetOrLoad(ctx, "n", load); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CreatePartitions(ctx, &kafkago.CreatePartitionsRequest{
		Topics: []kafkago.TopicPartitionsConfig{{Name: topic, Count: 3}}}); err != nil {
		t.Fatalf("adding a partition: %v", err)
	}
	if err := newWriter(t, brokers, topic).WriteMessages(ctx, invalidation("n", 2, 100, 0)); err != nil {
		t.Fatalf("writing: %v", err)
	}
	waitFor(t, func() bool { _, ok := c.Get("n"); return !ok })

	// Delete and recreate the topic: partition 2 now ends at 0, below the
	// position 1. The cache must be cleared although no record names "r".
	if _, err := c.GetOrLoad(ctx, "r", load); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Get("r"); !ok {
		t.Fatal("r not cached")
	}
	if _, err := client.DeleteTopics(ctx, &kafkago.DeleteTopicsRequest{Topics: []string{topic}}); err != nil {
		t.Fatalf("deleting %s: %v", topic, err)
	}
	createTopic(t, brokers, topic, 3)
	waitFor(t, func() bool { _, ok := c.Get("r"); return !ok })
	waitFor(t, c.Ready)
	if _, err := c.GetOrLoad(ctx, "r", load); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Get("r"); !ok {
		t.Fatal("r not cached after positioning again")
	}
	applied := c.Stats().Invalidations
	if err := newWriter(t, brokers, topic).WriteMessages(ctx, invalidation("r", 0, 200, 0)); err != nil {
		t.Fatalf("writing: %v", err)
	}
	waitFor(t, func() bool { return c.Stats().Invalidations == applied+1 })
	if _, ok := c.Get("r"); ok {
		t.Fatal("the record of the recreated topic was applied but r is still cached")
	}
	if !c.Ready() {
		t.Fatal("not Ready after the record was applied")
	}
}
