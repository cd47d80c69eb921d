package invalidation

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
)

// AsyncFlusher is an optional capability of a Flusher whose outputs make
// progress on their own (RuleHandler: one queue per sink, so a failing sink
// does not hold back a healthy one). The consumer runtime uses it instead
// of Flush: it hands each batch over with FlushAsync and commits the
// batch's offsets only once Durable reaches the batch's token, in fetch
// order, so an offset is never committed before every earlier batch is
// durable in every output.
type AsyncFlusher interface {
	Flusher
	// FlushAsync hands the effects buffered since the last call to the
	// outputs and returns their token, which is greater than every earlier
	// one. It MAY block while the outputs' backlog is full (backpressure),
	// until there is room or ctx ends (then it returns ctx's error and
	// keeps the effects buffered).
	FlushAsync(ctx context.Context) (token uint64, err error)
	// Durable returns the highest token such that its and every earlier
	// token's effects are durable in every output.
	Durable() uint64
	// Run delivers to the outputs until ctx ends, calling notify (which
	// must not block) whenever Durable may have advanced. The runtime
	// calls it once, before the first FlushAsync.
	Run(ctx context.Context, notify func()) error
}

// maxPendingMessages bounds the applied changes whose offsets wait for an
// AsyncFlusher (8 bytes each); at the bound the consumer stops fetching.
const maxPendingMessages = 1 << 20

// asyncWait is one AsyncFlusher's token a batch waits for.
type asyncWait struct {
	f     AsyncFlusher
	token uint64
}

// pendingCommit is an applied batch whose offsets wait for its effects.
type pendingCommit struct {
	waits   []asyncWait
	offsets []kafkago.Message // the last message per partition (topic, partition, offset only)
	applied int
	start   time.Time
	fetched []time.Duration // each message's fetch time, after start
}

// commitQueue is the applied batches not committed yet, in fetch order.
type commitQueue struct {
	batches  []*pendingCommit
	messages int
}

// newPendingCommit keeps of batch only what the commit and the metrics need.
func newPendingCommit(batch []fetched, applied int, waits []asyncWait) *pendingCommit {
	p := &pendingCommit{waits: waits, applied: applied, fetched: make([]time.Duration, len(batch))}
	if len(batch) > 0 {
		p.start = batch[0].at
	}
	type tp struct {
		topic     string
		partition int
	}
	last := map[tp]int{}
	for i := range batch {
		m := &batch[i].m
		p.fetched[i] = batch[i].at.Sub(p.start)
		k := tp{m.Topic, m.Partition}
		if j, ok := last[k]; ok {
			if m.Offset > p.offsets[j].Offset {
				p.offsets[j].Offset = m.Offset
			}
			continue
		}
		last[k] = len(p.offsets)
		p.offsets = append(p.offsets, kafkago.Message{Topic: m.Topic, Partition: m.Partition, Offset: m.Offset})
	}
	return p
}

func (p *pendingCommit) durable() bool {
	for _, w := range p.waits {
		if w.f.Durable() < w.token {
			return false
		}
	}
	return true
}

// asyncFlushers returns the distinct handlers that are AsyncFlushers.
func (c *Consumer) asyncFlushers() map[Handler]AsyncFlusher {
	out := map[Handler]AsyncFlusher{}
	for _, h := range c.cfg.Handlers {
		if a, ok := h.(AsyncFlusher); ok {
			out[h] = a
		}
	}
	return out
}

// runAsync starts every AsyncFlusher's Run, signalling changed; stop ends
// them and waits.
func (c *Consumer) runAsync(ctx context.Context, changed chan struct{}) (stop func()) {
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	for _, a := range c.async {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.Run(rctx, func() { signal(changed) }); err != nil && rctx.Err() == nil {
				c.log.Error("invalidation outputs stopped", zap.String("group", c.cfg.Group), zap.Error(err))
			}
		}()
	}
	return func() { cancel(); wg.Wait() }
}

// commitDurable commits the offsets of the oldest batches that are durable
// everywhere, stopping at the first that is not.
func (c *Consumer) commitDurable(ctx context.Context, r *kafkago.Reader, q *commitQueue) error {
	n := 0
	for n < len(q.batches) && q.batches[n].durable() {
		n++
	}
	if n == 0 {
		return nil
	}
	var msgs []kafkago.Message
	for _, p := range q.batches[:n] {
		msgs = append(msgs, p.offsets...)
	}
	// An unreachable broker stalls committing (with backoff, counted and
	// warned about) rather than ending the consumer: the effects are
	// durable, only the offsets wait.
	bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	for attempt := 1; ; attempt++ {
		cctx, cancel := graceful(ctx, c.grace)
		err := r.CommitMessages(cctx, msgs...)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("committing offsets: %w", err)
		}
		c.stats.Retries.Add(1)
		if attempt == 1 || attempt%20 == 0 {
			c.log.Warn("committing offsets failed; retrying", zap.String("group", c.cfg.Group), zap.Error(err), zap.Int("attempt", attempt))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("committing offsets: %w", err)
		case <-time.After(bo.NextBackOff()):
		}
	}
	now := time.Now()
	var onApplied func(time.Duration)
	if f := c.onApplied.Load(); f != nil {
		onApplied = *f
	}
	for _, p := range q.batches[:n] {
		c.stats.Messages.Add(uint64(p.applied))
		for _, f := range p.fetched {
			d := now.Sub(p.start.Add(f))
			c.stats.ApplyNanos.Add(uint64(d))
			if onApplied != nil {
				onApplied(d)
			}
		}
		q.messages -= len(p.fetched)
	}
	clear(q.batches[:n])
	q.batches = q.batches[n:]
	return nil
}

// drain, at a stop, waits up to the grace period for the queued batches to
// become durable and commits those that do; the rest are redelivered.
func (c *Consumer) drain(ctx context.Context, r *kafkago.Reader, q *commitQueue, changed <-chan struct{}) error {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.grace)
	defer cancel()
	for {
		if err := c.commitDurable(dctx, r, q); err != nil {
			return err
		}
		if len(q.batches) == 0 {
			return nil
		}
		select {
		case <-changed:
		case <-time.After(100 * time.Millisecond):
		case <-dctx.Done():
			c.log.Warn("stopping with changes not yet durable in every invalidation sink; they are redelivered",
				zap.String("group", c.cfg.Group), zap.Int("changes", q.messages))
			return nil
		}
	}
}
