package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
	"github.com/tidemark/tidemark/sinks/webhook"
)

func invalidationConfig(e *env, prefix, redisAddr string, mod func(*config.Config)) *config.Config {
	return e.config(prefix, demo.Tables, func(c *config.Config) {
		c.Pipeline.EntityStreams = []pipeline.EntityStream{{Name: "rooms", Key: "room_id",
			Tables: []string{"public.room_memberships", "public.events", "public.event_json"}}}
		c.Invalidation = &config.Invalidation{
			Redis: &config.Redis{Addr: redisAddr},
			Rules: []invalidation.Rule{
				{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members", "user:{user_id}:rooms"}},
				{Table: "public.read_markers", Keys: []string{"unread:{user_id}:{room_id}"}},
				{Table: "public.events", Keys: []string{"room:{room_id}:timeline"}, Ops: []string{"c", "d"}},
			},
		}
		if mod != nil {
			mod(c)
		}
	})
}

// startInvalidation runs the invalidation consumer in the test process.
func (e *env) startInvalidation(cfg *config.Config) (*app.Invalidation, func()) {
	e.t.Helper()
	inv, err := app.PrepareInvalidation(context.Background(), cfg, nil)
	if err != nil {
		e.t.Fatalf("prepare invalidation: %v", err)
	}
	stop := runConsumer(e.t, "invalidation", inv.Run)
	return inv, stop
}

// TestInvalidationDeletesExpectedKeys: join, leave, ban, a read-marker
// upsert, an event insert and a row moved between rooms each delete exactly
// the expected Redis keys, and nothing else.
func TestInvalidationDeletesExpectedKeys(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "inv", rd.Addr(), nil)
	e.start(cfg)
	e.startInvalidation(cfg)
	var invTopics []string
	for _, r := range cfg.Invalidation.Rules {
		invTopics = append(invTopics, "inv."+r.Table)
	}
	rc := rd.Client()
	ctx := context.Background()
	all := []string{"room:!r1:members", "room:!r2:members", "user:@a:rooms", "user:@b:rooms",
		"unread:@a:!r1", "unread:@b:!r1", "room:!r1:timeline", "room:!r2:timeline", "unrelated"}
	step := func(name, sql string, want ...string) {
		t.Helper()
		for _, k := range all {
			if err := rc.Set(ctx, k, "cached", 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
		e.exec(sql)
		deadline := time.Now().Add(20 * time.Second)
		for {
			n, err := rc.Exists(ctx, want...).Result()
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: keys %v not all deleted within 20s", name, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
		// Once the change is in Kafka and the consumer has committed past
		// it, any extra (wrong) deletion of it has landed: check that
		// nothing else was deleted.
		e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
		e.waitGroupCaughtUp(cfg.Invalidation.Group, invTopics, 20*time.Second)
		for _, k := range all {
			expected := false
			for _, w := range want {
				expected = expected || w == k
			}
			if expected {
				continue
			}
			n, err := rc.Exists(ctx, k).Result()
			if err != nil {
				t.Fatal(err)
			}
			if n != 1 {
				t.Errorf("%s: key %s was deleted but should not have been", name, k)
			}
		}
	}
	step("join", `INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'join')`,
		"room:!r1:members", "user:@a:rooms")
	step("leave", `UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!r1' AND user_id = '@a'`,
		"room:!r1:members", "user:@a:rooms")
	step("ban", `UPDATE room_memberships SET membership = 'ban' WHERE room_id = '!r1' AND user_id = '@a'`,
		"room:!r1:members", "user:@a:rooms")
	step("read marker", `INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) VALUES ('@a', '!r1', '$x', 5)
		ON CONFLICT (user_id, room_id) DO UPDATE SET stream_ordering = EXCLUDED.stream_ordering`, "unread:@a:!r1")
	step("read marker upsert", `INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) VALUES ('@a', '!r1', '$y', 6)
		ON CONFLICT (user_id, room_id) DO UPDATE SET stream_ordering = EXCLUDED.stream_ordering`, "unread:@a:!r1")
	step("event", `INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ('$e1', '!r1', '@a', 'm.room.message', 1)`,
		"room:!r1:timeline")
	step("moved between rooms", `UPDATE room_memberships SET room_id = '!r2' WHERE room_id = '!r1' AND user_id = '@a'`,
		"room:!r1:members", "room:!r2:members", "user:@a:rooms")

	// The compacted invalidations topic carries every key with the position
	// of the change that invalidated it.
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), "inv.invalidations")
	if err != nil {
		t.Fatal(err)
	}
	byKey := map[string][]string{}
	for _, r := range recs {
		byKey[string(r.Key)] = append(byKey[string(r.Key)], string(r.Value))
	}
	for _, k := range []string{"room:!r1:members", "room:!r2:members", "user:@a:rooms", "unread:@a:!r1", "room:!r1:timeline"} {
		if len(byKey[k]) == 0 {
			t.Errorf("invalidations topic lacks %s", k)
		}
		for _, v := range byKey[k] {
			if _, err := pipeline.ParsePositionHeaders(strings.SplitN(v, ":", 2)[0], strings.SplitN(v+":", ":", 3)[1]); err != nil {
				t.Errorf("invalidations record %s = %q is not a position: %v", k, v, err)
			}
		}
	}
	if len(byKey["unrelated"]) > 0 || len(byKey["room:!r2:timeline"]) > 0 {
		t.Errorf("invalidations topic holds keys no change touched: %v", byKey)
	}
}

// TestInvalidationRefusesMissingHandler: consuming an entity stream whose
// tables lack a rule refuses to start, naming the table.
func TestInvalidationRefusesMissingHandler(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "miss", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Streams = []string{"rooms"}
		c.Invalidation.Rules = slices.Delete(c.Invalidation.Rules, 1, 2) // read_markers is in no stream: a dead rule
	})
	_, err := app.PrepareInvalidation(context.Background(), cfg, nil)
	var me *invalidation.MissingHandlerError
	if !errors.As(err, &me) {
		t.Fatalf("PrepareInvalidation = %v, want a MissingHandlerError", err)
	}
	if !strings.Contains(err.Error(), "miss.rooms: public.event_json") {
		t.Errorf("error does not name the uncovered table: %v", err)
	}
	// A stream table mapped to no rule on purpose is accepted (its changes
	// are counted as skipped, reason table_ignored).
	cfg.Invalidation.IgnoreTables = []string{"public.event_json"}
	if inv, err := app.PrepareInvalidation(context.Background(), cfg, nil); err != nil {
		t.Errorf("with ignore_tables: %v", err)
	} else if inv.Redis != nil {
		_ = inv.Redis.Close()
	}
	// Bad templates are refused at load time, naming rule, template and column.
	cfg = invalidationConfig(e, "tmpl", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Rules[0].Keys = []string{"room:{roomid}:members"}
	})
	_, err = app.PrepareInvalidation(context.Background(), cfg, nil)
	if err == nil || !strings.Contains(err.Error(), `invalidation.rules[0].keys[0]: "room:{roomid}:members" uses column "roomid", which public.room_memberships does not have`) {
		t.Fatalf("bad template: %v", err)
	}
}

