// Package e2e runs Tidemark end to end against a real Postgres (a throwaway
// cluster, or TIDEMARK_TEST_PG_DSN) and an in-process Kafka (kfake).
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/pipeline"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		_ = os.RemoveAll(binDir)
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
			StandbyInterval: time.Second},
		Kafka: config.Kafka{Brokers: e.kafka.Brokers(), TopicPrefix: prefix, Partitions: 3},
		HTTP:  config.HTTP{Listen: &noHTTP},
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
	log := zaptest.NewLogger(e.t, zaptest.Level(zap.WarnLevel))
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
	e.t.Cleanup(func() { r.stop(e.t) })
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
	var s *string
	if err := e.pool.QueryRow(context.Background(), "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&s); err != nil {
		e.t.Fatalf("reading slot %s: %v", slot, err)
	}
	if s == nil {
		return 0
	}
	l, _ := pipeline.ParseLSN(*s)
	return l
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
		LSN       uint64 `json:"lsn"`
		Sequence  string `json:"sequence"`
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

func (e *env) read(topic string) []msg {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), topic)
	if err != nil {
		e.t.Fatalf("reading %s: %v", topic, err)
	}
	out := make([]msg, 0, len(recs))
	for _, r := range recs {
		m := msg{Record: r}
		if err := json.Unmarshal(r.Value, &m.Env); err != nil {
			e.t.Fatalf("%s/%d@%d: value is not JSON: %v", topic, r.Partition, r.Offset, err)
		}
		lsn, err1 := strconv.ParseUint(r.Headers["tidemark-lsn"], 10, 64)
		seq, err2 := strconv.ParseUint(r.Headers["tidemark-seq"], 10, 32)
		if err1 == nil && err2 == nil {
			m.Pos = pipeline.Position{CommitLSN: pipeline.LSN(lsn), Seq: uint32(seq)}
		}
		out = append(out, m)
	}
	return out
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
	ms := e.read(topic)
	out := make([]txnRecord, len(ms))
	for i, m := range ms {
		if err := json.Unmarshal(m.Value, &out[i]); err != nil {
			e.t.Fatalf("transactions record: %v", err)
		}
	}
	return out
}

// checkKeyOrder asserts per-key order: within a partition, each key's
// positions increase with offsets. With allowReplay, a position may repeat
// (at-least-once redelivery after a restart: consumers skip positions at or
// below the last applied), but a position never seen before must not arrive
// after a later one.
func checkKeyOrder(t *testing.T, topic string, ms []msg, allowReplay bool) {
	t.Helper()
	sorted := byPartitionOffset(ms)
	last := map[string]pipeline.Position{}
	seen := map[string]map[pipeline.Position]bool{}
	parts := map[string]int{}
	for _, m := range sorted {
		k := string(m.Key) + "\x00" + m.Headers["tidemark-partition"]
		if p, ok := parts[k]; ok && p != m.Partition {
			t.Errorf("%s: key %s in partitions %d and %d", topic, m.Key, p, m.Partition)
		}
		parts[k] = m.Partition
		if seen[k] == nil {
			seen[k] = map[pipeline.Position]bool{}
		}
		prev, ok := last[k]
		switch {
		case !ok || prev.Less(m.Pos):
			last[k] = m.Pos
		case allowReplay && seen[k][m.Pos]:
			// redelivered
		default:
			t.Errorf("%s: key %s position %s arrived after %s (partition %d offset %d)", topic, m.Key, m.Pos, prev, m.Partition, m.Offset)
		}
		seen[k][m.Pos] = true
	}
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
