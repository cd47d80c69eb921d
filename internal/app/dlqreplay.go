package app

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tidemark/tidemark/internal/config"
	webhooksink "github.com/tidemark/tidemark/sinks/webhook"
)

// ReplayOptions select what ReplayWebhookDLQ resends.
type ReplayOptions struct {
	// Since, when set, skips records dead-lettered (record timestamp)
	// before it.
	Since time.Time
	// DryRun reads and counts, and sends nothing.
	DryRun bool
	// OnFailed, when set, is told of each batch the receiver did not accept
	// (the error names no secret).
	OnFailed func(partition int, offset int64, err error)
}

// ReplayReport counts what a replay found and did.
type ReplayReport struct {
	// Topic is the dead-letter topic read, up to the end offsets it had
	// when the replay started.
	Topic string
	// Read counts the records read.
	Read int
	// OtherSource counts records another consumer dead-lettered (not
	// tidemark-dlq-source: webhook); they are left alone.
	OtherSource int
	// BeforeSince counts webhook batches dead-lettered before Since.
	BeforeSince int
	// Duplicates counts webhook batches whose id an earlier record of this
	// run had (dead-lettered twice): each id is sent once per run.
	Duplicates int
	// Resent counts batches the receiver acknowledged (with DryRun: the
	// batches that would be sent).
	Resent int
	// Failed counts batches the receiver refused for good (a 4xx), or that
	// are not webhook batches.
	Failed int
	// Stopped, when set, is the transient failure (the receiver down) that
	// ended the replay before the end; the batches after it were not sent.
	Stopped error
}

// ReplayWebhookDLQ reads <topic_prefix>.dlq from its start to its end at
// the time of the call and resends, in order, each batch the webhook sink
// dead-lettered (tidemark-dlq-source: webhook) to invalidation.webhook: the
// body unchanged (id, keys, positions, sent_at), signed anew with the
// configured secret and a fresh timestamp. A batch id is sent at most once
// per call. A receiver that refuses a batch for good (a 4xx) is counted and
// the replay goes on; one that stays unreachable or keeps failing after
// max_attempts tries stops the replay (Stopped), since the rest would fail
// too. Running it again resends what was acknowledged before: receivers
// dedupe on the id, and invalidating a key again is harmless anyway.
func ReplayWebhookDLQ(ctx context.Context, cfg *config.Config, opts ReplayOptions, log *zap.Logger) (ReplayReport, error) {
	if log == nil {
		log = zap.NewNop()
	}
	r := ReplayReport{Topic: cfg.Kafka.TopicPrefix + ".dlq"}
	if cfg.Invalidation == nil || cfg.Invalidation.Webhook == nil {
		return r, errors.New("the config has no invalidation.webhook to resend to")
	}
	wc := webhookSinkConfig(cfg.Invalidation.Webhook)
	// A command must end: retry each batch max_attempts times, also when the
	// running consumer holds.
	wc.OnFailure = webhooksink.OnFailureDLQ
	// Its start and stop lines are noise in a command's output; warnings
	// (the receiver failing) stay.
	ws, err := webhooksink.New(wc, log.WithOptions(zap.IncreaseLevel(zapcore.WarnLevel)))
	if err != nil {
		return r, fmt.Errorf("invalidation.webhook: %w", err)
	}
	defer ws.Close()
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return r, err
	}
	clientID := cfg.Kafka.ClientID + "-dlq-replay"
	client := &kafkago.Client{Addr: kafkago.TCP(cfg.Kafka.Brokers...), Timeout: 15 * time.Second, Transport: knet.Transport(clientID, 0)}
	spans, err := dlqSpans(ctx, client, r.Topic)
	if err != nil {
		return r, err
	}
	seen := map[string]bool{}
	for _, sp := range spans {
		err := readDLQPartition(ctx, cfg.Kafka.Brokers, knet.Dialer(clientID), r.Topic, sp, func(m kafkago.Message) bool {
			r.Read++
			if dlqHeader(m.Headers, "tidemark-dlq-source") != DLQSourceWebhook {
				r.OtherSource++
				return true
			}
			if !opts.Since.IsZero() && m.Time.Before(opts.Since) {
				r.BeforeSince++
				return true
			}
			id := replayBatchID(m.Value)
			if seen[id] {
				r.Duplicates++
				return true
			}
			seen[id] = true
			if opts.DryRun {
				r.Resent++
				return true
			}
			err := ws.Resend(ctx, m.Value)
			switch {
			case err == nil:
				r.Resent++
			case ctx.Err() != nil:
				return false
			case webhooksink.Retryable(err):
				r.Stopped = fmt.Errorf("%s/%d@%d: %w", r.Topic, m.Partition, m.Offset, err)
				return false
			default:
				r.Failed++
				if opts.OnFailed != nil {
					opts.OnFailed(m.Partition, m.Offset, err)
				}
			}
			return true
		})
		if err != nil {
			return r, err
		}
		if ctx.Err() != nil {
			return r, ctx.Err()
		}
		if r.Stopped != nil {
			return r, nil
		}
	}
	return r, nil
}

