package targets

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// TxnIndex follows the transaction-metadata topic (<prefix>.transactions,
// one partition) and remembers, per commit LSN, how many changes each
// mapped table has in that transaction (from its END record), so the
// handler knows when it has seen a whole transaction.
//
// It keeps at most Max transactions (oldest dropped first; a dropped one is
// settled after the hold instead) and starts Lookback before now.
type TxnIndex struct {
	Brokers  []string
	Topic    string
	Tables   []string
	Max      int           // default 200000
	Lookback time.Duration // default 1m
	Log      *zap.Logger

	mu    sync.Mutex
	ends  map[pipeline.LSN]map[string]int
	order []pipeline.LSN
	first pipeline.LSN // commit LSN of the first END record read
}

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

type endRecord struct {
	Status          string `json:"status"`
	LSN             uint64 `json:"lsn"`
	DataCollections []struct {
		Name  string `json:"data_collection"`
		Count int    `json:"event_count"`
	} `json:"data_collections"`
}

func (x *TxnIndex) add(v []byte) {
	var r endRecord
	if err := json.Unmarshal(v, &r); err != nil || r.Status != "END" {
		return
	}
	x.mu.Lock()
	if x.first == 0 {
		x.first = pipeline.LSN(r.LSN)
	}
	x.mu.Unlock()
	var counts map[string]int
	for _, dc := range r.DataCollections {
		if slices.Contains(x.Tables, dc.Name) {
			if counts == nil {
				counts = map[string]int{}
			}
			counts[dc.Name] = dc.Count
		}
	}
	if counts == nil {
		return
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
		r = kafkago.NewReader(kafkago.ReaderConfig{Brokers: x.Brokers, Topic: x.Topic, Partition: 0,
			// MaxWait is also kafka-go's deadline for a fetch response to
			// start arriving (the broker waits MaxWait-1s): see the consumer
			// runtime's reader. MinBytes 1 returns records at once.
			MinBytes: 1, MaxBytes: 4 << 20, MaxWait: 2 * time.Second,
			ReadBackoffMin: 5 * time.Millisecond, ReadBackoffMax: 50 * time.Millisecond})
		err := r.SetOffsetAt(ctx, time.Now().Add(-lookback))
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
	for {
		m, err := r.ReadMessage(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, context.Canceled) {
				return nil
			}
			return fmt.Errorf("reading %s: %w", x.Topic, err)
		}
		x.add(m.Value)
	}
}
