package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// Large transactions (DESIGN.md §6: "a transaction larger than memory must
// not exhaust memory"). With pgoutput protocol v1 Postgres decodes a
// transaction only after it commits, spilling it to disk server-side
// (logical_decoding_work_mem), then streams its changes; Tidemark passes
// them through a pipeline bounded by max_inflight_messages/bytes and
// confirms the slot only at the transaction's END, once all of it is
// durable in Kafka (§1).

const bigTable = `CREATE TABLE big (id bigint PRIMARY KEY, room_id text, body text)`

// bigInsert inserts ids [from, from+n) into big in the caller's transaction.
const bigInsert = `INSERT INTO big SELECT g, 'room-' || (g % 1000), md5(g::text) || md5((g + 1)::text)
	FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) g`

// forceSpill makes Postgres spill every decoded transaction of the test's
// database to disk (64kB is logical_decoding_work_mem's minimum), so the big
// transactions here really are "larger than the decoder's memory". Database
// settings apply to walsenders connected to that database.
func (e *env) forceSpill() {
	e.t.Helper()
	var db string
	if err := e.pool.QueryRow(context.Background(), "SELECT current_database()").Scan(&db); err != nil {
		e.t.Fatal(err)
	}
	e.exec(`ALTER DATABASE ` + pgx.Identifier{db}.Sanitize() + ` SET logical_decoding_work_mem = '64kB'`)
}

// spilledTxns reads pg_stat_replication_slots.spill_txns for slot, waiting
// up to 10s for it to become positive (the cumulative statistics are
// reported asynchronously).
func (e *env) spilledTxns(slot string) int64 {
	e.t.Helper()
	var n int64
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := e.pool.QueryRow(context.Background(),
			`SELECT coalesce((SELECT spill_txns FROM pg_stat_replication_slots WHERE slot_name = $1), 0)`, slot).Scan(&n)
		if err != nil {
			e.t.Fatalf("reading pg_stat_replication_slots: %v", err)
		}
		if n > 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// commitBig commits one transaction inserting n rows from id from, and
// returns its xid (low 32 bits of txid_current()).
func (e *env) commitBig(from, n int) uint32 {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // no-op after Commit
	var xid int64
	if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&xid); err != nil {
		e.t.Fatal(err)
	}
	tag, err := tx.Exec(ctx, bigInsert, from, n)
	if err != nil {
		e.t.Fatalf("inserting %d rows: %v", n, err)
	}
	if tag.RowsAffected() != int64(n) {
		e.t.Fatalf("inserted %d rows, want %d", tag.RowsAffected(), n)
	}
	if err := tx.Commit(ctx); err != nil {
		e.t.Fatal(err)
	}
	return uint32(xid)
}

func findTxn(t *testing.T, txns []truthTxn, xid uint32) truthTxn {
	t.Helper()
	for _, tt := range txns {
		if tt.xid == xid {
			return tt
		}
	}
	t.Fatalf("the server's truth slot has no committed transaction %d (has %v)", xid, txns)
	return truthTxn{}
}

// readRaw reads every record of topic from brokers, its partitions in
// parallel, keeping keys, values and the position (from the headers; other
// headers are dropped and values are not decoded). kafkatest.ReadAll with
// env.read is too slow under -race for 10^5 records.
func readRaw(t *testing.T, brokers []string, topic string) []msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	transport := &kafkago.Transport{}
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second, Transport: transport}
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: []string{topic}})
	if err != nil || len(meta.Topics) != 1 || meta.Topics[0].Error != nil {
		t.Fatalf("metadata of %s: %v %+v", topic, err, meta)
	}
	parts := meta.Topics[0].Partitions
	out := make([][]msg, len(parts))
	errs := make([]error, len(parts))
	var wg sync.WaitGroup
	for i, p := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], errs[i] = readPartitionRaw(ctx, client, topic, p.ID)
		}()
	}
	wg.Wait()
	var all []msg
	for i := range parts {
		if errs[i] != nil {
			t.Fatalf("reading %s: %v", topic, errs[i])
		}
		all = append(all, out[i]...)
	}
	return all
}

