package invalidation

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"
)

// RuleHandler's sinks: one queue and one goroutine each (see RuleHandler).

// output is one sink's queue and progress.
type output struct {
	name string
	sink Invalidator
	wake chan struct{} // a batch was queued

	mu       sync.Mutex
	queue    []*job
	assigned uint64 // last token handed to this sink, with or without keys

	backlogKeys  atomic.Int64
	backlogBytes atomic.Int64
	errors       atomic.Uint64
	failing      atomic.Bool
}

// job is one flushed batch; every sink's queue shares it (read-only).
type job struct {
	token uint64
	keys  []string
	// patterns are deleted by the sinks that can (PatternInvalidator),
	// before the keys.
	patterns []string
	at       []KeyAt
	bytes    int64
	remain   atomic.Int32 // sinks that do not have it yet
}

// SinkStats are one sink's live counters (for metrics).
type SinkStats struct {
	Name string
	// BacklogKeys and BacklogBytes are what waits for this sink.
	BacklogKeys, BacklogBytes *atomic.Int64
	// Errors counts failed attempts; Failing is true from a failure until
	// the next success.
	Errors  *atomic.Uint64
	Failing *atomic.Bool
}

// SinkName names a sink in logs and metrics: its SinkName method if it has
// one, else its package ("redis", "webhook").
func SinkName(s Invalidator) string {
	if n, ok := s.(interface{ SinkName() string }); ok {
		return n.SinkName()
	}
	name := strings.TrimPrefix(fmt.Sprintf("%T", s), "*")
	if i := strings.IndexByte(name, '.'); i >= 0 {
		name = name[:i]
	}
	return name
}

// SinkName is "topic".
func (t *TopicInvalidator) SinkName() string { return "topic" }

// Stats returns each sink's counters, in configuration order.
func (h *RuleHandler) Stats() []SinkStats {
	out := make([]SinkStats, len(h.outs))
	for i, o := range h.outs {
		out[i] = SinkStats{Name: o.name, BacklogKeys: &o.backlogKeys, BacklogBytes: &o.backlogBytes, Errors: &o.errors, Failing: &o.failing}
	}
	return out
}

var _ AsyncFlusher = (*RuleHandler)(nil)

// FlushAsync queues the collected keys for every sink and returns the
// batch's token. It blocks while a sink's backlog would exceed
// MaxBacklogBytes (backpressure), until there is room or ctx ends.
func (h *RuleHandler) FlushAsync(ctx context.Context) (uint64, error) {
	var j *job
	if len(h.pending) > 0 || len(h.patterns) > 0 {
		j = &job{keys: h.pending, at: h.at, patterns: h.patterns}
		for _, k := range h.pending {
			j.bytes += int64(len(k)) + keyOverhead
		}
		for _, p := range h.patterns {
			j.bytes += int64(len(p)) + keyOverhead
		}
		if h.full(j.bytes) {
			log := h.Log
			if log == nil {
				log = zap.NewNop()
			}
			since := time.Now()
			log.Warn("invalidation sink backlog full: the consumer stops fetching, so every sink waits, until the lagging sink drains",
				zap.Strings("full", h.fullSinks(j.bytes)), zap.Int64("max_backlog_bytes", h.maxBacklog()))
			for h.full(j.bytes) {
				select {
				case <-ctx.Done():
					return 0, ctx.Err()
				case <-h.room:
				}
			}
			log.Warn("invalidation sink backlog below the bound again: fetching resumes", zap.Duration("paused_for", time.Since(since)))
		}
		// The job owns the slices now: start new ones.
		h.pending, h.at, h.patterns = nil, nil, nil
		clear(h.seen)
	}
	h.token++
	if j != nil {
		j.token = h.token
		j.remain.Store(int32(len(h.outs)))
	}
	for _, o := range h.outs {
		o.mu.Lock()
		o.assigned = h.token
		if j != nil {
			o.queue = append(o.queue, j)
			o.backlogKeys.Add(int64(len(j.keys)))
			o.backlogBytes.Add(j.bytes)
		}
		o.mu.Unlock()
		if j != nil {
			signal(o.wake)
		}
	}
	if j == nil || len(h.outs) == 0 {
		if j != nil {
			h.Invalidated.Add(uint64(len(j.keys)))
		}
		h.advanced()
	}
	return h.token, nil
}

// full reports whether queueing n more bytes would overflow a sink that
// already holds a backlog (a batch larger than the bound still passes an
// empty queue).
func (h *RuleHandler) full(n int64) bool { return len(h.fullSinks(n)) > 0 }

