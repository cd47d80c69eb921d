package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/pipeline"
)

// Published is what Kafka holds of a topic prefix's capture: whether it
// ever published, and the last transaction it did.
type Published struct {
	// Any reports that a topic of the prefix has held a record (its end
	// offset is past 0, even if retention removed the records since).
	Any bool
	// CommitLSN is the commit LSN of the last published transaction; 0 when
	// it could not be read (the records expired, or were not Tidemark's).
	CommitLSN pipeline.LSN
	// EndLSN is the end_lsn of its END record (0 when unknown).
	EndLSN pipeline.LSN
	// Incomplete reports that the last record of the transactions topic is
	// a BEGIN: that transaction's END, and maybe some of its changes, were
	// not published.
	Incomplete bool
	// Topic is where CommitLSN was read.
	Topic string
}

func (p Published) lsnText() string {
	if p.CommitLSN == 0 {
		return "unknown"
	}
	return p.CommitLSN.String()
}

// SlotGapError is Prepare's refusal to create a missing replication slot
// once the topic prefix has published: the slot is what kept the changes
// not yet published readable, and a new one starts at the current WAL
// position, so everything committed in between would silently never be
// captured. `tidemark run` exits with code 3 on it; AcceptGap
// (`--accept-gap`) creates the slot anyway.
type SlotGapError struct {
	Slot   string
	Prefix string
	Last   Published
}

func (e *SlotGapError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "replication slot %q does not exist, but topic prefix %q has published before", e.Slot, e.Prefix)
	since := "after the last published transaction"
	if e.Last.CommitLSN != 0 {
		fmt.Fprintf(&b, ": the last published transaction committed at LSN %s (%s", e.Last.CommitLSN, e.Last.Topic)
		since = "after " + e.Last.CommitLSN.String()
		if e.Last.Incomplete {
			b.WriteString(", a BEGIN record: its END, and maybe some of its changes, were not published")
			since = "at or after " + e.Last.CommitLSN.String()
		}
		b.WriteString(")")
	} else {
		b.WriteString(" (the position of its last record could not be read)")
	}
	fmt.Fprintf(&b, ". A new slot would start at the current WAL position, so the changes committed %s until now would never be captured (a gap); Tidemark does not create one silently. ", since)
	b.WriteString("If postgres.slot or postgres.dsn names the wrong slot or database, correct it. ")
	b.WriteString("To continue from now, knowingly leaving that gap, run `tidemark run --accept-gap`; what consumers derived from these topics may then need rebuilding (e.g. `tidemark rebuild targets --all`). " +
		"To publish every table again instead, from a snapshot at the new slot's start, run `tidemark run --resnapshot`")
	return b.String()
}

// lastPublished reads what the prefix's topics hold (see Published),
// retrying while Kafka cannot be asked, until ctx ends.
func lastPublished(ctx context.Context, cfg *config.Config, topics []string, rc pipeline.RouterConfig, log *zap.Logger) (Published, error) {
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return Published{}, err
	}
	transport := knet.Transport(cfg.Kafka.ClientID, 0)
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(cfg.Kafka.Brokers...), Timeout: 10 * time.Second, Transport: transport}
	txnTopic := ""
	if rc.TransactionsTopic {
		txnTopic = rc.TransactionsTopicName()
	}
	bo := backoff.NewExponentialBackOff()
	bo.MaxInterval = 10 * time.Second
	bo.MaxElapsedTime = 0
	attempt := 0
	var p Published
	err = backoff.Retry(func() error {
		var err error
		p, err = readPublished(ctx, client, topics, txnTopic)
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		if err = kafkanet.Explain(err, strings.Join(cfg.Kafka.Brokers, ","), knet); kafkanet.IsAccess(err) {
			return backoff.Permanent(err)
		}
		if err != nil {
			attempt++
			if attempt == 1 || attempt%10 == 0 {
				log.Warn("replication slot missing and kafka not ready: cannot yet tell whether the topic prefix has published (a new slot would leave a gap); retrying",
					zap.String("slot", cfg.Postgres.Slot), zap.Error(err), zap.Int("attempt", attempt))
			}
		}
		return err
	}, backoff.WithContext(bo, ctx))
	return p, err
}

