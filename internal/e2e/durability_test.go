package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/pipeline"
)

var canonicalTopics = []string{"public.users", "public.rooms", "public.room_memberships", "public.events", "public.event_json", "public.read_markers"}

// workload runs the demo mix until the returned stop func is called.
func (e *env) workload(rate int) (stop func() *demo.Counts) {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var c demo.Counts
	var wg sync.WaitGroup
	var err error
	wg.Add(1)
	go func() {
		defer wg.Done()
		err = demo.Workload(ctx, e.pool, rate, rand.Uint64(), &c)
	}()
	var once sync.Once
	stop = func() *demo.Counts {
		once.Do(func() {
			cancel()
			wg.Wait()
			if err != nil {
				e.t.Errorf("workload: %v", err)
			}
		})
		return &c
	}
	e.t.Cleanup(func() { stop() })
	return stop
}

// TestCheckpointPrecision: the slot's confirmed_flush_lsn follows the
// pipeline's acknowledgements within a second, and never covers a
// transaction that is not in Kafka. A sampler reads confirmed_flush_lsn and
// then the end offset of every partition; afterwards every transaction
// whose end LSN is at or below a sample must have had every change and its
// END record below the end offsets read just after that sample. The broker
// delays each produce, so that a slot confirming what is still on its way
// to Kafka is caught, not raced.
func TestCheckpointPrecision(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	cfg := e.config("ckpt", demo.Tables, nil)
	tr := e.newTruth("truth_ckpt")
	r := e.start(cfg)
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	topics := []string{"ckpt.transaction"}
	for _, tb := range canonicalTopics {
		topics = append(topics, "ckpt."+tb)
	}
	ctx := context.Background()
	parts := map[string]int{}
	for deadline := time.Now().Add(30 * time.Second); len(parts) < len(topics); time.Sleep(50 * time.Millisecond) {
		for _, topic := range topics {
			if n, err := kafkatest.PartitionCount(ctx, e.kafka.Brokers(), topic); err == nil {
				parts[topic] = n
			} else if time.Now().After(deadline) {
				t.Fatalf("topic %s not created within 30s of the seed: %v", topic, err)
			}
		}
	}
	e.kafka.DelayProduces(100 * time.Millisecond)

	type sample struct {
		confirmed pipeline.LSN
		ends      map[string][]int64 // read after confirmed
	}
	var samples []sample
	var sampleErr error
	transport := &kafkago.Transport{}
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(e.kafka.Brokers()...), Timeout: 5 * time.Second, Transport: transport}
	sctx, stopSampling := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for sctx.Err() == nil {
			c, err := e.readConfirmed(sctx, cfg.Postgres.Slot, false)
			if sctx.Err() != nil {
				return
			}
			if err != nil {
				sampleErr = err
				return
			}
			ends, err := kafkatest.EndOffsets(sctx, client, parts)
			if sctx.Err() != nil {
				return
			}
			if err != nil {
				sampleErr = err
				return
			}
			samples = append(samples, sample{c, ends})
			time.Sleep(5 * time.Millisecond)
		}
	}()
	stop := e.workload(200)
	time.Sleep(2 * time.Second) // the workload's length
	stop()

	txns := tr.txns()
	last := txns[len(txns)-1].end
	deadline := time.Now().Add(30 * time.Second)
	for pipeline.LSN(r.Pipeline.Stats().AckedLSN.Load()) < last {
		if time.Now().After(deadline) {
			t.Fatalf("pipeline did not acknowledge %s within 30s", last)
		}
		time.Sleep(2 * time.Millisecond)
	}
	acked := time.Now()
	e.waitSlot(cfg.Postgres.Slot, last, 10*time.Second)
	if d := time.Since(acked); d > time.Second {
		t.Errorf("slot confirmed the last transaction %s after its acknowledgement, want within 1s", d)
	}
	stopSampling()
	wg.Wait()
	if sampleErr != nil {
		t.Fatalf("sampling: %v", sampleErr)
	}

	// With synchronous_commit off the truth slot sees only flushed WAL: read
	// it again now that the WAL writer has caught up, and wait for what it
	// adds, so that the per-sample check covers the last transactions too.
	for txns = tr.txns(); txns[len(txns)-1].end != last; txns = tr.txns() {
		last = txns[len(txns)-1].end
		e.waitSlot(cfg.Postgres.Slot, last, 10*time.Second)
	}
	view := e.kafkaView("ckpt", canonicalTopics)
	if miss := view.missing(txns, 0); len(miss) > 0 {
		t.Fatalf("Kafka lacks committed transactions: %v", miss[:min(5, len(miss))])
	}
	if len(samples) < 50 {
		t.Fatalf("only %d slot samples", len(samples))
	}
	held := e.heldAt("ckpt", canonicalTopics, parts, last)
	advanced, covering := 0, 0
	for i, sm := range samples {
		c := sm.confirmed
		if i > 0 && c < samples[i-1].confirmed {
			t.Errorf("confirmed_flush_lsn went backwards: %s after %s", c, samples[i-1].confirmed)
		}
		if i > 0 && c > samples[i-1].confirmed {
			advanced++
		}
		if c > last && c > e.currentLSN() {
			t.Errorf("confirmed %s beyond the server's WAL", c)
		}
		for _, tt := range txns {
			if tt.end > c {
				break // txns is in commit order
			}
			covering++
			if why := held.lacks(tt, sm.ends); why != "" {
				t.Fatalf("sample %d: slot confirmed %s, covering xid %d (end %s), but Kafka did not hold it yet: %s",
					i, c, tt.xid, tt.end, why)
			}
		}
	}
	if advanced < 5 {
		t.Errorf("slot advanced only %d times during the workload", advanced)
	}
	t.Logf("%d transactions, %d slot samples, %d advances, %d (sample, covered transaction) pairs checked against Kafka's end offsets",
		len(txns), len(samples), advanced, covering)
}

