package integrity

import (
	"container/heap"
	"container/list"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/invalidation/expr"
	"github.com/tidemark/tidemark/pipeline"
)

// TransactionsTable is the pseudo-table the transactions topic's records
// are handled as (the consumer runtime routes records to handlers by table).
const TransactionsTable = "(transactions)"

// Options tune a Checker. Zero values take the defaults.
type Options struct {
	// Group is the consumer group; it keys the persisted state (required).
	Group string
	// ViolationsTopic receives every violation (key: rule and row key;
	// value: the violation as JSON, again when it is resolved). Empty
	// disables it.
	ViolationsTopic string
	// Publisher writes to ViolationsTopic (e.g. the Kafka sink).
	Publisher pipeline.Sink
	// MaxPending bounds windowed expectations held. Default 100000.
	MaxPending int
	// MaxOpenTransactions bounds transactions awaiting completion. Default
	// 50000.
	MaxOpenTransactions int
	// MaxTransactionItems bounds what one transaction holds (expectations
	// and the net effect on the rows rules look at); a larger transaction's
	// same-transaction rules are not decided (counted in
	// tidemark_integrity_dropped_total{what="transaction_too_large"}).
	// Default 10000.
	MaxTransactionItems int
	// MaxKeys bounds monotonic keys kept in memory (the rest are read from
	// the state table) and, per windowed rule, related keys remembered as
	// seen. Default 100000.
	MaxKeys int
	// MaxOpenViolations bounds the open violations indexed for
	// resolution. Default 10000.
	MaxOpenViolations int
	// IdleAfter: when no record arrived for this long, stream time advances
	// with the wall clock from the last commit time seen. Default 1s.
	IdleAfter time.Duration
	// TickInterval between deadline checks. Default 200ms.
	TickInterval time.Duration
	// StaleAfter drops an open transaction whose END or changes did not
	// arrive while the transactions topic moved this far past its commit
	// (counted in tidemark_integrity_dropped_total). Default 10m.
	StaleAfter time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// OnViolation, when set, observes each new violation once it is
	// durable (benchmarks, tests). Called with the checker's lock held.
	OnViolation func(v *Violation)
}

