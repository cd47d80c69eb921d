package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/sinks/webhook"
)

// countingReceiver is a webhook receiver that refuses everything (503)
// while down and otherwise counts the deliveries of each batch id and of
// each key; every request must be signed with secret.
type countingReceiver struct {
	t       *testing.T
	secret  string
	down    atomic.Bool
	refused atomic.Int64

	mu     sync.Mutex
	byID   map[string]int
	byKey  map[string]int
	badPos []string // batches whose positions do not match their keys
}

func newCountingReceiver(t *testing.T, secret string) (*countingReceiver, string) {
	cr := &countingReceiver{t: t, secret: secret}
	cr.reset()
	srv := httptest.NewServer(cr)
	t.Cleanup(srv.Close)
	return cr, srv.URL + "/invalidate"
}

func (cr *countingReceiver) reset() {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	cr.byID, cr.byKey = map[string]int{}, map[string]int{}
}

func (cr *countingReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "reading", http.StatusBadRequest)
		return
	}
	if err := webhook.Verify(cr.secret, r.Header.Get(webhook.TimestampHeader), string(body), r.Header.Get(webhook.DefaultHeader), time.Minute); err != nil {
		cr.t.Errorf("webhook signature: %v", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	if cr.down.Load() {
		cr.refused.Add(1)
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	var p webhook.Payload
	if err := json.Unmarshal(body, &p); err != nil || p.ID == "" {
		cr.t.Errorf("webhook body %s: %v", body, err)
	}
	cr.mu.Lock()
	defer cr.mu.Unlock()
	cr.byID[p.ID]++
	for _, k := range p.Keys {
		cr.byKey[k]++
	}
	if len(p.Positions) != len(p.Keys) {
		cr.badPos = append(cr.badPos, string(body))
	}
}

// snapshot returns copies of the counts.
func (cr *countingReceiver) snapshot() (byID, byKey map[string]int, badPos []string) {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	byID, byKey = map[string]int{}, map[string]int{}
	for k, v := range cr.byID {
		byID[k] = v
	}
	for k, v := range cr.byKey {
		byKey[k] = v
	}
	return byID, byKey, append([]string(nil), cr.badPos...)
}

// waitKeys waits up to within until every key was delivered.
func (cr *countingReceiver) waitKeys(keys []string, within time.Duration) {
	cr.t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		_, got, _ := cr.snapshot()
		var missing []string
		for _, k := range keys {
			if got[k] == 0 {
				missing = append(missing, k)
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			cr.t.Fatalf("webhook never received %v within %s", missing, within)
		}
	}
}

// groupBehind is how many records of the topics group has not committed
// (an error until the group exists).
func (e *env) groupBehind(group string, topics []string) (int64, error) {
	e.t.Helper()
	ctx := context.Background()
	client, parts := e.partitionCounts(ctx, topics)
	return kafkatest.GroupBehind(ctx, client, group, parts)
}

// waitCommitted waits until group exists and has committed every record of
// topics.
func (e *env) waitCommitted(group string, topics []string, within time.Duration) {
	e.t.Helper()
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		behind, err := e.groupBehind(group, topics)
		if err == nil && behind == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("group %s: %d records behind %v (%v) after %s", group, behind, topics, err, within)
		}
	}
}

// webhookDeadLetters returns the dead-letter records of the webhook sink.
func (e *env) webhookDeadLetters(topic string) []kafkatest.Record {
	e.t.Helper()
	recs, err := kafkatest.ReadAllVia(context.Background(), e.transport(), e.brokers(), topic)
	if err != nil {
		e.t.Fatalf("reading %s: %v", topic, err)
	}
	var out []kafkatest.Record
	for _, r := range recs {
		if r.Headers["tidemark-dlq-source"] == app.DLQSourceWebhook {
			out = append(out, r)
		}
	}
	return out
}

