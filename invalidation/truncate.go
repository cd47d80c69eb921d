package invalidation

import (
	"context"
	"fmt"
	"strings"
	"time"

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

// SetLogger sets the logger that warns while a truncate's pattern flush
// fails (it is retried until it succeeds). Default: none.
func (h *RuleHandler) SetLogger(log *zap.Logger) { h.trunc.log = log }

// truncate does the truncate's action: flush_pattern rules' patterns are
// deleted in every PatternInvalidator sink (retried with backoff until
// done or ctx ends: Redis down stalls, like Flush), dlq rules make it a
// Permanent error, and with neither it is Skip(SkipTruncateIgnored). The
// same truncate delivered again (another partition) is
// Skip(SkipTruncateDuplicate).
func (h *RuleHandler) truncate(ctx context.Context, m *Message) error {
	if last, ok := h.trunc.last[m.Table]; ok && !last.Less(m.Pos) {
		return Skip(SkipTruncateDuplicate)
	}
	act := h.engine.Truncate(m.Table)
	if len(act.Patterns) > 0 {
		bo := newBackOff(100*time.Millisecond, 5*time.Second, 0)
		for _, s := range h.sinks {
			p, ok := s.(PatternInvalidator)
			if !ok {
				continue
			}
			for attempt := 1; ; attempt++ {
				_, err := p.InvalidatePattern(ctx, act.Patterns)
				if err == nil {
					break
				}
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if log := h.trunc.log; log != nil && (attempt == 1 || attempt%20 == 0) {
					log.Warn("flushing a truncated table's key patterns failed; retrying (offsets are held)",
						zap.String("table", m.Table), zap.Strings("patterns", act.Patterns), zap.Int("attempt", attempt), zap.Error(err))
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(bo.NextBackOff()):
				}
			}
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
