package capture

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/tidemark/tidemark/pipeline"
)

func receiverWith(t *testing.T, mod func(*Config)) *Stream {
	t.Helper()
	cfg := Config{DSN: "postgres://x", Slot: "s", Publication: "p"}
	mod(&cfg)
	s, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.rels = map[uint32]*pipeline.Relation{}
	s.skipRels = map[uint32]string{}
	s.typeNames = map[uint32]string{}
	s.statusTimer = time.NewTicker(time.Hour)
	t.Cleanup(s.statusTimer.Stop)
	return s
}

func insertOne(relid uint32, value string) []byte {
	return cat([]byte{'I'}, relBytes(relid), []byte{'N'}, tupleBytes(sp(value)))
}

// TestReceiveRefusesOversizedRow: a row message larger than MaxRowBytes is
// a terminal error naming the table and position, before it is decoded;
// nothing of it reaches the pipeline. A row within the bound passes.
func TestReceiveRefusesOversizedRow(t *testing.T) {
	s := receiverWith(t, func(c *Config) { c.MaxRowBytes = 100 })
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, beginBytes(0x3000, 77)))
	feed(t, s, xlogData(0x1200, insertOne(42, strings.Repeat("a", 50))))
	// The column is now an int4 that "bbb..." is not: had the oversized row
	// been decoded first, the error would be a DecodeError.
	s.rels[42].Columns[0].TypeOID = pgtype.Int4OID
	err := s.handleCopyData(context.Background(), nil, xlogData(0x1A2B0, insertOne(42, strings.Repeat("b", 200))))
	if !errors.Is(err, ErrTerminal) {
		t.Fatalf("err = %v, want ErrTerminal", err)
	}
	if strings.Contains(err.Error(), "decoding") {
		t.Fatalf("err = %v: the oversized row was decoded before it was refused", err)
	}
	for _, want := range []string{"public.items", "0/1A2B0", "more than the 100", "kafka.batch_bytes"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if evs := emitted(s); len(evs) != 2 {
		t.Errorf("emitted %d events, want the Begin and the small row", len(evs))
	}
}

// TestReceiveSkipsUnconfiguredTables: with Tables set, the changes of a
// relation that is none of them are counted by table and not emitted
// (truncates included); with UnknownTables stop its first change is a
// terminal error naming it, while its Relation message alone is not (under
// publish_via_partition_root Postgres describes partitions too).
func TestReceiveSkipsUnconfiguredTables(t *testing.T) {
	s := receiverWith(t, func(c *Config) { c.Tables = []string{"public.other"} })
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, beginBytes(0x3000, 77)))
	feed(t, s, xlogData(0x1200, insertOne(42, "x")))
	feed(t, s, xlogData(0x1300, truncateBytes(42)))
	if evs := emitted(s); len(evs) != 1 || evs[0].Kind != pipeline.EventBegin {
		t.Errorf("emitted %+v, want only the Begin", evs)
	}
	if got := s.Stats().Skipped(); len(got) != 1 || got["public.items"] != 2 {
		t.Errorf("skipped = %v, want public.items: 2", got)
	}

	s = receiverWith(t, func(c *Config) { c.Tables = []string{"public.other"}; c.UnknownTables = UnknownStop })
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, beginBytes(0x3000, 77)))
	err := s.handleCopyData(context.Background(), nil, xlogData(0x1200, insertOne(42, "x")))
	if !errors.Is(err, ErrTerminal) || !strings.Contains(err.Error(), "table public.items") || !strings.Contains(err.Error(), "postgres.tables") {
		t.Fatalf("err = %v, want a terminal error naming public.items", err)
	}
}

