package invalidation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/pipeline"
)

// ReplayFloor returns the position below which no change of topics can
// reach group again, or the zero position and why not (no slot, a
// partition with records the group has not committed on): the lower of
//
//   - the slot's confirmed_flush_lsn (capture re-sends only transactions
//     committed after it), and
//   - on every partition with records, the position of the record just
//     before the group's committed offset and the lowest position of the
//     records after it (the group is handed only those; capture is
//     at-least-once, so a re-sent transaction sits at a later offset with
//     an older position, and the consumer's in-memory dedupe does not
//     survive a restart).
//
// State kept only to make older changes harmless (last-writer-wins
// positions) may be dropped below it. Resetting the group's offsets to an
// earlier point breaks the premise. transport carries the connection
// security (nil: kafka-go's default).
func ReplayFloor(ctx context.Context, src *pgxpool.Pool, slot string, brokers []string, transport kafkago.RoundTripper,
	group string, topics []string) (pipeline.Position, string, error) {
	var confirmed *string
	err := src.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed)
	if errors.Is(err, pgx.ErrNoRows) {
		return pipeline.Position{}, fmt.Sprintf("replication slot %s does not exist", slot), nil
	}
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("reading slot %s: %w", slot, err)
	}
	if confirmed == nil {
		return pipeline.Position{}, fmt.Sprintf("replication slot %s has confirmed nothing yet", slot), nil
	}
	c, err := pipeline.ParseLSN(*confirmed)
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("slot %s: %w", slot, err)
	}
	w := pipeline.Position{CommitLSN: c}

	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second, Transport: transport}
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("reading topic metadata: %w", err)
	}
	req := map[string][]kafkago.OffsetRequest{}
	parts := map[string][]int{}
	for _, t := range meta.Topics {
		if t.Error != nil {
			return pipeline.Position{}, "", fmt.Errorf("topic %s: %w", t.Name, t.Error)
		}
		for _, p := range t.Partitions {
			req[t.Name] = append(req[t.Name], kafkago.LastOffsetOf(p.ID))
			parts[t.Name] = append(parts[t.Name], p.ID)
		}
	}
	offs, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: req})
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("listing end offsets: %w", err)
	}
	resp, err := client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: group, Topics: parts})
	if err == nil {
		err = resp.Error
	}
	if err != nil {
		return pipeline.Position{}, "", fmt.Errorf("reading the committed offsets of group %s: %w", group, err)
	}
	committed := map[string]map[int]int64{}
	for t, ps := range resp.Topics {
		committed[t] = map[int]int64{}
		for _, p := range ps {
			if p.Error == nil {
				committed[t][p.Partition] = p.CommittedOffset
			}
		}
	}
	names := make([]string, 0, len(offs.Topics))
	for t := range offs.Topics {
		names = append(names, t)
	}
	sort.Strings(names)
	budget := int64(floorScanRecords)
	for _, t := range names {
		for _, p := range offs.Topics[t] {
			if p.Error != nil {
				return pipeline.Position{}, "", fmt.Errorf("end offset of %s/%d: %w", t, p.Partition, p.Error)
			}
			end := p.LastOffset
			if end <= 0 {
				continue // never written: nothing there to replay
			}
			co, ok := committed[t][p.Partition]
			if !ok || co <= 0 {
				return pipeline.Position{}, fmt.Sprintf("group %s has committed nothing on %s/%d", group, t, p.Partition), nil
			}
			// The record just before the committed offset, and the records
			// not consumed yet, which may be older than it: capture is
			// at-least-once, and after a crash it re-sends what followed
			// the slot's confirmed position at later offsets. Their lowest
			// position bounds the floor (a bounded scan; a larger lag
			// prunes nothing this round).
			if budget -= end - co; budget < 0 {
				return pipeline.Position{}, fmt.Sprintf("group %s is more than %d records behind (%s/%d: committed %d of %d)",
					group, floorScanRecords, t, p.Partition, co, end), nil
			}
			low, err := lowestPosition(ctx, client, t, p.Partition, co-1, end)
			if err != nil {
				return pipeline.Position{}, "", err
			}
			if low.Less(w) {
				w = low
			}
		}
	}
	return w, "", nil
}

// floorScanRecords bounds the records not yet consumed that ReplayFloor
// reads, over all partitions.
const floorScanRecords = 100_000

// lowestPosition returns the lowest position of the records at offsets
// [from, to).
func lowestPosition(ctx context.Context, client *kafkago.Client, topic string, partition int, from, to int64) (pipeline.Position, error) {
	low := pipeline.Position{CommitLSN: ^pipeline.LSN(0), Seq: ^uint32(0)}
	for off := from; off < to; {
		resp, err := client.Fetch(ctx, &kafkago.FetchRequest{Topic: topic, Partition: partition, Offset: off, MinBytes: 1, MaxBytes: 4 << 20, MaxWait: time.Second})
		if err == nil {
			err = resp.Error
		}
		if err != nil {
			return pipeline.Position{}, fmt.Errorf("reading %s/%d@%d: %w", topic, partition, off, err)
		}
		next := off
		for {
			rec, err := resp.Records.ReadRecord()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return pipeline.Position{}, fmt.Errorf("reading %s/%d@%d: %w", topic, partition, off, err)
			}
			if rec.Offset < off {
				continue
			}
			if rec.Offset >= to {
				break
			}
			next = rec.Offset + 1
			pos, err := recordPosition(topic, partition, rec)
			if err != nil {
				return pipeline.Position{}, err
			}
			if pos.Less(low) {
				low = pos
			}
		}
		if next == off {
			return pipeline.Position{}, fmt.Errorf("reading %s/%d@%d: no record there (deleted by retention?)", topic, partition, off)
		}
		off = next
	}
	return low, nil
}

// recordPosition reads a record's position headers.
func recordPosition(topic string, partition int, rec *kafkago.Record) (pipeline.Position, error) {
	var lsn, seq string
	for _, h := range rec.Headers {
		switch h.Key {
		case "tidemark-lsn":
			lsn = string(h.Value)
		case "tidemark-seq":
			seq = string(h.Value)
		}
	}
	l, err1 := strconv.ParseUint(lsn, 10, 64)
	q, err2 := strconv.ParseUint(seq, 10, 32)
	if err1 != nil || err2 != nil {
		return pipeline.Position{}, fmt.Errorf("%s/%d@%d carries no position headers (tidemark-lsn %q, tidemark-seq %q)", topic, partition, rec.Offset, lsn, seq)
	}
	return pipeline.Position{CommitLSN: pipeline.LSN(l), Seq: uint32(q)}, nil
}