// TestInvalidationDeadLetters: a malformed message and a truncate of a
// rule with on_truncate: dlq go to <prefix>.dlq with their reason and
// original headers (the truncate once, though every partition carries it);
// the consumer keeps going.
func TestInvalidationDeadLetters(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "dlq", rd.Addr(), func(c *config.Config) { c.Invalidation.Rules[1].OnTruncate = invalidation.TruncateDLQ })
	e.start(cfg)
	inv, _ := e.startInvalidation(cfg)
	w := &kafkago.Writer{Addr: kafkago.TCP(e.kafka.Brokers()...), RequiredAcks: kafkago.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	if err := w.WriteMessages(context.Background(), kafkago.Message{Topic: "dlq.public.read_markers", Key: []byte("k"),
		Value: []byte("{not json"), Headers: []kafkago.Header{{Key: "origin", Value: []byte("test")}}}); err != nil {
		t.Fatal(err)
	}
	e.exec(`TRUNCATE read_markers`)
	rc := rd.Client()
	ctx := context.Background()
	if err := rc.Set(ctx, "unread:@z:!r9", "cached", 0).Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) VALUES ('@z', '!r9', '$x', 1)`)
	deadline := time.Now().Add(20 * time.Second)
	for {
		n, err := rc.Exists(ctx, "unread:@z:!r9").Result()
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the consumer did not keep going after the bad messages")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var dead []kafkatest.Record
	for time.Now().Before(deadline) {
		var err error
		dead, err = kafkatest.ReadAll(ctx, e.kafka.Brokers(), "dlq.dlq")
		if err == nil && len(dead) >= 1+1 { // malformed + the truncate, once
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var malformed, trunc int
	for _, d := range dead {
		reason := d.Headers["tidemark-dlq-reason"]
		switch {
		case strings.Contains(reason, "not valid JSON") && d.Headers["origin"] == "test":
			malformed++
			if !strings.HasPrefix(d.Headers["tidemark-dlq-source"], "dlq.public.read_markers/") {
				t.Errorf("dead letter source %q", d.Headers["tidemark-dlq-source"])
			}
		case strings.Contains(reason, "on_truncate: dlq (invalidation.rules[1])") && d.Headers["tidemark-op"] == "t":
			trunc++
		default:
			t.Errorf("unexpected dead letter: %v", d.Headers)
		}
	}
	if malformed != 1 || trunc != 1 {
		t.Errorf("dead letters: %d malformed (want 1), %d truncates (want 1, though each of 3 partitions carries it)", malformed, trunc)
	}
	if got := inv.Consumer.Stats().DLQ.Load(); got != 2 {
		t.Errorf("DLQ counter = %d, want 2", got)
	}
}

// TestInvalidationCrashAndReplay: the invalidation role (the real binary)
// is SIGKILLed mid-stream and restarted; every key that had to be deleted
// is deleted. The kill lands while deletions are certainly pending: the
// first half of the changes is applied, then Redis pauses writes, the
// second half is committed, and the binary is killed once its DEL is
// blocked on the pause. Replaying all changes again (a new consumer group
// from the first offset) after the keys are cached again deletes them
// again.
func TestInvalidationCrashAndReplay(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "crashinv", rd.Addr(), func(c *config.Config) { c.Invalidation.Topic = new(bool) })
	e.start(cfg)
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "inv.yml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rc := rd.Client()
	// Two halves of 150 rooms and 150 users. The first half's 1500
	// membership changes touch each of its rooms and users at least once;
	// the second half's 150 changes touch each of its rooms and users
	// exactly once, so that a change lost at the kill leaves its keys.
	const half, firstChanges = 150, 1500
	const changes = firstChanges + half
	keys := func(from int) []string {
		var out []string
		for i := from; i < from+half; i++ {
			out = append(out, fmt.Sprintf("room:!r%d:members", i), fmt.Sprintf("user:@u%d:rooms", i))
		}
		return out
	}
	first, second := keys(1), keys(1+half)
	want := append(append([]string(nil), first...), second...)
	cacheAll := func() {
		for _, k := range append(want, "unrelated:1", "unrelated:2") {
			if err := rc.Set(ctx, k, "cached", 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	commitFirst := func() {
		e.exec(fmt.Sprintf(`DO $$ BEGIN FOR i IN 1..%d LOOP
  INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r' || (1 + i %% %d), '@u' || (1 + (i * 7) %% %d), 'join')
  ON CONFLICT (room_id, user_id) DO UPDATE SET membership = 'leave';
  COMMIT; END LOOP; END $$`, firstChanges, half, half))
	}
	commitSecond := func() {
		e.exec(fmt.Sprintf(`DO $$ BEGIN FOR i IN %d..%d LOOP
  INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r' || i, '@u' || i, 'join');
  COMMIT; END LOOP; END $$`, 1+half, 2*half))
	}
	exists := func(ks []string) int64 {
		t.Helper()
		n, err := rc.Exists(ctx, ks...).Result()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitGone := func(what string, ks []string, within time.Duration) {
		t.Helper()
		for deadline := time.Now().Add(within); exists(ks) > 0; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d of %d keys never deleted", what, exists(ks), len(ks))
			}
		}
	}
	run := func() *exec.Cmd {
		cmd := exec.Command(binary(t), "run", "--role", "invalidation", "--config", path)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	cacheAll()
	commitFirst()
	cmd := run()
	waitGone("first half, first run", first, 60*time.Second)

	if err := rc.Do(ctx, "CLIENT", "PAUSE", "60000", "WRITE").Err(); err != nil {
		t.Fatal(err)
	}
	commitSecond()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		info, err := rc.Info(ctx, "clients").Result()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(info, "blocked_clients:0") {
			break // the consumer's DEL waits for the pause
		}
		if time.Now().After(deadline) {
			t.Fatalf("the consumer never tried to delete a key of the second half within 30s:\n%s", info)
		}
	}
	kill(t, cmd)
	if err := rc.Do(ctx, "CLIENT", "UNPAUSE").Err(); err != nil {
		t.Fatal(err)
	}
	left := exists(second)
	if left != int64(len(second)) {
		t.Fatalf("%d of the %d keys of the second half still exist after the kill, want all: the kill did not interrupt the consumer", left, len(second))
	}
	cmd = run()
	waitGone("after the restart", second, 90*time.Second)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}

	// Cache every key again and replay every change with a new group: the
	// replay has to delete them all once more.
	cacheAll()
	cfg.Invalidation.Group = "crashinv-replay"
	inv, stop := e.startInvalidation(cfg)
	deadline := time.Now().Add(60 * time.Second)
	for inv.Consumer.Stats().Messages.Load() < changes || exists(want) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("replay applied %d of %d changes, %d keys left", inv.Consumer.Stats().Messages.Load(), changes, exists(want))
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	if n := exists([]string{"unrelated:1", "unrelated:2"}); n != 2 {
		t.Errorf("unrelated keys deleted (%d left)", n)
	}
	if d := inv.Consumer.Stats().DLQ.Load(); d != 0 {
		t.Errorf("replay dead-lettered %d changes", d)
	}
}

// TestInvalidationWebhook: a webhook receiver gets signed batches of the
// keys real changes invalidate; a receiver that always fails ends in the
// dead-letter topic with the signed body, and the consumer moves on.
func TestInvalidationWebhook(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	const secret = "s3cret-for-test"
	got := &webhookReceiver{t: t, secret: secret}
	ok := httptest.NewServer(got)
	defer ok.Close()
	cfg := invalidationConfig(e, "hook", "", func(c *config.Config) {
		c.Invalidation.Redis = nil
		c.Invalidation.Webhook = &config.Webhook{URL: ok.URL, Secret: secret}
	})
	e.start(cfg)
	_, stop := e.startInvalidation(cfg)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!w1', '@w', 'join')`)
	if got.wait("room:!w1:members", "user:@w:rooms") {
		t.FailNow()
	}
	stop()

	// A receiver that always fails on the first change's keys: that batch is
	// dead-lettered, and a later change is still delivered.
	later := &webhookReceiver{t: t, secret: secret, refuse: func(body string) bool { return strings.Contains(body, "!w1") }}
	bad := httptest.NewServer(later)
	defer bad.Close()
	cfg.Invalidation.Group = "hook-bad"
	cfg.Invalidation.Webhook = &config.Webhook{URL: bad.URL, Secret: secret, MaxAttempts: 2}
	inv, _ := e.startInvalidation(cfg)
	ctx := context.Background()
	deadline := time.Now().Add(20 * time.Second)
	for {
		recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), "hook.dlq")
		if err == nil && len(recs) > 0 {
			r := recs[0]
			if r.Headers["tidemark-dlq-source"] != "webhook" || !strings.Contains(r.Headers["tidemark-dlq-reason"], "500") ||
				!strings.Contains(string(r.Value), "room:!w1:members") || strings.Contains(r.Headers["tidemark-dlq-reason"], secret) {
				t.Errorf("dead letter: headers %v body %s", r.Headers, r.Value)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the failing webhook's batch never reached the dead-letter topic (last read: %v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!w2', '@w2', 'join')`)
	if missing := later.wait("room:!w2:members", "user:@w2:rooms"); missing {
		t.Fatalf("after the dead letter, the next change was not delivered within 20s (the consumer applied %d changes)", inv.Consumer.Stats().Messages.Load())
	}
}

// webhookReceiver records the keys of the invalidation batches it accepts:
// each must be signed with secret; a body refuse accepts is answered 500.
type webhookReceiver struct {
	t      *testing.T
	secret string
	refuse func(body string) bool
	mu     sync.Mutex
	keys   []string
}

func (wr *webhookReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		wr.t.Errorf("reading the webhook request: %v", err)
		http.Error(w, "unreadable body", http.StatusBadRequest)
		return
	}
	if err := webhook.Verify(wr.secret, r.Header.Get(webhook.TimestampHeader), string(body), r.Header.Get(webhook.DefaultHeader), time.Minute); err != nil {
		wr.t.Errorf("signature: %v", err)
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	if wr.refuse != nil && wr.refuse(string(body)) {
		http.Error(w, "down", http.StatusInternalServerError)
		return
	}
	var p struct {
		Keys []string `json:"keys"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		wr.t.Errorf("body: %v", err)
	}
	wr.mu.Lock()
	wr.keys = append(wr.keys, p.Keys...)
	wr.mu.Unlock()
}

