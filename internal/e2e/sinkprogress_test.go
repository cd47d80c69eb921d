package e2e

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
)

// TestInvalidationRedisDownTopicFlows (issue 14, acceptance 3): with Redis
// down for 10 s, the compacted <prefix>.invalidations topic receives every
// key meanwhile, while the group commits nothing of those changes (its
// offsets never pass what Redis has applied); once Redis is back, every key
// is deleted there, the offsets catch up and nothing is dead-lettered. The
// sink's failure is warned once (not per retry), its recovery once, and the
// per-sink metrics show the backlog.
func TestInvalidationRedisDownTopicFlows(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "rdown", rd.Addr(), nil)
	e.start(cfg)
	core, logs := observer.New(zapcore.WarnLevel)
	inv, err := app.PrepareInvalidation(context.Background(), cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	inv.Register(reg)
	runConsumer(t, "invalidation", inv.Run)
	ctx := context.Background()
	rc := rd.Client()
	group, topic := cfg.Invalidation.Group, "rdown.public.room_memberships"
	parts, err := kafkatest.PartitionCountVia(ctx, e.transport(), e.brokers(), topic)
	if err != nil {
		t.Fatal(err)
	}

	// Warm up: the consumer runs and has committed everything so far.
	if err := rc.Set(ctx, "room:!w:members", "cached", 0).Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!w', '@w', 'join')`)
	for deadline := time.Now().Add(30 * time.Second); rc.Exists(ctx, "room:!w:members").Val() != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("warm-up key not deleted within 30s")
		}
	}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	e.waitGroupCaughtUp(group, []string{topic}, 20*time.Second)
	base := e.committedOffsets(group, topic, parts)

	const n = 20
	var keys []string
	for i := 1; i <= n; i++ {
		keys = append(keys, fmt.Sprintf("room:!d%d:members", i), fmt.Sprintf("user:@d%d:rooms", i))
	}
	if err := rd.Halt(); err != nil {
		t.Fatal(err)
	}
	downAt := time.Now()
	e.exec(fmt.Sprintf(`DO $$ BEGIN FOR i IN 1..%d LOOP
  INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!d' || i, '@d' || i, 'join');
  COMMIT; END LOOP; END $$`, n))
	heldOffsets := func() {
		t.Helper()
		if got := e.committedOffsets(group, topic, parts); fmt.Sprint(got) != fmt.Sprint(base) {
			t.Fatalf("committed offsets %v while Redis is down, want them held at %v", got, base)
		}
	}
	// A transport of its own: kafka-go's default one caches metadata read
	// before the consumer created the invalidations topic.
	fresh := e.transport()
	if fresh == nil {
		tr := &kafkago.Transport{}
		defer tr.CloseIdleConnections()
		fresh = tr
	}
	onTopic := map[string]bool{}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		heldOffsets()
		recs, err := kafkatest.ReadAllVia(ctx, fresh, e.brokers(), "rdown.invalidations")
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			onTopic[string(r.Key)] = true
		}
		missing := 0
		for _, k := range keys {
			if !onTopic[k] {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("with Redis down, %d of %d keys never reached rdown.invalidations within 20s (a failing Redis holds the topic back)", missing, len(keys))
		}
	}
	t.Logf("every key on the invalidations topic %s after Redis went down", time.Since(downAt).Round(time.Millisecond))
	// The first attempt fails once go-redis gives up dialling.
	for gaugeValue(t, reg, "tidemark_invalidation_sink_failing", "redis") != 1 {
		heldOffsets()
		if time.Since(downAt) > 10*time.Second {
			t.Fatal("tidemark_invalidation_sink_failing{sink=redis} still 0 10s after Redis went down, want 1")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v := gaugeValue(t, reg, "tidemark_invalidation_sink_backlog_keys", "redis"); v < float64(len(keys)) {
		t.Errorf("tidemark_invalidation_sink_backlog_keys{sink=redis} = %v, want at least %d", v, len(keys))
	}
	if v := gaugeValue(t, reg, "tidemark_invalidation_sink_backlog_keys", "topic"); v != 0 {
		t.Errorf("tidemark_invalidation_sink_backlog_keys{sink=topic} = %v, want 0", v)
	}
	if v := gaugeValue(t, reg, "tidemark_invalidation_sink_errors_total", "redis"); v < 1 {
		t.Errorf("tidemark_invalidation_sink_errors_total{sink=redis} = %v, want at least 1", v)
	}
	for time.Since(downAt) < 10*time.Second {
		heldOffsets()
		time.Sleep(200 * time.Millisecond)
	}

	// Redis returns (a fresh server: every DEL it counts comes from the
	// retries). The offsets may only pass a change once its keys are
	// deleted: at any time, DELs >= 2 x the changes committed since base.
	if err := rd.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	rc = rd.Client()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		got := e.committedOffsets(group, topic, parts)
		var advanced int64
		for p := range got {
			advanced += got[p] - base[p]
		}
		dels := delCalls(t, rd)
		if dels < 2*advanced {
			t.Fatalf("group committed %d changes past the outage while Redis has seen only %d DELs: offsets ahead of Redis", advanced, dels)
		}
		if advanced == n && dels >= int64(len(keys)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30s after Redis returned: %d of %d changes committed, %d DELs", advanced, n, dels)
		}
	}
	if st := inv.Consumer.Stats(); st.DLQ.Load() != 0 {
		t.Errorf("%d changes dead-lettered during the outage, want none", st.DLQ.Load())
	}
	if v := gaugeValue(t, reg, "tidemark_invalidation_sink_backlog_keys", "redis"); v != 0 {
		t.Errorf("tidemark_invalidation_sink_backlog_keys{sink=redis} = %v after recovery, want 0", v)
	}
	if v := gaugeValue(t, reg, "tidemark_invalidation_sink_failing", "redis"); v != 0 {
		t.Errorf("tidemark_invalidation_sink_failing{sink=redis} = %v after recovery, want 0", v)
	}
	failing := logs.FilterMessageSnippet("invalidation sink failing").Len()
	recovered := logs.FilterMessageSnippet("invalidation sink recovered").Len()
	if failing != 1 || recovered != 1 {
		t.Errorf("%d 'sink failing' and %d 'sink recovered' warnings for one outage, want 1 each (not one per retry)", failing, recovered)
	}
}

