package invalidation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// Retention gaps.
//
// A group whose committed offset is below a partition's log start (the
// group was down, or stalled, longer than the topic's retention, or someone
// ran DeleteRecords) has lost the records in between: kafka-go's reader
// then moves to the log start on its own (at assignment, and again when a
// fetch answers OffsetOutOfRange), logging at most through its own logger.
// The consumer makes that visible and decides instead:
//   - before joining its group it compares every partition's committed
//     offset (OffsetFetch) with its log start (ListOffsets), so a gap is
//     found at start even on a partition nothing new arrives on;
//   - while running, a record whose offset is past the next one expected
//     for its partition (the committed offset for a partition seen first,
//     else the one after the last record fetched) is checked against the
//     partition's log start: a log start past the expected offset is a gap
//     (a hole left by compaction or transaction markers is not).
//
// Every gap is logged as an error naming the group, topic, partition,
// offsets and size, and counted (Stats.OffsetGaps, OffsetGapRecords). Then
// Config.OnGap decides: nil stops Run with a *GapError; otherwise OnGap
// runs (retried until it succeeds) before any record after the gap is
// applied, and the partition continues from its log start.

// Gap is a range of a partition's records deleted before the group read
// them: [From, LogStart).
type Gap struct {
	Group     string
	Topic     string
	Partition int
	// From is the offset the group was to read next: its committed offset,
	// or the one after the last record it fetched.
	From int64
	// LogStart is the partition's first offset still in the log.
	LogStart int64
}

// Records is the number of records lost.
func (g Gap) Records() int64 { return g.LogStart - g.From }

func (g Gap) String() string {
	return fmt.Sprintf("%s partition %d: group %s was to read offset %d, the log starts at %d (%d records deleted unread)",
		g.Topic, g.Partition, g.Group, g.From, g.LogStart, g.Records())
}

// GapError stops a consumer that found a retention gap and has no OnGap
// recovery. Hint says how to resume.
type GapError struct {
	Gaps []Gap
	Hint string
}

func (e *GapError) Error() string {
	parts := make([]string, len(e.Gaps))
	for i, g := range e.Gaps {
		parts[i] = g.String()
	}
	s := "retention gap: " + strings.Join(parts, "; ") +
		": the changes in between were never applied (the group was down, or stalled, longer than the topic's retention)"
	if e.Hint != "" {
		s += "; " + e.Hint
	}
	return s
}

// ResetHint is the generic way past a gap: move the group to the log start
// once what the lost changes affected has been repaired.
func ResetHint(group string, gaps []Gap) string {
	topics := map[string][]string{}
	for _, g := range gaps {
		topics[g.Topic] = append(topics[g.Topic], fmt.Sprint(g.Partition))
	}
	names := make([]string, 0, len(topics))
	for t := range topics {
		names = append(names, t)
	}
	sort.Strings(names)
	var args []string
	for _, t := range names {
		args = append(args, "--topic "+t+":"+strings.Join(topics[t], ","))
	}
	return fmt.Sprintf("to resume, with this consumer stopped, move the group to the log start: kafka-consumer-groups.sh --bootstrap-server BROKER --group %s --reset-offsets --to-earliest %s --execute",
		group, strings.Join(args, " "))
}

// partKey is a topic partition.
type partKey struct {
	topic string
	part  int
}

// offsetSource reads what gap detection compares. Offsets are -1 where the
// group has committed none.
type offsetSource interface {
	partitions(ctx context.Context, topics []string) (map[string][]int, error)
	committed(ctx context.Context, group string, parts map[string][]int) (map[partKey]int64, error)
	logStarts(ctx context.Context, parts map[string][]int) (map[partKey]int64, error)
}

// findGaps returns the partitions whose committed offset (>= 0) is below
// their log start, in topic and partition order.
func findGaps(group string, committed, starts map[partKey]int64) []Gap {
	var gaps []Gap
	for k, c := range committed {
		if s, ok := starts[k]; ok && c >= 0 && c < s {
			gaps = append(gaps, Gap{Group: group, Topic: k.topic, Partition: k.part, From: c, LogStart: s})
		}
	}
	sort.Slice(gaps, func(i, j int) bool {
		if gaps[i].Topic != gaps[j].Topic {
			return gaps[i].Topic < gaps[j].Topic
		}
		return gaps[i].Partition < gaps[j].Partition
	})
	return gaps
}

