package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Config bounds the pipeline. The zero value of each limit means its default.
type Config struct {
	Router RouterConfig
	// MaxInFlightMessages bounds messages accepted from the source and not yet
	// acknowledged by the sink. Default 50000.
	MaxInFlightMessages int
	// MaxInFlightBytes bounds their encoded size. Default 8 MiB.
	MaxInFlightBytes int64
	// MaxBatchMessages bounds one Sink.Write call. Default 4000.
	MaxBatchMessages int
	// Linger is how long the writer waits for more messages when fewer than
	// a quarter of MaxBatchMessages are ready, so that a slow trickle (a
	// backlog read by a starved process) is still written in sizeable
	// batches rather than one small request per message. It adds at most
	// Linger to the latency of a lightly loaded pipeline. Default 1ms;
	// negative disables.
	Linger time.Duration
	// DrainTimeout is how long, on a clean stop (Run's ctx ends), the
	// writer keeps writing what is already queued, acknowledging it, before
	// it gives up on the rest (which the source delivers again on the next
	// start). Default 10s; negative: stop at once.
	DrainTimeout time.Duration
}

func (c *Config) defaults() {
	if c.MaxInFlightMessages <= 0 {
		c.MaxInFlightMessages = 50000
	}
	if c.MaxInFlightBytes <= 0 {
		c.MaxInFlightBytes = 8 << 20
	}
	if c.MaxBatchMessages <= 0 {
		c.MaxBatchMessages = 4000
	}
	if c.Linger == 0 {
		c.Linger = time.Millisecond
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 10 * time.Second
	}
}

// Stats are the pipeline's counters, safe to read concurrently.
type Stats struct {
	Changes      atomic.Uint64 // row changes received from the source
	Transactions atomic.Uint64 // transactions received
	Published    atomic.Uint64 // messages durable in the sink
	Batches      atomic.Uint64 // Sink.Write calls that succeeded
	AckedLSN     atomic.Uint64 // the last end LSN acknowledged to the source
	ReceivedLSN  atomic.Uint64 // the last commit LSN received
	InFlight     atomic.Int64  // messages accepted and not yet durable
	InFlightSize atomic.Int64  // their bytes
	// SkippedTruncates counts truncates dropped by RouterConfig.SkipTruncates.
	SkippedTruncates atomic.Uint64
	// Messages counts logical decoding messages published.
	Messages atomic.Uint64
	// filteredBy counts changes dropped by row filters, by table
	// (*atomic.Uint64); see Filtered.
	filteredBy sync.Map
	byTable    sync.Map // table -> *TableCounts
}

// TableCounts counts one table's row changes by op (c, u, d, r, t as
// received; a key change counts once, as u).
type TableCounts struct{ Create, Update, Delete, Read, Truncate atomic.Uint64 }

func (c *TableCounts) add(op Op) {
	switch op {
	case OpCreate:
		c.Create.Add(1)
	case OpUpdate:
		c.Update.Add(1)
	case OpDelete:
		c.Delete.Add(1)
	case OpRead:
		c.Read.Add(1)
	case OpTruncate:
		c.Truncate.Add(1)
	}
}

func (s *Stats) tableCounts(table string) *TableCounts {
	n, ok := s.byTable.Load(table)
	if !ok {
		n, _ = s.byTable.LoadOrStore(table, new(TableCounts))
	}
	return n.(*TableCounts)
}

// Tables returns the row changes published per table ("schema.table").
func (s *Stats) Tables() map[string]*TableCounts {
	out := map[string]*TableCounts{}
	s.byTable.Range(func(k, v any) bool {
		out[k.(string)] = v.(*TableCounts)
		return true
	})
	return out
}

func (s *Stats) filtered(table string) {
	n, ok := s.filteredBy.Load(table)
	if !ok {
		n, _ = s.filteredBy.LoadOrStore(table, new(atomic.Uint64))
	}
	n.(*atomic.Uint64).Add(1)
}

