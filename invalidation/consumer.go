// Package invalidation runs Tidemark's consumers: Kafka consumer groups that
// read the change topics and keep derived state (caches, notification
// targets) consistent with the database.
//
// The runtime guarantees, per consumer group:
//   - Every subscribed topic's tables have a handler in this process, or the
//     consumer refuses to start and names the missing (topic, table) pairs.
//   - A message no handler accepts, a malformed one, one whose handler
//     fails with a Permanent error (at once, unretried), or one whose
//     handler still fails after MaxAttempts goes to the dead-letter topic
//     with the reason, its original headers and its position; the partition
//     moves on. A handler's Skip is a no-op counted by reason
//     (Stats.SkippedBy).
//   - Offsets are committed only after the handlers' effects are durable
//     (Flush returned, or an AsyncFlusher reports the batch Durable; batches
//     commit in fetch order), so a crash replays, never skips. Positions at or below
//     the last applied one in a partition are skipped, so redeliveries after a
//     capture restart change nothing.
package invalidation

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/sasl"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/kafkanet"

	"github.com/tidemark/tidemark/pipeline"
)

// Message is one change handed to a Handler.
type Message struct {
	Topic     string
	Partition int
	Offset    int64
	Key       []byte
	Value     []byte
	Table     string // schema.table
	Pos       pipeline.Position
	Env       *pipeline.Envelope
	// Time is the record's timestamp (zero when unknown).
	Time time.Time
}

// Handler applies changes of the tables it is registered for.
//
// Handle MAY buffer effects; they MUST be durable once Flush (when the
// handler implements Flusher) returns. Handle and Flush are called from one
// goroutine. An error from Handle is retried, then dead-lettered; one
// marked Permanent is dead-lettered at once, one marked Transient is
// retried without bound (never dead-lettered), and a *SkipError (Skip) is a
// counted no-op.
type Handler interface {
	Handle(ctx context.Context, m *Message) error
}

// Flusher is implemented by handlers that buffer effects.
//
// A Flush error is retried, with backoff and without bound, until Flush
// succeeds or the consumer stops: the batch's offsets are held meanwhile
// (a restarted member is handed the same messages again) and nothing is
// dead-lettered; MaxAttempts does not apply.
type Flusher interface {
	Flush(ctx context.Context) error
}

// ErrNoHandler is the dead-letter reason for a change no handler accepts.
var ErrNoHandler = errors.New("no handler accepts this change")

// Config configures a Consumer.
type Config struct {
	// Brokers to read from (required).
	Brokers []string
	// Group is the Kafka consumer group (required).
	Group string
	// Topics maps each subscribed topic to the tables ("schema.table") it
	// carries (required).
	Topics map[string][]string
	// Handlers maps tables to their handler (required for every table of
	// every topic).
	Handlers map[string]Handler
	// DLQTopic receives what cannot be applied (required).
	DLQTopic string
	// DLQ writes dead letters (required; e.g. the Kafka sink).
	DLQ pipeline.Sink
	// MaxAttempts before a failing message is dead-lettered. Default 5.
	MaxAttempts int
	// MaxBatch bounds the messages applied between two offset commits.
	// Default 500.
	MaxBatch int
	// StartOffset for a new group: kafka-go's FirstOffset (default) or
	// LastOffset.
	StartOffset int64
	// SessionTimeout is how long the group waits for a member that stopped
	// heartbeating (a killed process) before it hands that member's
	// partitions to the others. The heartbeat interval is a tenth of it, at
	// most 1s, and the rebalance timeout equals it. The broker bounds it by
	// group.min.session.timeout.ms (6s by default, also in kfake): a member
	// asking for less cannot join. Default 10s.
	SessionTimeout time.Duration
	// Decode, for topics whose records are not change envelopes (e.g.
	// <prefix>.transaction), decodes a record instead of
	// pipeline.ParseEnvelope. The Message's Table selects the handler and
	// its Pos is used for redelivery skipping. Default: none.
	Decode map[string]func(m *kafkago.Message) (*Message, error)
	// TLS, when set, encrypts every connection to the brokers.
	TLS *tls.Config
	// SASL, when set, authenticates every connection (kafka-go's plain or
	// scram mechanisms).
	SASL sasl.Mechanism
	// ClientID names the consumer to the brokers. Default "tidemark".
	ClientID string
	// OnGap recovers from a retention gap (see gaps.go): it runs before any
	// record after the gap is applied, is retried until it succeeds or the
	// consumer stops, and the partition then continues from its log start.
	// Default nil: Run stops with a *GapError.
	OnGap func(ctx context.Context, g Gap) error
	// GapHint says what the lost changes mean and what to repair, in the
	// *GapError when OnGap is nil; the error then says how to resume
	// (ResetHint: reset the group's offsets). Default: only the reset.
	GapHint string
}