func (o *Options) defaults() {
	if o.MaxPending <= 0 {
		o.MaxPending = 100000
	}
	if o.MaxOpenTransactions <= 0 {
		o.MaxOpenTransactions = 50000
	}
	if o.MaxTransactionItems <= 0 {
		o.MaxTransactionItems = 10000
	}
	if o.MaxKeys <= 0 {
		o.MaxKeys = 100000
	}
	if o.MaxOpenViolations <= 0 {
		o.MaxOpenViolations = 10000
	}
	if o.IdleAfter <= 0 {
		o.IdleAfter = time.Second
	}
	if o.TickInterval <= 0 {
		o.TickInterval = 200 * time.Millisecond
	}
	if o.StaleAfter <= 0 {
		o.StaleAfter = 10 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Stats are the checker's counters (also exported as metrics).
type Stats struct {
	Violations int64 // new violations made durable
	Redetected int64 // violations found again (replays) and not duplicated
	Resolved   int64
	Checked    int64 // expectations confirmed against the database
	Satisfied  int64 // expectations satisfied by the stream or the database
	Decided    int64 // transactions decided
	// SnapshotSkipped counts snapshot rows (op r) skipped.
	SnapshotSkipped int64
}

// Checker evaluates the rules over the stream. It is an invalidation.Handler
// and Flusher for every subscribed table and for TransactionsTable. Build
// it with NewChecker, call Load, then run the consumer and Run (the
// deadline ticker) together.
type Checker struct {
	// outboxPending: the violation outbox may hold records to publish.
	outboxPending bool
	eng           *Engine
	store         *Store
	probe         *Prober
	opt           Options
	log           *zap.Logger
	metrics       *Metrics

	mu         sync.Mutex
	subscribed map[string]bool
	trackTxns  bool                         // some rule is decided at END records
	positions  map[string]pipeline.Position // topic/partition -> last applied
	txns       map[uint64]*txnState
	txnOrder   idxHeap[*txnState] // the open transactions by commit LSN
	decided    *fifoSet           // recently decided transactions (commit LSN)
	pending    map[string]*pend
	byMatch    map[string]map[string]*pend // rule|matchkey -> pend key -> pend
	deadlines  idxHeap[*pend]
	recent     map[string]*fifoSet // rule -> related match keys seen existing
	mono       *lru
	// monoEvicted holds values evicted from mono since the last flush.
	monoEvicted map[string]monoVal
	monoAll     bool                    // every persisted monotonic key is in memory
	monoGone    map[string]uint64       // deleted monotonic keys kept for their transaction -> commit LSN
	open        map[string][]*Violation // rule|matchkey -> open violations
	openFIFO    []string
	openCount   int
	commitMs    int64 // latest commit time seen (stream time)
	endMs       int64 // latest END record's commit time
	lastExpire  time.Time
	recvAt      time.Time // wall time of the latest record
	stats       Stats
	lastWarn    map[string]time.Time

	// Dirty, made durable by flush.
	violations []*Violation
	resolved   []resolution
	resolvedV  map[string]*Violation
	dirtyPos   map[string]bool
	dirtyTxn   map[uint64]bool
	dirtyPend  map[string]bool
	dirtyMono  map[string]bool
	dirtyClock bool
}

// NewChecker builds a checker. It starts nothing.
func NewChecker(eng *Engine, store *Store, probe *Prober, opt Options, metrics *Metrics, log *zap.Logger) *Checker {
	opt.defaults()
	if log == nil {
		log = zap.NewNop()
	}
	if metrics == nil {
		metrics = NewMetrics()
	}
	c := &Checker{eng: eng, store: store, probe: probe, opt: opt, log: log, metrics: metrics,
		txnOrder:   idxHeap[*txnState]{less: func(a, b *txnState) bool { return a.LSN < b.LSN }},
		deadlines:  idxHeap[*pend]{less: func(a, b *pend) bool { return a.Deadline < b.Deadline }},
		subscribed: map[string]bool{}, positions: map[string]pipeline.Position{}, txns: map[uint64]*txnState{},
		decided: newFIFOSet(10000), pending: map[string]*pend{}, byMatch: map[string]map[string]*pend{},
		recent: map[string]*fifoSet{}, mono: newLRU(opt.MaxKeys), monoEvicted: map[string]monoVal{}, monoGone: map[string]uint64{}, monoAll: true, open: map[string][]*Violation{},
		lastWarn: map[string]time.Time{}, resolvedV: map[string]*Violation{},
		dirtyPos: map[string]bool{}, dirtyTxn: map[uint64]bool{}, dirtyPend: map[string]bool{}, dirtyMono: map[string]bool{},
		outboxPending: true}
	for _, t := range eng.Tables() {
		c.subscribed[t] = true
	}
	c.trackTxns = eng.SameTransaction()
	for _, r := range eng.rules {
		if r.Expect != nil && r.window > 0 {
			c.recent[r.Name] = newFIFOSet(opt.MaxKeys)
		}
		// Every rule's counter exists from the start, at 0.
		switch {
		case r.Monotonic != nil:
			metrics.Violations.WithLabelValues(r.Name, KindRegressed, r.Severity)
		default:
			metrics.Violations.WithLabelValues(r.Name, KindMissing, r.Severity)
			if r.Reverse {
				metrics.Violations.WithLabelValues(r.Name, KindOrphaned, r.Severity)
			}
		}
		metrics.Resolved.WithLabelValues(r.Name)
	}
	return c
}

// Stats returns a copy of the counters.
func (c *Checker) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// Load creates the store's tables and loads the persisted state and the
// open violations. Call it once before consuming.
func (c *Checker) Load(ctx context.Context) error {
	if err := c.store.Setup(ctx); err != nil {
		return err
	}
	st, err := c.store.LoadState(ctx)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	monoKeys := 0
	for k, v := range st {
		switch k.kind {
		case "pos":
			var p struct {
				L uint64 `json:"l"`
				S uint32 `json:"s"`
			}
			if json.Unmarshal(v, &p) == nil {
				c.positions[k.key] = pipeline.Position{CommitLSN: pipeline.LSN(p.L), Seq: p.S}
			}
		case "clock":
			_ = json.Unmarshal(v, &c.commitMs)
		case "txn":
			t := &txnState{}
			if json.Unmarshal(v, t) == nil {
				if t.Seen == nil {
					t.Seen = map[string]int{}
				}
				c.addTxn(t)
			}
		case "pend":
			p := &pend{}
			if json.Unmarshal(v, p) == nil {
				p.key = k.key
				c.addPending(p)
				delete(c.dirtyPend, p.key)
			}
		case "mono":
			monoKeys++
			if monoKeys > c.opt.MaxKeys {
				c.monoAll = false
				continue
			}
			var m monoVal
			if json.Unmarshal(v, &m) == nil {
				_, _, _ = c.mono.put(k.key, m)
				if m.Gone {
					c.monoGone[k.key] = m.LSN
				}
			}
		}
	}
	open, err := c.store.LoadOpen(ctx, c.opt.MaxOpenViolations)
	if err != nil {
		return err
	}
	for i := len(open) - 1; i >= 0; i-- {
		c.indexOpen(open[i])
	}
	c.recvAt = c.opt.Now()
	c.updateGauges()
	return nil
}

// Decode is the consumer runtime's decoder for the transactions topic: a
// BEGIN record gets position (lsn, 0) and an END record (lsn, 1). A record
// pipeline.ParseTxnRecord refuses is an error, which the runtime
// dead-letters with the reason.
func Decode(m *kafkago.Message) (*invalidation.Message, error) {
	r, err := pipeline.ParseTxnRecord(m.Value)
	if err != nil {
		return nil, err
	}
	pos := pipeline.Position{CommitLSN: pipeline.LSN(r.LSN)}
	if r.IsEnd() {
		pos.Seq = 1
	}
	return &invalidation.Message{Topic: m.Topic, Partition: m.Partition, Offset: m.Offset, Key: m.Key, Value: m.Value,
		Table: TransactionsTable, Pos: pos}, nil
}

var _ invalidation.Handler = (*Checker)(nil)
var _ invalidation.Flusher = (*Checker)(nil)

// Handle applies one change or transaction record.
func (c *Checker) Handle(ctx context.Context, m *invalidation.Message) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	pk := m.Topic + "/" + strconv.Itoa(m.Partition)
	if last, ok := c.positions[pk]; ok && !last.Less(m.Pos) {
		c.metrics.Skipped.Inc()
		return nil // applied before a restart
	}
	var err error
	if m.Table == TransactionsTable {
		err = c.handleTxnRecord(m)
	} else {
		err = c.handleChange(ctx, m)
	}
	if err != nil {
		return err
	}
	c.positions[pk] = m.Pos
	c.dirtyPos[pk] = true
	c.recvAt = c.opt.Now()
	return nil
}

func (c *Checker) handleTxnRecord(m *invalidation.Message) error {
	if m.Pos.Seq == 0 {
		return nil // BEGIN (see Decode): the END record says all there is
	}
	r, err := pipeline.ParseTxnRecord(m.Value)
	if err != nil {
		return err
	}
	c.advanceClock(r.TsMs)
	if strings.HasPrefix(r.ID, "0:") {
		// xid 0 is no transaction's: the initial snapshot's records,
		// whose rows are skipped (see handleChange).
		return nil
	}
	if !r.IsEnd() || !c.trackTxns {
		return nil
	}
	end := map[string]int{}
	for _, dc := range r.DataCollections {
		if c.subscribed[dc.Table] {
			end[dc.Table] += dc.Count
		}
	}
	t := c.txns[r.LSN]
	if len(end) == 0 && t == nil {
		return nil // nothing this checker reads
	}
	if t == nil {
		if c.decided.has(strconv.FormatUint(r.LSN, 10)) {
			return nil
		}
		t = c.newTxn(r.LSN)
	}
	t.End, t.Ended, t.ID = end, true, r.ID
	if t.CommitMs == 0 {
		t.CommitMs = r.TsMs
	}
	c.dirtyTxn[t.LSN] = true
	c.tryDecide(t)
	if r.TsMs > c.endMs {
		c.endMs = r.TsMs
	}
	if now := c.opt.Now(); now.Sub(c.lastExpire) >= time.Second {
		c.lastExpire = now
		c.expireTxns()
	}
	return nil
}

func (c *Checker) newTxn(lsn uint64) *txnState {
	for len(c.txns) >= c.opt.MaxOpenTransactions && c.txnOrder.Len() > 0 {
		// Drop the oldest open transaction (the lowest commit LSN, the
		// heap's root: O(log n)): its decision is lost.
		c.dropTxn(c.txnOrder.items[0].LSN, "transaction bound reached (integrity.max_open_transactions)")
	}
	t := &txnState{LSN: lsn, Seen: map[string]int{}}
	c.addTxn(t)
	return t
}

// addTxn opens t; removeTxn forgets an open transaction. Both keep
// txnOrder, the heap of open transactions by commit LSN.
func (c *Checker) addTxn(t *txnState) {
	if old := c.txns[t.LSN]; old != nil {
		c.removeTxn(old.LSN)
	}
	c.txns[t.LSN] = t
	heap.Push(&c.txnOrder, t)
}

func (c *Checker) removeTxn(lsn uint64) {
	t := c.txns[lsn]
	if t == nil {
		return
	}
	delete(c.txns, lsn)
	if t.heapIdx >= 0 && t.heapIdx < c.txnOrder.Len() && c.txnOrder.items[t.heapIdx] == t {
		heap.Remove(&c.txnOrder, t.heapIdx)
	}
}

func (c *Checker) dropTxn(lsn uint64, why string) {
	c.removeTxn(lsn)
	c.dirtyTxn[lsn] = true
	c.decided.add(strconv.FormatUint(lsn, 10))
	c.metrics.Dropped.WithLabelValues("transaction").Inc()
	c.warnSometimes("transaction", "integrity: dropped an undecided transaction", zap.String("reason", why),
		zap.String("commit_lsn", pipeline.LSN(lsn).String()))
}

// expireTxns drops transactions whose commit is older than StaleAfter
// behind the transactions topic's latest END record (their END record or
// some change never arrived).
func (c *Checker) expireTxns() {
	limit := c.endMs - c.opt.StaleAfter.Milliseconds()
	for l, t := range c.txns {
		if t.CommitMs != 0 && t.CommitMs < limit {
			c.dropTxn(l, "incomplete for longer than stale_after")
		}
	}
}

func (c *Checker) advanceClock(ms int64) {
	if ms > c.commitMs {
		c.commitMs = ms
		c.dirtyClock = true
	}
}

func opOf(env *pipeline.Envelope) byte {
	if len(env.Op) == 1 {
		return env.Op[0]
	}
	return 0
}

func (c *Checker) handleChange(ctx context.Context, m *invalidation.Message) error {
	env := m.Env
	if env == nil {
		return errors.New("change without envelope")
	}
	if opOf(env) == 'r' {
		// A snapshot row states that the row existed when the snapshot
		// was taken; it was not written by a transaction, so no
		// same-transaction rule can be decided on it, and a whole table's
		// rows must not raise expectations. Skipped, counted.
		c.stats.SnapshotSkipped++
		c.metrics.SnapshotSkipped.Inc()
		return nil
	}
	lsn := uint64(m.Pos.CommitLSN)
	if c.decided.has(strconv.FormatUint(lsn, 10)) {
		return nil // its transaction was decided (or dropped) already
	}
	// The only step that can fail comes first, so that a failed (and
	// retried) change has changed nothing.
	stored, err := c.lookupMono(ctx, m.Table, env)
	if err != nil {
		// The state database is down or slow: waiting heals it, so the
		// change stalls (offsets held) instead of being dead-lettered.
		return invalidation.Transient(fmt.Errorf("reading monotonic state for %s: %w", m.Table, err))
	}
	c.advanceClock(env.Source.TsMs)
	t := c.txns[lsn]
	if t == nil && !c.trackTxns {
		// No same-transaction rule: nothing waits for the END record.
		t = &txnState{LSN: lsn, Seen: map[string]int{}}
	} else if t == nil {
		t = c.newTxn(lsn)
	}
	if t.CommitMs == 0 {
		t.CommitMs = env.Source.TsMs
	}
	if t.ID == "" {
		t.ID = env.Transaction.ID
	}
	if c.trackTxns {
		c.dirtyTxn[lsn] = true
	}
	op := opOf(env)
	if op == 't' {
		for _, s := range t.Truncs {
			if s == m.Pos.Seq {
				return nil // another partition's copy
			}
		}
		t.Truncs = append(t.Truncs, m.Pos.Seq)
		t.Seen[m.Table]++
		c.tryDecide(t)
		return nil
	}
	t.Seen[m.Table]++
	rowKey := json.RawMessage(m.Key)
	if len(rowKey) == 0 {
		rowKey = json.RawMessage("null")
	}
	base := item{Table: m.Table, RowKey: rowKey, Seq: m.Pos.Seq, LSN: lsn, TxID: env.Transaction.ID, CommitMs: env.Source.TsMs}
	if base.CommitMs == 0 {
		base.CommitMs = t.CommitMs
	}
	// The row as a parent: expectations it raises, and its deletion.
	for _, r := range c.eng.byTable[m.Table] {
		if r.Monotonic != nil {
			c.monotonic(r, env, base, stored)
			continue
		}
		if r.Forbid != nil {
			if strings.ContainsRune(r.ops, rune(op)) {
				c.forbidTrigger(r, env, base, r.where, r.cols)
			}
			continue
		}
		img := env.After
		if op == 'd' {
			img = env.Before
		}
		if op == 'd' {
			// The row is gone: what it expected no longer matters, and it
			// can no longer be orphaned.
			c.removePending(r.Name + "|" + KindMissing + "|" + string(rowKey))
			t.setNet("row|"+m.Table+"|"+string(rowKey), m.Pos.Seq, false)
			if vals, ok := values(env.Before, r.cols); ok {
				k := matchKey(vals)
				t.setNet("par|"+r.Name+"|"+k, m.Pos.Seq, false)
				if r.Reverse {
					c.satisfyMatch(r.Name, KindOrphaned, k)
					c.resolveOpen(r, KindOrphaned, k, m.Pos, base.CommitMs)
				}
			}
		} else {
			t.setNet("row|"+m.Table+"|"+string(rowKey), m.Pos.Seq, true)
			if vals, ok := values(env.After, r.cols); ok {
				t.setNet("par|"+r.Name+"|"+matchKey(vals), m.Pos.Seq, true)
			}
		}
		if !strings.ContainsRune(r.ops, rune(op)) || !holds(r.where, img, op == 'd') {
			continue
		}
		vals, ok := values(img, r.cols)
		if !ok {
			continue // a NULL reference expects nothing
		}
		if op == 'u' && env.Before != nil {
			if old, ok := values(env.Before, r.cols); ok && matchKey(old) == matchKey(vals) {
				continue // the reference did not change
			}
		}
		it := base
		it.Rule, it.Kind, it.Match = r.Name, KindMissing, vals
		if r.window == 0 {
			t.Items = append(t.Items, it)
			continue
		}
		k := matchKey(vals)
		if c.recent[r.Name].has(k) {
			c.stats.Satisfied++
			c.metrics.Satisfied.WithLabelValues(r.Name, "stream").Inc()
			// A newer change of the row supersedes an older expectation.
			c.removePending(r.Name + "|" + KindMissing + "|" + string(rowKey))
			continue
		}
		c.addPending(&pend{item: it, Deadline: it.CommitMs + r.window.Milliseconds(), key: r.Name + "|" + KindMissing + "|" + string(rowKey)})
	}
	// The row as a related row: it satisfies, resolves or orphans.
	for _, r := range c.eng.byRelated[m.Table] {
		if r.Forbid != nil {
			if op == 'c' || op == 'u' {
				c.forbidTrigger(r, env, base, r.relWhere, r.relCols)
			}
			continue
		}
		if op == 'd' {
			vals, ok := values(env.Before, r.relCols)
			if !ok || !holds(r.relWhere, env.Before, true) {
				continue
			}
			k := matchKey(vals)
			t.setNet("rel|"+r.Name+"|"+k, m.Pos.Seq, false)
			if rs := c.recent[r.Name]; rs != nil {
				rs.remove(k)
			}
			if !r.Reverse {
				continue
			}
			it := base
			it.Rule, it.Kind, it.Match = r.Name, KindOrphaned, vals
			if r.window == 0 {
				t.Items = append(t.Items, it)
			} else {
				c.addPending(&pend{item: it, Deadline: it.CommitMs + r.window.Milliseconds(), key: r.Name + "|" + KindOrphaned + "|" + k})
			}
			continue
		}
		vals, ok := values(env.After, r.relCols)
		if !ok || !holds(r.relWhere, env.After, false) {
			continue
		}
		k := matchKey(vals)
		t.setNet("rel|"+r.Name+"|"+k, m.Pos.Seq, true)
		if rs := c.recent[r.Name]; rs != nil {
			rs.add(k)
		}
		c.satisfyMatch(r.Name, KindMissing, k)
		c.satisfyMatch(r.Name, KindOrphaned, k)
		c.resolveOpen(r, KindMissing, k, m.Pos, base.CommitMs)
		c.resolveOpen(r, KindOrphaned, k, m.Pos, base.CommitMs)
	}
	if !t.Overflow && len(t.Items)+len(t.Net) > c.opt.MaxTransactionItems {
		t.Overflow = true
		c.metrics.Dropped.WithLabelValues("transaction_too_large").Inc()
		c.warnSometimes("large", "integrity: a transaction is too large for its same-transaction rules to be decided (max_transaction_items)",
			zap.String("commit_lsn", pipeline.LSN(lsn).String()), zap.Int("max_transaction_items", c.opt.MaxTransactionItems))
	}
	if t.Overflow {
		t.Items, t.Net = nil, nil
	}
	c.tryDecide(t)
	return nil
}

// forbidTrigger schedules the database check of a forbid rule when a change
// brings its row into the forbidden state: the row (of the rule's table or
// the related table; where and cols are that side's) matches where after
// the change and did not, for the same match key, before it. The check
// runs once the rule's window has passed in stream time and flags only
// what the database then confirms; a check already scheduled for the match
// key keeps its (earlier) deadline.
func (c *Checker) forbidTrigger(r *compiled, env *pipeline.Envelope, base item, where *expr.Expr, cols []string) {
	if env.After == nil || !holds(where, env.After, false) {
		return
	}
	vals, ok := values(env.After, cols)
	if !ok {
		return // a NULL reference relates to nothing
	}
	if env.Before != nil && holds(where, env.Before, false) {
		if old, ok := values(env.Before, cols); ok && matchKey(old) == matchKey(vals) {
			return // already in that state: its own change was checked
		}
	}
	k := r.Name + "|" + KindForbidden + "|" + matchKey(vals)
	if c.pending[k] != nil {
		return
	}
	it := base
	it.Rule, it.Kind, it.Match = r.Name, KindForbidden, vals
	c.addPending(&pend{item: it, Deadline: it.CommitMs + r.window.Milliseconds(), key: k})
}

// lookupMono reads from the state table the kept values of the monotonic
// keys a change touches that memory no longer holds (only once a bound
// evicted some).
func (c *Checker) lookupMono(ctx context.Context, table string, env *pipeline.Envelope) (map[string]monoVal, error) {
	if c.monoAll || (env.Op != "c" && env.Op != "u" && env.Op != "d") {
		return nil, nil
	}
	img := env.After
	if env.Op == "d" {
		img = env.Before // a delete is compared with, or replaces, the kept value
	}
	var out map[string]monoVal
	for _, r := range c.eng.byTable[table] {
		if r.Monotonic == nil {
			continue
		}
		vals, ok := values(img, r.cols)
		if !ok {
			continue
		}
		k := r.Name + "|" + matchKey(vals)
		if _, ok := c.mono.peek(k); ok {
			continue
		}
		if _, ok := c.monoEvicted[k]; ok {
			continue
		}
		v, found, err := c.store.stateValue(ctx, stateKey{"mono", k})
		if err != nil {
			return nil, err
		}
		var mv monoVal
		if found && json.Unmarshal(v, &mv) == nil {
			if out == nil {
				out = map[string]monoVal{}
			}
			out[k] = mv
		}
	}
	return out, nil
}

// monotonic checks a monotonic rule's column against its previous value
// (stored holds what lookupMono read from the state table).
func (c *Checker) monotonic(r *compiled, env *pipeline.Envelope, base item, stored map[string]monoVal) {
	op := opOf(env)
	pos := base.pos()
	if op == 'd' {
		if vals, ok := values(env.Before, r.cols); ok {
			k := r.Name + "|" + matchKey(vals)
			cur, ok := c.mono.get(k)
			if !ok {
				cur, ok = c.monoEvicted[k]
			}
			if !ok {
				cur, ok = stored[k]
			}
			if ok && !cur.pos().Less(pos) {
				// Applied already, or a later change of its transaction came
				// first: the insert of a split update (another partition).
				// Compare it with what this delete removed.
				if cur.LSN == base.LSN && !cur.Gone && strings.ContainsRune(r.ops, 'c') && holds(r.where, env.Before, true) {
					if old, has := pipeline.Text(env.Before, r.Monotonic.Column); has {
						if cmp, okc := r.order(cur.V, old); okc && cmp < 0 {
							it := base
							it.Seq = cur.Seq
							if len(cur.K) > 0 {
								it.RowKey = json.RawMessage(cur.K)
							}
							it.Rule, it.Kind, it.Match = r.Name, KindRegressed, vals
							c.flag(r, it, regressedDetail(r, old, cur.V, vals))
						}
					}
				}
				return
			}
			if old, has := pipeline.Text(env.Before, r.Monotonic.Column); has {
				// Kept until its transaction has passed: an update of a
				// table keyed by the whole row arrives as a delete and an
				// insert, and the insert is compared with what was deleted.
				c.putMono(k, monoVal{V: old, LSN: base.LSN, Seq: base.Seq, Gone: true})
				c.monoGone[k] = base.LSN
			} else {
				c.mono.remove(k)
				delete(c.monoEvicted, k)
				delete(c.monoGone, k)
				c.dirtyMono[k] = true
			}
		}
		return
	}
	if !strings.ContainsRune(r.ops, rune(op)) || !holds(r.where, env.After, false) {
		return
	}
	keyVals, ok := values(env.After, r.cols)
	if !ok {
		return
	}
	nv, ok := pipeline.Text(env.After, r.Monotonic.Column)
	if !ok {
		return // NULL or unchanged TOAST: nothing to compare
	}
	k := r.Name + "|" + matchKey(keyVals)
	cur, known := c.mono.get(k)
	if !known {
		cur, known = c.monoEvicted[k]
	}
	if !known {
		cur, known = stored[k]
	}
	if known && !cur.pos().Less(pos) {
		return // applied already
	}
	if known && cur.Gone && cur.LSN != base.LSN {
		known = false // deleted by an earlier transaction: a new row starts anywhere
	}
	prev, havePrev := "", false
	if env.Before != nil {
		prev, havePrev = pipeline.Text(env.Before, r.Monotonic.Column)
	}
	if !havePrev && known {
		prev, havePrev = cur.V, true
	}
	cmp, comparable := 0, true
	if havePrev {
		cmp, comparable = r.order(nv, prev)
	}
	if !comparable {
		c.metrics.Dropped.WithLabelValues("monotonic_unparsable").Inc()
		c.warnSometimes("mono-parse", "integrity: a monotonic value does not parse as its column's type; not compared",
			zap.String("rule", r.Name), zap.String("order", r.orderName))
	}
	if havePrev && comparable && cmp < 0 {
		it := base
		it.Rule, it.Kind, it.Match = r.Name, KindRegressed, keyVals
		c.flag(r, it, regressedDetail(r, prev, nv, keyVals))
	}
	delete(c.monoGone, k)
	mv := monoVal{V: nv, LSN: base.LSN, Seq: base.Seq}
	if op == 'c' {
		// An insert may be the second half of a split update whose delete
		// arrives later: its violation is this insert's.
		mv.K = string(base.RowKey)
	}
	c.putMono(k, mv)
}

func regressedDetail(r *compiled, prev, nv string, keyVals []string) string {
	return fmt.Sprintf("%s.%s moved backwards from %s to %s for (%s) = (%s)", r.Rule.Table, r.Monotonic.Column, prev, nv,
		strings.Join(r.cols, ", "), strings.Join(keyVals, ", "))
}

// putMono keeps a monotonic value, in memory while the bound allows and in
// the state table at the next flush.
func (c *Checker) putMono(k string, v monoVal) {
	if ek, ev, evicted := c.mono.put(k, v); evicted {
		// Forgotten in memory only: the state table keeps it.
		c.monoAll = false
		c.monoEvicted[ek] = ev
		c.dirtyMono[ek] = true
		c.metrics.Dropped.WithLabelValues("monotonic_key_memory").Inc()
		c.warnSometimes("mono", "integrity: monotonic keys at their memory bound (integrity.max_keys); older keys are read from the state table")
	}
	c.dirtyMono[k] = true
}

// pruneGone forgets deleted monotonic values once every partition has
// applied a later transaction: the insert that could follow their delete
// in the same transaction has been seen.
func (c *Checker) pruneGone() {
	if len(c.monoGone) == 0 || len(c.positions) == 0 {
		return
	}
	var low uint64
	first := true
	for _, p := range c.positions {
		if l := uint64(p.CommitLSN); first || l < low {
			low, first = l, false
		}
	}
	for k, l := range c.monoGone {
		if l < low {
			delete(c.monoGone, k)
			c.mono.remove(k)
			delete(c.monoEvicted, k)
			c.dirtyMono[k] = true
		}
	}
}

// tryDecide decides a transaction's same-transaction expectations once its
// END record and all the changes it counts were seen.
func (c *Checker) tryDecide(t *txnState) {
	if !t.Ended {
		return
	}
	for tbl, n := range t.End {
		if t.Seen[tbl] < n {
			return
		}
	}
	forward := map[string]bool{}
	for _, it := range t.Items {
		if it.Kind == KindMissing {
			forward[it.Rule+"|"+matchKey(it.Match)] = true
		}
	}
	for _, it := range t.Items {
		r := c.eng.rule(it.Rule)
		if r == nil {
			continue
		}
		k := matchKey(it.Match)
		rel, relSeen := t.Net["rel|"+r.Name+"|"+k]
		switch it.Kind {
		case KindMissing:
			if row, ok := t.Net["row|"+it.Table+"|"+string(it.RowKey)]; ok && row.Seq > it.Seq && !row.Exists {
				continue // the row itself was deleted later in the transaction
			}
			if relSeen && rel.Exists {
				c.stats.Satisfied++
				c.metrics.Satisfied.WithLabelValues(r.Name, "transaction").Inc()
				continue
			}
			c.flag(r, it, fmt.Sprintf("%s row has no %s row with %s in the same transaction", it.Table, r.related.Name, describeMatch(r.relCols, it.Match)))
		case KindOrphaned:
			if relSeen && rel.Exists && rel.Seq > it.Seq {
				continue // re-inserted in the same transaction
			}
			if par, ok := t.Net["par|"+r.Name+"|"+k]; ok && !par.Exists {
				continue // the parent went with it
			}
			if forward[r.Name+"|"+k] {
				continue // the parent was written in this transaction: its own check decides
			}
			// Whether a parent remains is known only to the database.
			c.addPending(&pend{item: it, Deadline: it.CommitMs, key: r.Name + "|" + KindOrphaned + "|" + k})
		}
	}
	if t.CommitMs > 0 {
		c.metrics.DecisionSeconds.Observe(max(0, float64(c.opt.Now().UnixMilli()-t.CommitMs)/1000))
	}
	for tbl, n := range t.End {
		if t.Seen[tbl] > n {
			c.warnSometimes("count", "integrity: more changes seen than the END record counts", zap.String("table", tbl),
				zap.Int("seen", t.Seen[tbl]), zap.Int("counted", n))
		}
	}
	c.removeTxn(t.LSN)
	c.decided.add(strconv.FormatUint(t.LSN, 10))
	c.dirtyTxn[t.LSN] = true
	c.stats.Decided++
}

func describeMatch(cols, vals []string) string {
	parts := make([]string, len(cols))
	for i := range cols {
		parts[i] = cols[i] + " = " + strconv.Quote(vals[i])
	}
	return strings.Join(parts, " and ")
}

func (e *Engine) rule(name string) *compiled {
	for _, r := range e.rules {
		if r.Name == name {
			return r
		}
	}
	return nil
}

// addPending indexes a windowed expectation (replacing one with the same
// key), dropping the earliest deadline when the bound is reached.
func (c *Checker) addPending(p *pend) {
	c.removePending(p.key)
	if len(c.pending) >= c.opt.MaxPending && c.deadlines.Len() > 0 {
		old := c.deadlines.items[0]
		c.removePending(old.key)
		c.metrics.Dropped.WithLabelValues("expectation").Inc()
		c.warnSometimes("pending", "integrity: pending expectations at their bound (integrity.max_pending); dropped the oldest",
			zap.String("rule", old.Rule))
	}
	c.pending[p.key] = p
	mk := p.Rule + "|" + p.Kind + "|" + matchKey(p.Match)
	if c.byMatch[mk] == nil {
		c.byMatch[mk] = map[string]*pend{}
	}
	c.byMatch[mk][p.key] = p
	heap.Push(&c.deadlines, p)
	c.dirtyPend[p.key] = true
}

func (c *Checker) removePending(key string) {
	p := c.pending[key]
	if p == nil {
		return
	}
	delete(c.pending, key)
	mk := p.Rule + "|" + p.Kind + "|" + matchKey(p.Match)
	if m := c.byMatch[mk]; m != nil {
		delete(m, key)
		if len(m) == 0 {
			delete(c.byMatch, mk)
		}
	}
	if p.heapIdx >= 0 && p.heapIdx < c.deadlines.Len() && c.deadlines.items[p.heapIdx] == p {
		heap.Remove(&c.deadlines, p.heapIdx)
	}
	c.dirtyPend[key] = true
}

// satisfyMatch removes the pending expectations of rule and kind for a
// related match key (the related row appeared, or the parent went).
func (c *Checker) satisfyMatch(rule, kind, k string) {
	m := c.byMatch[rule+"|"+kind+"|"+k]
	for key := range m {
		c.removePending(key)
		c.stats.Satisfied++
		c.metrics.Satisfied.WithLabelValues(rule, "stream").Inc()
	}
}

// flag records a violation (durable at the next flush).
func (c *Checker) flag(r *compiled, it item, detail string) {
	pos := it.pos()
	v := &Violation{ID: ViolationID(r.Name, it.RowKey, pos), Rule: r.Name, Kind: it.Kind, Severity: r.Severity,
		Table: it.Table, RowKey: it.RowKey, Position: pos.String(), CommitLSN: pos.CommitLSN.String(), Seq: pos.Seq,
		TransactionID: it.TxID, CommittedAt: time.UnixMilli(it.CommitMs).UTC(), DetectedAt: c.opt.Now().UTC(),
		Detail: detail, Status: StatusOpen}
	if r.related != nil {
		v.Related = r.related.Name
		v.Match = map[string]string{}
		for i, col := range r.relCols {
			v.Match[col] = it.Match[i]
		}
		v.MatchKey = r.Name + "|" + matchKey(it.Match)
	} else {
		v.MatchKey = r.Name + "|" + matchKey(it.Match)
	}
	for _, o := range c.violations {
		if o.ID == v.ID {
			return
		}
	}
	c.violations = append(c.violations, v)
	if it.Kind != KindRegressed {
		c.indexOpen(v)
	}
}

func (c *Checker) indexOpen(v *Violation) {
	if v.Kind == KindRegressed || v.Status != StatusOpen {
		return
	}
	k := v.Kind + "|" + v.MatchKey
	for _, o := range c.open[k] {
		if o.ID == v.ID {
			return
		}
	}
	c.open[k] = append(c.open[k], v)
	c.openFIFO = append(c.openFIFO, k)
	c.openCount++
	for c.openCount > c.opt.MaxOpenViolations && len(c.openFIFO) > 0 {
		old := c.openFIFO[0]
		c.openFIFO = c.openFIFO[1:]
		if vs := c.open[old]; len(vs) > 0 {
			c.open[old] = vs[1:]
			c.openCount--
			if len(c.open[old]) == 0 {
				delete(c.open, old)
			}
			c.metrics.Dropped.WithLabelValues("open_violation_index").Inc()
		}
	}
}

// resolveOpen resolves the open violations of rule r and kind for match
// key k: the missing row appeared (or the orphaned row's parent went).
func (c *Checker) resolveOpen(r *compiled, kind, k string, by pipeline.Position, atMs int64) {
	key := kind + "|" + r.Name + "|" + k
	vs := c.open[key]
	if len(vs) == 0 {
		return
	}
	delete(c.open, key)
	c.openCount -= len(vs)
	at := time.UnixMilli(atMs).UTC()
	for _, v := range vs {
		c.resolved = append(c.resolved, resolution{ID: v.ID, At: at, By: by.String()})
		rv := *v
		rv.Status, rv.ResolvedAt, rv.ResolvedBy = StatusResolved, &at, by.String()
		c.resolvedV[v.ID] = &rv
	}
}

// Flush makes violations and state durable: the violations topic, the
// violations table and the state table, in one database transaction.
func (c *Checker) Flush(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked(ctx)
}

func (c *Checker) flushLocked(ctx context.Context) error {
	if err := c.drainOutboxLocked(ctx); err != nil {
		return err
	}
	c.pruneGone()
	b := &batch{violations: c.violations, resolved: c.resolved, upserts: map[stateKey][]byte{}, deletes: map[stateKey]bool{}}
	put := func(kind, key string, v any) {
		js, _ := json.Marshal(v)
		b.upserts[stateKey{kind, key}] = js
	}
	for pk := range c.dirtyPos {
		p := c.positions[pk]
		put("pos", pk, map[string]any{"l": uint64(p.CommitLSN), "s": p.Seq})
	}
	for l := range c.dirtyTxn {
		k := strconv.FormatUint(l, 10)
		if t := c.txns[l]; t != nil {
			put("txn", k, t)
		} else {
			b.deletes[stateKey{"txn", k}] = true
		}
	}
	for key := range c.dirtyPend {
		if p := c.pending[key]; p != nil {
			put("pend", key, p)
		} else {
			b.deletes[stateKey{"pend", key}] = true
		}
	}
	for key := range c.dirtyMono {
		if m, ok := c.mono.peek(key); ok {
			put("mono", key, m)
		} else if m, ok := c.monoEvicted[key]; ok {
			put("mono", key, m)
		} else {
			b.deletes[stateKey{"mono", key}] = true
		}
	}
	if c.dirtyClock {
		put("clock", "commit_ms", c.commitMs)
	}
	if b.empty() {
		return nil
	}
	var records func(*commitResult) []pipeline.Message
	if c.opt.ViolationsTopic != "" && c.opt.Publisher != nil && (len(b.violations) > 0 || len(b.resolved) > 0) {
		records = func(res *commitResult) []pipeline.Message {
			var msgs []pipeline.Message
			for _, v := range b.violations {
				if st := res.status[v.ID]; st == StatusResolved && !res.inserted[v.ID] {
					continue // found again after it was resolved: the topic has its final state
				}
				msgs = append(msgs, c.record(v))
			}
			for id := range res.resolved {
				if rv := c.resolvedV[id]; rv != nil {
					msgs = append(msgs, c.record(rv))
				}
			}
			return msgs
		}
	}
	res, err := c.store.commit(ctx, b, records)
	if err != nil {
		return err
	}
	now := c.opt.Now()
	for _, v := range b.violations {
		if !res.inserted[v.ID] {
			c.stats.Redetected++
			c.metrics.Redetected.WithLabelValues(v.Rule).Inc()
			continue
		}
		c.stats.Violations++
		c.metrics.Violations.WithLabelValues(v.Rule, v.Kind, v.Severity).Inc()
		c.metrics.DetectionSeconds.WithLabelValues(v.Kind).Observe(max(0, now.Sub(v.CommittedAt).Seconds()))
		c.log.Warn("integrity violation", zap.String("rule", v.Rule), zap.String("kind", v.Kind), zap.String("severity", v.Severity),
			zap.String("table", v.Table), zap.ByteString("row", v.RowKey), zap.String("position", v.Position),
			zap.String("related_table", v.Related), zap.Any("match", v.Match), zap.String("id", v.ID), zap.String("detail", v.Detail))
		if c.opt.OnViolation != nil {
			c.opt.OnViolation(v)
		}
	}
	for id := range res.resolved {
		c.stats.Resolved++
		if rv := c.resolvedV[id]; rv != nil {
			c.metrics.Resolved.WithLabelValues(rv.Rule).Inc()
		}
	}
	c.violations, c.resolved = nil, nil
	clear(c.resolvedV)
	clear(c.dirtyPos)
	clear(c.dirtyTxn)
	clear(c.dirtyPend)
	clear(c.dirtyMono)
	clear(c.monoEvicted)
	c.dirtyClock = false
	c.updateGauges()
	if res.outboxed {
		c.outboxPending = true
		return c.drainOutboxLocked(ctx)
	}
	return nil
}

// drainOutboxLocked publishes the committed violation records not yet
// published (also those a crash left behind: outboxPending starts true).
// It runs outside any database transaction, so a Kafka outage holds no
// transaction open; an error stalls the caller, which retries Flush.
func (c *Checker) drainOutboxLocked(ctx context.Context) error {
	if !c.outboxPending || c.opt.Publisher == nil {
		return nil
	}
	if err := c.store.drainOutbox(ctx, c.opt.Publisher); err != nil {
		return fmt.Errorf("publishing to %s: %w", c.opt.ViolationsTopic, err)
	}
	c.outboxPending = false
	return nil
}

func (c *Checker) record(v *Violation) pipeline.Message {
	js, _ := json.Marshal(v)
	return pipeline.Message{Topic: c.opt.ViolationsTopic, Key: v.topicKey(), Value: js,
		Headers: []pipeline.Header{{Key: "tidemark-rule", Value: []byte(v.Rule)}, {Key: "tidemark-status", Value: []byte(v.Status)}}}
}

func (c *Checker) updateGauges() {
	c.metrics.Open.WithLabelValues("transactions").Set(float64(len(c.txns)))
	c.metrics.Open.WithLabelValues("expectations").Set(float64(len(c.pending)))
	c.metrics.Open.WithLabelValues("monotonic_keys").Set(float64(c.mono.len()))
	c.metrics.StreamTime.Set(float64(c.commitMs) / 1000)
}

// streamNowMs is the stream time: the latest commit time seen, advanced
// with the wall clock only while no record arrives (the consumer is caught
// up), so a lagging consumer's deadlines follow the stream, not the clock.
func (c *Checker) streamNowMs() int64 {
	now := c.opt.Now()
	idle := now.Sub(c.recvAt)
	if idle < c.opt.IdleAfter || c.commitMs == 0 {
		return c.commitMs
	}
	return c.commitMs + idle.Milliseconds()
}

// Run checks due windowed expectations against the database until ctx
// ends. It is the checker's only goroutine; the consumer calls Handle and
// Flush from its own.
func (c *Checker) Run(ctx context.Context) error {
	t := time.NewTicker(c.opt.TickInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		for {
			n, err := c.Tick(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				c.warnSometimes("tick", "integrity: confirming expectations failed; retrying", zap.Error(err))
				break
			}
			if n == 0 {
				break
			}
		}
	}
}

const tickBatch = 1000

// Tick confirms up to tickBatch due expectations against the database and
// makes the outcome durable. It returns how many it decided.
func (c *Checker) Tick(ctx context.Context) (int, error) {
	c.mu.Lock()
	now := c.streamNowMs()
	var due []*pend
	for c.deadlines.Len() > 0 && c.deadlines.items[0].Deadline <= now && len(due) < tickBatch {
		p := heap.Pop(&c.deadlines).(*pend)
		due = append(due, p)
	}
	c.mu.Unlock()
	if len(due) == 0 {
		return 0, nil
	}
	flagged, err := c.confirm(ctx, due)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		// Put them back: they are checked again at the next tick.
		for _, p := range due {
			if c.pending[p.key] == p {
				heap.Push(&c.deadlines, p)
			}
		}
		return 0, err
	}
	for i, p := range due {
		if c.pending[p.key] != p {
			continue // satisfied or superseded meanwhile
		}
		c.removePending(p.key)
		c.stats.Checked++
		r := c.eng.rule(p.Rule)
		if r == nil || !flagged[i] {
			c.stats.Satisfied++
			if r != nil {
				c.metrics.Satisfied.WithLabelValues(r.Name, "database").Inc()
			}
			continue
		}
		switch p.Kind {
		case KindMissing:
			c.flag(r, p.item, fmt.Sprintf("%s row has no %s row with %s within %s (confirmed in the database)",
				p.Table, r.related.Name, describeMatch(r.relCols, p.Match), r.Within))
		case KindOrphaned:
			c.flag(r, p.item, fmt.Sprintf("%s row with %s was deleted while its %s row remains (confirmed in the database)",
				p.Table, describeMatch(r.relCols, p.Match), r.Rule.Table))
		case KindForbidden:
			c.flag(r, p.item, fmt.Sprintf("%s row with %s matching %s has a forbidden %s row matching %s after %s (confirmed in the database)",
				r.Rule.Table, describeMatch(r.cols, p.Match), r.Where.String(), r.related.Name, r.Forbid.Where.String(), r.Within))
		}
	}
	return len(due), c.flushLocked(ctx)
}

