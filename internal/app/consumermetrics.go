package app

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
)

// registerConsumerMetrics adds the consumer runtime's metrics, labelled
// role=role, to reg: tidemark_consumer_{messages,skipped,retries,dlq}_total,
// ..._lag_messages, ..._waiting_for_topics, ..._apply_seconds (histogram)
// and ..._apply_seconds_total. Call it before the consumer runs.
func registerConsumerMetrics(reg prometheus.Registerer, c *invalidation.Consumer, role string) {
	st := c.Stats()
	labels := prometheus.Labels{"role": role}
	apply := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: "tidemark", Subsystem: "consumer", Name: "apply_seconds",
		Help:        "Seconds from fetching a change to committing it, effects durable.",
		ConstLabels: labels, Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 5, 30}})
	reg.MustRegister(apply)
	c.SetOnApplied(func(d time.Duration) { apply.Observe(d.Seconds()) })
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: "consumer", Name: name, Help: help, ConstLabels: labels}, f))
	}
	counter("messages_total", "Changes applied.", func() float64 { return float64(st.Messages.Load()) })
	reg.MustRegister(consumerSkipped{st: st, desc: prometheus.NewDesc("tidemark_consumer_skipped_total",
		"Changes skipped on purpose, by reason: redelivered (a position already applied), op_excluded (the rules exclude the op), "+
			"filtered (the rules' filters exclude the row), "+
			"table_ignored, truncate_ignored, truncate_duplicate (a truncate already acted on, from another partition).",
		[]string{"reason"}, labels)})
	counter("retries_total", "Failed attempts that were retried.", func() float64 { return float64(st.Retries.Load()) })
	counter("dlq_total", "Changes sent to the dead-letter topic.", func() float64 { return float64(st.DLQ.Load()) })
	counter("offset_gaps_total", "Retention gaps found: a committed offset below its partition's log start (the records in between were deleted unread).",
		func() float64 { return float64(st.OffsetGaps.Load()) })
	counter("offset_gap_records_total", "Records deleted unread in retention gaps.", func() float64 { return float64(st.OffsetGapRecords.Load()) })
	counter("apply_seconds_total", "Sum of fetch-to-commit seconds of applied changes.", func() float64 { return float64(st.ApplyNanos.Load()) / 1e9 })
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "consumer", Name: "lag_messages",
		Help: "Messages behind the end of the subscribed partitions.", ConstLabels: labels}, func() float64 { return float64(st.Lag.Load()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "consumer", Name: "waiting_for_topics",
		Help: "1 while the consumer waits, before joining its group, for subscribed topics that do not exist yet.", ConstLabels: labels},
		func() float64 {
			if st.WaitingForTopics.Load() {
				return 1
			}
			return 0
		}))
}

// consumerSkipped exports Stats.SkippedBy as one counter per reason (every
// reason Tidemark uses, from zero).
type consumerSkipped struct {
	st   *invalidation.Stats
	desc *prometheus.Desc
}

func (s consumerSkipped) Describe(ch chan<- *prometheus.Desc) { ch <- s.desc }

func (s consumerSkipped) Collect(ch chan<- prometheus.Metric) {
	by := s.st.SkippedBy()
	for _, r := range invalidation.SkipReasons() {
		if _, ok := by[r]; !ok {
			by[r] = 0
		}
	}
	for r, n := range by {
		ch <- prometheus.MustNewConstMetric(s.desc, prometheus.CounterValue, float64(n), r)
	}
}
