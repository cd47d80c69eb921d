package cache

import (
	"context"
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
)

// errPositionLost ends a follow session whose position no longer covers
// every invalidation (a partition's end fell below the read position).
var errPositionLost = errors.New("position on the invalidations topic lost")

// Follow reads the invalidations topic and applies every record's key with
// Invalidate, until ctx ends or Close is called; then it clears the cache,
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
// positioned on every partition Ready becomes true.
//
// Connection failures are retried with backoff while keeping the position,
// so a broker outage delays invalidations (bound it with Config.TTL) but
// loses none. Positioning is retried with backoff until it succeeds (for
// example until the topic exists). About every 30 s Follow looks for new
// partitions, which it reads from their first offset, and for partitions
// whose end fell below its position (topic recreated): then it clears the
// cache and positions again.
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
	bo := newBackoff()
	log.Info("following the invalidations topic")
	defer log.Info("stopped following the invalidations topic")
	for {
		positioned, err := c.session(ctx, client, log)
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
func (c *Cache[V]) session(ctx context.Context, client *kafkago.Client, log *zap.Logger) (positioned bool, err error) {
	ends, err := c.endOffsets(ctx, client)
	if err != nil {
		return false, err
	}

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
	for _, p := range sortedPartitions(ends) {
		if err := start(p, ends[p]); err != nil {
			return false, err
		}
	}
	c.setReady(true)

	t := time.NewTicker(c.refresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case <-t.C:
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
				if err := start(p, kafkago.FirstOffset); err != nil {
					return true, err
				}
				continue
			}
			if off := pos[p]; off >= 0 && now[p] < off {
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
		if m.Key == nil {
			log.Warn("ignoring an invalidation record without a key", zap.Int("partition", partition), zap.Int64("offset", m.Offset))
			continue
		}
		c.Invalidate(string(m.Key))
	}
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
