package capture

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tidemark/tidemark/pipeline"
)

// Incremental snapshots interleave with the live stream by watermarks
// (DBLog's algorithm, as Debezium implements it; DESIGN §8). For each
// chunk, the Incremental runner:
//
//  1. arms the chunk on the ChunkBoard and writes a low watermark into the
//     WAL (a non-transactional pg_logical_emit_message with prefix
//     WatermarkPrefix);
//  2. reads the chunk (the next chunk_size rows in primary-key order) in a
//     short REPEATABLE READ READ ONLY transaction, noting the transactions
//     its snapshot saw in progress (pg_current_snapshot's xip);
//  3. writes a high watermark in a transaction of its own (transactional
//     pg_logical_emit_message).
//
// The stream, reading the WAL in commit order, records from the low
// watermark on every key of the chunk's table that a live change touched.
// At the high watermark it drops those keys from the chunk and publishes
// the rest as the high watermark transaction's changes (op "r",
// source.snapshot "incremental"), at its position: every live change of
// a key published before the chunk row either changed the key before the
// chunk was read (the row shows it) or was dropped from the chunk; every
// later live change sorts after it. A live change therefore always wins.
//
// One race remains in the algorithm as usually built: a transaction whose
// commit record precedes the low watermark in the WAL but which was not yet
// visible when the chunk's snapshot was taken (its backend had written the
// commit record and was still waiting, e.g. for a synchronous standby).
// Its changes are streamed before the low watermark, so they are not
// recorded, and the chunk shows the rows without them. The high watermark
// carries the snapshot's in-progress transactions; when one of them was
// streamed before the low watermark, the stream publishes nothing of the
// chunk and the runner reads it again.

// WatermarkPrefix is the pg_logical_emit_message prefix of incremental
// snapshot watermarks.
const WatermarkPrefix = "tidemark.snapshot"

// watermark is a watermark message's content.
type watermark struct {
	Slot  string `json:"slot"`
	ID    int64  `json:"id"`    // the snapshot (tidemark.incremental_snapshots.id)
	Chunk int64  `json:"chunk"` // the chunk's attempt number (unique per runner)
	Kind  string `json:"kind"`  // "low" or "high"
	// Xip and Xmax are the chunk snapshot's in-progress transactions and
	// its xmax (as 32-bit xids): every xid in Xip, or at or after Xmax, was
	// invisible to the chunk.
	Xip  []uint32 `json:"xip,omitempty"`
	Xmax uint32   `json:"xmax,omitempty"`
}

// chunk is one chunk of an incremental snapshot, from its arming to its
// durability. The runner owns it; the stream reads rows (set before the
// high watermark is written) and writes the outcome.
type chunk struct {
	key   chunkKey
	rel   *pipeline.Relation
	cols  []string // the columns that identify a row (see chunkColumns)
	rows  []pipeline.Tuple
	keys  [][]string // the text of each row's identifying columns (see repairKeys)
	bytes int64
	ready bool // rows are set (under the board's lock)
	first bool // the snapshot's first chunk: its first row is marked first

	// Owned by the stream goroutine.
	touched map[string]struct{}
	// partial holds the touched keys whose last change in the window was
	// an update that did not carry an unchanged TOASTed column: its image
	// is not whole, so the dropped chunk row is read again (repairKeys).
	partial map[string]bool
	lowLSN  pipeline.LSN
	opened  bool
	closed  bool
	trunc   bool

	// The outcome, set by the stream at the high watermark's commit.
	end       atomic.Uint64 // end LSN of the high watermark's transaction
	published atomic.Int64
	dropped   atomic.Int64
	// repairKeys are the keys of the dropped rows that the live changes
	// left without a whole image (set before done is closed).
	repairKeys [][]string
	retry      atomic.Bool
	retryXid   atomic.Uint32 // the transaction that made the chunk retry
	abandoned  atomic.Bool   // the runner gave it up (its windows close)
	done       chan struct{} // closed when end is set
	doneOnce   sync.Once
}

type chunkKey struct {
	id, n int64
}

// ChunkBoard hands chunks from the Incremental runner to the Stream. Both
// are given the same board.
type ChunkBoard struct {
	slot   string
	mu     sync.Mutex
	chunks map[chunkKey]*chunk
}

