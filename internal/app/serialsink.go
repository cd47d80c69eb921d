package app

import (
	"context"
	"sync"

	"github.com/tidemark/tidemark/pipeline"
)

// serialSink lets several goroutines share one pipeline.Sink, whose Write
// is never called concurrently (pipeline.Sink's contract; the Kafka sink
// reuses its encode buffers): the invalidation role's dead letters come
// from the consumer goroutine and from the webhook sink's delivery
// goroutine (on_failure: dlq).
type serialSink struct {
	mu   sync.Mutex
	sink pipeline.Sink
}

var _ pipeline.Sink = (*serialSink)(nil)

func (s *serialSink) Write(ctx context.Context, msgs []pipeline.Message) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sink.Write(ctx, msgs)
}

// Close closes the shared sink; its owner calls it once.
func (s *serialSink) Close(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sink.Close(ctx)
}
