package capture

import (
	"encoding/binary"
	"encoding/json"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/tidemark/tidemark/pipeline"
)

func commitBytes(commitLSN, endLSN uint64) []byte {
	b := []byte{'C', 0}
	b = binary.BigEndian.AppendUint64(b, commitLSN)
	b = binary.BigEndian.AppendUint64(b, endLSN)
	return binary.BigEndian.AppendUint64(b, 0)
}

func messageBytes(transactional bool, lsn uint64, prefix string, content []byte) []byte {
	b := []byte{'M', 0}
	if transactional {
		b[1] = 1
	}
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = append(b, prefix...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint32(b, uint32(len(content)))
	return append(b, content...)
}

func wmBytes(t *testing.T, w watermark) []byte {
	t.Helper()
	b, err := json.Marshal(w)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// chunkOf arms a chunk of relation 42 (public.items, key "id") holding
// rows with the given ids.
func chunkOf(b *ChunkBoard, id, n int64, ids ...string) *chunk {
	rel := &pipeline.Relation{OID: 42, Schema: "public", Table: "items", Columns: []pipeline.Column{{Name: "id", TypeOID: pgtype.TextOID, Key: true, Identity: true}}}
	c := &chunk{key: chunkKey{id, n}, rel: rel, cols: []string{"id"}, done: make(chan struct{}), first: true}
	b.arm(c)
	rows := make([]pipeline.Tuple, len(ids))
	for i, v := range ids {
		rows[i] = pipeline.Tuple{{Text: v, IsText: true}}
	}
	keys := make([][]string, len(ids))
	for i, v := range ids {
		keys[i] = []string{v}
	}
	b.setRows(c, rows, keys, int64(len(ids)))
	return c
}

// published returns the ids of the snapshot rows among evs.
func snapshotIDs(evs []pipeline.Event) []string {
	var out []string
	for _, ev := range evs {
		if ev.Kind == pipeline.EventChange && ev.Change.Op == pipeline.OpRead {
			out = append(out, ev.Change.After[0].Text)
		}
	}
	return out
}

// TestWatermarkDropsTouchedKeys: between the low and the high watermark,
// live changes of keys a and c (an update, and a delete of c in another
// transaction) touch them; the chunk [a b c d] is published at the high
// watermark as [b d], as changes of the high watermark's transaction, the
// first marked as the snapshot's first. A change after the high watermark
// touches nothing. Watermarks of another slot are ignored.
func TestWatermarkDropsTouchedKeys(t *testing.T) {
	board := NewChunkBoard("s")
	s := receiverWith(t, func(c *Config) { c.Chunks = board })
	c := chunkOf(board, 7, 1, "a", "b", "c", "d")
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, messageBytes(false, 0x1100, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 7, Chunk: 1, Kind: "low"}))))
	// Another slot's watermark for the same numbers: ignored.
	feed(t, s, xlogData(0x1150, messageBytes(false, 0x1150, WatermarkPrefix, wmBytes(t, watermark{Slot: "other", ID: 7, Chunk: 1, Kind: "high"}))))
	feed(t, s, xlogData(0x1200, beginBytes(0x1300, 80)))
	feed(t, s, xlogData(0x1210, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("a")))))
	feed(t, s, xlogData(0x1300, commitBytes(0x1300, 0x1310)))
	feed(t, s, xlogData(0x1400, beginBytes(0x1500, 81)))
	feed(t, s, xlogData(0x1410, cat([]byte{'D'}, relBytes(42), []byte{'K'}, tupleBytes(sp("c")))))
	feed(t, s, xlogData(0x1500, commitBytes(0x1500, 0x1510)))
	feed(t, s, xlogData(0x1600, beginBytes(0x1700, 82)))
	feed(t, s, xlogData(0x1610, messageBytes(true, 0x1610, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 7, Chunk: 1, Kind: "high"}))))
	feed(t, s, xlogData(0x1700, commitBytes(0x1700, 0x1710)))
	feed(t, s, xlogData(0x1800, beginBytes(0x1900, 83)))
	feed(t, s, xlogData(0x1810, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("b")))))
	feed(t, s, xlogData(0x1900, commitBytes(0x1900, 0x1910)))

	evs := emitted(s)
	if got := snapshotIDs(evs); !slices.Equal(got, []string{"b", "d"}) {
		t.Fatalf("published snapshot rows %v, want [b d]", got)
	}
	for _, ev := range evs {
		if ev.Kind == pipeline.EventChange && ev.Change.Op == pipeline.OpRead {
			if ev.Change.Rel != s.rels[42] {
				t.Errorf("snapshot row under the chunk's relation, not the stream's one of the same shape")
			}
			if ev.Txn.Xid != 82 || ev.Txn.CommitLSN != 0x1700 {
				t.Errorf("snapshot row in transaction %d at %s, want the high watermark's (82 at 0/1700)", ev.Txn.Xid, ev.Txn.CommitLSN)
			}
		}
	}
	var marks []pipeline.SnapshotMark
	for _, ev := range evs {
		if ev.Change.Op == pipeline.OpRead {
			marks = append(marks, ev.Change.Snapshot)
		}
	}
	if !slices.Equal(marks, []pipeline.SnapshotMark{pipeline.SnapshotIncrementalFirst, pipeline.SnapshotIncremental}) {
		t.Errorf("marks %v", marks)
	}
	select {
	case <-c.done:
	default:
		t.Fatal("the chunk's outcome was not recorded at the high watermark's commit")
	}
	if c.end.Load() != 0x1710 || c.published.Load() != 2 || c.dropped.Load() != 2 || c.retry.Load() {
		t.Errorf("outcome end %x, published %d, dropped %d, retry %v; want 1710, 2, 2, false", c.end.Load(), c.published.Load(), c.dropped.Load(), c.retry.Load())
	}
	if len(s.windows) != 0 {
		t.Errorf("%d windows open after the high watermark", len(s.windows))
	}
}

