// Package e2e runs Tidemark end to end against a real Postgres (a throwaway
// cluster, or TIDEMARK_TEST_PG_DSN) and an in-process Kafka (kfake).
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/pipeline"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		if err := os.RemoveAll(binDir); err != nil {
			fmt.Fprintf(os.Stderr, "removing the test binary: %v\n", err)
		}
	}
	pgserver.StopShared()
	os.Exit(code)
}

// env is one database and one Kafka for a test.
type env struct {
	t     *testing.T
	dsn   string
	pool  *pgxpool.Pool
	kafka *kafkatest.Cluster
	// secure, when set, is how every client reaches kafka (TLS, SASL);
	// e.config puts it in the configs it returns.
	secure *secureKafka
	// external, when set, are the brokers of a Kafka outside the test
	// process (e.g. startDevKafka's) that the env's reads go to.
	external []string
}

// secureKafka is a TLS + SASL cluster's client side.
type secureKafka struct {
	caFile              string
	mechanism, user, pw string
	net                 kafkanet.Settings
	brokers             []string // by the name in the certificate
}

// transport returns a transport that reaches the env's Kafka (nil, the
// kafka-go default, when it is plaintext).
func (e *env) transport() kafkago.RoundTripper {
	if e.secure == nil {
		return nil
	}
	return e.secure.net.Transport("e2e", 0)
}

// brokers are the addresses clients dial.
func (e *env) brokers() []string {
	if e.external != nil {
		return e.external
	}
	if e.secure != nil {
		return e.secure.brokers
	}
	return e.kafka.Brokers()
}

func newEnv(t *testing.T, kafkaDataDir string) *env {
	t.Helper()
	dsn := pgserver.ForTest(t)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(pool.Close)
	kc, err := kafkatest.Start(kafkaDataDir)
	if err != nil {
		t.Fatalf("kafka: %v", err)
	}
	t.Cleanup(kc.Close)
	return &env{t: t, dsn: dsn, pool: pool, kafka: kc}
}

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.pool.Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatalf("exec %q: %v", firstLine(sql), err)
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + "..."
	}
	return s
}

// config returns a valid config for the env capturing tables.
func (e *env) config(prefix string, tables []string, mod func(*config.Config)) *config.Config {
	noHTTP := ""
	c := &config.Config{
		Postgres: config.Postgres{DSN: e.dsn, Slot: prefix + "_slot", Publication: prefix + "_pub", Tables: tables,
			StandbyInterval: time.Second,
			// The tests that existed before initial snapshots create their
			// tables' first rows before or after the start as they like;
			// the snapshot tests set initial.
			Snapshot: config.SnapshotNever},
		Kafka: config.Kafka{Brokers: e.brokers(), TopicPrefix: prefix, Partitions: 3},
		HTTP:  config.HTTP{Listen: &noHTTP},
	}
	if s := e.secure; s != nil {
		c.Kafka.TLS = &config.TLS{CAFile: s.caFile}
		c.Kafka.SASL = &config.SASL{Mechanism: s.mechanism, Username: s.user, Password: s.pw}
	}
	if mod != nil {
		mod(c)
	}
	c.ApplyDefaults()
	if ps := c.Validate(); len(ps) > 0 {
		e.t.Fatalf("test config invalid: %v", ps)
	}
	return c
}

// running is an App running in the test process.
type running struct {
	*app.App
	cancel context.CancelFunc
	done   chan struct{} // closed when Run returned; err holds its result
	err    error
}

func (e *env) start(cfg *config.Config) *running {
	e.t.Helper()
	return e.startWith(cfg, zaptest.NewLogger(e.t, zaptest.Level(zap.WarnLevel)))
}