// confirm asks the database, per rule and kind, which due expectations are
// violated: a missing related row still missing; an orphaned row whose
// parent exists while the related row does not.
func (c *Checker) confirm(ctx context.Context, due []*pend) ([]bool, error) {
	out := make([]bool, len(due))
	groups := map[string][]int{}
	for i, p := range due {
		groups[p.Rule+"|"+p.Kind] = append(groups[p.Rule+"|"+p.Kind], i)
	}
	names := make([]string, 0, len(groups))
	for g := range groups {
		names = append(names, g)
	}
	sort.Strings(names)
	for _, g := range names {
		idx := groups[g]
		r := c.eng.rule(due[idx[0]].Rule)
		if r == nil {
			continue
		}
		keys := make([][]string, len(idx))
		for j, i := range idx {
			keys[j] = due[i].Match
		}
		switch due[idx[0]].Kind {
		case KindMissing:
			rel, err := c.probe.Existing(ctx, r.related, r.relCols, r.relWhere, keys)
			if err != nil {
				return nil, err
			}
			for j, i := range idx {
				out[i] = !rel[j]
			}
		case KindOrphaned:
			// Parent present and related row absent, read in one statement
			// (one snapshot): two reads could see a parent deleted, or a
			// related row written, between them.
			orph, err := c.probe.Orphaned(ctx, r.table, r.cols, r.where, r.related, r.relCols, r.relWhere, keys)
			if err != nil {
				return nil, err
			}
			for j, i := range idx {
				out[i] = orph[j]
			}
		case KindForbidden:
			// Both rows present, read in one statement (one snapshot).
			bad, err := c.probe.Forbidden(ctx, r.table, r.cols, r.where, r.related, r.relCols, r.relWhere, keys)
			if err != nil {
				return nil, err
			}
			for j, i := range idx {
				out[i] = bad[j]
			}
		}
		c.metrics.Checks.Add(float64(len(keys)))
	}
	return out, nil
}