// NewChunkBoard returns an empty board for slot's stream.
func NewChunkBoard(slot string) *ChunkBoard {
	return &ChunkBoard{slot: slot, chunks: map[chunkKey]*chunk{}}
}

func (b *ChunkBoard) arm(c *chunk) {
	b.mu.Lock()
	b.chunks[c.key] = c
	b.mu.Unlock()
}

func (b *ChunkBoard) setRows(c *chunk, rows []pipeline.Tuple, keys [][]string, bytes int64) {
	b.mu.Lock()
	c.rows, c.keys, c.bytes, c.ready = rows, keys, bytes, true
	b.mu.Unlock()
}

func (b *ChunkBoard) get(k chunkKey) (*chunk, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c, ok := b.chunks[k]
	if !ok || !c.ready {
		return c, false
	}
	return c, true
}

func (b *ChunkBoard) remove(c *chunk) {
	b.mu.Lock()
	delete(b.chunks, c.key)
	b.mu.Unlock()
}

// recentCommits remembers the xids and commit LSNs of the last commits the
// stream received, for the high watermark's check of the chunk snapshot's
// in-progress transactions.
const recentCommits = 16384

type commitMark struct {
	xid    uint32
	commit pipeline.LSN
}

// recordCommit notes a commit (Run goroutine).
func (s *Stream) recordCommit(xid uint32, commit pipeline.LSN) {
	if s.cfg.Chunks == nil {
		return
	}
	if s.recent == nil {
		s.recent = make([]commitMark, recentCommits)
	}
	s.recent[s.recentPos%recentCommits] = commitMark{xid: xid, commit: commit}
	s.recentPos++
}

// invisibleCommitted returns a transaction received committing before lsn
// (among the last recentCommits commits) that the chunk snapshot of w
// could not see: in its xip, or at or after its xmax (Postgres leaves
// those out of xip).
func (s *Stream) invisibleCommitted(w watermark, lsn pipeline.LSN) (uint32, bool) {
	for _, m := range s.recent {
		if m.commit == 0 || m.commit >= lsn {
			continue
		}
		if w.Xmax != 0 && xidFollowsOrEquals(m.xid, w.Xmax) || slices.Contains(w.Xip, m.xid) {
			return m.xid, true
		}
	}
	return 0, false
}

// xidFollowsOrEquals compares 32-bit xids as Postgres does (modulo 2^32).
func xidFollowsOrEquals(a, b uint32) bool { return int32(a-b) >= 0 }

// handleWatermark handles a watermark message of the stream.
func (s *Stream) handleWatermark(ctx context.Context, conn *pgconn.PgConn, m *pglogrepl.LogicalDecodingMessage, at pipeline.LSN) error {
	if s.cfg.Chunks == nil {
		return nil
	}
	var w watermark
	if err := json.Unmarshal(m.Content, &w); err != nil || w.Slot != s.cfg.Slot {
		return nil // another Tidemark's, or not one
	}
	c, ok := s.cfg.Chunks.get(chunkKey{w.ID, w.Chunk})
	if c == nil {
		// A chunk of an earlier process (its runner reads it again) or one
		// given up.
		return nil
	}
	switch w.Kind {
	case "low":
		s.windows = slices.DeleteFunc(s.windows, func(o *chunk) bool { return o.abandoned.Load() })
		if !c.opened {
			c.opened, c.lowLSN = true, at
			c.touched, c.partial = map[string]struct{}{}, map[string]bool{}
			s.windows = append(s.windows, c)
		}
	case "high":
		if !m.Transactional || s.txn == nil {
			return nil // not written by a runner
		}
		if !c.opened || !ok {
			// The low watermark was not seen (it cannot be missing: it
			// precedes the high one in the WAL), or the rows are not there.
			c.retry.Store(true)
			s.chunkTxn = c
			return nil
		}
		if !c.closed {
			c.closed = true
			s.windows = slices.DeleteFunc(s.windows, func(o *chunk) bool { return o == c })
		}
		s.chunkTxn = c
		if x, ok := s.invisibleCommitted(w, c.lowLSN); ok {
			c.retry.Store(true)
			c.retryXid.Store(x)
			return nil
		}
		if c.trunc {
			c.dropped.Store(int64(len(c.rows)))
			return nil
		}
		idx := columnIndexes(c.rel, c.cols)
		// The rows go out under the stream's own relation of the table
		// when it has the chunk's shape: keyed exactly as the live
		// changes, and the router keeps one relation per table.
		rel := c.rel
		if live, ok := s.rels[c.rel.OID]; ok && sameShape(live, c.rel) {
			rel = live
		}
		var published, dropped int64
		c.repairKeys = nil
		for i, row := range c.rows {
			k := rowKey(row, idx)
			if _, hit := c.touched[k]; hit {
				dropped++
				if c.partial[k] && i < len(c.keys) {
					c.repairKeys = append(c.repairKeys, c.keys[i])
				}
				continue
			}
			mark := pipeline.SnapshotIncremental
			if c.first && published == 0 {
				mark = pipeline.SnapshotIncrementalFirst
			}
			s.pendingBytes += c.bytes / int64(max(len(c.rows), 1))
			if err := s.change(ctx, conn, pipeline.Change{Op: pipeline.OpRead, Rel: rel, After: row, WALLSN: at, Snapshot: mark}); err != nil {
				return err
			}
			published++
		}
		c.published.Store(published)
		c.dropped.Store(dropped)
	}
	return nil
}

