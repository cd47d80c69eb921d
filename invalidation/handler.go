package invalidation

import (
	"context"
	"fmt"
	"sync/atomic"

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

// RuleHandler applies an Engine's rules: it collects keys per batch and
// invalidates them on Flush, through every configured Invalidator.
type RuleHandler struct {
	engine  *Engine
	sinks   []Invalidator
	pending []string
	at      []KeyAt
	seen    map[string]int // key -> index in pending/at
	// Invalidated counts keys made durable.
	Invalidated atomic.Uint64
}

// NewRuleHandler builds a handler for all tables of engine.
func NewRuleHandler(engine *Engine, sinks ...Invalidator) *RuleHandler {
	return &RuleHandler{engine: engine, sinks: sinks, seen: map[string]int{}}
}

// Handle collects the change's keys. A change whose op no rule accepts is
// an error (it is dead-lettered rather than silently dropped).
func (h *RuleHandler) Handle(_ context.Context, m *Message) error {
	keys, ok := h.engine.Keys(m.Env, nil)
	if !ok {
		return fmt.Errorf("%w: no invalidation rule of %s accepts op %q", ErrNoHandler, m.Table, m.Env.Op)
	}
	for _, k := range keys {
		if i, dup := h.seen[k]; dup {
			h.at[i].Pos = m.Pos // the latest change wins
			continue
		}
		h.seen[k] = len(h.pending)
		h.pending = append(h.pending, k)
		h.at = append(h.at, KeyAt{Key: k, Pos: m.Pos})
	}
	return nil
}

// Flush invalidates the collected keys in every sink.
func (h *RuleHandler) Flush(ctx context.Context) error {
	if len(h.pending) == 0 {
		return nil
	}
	for _, s := range h.sinks {
		var err error
		if p, ok := s.(PositionedInvalidator); ok {
			err = p.InvalidateAt(ctx, h.at)
		} else {
			err = s.Invalidate(ctx, h.pending)
		}
		if err != nil {
			return err
		}
	}
	h.Invalidated.Add(uint64(len(h.pending)))
	h.pending = h.pending[:0]
	h.at = h.at[:0]
	clear(h.seen)
	return nil
}