// warnSometimes logs a surprise at most once a minute per topic.
func (c *Checker) warnSometimes(topic, msg string, fields ...zap.Field) {
	now := c.opt.Now()
	if now.Sub(c.lastWarn[topic]) < time.Minute {
		return
	}
	c.lastWarn[topic] = now
	c.log.Warn(msg, fields...)
}

// lru is a bounded map of monotonic values, least recently used first out.
type lru struct {
	max int
	ll  *list.List
	m   map[string]*list.Element
}

type lruEntry struct {
	k string
	v monoVal
}

func newLRU(max int) *lru {
	return &lru{max: max, ll: list.New(), m: map[string]*list.Element{}}
}

func (l *lru) get(k string) (monoVal, bool) {
	e, ok := l.m[k]
	if !ok {
		return monoVal{}, false
	}
	l.ll.MoveToFront(e)
	return e.Value.(*lruEntry).v, true
}

func (l *lru) peek(k string) (monoVal, bool) {
	e, ok := l.m[k]
	if !ok {
		return monoVal{}, false
	}
	return e.Value.(*lruEntry).v, true
}

// put stores v; when that evicts another key, it returns it.
func (l *lru) put(k string, v monoVal) (string, monoVal, bool) {
	if e, ok := l.m[k]; ok {
		e.Value.(*lruEntry).v = v
		l.ll.MoveToFront(e)
		return "", monoVal{}, false
	}
	l.m[k] = l.ll.PushFront(&lruEntry{k, v})
	if l.ll.Len() <= l.max {
		return "", monoVal{}, false
	}
	old := l.ll.Back()
	l.ll.Remove(old)
	e := old.Value.(*lruEntry)
	delete(l.m, e.k)
	return e.k, e.v, true
}

func (l *lru) remove(k string) {
	if e, ok := l.m[k]; ok {
		l.ll.Remove(e)
		delete(l.m, k)
	}
}

func (l *lru) len() int { return l.ll.Len() }

// Progress is a snapshot of what the checker holds.
type Progress struct {
	// StreamTime is the latest commit time seen, advanced with the wall
	// clock while no record arrives (deadlines are measured against it).
	StreamTime time.Time
	// OpenTransactions await their END record or changes; Pending are
	// windowed expectations awaiting a related row or their deadline;
	// Unflushed are violations not yet durable.
	OpenTransactions, Pending, Unflushed int
}

// Progress returns a snapshot of the checker's state.
func (c *Checker) Progress() Progress {
	c.mu.Lock()
	defer c.mu.Unlock()
	return Progress{StreamTime: time.UnixMilli(c.streamNowMs()), OpenTransactions: len(c.txns), Pending: len(c.pending),
		Unflushed: len(c.violations) + len(c.resolved)}
}

// Store returns the checker's store (violations and state).
func (c *Checker) Store() *Store { return c.store }
