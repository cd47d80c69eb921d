package targets

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// TxnIndex follows the transaction-metadata topic (<prefix>.transaction,
// one partition) and remembers, per commit LSN, how many changes each
// mapped table has in that transaction (from its END record), so the
// handler knows when it has seen a whole transaction.
//
// It keeps at most Max transactions (oldest dropped first; a dropped one is
// settled after the hold instead) and starts Lookback before now, or, when
// From is set and earlier, Lookback before From. A record
// pipeline.ParseTxnRecord refuses is skipped, counted (Malformed) and
// logged: the transaction it would have ended is settled after the hold.
type TxnIndex struct {
	Brokers []string
	// Dialer connects to the brokers (TLS, SASL). Default: kafka-go's.
	Dialer   *kafkago.Dialer
	Topic    string
	Tables   []string
	Max      int           // default 200000
	Lookback time.Duration // default 1m
	// From, when set before Run, is the earliest record time of the
	// transactions rooms waited for when the consumer last stopped
	// (Store.Waiting): their END records are read again.
	From time.Time
	Log  *zap.Logger

	// onStart, when set, is called with the start offset once Run has
	// set it (tests).
	onStart func(int64)

	mu        sync.Mutex
	ends      map[pipeline.LSN]map[string]int
	order     []pipeline.LSN
	first     pipeline.LSN // commit LSN of the first END record read
	malformed atomic.Uint64
}

// Malformed returns the number of records skipped because they are not
// valid BEGIN or END records.
func (x *TxnIndex) Malformed() uint64 { return x.malformed.Load() }

// Covers reports whether the index has read from before lsn: the END
// record of a transaction committed at lsn is (or will be) in it. A
// transaction older than the index's start will never be found; the
// handler then settles it at the end of its batch instead of waiting.
func (x *TxnIndex) Covers(lsn pipeline.LSN) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.first != 0 && lsn >= x.first
}

// Started reports whether the index has read an END record.
func (x *TxnIndex) Started() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.first != 0
}

// Lookup returns the per-table change counts of the transaction committed
// at lsn, when its END record has been read.
func (x *TxnIndex) Lookup(lsn pipeline.LSN) (map[string]int, bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	c, ok := x.ends[lsn]
	return c, ok
}

// Forget drops a settled transaction.
func (x *TxnIndex) Forget(lsn pipeline.LSN) {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.ends, lsn)
}

