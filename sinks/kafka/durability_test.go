package kafka

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/kafkatest"
)

// TestDurabilityWarnings: on three brokers, a topic with one replica, a
// replicated topic with min.insync.replicas=1 and a transactions topic
// with several partitions are each named with the fix; a topic with three
// replicas and min.insync.replicas=2 is not.
func TestDurabilityWarnings(t *testing.T) {
	cl := kafkatest.ForTestWith(t, kafkatest.Options{Brokers: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mk := func(rf int, configs map[string]string, parts int, topics ...string) {
		t.Helper()
		s, err := New(Config{Brokers: cl.Brokers(), Partitions: parts, ReplicationFactor: rf, TopicConfigs: configs}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.EnsureTopics(ctx, topics, nil); err != nil {
			t.Fatal(err)
		}
	}
	mk(1, nil, 1, "d.single")
	mk(3, map[string]string{"min.insync.replicas": "1"}, 1, "d.weak")
	mk(3, map[string]string{"min.insync.replicas": "2"}, 3, "d.good", "d.transactions")
	s, err := New(Config{Brokers: cl.Brokers()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := s.DurabilityWarnings(ctx, []string{"d.single", "d.weak", "d.good", "d.transactions", "d.absent"}, map[string]bool{"d.transactions": true})
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(ws, "\n")
	t.Log(got)
	for _, want := range []string{
		"topic d.single has replication factor 1 on a cluster of 3 brokers",
		"topic d.weak has replication factor 3 but min.insync.replicas=1",
		"min.insync.replicas=2",
		"topic d.transactions has 3 partitions",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("warnings lack %q", want)
		}
	}
	if len(ws) != 3 || strings.Contains(got, "d.good") || strings.Contains(got, "d.absent") {
		t.Errorf("%d warnings, want 3 (none for d.good or d.absent):\n%s", len(ws), got)
	}
}
