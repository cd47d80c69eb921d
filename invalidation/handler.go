package invalidation

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// Invalidator removes cache keys durably (Redis DEL, a webhook, a topic).
// Invalidate returns once every key's removal is durable; it MUST be
// idempotent. sinks/redis implements it.
type Invalidator interface {
	Invalidate(ctx context.Context, keys []string) error
	Close() error
}

// KeyAt is an invalidated key and the position of the change that
// invalidated it.
type KeyAt struct {
	Key string
	Pos pipeline.Position
}

// PositionedInvalidator is an optional capability of an Invalidator that
// records which change invalidated each key (the invalidations topic uses
// the position as the record value). RuleHandler calls InvalidateAt instead
// of Invalidate when a sink implements it.
type PositionedInvalidator interface {
	InvalidateAt(ctx context.Context, keys []KeyAt) error
}

// DefaultMaxBacklogBytes bounds the keys a lagging sink may hold queued
// (see RuleHandler.MaxBacklogBytes).
const DefaultMaxBacklogBytes = 64 << 20

// keyOverhead is what one queued key costs beyond its bytes (the string
// and KeyAt headers), counted in the backlog bound.
const keyOverhead = 64

// RuleHandler applies an Engine's rules: it collects keys per batch and
// invalidates them through every configured Invalidator (a sink).
//
// Each sink has its own queue of batches and its own goroutine (Run), so a
// failing sink does not hold back a healthy one: while Redis is down the
// invalidations topic keeps receiving keys. A sink delivers its batches in
// order, retrying the oldest with backoff until it succeeds, so a key's
// invalidations reach every sink in commit order. A batch is durable once
// every sink has it (Durable); the consumer commits offsets only up to
// there. When a sink's queue exceeds MaxBacklogBytes, FlushAsync blocks:
// the consumer stops fetching and the healthy sinks stop too.
type RuleHandler struct {
	engine  *Engine
	sinks   []Invalidator
	pending []string
	at      []KeyAt
	seen    map[string]int // key -> index in pending/at
	trunc   truncates      // truncate actions done (truncate.go)
	// patterns are on_truncate: flush_pattern globs queued with the batch.
	patterns []string
	// Invalidated counts keys made durable.
	Invalidated atomic.Uint64
	// MaxBacklogBytes bounds each sink's queue (keys' bytes plus 64 bytes
	// per key). Set before Run. Default DefaultMaxBacklogBytes.
	MaxBacklogBytes int64
	// Log receives a warning when a sink starts failing and when it
	// recovers (never per retry). Set before Run. Default: no-op.
	Log *zap.Logger

	outs    []*output
	token   uint64 // last token handed out (consumer goroutine only)
	running atomic.Bool
	room    chan struct{}          // a queue shrank (wakes a blocked FlushAsync)
	durable chan struct{}          // Durable may have advanced (wakes Flush)
	notify  atomic.Pointer[func()] // from Run: Durable may have advanced
}

// NewRuleHandler builds a handler for all tables of engine. The consumer
// runtime runs its sinks (Run) and commits what Durable reports.
func NewRuleHandler(engine *Engine, sinks ...Invalidator) *RuleHandler {
	h := &RuleHandler{engine: engine, sinks: sinks, seen: map[string]int{},
		room: make(chan struct{}, 1), durable: make(chan struct{}, 1)}
	used := map[string]int{}
	for _, s := range sinks {
		name := SinkName(s)
		if used[name]++; used[name] > 1 {
			name = fmt.Sprintf("%s%d", name, used[name])
		}
		h.outs = append(h.outs, &output{name: name, sink: s, wake: make(chan struct{}, 1)})
	}
	return h
}

// Handle collects the change's keys. A change whose op the table's rules
// exclude is a counted no-op (Skip(SkipOpExcluded)), as is one that the
// accepting rules' filters exclude (Skip(SkipFiltered)); one a rule accepts
// but whose images fill none of its templates is a Permanent error (it is
// dead-lettered with the reason, never silently dropped). A truncate does
// its rules' on_truncate action (truncate.go).
func (h *RuleHandler) Handle(ctx context.Context, m *Message) error {
	if m.Env.Op == "t" {
		return h.truncate(ctx, m)
	}
	keys, ok, filtered, err := h.engine.resolve(m.Env, nil)
	if err != nil {
		return Permanent(err)
	}
	if filtered {
		return Skip(SkipFiltered)
	}
	if !ok {
		return Skip(SkipOpExcluded)
	}
	for _, k := range keys {
		if i, dup := h.seen[k]; dup {
			// The newest position wins, not the last fetched: a batch
			// mixes partitions, so a key's later message can carry an
			// older change (and a versioned marker must not go back).
			if h.at[i].Pos.Less(m.Pos) {
				h.at[i].Pos = m.Pos
			}
			continue
		}
		h.seen[k] = len(h.pending)
		h.pending = append(h.pending, k)
		h.at = append(h.at, KeyAt{Key: k, Pos: m.Pos})
	}
	return nil
}

// Flush makes the collected keys durable in every sink. While Run runs it
// queues them and waits for every sink; otherwise it delivers each sink's
// queue itself, once: a failing sink does not stop the others, and a retry
// re-sends only to the sinks that lack a batch.
func (h *RuleHandler) Flush(ctx context.Context) error {
	tok, err := h.FlushAsync(ctx)
	if err != nil {
		return err
	}
	if h.running.Load() {
		for h.Durable() < tok {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-h.durable:
			case <-time.After(100 * time.Millisecond):
			}
		}
		return nil
	}
	var errs []error
	for _, o := range h.outs {
		for {
			o.mu.Lock()
			var j *job
			if len(o.queue) > 0 {
				j = o.queue[0]
			}
			o.mu.Unlock()
			if j == nil {
				break
			}
			if err := h.deliver(ctx, o, j); err != nil {
				errs = append(errs, err)
				break
			}
		}
	}
	return errors.Join(errs...)
}
