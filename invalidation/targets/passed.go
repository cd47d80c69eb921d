package targets

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/pipeline"
)

// PipelinePassed returns a Passed function for Auditor: it waits until the
// capture slot has confirmed lsn (every change committed before it is in
// Kafka), then until the consumer group has committed offsets at or beyond
// the ends its topics had at that moment (its effects are durable).
// transport carries the connection security (nil: kafka-go's default).
func PipelinePassed(src *pgxpool.Pool, slot string, brokers []string, transport kafkago.RoundTripper, group string, topics []string) func(context.Context, pipeline.LSN) error {
	return func(ctx context.Context, lsn pipeline.LSN) error {
		for {
			var confirmed *string
			err := src.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed)
			if err != nil {
				return fmt.Errorf("reading slot %s: %w", slot, err)
			}
			if confirmed != nil {
				if c, err := pipeline.ParseLSN(*confirmed); err == nil && c >= lsn {
					break
				}
			}
			if err := sleep(ctx, 100*time.Millisecond); err != nil {
				return err
			}
		}
		client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second, Transport: transport}
		meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
		if err != nil {
			return fmt.Errorf("reading topic metadata: %w", err)
		}
		req := map[string][]kafkago.OffsetRequest{}
		parts := map[string][]int{}
		for _, t := range meta.Topics {
			for _, p := range t.Partitions {
				req[t.Name] = append(req[t.Name], kafkago.LastOffsetOf(p.ID))
				parts[t.Name] = append(parts[t.Name], p.ID)
			}
		}
		offs, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: req})
		if err != nil {
			return fmt.Errorf("listing end offsets: %w", err)
		}
		ends := map[string]map[int]int64{}
		for t, ps := range offs.Topics {
			ends[t] = map[int]int64{}
			for _, p := range ps {
				ends[t][p.Partition] = p.LastOffset
			}
		}
		for {
			resp, err := client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: group, Topics: parts})
			if err == nil && resp.Error == nil {
				committed := map[string]map[int]int64{}
				for t, ps := range resp.Topics {
					committed[t] = map[int]int64{}
					for _, p := range ps {
						if p.Error == nil {
							committed[t][p.Partition] = p.CommittedOffset
						}
					}
				}
				behind := false
				for t, ps := range ends {
					for p, end := range ps {
						if c, ok := committed[t][p]; end > 0 && (!ok || c < end) {
							behind = true
						}
					}
				}
				if !behind {
					return nil
				}
			}
			if err := sleep(ctx, 100*time.Millisecond); err != nil {
				return err
			}
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