// heldView says, for each transaction (by xid) committed at or below upTo,
// the offsets Kafka had to reach to hold it wholly: per topic and
// partition, one past the first copy of its END record and of each of its
// positions.
type heldView struct {
	need    map[uint32]map[string][]int64
	changes map[uint32]int
}

func (e *env) heldAt(prefix string, tables []string, parts map[string]int, upTo pipeline.LSN) heldView {
	e.t.Helper()
	v := heldView{need: map[uint32]map[string][]int64{}, changes: map[uint32]int{}}
	require := func(xid uint32, topic string, part int, offset int64) {
		if v.need[xid] == nil {
			v.need[xid] = map[string][]int64{}
		}
		if v.need[xid][topic] == nil {
			v.need[xid][topic] = make([]int64, parts[topic])
		}
		if n := v.need[xid][topic]; offset+1 > n[part] {
			n[part] = offset + 1
		}
	}
	xidOf := map[uint64]uint32{} // commit LSN -> xid
	txTopic := prefix + ".transaction"
	for _, r := range e.readRaw(txTopic) {
		var tr txnRecord
		if err := json.Unmarshal(r.Value, &tr); err != nil {
			e.t.Fatalf("%s/%d@%d: %v", txTopic, r.Partition, r.Offset, err)
		}
		if tr.Status != "END" {
			continue
		}
		if _, dup := xidOf[tr.LSN]; dup {
			continue // a later copy; the first is the one that counts
		}
		xidOf[tr.LSN] = tr.TxID
		require(tr.TxID, txTopic, r.Partition, r.Offset)
	}
	for _, tb := range tables {
		topic := prefix + "." + tb
		first := map[pipeline.Position]bool{}
		for _, m := range byPartitionOffset(e.read(topic)) {
			if first[m.Pos] {
				continue
			}
			first[m.Pos] = true
			if m.Pos.CommitLSN > upTo {
				continue // committed after the transactions the test knows
			}
			xid, ok := xidOf[uint64(m.Pos.CommitLSN)]
			if !ok {
				e.t.Fatalf("%s/%d@%d: position %s of no transaction with an END record", topic, m.Partition, m.Offset, m.Pos)
			}
			v.changes[xid]++
			require(xid, topic, m.Partition, m.Offset)
		}
	}
	return v
}