// TestWatermarkRetriesOnInvisibleCommit: a transaction (xid 90) streamed
// before the low watermark that the chunk's snapshot still saw in
// progress (its xip) means the chunk may lack its changes without their
// keys being recorded: nothing of the chunk is published and the runner
// is told to read it again. An xip of transactions that commit after the
// low watermark (or never reached the stream) publishes the chunk.
func TestWatermarkRetriesOnInvisibleCommit(t *testing.T) {
	for _, tt := range []struct {
		name  string
		xip   []uint32
		retry bool
	}{
		{"in progress, committed before the low watermark", []uint32{90}, true},
		{"in progress, committed between the watermarks", []uint32{91}, false},
		{"in progress, not streamed", []uint32{12345}, false},
		// Postgres leaves a transaction at or after xmax out of xip: 90
		// is invisible to a snapshot with xmax 90 and an empty xip.
		{"at or after xmax, committed before the low watermark", nil, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			xmax := uint32(93) // after every xid here
			if tt.xip == nil {
				xmax = 90
			}
			board := NewChunkBoard("s")
			s := receiverWith(t, func(c *Config) { c.Chunks = board })
			c := chunkOf(board, 1, 2, "a", "b")
			feed(t, s, xlogData(0x1000, relationBytes(42)))
			feed(t, s, xlogData(0x1100, beginBytes(0x1200, 90)))
			feed(t, s, xlogData(0x1200, commitBytes(0x1200, 0x1210)))
			feed(t, s, xlogData(0x1300, messageBytes(false, 0x1300, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 2, Kind: "low"}))))
			feed(t, s, xlogData(0x1400, beginBytes(0x1500, 91)))
			feed(t, s, xlogData(0x1500, commitBytes(0x1500, 0x1510)))
			feed(t, s, xlogData(0x1600, beginBytes(0x1700, 92)))
			feed(t, s, xlogData(0x1610, messageBytes(true, 0x1610, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 2, Kind: "high", Xip: tt.xip, Xmax: xmax}))))
			feed(t, s, xlogData(0x1700, commitBytes(0x1700, 0x1710)))
			got := snapshotIDs(emitted(s))
			if c.retry.Load() != tt.retry || (tt.retry && len(got) != 0) || (!tt.retry && len(got) != 2) {
				t.Errorf("retry %v, published %v; want retry %v", c.retry.Load(), got, tt.retry)
			}
			if c.end.Load() != 0x1710 {
				t.Errorf("end %x: the outcome must be recorded either way", c.end.Load())
			}
		})
	}
}

