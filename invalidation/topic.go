package invalidation

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// Control records on <prefix>.invalidations. A record with the header
// ControlHeader is not an invalidation: readers MUST NOT treat its key as a
// cache key. Its key starts with "__tidemark/" and it is written to every
// partition (pipeline.Message.Broadcast).
const (
	// ControlHeader is the header whose value names a control record's kind.
	ControlHeader = "tidemark-control"
	// ControlWatermark: value {"position":"<commitLSN>:<seq>","at":"<RFC3339Nano UTC>"}; every invalidation up to position is durable in the topic.
	ControlWatermark = "watermark"
	// ControlFlush: value {"reason":"...","at":"<RFC3339Nano UTC>"}; every key the rules cover may be stale, drop everything.
	ControlFlush = "flush"
	// WatermarkKey is the key of watermark records.
	WatermarkKey = "__tidemark/watermark"
	// FlushKey is the key of flush records.
	FlushKey = "__tidemark/flush"
)

// DefaultWatermarkInterval is TopicInvalidator.WatermarkInterval's default.
const DefaultWatermarkInterval = time.Second

// Watermark is the value of a watermark control record.
type Watermark struct {
	// Position: every invalidation of a change at or below it that the
	// invalidation consumer has received is durable in the topic.
	Position string `json:"position"`
	// At is when the record was written (the writer's clock, UTC).
	At time.Time `json:"at"`
}

// TopicInvalidator publishes invalidations to a compacted Kafka topic
// (<prefix>.invalidations): key = the cache key, value = the position
// ("commitLSN:seq") of the change that invalidated it, so cache layers in
// any language can follow it and compare positions.
//
// Run adds a watermark record to every partition each WatermarkInterval
// (also when idle), which followers such as invalidation/cache use to know
// that the topic is live. A watermark is held (not written) while a change
// the consumer took (Received) has not been handed to the sinks
// (HandedOver, Settled) for longer than WatermarkInterval, or while keys
// wait for this sink (Backlog > 0) and it has written nothing for that
// long: a stalled consumer or topic write stops the watermarks, and the
// followers' bounds expire. A busy, healthy sink is not held.
//
// Every write goes through one mutex, so Sink.Write is never called
// concurrently; Sink MUST NOT be shared with other writers.
type TopicInvalidator struct {
	Topic string
	Sink  pipeline.Sink // e.g. the Kafka sink; must be durable on return
	// WatermarkInterval is how often Run writes a watermark. Default 1s.
	WatermarkInterval time.Duration
	// Log receives warnings of Run (nil: none).
	Log *zap.Logger
	// Backlog, when set, returns the keys handed to this sink and not yet
	// written (RuleHandler's queue for it). Nil: handing over is writing
	// (the sink is called synchronously).
	Backlog func() int64
	// Paused, when set, reports whether the consumer has stopped taking
	// changes (invalidation.Stats.FetchPaused): changes then wait unseen,
	// so watermarks stop once it has lasted longer than an interval.
	Paused func() bool

	// Watermarks counts watermark records written (one per Write, to every
	// partition); WatermarkFailures the ones that could not be written in
	// time; WatermarksHeld the intervals skipped because a received change
	// was not yet durable.
	Watermarks, WatermarkFailures, WatermarksHeld atomic.Uint64

	writeMu sync.Mutex // serialises Sink.Write

	mu        sync.Mutex
	received  pipeline.Position // newest change the consumer took
	handed    pipeline.Position // every change taken up to it is queued for (or written to) this sink
	durable   pipeline.Position // newest position written to the topic, or settled
	waiting   time.Time         // since when received > handed; zero when not
	lastWrite time.Time         // last successful InvalidateAt
	pausedAt  time.Time         // since when Paused said true; zero when not (Run's goroutine only)
}

var (
	_ Invalidator           = (*TopicInvalidator)(nil)
	_ PositionedInvalidator = (*TopicInvalidator)(nil)
	_ PatternInvalidator    = (*TopicInvalidator)(nil)
)

// InvalidatePattern is how a truncate under on_truncate: flush_pattern
// reaches the topic's readers: the topic carries keys, not patterns, so it
// writes one flush control record to every partition (invalidation/cache
// then drops everything it holds; readers in other languages must do the
// same or drop what the patterns match).
func (t *TopicInvalidator) InvalidatePattern(ctx context.Context, patterns []string) (int, error) {
	reason := "truncate: every key matching " + strings.Join(patterns, ", ") + " may be stale"
	return 0, t.write(ctx, []pipeline.Message{FlushRecord(t.Topic, reason, time.Now())})
}

// InvalidateAt writes one record per key and returns once Kafka has them.
func (t *TopicInvalidator) InvalidateAt(ctx context.Context, keys []KeyAt) error {
	msgs := make([]pipeline.Message, len(keys))
	var top pipeline.Position
	for i, k := range keys {
		msgs[i] = pipeline.Message{Topic: t.Topic, Key: []byte(k.Key), Value: []byte(k.Pos.String()), Pos: k.Pos,
			Headers: []pipeline.Header{{Key: "tidemark-lsn", Value: []byte(pipelineLSN(k.Pos))}}}
		if top.Less(k.Pos) {
			top = k.Pos
		}
	}
	if err := t.write(ctx, msgs); err != nil {
		return err
	}
	t.mu.Lock()
	if t.durable.Less(top) {
		t.durable = top
	}
	t.lastWrite = time.Now()
	t.mu.Unlock()
	return nil
}