// wait waits up to 20s until every key was received; it fails the test
// (not fatally) and reports true when some never were.
func (wr *webhookReceiver) wait(keys ...string) (missing bool) {
	wr.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		wr.mu.Lock()
		got := slices.Clone(wr.keys)
		wr.mu.Unlock()
		all := true
		for _, k := range keys {
			all = all && slices.Contains(got, k)
		}
		if all {
			return false
		}
		if time.Now().After(deadline) {
			wr.t.Errorf("webhook received %v, want %v among them", got, keys)
			return true
		}
	}
}

// TestInvalidationRebalance: two members of one group share the partitions;
// when one stops mid-stream its partitions move to the other and no
// invalidation is lost.
func TestInvalidationRebalance(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for group rebalances")
	}
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "rebal", rd.Addr(), func(c *config.Config) {
		c.Invalidation.Rules = c.Invalidation.Rules[:1] // room_memberships only
	})
	e.start(cfg)
	ctx := context.Background()
	a, stopA := e.startInvalidation(cfg)
	b, _ := e.startInvalidation(cfg)
	group := cfg.Invalidation.Group
	if group == "" {
		group = cfg.Kafka.TopicPrefix + "-invalidation"
	}
	topic := "rebal.public.room_memberships"
	nparts, err := kafkatest.PartitionCount(ctx, e.kafka.Brokers(), topic)
	if err != nil {
		t.Fatal(err)
	}
	if nparts < 2 {
		t.Fatalf("%s has %d partition(s); the test needs two members to share it", topic, nparts)
	}
	// Both members own partitions before any change is committed.
	waitAssignment(t, e.kafka.Brokers(), group, topic, func(owned []int) bool {
		return len(owned) == 2 && owned[0] > 0 && owned[1] > 0 && owned[0]+owned[1] == nparts
	})
	rc := rd.Client()
	const rooms = 200
	var want []string
	for r := 1; r <= rooms; r++ {
		want = append(want, fmt.Sprintf("room:!q%d:members", r))
	}
	set := func() {
		for _, k := range want {
			if err := rc.Set(ctx, k, "cached", 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	waitGone := func(what string) {
		deadline := time.Now().Add(60 * time.Second)
		for {
			n, err := rc.Exists(ctx, want...).Result()
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d keys never deleted", what, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	set()
	e.exec(fmt.Sprintf(`DO $$ BEGIN FOR i IN 1..%d LOOP
  INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!q' || i, '@x', 'join'); COMMIT; END LOOP; END $$`, rooms))
	waitGone("both members")
	// Stats.Messages counts a batch once its offsets are committed, which
	// is after its DELs: wait for the counters to settle.
	var na, nb uint64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		na, nb = a.Consumer.Stats().Messages.Load(), b.Consumer.Stats().Messages.Load()
		if na+nb >= rooms || time.Now().After(deadline) {
			break
		}
	}
	if na == 0 || nb == 0 || na+nb != rooms {
		t.Fatalf("partitions were not shared: a applied %d, b %d of %d changes", na, nb, rooms)
	}
	stopA()
	// The remaining member takes over every partition.
	waitAssignment(t, e.kafka.Brokers(), group, topic, func(owned []int) bool {
		return len(owned) == 1 && owned[0] == nparts
	})
	set()
	e.exec(fmt.Sprintf(`UPDATE room_memberships SET membership = 'leave' WHERE user_id = '@x' AND room_id IN (SELECT '!q' || g FROM generate_series(1, %d) g)`, rooms))
	waitGone("after one member left")
	var got uint64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if got = b.Consumer.Stats().Messages.Load() - nb; got >= rooms || time.Now().After(deadline) {
			break
		}
	}
	if got < rooms {
		t.Errorf("after a left, b applied %d changes, want all %d", got, rooms)
	}
}

// waitAssignment waits until ok accepts the number of topic's partitions
// each member of group owns (one entry per member, in member order).
func waitAssignment(t *testing.T, brokers []string, group, topic string, ok func(owned []int) bool) {
	t.Helper()
	transport := &kafkago.Transport{}
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 5 * time.Second, Transport: transport}
	var last []int
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err := client.DescribeGroups(context.Background(), &kafkago.DescribeGroupsRequest{GroupIDs: []string{group}})
		if err != nil {
			t.Fatalf("describe group %s: %v", group, err)
		}
		if len(resp.Groups) != 1 {
			t.Fatalf("describe group %s: %d groups in the answer", group, len(resp.Groups))
		}
		g := resp.Groups[0]
		if g.Error == nil && g.GroupState == "Stable" {
			last = last[:0]
			for _, m := range g.Members {
				n := 0
				for _, tp := range m.MemberAssignments.Topics {
					if tp.Topic == topic {
						n += len(tp.Partitions)
					}
				}
				last = append(last, n)
			}
			if ok(last) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %s: partitions of %s per member %v (state %s, error %v) after 60s", group, topic, last, g.GroupState, g.Error)
		}
	}
}

// partitionCounts returns an admin client of the test's brokers and the
// partition count of each topic.
func (e *env) partitionCounts(ctx context.Context, topics []string) (*kafkago.Client, map[string]int) {
	e.t.Helper()
	client := &kafkago.Client{Addr: kafkago.TCP(e.brokers()...), Timeout: 5 * time.Second, Transport: e.transport()}
	parts := map[string]int{}
	for _, topic := range topics {
		n, err := kafkatest.PartitionCountVia(ctx, e.transport(), e.brokers(), topic)
		if err != nil {
			e.t.Fatal(err)
		}
		parts[topic] = n
	}
	return client, parts
}

// waitGroupCaughtUp waits until group has committed every record topics
// hold (their end offsets read at each check).
func (e *env) waitGroupCaughtUp(group string, topics []string, within time.Duration) {
	e.t.Helper()
	ctx := context.Background()
	client, parts := e.partitionCounts(ctx, topics)
	for deadline := time.Now().Add(within); ; time.Sleep(20 * time.Millisecond) {
		behind, err := kafkatest.GroupBehind(ctx, client, group, parts)
		if err != nil {
			e.t.Fatal(err)
		}
		if behind == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("group %s still %d records behind %v after %s", group, behind, topics, within)
		}
	}
}
