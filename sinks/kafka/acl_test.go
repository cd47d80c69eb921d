package kafka

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go/sasl/plain"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// TestWriteDeniedByACL: a user the cluster's ACLs let describe a topic
// but not write it gets a terminal error naming the authorization failure
// and the grant, not an endless retry.
func TestWriteDeniedByACL(t *testing.T) {
	const topic = "acl.t"
	cl := kafkatest.ForTestWith(t, kafkatest.Options{ACLs: true,
		Superusers: []kafkatest.User{{Mechanism: "PLAIN", Name: "admin", Password: "admin-pw"}},
		Users: []kafkatest.User{{Mechanism: "PLAIN", Name: "reader", Password: "reader-pw", ACLs: []kfake.ACL{
			{Resource: kmsg.ACLResourceTypeTopic, Name: topic, Pattern: kmsg.ACLResourcePatternTypeLiteral, Operation: kmsg.ACLOperationDescribe, Allow: true},
		}}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	admin, err := New(Config{Brokers: cl.Brokers(), Partitions: 1, SASL: plain.Mechanism{Username: "admin", Password: "admin-pw"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.EnsureTopics(ctx, []string{topic}, nil); err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Brokers: cl.Brokers(), SASL: plain.Mechanism{Username: "reader", Password: "reader-pw"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.EnsureTopics(ctx, []string{topic}, nil); err != nil {
		t.Fatalf("EnsureTopics of an existing topic the user may describe: %v", err)
	}
	err = s.Write(ctx, []pipeline.Message{{Topic: topic, Key: []byte("k"), Value: []byte("v")}})
	if err == nil || ctx.Err() != nil {
		t.Fatalf("Write = %v (ctx %v), want a terminal authorization error", err, ctx.Err())
	}
	if msg := err.Error(); !strings.Contains(msg, "authorization failure") || !strings.Contains(msg, "Write") || !strings.Contains(msg, topic) {
		t.Errorf("Write error %q does not name the authorization failure, the topic and the grant", msg)
	}
	// Topic creation denied: named, not retried.
	err = s.EnsureTopics(ctx, []string{"acl.new"}, nil)
	if err == nil || !strings.Contains(err.Error(), "authorization failure") {
		t.Errorf("EnsureTopics of a topic the user may not create = %v, want an authorization failure", err)
	}
}