func (t *TopicInvalidator) write(ctx context.Context, msgs []pipeline.Message) error {
	t.writeMu.Lock()
	defer t.writeMu.Unlock()
	return t.Sink.Write(ctx, msgs)
}

// Received tells t that the consumer took the change at pos: until
// HandedOver or Settled, pos is not covered by watermarks, and after
// WatermarkInterval they stop. Called by the consumer's goroutine for every
// change, before handling it.
func (t *TopicInvalidator) Received(pos pipeline.Position) {
	t.mu.Lock()
	if t.received.Less(pos) {
		t.received = pos
	}
	if t.handed.Less(t.received) && t.waiting.IsZero() {
		t.waiting = time.Now()
	}
	t.mu.Unlock()
}

// HandedOver tells t that every change received so far has its keys queued
// for the sinks (RuleHandler.FlushAsync returned): they are covered once
// Backlog is 0.
func (t *TopicInvalidator) HandedOver() {
	t.mu.Lock()
	t.handed = t.received
	t.waiting = time.Time{}
	t.mu.Unlock()
}

// Settled tells t that every change received so far has its invalidations
// durable in every sink (the handler's Flush returned nil), including
// changes that map to no key.
func (t *TopicInvalidator) Settled() {
	t.mu.Lock()
	t.handed = t.received
	if t.durable.Less(t.received) {
		t.durable = t.received
	}
	t.waiting = time.Time{}
	t.mu.Unlock()
}

// Run writes a watermark to every partition of the topic each
// WatermarkInterval until ctx ends, then returns nil. A write that fails
// (Kafka unreachable for an interval) is counted and warned about, and the
// next interval tries again.
func (t *TopicInvalidator) Run(ctx context.Context) error {
	every := t.WatermarkInterval
	if every <= 0 {
		every = DefaultWatermarkInterval
	}
	log := t.Log
	if log == nil {
		log = zap.NewNop()
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	failing, held := 0, false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		pos, ok := t.watermark(every)
		if !ok {
			t.WatermarksHeld.Add(1)
			if !held {
				held = true
				log.Warn("invalidations are not durable in the topic yet; holding its watermarks (caches following it stop caching after their staleness bound)",
					zap.String("topic", t.Topic), zap.String("durable", pos.String()))
			}
			continue
		}
		if held {
			held = false
			log.Info("writing watermarks again", zap.String("topic", t.Topic), zap.String("position", pos.String()))
		}
		wctx, cancel := context.WithTimeout(ctx, max(every, time.Second))
		err := t.WriteWatermark(wctx, pos, time.Now())
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			failing++
			t.WatermarkFailures.Add(1)
			if failing == 1 || failing%60 == 0 {
				log.Warn("writing a watermark to the invalidations topic failed; retrying next interval",
					zap.String("topic", t.Topic), zap.Int("failures", failing), zap.Error(err))
			}
			continue
		}
		if failing > 0 {
			log.Info("writing watermarks again", zap.String("topic", t.Topic), zap.Int("failures", failing))
			failing = 0
		}
	}
}

// watermark returns the position a watermark may claim now, and false if a
// received change has waited longer than hold to be handed over, or this
// sink has a backlog and wrote nothing for longer than hold.
func (t *TopicInvalidator) watermark(hold time.Duration) (pipeline.Position, bool) {
	if t.Paused != nil && t.Paused() {
		if t.pausedAt.IsZero() {
			t.pausedAt = time.Now()
		}
		if time.Since(t.pausedAt) > hold {
			t.mu.Lock()
			durable := t.durable
			t.mu.Unlock()
			return durable, false
		}
	} else {
		t.pausedAt = time.Time{}
	}
	t.mu.Lock()
	handed, durable, waiting, lastWrite := t.handed, t.durable, t.waiting, t.lastWrite
	t.mu.Unlock()
	if !waiting.IsZero() && time.Since(waiting) > hold {
		return durable, false
	}
	// handed was read first: a backlog of 0 now covers every change
	// handed over up to it.
	if t.Backlog == nil || t.Backlog() == 0 {
		if durable.Less(handed) {
			durable = handed
		}
		return durable, true
	}
	if time.Since(lastWrite) > hold {
		return durable, false
	}
	return durable, true
}

// WriteWatermark writes one watermark record (position pos, time at) to
// every partition of the topic. Run calls it; it is exported for tests and
// tools.
func (t *TopicInvalidator) WriteWatermark(ctx context.Context, pos pipeline.Position, at time.Time) error {
	v, err := json.Marshal(Watermark{Position: pos.String(), At: at.UTC()})
	if err != nil {
		return err
	}
	err = t.write(ctx, []pipeline.Message{{Topic: t.Topic, Key: []byte(WatermarkKey), Value: v, Broadcast: true,
		Headers: []pipeline.Header{{Key: ControlHeader, Value: []byte(ControlWatermark)}}}})
	if err == nil {
		t.Watermarks.Add(1)
	}
	return err
}

func pipelineLSN(p pipeline.Position) string {
	s := p.String()
	for i := range s {
		if s[i] == ':' {
			return s[:i]
		}
	}
	return s
}

// Invalidate is InvalidateAt without positions (value "0:0").
func (t *TopicInvalidator) Invalidate(ctx context.Context, keys []string) error {
	at := make([]KeyAt, len(keys))
	for i, k := range keys {
		at[i] = KeyAt{Key: k}
	}
	return t.InvalidateAt(ctx, at)
}

// Close does nothing: the sink is closed by its owner.
func (t *TopicInvalidator) Close() error { return nil }