// TestWatermarkTruncateDropsChunk: a truncate of the table between the
// watermarks drops the whole chunk (every row it read is gone).
func TestWatermarkTruncateDropsChunk(t *testing.T) {
	board := NewChunkBoard("s")
	s := receiverWith(t, func(c *Config) { c.Chunks = board })
	c := chunkOf(board, 1, 3, "a", "b")
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, messageBytes(false, 0x1100, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 3, Kind: "low"}))))
	feed(t, s, xlogData(0x1200, beginBytes(0x1300, 80)))
	feed(t, s, xlogData(0x1210, truncateBytes(42)))
	feed(t, s, xlogData(0x1300, commitBytes(0x1300, 0x1310)))
	feed(t, s, xlogData(0x1600, beginBytes(0x1700, 82)))
	feed(t, s, xlogData(0x1610, messageBytes(true, 0x1610, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 3, Kind: "high"}))))
	feed(t, s, xlogData(0x1700, commitBytes(0x1700, 0x1710)))
	if got := snapshotIDs(emitted(s)); len(got) != 0 || c.dropped.Load() != 2 {
		t.Errorf("published %v, dropped %d after a truncate; want none, 2", got, c.dropped.Load())
	}
}

func TestParseSnapshot(t *testing.T) {
	for in, want := range map[string]struct {
		xip  []uint32
		xmax uint32
	}{
		"100:100:":                         {nil, 100},
		"100:105:101,103":                  {[]uint32{101, 103}, 105},
		"4294967396:4294967400:4294967397": {[]uint32{101}, 104},
	} {
		snap, err := parseSnapshot(in)
		xip, xmax := snap.xids32()
		if err != nil || !slices.Equal(xip, want.xip) || xmax != want.xmax {
			t.Errorf("parseSnapshot(%q) = %v, %d, %v; want %v, %d", in, xip, xmax, err, want.xip, want.xmax)
		}
	}
	if _, err := parseSnapshot("garbage"); err == nil {
		t.Error("garbage parsed")
	}
}

// TestCheckCondition: a where clause is one condition; quoted text may
// hold anything.
func TestCheckCondition(t *testing.T) {
	for _, ok := range []string{"", "room_id = '!r:x'", "a = 'it''s; fine (really'", `"odd;col" > 3`, "(a = 1 OR b = 2) AND c", "col$x = 1"} {
		if err := checkCondition(ok); err != nil {
			t.Errorf("checkCondition(%q) = %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"true; DROP TABLE t", "x = 1) OR (true", "(a", "a = 1 -- x", "a = 1 /* x */", "a = $$x$$", "a = 'open"} {
		if err := checkCondition(bad); err == nil {
			t.Errorf("checkCondition(%q) = nil, want an error", bad)
		}
	}
}

// TestTupleKeyDistinguishesArrays: the dedupe key of array values keeps
// element boundaries ({"a b"} is not {"a","b"}).
func TestTupleKeyDistinguishesArrays(t *testing.T) {
	a, _ := tupleKey(pipeline.Tuple{{Value: []any{"a b"}}}, []int{0})
	b, _ := tupleKey(pipeline.Tuple{{Value: []any{"a", "b"}}}, []int{0})
	if a == b {
		t.Errorf("both arrays key as %q", a)
	}
}

// TestWatermarkAbandonedWindowCloses: a chunk the runner gave up between
// its watermarks (its high watermark never comes) stops collecting keys
// at the next change of any table.
func TestWatermarkAbandonedWindowCloses(t *testing.T) {
	board := NewChunkBoard("s")
	s := receiverWith(t, func(c *Config) { c.Chunks = board })
	c := chunkOf(board, 1, 4, "a")
	feed(t, s, xlogData(0x1000, relationBytes(42)))
	feed(t, s, xlogData(0x1100, messageBytes(false, 0x1100, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 4, Kind: "low"}))))
	if len(s.windows) != 1 {
		t.Fatalf("%d windows after the low watermark", len(s.windows))
	}
	c.abandoned.Store(true)
	board.remove(c)
	feed(t, s, xlogData(0x1200, beginBytes(0x1300, 80)))
	feed(t, s, xlogData(0x1210, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("a")))))
	if len(s.windows) != 0 || len(c.touched) != 0 {
		t.Errorf("abandoned window: %d windows open, %d keys collected", len(s.windows), len(c.touched))
	}
}

