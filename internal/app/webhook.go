package app

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
	webhooksink "github.com/tidemark/tidemark/sinks/webhook"
)

// DLQSourceWebhook is the tidemark-dlq-source header (and the key) of a
// dead-lettered webhook batch.
const DLQSourceWebhook = "webhook"

// webhookSinkConfig maps invalidation.webhook onto the sink's config.
func webhookSinkConfig(w *config.Webhook) webhooksink.Config {
	return webhooksink.Config{URL: w.URL, Secret: w.Secret, BatchSize: w.BatchSize, Timeout: w.Timeout,
		MaxAttempts: w.MaxAttempts, MaxBackoff: w.MaxBackoff, OnFailure: w.OnFailure}
}

// webhookDeadLetter writes a batch the webhook did not accept to the
// dead-letter topic: key and source "webhook", the signed body as the
// value, the reason and the group. tidemark dlq replay reads these back.
func webhookDeadLetter(dlq pipeline.Sink, topic, group string) webhooksink.DeadLetterFunc {
	return func(ctx context.Context, body []byte, _ []string, err error) error {
		return dlq.Write(ctx, []pipeline.Message{{Topic: topic, Key: []byte(DLQSourceWebhook), Value: body,
			Headers: []pipeline.Header{
				{Key: "tidemark-dlq-reason", Value: []byte(err.Error())},
				{Key: "tidemark-dlq-group", Value: []byte(group)},
				{Key: "tidemark-dlq-source", Value: []byte(DLQSourceWebhook)},
			}}})
	}
}

// webhookInvalidator gives the webhook sink the invalidation consumer's
// PositionedInvalidator contract (the sink has its own KeyAt: sinks do not
// import their caller), so that payloads carry the changes' positions.
type webhookInvalidator struct{ *webhooksink.Sink }

var (
	_ invalidation.Invalidator           = webhookInvalidator{}
	_ invalidation.PositionedInvalidator = webhookInvalidator{}
)

// InvalidateAt sends keys with their positions.
func (w webhookInvalidator) InvalidateAt(ctx context.Context, keys []invalidation.KeyAt) error {
	at := make([]webhooksink.KeyAt, len(keys))
	for i, k := range keys {
		at[i] = webhooksink.KeyAt{Key: k.Key, Pos: k.Pos}
	}
	return w.Sink.InvalidateAt(ctx, at)
}

// registerWebhookMetrics adds the webhook sink's metrics to reg:
// tidemark_webhook_{batches,retries,dead_lettered}_total and
// tidemark_webhook_failing.
func registerWebhookMetrics(reg prometheus.Registerer, s *webhooksink.Sink) {
	st := s.Stats()
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: "webhook", Name: name, Help: help}, f))
	}
	counter("batches_total", "Webhook batches the receiver acknowledged.", func() float64 { return float64(st.Delivered.Load()) })
	counter("retries_total", "Failed webhook tries that were retried.", func() float64 { return float64(st.Retries.Load()) })
	counter("dead_lettered_total", "Webhook batches written to the dead-letter topic.", func() float64 { return float64(st.DeadLettered.Load()) })
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "webhook", Name: "failing",
		Help: "1 from a failed webhook try until the receiver acknowledges a batch again (with on_failure: hold, the consumer is holding)."},
		func() float64 {
			if st.Failing.Load() {
				return 1
			}
			return 0
		}))
}
