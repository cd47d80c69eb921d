package app

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
)

// registerSinkMetrics adds, per invalidation sink (label sink=redis,
// webhook, topic): tidemark_invalidation_sink_backlog_keys and
// ..._backlog_bytes (what waits for that sink), ..._errors_total (failed
// attempts) and ..._failing (1 from a failure to the next success).
func registerSinkMetrics(reg prometheus.Registerer, h *invalidation.RuleHandler) {
	if h == nil {
		return
	}
	for _, s := range h.Stats() {
		labels := prometheus.Labels{"sink": s.Name}
		gauge := func(name, help string, f func() float64) {
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "invalidation",
				Name: name, Help: help, ConstLabels: labels}, f))
		}
		gauge("sink_backlog_keys", "Invalidated keys queued for this sink, not yet delivered.",
			func() float64 { return float64(s.BacklogKeys.Load()) })
		gauge("sink_backlog_bytes", "Bytes of the keys queued for this sink (key bytes plus 64 per key).",
			func() float64 { return float64(s.BacklogBytes.Load()) })
		gauge("sink_failing", "1 while this sink's latest attempt failed (it is retried with backoff).",
			func() float64 {
				if s.Failing.Load() {
					return 1
				}
				return 0
			})
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: "invalidation",
			Name: "sink_errors_total", Help: "Failed delivery attempts to this sink.", ConstLabels: labels},
			func() float64 { return float64(s.Errors.Load()) }))
	}
}
