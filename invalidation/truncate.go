package invalidation

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// PatternInvalidator is an optional capability of an Invalidator: deleting
// every key that matches a Redis glob pattern (sinks/redis: SCAN MATCH +
// UNLINK). RuleHandler uses it for on_truncate: flush_pattern. It returns
// once every matching key that existed when it started is deleted, and
// MUST be idempotent.
type PatternInvalidator interface {
	InvalidatePattern(ctx context.Context, patterns []string) (deleted int, err error)
}

// truncates remembers, per table, the position of the last truncate acted
// on: Tidemark publishes a truncate to every partition of a topic (with
// one position), and its action happens once.
type truncates struct {
	last map[string]pipeline.Position
	log  *zap.Logger // nil: no-op
}

// SetLogger sets the logger of the truncate actions. Default: none.
func (h *RuleHandler) SetLogger(log *zap.Logger) { h.trunc.log = log }

// truncate does the truncate's action: flush_pattern rules' patterns are
// queued with the batch for every PatternInvalidator sink (delivered and
// retried like keys, in order), dlq rules make it a
// Permanent error, and with neither it is Skip(SkipTruncateIgnored). The
// same truncate delivered again (another partition) is
// Skip(SkipTruncateDuplicate).
func (h *RuleHandler) truncate(ctx context.Context, m *Message) error {
	if last, ok := h.trunc.last[m.Table]; ok && !last.Less(m.Pos) {
		return Skip(SkipTruncateDuplicate)
	}
	act := h.engine.Truncate(m.Table)
	// The patterns go to the sinks' queues with the batch (outputs.go):
	// each sink deletes them in order with its keys, and a sink that is
	// down holds only itself, as with keys.
	for _, pat := range act.Patterns {
		if !slices.Contains(h.patterns, pat) {
			h.patterns = append(h.patterns, pat)
		}
	}
	if h.trunc.last == nil {
		h.trunc.last = map[string]pipeline.Position{}
	}
	h.trunc.last[m.Table] = m.Pos
	if len(act.DLQ) > 0 {
		return Permanent(fmt.Errorf("truncate of %s at %s: on_truncate: dlq (%s)", m.Table, m.Pos, strings.Join(act.DLQ, ", ")))
	}
	if len(act.Patterns) == 0 {
		return Skip(SkipTruncateIgnored)
	}
	return nil
}

// FlushesPatterns reports whether a rule has on_truncate: flush_pattern.
func (e *Engine) FlushesPatterns() bool {
	for _, rs := range e.byTable {
		for _, r := range rs {
			if r.onTruncate == TruncateFlushPattern {
				return true
			}
		}
	}
	return false
}
