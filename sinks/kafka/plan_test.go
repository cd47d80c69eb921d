package kafka

import (
	"fmt"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

// TestPlanRounds: each round holds at most one batch per partition, no batch
// exceeds BatchBytes (unless a single record does), every record appears
// once, and each partition's records keep their order across rounds.
func TestPlanRounds(t *testing.T) {
	s, err := New(Config{Brokers: []string{"127.0.0.1:1"}, BatchBytes: 1000}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var recs []record
	for i := 0; i < 500; i++ {
		part := i % 3
		size := int64(100 + i%7*50)
		if i%50 == 0 {
			size = 1500 // larger than a batch on its own
		}
		recs = append(recs, record{topic: fmt.Sprintf("t%d", i%2), part: part, size: size, pos: pipeline.Position{Seq: uint32(i)}})
	}
	rounds := s.plan(recs)
	seen := map[uint32]bool{}
	last := map[tp]int{}
	lastRound := map[tp]int{}
	for ri, round := range rounds {
		inRound := map[tp]bool{}
		for _, b := range round {
			if inRound[b.tp] {
				t.Fatalf("round %d has two batches for %v", ri, b.tp)
			}
			inRound[b.tp] = true
			if r, ok := lastRound[b.tp]; ok && r >= ri {
				t.Fatalf("partition %v: round %d after round %d", b.tp, ri, r)
			}
			lastRound[b.tp] = ri
			var bytes int64
			for _, r := range b.recs {
				bytes += r.size
				if seen[r.pos.Seq] {
					t.Fatalf("record %d planned twice", r.pos.Seq)
				}
				seen[r.pos.Seq] = true
				if prev, ok := last[b.tp]; ok && int(r.pos.Seq) <= prev {
					t.Fatalf("partition %v: record %d after %d", b.tp, r.pos.Seq, prev)
				}
				last[b.tp] = int(r.pos.Seq)
			}
			if bytes > 1000 && len(b.recs) > 1 {
				t.Fatalf("batch of %d bytes with %d records exceeds BatchBytes", bytes, len(b.recs))
			}
		}
	}
	if len(seen) != len(recs) {
		t.Fatalf("planned %d of %d records", len(seen), len(recs))
	}
}