// gapWatch finds gaps; one per Run, used by one goroutine at a time.
type gapWatch struct {
	c    *Consumer
	src  offsetSource
	next map[partKey]int64 // the offset expected next per partition
}

func (c *Consumer) newGapWatch(src offsetSource) *gapWatch {
	return &gapWatch{c: c, src: src, next: map[partKey]int64{}}
}

// atStart checks every partition of topics before the group is joined.
func (w *gapWatch) atStart(ctx context.Context, topics []string) error {
	var gaps []Gap
	var committed map[partKey]int64
	err := w.retry(ctx, "checking committed offsets against the log start", func() error {
		parts, err := w.src.partitions(ctx, topics)
		if err != nil {
			return err
		}
		committed, err = w.src.committed(ctx, w.c.cfg.Group, parts)
		if err != nil {
			return err
		}
		starts, err := w.src.logStarts(ctx, parts)
		if err != nil {
			return err
		}
		gaps = findGaps(w.c.cfg.Group, committed, starts)
		return nil
	})
	if err != nil {
		return err
	}
	if err := w.handle(ctx, gaps); err != nil {
		return err
	}
	for k, off := range committed {
		if off >= 0 {
			w.next[k] = off
		}
	}
	for _, g := range gaps {
		// kafka-go starts this partition at its log start: that is no
		// second gap.
		w.next[partKey{g.Topic, g.Partition}] = g.LogStart
	}
	return nil
}