// fullSinks names the sinks full (see full).
func (h *RuleHandler) fullSinks(n int64) []string {
	max := h.maxBacklog()
	var out []string
	for _, o := range h.outs {
		if b := o.backlogBytes.Load(); b > 0 && b+n > max {
			out = append(out, o.name)
		}
	}
	return out
}

func (h *RuleHandler) maxBacklog() int64 {
	if h.MaxBacklogBytes <= 0 {
		return DefaultMaxBacklogBytes
	}
	return h.MaxBacklogBytes
}

// Durable returns the highest token such that it and every earlier one are
// durable in every sink.
func (h *RuleHandler) Durable() uint64 {
	d := uint64(0)
	for i, o := range h.outs {
		o.mu.Lock()
		od := o.assigned
		if len(o.queue) > 0 {
			od = o.queue[0].token - 1
		}
		o.mu.Unlock()
		if i == 0 || od < d {
			d = od
		}
	}
	if len(h.outs) == 0 {
		return h.token
	}
	return d
}

// Run delivers each sink's queue, one goroutine per sink, until ctx ends;
// notify is called (from those goroutines; it must not block) whenever
// Durable may have advanced. Call it once.
func (h *RuleHandler) Run(ctx context.Context, notify func()) error {
	h.notify.Store(&notify)
	h.running.Store(true)
	defer h.running.Store(false)
	var wg sync.WaitGroup
	for _, o := range h.outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.deliverLoop(ctx, o)
		}()
	}
	wg.Wait()
	return nil
}

// deliverLoop sends o's batches in order, retrying the oldest with backoff
// until it succeeds or ctx ends.
func (h *RuleHandler) deliverLoop(ctx context.Context, o *output) {
	log := h.Log
	if log == nil {
		log = zap.NewNop()
	}
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 50 * time.Millisecond
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0
	bo.Reset() // NewExponentialBackOff reset with the defaults already
	var since time.Time
	for {
		o.mu.Lock()
		var j *job
		if len(o.queue) > 0 {
			j = o.queue[0]
		}
		o.mu.Unlock()
		if j == nil {
			select {
			case <-ctx.Done():
				return
			case <-o.wake:
			}
			continue
		}
		err := h.deliver(ctx, o, j)
		if err == nil {
			if o.failing.Load() {
				o.failing.Store(false)
				log.Warn("invalidation sink recovered", zap.String("sink", o.name),
					zap.Duration("failed_for", time.Since(since)), zap.Int64("backlog_keys", o.backlogKeys.Load()))
			}
			bo.Reset()
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if !o.failing.Load() {
			since = time.Now()
			o.failing.Store(true)
			log.Warn("invalidation sink failing; retrying with backoff (the other sinks go on; offsets wait for this one)",
				zap.String("sink", o.name), zap.Int("batch_keys", len(j.keys)), zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(bo.NextBackOff()):
		}
	}
}

// deliver sends j to o once; on success it leaves o's queue.
func (h *RuleHandler) deliver(ctx context.Context, o *output, j *job) error {
	var err error
	if pi, ok := o.sink.(PatternInvalidator); ok && len(j.patterns) > 0 {
		_, err = pi.InvalidatePattern(ctx, j.patterns)
	}
	switch {
	case err != nil || len(j.keys) == 0:
	case isPositioned(o.sink):
		err = o.sink.(PositionedInvalidator).InvalidateAt(ctx, j.at)
	default:
		err = o.sink.Invalidate(ctx, j.keys)
	}
	if err != nil {
		o.errors.Add(1)
		return fmt.Errorf("invalidation sink %s: %w", o.name, err)
	}
	o.mu.Lock()
	o.queue[0] = nil
	o.queue = o.queue[1:]
	o.mu.Unlock()
	o.backlogKeys.Add(-int64(len(j.keys)))
	o.backlogBytes.Add(-j.bytes)
	if j.remain.Add(-1) == 0 {
		h.Invalidated.Add(uint64(len(j.keys)))
	}
	signal(h.room)
	h.advanced()
	return nil
}

func isPositioned(s Invalidator) bool {
	_, ok := s.(PositionedInvalidator)
	return ok
}

func (h *RuleHandler) advanced() {
	signal(h.durable)
	if n := h.notify.Load(); n != nil && *n != nil {
		(*n)()
	}
}

// signal wakes the reader of a capacity-1 channel without blocking.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