// lacks says why Kafka, with the given end offsets, did not hold tt wholly
// ("" when it did).
func (v heldView) lacks(tt truthTxn, ends map[string][]int64) string {
	need, ok := v.need[tt.xid]
	if !ok {
		return "no END record at all"
	}
	if v.changes[tt.xid] != tt.changes {
		return fmt.Sprintf("%d of %d changes ever published", v.changes[tt.xid], tt.changes)
	}
	for topic, n := range need {
		for p, off := range n {
			if ends[topic][p] < off {
				return fmt.Sprintf("%s/%d held offsets below %d, the transaction has a record at offset %d", topic, p, ends[topic][p], off-1)
			}
		}
	}
	return ""
}

func writeConfig(t *testing.T, cfg *config.Config) string {
	t.Helper()
	return writeConfigWith(t, cfg, "pipeline:\n  max_batch_messages: 500\nhttp:\n  listen: \"\"\nlog:\n  level: warn\n")
}

// writeConfigWith writes cfg's postgres and kafka essentials, then tail
// (more sections, as YAML), to a file and returns its path.
func writeConfigWith(t *testing.T, cfg *config.Config, tail string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "postgres:\n  dsn: %q\n  slot: %s\n  publication: %s\n  standby_interval: 1s\n  snapshot: %s\n  tables:\n", cfg.Postgres.DSN, cfg.Postgres.Slot, cfg.Postgres.Publication, cfg.Postgres.Snapshot)
	for _, tb := range cfg.Postgres.Tables {
		fmt.Fprintf(&b, "    - %s\n", tb)
	}
	fmt.Fprintf(&b, "kafka:\n  brokers: [%q]\n  topic_prefix: %s\n  partitions: %d\n", cfg.Kafka.Brokers[0], cfg.Kafka.TopicPrefix, cfg.Kafka.Partitions)
	b.WriteString(tail)
	path := filepath.Join(t.TempDir(), "tidemark.yml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// binaryUnderWorkload prepares the canonical schema, a config with topic
// prefix prefix and its publication and slot (as the first run would, so a
// truth slot created next starts together with Tidemark's), the truth slot
// and the seed; start runs `tidemark run` on that config (output to the
// returned buffer).
func (e *env) binaryUnderWorkload(prefix string) (cfg *config.Config, tr *truth, start func() (*exec.Cmd, *bytes.Buffer)) {
	t := e.t
	t.Helper()
	e.exec(demo.Schema)
	cfg = e.config(prefix, demo.Tables, nil)
	path := writeConfig(t, cfg)
	bin := binary(t)
	if _, err := app.Prepare(context.Background(), cfg, nil); err != nil {
		t.Fatal(err)
	}
	tr = e.newTruth("truth_" + prefix)
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	return cfg, tr, func() (*exec.Cmd, *bytes.Buffer) {
		cmd := exec.Command(bin, "run", "--config", path)
		var out bytes.Buffer
		cmd.Stderr, cmd.Stdout = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, &out
	}
}

// TestCrashNoLoss kills `tidemark run` with SIGKILL several times while a
// workload commits, restarting it each time. After each kill the slot's
// confirmed position covers only transactions that are wholly in Kafka;
// at the end every committed change is in Kafka, in per-key order.
func TestCrashNoLoss(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the binary; skipped in -short")
	}
	e := newEnv(t, "")
	cfg, tr, start := e.binaryUnderWorkload("crash")
	stop := e.workload(300)
	var confirmed []pipeline.LSN
	for i := 0; i < 4; i++ {
		cmd, stderr := start()
		time.Sleep(time.Duration(1500+rand.IntN(1000)) * time.Millisecond)
		kill(t, cmd)
		c := e.slotConfirmed(cfg.Postgres.Slot)
		confirmed = append(confirmed, c)
		view := e.kafkaView("crash", canonicalTopics)
		if miss := view.missing(tr.txns(), c); len(miss) > 0 {
			t.Fatalf("kill %d: slot confirmed %s, but Kafka lacks %d transactions at or below it, e.g. %v\nlog:\n%s",
				i, c, len(miss), miss[:min(3, len(miss))], stderr)
		}
	}
	counts := stop()
	if confirmed[len(confirmed)-1] <= confirmed[0] {
		t.Errorf("slot never advanced across runs: %v", confirmed)
	}

	// A final run drains the rest, then stops gracefully.
	cmd, stderr := start()
	end := e.currentLSN()
	deadline := time.Now().Add(60 * time.Second)
	for e.slotConfirmed(cfg.Postgres.Slot) < end {
		if time.Now().After(deadline) {
			kill(t, cmd)
			t.Fatalf("final run did not catch up to %s\nlog:\n%s", end, stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("graceful stop: %v\nlog:\n%s", err, stderr)
	}
	txns := tr.txns()
	view := e.kafkaView("crash", canonicalTopics)
	if miss := view.missing(txns, 0); len(miss) > 0 {
		t.Fatalf("after the final run Kafka lacks %d of %d transactions, e.g. %v", len(miss), len(txns), miss[:min(3, len(miss))])
	}
	for _, topic := range canonicalTopics {
		e.checkKeyOrder("crash."+topic, e.read("crash."+topic), true)
	}
	if int64(len(txns)) < counts.Transactions.Load() {
		t.Errorf("server saw %d transactions, workload committed %d", len(txns), counts.Transactions.Load())
	}
	t.Logf("%d transactions committed across 4 kills; confirmed positions %v", len(txns), confirmed)
}

// TestKafkaOutage: with the broker down, the slot stops advancing and
// in-flight memory stays within its bound; when the broker returns,
// everything arrives, in per-key order.
func TestKafkaOutage(t *testing.T) {
	e := newEnv(t, t.TempDir())
	e.exec(demo.Schema)
	cfg := e.config("outage", demo.Tables, func(c *config.Config) {
		c.Pipeline.MaxInFlightMessages = 300
		c.Pipeline.MaxBatchMessages = 100
	})
	tr := e.newTruth("truth_outage")
	r := e.start(cfg)
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	stop := e.workload(300)
	time.Sleep(time.Second)

	var maxInFlight int64
	sctx, stopSampling := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for sctx.Err() == nil {
			if n := r.Pipeline.Stats().InFlight.Load(); n > maxInFlight {
				maxInFlight = n
			}
			time.Sleep(time.Millisecond)
		}
	}()

	e.kafka.Stop()
	// Acknowledgements of writes that completed before the stop settle: the
	// pipeline's acknowledged LSN stops moving and the slot reaches it. The
	// slot may be past it only by WAL without a captured transaction (the
	// server's WAL end, confirmed when everything received had been
	// acknowledged just before the stop).
	acked := r.Pipeline.Stats().AckedLSN.Load()
	slot := e.slotConfirmed(cfg.Postgres.Slot)
	for since, deadline := time.Now(), time.Now().Add(20*time.Second); ; time.Sleep(10 * time.Millisecond) {
		a, sl := r.Pipeline.Stats().AckedLSN.Load(), e.slotConfirmed(cfg.Postgres.Slot)
		if a != acked || sl != slot {
			acked, slot, since = a, sl, time.Now()
		}
		if time.Since(since) >= 500*time.Millisecond && slot >= pipeline.LSN(acked) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("acknowledgements did not settle within 20s of the broker stop (acked %s, slot %s)", pipeline.LSN(acked), slot)
		}
	}
	for _, tt := range tr.txns() {
		if tt.end > pipeline.LSN(acked) && tt.end <= slot {
			t.Fatalf("the slot confirmed %s during the outage, past transaction %d (end %s) that was not acknowledged (acked %s)", slot, tt.xid, tt.end, pipeline.LSN(acked))
		}
	}
	c0 := e.slotConfirmed(cfg.Postgres.Slot)
	changes0 := r.Pipeline.Stats().Changes.Load()
	time.Sleep(7 * time.Second) // longer than the test server's wal_sender_timeout
	c1 := e.slotConfirmed(cfg.Postgres.Slot)
	changes1 := r.Pipeline.Stats().Changes.Load()
	if c1 != c0 {
		t.Errorf("slot advanced from %s to %s while Kafka was down", c0, c1)
	}
	// The reader is blocked by backpressure: it takes in at most the
	// in-flight bound plus the capture buffer, while the workload keeps
	// committing about 2,000 transactions.
	if d := changes1 - changes0; d > 300+1024 {
		t.Errorf("pipeline accepted %d changes while Kafka was down; backpressure bound is 300 (+1024 buffered)", d)
	}
	if err := e.kafka.Restart(); err != nil {
		t.Fatalf("restarting kafka: %v", err)
	}
	counts := stop()
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 90*time.Second)
	stopSampling()
	wg.Wait()
	// The throwaway server's wal_sender_timeout is 5s: had capture stopped
	// answering keepalives while blocked, Postgres would have dropped it.
	if n := r.Stream.Stats().Reconnects.Load(); n != 0 && os.Getenv(pgserver.EnvTestDSN) == "" {
		t.Errorf("replication connection was dropped %d times during the outage", n)
	}
	if maxInFlight > 300 {
		t.Errorf("in-flight messages reached %d, bound is 300", maxInFlight)
	}
	txns := tr.txns()
	view := e.kafkaView("outage", canonicalTopics)
	if miss := view.missing(txns, 0); len(miss) > 0 {
		t.Fatalf("after the outage Kafka lacks %d of %d transactions, e.g. %v", len(miss), len(txns), miss[:min(3, len(miss))])
	}
	for _, topic := range canonicalTopics {
		e.checkKeyOrder("outage."+topic, e.read("outage."+topic), true)
	}
	t.Logf("%d transactions (%d during the run), max in flight %d, slot held at %s during the outage", len(txns), counts.Transactions.Load(), maxInFlight, c0)
}

