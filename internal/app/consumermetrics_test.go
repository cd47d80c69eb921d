package app

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
)

// TestSkippedTotalByReason: tidemark_consumer_skipped_total carries a
// reason label and exports every reason from zero (so a rate() over it
// exists before the first skip), labelled with the role.
func TestSkippedTotalByReason(t *testing.T) {
	c, err := invalidation.NewConsumer(invalidation.Config{Brokers: []string{"unused:9092"}, Group: "g",
		Topics: map[string][]string{"t": {"public.x"}}, Handlers: map[string]invalidation.Handler{"public.x": invalidation.SkipHandler{Reason: "x"}},
		DLQTopic: "dlq", DLQ: nopSink{}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	registerConsumerMetrics(reg, c, "invalidation")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		if mf.GetName() != "tidemark_consumer_skipped_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["role"] != "invalidation" || m.GetCounter().GetValue() != 0 {
				t.Errorf("series %v = %v", labels, m.GetCounter().GetValue())
			}
			got[labels["reason"]] = true
		}
	}
	for _, r := range invalidation.SkipReasons() {
		if !got[r] {
			t.Errorf("no series for reason %q (got %v)", r, got)
		}
	}
}