// observe checks a fetched record before it is applied: a nil error means
// the record may be applied.
func (w *gapWatch) observe(ctx context.Context, m *kafkago.Message) error {
	k := partKey{m.Topic, m.Partition}
	expected, known := w.next[k]
	if !known {
		// First record of a partition in this Run (at start or handed over
		// by a rebalance): the reader began at the committed offset, or at
		// the log start when that is below it.
		err := w.retry(ctx, "reading the committed offset of "+m.Topic, func() error {
			committed, err := w.src.committed(ctx, w.c.cfg.Group, map[string][]int{m.Topic: {m.Partition}})
			if err != nil {
				return err
			}
			c, ok := committed[k]
			if !ok {
				c = -1
			}
			expected = c
			return nil
		})
		if err != nil {
			return err
		}
	}
	if expected >= 0 && m.Offset > expected {
		var start int64
		err := w.retry(ctx, "reading the log start of "+m.Topic, func() error {
			starts, err := w.src.logStarts(ctx, map[string][]int{m.Topic: {m.Partition}})
			if err != nil {
				return err
			}
			start = starts[k]
			return nil
		})
		if err != nil {
			return err
		}
		if start > expected && known {
			// The partition may have been away: another member consumed
			// and committed past what this one read before a rebalance
			// handed it back. The reader then resumed at that commit, which
			// is no gap.
			err := w.retry(ctx, "reading the committed offset of "+m.Topic, func() error {
				committed, err := w.src.committed(ctx, w.c.cfg.Group, map[string][]int{m.Topic: {m.Partition}})
				if err != nil {
					return err
				}
				if c, ok := committed[k]; ok && c > expected {
					expected = c
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		if start > expected && m.Offset > expected {
			if err := w.handle(ctx, []Gap{{Group: w.c.cfg.Group, Topic: m.Topic, Partition: m.Partition, From: expected, LogStart: start}}); err != nil {
				return err
			}
		}
	}
	w.next[k] = m.Offset + 1
	return nil
}

// handle reports gaps and applies the configured recovery.
func (w *gapWatch) handle(ctx context.Context, gaps []Gap) error {
	if len(gaps) == 0 {
		return nil
	}
	c := w.c
	action := "stopping: configure a recovery or reset the group's offsets"
	if c.cfg.OnGap != nil {
		action = "recovering, then continuing from the log start"
	}
	for _, g := range gaps {
		c.stats.OffsetGaps.Add(1)
		c.stats.OffsetGapRecords.Add(uint64(g.Records()))
		c.log.Error("retention gap: the group's next offset is below the partition's log start; the changes in between were never applied",
			zap.String("group", g.Group), zap.String("topic", g.Topic), zap.Int("partition", g.Partition),
			zap.Int64("committed", g.From), zap.Int64("log_start", g.LogStart), zap.Int64("records_lost", g.Records()),
			zap.String("action", action))
	}
	if c.cfg.OnGap == nil {
		hint := ResetHint(c.cfg.Group, gaps)
		if c.cfg.GapHint != "" {
			hint = c.cfg.GapHint + "; " + hint
		}
		return &GapError{Gaps: gaps, Hint: hint}
	}
	for _, g := range gaps {
		if err := w.retry(ctx, "recovering from the retention gap on "+g.Topic, func() error { return c.cfg.OnGap(ctx, g) }); err != nil {
			return err
		}
	}
	return nil
}

// retry runs f until it succeeds or ctx ends, with backoff and a warning
// on the first and every 20th failure: an infrastructure failure stalls.
func (w *gapWatch) retry(ctx context.Context, what string, f func() error) error {
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	for attempt := 1; ; attempt++ {
		err := f()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		w.c.stats.Retries.Add(1)
		if attempt == 1 || attempt%20 == 0 {
			w.c.log.Warn(what+" failed; retrying", zap.String("group", w.c.cfg.Group), zap.Error(err), zap.Int("attempt", attempt))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(bo.NextBackOff()):
		}
	}
}

// clientOffsets is the offsetSource of a running consumer.
type clientOffsets struct{ client *kafkago.Client }

func (c *Consumer) offsetClient() (*clientOffsets, func()) {
	transport := c.cfg.net().Transport(c.cfg.ClientID, 0)
	client := &kafkago.Client{Addr: kafkago.TCP(c.cfg.Brokers...), Timeout: 10 * time.Second, Transport: transport}
	return &clientOffsets{client: client}, transport.CloseIdleConnections
}

func (o *clientOffsets) partitions(ctx context.Context, topics []string) (map[string][]int, error) {
	meta, err := o.client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return nil, fmt.Errorf("reading topic metadata: %w", err)
	}
	parts := map[string][]int{}
	for _, t := range meta.Topics {
		if t.Error != nil {
			return nil, fmt.Errorf("topic %s: %w", t.Name, t.Error)
		}
		for _, p := range t.Partitions {
			parts[t.Name] = append(parts[t.Name], p.ID)
		}
	}
	return parts, nil
}

func (o *clientOffsets) committed(ctx context.Context, group string, parts map[string][]int) (map[partKey]int64, error) {
	resp, err := o.client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: group, Topics: parts})
	if err == nil {
		err = resp.Error
	}
	out := map[partKey]int64{}
	if errors.Is(err, kafkago.GroupIdNotFound) {
		return out, nil // a new group: nothing committed
	}
	if err != nil {
		return nil, fmt.Errorf("fetching the committed offsets of group %s: %w", group, err)
	}
	for t, ps := range resp.Topics {
		for _, p := range ps {
			if p.Error != nil {
				return nil, fmt.Errorf("fetching the committed offset of %s partition %d: %w", t, p.Partition, p.Error)
			}
			out[partKey{t, p.Partition}] = p.CommittedOffset
		}
	}
	return out, nil
}

func (o *clientOffsets) logStarts(ctx context.Context, parts map[string][]int) (map[partKey]int64, error) {
	req := map[string][]kafkago.OffsetRequest{}
	for t, ps := range parts {
		for _, p := range ps {
			req[t] = append(req[t], kafkago.FirstOffsetOf(p))
		}
	}
	resp, err := o.client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: req})
	if err != nil {
		return nil, fmt.Errorf("listing log start offsets: %w", err)
	}
	out := map[partKey]int64{}
	for t, ps := range resp.Topics {
		for _, p := range ps {
			if p.Error != nil {
				return nil, fmt.Errorf("listing the log start of %s partition %d: %w", t, p.Partition, p.Error)
			}
			out[partKey{t, p.Partition}] = p.FirstOffset
		}
	}
	return out, nil
}

// FlushValue is the value of a flush control record (ControlFlush).
type FlushValue struct {
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// FlushRecord is a flush control record for the invalidations topic:
// every key the rules cover may be stale, so a following cache drops
// everything it holds. It goes to every partition.
func FlushRecord(topic, reason string, at time.Time) pipeline.Message {
	v, _ := json.Marshal(FlushValue{Reason: reason, At: at.UTC()})
	return pipeline.Message{Topic: topic, Key: []byte(FlushKey), Value: v, Broadcast: true,
		Headers: []pipeline.Header{{Key: ControlHeader, Value: []byte(ControlFlush)}}}
}