// replayBatchID is a dead-lettered body's payload id; bodies without one (from
// before ids) are told apart by their hash.
func replayBatchID(body []byte) string {
	var p struct {
		ID string `json:"id"`
	}
	if json.Unmarshal(body, &p) == nil && p.ID != "" {
		return p.ID
	}
	sum := sha256.Sum256(body)
	return "body:" + hex.EncodeToString(sum[:])
}

func dlqHeader(hs []kafkago.Header, key string) string {
	for _, h := range hs {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// dlqSpan is the records of one partition a replay reads: [first, end).
type dlqSpan struct {
	partition  int
	first, end int64
}

// dlqSpans reads topic's partitions and their first and end offsets
// now; later records are not part of the replay.
func dlqSpans(ctx context.Context, client *kafkago.Client, topic string) ([]dlqSpan, error) {
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: []string{topic}})
	if err != nil {
		return nil, fmt.Errorf("reading the metadata of %s: %w", topic, err)
	}
	if len(meta.Topics) != 1 {
		return nil, fmt.Errorf("topic %s: not in the metadata", topic)
	}
	if t := meta.Topics[0]; errors.Is(t.Error, kafkago.UnknownTopicOrPartition) {
		return nil, nil // never created: nothing was dead-lettered
	} else if t.Error != nil {
		return nil, fmt.Errorf("topic %s: %w", topic, t.Error)
	}
	req := &kafkago.ListOffsetsRequest{Topics: map[string][]kafkago.OffsetRequest{}}
	for _, p := range meta.Topics[0].Partitions {
		req.Topics[topic] = append(req.Topics[topic], kafkago.FirstOffsetOf(p.ID), kafkago.LastOffsetOf(p.ID))
	}
	offs, err := client.ListOffsets(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("listing the offsets of %s: %w", topic, err)
	}
	var spans []dlqSpan
	for _, po := range offs.Topics[topic] {
		if po.Error != nil {
			return nil, fmt.Errorf("offsets of %s/%d: %w", topic, po.Partition, po.Error)
		}
		if po.LastOffset > po.FirstOffset {
			spans = append(spans, dlqSpan{po.Partition, po.FirstOffset, po.LastOffset})
		}
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].partition < spans[j].partition })
	return spans, nil
}

// readDLQPartition hands each record of sp to f, in offset order, until f
// returns false or the dlqSpan's end.
func readDLQPartition(ctx context.Context, brokers []string, dialer *kafkago.Dialer, topic string, sp dlqSpan, f func(kafkago.Message) bool) error {
	var mu sync.Mutex
	var readErr []string // the reader's first errors, for the error message
	rd := kafkago.NewReader(kafkago.ReaderConfig{Brokers: brokers, Topic: topic, Partition: sp.partition, Dialer: dialer,
		MaxWait: 500 * time.Millisecond, ErrorLogger: kafkago.LoggerFunc(func(msg string, args ...any) {
			mu.Lock()
			defer mu.Unlock()
			if len(readErr) < 3 {
				readErr = append(readErr, fmt.Sprintf(msg, args...))
			}
		})})
	defer rd.Close()
	if err := rd.SetOffset(sp.first); err != nil {
		return fmt.Errorf("positioning on %s/%d at offset %d: %w", topic, sp.partition, sp.first, err)
	}
	for next := sp.first; next < sp.end; {
		// Records up to the end offset exist; a fetch that gets none for
		// this long means the brokers are gone.
		fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		m, err := rd.FetchMessage(fctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			mu.Lock()
			seen := strings.Join(readErr, "; ")
			mu.Unlock()
			if seen != "" {
				seen = " (the reader saw: " + seen + ")"
			}
			return fmt.Errorf("reading %s/%d at offset %d (end %d): %w%s", topic, sp.partition, next, sp.end, err, seen)
		}
		next = m.Offset + 1
		if !f(m) {
			return nil
		}
	}
	return nil
}