// TestNoConfirmBeforeFirstAck: a freshly started capture whose first
// transaction is not yet durable (Kafka is down) must not confirm it, even
// while it keeps answering keepalives. (pglogrepl turns a zero flush position
// into the write position; the stream must never rely on that.)
func TestNoConfirmBeforeFirstAck(t *testing.T) {
	e := newEnv(t, t.TempDir())
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	cfg := e.config("first", []string{"public.notes"}, nil)
	tr := e.newTruth("truth_first")
	r := e.start(cfg)
	deadline := time.Now().Add(15 * time.Second)
	for !r.Stream.Stats().Connected.Load() {
		if time.Now().After(deadline) {
			t.Fatal("capture did not connect")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.kafka.Stop()
	e.exec(`INSERT INTO notes VALUES (1, 'must not be confirmed before it is in Kafka')`)
	var txns []truthTxn
	for deadline := time.Now().Add(10 * time.Second); len(txns) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the insert never reached the WAL")
		}
		time.Sleep(20 * time.Millisecond)
		txns = tr.txns()
	}
	deadline = time.Now().Add(10 * time.Second)
	for r.Stream.Stats().ReceivedLSN.Load() < uint64(txns[0].end) {
		if time.Now().After(deadline) {
			t.Fatal("capture did not receive the transaction")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Three standby status messages go out meanwhile (standby_interval 1s).
	for sent, deadline := r.Stream.Stats().StatusUpdates.Load(), time.Now().Add(20*time.Second); r.Stream.Stats().StatusUpdates.Load() < sent+3; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("capture sent %d standby status messages in 20s, want 3", r.Stream.Stats().StatusUpdates.Load()-sent)
		}
	}
	if c := e.slotConfirmed(cfg.Postgres.Slot); c >= txns[0].end {
		t.Fatalf("slot confirmed %s, covering transaction %d (end %s) that Kafka never acknowledged", c, txns[0].xid, txns[0].end)
	}
	if err := e.kafka.Restart(); err != nil {
		t.Fatal(err)
	}
	e.waitSlot(cfg.Postgres.Slot, txns[0].end, 60*time.Second)
	if miss := e.kafkaView("first", []string{"public.notes"}).missing(txns, 0); len(miss) > 0 {
		t.Fatalf("Kafka lacks: %v", miss)
	}
}

