package kafka

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// TestWriteReadBack writes through a real Kafka-protocol broker (kfake,
// which checks every batch's CRC) with each codec and reads everything back
// with kafka-go: every message arrives once, in its key's partition, in
// order, with its key (nil stays nil), value and headers; a broadcast
// reaches every partition; small batch bytes force several rounds.
func TestWriteReadBack(t *testing.T) {
	for _, codec := range []string{"none", "gzip", "snappy", "lz4", "zstd"} {
		t.Run(codec, func(t *testing.T) {
			// A broker per codec: kafka-go's default transport caches
			// metadata, so a topic created later on a shared broker would
			// stay unknown to ReadAll for seconds.
			cl := kafkatest.ForTest(t)
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			s, err := New(Config{Brokers: cl.Brokers(), Partitions: 4, Compression: codec, BatchBytes: 16 << 10}, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close(ctx)
			topic := "readback." + codec
			if err := s.EnsureTopics(ctx, []string{topic}, nil); err != nil {
				t.Fatal(err)
			}
			const n = 2000
			var msgs []pipeline.Message
			for i := 0; i < n; i++ {
				m := pipeline.Message{Topic: topic, Value: []byte(fmt.Sprintf(`{"i":%d,"pad":"%0*d"}`, i, i%300, 0)),
					Headers: []pipeline.Header{{Key: "tidemark-seq", Value: []byte(strconv.Itoa(i))}},
					Pos:     pipeline.Position{CommitLSN: 1, Seq: uint32(i)}}
				if i%10 != 0 {
					m.Key = []byte(fmt.Sprintf(`{"k":%d}`, i%37))
				}
				if i == n/2 {
					m.Broadcast = true
				}
				msgs = append(msgs, m)
			}
			// Two writes, so order also holds across Write calls.
			if err := s.Write(ctx, msgs[:n/3]); err != nil {
				t.Fatal(err)
			}
			if err := s.Write(ctx, msgs[n/3:]); err != nil {
				t.Fatal(err)
			}
			recs, err := kafkatest.ReadAll(ctx, cl.Brokers(), topic)
			if err != nil {
				t.Fatal(err)
			}
			if len(recs) != n-1+4 {
				t.Fatalf("read %d records, want %d", len(recs), n-1+4)
			}
			lastByPart := map[int]int{}
			seen := map[int]int{}
			for _, r := range recs {
				i, err := strconv.Atoi(r.Headers["tidemark-seq"])
				if err != nil {
					t.Fatalf("record without its header: %+v", r)
				}
				seen[i]++
				m := msgs[i]
				if string(r.Value) != string(m.Value) || string(r.Key) != string(m.Key) || (r.Key == nil) != (m.Key == nil) {
					t.Fatalf("record %d: key %q value %q, want %q %q", i, r.Key, r.Value, m.Key, m.Value)
				}
				if !m.Broadcast && r.Partition != PartitionFor(m.Key, 4) {
					t.Fatalf("record %d in partition %d, want %d", i, r.Partition, PartitionFor(m.Key, 4))
				}
				if last, ok := lastByPart[r.Partition]; ok && i <= last {
					t.Fatalf("partition %d: record %d after %d", r.Partition, i, last)
				}
				lastByPart[r.Partition] = i
			}
			for i := 0; i < n; i++ {
				want := 1
				if msgs[i].Broadcast {
					want = 4
				}
				if seen[i] != want {
					t.Fatalf("record %d read %d times, want %d", i, seen[i], want)
				}
			}
		})
	}
}

// A topic created with a larger max.message.bytes takes records beyond
// BatchBytes once its bound is raised (SetTopicBatchBytes); other topics
// keep BatchBytes and name the refused message; several big records to the
// topic go in batches the broker accepts.
func TestTopicBatchBytes(t *testing.T) {
	cl := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := New(Config{Brokers: cl.Brokers(), Partitions: 1}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	const limit = 4 << 20
	if err := s.EnsureTopics(ctx, []string{"big", "small"}, map[string]TopicSpec{
		"big": {Configs: map[string]string{"max.message.bytes": strconv.Itoa(limit + 1024)}}}); err != nil {
		t.Fatal(err)
	}
	if n, err := s.MaxMessageBytes(ctx, "big"); err != nil || n != limit+1024 {
		t.Fatalf("MaxMessageBytes(big) = %d, %v", n, err)
	}
	if n, err := s.MaxMessageBytes(ctx, "small"); err != nil || n <= 0 || n > 2<<20 {
		t.Fatalf("MaxMessageBytes(small) = %d, %v; want the broker default", n, err)
	}
	value := make([]byte, 3<<20) // 3 MiB
	for i := range value {
		value[i] = 'a' + byte(i%26)
	}
	big := func(topic string, seq uint32) pipeline.Message {
		return pipeline.Message{Topic: topic, Key: []byte("k"), Value: value, Pos: pipeline.Position{CommitLSN: 7, Seq: seq}}
	}
	if err := s.Write(ctx, []pipeline.Message{big("big", 0)}); err == nil {
		t.Fatal("a 3 MiB message passed the default 1 MiB bound")
	}
	s.SetTopicBatchBytes("big", limit)
	if err := s.Write(ctx, []pipeline.Message{big("big", 1), big("big", 2), big("big", 3)}); err != nil {
		t.Fatalf("three 3 MiB messages to a topic with a 4 MiB bound: %v", err)
	}
	err = s.Write(ctx, []pipeline.Message{big("small", 4)})
	if err == nil || !strings.Contains(err.Error(), "message for topic small at position 7:4 is") {
		t.Fatalf("3 MiB to a topic with the default bound: %v", err)
	}
	recs, err := kafkatest.ReadAll(ctx, cl.Brokers(), "big")
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 {
		t.Fatalf("read %d records of topic big, want 3", len(recs))
	}
	for _, r := range recs {
		if !bytes.Equal(r.Value, value) {
			t.Fatalf("a big record came back with %d bytes", len(r.Value))
		}
	}
}
