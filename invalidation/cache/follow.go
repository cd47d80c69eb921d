package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/kafkanet"
	inv "github.com/tidemark/tidemark/invalidation"
)

// errPositionLost ends a follow session whose position no longer covers
// every invalidation (a partition's end fell below the read position).
var errPositionLost = errors.New("position on the invalidations topic lost")

// Follow reads the invalidations topic and applies every invalidation
// record's key with Invalidate, until ctx ends or Close is called; then it clears the cache,
// makes Ready false and returns nil. It returns an error only for a config
// without Brokers or Topic, ErrFollowing if Follow already runs, and
// ErrClosed after Close, and an error naming the broker and the cause when
// the brokers refuse the connection in a way waiting cannot heal (a TLS
// certificate this client does not trust or that does not carry the
// broker's name, a SASL login the brokers reject, an ACL denying the
// topic).
//
// Follow reads every partition with its own kafka-go Reader, without a
// consumer group (each process needs every record, and nothing is
// committed). It first lists the partitions' end offsets and starts there:
// records written before are not applied. That is safe because the cache
// is empty at that point (nothing is cached before Ready, and the cache is
// cleared whenever Follow stops) and only loads that start after the
// positioning may fill it; any change such a load can miss commits after the
// load started, so its record lies at or beyond the listed offsets. Once
// positioned on every partition, and (unless Config.MaxStaleness < 0) once
// every partition has delivered a watermark record, Ready becomes true.
//
// Control records (header invalidation.ControlHeader) are never applied as
// keys: a watermark renews its partition's freshness, a flush clears the
// cache (Ready stays), and any other kind is skipped, counted
// (Stats.ControlSkipped) and warned about once. While the newest watermark
// of some partition is older than Config.MaxStaleness (the follower cut off
// from the brokers, or the invalidation role stopped or stalled), the cache
// is not Ready: it is cleared, GetOrLoad loads without caching, and it
// becomes Ready again once every partition has a fresh watermark.
//
// Connection failures are retried with backoff while keeping the position,
// so a broker outage delays invalidations (bound it with Config.TTL) but
// loses none. Positioning is retried with backoff until it succeeds (for
// example until the topic exists). About every 5 s Follow looks for new
// partitions, which it reads from their first offset, and for a recreated
// topic (a topic id other than the one it positioned on, or a partition
// whose end fell below its position): then it clears the cache and
// positions again.
func (c *Cache[V]) Follow(ctx context.Context) error {
	if err := c.cfg.validateFollow(); err != nil {
		return err
	}
	if !c.following.CompareAndSwap(false, true) {
		return ErrFollowing
	}
	defer c.following.Store(false)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.followMu.Lock()
	c.stopFollow = cancel
	c.followMu.Unlock()
	c.closeMu.RLock()
	closed := c.closed
	c.closeMu.RUnlock()
	if closed {
		return ErrClosed
	}

	log := c.log.With(zap.String("topic", c.cfg.Topic))
	// An own transport: the shared default one serves Metadata from a cache
	// refreshed every 6 s, for every client of the process.
	tr := c.cfg.net().Transport("tidemark-cache", min(c.refresh, 5*time.Second))
	defer tr.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(c.cfg.Brokers...), Timeout: 10 * time.Second, Transport: tr}
	ids, err := newTopicIDs(c.cfg.Brokers, c.cfg.net())
	if err != nil {
		return fmt.Errorf("cache: following %s: %w", c.cfg.Topic, err)
	}
	defer ids.close()
	bo := newBackoff()
	log.Info("following the invalidations topic")
	defer log.Info("stopped following the invalidations topic")
	for {
		positioned, err := c.session(ctx, client, ids, log)
		c.setReady(false) // clears the cache: the next session starts at the end again
		if ctx.Err() != nil {
			return nil
		}
		if positioned {
			bo.Reset()
		}
		if err = kafkanet.Explain(err, strings.Join(c.cfg.Brokers, ","), c.cfg.net()); kafkanet.IsAccess(err) {
			log.Error("following the invalidations topic: giving up", zap.Error(err))
			return fmt.Errorf("cache: following %s: %w", c.cfg.Topic, err)
		}
		d := bo.NextBackOff()
		log.Warn("following the invalidations topic: positioning again", zap.Error(err), zap.Duration("backoff", d))
		if !sleep(ctx, d) {
			return nil
		}
	}
}