// TestWebhookHoldAndReplay (acceptance 8): a webhook receiver that is down
// for a while loses nothing and gets every batch exactly once. With
// on_failure: hold the consumer holds its offsets while the receiver
// refuses, dead-letters nothing, and delivers each batch once when it
// accepts again. With on_failure: dlq the batches go to <prefix>.dlq while
// it is down, and `dlq replay` delivers each dead-lettered batch once.
func TestWebhookHoldAndReplay(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	const secret = "webhook-secret-for-the-test"
	rc, url := newCountingReceiver(t, secret)
	cfg := invalidationConfig(e, "whr", "", func(c *config.Config) {
		c.Invalidation.Redis = nil
		c.Invalidation.Group = "whr-hold"
		c.Invalidation.Webhook = &config.Webhook{URL: url, Secret: secret, OnFailure: "hold", BatchSize: 2,
			MaxBackoff: 100 * time.Millisecond}
	})
	e.start(cfg)
	inv, stop := e.startInvalidation(cfg)
	var topics []string
	for topic := range inv.Topics {
		topics = append(topics, topic)
	}
	sort.Strings(topics)

	var keys []string
	insert := func(from, to int) {
		for i := from; i < to; i++ {
			e.exec(fmt.Sprintf(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!h%d', '@h%d', 'join')`, i, i))
			keys = append(keys, fmt.Sprintf("room:!h%d:members", i), fmt.Sprintf("user:@h%d:rooms", i))
		}
	}
	// Up: the first changes are delivered and committed.
	rc.down.Store(false)
	insert(0, 2)
	rc.waitKeys(keys, 30*time.Second)
	e.waitCommitted(cfg.Invalidation.Group, topics, 30*time.Second)

	// Down for longer than dlq's default 5 tries of each batch: the webhook
	// is retried; nothing more is committed or dead-lettered.
	rc.down.Store(true)
	insert(2, 6)
	for deadline := time.Now().Add(30 * time.Second); rc.refused.Load() < 25; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the webhook was tried %d times in 30s while down", rc.refused.Load())
		}
	}
	if !inv.Webhook.Stats().Failing.Load() {
		t.Error("the webhook sink does not report failing while the receiver refuses")
	}
	if behind, err := e.groupBehind(cfg.Invalidation.Group, topics); err != nil || behind == 0 {
		t.Fatalf("group behind by %d (%v) while the webhook refused: hold must keep the offsets", behind, err)
	}
	if dl := e.webhookDeadLetters("whr.dlq"); len(dl) != 0 {
		t.Fatalf("hold dead-lettered %d batches during the outage", len(dl))
	}
	insert(6, 8) // changes during the outage wait too

	rc.down.Store(false)
	rc.waitKeys(keys, 30*time.Second)
	e.waitGroupCaughtUp(cfg.Invalidation.Group, topics, 30*time.Second)
	byID, byKey, badPos := rc.snapshot()
	for id, n := range byID {
		if n != 1 {
			t.Errorf("hold: batch %s delivered %d times, want once", id, n)
		}
	}
	for _, k := range keys {
		if byKey[k] != 1 {
			t.Errorf("hold: key %s delivered %d times, want once", k, byKey[k])
		}
	}
	if len(badPos) > 0 {
		t.Errorf("batches without one position per key: %q", badPos)
	}
	if dl := e.webhookDeadLetters("whr.dlq"); len(dl) != 0 {
		t.Errorf("hold dead-lettered %d batches", len(dl))
	}
	if inv.Webhook.Stats().Failing.Load() {
		t.Error("the webhook sink still reports failing after it delivered")
	}
	stop()

	// dlq: a new group reads every change again while the receiver is
	// down; its batches are dead-lettered and the group moves on.
	rc.down.Store(true)
	rc.reset()
	cfg.Invalidation.Group = "whr-dlq"
	cfg.Invalidation.Webhook = &config.Webhook{URL: url, Secret: secret, OnFailure: "dlq", MaxAttempts: 2, BatchSize: 2,
		MaxBackoff: 100 * time.Millisecond}
	_, stop = e.startInvalidation(cfg)
	e.waitCommitted(cfg.Invalidation.Group, topics, 60*time.Second)
	stop()
	dead := e.webhookDeadLetters("whr.dlq")
	if len(dead) == 0 {
		t.Fatal("nothing dead-lettered while the receiver was down")
	}
	wantIDs := map[string]bool{}
	for _, r := range dead {
		var p webhook.Payload
		if err := json.Unmarshal(r.Value, &p); err != nil {
			t.Fatalf("dead letter %s: %v", r.Value, err)
		}
		wantIDs[p.ID] = true
	}

	rc.down.Store(false)
	rep, err := app.ReplayWebhookDLQ(context.Background(), cfg, app.ReplayOptions{}, nil)
	if err != nil || rep.Stopped != nil || rep.Failed != 0 || rep.Resent != len(wantIDs) {
		t.Fatalf("replay: %+v, %v; want %d batches resent", rep, err, len(wantIDs))
	}
	byID, byKey, _ = rc.snapshot()
	for id := range wantIDs {
		if byID[id] != 1 {
			t.Errorf("replay: batch %s delivered %d times, want once", id, byID[id])
		}
	}
	if len(byID) != len(wantIDs) {
		t.Errorf("replay delivered %d batch ids, want the %d dead-lettered", len(byID), len(wantIDs))
	}
	for _, k := range keys {
		if byKey[k] == 0 {
			t.Errorf("replay: key %s never delivered", k)
		}
	}
}