// readPublished asks Kafka once. The transactions topic (one partition,
// txnTopic; "" when disabled) names the last transaction; without records
// there, the last record of each partition of the other topics does, by its
// tidemark-lsn header.
func readPublished(ctx context.Context, client *kafkago.Client, topics []string, txnTopic string) (Published, error) {
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return Published{}, fmt.Errorf("reading topic metadata: %w", err)
	}
	req := &kafkago.ListOffsetsRequest{Topics: map[string][]kafkago.OffsetRequest{}}
	for _, t := range meta.Topics {
		if errors.Is(t.Error, kafkago.UnknownTopicOrPartition) {
			continue // never created: nothing published there
		}
		if t.Error != nil {
			return Published{}, fmt.Errorf("topic %s: %w", t.Name, t.Error)
		}
		for _, part := range t.Partitions {
			req.Topics[t.Name] = append(req.Topics[t.Name], kafkago.FirstOffsetOf(part.ID), kafkago.LastOffsetOf(part.ID))
		}
	}
	if len(req.Topics) == 0 {
		return Published{}, nil
	}
	offs, err := client.ListOffsets(ctx, req)
	if err != nil {
		return Published{}, fmt.Errorf("listing offsets: %w", err)
	}
	type span struct {
		topic       string
		part        int
		first, end  int64
		holdsRecord bool
	}
	var spans []span
	var p Published
	for topic, pos := range offs.Topics {
		for _, po := range pos {
			if po.Error != nil {
				return Published{}, fmt.Errorf("offsets of %s/%d: %w", topic, po.Partition, po.Error)
			}
			if po.LastOffset > 0 {
				p.Any = true
			}
			spans = append(spans, span{topic, po.Partition, po.FirstOffset, po.LastOffset, po.LastOffset > po.FirstOffset})
		}
	}
	if !p.Any {
		return p, nil
	}
	for _, s := range spans {
		if s.topic != txnTopic || !s.holdsRecord {
			continue
		}
		rec, ok, err := lastRecord(ctx, client, s.topic, s.part, s.end)
		if err != nil {
			return Published{}, err
		}
		if !ok {
			continue
		}
		if tr, err := pipeline.ParseTxnRecord(rec.value); err == nil {
			p.CommitLSN, p.EndLSN, p.Incomplete, p.Topic = pipeline.LSN(tr.LSN), pipeline.LSN(tr.EndLSN), !tr.IsEnd(), s.topic
			return p, nil
		}
	}
	for _, s := range spans {
		if s.topic == txnTopic || !s.holdsRecord {
			continue
		}
		rec, ok, err := lastRecord(ctx, client, s.topic, s.part, s.end)
		if err != nil {
			return Published{}, err
		}
		if l, err := strconv.ParseUint(rec.headers["tidemark-lsn"], 10, 64); ok && err == nil && pipeline.LSN(l) > p.CommitLSN {
			p.CommitLSN, p.Topic = pipeline.LSN(l), s.topic
		}
	}
	return p, nil
}

type lastRec struct {
	value   []byte
	headers map[string]string
}

// lastRecord fetches the record before offset end of topic/part; ok is
// false when the broker returned none there.
func lastRecord(ctx context.Context, client *kafkago.Client, topic string, part int, end int64) (lastRec, bool, error) {
	resp, err := client.Fetch(ctx, &kafkago.FetchRequest{Topic: topic, Partition: part, Offset: end - 1, MaxBytes: 1 << 20, MaxWait: 100 * time.Millisecond})
	if err != nil {
		return lastRec{}, false, fmt.Errorf("fetching the last record of %s/%d: %w", topic, part, err)
	}
	if resp.Error != nil {
		return lastRec{}, false, fmt.Errorf("fetching the last record of %s/%d: %w", topic, part, resp.Error)
	}
	var out lastRec
	found := int64(-1)
	for resp.Records != nil {
		r, err := resp.Records.ReadRecord()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return lastRec{}, false, fmt.Errorf("reading the last record of %s/%d: %w", topic, part, err)
		}
		if r.Offset >= end || r.Offset < found {
			continue
		}
		rec := lastRec{headers: map[string]string{}}
		if r.Value != nil {
			rec.value, err = io.ReadAll(r.Value)
			r.Value.Close()
			if err != nil {
				return lastRec{}, false, fmt.Errorf("reading the last record of %s/%d: %w", topic, part, err)
			}
		}
		for _, h := range r.Headers {
			rec.headers[h.Key] = string(h.Value)
		}
		out, found = rec, r.Offset
	}
	return out, found >= 0, nil
}
