package integrity

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the checker's Prometheus metrics (namespace tidemark,
// subsystem integrity).
type Metrics struct {
	// Violations counts new violations by rule, kind and severity.
	Violations *prometheus.CounterVec
	// Redetected counts violations found again (a replay) and not stored
	// twice.
	Redetected *prometheus.CounterVec
	// Resolved counts violations resolved by a later change, by rule.
	Resolved *prometheus.CounterVec
	// Satisfied counts expectations met, by rule and how (transaction,
	// stream, database).
	Satisfied *prometheus.CounterVec
	// Checks counts rows asked about in the database.
	Checks prometheus.Counter
	// Dropped counts state forgotten because of a bound, by what.
	Dropped *prometheus.CounterVec
	// Skipped counts records at or below the persisted position.
	Skipped prometheus.Counter
	// SnapshotSkipped counts snapshot rows (op r), on which no rule is
	// decided.
	SnapshotSkipped prometheus.Counter
	// Open gauges held state: transactions, expectations, monotonic_keys.
	Open *prometheus.GaugeVec
	// StreamTime is the latest commit time seen (Unix seconds).
	StreamTime prometheus.Gauge
	// DecisionSeconds observes, per transaction decided at its END record,
	// the seconds from its commit to the decision.
	DecisionSeconds prometheus.Histogram
	// DetectionSeconds observes, per violation, the seconds from the
	// flagged change's commit to the violation being durable.
	DetectionSeconds *prometheus.HistogramVec
}

// NewMetrics builds unregistered metrics.
func NewMetrics() *Metrics {
	const ns, sub = "tidemark", "integrity"
	buckets := []float64{.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60, 300}
	return &Metrics{
		Violations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "violations_total",
			Help: "Integrity violations found, by rule."}, []string{"rule", "kind", "severity"}),
		Redetected: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "redetected_total",
			Help: "Violations found again (replays), stored once."}, []string{"rule"}),
		Resolved: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "resolved_total",
			Help: "Violations resolved by a later change."}, []string{"rule"}),
		Satisfied: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "satisfied_total",
			Help: "Expectations met, by how: transaction, stream or database."}, []string{"rule", "how"}),
		Checks: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "db_checks_total",
			Help: "Rows asked about in the database (rate-limited)."}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "dropped_total",
			Help: "State forgotten because a bound was reached."}, []string{"what"}),
		Skipped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "skipped_total",
			Help: "Records at or below the persisted position (applied before a restart)."}),
		SnapshotSkipped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "snapshot_rows_skipped_total",
			Help: "Snapshot rows (op r) skipped: no rule is decided on them."}),
		Open: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "open",
			Help: "State held: open transactions, pending expectations, monotonic keys in memory."}, []string{"what"}),
		StreamTime: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "stream_time_seconds",
			Help: "Latest commit time the checker has seen (Unix seconds)."}),
		DecisionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "decision_seconds",
			Help: "Seconds from a transaction's commit to its same-transaction decision.", Buckets: buckets}),
		DetectionSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "detection_seconds",
			Help: "Seconds from a flagged change's commit to its violation being durable.", Buckets: buckets}, []string{"kind"}),
	}
}

// Register adds the metrics to reg.
func (m *Metrics) Register(reg prometheus.Registerer) {
	reg.MustRegister(m.Violations, m.Redetected, m.Resolved, m.Satisfied, m.Checks, m.Dropped, m.Skipped, m.SnapshotSkipped, m.Open,
		m.StreamTime, m.DecisionSeconds, m.DetectionSeconds)
}