// session positions on every partition, makes the cache Ready and applies
// records until ctx ends or the position is lost.
func (c *Cache[V]) session(ctx context.Context, client *kafkago.Client, ids *topicIDs, log *zap.Logger) (positioned bool, err error) {
	// The id first: a recreation between the two calls then shows as a
	// changed id at the next check, never as a position on the new topic
	// attributed to the old id.
	id, idErr := ids.id(ctx, c.cfg.Topic)
	ends, err := c.endOffsets(ctx, client)
	if err != nil {
		return false, err
	}
	if idErr != nil {
		// Recreation is then found by offsets alone until an id is read.
		log.Warn("reading the invalidations topic's id (a recreated topic is found by its offsets meanwhile)", zap.Error(idErr))
	}
	defer c.setMarks(nil)

	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	readers := map[int]*kafkago.Reader{}
	defer func() {
		cancel()
		wg.Wait()
		// Close waits for a reader's fetch in flight (up to MaxWait): close
		// them all at once.
		var closing sync.WaitGroup
		for _, r := range readers {
			closing.Go(func() { _ = r.Close() })
		}
		closing.Wait()
	}()
	start := func(partition int, offset int64) error {
		r := kafkago.NewReader(kafkago.ReaderConfig{
			Brokers:        c.cfg.Brokers,
			Topic:          c.cfg.Topic,
			Partition:      partition,
			Dialer:         c.cfg.net().Dialer("tidemark-cache"),
			MaxWait:        500 * time.Millisecond, // idle long poll; records return at once
			ReadBackoffMin: 100 * time.Millisecond,
			ReadBackoffMax: 5 * time.Second,
			ErrorLogger: kafkago.LoggerFunc(func(msg string, args ...any) {
				log.Warn("kafka reader: "+fmt.Sprintf(msg, args...), zap.Int("partition", partition))
			}),
		})
		if err := r.SetOffset(offset); err != nil {
			_ = r.Close()
			return fmt.Errorf("positioning on partition %d at offset %d: %w", partition, offset, err)
		}
		readers[partition] = r
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.read(rctx, r, partition, log)
		}()
		return nil
	}
	now := time.Now()
	marks := make(map[int]*mark, len(ends))
	for p := range ends {
		marks[p] = &mark{got: now}
	}
	c.setMarks(marks)
	for _, p := range sortedPartitions(ends) {
		if err := start(p, ends[p]); err != nil {
			return false, err
		}
	}
	if c.cfg.MaxStaleness < 0 {
		c.setReady(true)
	}

	t := time.NewTicker(c.refresh)
	defer t.Stop()
	check := time.NewTicker(c.freshCheck())
	defer check.Stop()
	warnedNone, idFailing := false, idErr != nil
	for {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case <-check.C:
			if c.cfg.MaxStaleness >= 0 {
				c.checkFresh(log, &warnedNone)
			}
			continue
		case <-t.C:
		case <-c.recheck:
		}
		if now, err := ids.id(ctx, c.cfg.Topic); err != nil {
			if ctx.Err() == nil && !idFailing {
				log.Warn("checking the invalidations topic's id (warned once until it works again)", zap.Error(err))
			}
			idFailing = true
		} else if idFailing = false; id == "" {
			id = now
		} else if now != "" && now != id {
			c.recreations.Add(1)
			return true, fmt.Errorf("%w: its topic id changed from %s to %s (topic deleted and recreated)", errPositionLost, id, now)
		}
		// Read positions before ends: a position can only be ahead of an end
		// listed after it if the partition lost records.
		pos := make(map[int]int64, len(readers))
		for p, r := range readers {
			pos[p] = r.Offset()
		}
		now, err := c.endOffsets(ctx, client)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("checking the invalidations topic's partitions", zap.Error(err))
			}
			continue
		}
		for _, p := range sortedPartitions(now) {
			if _, ok := readers[p]; !ok {
				// Created after the positioning: all its records are newer.
				log.Info("following a new partition of the invalidations topic", zap.Int("partition", p))
				c.addMark(p)
				if err := start(p, kafkago.FirstOffset); err != nil {
					return true, err
				}
				continue
			}
			if off := pos[p]; off >= 0 && now[p] < off {
				c.recreations.Add(1)
				return true, fmt.Errorf("%w: partition %d ends at offset %d, below the read position %d (topic deleted and recreated?)",
					errPositionLost, p, now[p], off)
			}
		}
	}
}

