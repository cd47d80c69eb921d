package invalidation

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
)

// Permanent marks err as deterministic: handling the same change again
// fails the same way (a change no rule can turn into keys, a truncate a
// rule dead-letters). The consumer dead-letters it at once, without
// retries. Errors not so marked are retried up to MaxAttempts.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err}
}

type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// IsPermanent reports whether err (or an error it wraps) was marked by
// Permanent.
func IsPermanent(err error) bool {
	var p *permanentError
	return errors.As(err, &p)
}

// Transient marks err as an infrastructure failure that waiting can heal
// (a database that is down or restarting, a lookup that timed out): the
// consumer retries the change with backoff and without bound, as it does a
// failing Flush, holding its offsets and never dead-lettering it. Each
// retry is counted (Stats.Retries) and a warning is logged once per streak
// (then every 20 attempts). A handler must have changed nothing before it
// returns a Transient error.
func Transient(err error) error {
	if err == nil {
		return nil
	}
	return &transientError{err}
}

type transientError struct{ err error }

func (e *transientError) Error() string { return e.err.Error() }
func (e *transientError) Unwrap() error { return e.err }

// IsTransient reports whether err (or an error it wraps) was marked by
// Transient.
func IsTransient(err error) bool {
	var t *transientError
	return errors.As(err, &t)
}

// Reasons of SkipError used by Tidemark's handlers (the metric label
// tidemark_consumer_skipped_total{reason}).
const (
	// SkipRedelivered: a position at or below the last one applied in its
	// partition (a capture restart published it again).
	SkipRedelivered = "redelivered"
	// SkipOpExcluded: the table's rules exclude the change's op (ops).
	SkipOpExcluded = "op_excluded"
	// SkipFiltered: the table's rules accept the op, but neither image of
	// the row matches any accepting rule's filter.
	SkipFiltered = "filtered"
	// SkipTableIgnored: a table the config maps to no rule on purpose
	// (invalidation.ignore_tables).
	SkipTableIgnored = "table_ignored"
	// SkipTruncateIgnored: a truncate of a table whose rules say
	// on_truncate: ignore.
	SkipTruncateIgnored = "truncate_ignored"
	// SkipTruncateDuplicate: a truncate already acted on, delivered again
	// by another partition (truncates go to every partition).
	SkipTruncateDuplicate = "truncate_duplicate"
	// SkipTombstone: a tombstone (a null value after a delete, for log
	// compaction); the delete before it carried the change.
	SkipTombstone = "tombstone"
)

// SkipError is returned by a handler for a change that is a no-op on
// purpose: the consumer counts it by Reason, does not retry it and does not
// dead-letter it, and the change counts as handled.
type SkipError struct{ Reason string }

func (e *SkipError) Error() string { return "skipped: " + e.Reason }

// Skip returns a *SkipError with reason.
func Skip(reason string) error { return &SkipError{Reason: reason} }

// SkipHandler skips every change of its tables with Reason.
type SkipHandler struct{ Reason string }

// Handle returns Skip(h.Reason).
func (h SkipHandler) Handle(context.Context, *Message) error { return Skip(h.Reason) }

// skipCounts counts skipped changes by reason; the zero value is ready.
type skipCounts struct {
	mu sync.Mutex
	by map[string]*atomic.Uint64
}

func (s *skipCounts) add(reason string) {
	s.mu.Lock()
	n := s.by[reason]
	if n == nil {
		if s.by == nil {
			s.by = map[string]*atomic.Uint64{}
		}
		n = new(atomic.Uint64)
		s.by[reason] = n
	}
	s.mu.Unlock()
	n.Add(1)
}

// skip counts one skipped change with reason (also in Skipped).
func (s *Stats) skip(reason string) {
	s.Skipped.Add(1)
	s.skipped.add(reason)
}

// SkippedBy returns the skipped changes by reason.
func (s *Stats) SkippedBy() map[string]uint64 {
	s.skipped.mu.Lock()
	defer s.skipped.mu.Unlock()
	out := make(map[string]uint64, len(s.skipped.by))
	for r, n := range s.skipped.by {
		out[r] = n.Load()
	}
	return out
}

// SkipReasons are the reasons Tidemark's handlers use, for metrics that
// export every reason from the start.
func SkipReasons() []string {
	return slices.Clone([]string{SkipRedelivered, SkipOpExcluded, SkipFiltered, SkipTableIgnored, SkipTruncateIgnored, SkipTruncateDuplicate, SkipTombstone})
}