// add indexes one record of the topic: an END record's counts of the
// mapped tables (a BEGIN record says nothing the index needs). A record
// that is not a valid BEGIN or END record is an error, and changes nothing.
func (x *TxnIndex) add(v []byte) error {
	r, err := pipeline.ParseTxnRecord(v)
	if err != nil {
		return err
	}
	if !r.IsEnd() {
		return nil
	}
	x.mu.Lock()
	if x.first == 0 {
		x.first = pipeline.LSN(r.LSN)
	}
	x.mu.Unlock()
	var counts map[string]int
	for _, dc := range r.DataCollections {
		if slices.Contains(x.Tables, dc.Table) {
			if counts == nil {
				counts = map[string]int{}
			}
			counts[dc.Table] = dc.Count
		}
	}
	if counts == nil {
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.ends == nil {
		x.ends = map[pipeline.LSN]map[string]int{}
	}
	lsn := pipeline.LSN(r.LSN)
	if _, dup := x.ends[lsn]; !dup {
		x.order = append(x.order, lsn)
	}
	x.ends[lsn] = counts
	max := x.Max
	if max <= 0 {
		max = 200000
	}
	for len(x.ends) > max && len(x.order) > 0 {
		delete(x.ends, x.order[0])
		x.order = x.order[1:]
	}
	if len(x.order) > 2*max+1024 { // forgotten entries: compact the queue
		live := x.order[:0]
		for _, l := range x.order {
			if _, ok := x.ends[l]; ok {
				live = append(live, l)
			}
		}
		x.order = live
	}
	return nil
}

// read indexes one record read from the topic; a malformed one is counted
// and logged (the first, then every 100th), and skipped.
func (x *TxnIndex) read(log *zap.Logger, m *kafkago.Message) {
	err := x.add(m.Value)
	if err == nil {
		return
	}
	if n := x.malformed.Add(1); n == 1 || n%100 == 0 {
		log.Warn("skipped a malformed record of the transactions topic; the transaction it ends is settled after the hold (targets.hold)",
			zap.String("topic", m.Topic), zap.Int("partition", m.Partition), zap.Int64("offset", m.Offset),
			zap.Uint64("malformed_total", n), zap.Error(err))
	}
}

// startOffset is the offset of the first record at or after t, or, when
// every record is older (or there is none), the partition's end offset at
// this moment: a number, never kafka-go's "last offset" sentinel, which it
// resolves only at the first fetch and so skips every END record published
// in between (a fresh topic's first transactions then waited out the hold).
func (x *TxnIndex) startOffset(ctx context.Context, t time.Time) (int64, error) {
	d := x.Dialer
	if d == nil {
		d = kafkago.DefaultDialer
	}
	var err error
	for _, b := range x.Brokers {
		var conn *kafkago.Conn
		conn, err = d.DialLeader(ctx, "tcp", b, x.Topic, 0)
		if err != nil {
			continue
		}
		if dl, ok := ctx.Deadline(); ok {
			_ = conn.SetDeadline(dl)
		} else {
			_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		}
		// The end offset is read first: a record appended after it is at
		// or beyond it, so falling back to it (no record inside the
		// lookback) cannot skip one appended between the two requests.
		end, err := conn.ReadLastOffset()
		var off int64
		if err == nil {
			off, err = conn.ReadOffset(t)
		}
		if err == nil && (off < 0 || off > end) {
			off = end
		}
		_ = conn.Close()
		if err != nil {
			return 0, fmt.Errorf("reading the start offset of %s: %w", x.Topic, err)
		}
		return off, nil
	}
	return 0, fmt.Errorf("reading the start offset of %s: no broker reachable: %w", x.Topic, err)
}

// Run reads the topic until ctx ends. It waits (with backoff) for the topic
// to exist.
func (x *TxnIndex) Run(ctx context.Context) error {
	log := x.Log
	if log == nil {
		log = zap.NewNop()
	}
	lookback := x.Lookback
	if lookback <= 0 {
		lookback = time.Minute
	}
	var r *kafkago.Reader
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond // the topic usually appears within a second
	bo.MaxInterval = 2 * time.Second
	bo.MaxElapsedTime = 0
	attempt := 0
	err := backoff.Retry(func() error {
		r = kafkago.NewReader(kafkago.ReaderConfig{Brokers: x.Brokers, Topic: x.Topic, Partition: 0, Dialer: x.Dialer,
			// MaxWait is also kafka-go's deadline for a fetch response to
			// start arriving (the broker waits MaxWait-1s): see the consumer
			// runtime's reader. MinBytes 1 returns records at once.
			MinBytes: 1, MaxBytes: 4 << 20, MaxWait: 2 * time.Second,
			ReadBackoffMin: 5 * time.Millisecond, ReadBackoffMax: 50 * time.Millisecond})
		start := time.Now().Add(-lookback)
		if !x.From.IsZero() && x.From.Add(-lookback).Before(start) {
			start = x.From.Add(-lookback)
		}
		off, err := x.startOffset(ctx, start)
		if err == nil {
			err = r.SetOffset(off)
		}
		if err == nil && x.onStart != nil {
			x.onStart(off)
		}
		if err != nil {
			_ = r.Close()
			if ctx.Err() != nil {
				return backoff.Permanent(ctx.Err())
			}
			attempt++
			if attempt == 1 || attempt%20 == 0 {
				log.Warn("transactions topic not readable yet; retrying", zap.String("topic", x.Topic), zap.Error(err))
			}
		}
		return err
	}, backoff.WithContext(bo, ctx))
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("following %s: %w", x.Topic, err)
	}
	defer r.Close()
	// An unreachable broker stalls reading, with backoff and a warning;
	// the reader resumes at its offset.
	bo.Reset()
	for failures := 0; ; {
		m, err := r.ReadMessage(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, context.Canceled) {
				return nil
			}
			if failures++; failures == 1 || failures%20 == 0 {
				log.Warn("reading the transactions topic failed; retrying", zap.String("topic", x.Topic), zap.Error(err), zap.Int("attempt", failures))
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(bo.NextBackOff()):
			}
			continue
		}
		if failures > 0 {
			failures = 0
			bo.Reset()
		}
		x.read(log, &m)
	}
}
