package cache

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"strconv"
	"time"

	kafkasasl "github.com/segmentio/kafka-go/sasl"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/sasl"

	"github.com/tidemark/tidemark/internal/kafkanet"
)

// topicIDs reads topic ids (KIP-516, Metadata v10+), which kafka-go does not
// expose, with a franz-go client over the same TLS and SASL settings. A
// deleted and recreated topic has a new id, whatever its offsets.
type topicIDs struct{ cl *kgo.Client }

func newTopicIDs(brokers []string, s kafkanet.Settings) (*topicIDs, error) {
	opts := []kgo.Opt{kgo.SeedBrokers(brokers...), kgo.ClientID("tidemark-cache"),
		kgo.DialTimeout(10 * time.Second), kgo.RequestRetries(1)}
	if s.TLS != nil {
		opts = append(opts, kgo.DialTLSConfig(s.TLS.Clone()))
	}
	if s.SASL != nil {
		opts = append(opts, kgo.SASL(saslAdapter{s.SASL}))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("building the topic id client: %w", err)
	}
	return &topicIDs{cl: cl}, nil
}

// id returns topic's id in hex, or "" when the brokers do not report ids
// (before Kafka 2.8): then recreation is found by offsets alone.
func (t *topicIDs) id(ctx context.Context, topic string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req := kmsg.NewPtrMetadataRequest()
	rt := kmsg.NewMetadataRequestTopic()
	rt.Topic = kmsg.StringPtr(topic)
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(ctx, t.cl)
	if err != nil {
		return "", fmt.Errorf("metadata of %s: %w", topic, err)
	}
	if len(resp.Topics) != 1 {
		return "", fmt.Errorf("metadata of %s: topic not returned", topic)
	}
	if err := kerr.ErrorForCode(resp.Topics[0].ErrorCode); err != nil {
		return "", fmt.Errorf("metadata of %s: %w", topic, err)
	}
	id := resp.Topics[0].TopicID
	if id == ([16]byte{}) {
		return "", nil
	}
	return hex.EncodeToString(id[:]), nil
}

func (t *topicIDs) close() { t.cl.Close() }

// saslAdapter runs a kafka-go SASL mechanism (Config.SASL) in franz-go.
type saslAdapter struct{ m kafkasasl.Mechanism }

func (a saslAdapter) Name() string { return a.m.Name() }

func (a saslAdapter) Authenticate(ctx context.Context, host string) (sasl.Session, []byte, error) {
	md := &kafkasasl.Metadata{Host: host}
	if h, p, err := net.SplitHostPort(host); err == nil {
		md.Host = h
		md.Port, _ = strconv.Atoi(p)
	}
	ctx = kafkasasl.WithMetadata(ctx, md)
	sm, ir, err := a.m.Start(ctx)
	if err != nil {
		return nil, nil, err
	}
	return saslSession{ctx: ctx, sm: sm}, ir, nil
}

type saslSession struct {
	ctx context.Context
	sm  kafkasasl.StateMachine
}

// Challenge: kafka-go sends nothing after its state machine is done, while
// franz-go would send a final message; drop it to keep kafka-go's flow.
func (s saslSession) Challenge(b []byte) (bool, []byte, error) {
	done, resp, err := s.sm.Next(s.ctx, b)
	if done {
		return true, nil, err
	}
	return false, resp, err
}