func (c *Config) net() kafkanet.Settings { return kafkanet.Settings{TLS: c.TLS, SASL: c.SASL} }

// Stats are the consumer's counters.
type Stats struct {
	Messages atomic.Uint64 // applied
	// FetchPaused is true while the consumer does not take new messages
	// because too many applied ones wait for their outputs (backpressure):
	// whatever arrives meanwhile is in no output yet.
	FetchPaused atomic.Bool
	Skipped     atomic.Uint64 // skipped changes, every reason (see SkippedBy)
	skipped     skipCounts
	Retries     atomic.Uint64
	DLQ         atomic.Uint64
	Lag         atomic.Int64 // messages behind the partition ends (reader estimate)
	// WaitingForTopics is true while Run waits, before joining its group,
	// for subscribed topics that do not exist yet (or for topic metadata
	// it cannot read), and false once they all exist or Run stops waiting.
	WaitingForTopics atomic.Bool
	// TopicWaits counts the topic checks that found a subscribed topic
	// missing (or could not read the metadata).
	TopicWaits atomic.Uint64
	// ApplyNanos accumulates fetch-to-commit time of applied messages.
	ApplyNanos atomic.Uint64
	// OffsetGaps counts retention gaps found (see Gap); OffsetGapRecords
	// the records they lost.
	OffsetGaps, OffsetGapRecords atomic.Uint64
}

// Consumer is one consumer group. Build with NewConsumer, then Run once.
type Consumer struct {
	cfg   Config
	log   *zap.Logger
	stats Stats
	last  map[string]pipeline.Position // by "topic/partition"
	// grace bounds how long a batch fetched before a stop may still take to
	// be applied and committed (tests shorten it).
	grace time.Duration
	// handleBackoff replaces handle's backoff (tests).
	handleBackoff func() *backoff.ExponentialBackOff
	// async are the handlers whose effects are committed asynchronously
	// (set by loop).
	async map[Handler]AsyncFlusher
	// maxPending bounds the applied messages whose offsets wait for an
	// AsyncFlusher (tests lower it).
	maxPending int
	onApplied  atomic.Pointer[func(d time.Duration)]
}

// SetOnApplied sets f to observe each applied message's fetch-to-durable
// latency (called from the consumer goroutine; it must be fast). It may be
// called while the consumer runs (metrics registered late).
func (c *Consumer) SetOnApplied(f func(d time.Duration)) { c.onApplied.Store(&f) }

// MissingHandlerError names the (topic, table) pairs without a handler.
type MissingHandlerError struct {
	Group string
	Pairs []string // "topic: table"
}

func (e *MissingHandlerError) Error() string {
	return fmt.Sprintf("consumer group %s refuses to start: no handler in this process for %s", e.Group, strings.Join(e.Pairs, ", "))
}