// TestHandOverBoundedByBytes: however many events the count bound allows,
// the rows waiting for the pipeline stay within BufferBytes (one batch more
// only when nothing else waits), and the stream goes on as the pipeline
// takes batches.
func TestHandOverBoundedByBytes(t *testing.T) {
	const limit, row = 4000, 500
	s := receiverWith(t, func(c *Config) { c.BufferBytes = limit; c.Buffer = 1 << 16 })
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, beginBytes(0x900000, 77)))
	const rows = 100
	fed := make(chan error, 1)
	var progress atomic.Int64
	go func() {
		for i := 0; i < rows; i++ {
			if err := s.handleCopyData(context.Background(), nil, xlogData(uint64(0x2000+i*0x1000), insertOne(42, strings.Repeat("v", row)))); err != nil {
				fed <- err
				return
			}
			progress.Add(1)
		}
		fed <- nil
	}()
	// Without a consumer the producer stops once the bound is reached.
	deadline := time.Now().Add(5 * time.Second)
	for last, since := progress.Load(), time.Now(); time.Since(since) < 300*time.Millisecond; time.Sleep(10 * time.Millisecond) {
		if n := progress.Load(); n != last {
			last, since = n, time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatal("the producer never stopped")
		}
	}
	if q := s.queued.Load(); q > limit+row+64 {
		t.Fatalf("%d bytes queued, bound %d (plus one batch)", q, limit)
	}
	if n := progress.Load(); n >= rows {
		t.Fatalf("all %d rows handed over without a consumer: the byte bound did not hold", n)
	}
	// A consumer takes batches; the producer finishes.
	var got int
	for got < rows {
		evs, err := s.NextBatch(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			if ev.Kind == pipeline.EventChange {
				got++
			}
		}
		if q := s.queued.Load(); q > limit+row+64 {
			t.Fatalf("%d bytes queued, bound %d (plus one batch)", q, limit)
		}
	}
	if err := <-fed; err != nil {
		t.Fatal(err)
	}
}

// TestHandOverUncountsDroppedBatch: a batch given up while waiting for the
// pipeline (the session ends) leaves no bytes counted behind, so the next
// session's batches are not held back by bytes nobody will release.
func TestHandOverUncountsDroppedBatch(t *testing.T) {
	s := receiverWith(t, func(c *Config) { c.BufferBytes = 1 << 20; c.Buffer = 2 * maxBatch })
	// Fill the channel (capacity 2 batches), then one more batch waits.
	for i := 0; i < cap(s.out); i++ {
		s.out <- handed{bytes: 10}
	}
	s.queued.Store(20)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.handOver(ctx, nil, handed{bytes: 1000}) }()
	for s.queued.Load() != 1020 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("handOver = %v", err)
	}
	if q := s.queued.Load(); q != 20 {
		t.Errorf("%d bytes counted after the batch was dropped, want 20 (the batches in the channel)", q)
	}
}

// TestReceiveNameMovesToNewTable: after a swap migration (the configured
// table renamed away, a new one created under its name), the name follows
// the new table; the old one's changes are skipped and counted, never
// published under the configured name beside the new table's.
func TestReceiveNameMovesToNewTable(t *testing.T) {
	s := receiverWith(t, func(c *Config) { c.Tables = []string{"public.items"} })
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, beginBytes(0x3000, 77)))
	feed(t, s, xlogData(0x1200, insertOne(42, "old table, before")))
	feed(t, s, xlogData(0x1300, relationBytes(43))) // the new public.items
	feed(t, s, xlogData(0x1400, insertOne(43, "new table")))
	feed(t, s, xlogData(0x1500, insertOne(42, "old table, after")))
	var rels []uint32
	for _, ev := range emitted(s) {
		if ev.Kind == pipeline.EventChange {
			rels = append(rels, ev.Change.Rel.OID)
		}
	}
	if len(rels) != 2 || rels[0] != 42 || rels[1] != 43 {
		t.Errorf("changes emitted for relations %v, want 42 (before the new table) then 43", rels)
	}
	if got := s.Stats().Skipped(); got["public.items (renamed, relation 42)"] != 1 {
		t.Errorf("skipped = %v, want the old table's later change", got)
	}
}