// TestCleanStopConfirmsDurable stops `tidemark run` with SIGTERM while a
// workload commits, three times. Each stop drains the pipeline and sends a
// final standby status: the slot's confirmed position is then at least the
// end of the last transaction Kafka holds (nothing durable is left for the
// next start to replay) or past it only by WAL that holds no captured
// transaction, and never past a transaction Kafka lacks.
func TestCleanStopConfirmsDurable(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary; skipped in -short")
	}
	e := newEnv(t, "")
	cfg, tr, start := e.binaryUnderWorkload("stop")
	stop := e.workload(300)
	defer stop()
	for i := 0; i < 3; i++ {
		cmd, stderr := start()
		time.Sleep(time.Duration(1500+rand.IntN(1000)) * time.Millisecond)
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("stop %d: %v\nlog:\n%s", i, err, stderr.String())
		}
		c := e.slotConfirmed(cfg.Postgres.Slot)
		view := e.kafkaView("stop", canonicalTopics)
		if miss := view.missing(tr.txns(), c); len(miss) > 0 {
			t.Fatalf("stop %d: slot confirmed %s, but Kafka lacks %d transactions at or below it, e.g. %v", i, c, len(miss), miss[:min(3, len(miss))])
		}
		var last uint64
		for _, end := range view.ends {
			last = max(last, end.EndLSN)
		}
		if last == 0 {
			t.Fatalf("stop %d: no END record in Kafka after a run under load\nlog:\n%s", i, stderr.String())
		}
		// Past it only by WAL without a captured transaction (the server's
		// WAL end, confirmed when nothing is pending; missing checked that
		// no transaction up to c lacks its END).
		if c < pipeline.LSN(last) {
			t.Errorf("stop %d: slot confirmed %s after a clean stop; the last transaction in Kafka ends at %s (a restart replays what Kafka has)",
				i, c, pipeline.LSN(last))
		} else {
			t.Logf("stop %d: slot confirmed %s; the last transaction in Kafka ends at %s", i, c, pipeline.LSN(last))
		}
	}
}