// startWith is start logging to log.
func (e *env) startWith(cfg *config.Config, log *zap.Logger) *running {
	e.t.Helper()
	a, err := app.Prepare(context.Background(), cfg, log)
	if err != nil {
		e.t.Fatalf("prepare: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{App: a, cancel: cancel, done: make(chan struct{})}
	go func() {
		r.err = a.Run(ctx)
		close(r.done)
	}()
	e.t.Cleanup(func() {
		select {
		case <-r.done:
			return // ended by itself: the test judges r.err
		default:
		}
		if err := r.stop(e.t); err != nil && !errors.Is(err, context.Canceled) {
			e.t.Errorf("app: %v", err)
		}
	})
	return r
}

func (r *running) stop(t *testing.T) error {
	r.cancel()
	select {
	case <-r.done:
		return r.err
	case <-time.After(60 * time.Second):
		return fmt.Errorf("app did not stop within 60s")
	}
}

// currentLSN returns pg_current_wal_insert_lsn(): with synchronous_commit=off
// (the throwaway server), pg_current_wal_lsn() can lag behind commits.
func (e *env) currentLSN() pipeline.LSN {
	e.t.Helper()
	var s string
	if err := e.pool.QueryRow(context.Background(), "SELECT pg_current_wal_insert_lsn()::text").Scan(&s); err != nil {
		e.t.Fatal(err)
	}
	l, err := pipeline.ParseLSN(s)
	if err != nil {
		e.t.Fatal(err)
	}
	return l
}

// slotConfirmed reads confirmed_flush_lsn of slot.
func (e *env) slotConfirmed(slot string) pipeline.LSN {
	e.t.Helper()
	l, err := e.readConfirmed(context.Background(), slot, true)
	if err != nil {
		e.t.Fatal(err)
	}
	return l
}

// readConfirmed reads the slot's confirmed_flush_lsn (0 while it has none,
// when nullOK; an error otherwise). Safe from any goroutine.
func (e *env) readConfirmed(ctx context.Context, slot string, nullOK bool) (pipeline.LSN, error) {
	var s *string
	if err := e.pool.QueryRow(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&s); err != nil {
		return 0, fmt.Errorf("reading slot %s: %w", slot, err)
	}
	if s == nil {
		if nullOK {
			return 0, nil
		}
		return 0, fmt.Errorf("slot %s has no confirmed_flush_lsn", slot)
	}
	l, err := pipeline.ParseLSN(*s)
	if err != nil {
		return 0, fmt.Errorf("slot %s: confirmed_flush_lsn %q: %w", slot, *s, err)
	}
	return l, nil
}

// waitSlot waits until the slot's confirmed_flush_lsn reaches lsn.
func (e *env) waitSlot(slot string, lsn pipeline.LSN, timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c := e.slotConfirmed(slot)
		if c >= lsn {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("slot %s confirmed %s, still below %s after %s", slot, c, lsn, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// envelope is the decoded value of a change message.
type envelope struct {
	Before    map[string]json.RawMessage `json:"before"`
	After     map[string]json.RawMessage `json:"after"`
	Unchanged []string                   `json:"unchanged"`
	Op        string                     `json:"op"`
	TsMs      int64                      `json:"ts_ms"`
	Source    struct {
		Connector string `json:"connector"`
		Name      string `json:"name"`
		DB        string `json:"db"`
		Schema    string `json:"schema"`
		Table     string `json:"table"`
		TxID      uint32 `json:"txId"`
		LSN       uint64 `json:"lsn"` // the change's own LSN
		Sequence  string `json:"sequence"`
		CommitLSN uint64 `json:"commit_lsn"`
		TsMs      int64  `json:"ts_ms"`
		Snapshot  string `json:"snapshot"`
	} `json:"source"`
	Transaction struct {
		ID                  string `json:"id"`
		TotalOrder          int    `json:"total_order"`
		DataCollectionOrder int    `json:"data_collection_order"`
	} `json:"transaction"`
}

// msg is one record read back with its decoded envelope.
type msg struct {
	kafkatest.Record
	Env envelope
	Pos pipeline.Position
}

// read reads every change record of topic. Each must be an envelope
// carrying its position in the tidemark-lsn and tidemark-seq headers, and
// the headers must agree with the envelope's transaction block.
func (e *env) read(topic string) []msg {
	e.t.Helper()
	recs := e.readRaw(topic)
	out := make([]msg, 0, len(recs))
	lastIn := map[int]*msg{} // partition -> its last change record
	for _, r := range recs {
		at := fmt.Sprintf("%s/%d@%d", topic, r.Partition, r.Offset)
		if len(r.Value) == 0 {
			// A tombstone: it must follow its delete (same key and
			// position) in its partition; it is not a change.
			d := lastIn[r.Partition]
			pos, err := pipeline.ParsePositionHeaders(r.Headers["tidemark-lsn"], r.Headers["tidemark-seq"])
			if err != nil || d == nil || d.Env.Op != "d" || d.Pos != pos || !bytes.Equal(d.Key, r.Key) || d.Offset != r.Offset-1 {
				e.t.Fatalf("%s: a tombstone (key %s, headers %v, %v) that does not follow its delete", at, r.Key, r.Headers, err)
			}
			continue
		}
		m := msg{Record: r}
		if err := json.Unmarshal(r.Value, &m.Env); err != nil {
			e.t.Fatalf("%s: value is not JSON: %v", at, err)
		}
		pos, err := pipeline.ParsePositionHeaders(r.Headers["tidemark-lsn"], r.Headers["tidemark-seq"])
		if err != nil {
			e.t.Fatalf("%s: position headers: %v (headers %v)", at, err, r.Headers)
		}
		m.Pos = pos
		if want := fmt.Sprintf(":%d", pos.CommitLSN); !strings.HasSuffix(m.Env.Transaction.ID, want) || m.Env.Transaction.TotalOrder != int(pos.Seq)+1 {
			e.t.Fatalf("%s: headers say position %s, the envelope's transaction block says id %q total_order %d",
				at, pos, m.Env.Transaction.ID, m.Env.Transaction.TotalOrder)
		}
		if got := r.Headers["tidemark-op"]; got != m.Env.Op {
			e.t.Fatalf("%s: header tidemark-op %q, envelope op %q", at, got, m.Env.Op)
		}
		out = append(out, m)
		lastIn[r.Partition] = &out[len(out)-1]
	}
	return out
}

// readRaw reads every record of topic as it is.
func (e *env) readRaw(topic string) []kafkatest.Record {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAllVia(ctx, e.transport(), e.brokers(), topic)
	if err != nil {
		e.t.Fatalf("reading %s: %v", topic, err)
	}
	return recs
}

// txnRecord is a BEGIN or END record.
type txnRecord struct {
	Status          string `json:"status"`
	ID              string `json:"id"`
	TxID            uint32 `json:"txId"`
	LSN             uint64 `json:"lsn"`
	EndLSN          uint64 `json:"end_lsn"`
	EventCount      *int   `json:"event_count"`
	DataCollections []struct {
		Name  string `json:"data_collection"`
		Count int    `json:"event_count"`
	} `json:"data_collections"`
}

func (e *env) readTxns(topic string) []txnRecord {
	e.t.Helper()
	ms := e.readRaw(topic)
	out := make([]txnRecord, len(ms))
	for i, m := range ms {
		if err := json.Unmarshal(m.Value, &out[i]); err != nil {
			e.t.Fatalf("%s/%d@%d: transactions record: %v", topic, m.Partition, m.Offset, err)
		}
	}
	return out
}

// checkKeyOrder asserts per-key order: every key stays in one partition,
// and within it each key's positions increase with offsets. With
// allowReplay, a position may repeat (at-least-once redelivery after a
// restart: consumers skip positions at or below the last applied), but a
// position never seen before must not arrive after a later one.
//
// Truncates (op "t") concern every key, so they are broadcast: each must be
// in every partition of the topic, and within a partition it orders
// against every record, whatever its key: nothing new before it is newer,
// nothing new after it is older.
func (e *env) checkKeyOrder(topic string, ms []msg, allowReplay bool) {
	e.t.Helper()
	checkKeyOrderAt(e.t, e.kafka.Brokers(), topic, ms, allowReplay)
}

// checkKeyOrderAt is checkKeyOrder for a topic on the given brokers.
func checkKeyOrderAt(t *testing.T, brokers []string, topic string, ms []msg, allowReplay bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nparts, err := kafkatest.PartitionCount(ctx, brokers, topic)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range keyOrderProblems(topic, nparts, ms, allowReplay) {
		t.Error(p)
	}
}

// keyOrderProblems is checkKeyOrder's judgement of ms, one sentence per
// violation.
func keyOrderProblems(topic string, nparts int, ms []msg, allowReplay bool) []string {
	var out []string
	errorf := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	sorted := byPartitionOffset(ms)
	last := map[string]pipeline.Position{}
	seen := map[string]map[pipeline.Position]bool{}
	parts := map[string]int{}
	type partState struct {
		newest    pipeline.Position // newest position of any record
		barrier   pipeline.Position // newest truncate
		truncates map[pipeline.Position]bool
	}
	ps := map[int]*partState{}
	allTruncates := map[pipeline.Position]bool{}
	for _, m := range sorted {
		p := ps[m.Partition]
		if p == nil {
			p = &partState{truncates: map[pipeline.Position]bool{}}
			ps[m.Partition] = p
		}
		if m.Env.Op == "t" {
			if len(m.Key) != 0 {
				errorf("%s: truncate at %s has key %s (truncates are broadcast without a key)", topic, m.Pos, m.Key)
			}
			switch {
			case p.truncates[m.Pos]:
				if !allowReplay {
					errorf("%s: truncate at %s twice in partition %d (offset %d)", topic, m.Pos, m.Partition, m.Offset)
				}
			case !p.newest.Less(m.Pos) && p.newest != (pipeline.Position{}):
				errorf("%s: truncate at %s arrived after %s in partition %d (offset %d)", topic, m.Pos, p.newest, m.Partition, m.Offset)
			default:
				p.barrier, p.newest = m.Pos, m.Pos
			}
			p.truncates[m.Pos] = true
			allTruncates[m.Pos] = true
			continue
		}
		k := string(m.Key)
		if q, ok := parts[k]; ok && q != m.Partition {
			errorf("%s: key %s in partitions %d and %d", topic, m.Key, q, m.Partition)
		}
		parts[k] = m.Partition
		if seen[k] == nil {
			seen[k] = map[pipeline.Position]bool{}
		}
		prev, ok := last[k]
		switch {
		case allowReplay && seen[k][m.Pos]:
			// redelivered
		case ok && !prev.Less(m.Pos):
			errorf("%s: key %s position %s arrived after %s (partition %d offset %d)", topic, m.Key, m.Pos, prev, m.Partition, m.Offset)
		case !p.barrier.Less(m.Pos) && p.barrier != (pipeline.Position{}):
			errorf("%s: key %s position %s arrived after the truncate at %s (partition %d offset %d)", topic, m.Key, m.Pos, p.barrier, m.Partition, m.Offset)
		default:
			last[k] = m.Pos
			if p.newest.Less(m.Pos) {
				p.newest = m.Pos
			}
		}
		seen[k][m.Pos] = true
	}
	for pos := range allTruncates {
		for part := 0; part < nparts; part++ {
			if ps[part] == nil || !ps[part].truncates[pos] {
				errorf("%s: truncate at %s missing from partition %d of %d", topic, pos, part, nparts)
			}
		}
	}
	return out
}

var binDir string

// byPartitionOffset returns a copy of ms sorted by partition, then offset.
func byPartitionOffset(ms []msg) []msg {
	sorted := append([]msg(nil), ms...)
	sort.SliceStable(sorted, func(i, j int) bool {
		if sorted[i].Partition != sorted[j].Partition {
			return sorted[i].Partition < sorted[j].Partition
		}
		return sorted[i].Offset < sorted[j].Offset
	})
	return sorted
}

// runConsumer runs a consumer until the returned stop is called (or the
// test ends) and reports its error, or that it did not stop within 30 s.
func runConsumer(t testing.TB, name string, run func(context.Context) error) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s consumer: %v", name, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s consumer did not stop", name)
		}
	}
	t.Cleanup(stop)
	return stop
}

// syncBuffer is a bytes.Buffer safe to read while a child process writes
// to it (a test reporting a running binary's output on failure).
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