// NewConsumer checks the configuration, including that every table of every
// subscribed topic has a handler. It starts nothing.
func NewConsumer(cfg Config, log *zap.Logger) (*Consumer, error) {
	var missing []string
	if len(cfg.Brokers) == 0 {
		missing = append(missing, "Brokers")
	}
	if cfg.Group == "" {
		missing = append(missing, "Group")
	}
	if len(cfg.Topics) == 0 {
		missing = append(missing, "Topics")
	}
	if cfg.DLQTopic == "" || cfg.DLQ == nil {
		missing = append(missing, "DLQTopic/DLQ")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("invalidation: consumer config lacks %s", strings.Join(missing, ", "))
	}
	var pairs []string
	for topic, tables := range cfg.Topics {
		for _, t := range tables {
			if cfg.Handlers[t] == nil {
				pairs = append(pairs, topic+": "+t)
			}
		}
	}
	if len(pairs) > 0 {
		sort.Strings(pairs)
		return nil, &MissingHandlerError{Group: cfg.Group, Pairs: pairs}
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 5
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 500
	}
	if cfg.StartOffset == 0 {
		cfg.StartOffset = kafkago.FirstOffset
	}
	if cfg.SessionTimeout <= 0 {
		cfg.SessionTimeout = 10 * time.Second
	}
	if cfg.ClientID == "" {
		cfg.ClientID = "tidemark"
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Consumer{cfg: cfg, log: log, last: map[string]pipeline.Position{}, grace: 15 * time.Second,
		maxPending: maxPendingMessages}, nil
}

// Stats returns the live counters.
func (c *Consumer) Stats() *Stats { return &c.stats }

// waitTopics returns once every topic exists with partitions, warning
// while some are missing (and saying so in Stats.WaitingForTopics and
// TopicWaits, which tests wait for).
//
// A failure waiting cannot heal (TLS, SASL, an ACL on a topic) is returned
// at once, naming the broker and the cause.
func (c *Consumer) waitTopics(ctx context.Context, topics []string) error {
	transport := c.cfg.net().Transport(c.cfg.ClientID, 0)
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(c.cfg.Brokers...), Timeout: 10 * time.Second, Transport: transport}
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0
	var warned time.Time
	defer c.stats.WaitingForTopics.Store(false)
	return backoff.Retry(func() error {
		missing, err := missingTopics(ctx, client, topics)
		if err == nil && len(missing) == 0 {
			return nil
		}
		if err != nil {
			if err = kafkanet.Explain(err, strings.Join(c.cfg.Brokers, ","), c.cfg.net()); kafkanet.IsAccess(err) {
				return backoff.Permanent(fmt.Errorf("consumer group %s: %w", c.cfg.Group, err))
			}
		}
		c.stats.TopicWaits.Add(1)
		c.stats.WaitingForTopics.Store(true)
		if err == nil {
			err = fmt.Errorf("topics %s do not exist yet (capture creates them)", strings.Join(missing, ", "))
		}
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		if time.Since(warned) > time.Minute {
			warned = time.Now()
			c.log.Warn("consumer waiting for its topics", zap.String("group", c.cfg.Group), zap.Error(err))
		}
		return err
	}, backoff.WithContext(bo, ctx))
}

func missingTopics(ctx context.Context, client *kafkago.Client, topics []string) ([]string, error) {
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return nil, fmt.Errorf("reading topic metadata: %w", err)
	}
	ok := map[string]bool{}
	for _, t := range meta.Topics {
		if t.Error != nil && kafkanet.IsAccess(t.Error) {
			return nil, fmt.Errorf("topic %s: %w", t.Name, t.Error)
		}
		if t.Error == nil && len(t.Partitions) > 0 {
			ok[t.Name] = true
		}
	}
	var missing []string
	for _, t := range topics {
		if !ok[t] {
			missing = append(missing, t)
		}
	}
	return missing, nil
}

// checkGroup reads the group's committed offsets once, before joining:
// an ACL that denies the group (or a topic) fails here, at start, with a
// message naming it, where kafka-go's group reader would retry the join
// without end. Other errors are left to the reader, which retries them.
func (c *Consumer) checkGroup(ctx context.Context, topics []string) error {
	transport := c.cfg.net().Transport(c.cfg.ClientID, 0)
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(c.cfg.Brokers...), Timeout: 10 * time.Second, Transport: transport}
	req := &kafkago.OffsetFetchRequest{GroupID: c.cfg.Group, Topics: map[string][]int{}}
	for _, t := range topics {
		req.Topics[t] = []int{0}
	}
	resp, err := client.OffsetFetch(ctx, req)
	if err == nil {
		err = resp.Error
	}
	if err == nil {
		for _, parts := range resp.Topics {
			for _, p := range parts {
				if p.Error != nil && kafkanet.IsAccess(p.Error) {
					err = p.Error
				}
			}
		}
	}
	if err = kafkanet.Explain(err, strings.Join(c.cfg.Brokers, ","), c.cfg.net()); kafkanet.IsAccess(err) {
		return fmt.Errorf("consumer group %s: %w", c.cfg.Group, err)
	}
	return nil
}

type fetched struct {
	m  kafkago.Message
	at time.Time
}

