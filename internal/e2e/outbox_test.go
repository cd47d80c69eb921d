package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/bench"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

// consumerSessions are the application_names of the targets and integrity
// consumers' state-database sessions.
const consumerSessions = `'tidemark-targets', 'tidemark-integrity'`

// TestConsumersHoldNoTransactionDuringKafkaOutage (issue 15, acceptance 4):
// the targets and integrity consumers work through a backlog of membership
// changes and orphan events when Kafka goes down for 10 s (the property
// shows within the first seconds of an outage; 10 s keeps the test short):
// sampled every 200 ms, no state-database session of theirs has a
// transaction (xact_start) open for more than 3 s, while the targets
// outbox holds records waiting for Kafka. After Kafka returns, every outbox record
// is published, per room in version order, nothing lost.
func TestConsumersHoldNoTransactionDuringKafkaOutage(t *testing.T) {
	e := newEnv(t, t.TempDir()) // a data dir: Kafka keeps its topics across the restart
	e.exec(bench.Schema)
	e.exec(bench.Seed)
	cfg := e.config("obx", bench.Tables, func(c *config.Config) {
		c.Integrity = &config.Integrity{Rules: integrity.DefaultRules(), Group: "obx-integrity"}
		c.Targets = &config.Targets{Hold: time.Second}
	})
	e.start(cfg)
	ie := &integrityEnv{env: e, cfg: cfg, prefix: "obx"}

	// A backlog, captured before the consumers start, so that they are
	// mid-way through it when Kafka stops.
	const n = 3000
	for i := 0; i < n; i++ {
		room, user := benchRoom(i%40+1), fmt.Sprintf("@o%d:bench.test", i%97)
		e.exec(bench.SQLMember, room, user, []string{"join", "leave", "join", "ban"}[i%4], fmt.Sprintf("$m%d", i))
		if i%3 == 0 {
			e.exec(itxOrphan, fmt.Sprintf("$orphan%d:bench.test", i), room, user)
		}
	}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 60*time.Second)

	type sample struct {
		app, query string
		age        time.Duration
	}
	var (
		mu       sync.Mutex
		worst    sample
		outboxed [2]int // most targets and integrity outbox records seen while Kafka was down
		down     bool
	)
	sctx, stopSampling := context.WithCancel(context.Background())
	defer stopSampling()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for sctx.Err() == nil {
			var s sample
			var secs float64
			err := e.pool.QueryRow(sctx, `SELECT application_name, left(query, 120), extract(epoch FROM now() - xact_start)
FROM pg_stat_activity WHERE application_name IN (`+consumerSessions+`) AND xact_start IS NOT NULL
ORDER BY xact_start LIMIT 1`).Scan(&s.app, &s.query, &secs)
			if err == nil {
				s.age = time.Duration(secs * float64(time.Second))
			}
			var ob [2]int
			_ = e.pool.QueryRow(sctx, `SELECT count(*) FROM tidemark.notify_outbox`).Scan(&ob[0])
			_ = e.pool.QueryRow(sctx, `SELECT count(*) FROM tidemark.violation_outbox`).Scan(&ob[1])
			mu.Lock()
			if s.age > worst.age {
				worst = s
			}
			for i := range ob {
				if down && ob[i] > outboxed[i] {
					outboxed[i] = ob[i]
				}
			}
			mu.Unlock()
			time.Sleep(200 * time.Millisecond)
		}
	}()

	_, stopTargets := e.startTargets(cfg)
	_, stopIntegrity := ie.startIntegrity("obx-integrity")
	var vAtStop int
	// Kafka stops once the targets consumer is mid-backlog (it has kept
	// some memberships, fewer than half): what it has fetched but not
	// settled is settled during the outage and waits in its outbox.
	// Integrity may be anywhere (its store-level test is deterministic).
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		var members, violations int
		vAtStop = violations
		if err := e.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM tidemark.notify_memberships),
  (SELECT count(*) FROM tidemark.violations)`).Scan(&members, &violations); err == nil && members > 0 && members < n/2 {
			vAtStop = violations
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the consumers produced no output within a minute")
		}
	}
	// TIDEMARK_KAFKA_OUTAGE sets the outage (default 10s; the issue's
	// figure is 30s).
	outage := 10 * time.Second
	if v := os.Getenv("TIDEMARK_KAFKA_OUTAGE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("TIDEMARK_KAFKA_OUTAGE: %v", err)
		}
		outage = d
	}
	e.kafka.Stop()
	mu.Lock()
	down = true
	mu.Unlock()
	time.Sleep(outage)
	mu.Lock()
	down = false
	mu.Unlock()
	var vAfter int
	_ = e.pool.QueryRow(context.Background(), `SELECT count(*) FROM tidemark.violations`).Scan(&vAfter)
	t.Logf("violations stored when Kafka stopped: %d, when it returned: %d", vAtStop, vAfter)
	if err := e.kafka.Restart(); err != nil {
		t.Fatalf("restarting kafka: %v", err)
	}
	e.waitTargets(cfg, time.Minute)
	stopSampling()
	wg.Wait()

	if worst.age > 3*time.Second {
		t.Errorf("a %s session kept a transaction open for %s during the Kafka outage (query %q)", worst.app, worst.age.Round(time.Millisecond), worst.query)
	}
	// The targets consumer settles rooms during the outage (hold expires
	// with the transaction index unreadable), so its outbox must have
	// waited; the integrity consumer decides only on records it fetched,
	// so whether it had one to publish then depends on timing (its
	// store-level test, TestPublishOutsideTransaction, is deterministic).
	if outboxed[0] == 0 {
		// Timing: the consumer had settled everything it fetched before
		// Kafka stopped. The transaction-age check above then proved less;
		// TestPublishOutsideTransaction (integrity) is the deterministic one.
		t.Logf("no targets outbox record waited during the outage (integrity: %d)", outboxed[1])
	}
	t.Logf("longest consumer transaction %s (%s); outbox records waiting for Kafka: targets up to %d, integrity up to %d",
		worst.age.Round(time.Millisecond), worst.app, outboxed[0], outboxed[1])

	// Targets: the changes topic follows the kept state, versions in order.
	e.checkOutputs(cfg)
	// Integrity: it flags every orphan, and every stored violation reached
	// the topic once the outbox emptied.
	deadline := time.Now().Add(time.Minute)
	for {
		var ob, nv int
		if err := e.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM tidemark.violation_outbox), (SELECT count(*) FROM tidemark.violations)`).Scan(&ob, &nv); err != nil {
			t.Fatal(err)
		}
		if ob == 0 && nv >= n/3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute after Kafka returned: %d violation(s) stored (want %d), %d outbox record(s) unpublished", nv, n/3, ob)
		}
		time.Sleep(100 * time.Millisecond)
	}
	stopTargets()
	stopIntegrity()
	var stored []string
	for _, v := range ie.violations() {
		stored = append(stored, v.ID+" "+v.Status)
	}
	sort.Strings(stored)
	if len(stored) < n/3 {
		t.Fatalf("%d violations stored, want the %d orphan events", len(stored), n/3)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), cfg.Kafka.TopicPrefix+".violations")
	if err != nil {
		t.Fatal(err)
	}
	latest := map[string]string{}
	for _, m := range byPartitionOffset(toMsgs(recs)) {
		var v struct{ ID, Status string }
		if err := json.Unmarshal(m.Value, &v); err != nil {
			t.Fatal(err)
		}
		latest[v.ID] = v.Status
	}
	var published []string
	for id, st := range latest {
		published = append(published, id+" "+st)
	}
	sort.Strings(published)
	if strings.Join(published, "\n") != strings.Join(stored, "\n") {
		t.Fatalf("violations topic (latest per id, %d) differs from the table (%d)", len(published), len(stored))
	}
}
