package invalidation

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

type countingHandler struct{ n atomic.Int64 }

func (h *countingHandler) Handle(context.Context, *Message) error { h.n.Add(1); return nil }

type discardSink struct{}

func (discardSink) Write(context.Context, []pipeline.Message) error { return nil }
func (discardSink) Close(context.Context) error                     { return nil }

// TestConsumerWaitsForItsTopics: a consumer started before capture created
// its topic (a group member joining then would be assigned nothing) says
// it waits (Stats.WaitingForTopics, TopicWaits) and applies what is written
// once the topic exists.
func TestConsumerWaitsForItsTopics(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h := &countingHandler{}
	c, err := NewConsumer(Config{Brokers: cl.Brokers(), Group: "late", Topics: map[string][]string{"late.public.events": {"public.events"}},
		Handlers: map[string]Handler{"public.events": h}, DLQTopic: "late.dlq", DLQ: discardSink{}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	// The consumer is up, the topic is not: it says it waits.
	waiting := time.After(10 * time.Second)
	for !c.Stats().WaitingForTopics.Load() || c.Stats().TopicWaits.Load() == 0 {
		select {
		case err := <-done:
			t.Fatalf("consumer stopped: %v", err)
		case <-waiting:
			t.Fatal("the consumer did not report waiting for its topic within 10s")
		case <-time.After(10 * time.Millisecond):
		}
	}

	client := &kafkago.Client{Addr: kafkago.TCP(cl.Brokers()...)}
	if _, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{
		{Topic: "late.public.events", NumPartitions: 3, ReplicationFactor: 1}}}); err != nil {
		t.Fatal(err)
	}
	w := &kafkago.Writer{Addr: kafkago.TCP(cl.Brokers()...), Topic: "late.public.events", RequiredAcks: kafkago.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	var msgs []kafkago.Message
	for i := 0; i < 30; i++ {
		v := fmt.Sprintf(`{"before":null,"after":{"event_id":"$e%d"},"op":"c","source":{"schema":"public","table":"events","lsn":%d,"txId":1},"transaction":{"total_order":1}}`, i, 100+i)
		msgs = append(msgs, kafkago.Message{Key: []byte{byte(i)}, Value: []byte(v)})
	}
	if err := w.WriteMessages(ctx, msgs...); err != nil {
		t.Fatal(err)
	}
	for h.n.Load() < 30 {
		select {
		case err := <-done:
			t.Fatalf("consumer stopped: %v", err)
		case <-ctx.Done():
			t.Fatalf("applied %d of 30 messages written after the consumer started", h.n.Load())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if c.Stats().WaitingForTopics.Load() {
		t.Error("Stats.WaitingForTopics still set once the topic exists")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A broker that takes 50ms to answer each fetch (a remote cluster, or a
// large response) still feeds the consumer: kafka-go's MaxWait is also its
// deadline for a fetch response to start arriving, and a 10ms MaxWait made
// every fetch time out, so the consumer never advanced.
func TestConsumerToleratesSlowFetches(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client := &kafkago.Client{Addr: kafkago.TCP(cl.Brokers()...)}
	if _, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{
		{Topic: "slow.public.events", NumPartitions: 2, ReplicationFactor: 1}}}); err != nil {
		t.Fatal(err)
	}
	w := &kafkago.Writer{Addr: kafkago.TCP(cl.Brokers()...), Topic: "slow.public.events", RequiredAcks: kafkago.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	var msgs []kafkago.Message
	for i := 0; i < 20; i++ {
		v := fmt.Sprintf(`{"before":null,"after":{"event_id":"$e%d"},"op":"c","source":{"schema":"public","table":"events","lsn":%d,"txId":1},"transaction":{"total_order":1}}`, i, 100+i)
		msgs = append(msgs, kafkago.Message{Key: []byte{byte(i)}, Value: []byte(v)})
	}
	if err := w.WriteMessages(ctx, msgs...); err != nil {
		t.Fatal(err)
	}
	cl.DelayFetches(50 * time.Millisecond)
	h := &countingHandler{}
	c, err := NewConsumer(Config{Brokers: cl.Brokers(), Group: "slow", Topics: map[string][]string{"slow.public.events": {"public.events"}},
		Handlers: map[string]Handler{"public.events": h}, DLQTopic: "slow.dlq", DLQ: discardSink{}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	deadline := time.After(30 * time.Second)
	for h.n.Load() < 20 {
		select {
		case err := <-done:
			t.Fatalf("consumer stopped: %v", err)
		case <-deadline:
			t.Fatalf("applied %d of 20 messages in 30s with 50ms fetches", h.n.Load())
		case <-time.After(50 * time.Millisecond):
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
