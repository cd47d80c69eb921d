package app

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
)

// watermarkedHandler tells the invalidations topic's writer which changes
// the consumer has taken (Handle), when they are queued for every sink
// (FlushAsync) and when they are durable everywhere (Flush), so that its
// watermarks stop while the consumer holds a change it cannot hand over or
// the topic's sink cannot write. Embedding keeps every other method of the
// RuleHandler (Durable, Run, ...; AsyncFlusher) as it is. Build one per
// RuleHandler: the consumer runs each distinct handler once.
type watermarkedHandler struct {
	*invalidation.RuleHandler
	topic *invalidation.TopicInvalidator
}

func newWatermarkedHandler(h *invalidation.RuleHandler, t *invalidation.TopicInvalidator) *watermarkedHandler {
	for _, st := range h.Stats() {
		if st.Name == invalidation.SinkName(t) {
			// Bytes, not keys: a truncate's job carries patterns and no
			// keys, and its flush record must be written before a
			// watermark claims its position.
			bytes := st.BacklogBytes
			t.Backlog = func() int64 { return bytes.Load() }
		}
	}
	return &watermarkedHandler{RuleHandler: h, topic: t}
}

func (h *watermarkedHandler) Handle(ctx context.Context, m *invalidation.Message) error {
	h.topic.Received(m.Pos)
	return h.RuleHandler.Handle(ctx, m)
}

func (h *watermarkedHandler) FlushAsync(ctx context.Context) (uint64, error) {
	tok, err := h.RuleHandler.FlushAsync(ctx)
	if err == nil {
		h.topic.HandedOver()
	}
	return tok, err
}

func (h *watermarkedHandler) Flush(ctx context.Context) error {
	if err := h.RuleHandler.Flush(ctx); err != nil {
		return err
	}
	h.topic.Settled()
	return nil
}

// registerWatermarkMetrics adds tidemark_invalidation_watermarks_total,
// ..._watermark_failures_total and ..._watermarks_held_total to reg.
func registerWatermarkMetrics(reg prometheus.Registerer, t *invalidation.TopicInvalidator) {
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: "invalidation", Name: name, Help: help}, f))
	}
	counter("watermarks_total", "Watermark records written to every partition of the invalidations topic.",
		func() float64 { return float64(t.Watermarks.Load()) })
	counter("watermark_failures_total", "Watermarks that could not be written within an interval (Kafka unreachable).",
		func() float64 { return float64(t.WatermarkFailures.Load()) })
	counter("watermarks_held_total", "Watermark intervals skipped because a change taken was not yet durable in the invalidations topic.",
		func() float64 { return float64(t.WatermarksHeld.Load()) })
}