func readPartitionRaw(ctx context.Context, client *kafkago.Client, topic string, part int) ([]msg, error) {
	offs, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: map[string][]kafkago.OffsetRequest{topic: {kafkago.LastOffsetOf(part)}}})
	if err != nil {
		return nil, err
	}
	var end int64 = -1
	for _, po := range offs.Topics[topic] {
		if po.Partition == part && po.Error == nil {
			end = po.LastOffset
		}
	}
	if end < 0 {
		return nil, fmt.Errorf("no end offset for %s/%d: %+v", topic, part, offs.Topics)
	}
	out := make([]msg, 0, end)
	var offset int64
	for offset < end {
		resp, err := client.Fetch(ctx, &kafkago.FetchRequest{Topic: topic, Partition: part, Offset: offset, MaxBytes: 32 << 20, MaxWait: 100 * time.Millisecond})
		if err != nil {
			return nil, err
		}
		if resp.Error != nil {
			return nil, resp.Error
		}
		n := 0
		for {
			r, err := resp.Records.ReadRecord()
			if err != nil {
				break
			}
			if r.Offset < offset {
				continue
			}
			m := msg{Record: kafkatest.Record{Topic: topic, Partition: part, Offset: r.Offset}}
			if m.Key, err = readBytes(r.Key); err != nil {
				return nil, err
			}
			if m.Value, err = readBytes(r.Value); err != nil {
				return nil, err
			}
			var lsn, seq uint64
			var err1, err2 error = errNoHeader, errNoHeader
			for _, h := range r.Headers {
				switch h.Key {
				case "tidemark-lsn":
					lsn, err1 = strconv.ParseUint(string(h.Value), 10, 64)
				case "tidemark-seq":
					seq, err2 = strconv.ParseUint(string(h.Value), 10, 32)
				}
			}
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("%s/%d@%d: position headers: %v, %v", topic, part, r.Offset, err1, err2)
			}
			m.Pos = pipeline.Position{CommitLSN: pipeline.LSN(lsn), Seq: uint32(seq)}
			out = append(out, m)
			offset = r.Offset + 1
			n++
		}
		if n == 0 {
			return nil, fmt.Errorf("fetch %s/%d@%d returned no records before end offset %d", topic, part, offset, end)
		}
	}
	return out, nil
}

var errNoHeader = errors.New("missing")

func readBytes(b kafkago.Bytes) ([]byte, error) {
	if b == nil {
		return nil, nil
	}
	defer b.Close()
	buf := make([]byte, b.Len())
	_, err := io.ReadFull(b, buf)
	return buf, err
}

func readTxnsAt(t *testing.T, brokers []string, topic string) []txnRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, brokers, topic)
	if err != nil {
		t.Fatalf("reading %s: %v", topic, err)
	}
	out := make([]txnRecord, len(recs))
	for i, r := range recs {
		if err := json.Unmarshal(r.Value, &out[i]); err != nil {
			t.Fatalf("%s@%d: %v", topic, r.Offset, err)
		}
	}
	return out
}

// checkBigTxn asserts that ms holds every change of a transaction of n
// changes committed at commitLSN: seqs 0..n-1, each key once per seq, and
// nothing from any other transaction. It returns the number of redelivered
// (duplicate) messages.
func checkBigTxn(t *testing.T, ms []msg, commitLSN pipeline.LSN, n int) (dups int) {
	t.Helper()
	seen := make([]bool, n)
	keyOf := make([]string, n)
	distinct := 0
	for _, m := range ms {
		if m.Pos.CommitLSN != commitLSN {
			t.Fatalf("message at %s/%d@%d has position %s, not in the transaction committed at %s",
				m.Topic, m.Partition, m.Offset, m.Pos, commitLSN)
		}
		s := int(m.Pos.Seq)
		if s >= n {
			t.Fatalf("seq %d out of range for a transaction of %d changes", s, n)
		}
		if seen[s] {
			dups++
			if keyOf[s] != string(m.Key) {
				t.Errorf("position %s delivered with keys %s and %s", m.Pos, keyOf[s], m.Key)
			}
			continue
		}
		seen[s] = true
		keyOf[s] = string(m.Key)
		distinct++
	}
	if distinct != n {
		var gaps []int
		for s, ok := range seen {
			if !ok && len(gaps) < 5 {
				gaps = append(gaps, s)
			}
		}
		t.Fatalf("Kafka holds %d distinct positions of the transaction, want %d (missing seqs e.g. %v)", distinct, n, gaps)
	}
	keys := make(map[string]struct{}, n)
	for _, k := range keyOf {
		keys[k] = struct{}{}
	}
	if len(keys) != n {
		t.Errorf("%d distinct keys among %d inserted rows", len(keys), n)
	}
	return dups
}