// Run consumes until ctx ends or a fatal error. On return, everything
// fetched and applied has been committed; messages fetched but not applied
// are redelivered to the group later.
func (c *Consumer) Run(ctx context.Context) error {
	topics := make([]string, 0, len(c.cfg.Topics))
	for t := range c.cfg.Topics {
		topics = append(topics, t)
	}
	sort.Strings(topics)
	// A member that joins the group before its topics exist is assigned
	// no partitions and would wait silently: wait for capture to create
	// them first.
	if err := c.waitTopics(ctx, topics); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	if err := c.checkGroup(ctx, topics); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	offsets, closeOffsets := c.offsetClient()
	defer closeOffsets()
	gw := c.newGapWatch(offsets)
	if err := gw.atStart(ctx, topics); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	r := kafkago.NewReader(c.readerConfig(topics))
	c.log.Info("consumer started", zap.String("group", c.cfg.Group), zap.Strings("topics", topics))
	fctx, stopFetch := context.WithCancel(ctx)
	ch := make(chan fetched, c.cfg.MaxBatch)
	fetchErr := make(chan error, 1)
	go func() {
		defer close(ch)
		// A broker that is unreachable (an outage, a restart) is an
		// infrastructure failure: fetching stalls and retries, counted in
		// Retries and warned about, rather than ending the consumer.
		bo := backoff.NewExponentialBackOff(backoff.WithInitialInterval(100*time.Millisecond),
			backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
		for attempt := 0; ; {
			m, err := r.FetchMessage(fctx)
			if err != nil && fctx.Err() == nil && kafkanet.IsAccess(err) {
				// TLS, SASL or an ACL: waiting cannot heal it.
				fetchErr <- kafkanet.Explain(err, strings.Join(c.cfg.Brokers, ","), c.cfg.net())
				return
			}
			if err != nil && fctx.Err() == nil {
				attempt++
				c.stats.Retries.Add(1)
				if attempt == 1 || attempt%20 == 0 {
					c.log.Warn("fetching failed; retrying", zap.String("group", c.cfg.Group), zap.Error(err), zap.Int("attempt", attempt))
				}
				select {
				case <-fctx.Done():
				case <-time.After(bo.NextBackOff()):
				}
				continue
			}
			if err == nil && attempt > 0 {
				attempt = 0
				bo.Reset()
			}
			if err == nil {
				err = gw.observe(fctx, &m) // a retention gap before m
			}
			if err != nil {
				fetchErr <- err
				return
			}
			select {
			case ch <- fetched{m, time.Now()}:
			case <-fctx.Done():
				fetchErr <- fctx.Err()
				return
			}
		}
	}()
	err := c.loop(ctx, r, ch)
	stopFetch()
	for range ch {
		// Drain: fetched, unapplied messages are redelivered later.
	}
	ferr := <-fetchErr
	cerr := r.Close()
	c.log.Info("consumer stopped", zap.String("group", c.cfg.Group))
	var gapErr *GapError
	if err == nil && errors.As(ferr, &gapErr) {
		err = ferr
	} else if err == nil && ferr != nil && !errors.Is(ferr, context.Canceled) {
		err = fmt.Errorf("fetching: %w", ferr)
	}
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return errors.Join(err, cerr)
}

// fetchMaxWait: see readerConfig.
const fetchMaxWait = 2 * time.Second

// readerConfig is the group reader's configuration.
//
// MaxWait is both the broker's long-poll time and, in kafka-go, the
// deadline by which a fetch response must start arriving: the broker is
// asked to wait MaxWait-1s, leaving a second for the round trip and for
// building a large response. (10ms left none: a fetch of a few MB, slow to
// build or over a few ms of network, timed out on every attempt and the
// consumer never advanced.) MinBytes 1 makes the broker answer as soon as
// anything arrives, so latency does not depend on it.
func (c *Consumer) readerConfig(topics []string) kafkago.ReaderConfig {
	session := c.cfg.SessionTimeout
	heartbeat := min(session/10, time.Second)
	return kafkago.ReaderConfig{
		Brokers: c.cfg.Brokers, GroupID: c.cfg.Group, GroupTopics: topics,
		MinBytes: 1, MaxBytes: 8 << 20, MaxWait: fetchMaxWait,
		ReadBackoffMin: time.Millisecond, ReadBackoffMax: 10 * time.Millisecond,
		StartOffset: c.cfg.StartOffset, CommitInterval: 0,
		HeartbeatInterval: max(heartbeat, time.Millisecond), SessionTimeout: session, RebalanceTimeout: session,
		JoinGroupBackoff: 500 * time.Millisecond,
		Dialer:           c.cfg.net().Dialer(c.cfg.ClientID),
	}
}

func (c *Consumer) loop(ctx context.Context, r *kafkago.Reader, ch <-chan fetched) error {
	// Handlers with asynchronous outputs run them for the loop's life;
	// offsets wait in q until their batch is durable everywhere.
	c.async = c.asyncFlushers()
	changed := make(chan struct{}, 1)
	stopAsync := c.runAsync(ctx, changed)
	defer stopAsync()
	var q commitQueue
	batch := make([]fetched, 0, c.cfg.MaxBatch)
	for {
		if err := c.commitDurable(ctx, r, &q); err != nil {
			return err
		}
		in := ch
		if q.messages >= c.maxPending {
			in = nil // backpressure: wait for the outputs
		}
		c.stats.FetchPaused.Store(in == nil)
		batch = batch[:0]
		select {
		case <-ctx.Done():
			if err := c.drain(ctx, r, &q, changed); err != nil {
				return err
			}
			return ctx.Err()
		case <-changed:
			continue
		case f, ok := <-in:
			if !ok {
				return c.drain(ctx, r, &q, changed)
			}
			batch = append(batch, f)
		}
	more:
		for len(batch) < c.cfg.MaxBatch {
			select {
			case f, ok := <-ch:
				if !ok {
					break more
				}
				batch = append(batch, f)
			default:
				break more
			}
		}
		// A batch that was fetched is finished and committed even when ctx
		// ends meanwhile (graceful stop), within a grace period.
		actx, cancel := graceful(ctx, c.grace)
		p, err := c.apply(actx, batch)
		cancel()
		if err != nil {
			if derr := c.drain(ctx, r, &q, changed); derr != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) {
				return derr
			}
			return err
		}
		q.batches = append(q.batches, p)
		q.messages += len(batch)
		c.stats.Lag.Store(r.Stats().Lag)
	}
}