// read applies partition's records until ctx ends.
func (c *Cache[V]) read(ctx context.Context, r *kafkago.Reader, partition int, log *zap.Logger) {
	bo := newBackoff()
	for {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// The reader keeps its offset and reconnects by itself; this
			// only paces the calls that surface its errors.
			d := bo.NextBackOff()
			log.Warn("reading the invalidations topic", zap.Int("partition", partition), zap.Error(err), zap.Duration("backoff", d))
			if !sleep(ctx, d) {
				return
			}
			continue
		}
		bo.Reset()
		if kind, ok := controlKind(m.Headers); ok {
			c.control(kind, partition, m, log)
			continue
		}
		if m.Key == nil {
			log.Warn("ignoring an invalidation record without a key", zap.Int("partition", partition), zap.Int64("offset", m.Offset))
			continue
		}
		c.Invalidate(string(m.Key))
	}
}

// controlKind returns the value of a record's control header.
func controlKind(hs []kafkago.Header) (string, bool) {
	for _, h := range hs {
		if h.Key == inv.ControlHeader {
			return string(h.Value), true
		}
	}
	return "", false
}

// control applies a control record read from partition.
func (c *Cache[V]) control(kind string, partition int, m kafkago.Message, log *zap.Logger) {
	switch kind {
	case inv.ControlWatermark:
		var w inv.Watermark
		if err := json.Unmarshal(m.Value, &w); err != nil || w.Position == "" {
			c.skipControl("malformed "+kind, partition, m, log)
			return
		}
		c.marksMu.Lock()
		if mk := c.marks[partition]; mk != nil {
			*mk = mark{got: time.Now(), seen: true, pos: w.Position, at: w.At}
		}
		c.marksMu.Unlock()
	case inv.ControlFlush:
		c.flushAll()
		c.flushes.Add(1)
	default:
		c.skipControl(kind, partition, m, log)
	}
}

// skipControl counts a control record Follow does not understand and warns
// once per kind.
func (c *Cache[V]) skipControl(kind string, partition int, m kafkago.Message, log *zap.Logger) {
	c.controlSkipped.Add(1)
	c.marksMu.Lock()
	first := !c.warned[kind]
	c.warned[kind] = true
	c.marksMu.Unlock()
	if first {
		log.Warn("skipping control records this cache does not understand (warned once per kind; counted in Stats.ControlSkipped)",
			zap.String("kind", kind), zap.Int("partition", partition), zap.Int64("offset", m.Offset))
	}
}

func (c *Cache[V]) setMarks(m map[int]*mark) {
	c.marksMu.Lock()
	c.marks = m
	c.marksMu.Unlock()
}

// addMark starts tracking a partition found after positioning: it does not
// count until its first watermark (the writer learns partitions on its own
// schedule).
func (c *Cache[V]) addMark(p int) {
	c.marksMu.Lock()
	if c.marks != nil {
		c.marks[p] = &mark{got: time.Now(), grace: true}
	}
	c.marksMu.Unlock()
}

// freshCheck is how often the session compares watermark ages with
// MaxStaleness.
func (c *Cache[V]) freshCheck() time.Duration {
	return min(max(c.cfg.MaxStaleness/10, 5*time.Millisecond), 500*time.Millisecond)
}

