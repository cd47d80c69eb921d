package targets

import (
	"context"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

// Stats are the handler's counters.
type Stats struct {
	Changes       atomic.Uint64 // membership and user changes handled
	RoomsSettled  atomic.Uint64 // room settlements that changed targets
	Added         atomic.Uint64
	Removed       atomic.Uint64
	HeldExpired   atomic.Uint64 // transactions settled after the hold without being known complete
	SettleErrors  atomic.Uint64
	PendingRooms  atomic.Int64
	PendingTxns   atomic.Int64
	LastSettledAt atomic.Int64 // unix nanos
}

// HandlerConfig configures a Handler.
type HandlerConfig struct {
	Mapping Mapping
	Store   *Store
	// Publish receives settled room updates (required).
	Publish Publisher
	// Ends, when set, says when a transaction is complete; without it every
	// transaction counts as complete at the end of each consumer batch.
	Ends *TxnIndex
	// Hold bounds how long a room waits for an incomplete transaction
	// (whose END record or remaining changes have not arrived). Default 2s.
	Hold time.Duration
	// Now is the clock that starts and ends holds and stamps
	// Stats.LastSettledAt (Run still ticks in real time, settling what Now
	// says is due). Default time.Now; tests pass a fake clock.
	Now func() time.Time
	// MaxSettleRooms bounds the rooms one Flush or tick settles (in
	// transactions of 500). The rest wait for the next Flush or tick, after
	// the rooms of transactions that became ready meanwhile: a deactivation
	// in 100,000 rooms is settled in slices while other rooms' changes keep
	// being applied and settled. Default 2000.
	MaxSettleRooms int
}

// settleChunk is the most rooms settled in one state transaction.
const settleChunk = 500

// Handler turns membership and user changes into facts (Flush stores them
// and marks rooms dirty, durably, before the consumer commits offsets) and
// settles rooms once every transaction that touched them is complete: the
// net effect of a transaction is published, never its intermediate states
// (a DELETE then INSERT of the same membership is no change at all).
//
// Handle and Flush are called by the consumer goroutine; Run settles held
// rooms from its own goroutine. Both take the handler's lock.
type Handler struct {
	cfg   HandlerConfig
	c     *compiled
	log   *zap.Logger
	stats Stats

	mu      sync.Mutex
	members []MemberFact
	users   []UserFact
	truncM  *pipeline.Position
	truncU  *pipeline.Position
	pending map[pipeline.LSN]*pendingTxn
	// stale are settled transactions whose kept waits could not be
	// forgotten (a failed settlement): forgotten with the next one.
	stale   []pipeline.LSN
	lastErr time.Time
	// backlogged: the last settleReady left rooms over its budget.
	backlogged bool
}

// maxStale bounds Handler.stale; past it, Store.Waiting prunes what is left
// at the next start.
const maxStale = 10000

type pendingTxn struct {
	seen   map[string]int
	truncs map[pipeline.Position]bool
	rooms  map[string]bool
	since  time.Time
	// first is the earliest record timestamp of its changes (zero: unknown).
	first time.Time
	// marks is the highest seq handled per "topic/partition"; prior is the
	// marks an earlier run kept: a change at or below them was counted by
	// that run (a partition delivers a transaction's changes in seq order,
	// and redelivers from the committed offset on).
	marks map[string]uint32
	prior map[string]uint32
	// changed: handled changes not yet kept; kept: notify_txns and
	// notify_waits hold it (Settle or Done must forget it).
	changed, kept bool
}

func newPending(since time.Time) *pendingTxn {
	return &pendingTxn{seen: map[string]int{}, rooms: map[string]bool{}, marks: map[string]uint32{}, since: since}
}

var (
	_ invalidation.Handler = (*Handler)(nil)
	_ invalidation.Flusher = (*Handler)(nil)
)

// NewHandler checks the mapping. It starts nothing.
func NewHandler(cfg HandlerConfig, log *zap.Logger) (*Handler, error) {
	c, err := compile(cfg.Mapping)
	if err != nil {
		return nil, err
	}
	if cfg.Hold <= 0 {
		cfg.Hold = 2 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxSettleRooms <= 0 {
		cfg.MaxSettleRooms = 2000
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Handler{cfg: cfg, c: c, log: log, pending: map[pipeline.LSN]*pendingTxn{}}, nil
}

// Tables returns the membership and user tables.
func (h *Handler) Tables() []string { return []string{h.c.m.Membership.Table, h.c.m.Users.Table} }

// Stats returns the live counters.
func (h *Handler) Stats() *Stats { return &h.stats }

// Handle collects the facts a change implies.
func (h *Handler) Handle(_ context.Context, m *invalidation.Message) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	env := m.Env
	pos := m.Pos
	p := h.pending[pos.CommitLSN]
	if p == nil {
		p = newPending(h.cfg.Now())
		h.pending[pos.CommitLSN] = p
	}
	p.changed = true
	if !m.Time.IsZero() && (p.first.IsZero() || m.Time.Before(p.first)) {
		p.first = m.Time
	}
	part := m.Topic + "/" + strconv.Itoa(m.Partition)
	prior, counted := p.prior[part]
	counted = counted && pos.Seq <= prior
	if cur, ok := p.marks[part]; !ok || pos.Seq > cur {
		p.marks[part] = pos.Seq
	}
	if env.Op == "t" {
		// A truncate is broadcast to every partition: count it once.
		if p.truncs == nil {
			p.truncs = map[pipeline.Position]bool{}
		}
		if !p.truncs[pos] {
			p.truncs[pos] = true
			p.seen[m.Table]++
		}
	} else if !counted {
		p.seen[m.Table]++
	}
	h.stats.Changes.Add(1)
	switch m.Table {
	case h.c.m.Membership.Table:
		if env.Op == "t" {
			h.truncM = maxPos(h.truncM, pos)
			return nil
		}
		h.members = h.c.memberFacts(env, pos, h.members)
	case h.c.m.Users.Table:
		if env.Op == "t" {
			h.truncU = maxPos(h.truncU, pos)
			return nil
		}
		if f, ok := h.c.userFact(env, pos); ok {
			h.users = append(h.users, f)
		}
	default:
		return invalidation.ErrNoHandler
	}
	return nil
}

func maxPos(cur *pipeline.Position, p pipeline.Position) *pipeline.Position {
	if cur == nil || cur.Less(p) {
		return &p
	}
	return cur
}

// Flush stores the batch's facts and marks their rooms dirty, together
// with what those rooms wait for (the incomplete transactions that touched
// them, and what has been handled of each), durable when it returns; then
// it settles the rooms whose transactions are complete. A settlement that
// fails is retried by Run; the rooms stay dirty.
func (h *Handler) Flush(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var waiting map[pipeline.LSN]*TxnProgress
	for lsn, p := range h.pending {
		if lsn == 0 || !p.changed || h.complete(lsn, p) {
			continue
		}
		if waiting == nil {
			waiting = map[pipeline.LSN]*TxnProgress{}
		}
		waiting[lsn] = p.progress(lsn)
	}
	if len(h.members) > 0 || len(h.users) > 0 || h.truncM != nil || h.truncU != nil || len(waiting) > 0 {
		touched, err := h.cfg.Store.Apply(ctx, h.members, h.users, h.truncM, h.truncU, waiting)
		if err != nil {
			return err
		}
		for _, rp := range touched {
			p := h.pending[rp.Pos.CommitLSN]
			if p == nil { // settled meanwhile (cannot happen under the lock); keep the room
				p = newPending(h.cfg.Now())
				h.pending[rp.Pos.CommitLSN] = p
			}
			p.rooms[rp.Room] = true
		}
		for lsn := range waiting {
			if p := h.pending[lsn]; len(p.rooms) > 0 {
				p.kept = true
			}
		}
		h.members, h.users, h.truncM, h.truncU = h.members[:0], h.users[:0], nil, nil
	}
	for _, p := range h.pending {
		p.changed = false
	}
	h.settleReady(ctx)
	return nil
}

// progress is what Store.Apply keeps of an incomplete transaction.
func (p *pendingTxn) progress(lsn pipeline.LSN) *TxnProgress {
	tp := &TxnProgress{LSN: lsn, FirstRecord: p.first, Seen: maps.Clone(p.seen), Marks: maps.Clone(p.marks), HasRooms: len(p.rooms) > 0}
	for pos := range p.truncs {
		tp.Truncs = append(tp.Truncs, pos.Seq)
	}
	slices.Sort(tp.Truncs)
	return tp
}

// Recover queues what an earlier run left: rooms waiting for incomplete
// transactions (Store.Waiting) wait for those transactions' END records
// (and remaining changes) as if the run had not stopped, for at most the
// hold from now; the other dirty rooms (their transactions were complete)
// are settled at once. Call it before the consumer starts.
func (h *Handler) Recover(rooms []string, waiting []TxnProgress) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.cfg.Now()
	held := map[string]bool{}
	for _, w := range waiting {
		if w.LSN == 0 {
			continue
		}
		p := h.pending[w.LSN]
		if p == nil {
			p = newPending(now)
			h.pending[w.LSN] = p
		}
		p.kept = true
		if !w.FirstRecord.IsZero() && (p.first.IsZero() || w.FirstRecord.Before(p.first)) {
			p.first = w.FirstRecord
		}
		for t, n := range w.Seen {
			p.seen[t] += n
		}
		if p.prior == nil {
			p.prior = map[string]uint32{}
		}
		for part, seq := range w.Marks {
			p.prior[part] = max(p.prior[part], seq)
			p.marks[part] = max(p.marks[part], seq)
		}
		if len(w.Truncs) > 0 && p.truncs == nil {
			p.truncs = map[pipeline.Position]bool{}
		}
		for _, seq := range w.Truncs {
			p.truncs[pipeline.Position{CommitLSN: w.LSN, Seq: seq}] = true
		}
		for _, r := range w.Rooms {
			p.rooms[r] = true
			held[r] = true
		}
	}
	var due []string
	for _, r := range rooms {
		if !held[r] {
			due = append(due, r)
		}
	}
	if len(due) > 0 {
		p := h.pending[0]
		if p == nil {
			p = newPending(time.Time{}) // due at once
			h.pending[0] = p
		}
		for _, r := range due {
			p.rooms[r] = true
		}
	}
	h.gauge()
}

// Run settles held rooms every tick until ctx ends.
func (h *Handler) Run(ctx context.Context) error {
	t := time.NewTicker(min(100*time.Millisecond, h.cfg.Hold/4))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			// A backlog over MaxSettleRooms is worked off slice by slice
			// without waiting for the next tick; the lock is released
			// between slices, so Handle and Flush go on meanwhile.
			for more := true; more && ctx.Err() == nil; {
				h.mu.Lock()
				h.settleReady(ctx)
				more = h.backlogged
				h.mu.Unlock()
			}
		}
	}
}