// apply handles a batch in order, flushes effects (synchronous handlers) or
// hands them over (AsyncFlusher), dead-letters what failed and returns the
// batch's commit, which loop makes once its effects are durable.
func (c *Consumer) apply(ctx context.Context, batch []fetched) (*pendingCommit, error) {
	var dead []pipeline.Message
	applied := 0
	for i := range batch {
		m := &batch[i].m
		if len(m.Value) == 0 {
			// A tombstone: its delete, just before it, was the change.
			c.stats.skip(SkipTombstone)
			continue
		}
		msg, reason := c.decode(m)
		if reason != nil {
			dead = append(dead, c.deadLetter(m, reason))
			continue
		}
		pk := m.Topic + "/" + strconv.Itoa(m.Partition)
		if last, ok := c.last[pk]; ok && !last.Less(msg.Pos) {
			c.stats.skip(SkipRedelivered)
			continue
		}
		h := c.cfg.Handlers[msg.Table]
		if h == nil {
			dead = append(dead, c.deadLetter(m, fmt.Errorf("%w: table %s on topic %s", ErrNoHandler, msg.Table, m.Topic)))
			continue
		}
		if err := c.handle(ctx, h, msg); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			dead = append(dead, c.deadLetter(m, err))
			continue
		}
		c.last[pk] = msg.Pos
		applied++
	}
	if err := c.flush(ctx); err != nil {
		return nil, err
	}
	if len(dead) > 0 {
		if err := c.cfg.DLQ.Write(ctx, dead); err != nil {
			return nil, fmt.Errorf("writing %d dead letters to %s: %w", len(dead), c.cfg.DLQTopic, err)
		}
		c.stats.DLQ.Add(uint64(len(dead)))
		c.log.Warn("changes dead-lettered", zap.String("group", c.cfg.Group), zap.Int("count", len(dead)),
			zap.String("topic", c.cfg.DLQTopic), zap.String("first_reason", headerValue(dead[0].Headers, "tidemark-dlq-reason")))
	}
	var waits []asyncWait
	for _, a := range c.async {
		tok, err := a.FlushAsync(ctx)
		if err != nil {
			return nil, err
		}
		waits = append(waits, asyncWait{f: a, token: tok})
	}
	return newPendingCommit(batch, applied, waits), nil
}

func headerValue(hs []pipeline.Header, k string) string {
	for _, h := range hs {
		if h.Key == k {
			return string(h.Value)
		}
	}
	return ""
}

// decode reads a message's envelope and position; a non-nil reason sends
// it to the dead-letter topic.
func (c *Consumer) decode(m *kafkago.Message) (*Message, error) {
	if f := c.cfg.Decode[m.Topic]; f != nil {
		return f(m)
	}
	env, err := pipeline.ParseEnvelope(m.Value)
	if err != nil {
		return nil, err
	}
	return &Message{Topic: m.Topic, Partition: m.Partition, Offset: m.Offset, Key: m.Key, Value: m.Value,
		Table: env.Table(), Pos: env.Position(), Env: env, Time: m.Time}, nil
}

