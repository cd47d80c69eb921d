package kafka

import (
	"fmt"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

// BenchmarkPartitionFor: murmur2 partitioning of a typical key.
func BenchmarkPartitionFor(b *testing.B) {
	key := []byte(`{"room_id":"!r123:bench.test"}`)
	b.ReportAllocs()
	for b.Loop() {
		_ = PartitionFor(key, 12)
	}
}

// BenchmarkConvertAndRound: preparing a 10,000-message write (conversion to
// records, the plan of one-batch-per-partition rounds and the encoding of
// every record batch), per message.
func BenchmarkConvertAndRound(b *testing.B) {
	s, err := New(Config{Brokers: []string{"127.0.0.1:1"}, Partitions: 12}, nil)
	if err != nil {
		b.Fatal(err)
	}
	s.parts["t"] = 12
	msgs := make([]pipeline.Message, 10000)
	for i := range msgs {
		msgs[i] = pipeline.Message{Topic: "t", Key: []byte(fmt.Sprintf(`{"room_id":"!r%d"}`, i%500)), Value: make([]byte, 400),
			Headers: []pipeline.Header{{Key: "tidemark-table", Value: []byte("public.events")}, {Key: "tidemark-op", Value: []byte("c")}}}
	}
	b.ReportAllocs()
	for b.Loop() {
		kms, err := s.convert(msgs)
		if err != nil {
			b.Fatal(err)
		}
		for _, round := range s.plan(kms) {
			s.arena = s.arena[:0]
			for i := range round {
				if s.arena, err = s.enc.appendBatch(s.arena, round[i].recs, 0); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(msgs)), "ns/msg")
}