// Filtered returns the changes dropped by row filters, by table.
func (s *Stats) Filtered() map[string]uint64 {
	out := map[string]uint64{}
	s.filteredBy.Range(func(k, v any) bool {
		out[k.(string)] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}

// Pipeline moves events from a Source to a Sink in order and acknowledges
// durable transactions. Build with New, then call Run once.
type Pipeline struct {
	cfg    Config
	src    Source
	sink   Sink
	router *Router
	log    *zap.Logger
	q      *queue
	stats  Stats
	now    func() time.Time
	onAck  func(commitTime, ackTime time.Time)
}

// Option configures a Pipeline.
type Option func(*Pipeline)

// WithLogger sets the logger (default: no-op).
func WithLogger(l *zap.Logger) Option { return func(p *Pipeline) { p.log = l } }

// WithAckHook calls fn for every transaction once it is durable, with its
// commit time (from Postgres) and the time of the acknowledgement. fn runs on
// the writer goroutine and MUST be fast (e.g. observe a histogram).
func WithAckHook(fn func(commitTime, ackTime time.Time)) Option {
	return func(p *Pipeline) { p.onAck = fn }
}

// WithClock sets the clock used for envelopes' ts_ms.
func WithClock(now func() time.Time) Option { return func(p *Pipeline) { p.now = now } }

// New builds a pipeline. It starts nothing.
func New(cfg Config, src Source, sink Sink, opts ...Option) (*Pipeline, error) {
	if cfg.Router.TopicPrefix == "" {
		return nil, errors.New("pipeline: Router.TopicPrefix is required")
	}
	cfg.defaults()
	p := &Pipeline{cfg: cfg, src: src, sink: sink, router: NewRouter(cfg.Router), log: zap.NewNop(), now: time.Now}
	p.router.counts = p.stats.tableCounts
	for _, o := range opts {
		o(p)
	}
	p.q = newQueue(cfg.MaxInFlightMessages, cfg.MaxInFlightBytes, &p.stats)
	p.q.batched = true
	return p, nil
}

// Stats returns the live counters.
func (p *Pipeline) Stats() *Stats { return &p.stats }

// Run reads from the source and writes to the sink until ctx ends or either
// fails. It returns ctx's error on cancellation. When ctx ends, reading
// stops at once and the writer drains: it writes and acknowledges what is
// queued (up to Config.DrainTimeout), so a clean stop leaves little for the
// next start to replay. Messages still unwritten then are not acknowledged:
// the source delivers them again later.
func (p *Pipeline) Run(parent context.Context) error {
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	// The writer's context outlives parent by the drain.
	wctx, cancelWrite := context.WithCancelCause(context.WithoutCancel(parent))
	defer cancelWrite(nil)
	readDone := make(chan struct{})
	writeDone := make(chan struct{})
	var readErr, writeErr error
	go func() {
		readErr = p.read(ctx)
		close(readDone)
		if parent.Err() == nil {
			cancelWrite(readErr) // a failure, not a stop: no drain
		}
	}()
	go func() {
		defer close(writeDone)
		writeErr = p.write(wctx, readDone)
		if errors.Is(writeErr, errDrained) {
			writeErr = nil
		}
		cancel(writeErr)
	}()
	select {
	case <-writeDone:
	case <-parent.Done():
		if p.cfg.DrainTimeout < 0 {
			cancelWrite(context.Cause(parent))
			break
		}
		t := time.NewTimer(p.cfg.DrainTimeout)
		select {
		case <-writeDone:
		case <-t.C:
			p.log.Warn("stopping: the writer did not drain in time; what is left is delivered again on the next start",
				zap.Duration("drain_timeout", p.cfg.DrainTimeout), zap.Int64("in_flight", p.stats.InFlight.Load()))
			cancelWrite(context.Cause(parent))
		}
		t.Stop()
	}
	<-writeDone
	<-readDone
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	if readErr != nil && !errors.Is(readErr, context.Canceled) {
		return readErr
	}
	if writeErr != nil && !errors.Is(writeErr, context.Canceled) {
		return writeErr
	}
	return ctx.Err()
}

// next returns the next events: a batch from a BatchSource, else one.
func (p *Pipeline) next(ctx context.Context, dst []Event) ([]Event, error) {
	if bs, ok := p.src.(BatchSource); ok {
		return bs.NextBatch(ctx, dst)
	}
	ev, err := p.src.Next(ctx)
	if err != nil {
		return dst, err
	}
	return append(dst, ev), nil
}

func (p *Pipeline) read(ctx context.Context) error {
	var st *txnState
	var msgs []Message
	var evs []Event
	for {
		var err error
		clear(evs)
		if evs, err = p.next(ctx, evs[:0]); err != nil {
			return err
		}
		now := p.now()
		for i := range evs {
			if st, msgs, err = p.handle(ctx, &evs[i], st, msgs, now); err != nil {
				return err
			}
		}
		// One wake-up of the writer per source batch, not per message.
		p.q.wake()
	}
}

// handle turns one event into queued messages. st is the open transaction.
func (p *Pipeline) handle(ctx context.Context, ev *Event, st *txnState, msgs []Message, now time.Time) (*txnState, []Message, error) {
	var err error
	switch ev.Kind {
	case EventBegin:
		// A Begin while a transaction is open: the source reconnected and
		// will deliver the open transaction again from its start. Its BEGIN
		// record waits for its first change: a transaction without one
		// (empty, as Postgres 14 and older send them, or whose changes were
		// all skipped) publishes no BEGIN and no END, and is still
		// acknowledged.
		st = &txnState{info: ev.Txn}
		p.stats.ReceivedLSN.Store(uint64(ev.Txn.CommitLSN))
	case EventChange:
		if st == nil || st.info != ev.Txn {
			what := "a logical message"
			if ev.Change.Rel != nil {
				what = ev.Change.Rel.QualifiedName()
			}
			return st, msgs, fmt.Errorf("pipeline: change on %s outside its transaction", what)
		}
		if ev.Change.Op == OpMessage {
			// A logical message: no BEGIN/END of its own (the END record
			// counts row changes), a position apart from the changes'.
			if ev.Change.Message == nil {
				return st, msgs, errors.New("pipeline: a logical message change without its message")
			}
			msgs = p.router.encodeMessage(msgs[:0], st, &ev.Change, now)
			for i := range msgs {
				if err := p.q.push(ctx, entry{msg: msgs[i]}); err != nil {
					return st, msgs, err
				}
				msgs[i] = Message{}
			}
			p.stats.Messages.Add(1)
			return st, msgs, nil
		}
		ch := &ev.Change
		if len(p.cfg.Router.Filters) > 0 { // (the table's name is built only then: no allocation per change)
			if f := p.cfg.Router.Filters[ch.Rel.QualifiedName()]; f != nil {
				c, keep := filterChange(f, ch)
				if !keep {
					p.stats.filtered(ch.Rel.QualifiedName())
					return st, msgs, nil
				}
				ch = &c
			}
		}
		if ev.Change.Op == OpTruncate && p.cfg.Router.SkipTruncates {
			if p.stats.SkippedTruncates.Add(1) == 1 {
				p.log.Warn("a truncate was not published (pipeline.truncate: skip); later ones are counted in tidemark_truncates_skipped_total",
					zap.String("table", ev.Change.Rel.QualifiedName()), zap.Stringer("commit_lsn", ev.Txn.CommitLSN))
			}
			return st, msgs, nil
		}
		if p.cfg.Router.TransactionsTopic && !st.begun {
			st.begun = true
			if err := p.q.push(ctx, entry{msg: p.router.txnRecord(st, false)}); err != nil {
				return st, msgs, err
			}
		}
		p.stats.Changes.Add(1)
		msgs, err = p.router.encodeChange(msgs[:0], st, ch, now)
		if err != nil {
			return st, msgs, err
		}
		if n := p.router.skippedTruncates; n > 0 {
			p.router.skippedTruncates = 0
			if p.stats.SkippedTruncates.Add(n) == n {
				p.log.Warn("a truncate was not published to a rows-format topic (the format has no truncate); later ones are counted in tidemark_truncates_skipped_total",
					zap.String("table", ev.Change.Rel.QualifiedName()), zap.Stringer("commit_lsn", ev.Txn.CommitLSN))
			}
		}
		for i := range msgs {
			if err := p.q.push(ctx, entry{msg: msgs[i]}); err != nil {
				return st, msgs, err
			}
			msgs[i] = Message{}
		}
	case EventCommit:
		if st == nil || st.info != ev.Txn {
			return st, msgs, errors.New("pipeline: commit without its begin")
		}
		p.stats.Transactions.Add(1)
		e := entry{ack: ev.Txn.EndLSN, commitTime: ev.Txn.CommitTime}
		if p.cfg.Router.TransactionsTopic && st.begun {
			e.msg = p.router.txnRecord(st, true)
		}
		if err := p.q.push(ctx, e); err != nil {
			return st, msgs, err
		}
		st = nil
	default:
		return st, msgs, fmt.Errorf("pipeline: unknown event kind %d", ev.Kind)
	}
	return st, msgs, nil
}

// errDrained ends the writer on a clean stop: the reader is done and
// everything it queued was written.
var errDrained = errors.New("pipeline: drained")

// write writes queued entries until ctx ends or, once readDone is closed,
// the queue is empty (errDrained).
func (p *Pipeline) write(ctx context.Context, readDone <-chan struct{}) error {
	batch := make([]entry, 0, p.cfg.MaxBatchMessages)
	msgs := make([]Message, 0, p.cfg.MaxBatchMessages)
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for {
		var err error
		batch, err = p.q.take(ctx, batch[:0], p.cfg.MaxBatchMessages, readDone)
		if err != nil {
			return err
		}
		if want := p.cfg.MaxBatchMessages / 4; p.cfg.Linger > 0 && len(batch) < want {
			if batch, err = p.q.fill(ctx, batch, p.cfg.MaxBatchMessages, want, p.cfg.Linger, linger, readDone); err != nil {
				return err
			}
		}
		msgs = msgs[:0]
		var ack LSN
		var size int64
		for i := range batch {
			if batch[i].msg.Topic != "" {
				msgs = append(msgs, batch[i].msg)
			}
			if batch[i].ack > ack {
				ack = batch[i].ack
			}
			size += batch[i].size
		}
		if len(msgs) > 0 {
			if err := p.sink.Write(ctx, msgs); err != nil {
				return fmt.Errorf("writing %d messages to sink: %w", len(msgs), err)
			}
			p.stats.Published.Add(uint64(len(msgs)))
			p.stats.Batches.Add(1)
		}
		if ack > 0 {
			p.stats.AckedLSN.Store(uint64(ack))
			p.src.Ack(ack)
			if p.onAck != nil {
				now := time.Now()
				for i := range batch {
					if batch[i].ack > 0 {
						p.onAck(batch[i].commitTime, now)
					}
				}
			}
		}
		clear(msgs)
		clear(batch)
		p.q.release(len(batch), size)
	}
}

type entry struct {
	msg        Message
	ack        LSN // the end LSN of the transaction this entry completes, or 0
	commitTime time.Time
	size       int64
}

// queue is a FIFO bounded by count and bytes. Budget is held from push until
// release, i.e. until the sink made the entries durable. Entries live in a
// ring that grows (by doubling, up to the count bound) but never shifts.
type queue struct {
	mu       sync.Mutex
	ring     []entry
	head     int // index of the oldest queued entry
	n        int // queued entries (not yet taken)
	count    int // budget in use: queued + taken and not released
	bytes    int64
	maxCount int
	maxBytes int64
	blocked  bool // the reader waits for budget (see fill)
	// batched: push does not wake the writer; the reader calls wake after
	// each batch of events (set once, before use).
	batched bool
	space   chan struct{}
	ready   chan struct{}
	stats   *Stats
}

func newQueue(maxCount int, maxBytes int64, stats *Stats) *queue {
	return &queue{maxCount: maxCount, maxBytes: maxBytes, ring: make([]entry, min(1024, maxCount)),
		space: make(chan struct{}, 1), ready: make(chan struct{}, 1), stats: stats}
}

func entrySize(e *entry) int64 {
	n := int64(len(e.msg.Key) + len(e.msg.Value) + len(e.msg.Topic) + 64)
	for _, h := range e.msg.Headers {
		n += int64(len(h.Key) + len(h.Value))
	}
	return n
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// push appends e, waiting for budget. An entry larger than the whole byte
// budget is admitted when the queue is empty, so it cannot deadlock.
func (q *queue) push(ctx context.Context, e entry) error {
	e.size = entrySize(&e)
	for {
		q.mu.Lock()
		if q.count == 0 || (q.count < q.maxCount && q.bytes+e.size <= q.maxBytes) {
			if q.n == len(q.ring) {
				q.grow()
			}
			q.ring[(q.head+q.n)%len(q.ring)] = e
			q.n++
			q.count++
			q.bytes += e.size
			q.stats.InFlight.Store(int64(q.count))
			q.stats.InFlightSize.Store(q.bytes)
			q.blocked = false
			q.mu.Unlock()
			if !q.batched {
				signal(q.ready)
			}
			return nil
		}
		q.blocked = true
		q.mu.Unlock()
		// Wake a lingering writer (see fill): no more is coming until it
		// writes.
		signal(q.ready)
		select {
		case <-q.space:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// wake tells the writer that entries are queued (see batched).
func (q *queue) wake() { signal(q.ready) }

// grow doubles the ring, unrolling it so the oldest entry is at index 0.
func (q *queue) grow() {
	bigger := make([]entry, max(2*len(q.ring), 16))
	k := copy(bigger, q.ring[q.head:])
	copy(bigger[k:], q.ring[:q.head])
	q.ring = bigger
	q.head = 0
}

// take moves up to max queued entries to dst, waiting for at least one. Once
// done is closed (nothing more will be queued), an empty queue is
// errDrained.
func (q *queue) take(ctx context.Context, dst []entry, max int, done <-chan struct{}) ([]entry, error) {
	for {
		// Seen closed before the look at the queue: every push of the
		// reader happened before it, so an empty queue stays empty.
		finished := isClosed(done)
		q.mu.Lock()
		if q.n > 0 {
			dst = q.popLocked(dst, max)
			q.mu.Unlock()
			return dst, nil
		}
		q.mu.Unlock()
		if finished {
			return dst, errDrained
		}
		select {
		case <-q.ready:
		case <-done:
		case <-ctx.Done():
			return dst, ctx.Err()
		}
	}
}

// isClosed reports whether c is closed (a nil c never is).
func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// popLocked moves up to max of the oldest queued entries to dst. q.mu is
// held.
func (q *queue) popLocked(dst []entry, max int) []entry {
	n := min(q.n, max)
	for i := 0; i < n; i++ {
		j := (q.head + i) % len(q.ring)
		dst = append(dst, q.ring[j])
		q.ring[j] = entry{}
	}
	q.head = (q.head + n) % len(q.ring)
	q.n -= n
	return dst
}

// fill adds queued entries to dst (up to max) as they arrive, until it
// holds want, d has passed, or the budget is used up (the reader then waits
// for this writer). t is a stopped timer it may use.
func (q *queue) fill(ctx context.Context, dst []entry, max, want int, d time.Duration, t *time.Timer, done <-chan struct{}) ([]entry, error) {
	t.Reset(d)
	defer t.Stop()
	for len(dst) < want {
		select {
		case <-q.ready:
			q.mu.Lock()
			dst = q.popLocked(dst, max-len(dst))
			more := q.n > 0
			full := q.blocked
			q.mu.Unlock()
			if more {
				signal(q.ready)
			}
			if full {
				return dst, nil
			}
		case <-t.C:
			return dst, nil
		case <-done:
			return dst, nil
		case <-ctx.Done():
			return dst, ctx.Err()
		}
	}
	return dst, nil
}

// release returns the budget of n entries of the given total size.
func (q *queue) release(n int, size int64) {
	q.mu.Lock()
	q.count -= n
	q.bytes -= size
	q.stats.InFlight.Store(int64(q.count))
	q.stats.InFlightSize.Store(q.bytes)
	q.mu.Unlock()
	signal(q.space)
}