// handle calls h with retries and backoff. A *SkipError is counted and
// handled; an error marked Permanent is returned at once, unretried; one
// marked Transient is retried without bound until it works or ctx ends.
func (c *Consumer) handle(ctx context.Context, h Handler, m *Message) error {
	bo := newBackOff(50*time.Millisecond, 2*time.Second, 0)
	if c.handleBackoff != nil {
		bo = c.handleBackoff()
	}
	var err error
	transient := 0 // consecutive Transient failures (they have no bound)
	for attempt := 1; attempt <= c.cfg.MaxAttempts; attempt++ {
		if err = h.Handle(ctx, m); err == nil {
			if transient > 0 {
				c.log.Info("applying a change works again", zap.String("group", c.cfg.Group), zap.Int("failed_attempts", transient))
			}
			return nil
		}
		var skip *SkipError
		if errors.As(err, &skip) {
			c.stats.skip(skip.Reason)
			return nil
		}
		if IsPermanent(err) {
			return err
		}
		if ctx.Err() != nil {
			break
		}
		if IsTransient(err) {
			// Waiting heals it: no bound, offsets held, nothing
			// dead-lettered.
			transient++
			attempt--
			if transient == 1 || transient%20 == 0 {
				c.log.Warn("applying a change failed on infrastructure; retrying until it works (offsets are held)",
					zap.String("group", c.cfg.Group), zap.String("topic", m.Topic), zap.Int("partition", m.Partition),
					zap.Int64("offset", m.Offset), zap.Error(err), zap.Int("attempt", transient))
			}
		} else if attempt == c.cfg.MaxAttempts {
			break
		}
		c.stats.Retries.Add(1)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(bo.NextBackOff()):
		}
	}
	return fmt.Errorf("after %d attempts: %w", c.cfg.MaxAttempts, err)
}

// newBackOff returns an exponential backoff whose first wait is initial
// (±50%). NewExponentialBackOff resets itself with its default 500ms
// InitialInterval, so the fields are set first and Reset applied after.
// A zero maxElapsed retries without end.
func newBackOff(initial, maxInterval, maxElapsed time.Duration) *backoff.ExponentialBackOff {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = initial
	bo.MaxInterval = maxInterval
	bo.MaxElapsedTime = maxElapsed
	bo.Reset()
	return bo
}

// flush makes every handler's buffered effects durable, retrying until it
// succeeds or ctx ends: offsets are not committed before.
func (c *Consumer) flush(ctx context.Context) error {
	seen := map[Handler]bool{}
	for _, h := range c.cfg.Handlers {
		f, ok := h.(Flusher)
		if !ok || seen[h] || c.async[h] != nil {
			continue
		}
		seen[h] = true
		bo := newBackOff(100*time.Millisecond, 5*time.Second, 0)
		for attempt := 1; ; attempt++ {
			err := f.Flush(ctx)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			c.stats.Retries.Add(1)
			if attempt == 1 || attempt%20 == 0 {
				c.log.Warn("applying effects failed; retrying (offsets are held)", zap.String("group", c.cfg.Group), zap.Error(err), zap.Int("attempt", attempt))
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(bo.NextBackOff()):
			}
		}
	}
	return nil
}

// deadLetter builds the DLQ record: the original key, value and headers,
// plus the reason, the group and where it came from.
func (c *Consumer) deadLetter(m *kafkago.Message, reason error) pipeline.Message {
	hs := make([]pipeline.Header, 0, len(m.Headers)+4)
	for _, h := range m.Headers {
		hs = append(hs, pipeline.Header{Key: h.Key, Value: h.Value})
	}
	hs = append(hs,
		pipeline.Header{Key: "tidemark-dlq-reason", Value: []byte(reason.Error())},
		pipeline.Header{Key: "tidemark-dlq-group", Value: []byte(c.cfg.Group)},
		pipeline.Header{Key: "tidemark-dlq-source", Value: []byte(fmt.Sprintf("%s/%d@%d", m.Topic, m.Partition, m.Offset))},
	)
	key := m.Key
	if key == nil {
		key = []byte(fmt.Sprintf("%s/%d", m.Topic, m.Partition))
	}
	return pipeline.Message{Topic: c.cfg.DLQTopic, Key: key, Value: m.Value, Headers: hs}
}

// graceful returns a context that outlives ctx by grace: work begun before
// a stop can finish and commit.
func graceful(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	gctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(grace, cancel)
		context.AfterFunc(gctx, func() { t.Stop() })
	})
	return gctx, func() { stop(); cancel() }
}