// touch records the keys a live change touched in the open windows of its
// table.
func (s *Stream) touch(ch *pipeline.Change) {
	prune := false
	for _, c := range s.windows {
		if c.abandoned.Load() {
			prune = true
			continue
		}
		if c.rel.OID != ch.Rel.OID {
			continue
		}
		if ch.Op == pipeline.OpTruncate {
			c.trunc = true
			continue
		}
		idx := columnIndexes(ch.Rel, c.cols)
		for _, t := range []pipeline.Tuple{ch.Before, ch.After} {
			if t == nil {
				continue
			}
			if k, ok := tupleKey(t, idx); ok {
				c.touched[k] = struct{}{}
			}
		}
		if ch.After != nil {
			if k, ok := tupleKey(ch.After, idx); ok {
				if ch.Op == pipeline.OpUpdate && slices.ContainsFunc(ch.After, func(d pipeline.Datum) bool { return d.Unchanged }) {
					c.partial[k] = true
				} else {
					delete(c.partial, k)
				}
			}
		}
	}
	if prune {
		s.windows = slices.DeleteFunc(s.windows, func(o *chunk) bool { return o.abandoned.Load() })
	}
}

// commitChunk records the outcome of the high watermark's transaction.
func (s *Stream) commitChunk(end pipeline.LSN) {
	c := s.chunkTxn
	s.chunkTxn = nil
	c.end.Store(uint64(end))
	c.doneOnce.Do(func() { close(c.done) })
}

// sameShape reports whether a and b have the same columns (names and
// types, in order).
func sameShape(a, b *pipeline.Relation) bool {
	if len(a.Columns) != len(b.Columns) {
		return false
	}
	for i := range a.Columns {
		if a.Columns[i].Name != b.Columns[i].Name || a.Columns[i].TypeOID != b.Columns[i].TypeOID {
			return false
		}
	}
	return true
}

// columnIndexes returns the indexes of cols in rel (-1 for a missing one).
func columnIndexes(rel *pipeline.Relation, cols []string) []int {
	idx := make([]int, len(cols))
	for i, c := range cols {
		idx[i] = rel.ColumnIndex(c)
	}
	return idx
}

// rowKey is the identity of a chunk row.
func rowKey(t pipeline.Tuple, idx []int) string {
	k, _ := tupleKey(t, idx)
	return k
}

// tupleKey renders the values of the identifying columns; false when the
// image lacks one (an old-key image without it, an unchanged TOAST value).
func tupleKey(t pipeline.Tuple, idx []int) (string, bool) {
	var b strings.Builder
	for _, i := range idx {
		if i < 0 || i >= len(t) || t[i].Absent || t[i].Unchanged {
			return "", false
		}
		d := &t[i]
		switch {
		case d.IsText:
			b.WriteString(strconv.Quote(d.Text))
		case d.IsInt:
			b.WriteString(strconv.FormatInt(d.Int, 10))
		case d.Value == nil:
			b.WriteString("null")
		default:
			fmt.Fprintf(&b, "%T:%#v", d.Value, d.Value)
		}
		b.WriteByte(0)
	}
	return b.String(), true
}
