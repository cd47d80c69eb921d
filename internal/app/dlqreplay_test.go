package app

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
	webhooksink "github.com/tidemark/tidemark/sinks/webhook"
)

// batchReceiver is a webhook endpoint that verifies every request with its
// secret and counts the acknowledged deliveries per batch id; while down it
// answers 503.
type batchReceiver struct {
	t      *testing.T
	secret string
	down   atomic.Bool

	mu     sync.Mutex
	byID   map[string]int
	bodies map[string][]byte
}

func newBatchReceiver(t *testing.T, secret string) (*batchReceiver, string) {
	br := &batchReceiver{t: t, secret: secret, byID: map[string]int{}, bodies: map[string][]byte{}}
	srv := httptest.NewServer(br)
	t.Cleanup(srv.Close)
	return br, srv.URL + "/hook"
}

func (br *batchReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "reading", http.StatusBadRequest)
		return
	}
	// A fresh signature: at most a minute of skew, with the current secret.
	if err := webhooksink.Verify(br.secret, r.Header.Get(webhooksink.TimestampHeader), string(body), r.Header.Get(webhooksink.DefaultHeader), time.Minute); err != nil {
		br.t.Errorf("receiver: %v", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	if br.down.Load() {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	var p webhooksink.Payload
	if err := json.Unmarshal(body, &p); err != nil || p.ID == "" {
		br.t.Errorf("receiver: body %s: %v", body, err)
	}
	br.mu.Lock()
	br.byID[p.ID]++
	br.bodies[p.ID] = body
	br.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (br *batchReceiver) counts() map[string]int {
	br.mu.Lock()
	defer br.mu.Unlock()
	out := map[string]int{}
	for k, v := range br.byID {
		out[k] = v
	}
	return out
}

// TestReplayWebhookDLQ: batches dead-lettered while the receiver was down
// (through the consumer's own dead-letter hook) are resent by the replay,
// each exactly once per run, unchanged and signed with the current secret;
// a duplicate dead letter, another consumer's dead letter and one older
// than --since are counted and not sent; a receiver still down stops the
// replay, naming the record, without showing the secret.
func TestReplayWebhookDLQ(t *testing.T) {
	kc := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const topic = "rp.dlq"
	client := &kafkago.Client{Addr: kafkago.TCP(kc.Brokers()...), Timeout: 10 * time.Second}
	if resp, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{{Topic: topic, NumPartitions: 2, ReplicationFactor: 1}}}); err != nil || resp.Errors[topic] != nil {
		t.Fatalf("creating %s: %v %v", topic, err, resp)
	}

	// Dead-letter three batches the way the consumer does, with the old
	// secret, to a receiver that is down.
	const oldSecret, newSecret = "old-secret-0123456789", "new-secret-9876543210"
	rc, url := newBatchReceiver(t, oldSecret)
	rc.down.Store(true)
	producer, err := kafkasink.New(kafkasink.Config{Brokers: kc.Brokers(), Partitions: 2}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer producer.Close(context.Background())
	ws, err := webhooksink.New(webhooksink.Config{URL: url, Secret: oldSecret, BatchSize: 2, MaxAttempts: 1}, nil,
		webhooksink.WithDeadLetter(webhookDeadLetter(producer, topic, "rp-invalidation")))
	if err != nil {
		t.Fatal(err)
	}
	var at []webhooksink.KeyAt
	for i := range 5 {
		at = append(at, webhooksink.KeyAt{Key: "room:!r" + string(rune('a'+i)) + ":members", Pos: pipeline.Position{CommitLSN: pipeline.LSN(100 + i)}})
	}
	if err := ws.InvalidateAt(ctx, at); err != nil {
		t.Fatalf("InvalidateAt: %v", err)
	}
	if n := ws.Stats().DeadLettered.Load(); n != 3 {
		t.Fatalf("%d batches dead-lettered, want 3", n)
	}
	recs, err := kafkatest.ReadAll(ctx, kc.Brokers(), topic)
	if err != nil || len(recs) != 3 {
		t.Fatalf("dead letters: %d, %v; want 3", len(recs), err)
	}
	var want []string // batch ids, in order
	for _, r := range recs {
		want = append(want, replayBatchID(r.Value))
	}
	// The first batch dead-lettered a second time (a consumer restart before
	// its commit), another consumer's dead letter, and an old batch.
	produce := func(part int, rec kafkago.Record) {
		t.Helper()
		resp, err := client.Produce(ctx, &kafkago.ProduceRequest{Topic: topic, Partition: part, RequiredAcks: kafkago.RequireAll,
			Records: kafkago.NewRecordReader(rec)})
		if err != nil || resp.Error != nil {
			t.Fatalf("producing: %v %v", err, resp)
		}
	}
	hdrs := func(source string) []kafkago.Header {
		return []kafkago.Header{{Key: "tidemark-dlq-reason", Value: []byte("status 503")}, {Key: "tidemark-dlq-source", Value: []byte(source)}}
	}
	part := recs[0].Partition
	produce(part, kafkago.Record{Key: kafkago.NewBytes([]byte("webhook")), Value: kafkago.NewBytes(recs[0].Value), Headers: hdrs("webhook")})
	produce(1-part, kafkago.Record{Key: kafkago.NewBytes([]byte(`{"id":1}`)), Value: kafkago.NewBytes([]byte(`{"keys":["not-a-batch"]}`)), Headers: hdrs("rp.public.t/0@7")})
	old := []byte(`{"id":"0123456789abcdef0123456789abcdef","keys":["room:!old:members"],"sent_at":"2026-01-01T00:00:00Z"}`)
	produce(part, kafkago.Record{Time: time.Now().Add(-2 * time.Hour), Key: kafkago.NewBytes([]byte("webhook")), Value: kafkago.NewBytes(old), Headers: hdrs("webhook")})

	// The secret was rotated since; the receiver only accepts the new one.
	rc.secret = newSecret
	cfg := &config.Config{Kafka: config.Kafka{Brokers: kc.Brokers(), TopicPrefix: "rp", ClientID: "test"},
		Invalidation: &config.Invalidation{Webhook: &config.Webhook{URL: url, Secret: newSecret, MaxAttempts: 2}}}
	opts := ReplayOptions{Since: time.Now().Add(-time.Hour), OnFailed: func(p int, o int64, err error) { t.Errorf("refused %d@%d: %v", p, o, err) }}

	// Still down: the replay stops at the first batch and says where.
	rep, err := ReplayWebhookDLQ(ctx, cfg, opts, nil)
	if err != nil || rep.Stopped == nil || rep.Resent != 0 {
		t.Fatalf("replay to a receiver that is down: %+v, %v; want it stopped with nothing resent", rep, err)
	}
	if msg := rep.Stopped.Error(); !strings.Contains(msg, "rp.dlq/") || !strings.Contains(msg, "503") || strings.Contains(msg, newSecret) {
		t.Errorf("stopped: %q; want the record and the status, without the secret", msg)
	}
	dry := opts
	dry.DryRun = true
	if rep, err := ReplayWebhookDLQ(ctx, cfg, dry, nil); err != nil || rep.Resent != 3 || len(rc.counts()) != 0 {
		t.Errorf("dry run: %+v, %v, %d delivered; want 3 counted and nothing sent", rep, err, len(rc.counts()))
	}

	rc.down.Store(false)
	for run := 1; run <= 2; run++ {
		rep, err = ReplayWebhookDLQ(ctx, cfg, opts, nil)
		if err != nil || rep.Stopped != nil {
			t.Fatalf("replay %d: %+v, %v", run, rep, err)
		}
		wantRep := ReplayReport{Topic: topic, Read: 6, OtherSource: 1, BeforeSince: 1, Duplicates: 1, Resent: 3}
		if rep != wantRep {
			t.Errorf("replay %d: %+v, want %+v", run, rep, wantRep)
		}
		// Exactly once per batch per run; the receiver dedupes across runs
		// on the id.
		got := rc.counts()
		if len(got) != 3 {
			t.Errorf("replay %d: delivered ids %v, want %q", run, got, want)
		}
		for _, id := range want {
			if got[id] != run {
				t.Errorf("replay %d: batch %s delivered %d times in all, want %d", run, id, got[id], run)
			}
		}
	}
	for i, r := range recs {
		rc.mu.Lock()
		b := rc.bodies[want[i]]
		rc.mu.Unlock()
		if string(b) != string(r.Value) {
			t.Errorf("batch %d resent as %s, want the dead-lettered body %s unchanged", i, b, r.Value)
		}
		var p webhooksink.Payload
		_ = json.Unmarshal(b, &p)
		if wantPos := []string{"10" + string(rune('0'+2*i)) + ":0"}; len(p.Positions) == 0 || p.Positions[0] != wantPos[0] || !slices.Equal(p.Keys[:1], []string{at[2*i].Key}) {
			t.Errorf("batch %d: keys %q positions %q, want them to start with %s at %s", i, p.Keys, p.Positions, at[2*i].Key, wantPos[0])
		}
	}
}

// TestWebhookMetrics: the webhook sink's counters and its failing gauge
// reach the registry: failing is 1 while the receiver refuses and 0 once it
// acknowledged a batch.
func TestWebhookMetrics(t *testing.T) {
	rc, url := newBatchReceiver(t, "metrics-secret-0123456789")
	rc.down.Store(true)
	ws, err := webhooksink.New(webhookSinkConfig(&config.Webhook{URL: url, Secret: "metrics-secret-0123456789", MaxAttempts: 2, MaxBackoff: time.Millisecond}), nil,
		webhooksink.WithDeadLetter(func(context.Context, []byte, []string, error) error { return nil }))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	registerWebhookMetrics(reg, ws)
	values := func() map[string]float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			m := mf.GetMetric()[0]
			if c := m.GetCounter(); c != nil {
				out[mf.GetName()] = c.GetValue()
			} else {
				out[mf.GetName()] = m.GetGauge().GetValue()
			}
		}
		return out
	}
	ctx := context.Background()
	if err := ws.Invalidate(ctx, []string{"a"}); err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"tidemark_webhook_failing": 1, "tidemark_webhook_retries_total": 1,
		"tidemark_webhook_dead_lettered_total": 1, "tidemark_webhook_batches_total": 0}
	if got := values(); !maps.Equal(got, want) {
		t.Errorf("receiver down: %v, want %v", got, want)
	}
	rc.down.Store(false)
	if err := ws.Invalidate(ctx, []string{"b"}); err != nil {
		t.Fatal(err)
	}
	want["tidemark_webhook_failing"], want["tidemark_webhook_batches_total"] = 0, 1
	if got := values(); !maps.Equal(got, want) {
		t.Errorf("receiver back: %v, want %v", got, want)
	}
}