// checkEnd asserts the transactions topic holds exactly one BEGIN and one
// END (or, with replay, at least one; all equal) for xid, with the commit
// and end LSN and count the server reports.
func checkEnd(t *testing.T, txns []txnRecord, tt truthTxn, commitLSN pipeline.LSN, allowReplay bool) {
	t.Helper()
	begins, ends := 0, 0
	for _, r := range txns {
		if r.TxID != tt.xid {
			continue
		}
		if pipeline.LSN(r.LSN) != commitLSN {
			t.Errorf("%s record of xid %d has lsn %d, changes carry %d", r.Status, tt.xid, r.LSN, commitLSN)
		}
		switch r.Status {
		case "BEGIN":
			begins++
		case "END":
			ends++
			if r.EventCount == nil || *r.EventCount != tt.changes {
				t.Errorf("END of xid %d: event_count %v, want %d", tt.xid, r.EventCount, tt.changes)
			}
			if pipeline.LSN(r.EndLSN) != tt.end {
				t.Errorf("END of xid %d: end_lsn %d, server says %s", tt.xid, r.EndLSN, tt.end)
			}
			if len(r.DataCollections) != 1 || r.DataCollections[0].Name != "public.big" || r.DataCollections[0].Count != tt.changes {
				t.Errorf("END of xid %d: data_collections %+v, want public.big: %d", tt.xid, r.DataCollections, tt.changes)
			}
		}
	}
	if ends == 0 || begins == 0 {
		t.Fatalf("transactions topic has %d BEGIN and %d END records for xid %d", begins, ends, tt.xid)
	}
	if !allowReplay && (ends != 1 || begins != 1) {
		t.Errorf("transactions topic has %d BEGIN and %d END records for xid %d, want 1 each", begins, ends, tt.xid)
	}
}

// checkPartitionOrder asserts that within each partition, positions arrive in
// increasing order: every position not seen before in that partition is
// greater than all earlier ones. With allowReplay a position may repeat
// (redelivery after a restart); without, every message must exceed the one
// before it. This is stronger than per-key order when every key occurs once.
func checkPartitionOrder(t *testing.T, topic string, ms []msg, allowReplay bool) {
	t.Helper()
	sorted := byPartitionOffset(ms)
	type state struct {
		max  pipeline.Position
		any  bool
		seen map[pipeline.Position]bool
	}
	parts := map[int]*state{}
	errs := 0
	for _, m := range sorted {
		st := parts[m.Partition]
		if st == nil {
			st = &state{seen: map[pipeline.Position]bool{}}
			parts[m.Partition] = st
		}
		switch {
		case !st.any || st.max.Less(m.Pos):
			st.max, st.any = m.Pos, true
		case allowReplay && st.seen[m.Pos]:
		default:
			if errs++; errs <= 5 {
				t.Errorf("%s partition %d offset %d: position %s after %s", topic, m.Partition, m.Offset, m.Pos, st.max)
			}
		}
		st.seen[m.Pos] = true
	}
	if errs > 5 {
		t.Errorf("%s: %d order violations in all", topic, errs)
	}
}

// startDevKafka serves kfake from a child process, `tidemark dev-kafka`
// (built without the race detector, so it keeps up under -race), and
// returns its bootstrap addresses. In TestHugeTransactionBounded this also
// keeps kfake's in-memory copy of every record out of this process's Go
// heap, which then holds only Tidemark (and the test).
func startDevKafka(t *testing.T) []string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	// No auto-creation: topics exist only as Tidemark creates them.
	cmd := exec.Command(binary(t), "dev-kafka", "--listen", addr, "--default-partitions", "0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting dev-kafka: %v", err)
	}
	exited := make(chan struct{})
	var waitErr error
	t.Cleanup(func() {
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Errorf("stopping dev-kafka: %v (it had exited: %v)\n%s", err, waitErr, &stderr)
		}
		select {
		case <-exited:
			if waitErr != nil {
				t.Errorf("dev-kafka: %v\n%s", waitErr, &stderr)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("dev-kafka did not stop within 10s of SIGTERM; killing it")
			kill(t, cmd)
			<-exited
		}
	})
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		once := sync.OnceFunc(func() { close(ready) })
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				once()
			}
		}
		if _, err := io.Copy(io.Discard, stdout); err != nil && !errors.Is(err, os.ErrClosed) {
			waitErr = fmt.Errorf("reading its output: %w", err)
		}
		if err := cmd.Wait(); err != nil && waitErr == nil {
			waitErr = err
		}
		close(exited)
	}()
	select {
	case <-ready:
		return []string{addr}
	case <-exited:
		t.Fatalf("dev-kafka exited before serving:\n%s", stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("dev-kafka did not start within 30s:\n%s", stderr.String())
	}
	return nil
}