// complete reports whether every change of the transaction on the mapped
// tables has been handled.
func (h *Handler) complete(lsn pipeline.LSN, p *pendingTxn) bool {
	if h.cfg.Ends == nil {
		return true
	}
	counts, ok := h.cfg.Ends.Lookup(lsn)
	if !ok {
		// Older than the index (a backlog from before it started): its END
		// will never be read, so do as without an index.
		return lsn != 0 && h.cfg.Ends.Started() && !h.cfg.Ends.Covers(lsn)
	}
	for t, n := range counts {
		if p.seen[t] < n {
			return false
		}
	}
	return true
}

// settleReady settles the rooms of complete (or held too long)
// transactions, except rooms an incomplete transaction also touched. Called
// with h.mu held.
func (h *Handler) settleReady(ctx context.Context) {
	h.backlogged = false
	if len(h.pending) == 0 {
		return
	}
	now := h.cfg.Now()
	blocked := map[string]bool{}
	var ready []pipeline.LSN
	for lsn, p := range h.pending {
		if h.complete(lsn, p) {
			ready = append(ready, lsn)
			continue
		}
		if now.Sub(p.since) >= h.cfg.Hold {
			ready = append(ready, lsn)
			if len(p.rooms) > 0 && lsn != 0 {
				h.stats.HeldExpired.Add(1)
			}
			continue
		}
		for r := range p.rooms {
			blocked[r] = true
		}
	}
	// fresh are the rooms of transactions ready now; backlog those left
	// over (pending[0]: a failed settlement, Recover, the budget). Fresh
	// rooms go first, so a large backlog never delays them for long.
	fresh, backlog := map[string]bool{}, map[string]bool{}
	done := h.stale
	for _, lsn := range ready {
		p := h.pending[lsn]
		for r := range p.rooms {
			switch {
			case blocked[r]:
			case lsn == 0:
				backlog[r] = true
			default:
				fresh[r] = true
			}
		}
		if p.kept && lsn != 0 {
			done = append(done, lsn)
		}
	}
	h.stale = nil
	// Within the budget, fresh rooms go first but leave at least half of
	// it to the backlog when there is one, so neither starves the other.
	freshList := sortedKeys(fresh)
	var backList []string
	for _, r := range sortedKeys(backlog) {
		if !fresh[r] {
			backList = append(backList, r)
		}
	}
	budget := h.cfg.MaxSettleRooms
	nFresh := min(len(freshList), budget-min(len(backList), budget/2))
	nBack := min(len(backList), budget-nFresh)
	list := append(append([]string(nil), freshList[:nFresh]...), backList[:nBack]...)
	rest := append(append([]string(nil), freshList[nFresh:]...), backList[nBack:]...)
	h.backlogged = len(rest) > 0
	if len(list) == 0 && len(done) > 0 {
		// Every room is held by another transaction: forget the kept
		// waits of these alone.
		if err := h.cfg.Store.Done(ctx, done); err != nil {
			h.keepStale(done)
		}
	}
	for start := 0; start < len(list); start += settleChunk {
		chunk := list[start:min(start+settleChunk, len(list))]
		ups, err := h.cfg.Store.Settle(ctx, chunk, done, h.cfg.Publish)
		if err != nil {
			// The settlement may not have committed: forget them again
			// with the next one (forgetting twice is harmless).
			h.keepStale(done)
		}
		done = nil
		h.count(ups)
		if err != nil {
			h.stats.SettleErrors.Add(1)
			if ctx.Err() == nil && now.Sub(h.lastErr) > 10*time.Second {
				h.lastErr = now
				h.log.Warn("settling notification targets failed; retrying (rooms stay dirty)", zap.Error(err))
			}
			// Keep the unsettled rooms in one retry entry (due at once), not
			// their transactions: memory stays bounded by the number of
			// rooms however long an output is down.
			retry := h.pending[0]
			if retry == nil {
				retry = newPending(time.Time{})
				h.pending[0] = retry
			}
			retry.since = time.Time{}
			for _, r := range list[start:] {
				retry.rooms[r] = true
			}
			for _, r := range rest {
				retry.rooms[r] = true
			}
			h.backlogged = false // retried at the next tick, not at once
			h.forget(ready)
			return
		}
		if p := h.pending[0]; p != nil {
			for _, r := range chunk {
				delete(p.rooms, r)
			}
		}
	}
	if len(rest) > 0 {
		// Over the budget: the next Flush or tick goes on.
		backlog := h.pending[0]
		if backlog == nil {
			backlog = newPending(time.Time{})
			h.pending[0] = backlog
		}
		for _, r := range rest {
			backlog.rooms[r] = true
		}
	}
	h.forget(ready)
}

