package integrity

import (
	"encoding/json"

	"github.com/tidemark/tidemark/pipeline"
)

// txnState is what the checker keeps about one open transaction until it
// is complete (its END record and every change it counts were seen).
type txnState struct {
	LSN      uint64         `json:"lsn"`
	ID       string         `json:"id,omitempty"`
	CommitMs int64          `json:"ts,omitempty"`
	Seen     map[string]int `json:"seen,omitempty"`
	// End holds the END record's counts of the subscribed tables; Ended
	// says the END record was seen.
	End   map[string]int `json:"end,omitempty"`
	Ended bool           `json:"ended,omitempty"`
	// Items are the same-transaction expectations raised by its changes.
	Items []item `json:"items,omitempty"`
	// Net is the net effect of its changes on rows rules look at: the last
	// change (by seq) of each row and whether the row exists after it.
	Net map[string]netOp `json:"net,omitempty"`
	// Truncs are the seqs of truncates counted (a truncate is sent to every
	// partition of the table's topic, but counted once).
	Truncs []uint32 `json:"truncs,omitempty"`
	// Overflow: the transaction outgrew MaxTransactionItems; it is counted
	// to completion but not decided.
	Overflow bool `json:"overflow,omitempty"`

	heapIdx int // index in the checker's txnHeap
}

type netOp struct {
	Seq    uint32 `json:"s"`
	Exists bool   `json:"e"`
}

func (t *txnState) setNet(k string, seq uint32, exists bool) {
	if t.Net == nil {
		t.Net = map[string]netOp{}
	}
	if cur, ok := t.Net[k]; ok && cur.Seq > seq {
		return
	}
	t.Net[k] = netOp{Seq: seq, Exists: exists}
}

// item is one expectation: a row of Table (RowKey) at Seq/Pos needs (or,
// for orphaned, lost) the related row with Match values.
type item struct {
	Rule     string          `json:"r"`
	Kind     string          `json:"k"`
	Table    string          `json:"t"`
	RowKey   json.RawMessage `json:"row"`
	Match    []string        `json:"m"`
	Seq      uint32          `json:"s"`
	LSN      uint64          `json:"l"`
	TxID     string          `json:"x,omitempty"`
	CommitMs int64           `json:"ts"`
}

func (it *item) pos() pipeline.Position {
	return pipeline.Position{CommitLSN: pipeline.LSN(it.LSN), Seq: it.Seq}
}

// pend is a windowed expectation waiting for its related row or deadline.
type pend struct {
	item
	Deadline int64 `json:"dl"` // stream time, ms
	key      string
	heapIdx  int
}

// monoVal is the last value of a monotonic rule's key.
type monoVal struct {
	V   string `json:"v"`
	LSN uint64 `json:"l"`
	Seq uint32 `json:"s"`
	// Gone: the row was deleted at this position (V is its last value),
	// kept for an insert of the same transaction.
	Gone bool `json:"g,omitempty"`
	// K is the row key of the insert that set V (a split update's
	// violation is the insert's, whichever half arrives first).
	K string `json:"k,omitempty"` // a string: a state table of jsonb would reorder a raw key
}

func (m monoVal) pos() pipeline.Position {
	return pipeline.Position{CommitLSN: pipeline.LSN(m.LSN), Seq: m.Seq}
}

// matchKey joins text values unambiguously.
func matchKey(vals []string) string {
	if len(vals) == 1 {
		return vals[0]
	}
	b, _ := json.Marshal(vals)
	return string(b)
}

// values reads cols from img as text; ok is false when one is NULL, absent
// or unchanged.
func values(img map[string]json.RawMessage, cols []string) ([]string, bool) {
	if img == nil {
		return nil, false
	}
	out := make([]string, len(cols))
	for i, c := range cols {
		v, ok := pipeline.Text(img, c)
		if !ok {
			return nil, false
		}
		out[i] = v
	}
	return out, true
}

// fifoSet is a set bounded by count: adding beyond the bound forgets the
// oldest entries.
type fifoSet struct {
	max   int
	m     map[string]struct{}
	order []string
	head  int
	// Evicted counts entries forgotten because of the bound.
	Evicted int
}

func newFIFOSet(max int) *fifoSet { return &fifoSet{max: max, m: map[string]struct{}{}} }

func (s *fifoSet) has(k string) bool { _, ok := s.m[k]; return ok }

func (s *fifoSet) add(k string) {
	if _, ok := s.m[k]; ok {
		return
	}
	s.m[k] = struct{}{}
	s.order = append(s.order, k)
	for len(s.m) > s.max && s.head < len(s.order) {
		old := s.order[s.head]
		s.order[s.head] = ""
		s.head++
		if _, ok := s.m[old]; ok {
			delete(s.m, old)
			s.Evicted++
		}
	}
	if s.head > len(s.order)/2 && s.head > 1024 {
		s.order = append([]string(nil), s.order[s.head:]...)
		s.head = 0
	}
}

func (s *fifoSet) remove(k string) { delete(s.m, k) }

func (s *fifoSet) len() int { return len(s.m) }

// heapItem is an element of an idxHeap: it keeps its index in the heap
// (-1 when out), so it can be removed in O(log n).
type heapItem interface{ setHeapIdx(int) }

func (p *pend) setHeapIdx(i int)     { p.heapIdx = i }
func (t *txnState) setHeapIdx(i int) { t.heapIdx = i }

// idxHeap is a container/heap of items ordered by less that know their
// index: pending expectations by deadline, open transactions by commit
// LSN (lowest first: the transaction a bound evicts).
type idxHeap[T heapItem] struct {
	items []T
	less  func(a, b T) bool
}

func (h *idxHeap[T]) Len() int           { return len(h.items) }
func (h *idxHeap[T]) Less(i, j int) bool { return h.less(h.items[i], h.items[j]) }
func (h *idxHeap[T]) Swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	h.items[i].setHeapIdx(i)
	h.items[j].setHeapIdx(j)
}
func (h *idxHeap[T]) Push(x any) {
	it := x.(T)
	it.setHeapIdx(len(h.items))
	h.items = append(h.items, it)
}
func (h *idxHeap[T]) Pop() any {
	n := len(h.items)
	it := h.items[n-1]
	var zero T
	h.items[n-1] = zero
	h.items = h.items[:n-1]
	it.setHeapIdx(-1)
	return it
}
