package kafka

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// TestLeaderMoves writes steadily to a three-broker cluster while the
// partitions' leaders move to other brokers, several times. Every write
// resumes within 2 s of a move (the longest gap between two successful
// writes is measured), nothing is lost and each key's records stay in
// order. kafka-go's transport routes by a metadata cache refreshed on a
// random timer of up to 30 s; the sink re-reads the metadata after a
// failed write instead.
func TestLeaderMoves(t *testing.T) {
	if testing.Short() {
		t.Skip("moves leaders for several seconds")
	}
	cl := kafkatest.ForTestWith(t, kafkatest.Options{Brokers: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s, err := New(Config{Brokers: cl.Brokers(), Partitions: 3, ReplicationFactor: 3, MaxBackoff: time.Second}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(ctx)
	const topic = "moves"
	if err := s.EnsureTopics(ctx, []string{topic}, nil); err != nil {
		t.Fatal(err)
	}
	const keys = 12
	written := make(chan int, 1)
	stop := make(chan struct{})
	var longest time.Duration
	var writeErr error
	go func() {
		defer close(written)
		seq := 0
		last := time.Now()
		for {
			select {
			case <-stop:
				written <- seq
				return
			default:
			}
			var msgs []pipeline.Message
			for i := 0; i < keys; i++ {
				msgs = append(msgs, pipeline.Message{Topic: topic, Key: []byte(fmt.Sprintf(`{"k":%d}`, i)),
					Value:   []byte(strconv.Itoa(seq)),
					Headers: []pipeline.Header{{Key: "seq", Value: []byte(strconv.Itoa(seq))}},
					Pos:     pipeline.Position{CommitLSN: pipeline.LSN(seq + 1), Seq: uint32(i)}})
			}
			if writeErr = s.Write(ctx, msgs); writeErr != nil {
				written <- seq
				return
			}
			now := time.Now()
			longest = max(longest, now.Sub(last))
			last = now
			seq++
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(500 * time.Millisecond)
	const moves = 4
	fake := cl.Fake()
	for m := 1; m <= moves; m++ {
		for p := int32(0); p < 3; p++ {
			to := (fake.LeaderFor(topic, p) + 1) % 3
			if err := fake.MoveTopicPartition(topic, p, to); err != nil {
				t.Fatalf("moving %s/%d to broker %d: %v", topic, p, to, err)
			}
		}
		time.Sleep(2500 * time.Millisecond)
	}
	close(stop)
	n := <-written
	if writeErr != nil {
		t.Fatalf("write %d: %v", n, writeErr)
	}
	refreshes := s.MetadataRefreshes()
	t.Logf("%d writes of %d records around %d leader moves of every partition; longest gap between writes %s; %d metadata refreshes",
		n, keys, moves, longest.Round(time.Millisecond), refreshes)
	if refreshes == 0 {
		t.Errorf("no write failed: the moves did not reach the producer")
	}
	if longest > 2*time.Second {
		t.Errorf("writes stalled for %s after a leader move, want under 2s", longest)
	}
	recs, err := kafkatest.ReadAll(ctx, cl.Brokers(), topic)
	if err != nil {
		t.Fatal(err)
	}
	byKey := map[string][]int{}
	for _, r := range recs {
		v, err := strconv.Atoi(r.Headers["seq"])
		if err != nil {
			t.Fatalf("record without seq: %+v", r)
		}
		byKey[string(r.Key)] = append(byKey[string(r.Key)], v)
	}
	if len(byKey) != keys {
		t.Fatalf("%d keys in the topic, want %d", len(byKey), keys)
	}
	for k, seqs := range byKey {
		// At-least-once: a retried batch may repeat, never reorder or skip.
		next := 0
		for i, v := range seqs {
			if v > next || (v < next-1) {
				t.Fatalf("key %s: record %d has seq %d after %v (want %d, or a repeat of the previous)", k, i, v, seqs[max(0, i-3):i], next)
			}
			if v == next {
				next++
			}
		}
		if next != n {
			sort.Ints(seqs)
			t.Errorf("key %s: seqs up to %d present, want %d", k, next, n)
		}
	}
}