// committedOffsets returns group's committed offset of each partition of
// topic (0 where none).
func (e *env) committedOffsets(group, topic string, parts int) []int64 {
	e.t.Helper()
	client := &kafkago.Client{Addr: kafkago.TCP(e.brokers()...), Timeout: 5 * time.Second, Transport: e.transport()}
	req := &kafkago.OffsetFetchRequest{GroupID: group, Topics: map[string][]int{topic: {}}}
	for p := range parts {
		req.Topics[topic] = append(req.Topics[topic], p)
	}
	resp, err := client.OffsetFetch(context.Background(), req)
	if err == nil {
		err = resp.Error
	}
	if err != nil {
		e.t.Fatalf("offsets of group %s: %v", group, err)
	}
	out := make([]int64, parts)
	for _, po := range resp.Topics[topic] {
		if po.Error != nil {
			e.t.Fatalf("offset of group %s on %s/%d: %v", group, topic, po.Partition, po.Error)
		}
		if po.CommittedOffset > 0 {
			out[po.Partition] = po.CommittedOffset
		}
	}
	return out
}

var delCallsRE = regexp.MustCompile(`cmdstat_del:calls=(\d+)`)

// delCalls returns how many DEL commands the server has executed.
func delCalls(t *testing.T, rd *redistest.Server) int64 {
	t.Helper()
	info, err := rd.Client().Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	m := delCallsRE.FindStringSubmatch(info)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseInt(m[1], 10, 64)
	return v
}

// gaugeValue returns the value of metric name with label sink=sink.
func gaugeValue(t *testing.T, reg *prometheus.Registry, name, sink string) float64 {
	t.Helper()
	return metricOf(t, reg, name, "sink", sink)
}

func metricValue(m *dto.Metric) float64 {
	if g := m.GetGauge(); g != nil {
		return g.GetValue()
	}
	return m.GetCounter().GetValue()
}
