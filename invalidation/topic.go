package invalidation

import (
	"context"

	"github.com/tidemark/tidemark/pipeline"
)

// TopicInvalidator publishes invalidations to a compacted Kafka topic
// (<prefix>.invalidations): key = the cache key, value = the position
// ("commitLSN:seq") of the change that invalidated it, so cache layers in
// any language can follow it and compare positions.
type TopicInvalidator struct {
	Topic string
	Sink  pipeline.Sink // e.g. the Kafka sink; must be durable on return
}

var (
	_ Invalidator           = (*TopicInvalidator)(nil)
	_ PositionedInvalidator = (*TopicInvalidator)(nil)
)

// InvalidateAt writes one record per key and returns once Kafka has them.
func (t *TopicInvalidator) InvalidateAt(ctx context.Context, keys []KeyAt) error {
	msgs := make([]pipeline.Message, len(keys))
	for i, k := range keys {
		msgs[i] = pipeline.Message{Topic: t.Topic, Key: []byte(k.Key), Value: []byte(k.Pos.String()), Pos: k.Pos,
			Headers: []pipeline.Header{{Key: "tidemark-lsn", Value: []byte(pipelineLSN(k.Pos))}}}
	}
	return t.Sink.Write(ctx, msgs)
}

func pipelineLSN(p pipeline.Position) string {
	s := p.String()
	for i := range s {
		if s[i] == ':' {
			return s[:i]
		}
	}
	return s
}

// Invalidate is InvalidateAt without positions (value "0:0").
func (t *TopicInvalidator) Invalidate(ctx context.Context, keys []string) error {
	at := make([]KeyAt, len(keys))
	for i, k := range keys {
		at[i] = KeyAt{Key: k}
	}
	return t.InvalidateAt(ctx, at)
}

// Close does nothing: the sink is closed by its owner.
func (t *TopicInvalidator) Close() error { return nil }
