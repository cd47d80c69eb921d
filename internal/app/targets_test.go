package app

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/invalidation/targets"
	"github.com/tidemark/tidemark/pipeline"
)

// TestTargetsMetricsBesideInvalidation: the targets and invalidation roles
// register the shared consumer metrics in one registry (--role all) without
// conflict, and the consistency gauge starts at 1.
func TestTargetsMetricsBesideInvalidation(t *testing.T) {
	consumer := func(group, table string) *invalidation.Consumer {
		c, err := invalidation.NewConsumer(invalidation.Config{Brokers: []string{"127.0.0.1:1"}, Group: group,
			Topics: map[string][]string{"t." + table: {table}}, Handlers: map[string]invalidation.Handler{table: nopHandler{}},
			DLQTopic: "t.dlq", DLQ: nopSink{}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	h, err := targets.NewHandler(targets.HandlerConfig{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	(&Invalidation{Consumer: consumer("inv", "public.a")}).Register(reg)
	(&Targets{Consumer: consumer("tg", "public.room_memberships"), Handler: h}).Register(reg)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]int{}
	for _, mf := range mfs {
		found[mf.GetName()] = len(mf.GetMetric())
		if mf.GetName() == "tidemark_notify_targets_consistency_ratio" && mf.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Errorf("consistency ratio starts at %v", mf.GetMetric()[0].GetGauge().GetValue())
		}
	}
	if found["tidemark_consumer_messages_total"] != 2 || found["tidemark_consumer_waiting_for_topics"] != 2 || found["tidemark_notify_targets_consistency_ratio"] != 1 ||
		found["tidemark_notify_targets_removed_total"] != 1 || found["tidemark_notify_targets_malformed_transaction_records_total"] != 1 {
		var names []string
		for n := range found {
			names = append(names, n)
		}
		t.Errorf("metrics: %s", strings.Join(names, ", "))
	}
}

type nopHandler struct{}

func (nopHandler) Handle(_ context.Context, _ *invalidation.Message) error { return nil }

type nopSink struct{}

func (nopSink) Write(_ context.Context, _ []pipeline.Message) error { return nil }
func (nopSink) Close(_ context.Context) error                       { return nil }