// checkFresh makes the cache Ready when every partition's newest watermark
// is at most MaxStaleness old, and not Ready otherwise.
func (c *Cache[V]) checkFresh(log *zap.Logger, warnedNone *bool) {
	now := time.Now()
	var stale, none []int
	c.marksMu.Lock()
	for p, m := range c.marks {
		switch {
		case m.grace && !m.seen:
			// Found after positioning and read from its start; the writer
			// learns new partitions within a minute, and the partitions
			// positioned on prove it is live meanwhile.
		case now.Sub(m.got) > c.cfg.MaxStaleness:
			stale = append(stale, p)
			if !m.seen && !m.grace {
				none = append(none, p)
			}
		case !m.seen && !m.grace:
			stale = append(stale, p) // positioned, no watermark yet
		}
	}
	c.marksMu.Unlock()
	fresh := len(stale) == 0
	if fresh == c.ready.Load() {
		if len(none) > 0 && !*warnedNone {
			*warnedNone = true
			sort.Ints(none)
			log.Warn("no watermark on the invalidations topic since positioning: not caching; is the invalidation role running a version that writes watermarks? (Config.MaxStaleness < 0 follows without them)",
				zap.Ints("partitions", none), zap.Duration("max_staleness", c.cfg.MaxStaleness))
		}
		return
	}
	if fresh {
		c.setReady(true)
		if *warnedNone || c.stale.Load() > 0 {
			log.Info("watermarks fresh on every partition: caching again")
		}
		return
	}
	c.stale.Add(1)
	c.setReady(false)
	sort.Ints(stale)
	log.Warn("watermarks older than MaxStaleness: not caching until they are fresh (the invalidation role or the brokers are unreachable or stalled)",
		zap.Ints("partitions", stale), zap.Duration("max_staleness", c.cfg.MaxStaleness))
}

// endOffsets lists the topic's partitions and their end offsets.
func (c *Cache[V]) endOffsets(ctx context.Context, client *kafkago.Client) (map[int]int64, error) {
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: []string{c.cfg.Topic}})
	if err != nil {
		return nil, fmt.Errorf("metadata of %s: %w", c.cfg.Topic, err)
	}
	if len(meta.Topics) != 1 {
		return nil, fmt.Errorf("metadata of %s: topic not returned", c.cfg.Topic)
	}
	if err := meta.Topics[0].Error; err != nil {
		return nil, fmt.Errorf("metadata of %s: %w", c.cfg.Topic, err)
	}
	if len(meta.Topics[0].Partitions) == 0 {
		return nil, fmt.Errorf("metadata of %s: no partitions", c.cfg.Topic)
	}
	var reqs []kafkago.OffsetRequest
	for _, p := range meta.Topics[0].Partitions {
		reqs = append(reqs, kafkago.LastOffsetOf(p.ID))
	}
	resp, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: map[string][]kafkago.OffsetRequest{c.cfg.Topic: reqs}})
	if err != nil {
		return nil, fmt.Errorf("listing end offsets of %s: %w", c.cfg.Topic, err)
	}
	ends := make(map[int]int64, len(reqs))
	for _, po := range resp.Topics[c.cfg.Topic] {
		if po.Error != nil {
			return nil, fmt.Errorf("listing the end offset of %s/%d: %w", c.cfg.Topic, po.Partition, po.Error)
		}
		ends[po.Partition] = po.LastOffset
	}
	for _, req := range reqs {
		if _, ok := ends[req.Partition]; !ok {
			return nil, fmt.Errorf("listing end offsets of %s: partition %d not returned", c.cfg.Topic, req.Partition)
		}
	}
	return ends, nil
}

func sortedPartitions(m map[int]int64) []int {
	ps := make([]int, 0, len(m))
	for p := range m {
		ps = append(ps, p)
	}
	sort.Ints(ps)
	return ps
}

func newBackoff() *backoff.ExponentialBackOff {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 100 * time.Millisecond
	b.MaxInterval = 5 * time.Second
	b.MaxElapsedTime = 0 // retry until ctx ends
	b.Reset()
	return b
}

// sleep waits d or until ctx ends, and reports whether d elapsed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