func waitConnected(t *testing.T, r *running) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !r.Stream.Stats().Connected.Load() {
		if time.Now().After(deadline) {
			t.Fatal("capture did not connect within 30s")
		}
		select {
		case <-r.done:
			t.Fatalf("app stopped: %v", r.err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestHugeTransactionBounded: one transaction of 200,000 inserts (spilled to
// disk by the server) streams through Tidemark with at most
// max_inflight_messages (1,000) in flight and a Go heap that stays far
// below the size of the transaction; the slot is not confirmed past the
// transaction before all of it is in Kafka; Kafka ends up with every change
// exactly once, in order, with a correct END record.
func TestHugeTransactionBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("200,000-row transaction; skipped in -short")
	}
	const rows = 200000
	const maxInFlight = 1000
	e := newEnv(t, "") // its in-process Kafka stays unused
	brokers := startDevKafka(t)
	e.exec(bigTable)
	e.forceSpill()
	cfg := e.config("huge", []string{"public.big"}, func(c *config.Config) {
		c.Kafka.Brokers = brokers
		c.Pipeline.MaxInFlightMessages = maxInFlight
		c.Pipeline.MaxBatchMessages = 200
	})
	if cfg.Pipeline.MaxInFlightMessages != maxInFlight || cfg.Pipeline.MaxBatchMessages != 200 {
		t.Fatalf("config defaults changed the limits: %+v", cfg.Pipeline)
	}
	tr := e.newTruth("truth_huge")
	r := e.start(cfg)
	waitConnected(t, r)
	stats := r.Pipeline.Stats()

	// Nothing else touches the captured table, and Postgres 15 skips empty
	// transactions, so from here the pipeline publishes the big
	// transaction's BEGIN, its changes and its END: p0+rows+2 messages.
	p0 := stats.Published.Load()
	total := p0 + rows + 2
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heap0 := ms.HeapInuse

	type slotSample struct {
		confirmed pipeline.LSN
		published uint64 // read after confirmed
	}
	var (
		mu              sync.Mutex
		maxInFlightSeen int64
		maxSize         int64
		maxHeap         uint64
		inflightSamples int
		heapSamples     int
		changesAtFirst  uint64 // changes received when the first change was durable
		firstSeen       bool
		slotSamples     []slotSample
		slotErr         error // what stopped the slot sampler early
	)
	sctx, stopSampling := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		var mst runtime.MemStats
		for i := 0; sctx.Err() == nil; i++ {
			n, sz := stats.InFlight.Load(), stats.InFlightSize.Load()
			pub := stats.Published.Load()
			ch := stats.Changes.Load()
			mu.Lock()
			inflightSamples++
			maxInFlightSeen = max(maxInFlightSeen, n)
			maxSize = max(maxSize, sz)
			if !firstSeen && pub >= p0+2 { // BEGIN and at least one change
				firstSeen, changesAtFirst = true, ch
			}
			mu.Unlock()
			if i%10 == 0 {
				runtime.ReadMemStats(&mst)
				mu.Lock()
				heapSamples++
				maxHeap = max(maxHeap, mst.HeapInuse)
				mu.Unlock()
			}
			time.Sleep(time.Millisecond)
		}
	}()
	go func() {
		defer wg.Done()
		for sctx.Err() == nil {
			c, err := e.readConfirmed(sctx, cfg.Postgres.Slot, false)
			if sctx.Err() != nil {
				return
			}
			if err != nil {
				slotErr = err
				return
			}
			pub := stats.Published.Load()
			mu.Lock()
			slotSamples = append(slotSamples, slotSample{c, pub})
			mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
	}()

	began := time.Now()
	xid := e.commitBig(1, rows)
	committed := time.Since(began)
	deadline := time.Now().Add(120 * time.Second)
	for stats.Published.Load() < total {
		if time.Now().After(deadline) {
			stopSampling()
			wg.Wait()
			t.Fatalf("after 120s the pipeline published %d of %d messages (changes received %d, in flight %d)",
				stats.Published.Load()-p0, rows+2, stats.Changes.Load(), stats.InFlight.Load())
		}
		select {
		case <-r.done:
			t.Fatalf("app stopped: %v", r.err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	drained := time.Since(began)
	stopSampling()
	wg.Wait()
	if slotErr != nil {
		t.Fatalf("sampling the slot: %v", slotErr)
	}

	txns := tr.txns()
	big := findTxn(t, txns, xid)
	if big.changes != rows {
		t.Fatalf("server decoded %d changes for xid %d, want %d", big.changes, xid, rows)
	}
	e.waitSlot(cfg.Postgres.Slot, big.end, 30*time.Second)
	if n := e.spilledTxns(cfg.Postgres.Slot); n == 0 {
		t.Errorf("the server did not spill the transaction to disk (spill_txns 0): the test does not exercise a transaction larger than logical_decoding_work_mem")
	}

	// Bounded memory.
	if inflightSamples < 100 || heapSamples < 10 {
		t.Fatalf("only %d in-flight and %d heap samples", inflightSamples, heapSamples)
	}
	if maxInFlightSeen > maxInFlight {
		t.Errorf("in-flight messages reached %d, bound is %d", maxInFlightSeen, maxInFlight)
	}
	if maxInFlightSeen == 0 {
		t.Errorf("never saw a message in flight: the sampler did not observe the drain")
	}
	if !firstSeen || changesAtFirst >= rows {
		t.Errorf("the first change became durable only after capture had received %d of %d changes: the transaction was buffered whole", changesAtFirst, rows)
	}

	// Kafka holds the transaction exactly once, in order.
	topic := "huge.public.big"
	msgs := readRaw(t, brokers, topic)
	if len(msgs) == 0 {
		t.Fatalf("%s is empty", topic)
	}
	commitLSN := msgs[0].Pos.CommitLSN
	if commitLSN >= big.end {
		t.Fatalf("changes carry commit LSN %s, not below the commit's end %s", commitLSN, big.end)
	}
	if dups := checkBigTxn(t, msgs, commitLSN, rows); dups != 0 {
		t.Errorf("%d duplicate messages without any restart", dups)
	}
	var txBytes int64
	for _, m := range msgs {
		txBytes += int64(len(m.Key) + len(m.Value))
	}
	checkEnd(t, readTxnsAt(t, brokers, "huge.transaction"), big, commitLSN, false)
	checkKeyOrderAt(t, brokers, topic, msgs, false)
	checkPartitionOrder(t, topic, msgs, false)

	// The slot never covered the transaction before all of it was in Kafka.
	// Published is read after confirmed_flush_lsn, and the pipeline counts a
	// batch as published before it acknowledges it, so a sample with
	// published < total was taken before the END was acknowledged. Such a
	// sample must be at or below the commit record's start (the commit LSN,
	// BEGIN's final_lsn), not merely below its end: Postgres skips, on
	// restart, every transaction whose commit record starts before
	// confirmed_flush_lsn.
	checked := 0
	for _, s := range slotSamples {
		if s.published >= total {
			continue
		}
		checked++
		if s.confirmed > commitLSN {
			t.Errorf("slot confirmed %s (past the transaction's commit %s, end %s) while only %d of its %d messages were durable",
				s.confirmed, commitLSN, big.end, s.published-p0, rows+2)
		}
	}
	if checked < 5 {
		t.Errorf("only %d slot samples taken during the drain", checked)
	}

	// One envelope, fully decoded, to make sure these are the rows.
	var env envelope
	if err := json.Unmarshal(msgs[len(msgs)-1].Value, &env); err != nil {
		t.Fatal(err)
	}
	if env.Op != "c" || env.Source.TxID != xid || env.Source.Table != "big" || pipeline.LSN(env.Source.CommitLSN) != commitLSN {
		t.Errorf("last envelope: op %q txId %d table %q lsn %d", env.Op, env.Source.TxID, env.Source.Table, env.Source.CommitLSN)
	}

	// Heap. Kafka runs in a child process, so this process's heap is
	// Tidemark's (plus the test's pool and an idle in-process kfake, both
	// already in heap0). Holding the transaction whole would need at least
	// its encoded keys and values (txBytes, about 90 MB) live at once, plus
	// per-message structs, headers and decoded tuples: well over 150 MB.
	// With 1,000 messages (~0.6 MB) in flight and 1,024 events buffered by
	// capture, Tidemark's live data is a few MB; GC lets the heap reach
	// about twice the live size, and kafka-go's and pgx's buffers add a few
	// MB more (observed growth: 3-7 MB, with and without -race). 32 MB
	// above the baseline is a generous bound that still fails if a third
	// of the transaction's bytes were retained.
	const heapBound = 32 << 20
	growth := int64(maxHeap) - int64(heap0)
	if growth > heapBound {
		t.Errorf("Go heap in use grew by %d MB during the drain (from %d MB to %d MB); bound %d MB, the transaction's keys and values alone are %d MB",
			growth>>20, heap0>>20, maxHeap>>20, heapBound>>20, txBytes>>20)
	}
	if txBytes < 2*heapBound {
		t.Errorf("the transaction's messages total only %d MB: too small to tell a bounded pipeline from one holding it whole", txBytes>>20)
	}
	t.Logf("%d rows: insert+commit %s, drained in %s; max in flight %d (%d KB), heap in use %d MB -> max %d MB (+%d MB) vs %d MB of messages; first durable change after %d received; %d of %d slot samples during the drain",
		rows, committed.Round(time.Millisecond), drained.Round(time.Millisecond), maxInFlightSeen, maxSize>>10, heap0>>20, maxHeap>>20, growth>>20, txBytes>>20, changesAtFirst, checked, len(slotSamples))
}

// TestAbortedHugeTransactionPublishesNothing: a 100,000-row transaction that
// rolls back (while another transaction commits in the middle of it), and a
// 50,000-row subtransaction rolled back inside a transaction that commits,
// publish nothing: the table topic holds only the committed rows, the
// transactions topic has no BEGIN or END for the aborted xid, the committed
// transaction's END counts only its surviving rows, and the pipeline never
// received a rolled-back change.
func TestAbortedHugeTransactionPublishesNothing(t *testing.T) {
	const rows = 100000
	e := newEnv(t, "")
	e.exec(bigTable)
	e.forceSpill()
	cfg := e.config("abort", []string{"public.big"}, nil)
	tr := e.newTruth("truth_abort")
	r := e.start(cfg)
	waitConnected(t, r)
	ctx := context.Background()

	// Rolled-back ids are <= 1,000,000; committed ones above.
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var abortedXid int64
	if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&abortedXid); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, bigInsert, 1, rows); err != nil {
		t.Fatal(err)
	}
	during := e.commitBig(1_000_001, 3) // commits while the big one is open
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	// A committed transaction whose big middle part is rolled back to a
	// savepoint: 2 + 1 rows survive.
	tx, err = e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var withSavepoint int64
	if err := tx.QueryRow(ctx, "SELECT txid_current()").Scan(&withSavepoint); err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		sql  string
		args []any
	}{
		{bigInsert, []any{2_000_001, 2}},
		{"SAVEPOINT s", nil},
		{bigInsert, []any{rows + 1, rows / 2}},
		{"ROLLBACK TO SAVEPOINT s", nil},
		{bigInsert, []any{2_000_003, 1}},
	} {
		if _, err := tx.Exec(ctx, step.sql, step.args...); err != nil {
			t.Fatalf("%s: %v", firstLine(step.sql), err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	after := e.commitBig(3_000_001, 3)
	const committedRows = 3 + 3 + 3

	target := e.currentLSN()
	deadline := time.Now().Add(60 * time.Second)
	for c := e.slotConfirmed(cfg.Postgres.Slot); c < target; c = e.slotConfirmed(cfg.Postgres.Slot) {
		if time.Now().After(deadline) {
			t.Fatalf("slot confirmed %s, still below %s after 60s", c, target)
		}
		select {
		case <-r.done:
			t.Fatalf("app stopped: %v", r.err)
		case <-time.After(50 * time.Millisecond):
		}
	}

	txns := tr.txns()
	if len(txns) != 3 {
		t.Fatalf("server committed %d transactions with changes, want 3: %+v", len(txns), txns)
	}
	committed := map[uint32]truthTxn{}
	for _, x := range []uint32{during, uint32(withSavepoint), after} {
		committed[x] = findTxn(t, txns, x)
	}
	if n := committed[uint32(withSavepoint)].changes; n != 3 {
		t.Fatalf("server decoded %d changes for the savepoint transaction, want 3", n)
	}
	for _, tt := range txns {
		if tt.xid == uint32(abortedXid) {
			t.Fatalf("the truth slot shows the rolled-back transaction %d as committed", abortedXid)
		}
	}

	view := e.kafkaView("abort", []string{"public.big"})
	if miss := view.missing(txns, 0); len(miss) > 0 {
		t.Fatalf("Kafka lacks committed transactions, or holds more of them than committed: %v", miss)
	}
	msgs := e.read("abort.public.big")
	commitLSNs := map[pipeline.LSN]bool{}
	for _, end := range view.ends {
		commitLSNs[pipeline.LSN(end.LSN)] = true
	}
	for _, m := range msgs {
		var id int64
		if err := json.Unmarshal(m.Env.After["id"], &id); err != nil {
			t.Fatalf("%s/%d@%d: id %s: %v", m.Topic, m.Partition, m.Offset, m.Env.After["id"], err)
		}
		if !commitLSNs[m.Pos.CommitLSN] || id <= 1_000_000 {
			t.Errorf("table topic holds a change not from the committed rows: position %s, id %d, txId %d", m.Pos, id, m.Env.Source.TxID)
		}
	}
	if len(msgs) != committedRows {
		t.Errorf("table topic holds %d messages, want the %d committed rows", len(msgs), committedRows)
	}
	recs := e.readTxns("abort.transaction")
	for _, rec := range recs {
		if rec.TxID == uint32(abortedXid) {
			t.Errorf("transactions topic has a %s record for the rolled-back xid %d", rec.Status, abortedXid)
		}
		if _, ok := committed[rec.TxID]; !ok {
			t.Errorf("transactions topic has a %s record for xid %d, which committed no change", rec.Status, rec.TxID)
		}
	}
	if len(recs) != 2*len(committed) {
		t.Errorf("transactions topic has %d records, want BEGIN and END of %d transactions", len(recs), len(committed))
	}
	if n := e.spilledTxns(cfg.Postgres.Slot); n == 0 {
		t.Errorf("the server did not spill the rolled-back changes to disk (spill_txns 0)")
	}
	if n := r.Pipeline.Stats().Changes.Load(); n != committedRows {
		t.Errorf("pipeline received %d changes, want the %d committed ones", n, committedRows)
	}
	e.checkKeyOrder("abort.public.big", msgs, false)
	t.Logf("rolled back xid %d (%d rows) and a %d-row subtransaction of xid %d; published xids %v: %d messages, %d transaction records",
		abortedXid, rows, rows/2, withSavepoint, []uint32{during, uint32(withSavepoint), after}, len(msgs), len(recs))
}

// writeBigConfig is writeConfig with a small in-flight bound, so that the
// drain of a big transaction takes long enough to interrupt.
func writeBigConfig(t *testing.T, cfg *config.Config, maxInFlight, maxBatch int) string {
	t.Helper()
	path := writeConfigWith(t, cfg, fmt.Sprintf("pipeline:\n  max_inflight_messages: %d\n  max_batch_messages: %d\nhttp:\n  listen: \"\"\nlog:\n  level: warn\n", maxInFlight, maxBatch))
	loaded, err := config.Load(path)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	if loaded.Pipeline.MaxInFlightMessages != maxInFlight || loaded.Pipeline.MaxBatchMessages != maxBatch {
		t.Fatalf("config file not applied: %+v", loaded.Pipeline)
	}
	return path
}

// settledEndOffsets is endOffsets once it has not changed for half a second.
func settledEndOffsets(t *testing.T, ctx context.Context, client *kafkago.Client, topic string, parts int) int64 {
	t.Helper()
	last, since := endOffsets(ctx, client, topic, parts), time.Now()
	for deadline := time.Now().Add(30 * time.Second); time.Since(since) < 500*time.Millisecond; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("end offsets of %s still moving after 30s (%d)", topic, last)
		}
		if n := endOffsets(ctx, client, topic, parts); n != last {
			last, since = n, time.Now()
		}
	}
	return last
}

// endOffsets returns the sum of the end offsets of topic's partitions (0
// while the topic cannot be read, e.g. before it exists: callers poll).
func endOffsets(ctx context.Context, client *kafkago.Client, topic string, parts int) int64 {
	ends, err := kafkatest.EndOffsets(ctx, client, map[string]int{topic: parts})
	if err != nil {
		return 0
	}
	var sum int64
	for _, n := range ends[topic] {
		sum += n
	}
	return sum
}

// TestCrashDuringHugeTransaction kills `tidemark run` (SIGKILL) while it is
// in the middle of publishing a 300,000-row transaction. The slot must still
// be below the transaction's end; a restart publishes the transaction again
// from its start, so that Kafka holds all of it (the first part twice,
// which consumers skip by position), with its END, in per-key and
// per-partition order.
func TestCrashDuringHugeTransaction(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the binary; skipped in -short")
	}
	const rows = 300000
	e := newEnv(t, "") // its in-process Kafka stays unused
	brokers := startDevKafka(t)
	e.exec(bigTable)
	e.forceSpill()
	cfg := e.config("crashbig", []string{"public.big"}, func(c *config.Config) { c.Kafka.Brokers = brokers })
	path := writeBigConfig(t, cfg, 1000, 200)
	bin := binary(t)
	if _, err := app.Prepare(context.Background(), cfg, nil); err != nil {
		t.Fatal(err)
	}
	tr := e.newTruth("truth_crashbig")
	xid := e.commitBig(1, rows)
	committedAt := e.currentLSN()

	start := func() (*exec.Cmd, *bytes.Buffer) {
		cmd := exec.Command(bin, "run", "--config", path)
		var out bytes.Buffer
		cmd.Stderr = &out
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, &out
	}
	topic := "crashbig.public.big"
	// A transport of its own: kafka-go's default transport, which
	// kafkatest.ReadAll uses, answers Metadata from a cache (refreshed every
	// 6s), so polling a topic before it exists through it would make ReadAll
	// report the topic unknown for a while.
	transport := &kafkago.Transport{}
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 5 * time.Second, Transport: transport}
	ctx := context.Background()

	// First run: kill it once a tenth of the transaction is in Kafka.
	cmd, out := start()
	began := time.Now()
	deadline := began.Add(60 * time.Second)
	for {
		if n := endOffsets(ctx, client, topic, cfg.Kafka.Partitions); n >= rows/10 {
			break
		}
		if time.Now().After(deadline) {
			kill(t, cmd)
			t.Fatalf("first run published fewer than %d messages in 60s\nlog:\n%s", rows/10, out)
		}
		time.Sleep(5 * time.Millisecond)
	}
	kill(t, cmd)
	firstRun := time.Since(began)
	// Produce requests the process sent before it died may still be
	// appended: the count at the kill is the count once it stops moving.
	atKill := settledEndOffsets(t, ctx, client, topic, cfg.Kafka.Partitions)
	confirmedAtKill := e.slotConfirmed(cfg.Postgres.Slot)
	if atKill >= rows {
		t.Fatalf("the whole transaction (%d messages) was in Kafka before the kill; make it bigger", atKill)
	}
	for _, rec := range readTxnsAt(t, brokers, "crashbig.transaction") {
		if rec.TxID == xid && rec.Status == "END" {
			t.Fatalf("END of xid %d published although only %d of %d changes were in Kafka", xid, atKill, rows)
		}
	}

	// Second run: catch up, then stop gracefully.
	cmd, out = start()
	deadline = time.Now().Add(90 * time.Second)
	for e.slotConfirmed(cfg.Postgres.Slot) < committedAt {
		if time.Now().After(deadline) {
			kill(t, cmd)
			t.Fatalf("second run did not catch up to %s in 90s\nlog:\n%s", committedAt, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("graceful stop: %v\nlog:\n%s", err, out)
	}

	txns := tr.txns()
	big := findTxn(t, txns, xid)
	if big.changes != rows {
		t.Fatalf("server decoded %d changes for xid %d, want %d", big.changes, xid, rows)
	}
	msgs := readRaw(t, brokers, topic)
	if len(msgs) == 0 {
		t.Fatalf("%s is empty", topic)
	}
	commitLSN := msgs[0].Pos.CommitLSN
	if commitLSN >= big.end {
		t.Fatalf("changes carry commit LSN %s, not below the commit's end %s", commitLSN, big.end)
	}
	// At or below the commit record's start, not merely below its end:
	// Postgres skips every transaction whose commit record starts before
	// confirmed_flush_lsn (see TestHugeTransactionBounded).
	if confirmedAtKill > commitLSN {
		t.Errorf("after the kill the slot had confirmed %s, past the commit %s (end %s) of a transaction only %d/%d in Kafka",
			confirmedAtKill, commitLSN, big.end, atKill, rows)
	}
	// Duplicates are allowed (at-least-once): the restart sends the
	// unacknowledged transaction again from its start.
	dups := checkBigTxn(t, msgs, commitLSN, rows)
	// Exactly the records in Kafka at the kill come again, with the same
	// positions: the restart republishes the transaction from its start,
	// once. More would be a restart that resent acknowledged data or a
	// retry that duplicated; fewer, records lost or renumbered.
	if int64(dups) != atKill || int64(len(msgs)) != rows+atKill {
		t.Errorf("%d records, %d of them redelivered positions; want %d + %d at the kill", len(msgs), dups, rows, atKill)
	}
	checkEnd(t, readTxnsAt(t, brokers, "crashbig.transaction"), big, commitLSN, true)
	checkKeyOrderAt(t, brokers, topic, msgs, true)
	checkPartitionOrder(t, topic, msgs, true)
	if n := e.spilledTxns(cfg.Postgres.Slot); n == 0 {
		t.Errorf("the server did not spill the transaction to disk (spill_txns 0)")
	}
	t.Logf("%d rows; killed after %s with %d messages in Kafka, slot at %s (txn commit %s, end %s); %d messages in the end, %d redelivered",
		rows, firstRun.Round(time.Millisecond), atKill, confirmedAtKill, commitLSN, big.end, len(msgs), dups)
}