// TestAckConfirmedPromptly: on a quiet stream, a transaction is confirmed
// to Postgres within tens of milliseconds of its acknowledgement (the
// receive loop is woken for it), not at the next read timeout or status
// tick. The median over 15 single transactions is compared, so one slow
// sample on a loaded machine does not decide.
func TestAckConfirmedPromptly(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	cfg := e.config("prompt", demo.Tables, nil)
	r := e.start(cfg)
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	var gaps []time.Duration
	for i := 0; i < 15; i++ {
		// Quiet: everything so far acknowledged and confirmed, and the
		// loop back to waiting on the connection.
		time.Sleep(300 * time.Millisecond)
		before := e.currentLSN()
		e.exec("INSERT INTO users (user_id) VALUES ($1)", fmt.Sprintf("@prompt%d:x", i))
		waitFor("the acknowledgement", func() bool { return pipeline.LSN(r.Pipeline.Stats().AckedLSN.Load()) > before })
		acked := time.Now()
		a := pipeline.LSN(r.Pipeline.Stats().AckedLSN.Load())
		waitFor("the confirmation", func() bool { return pipeline.LSN(r.Stream.Stats().ConfirmedLSN.Load()) >= a })
		gaps = append(gaps, time.Since(acked))
	}
	slices.Sort(gaps)
	med := gaps[len(gaps)/2]
	t.Logf("acknowledgement to confirmation: min %s, median %s, max %s", gaps[0], med, gaps[len(gaps)-1])
	if med > 100*time.Millisecond {
		t.Errorf("median acknowledgement-to-confirmation %s, want tens of milliseconds (all: %v)", med, gaps)
	}
}