// keepStale remembers settled transactions whose kept waits may remain,
// up to maxStale.
func (h *Handler) keepStale(done []pipeline.LSN) {
	h.stale = append(h.stale, done[:min(len(done), max(0, maxStale-len(h.stale)))]...)
}

// forget drops settled transactions (and an emptied retry entry).
func (h *Handler) forget(ready []pipeline.LSN) {
	for _, lsn := range ready {
		if lsn == 0 {
			continue
		}
		delete(h.pending, lsn)
		if h.cfg.Ends != nil {
			h.cfg.Ends.Forget(lsn)
		}
	}
	if p := h.pending[0]; p != nil && len(p.rooms) == 0 {
		delete(h.pending, 0)
	}
	h.gauge()
}

func (h *Handler) count(ups []RoomUpdate) {
	for _, u := range ups {
		h.stats.RoomsSettled.Add(1)
		for _, c := range u.Changes {
			if c.Added {
				h.stats.Added.Add(1)
			} else {
				h.stats.Removed.Add(1)
			}
		}
	}
	if len(ups) > 0 {
		h.stats.LastSettledAt.Store(h.cfg.Now().UnixNano())
	}
}

func (h *Handler) gauge() {
	n := 0
	for _, p := range h.pending {
		n += len(p.rooms)
	}
	h.stats.PendingRooms.Store(int64(n))
	h.stats.PendingTxns.Store(int64(len(h.pending)))
}