func TestChunkColumns(t *testing.T) {
	pk := TableInfo{Schema: "public", Table: "t", PrimaryKey: []string{"id"}, IdentityColumns: []string{"id"}}
	if got := chunkColumns(pk); !slices.Equal(got, []string{"id"}) {
		t.Errorf("primary key: %v", got)
	}
	idx := TableInfo{Schema: "public", Table: "t", PrimaryKey: []string{"id"}, IdentityColumns: []string{"email"},
		Key: &KeyChoice{Columns: []string{"email"}, Source: "replica identity index"}}
	if got := chunkColumns(idx); !slices.Equal(got, []string{"email"}) {
		t.Errorf("primary key outside the identity, identity index: %v", got)
	}
	whole := TableInfo{Schema: "public", Table: "t", IdentityColumns: []string{"a", "b"}, Key: &KeyChoice{Columns: []string{"a", "b"}, Source: "whole row"}}
	if got := chunkColumns(whole); got != nil {
		t.Errorf("keyed by the whole row: %v, want none", got)
	}
	cfgKey := TableInfo{Schema: "public", Table: "t", IdentityColumns: []string{"a", "b"}, Key: &KeyChoice{Columns: []string{"a"}, Source: "postgres.key_columns"}}
	if got := chunkColumns(cfgKey); got != nil {
		t.Errorf("a configured (maybe not unique) key without a primary key: %v, want none", got)
	}
}

// relationWithBody is a Relation message for relid: public.items with a
// key column "id" and a text column "body".
func relationWithBody(relid uint32) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'R'}, relid)
	b = append(b, "public\x00items\x00"...)
	b = append(b, 'd')
	b = binary.BigEndian.AppendUint16(b, 2)
	b = append(b, 1)
	b = append(b, "id\x00"...)
	b = binary.BigEndian.AppendUint32(b, pgtype.TextOID)
	b = binary.BigEndian.AppendUint32(b, 0xffffffff)
	b = append(b, 0)
	b = append(b, "body\x00"...)
	b = binary.BigEndian.AppendUint32(b, pgtype.TextOID)
	return binary.BigEndian.AppendUint32(b, 0xffffffff)
}

// TestWatermarkRepairsPartialImages: a chunk row dropped for a live update
// that left a TOASTed column out (unchanged) is named for reading again
// (its image in the topic would lack that column); one dropped for an
// update carrying every column, a delete, or a partial update followed by
// a whole one is not.
func TestWatermarkRepairsPartialImages(t *testing.T) {
	board := NewChunkBoard("s")
	s := receiverWith(t, func(c *Config) { c.Chunks = board })
	rel := &pipeline.Relation{OID: 42, Schema: "public", Table: "items", Columns: []pipeline.Column{
		{Name: "id", TypeOID: pgtype.TextOID, Key: true, Identity: true}, {Name: "body", TypeOID: pgtype.TextOID}}}
	c := &chunk{key: chunkKey{1, 5}, rel: rel, cols: []string{"id"}, done: make(chan struct{})}
	board.arm(c)
	var rows []pipeline.Tuple
	var keys [][]string
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		rows = append(rows, pipeline.Tuple{{Text: id, IsText: true}, {Text: "big", IsText: true}})
		keys = append(keys, []string{id})
	}
	board.setRows(c, rows, keys, 10)
	unchanged := sp("\x00u")
	feed(t, s, xlogData(0x1000, relationWithBody(42)))
	feed(t, s, xlogData(0x1100, messageBytes(false, 0x1100, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 5, Kind: "low"}))))
	feed(t, s, xlogData(0x1200, beginBytes(0x1300, 80)))
	feed(t, s, xlogData(0x1210, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("a"), unchanged))))         // partial
	feed(t, s, xlogData(0x1220, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("b"), sp("new")))))         // whole
	feed(t, s, xlogData(0x1230, cat([]byte{'D'}, relBytes(42), []byte{'K'}, tupleBytes(sp("c"), nil))))               // delete
	feed(t, s, xlogData(0x1240, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("d"), unchanged))))         // partial,
	feed(t, s, xlogData(0x1250, cat([]byte{'U'}, relBytes(42), []byte{'N'}, tupleBytes(sp("d"), sp("whole again"))))) // then whole
	feed(t, s, xlogData(0x1300, commitBytes(0x1300, 0x1310)))
	feed(t, s, xlogData(0x1600, beginBytes(0x1700, 82)))
	feed(t, s, xlogData(0x1610, messageBytes(true, 0x1610, WatermarkPrefix, wmBytes(t, watermark{Slot: "s", ID: 1, Chunk: 5, Kind: "high"}))))
	feed(t, s, xlogData(0x1700, commitBytes(0x1700, 0x1710)))
	if got := snapshotIDs(emitted(s)); !slices.Equal(got, []string{"e"}) {
		t.Errorf("published %v, want [e]", got)
	}
	if len(c.repairKeys) != 1 || c.repairKeys[0][0] != "a" {
		t.Errorf("repair keys %v, want [[a]]", c.repairKeys)
	}
}
