// Package kafka is Tidemark's Kafka sink: it makes pipeline messages durable
// in Kafka with acks=all, partitioned deterministically.
//
// Partitioning: partition = (murmur2(key) & 0x7fffffff) % numPartitions, the
// same function as the Java client's default partitioner (and franz-go's), so
// producers and consumers in any language can compute where a key lives.
// A nil key hashes like an empty one (one fixed partition). Broadcast
// messages (truncates) go to every partition of their topic. Changing a
// topic's partition count moves keys.
//
// Ordering: one Write is split into rounds in which every partition receives
// at most one produce batch, so a batch succeeds or fails as a whole; failed
// batches are retried with backoff before anything later is written. Because
// kafka-go has no idempotent producer, a retry after a lost acknowledgement
// may write a batch twice (at-least-once); consumers dedupe by position.
package kafka

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// Config configures the sink.
type Config struct {
	// Brokers are the bootstrap addresses (required).
	Brokers []string
	// ClientID names the producer to the brokers. Default "tidemark".
	ClientID string
	// Partitions is the partition count of topics Tidemark creates. Default 6.
	Partitions int
	// ReplicationFactor of topics Tidemark creates. Default 1 (use 3 in
	// production clusters).
	ReplicationFactor int
	// TopicConfigs are applied to topics Tidemark creates (e.g.
	// retention.ms).
	TopicConfigs map[string]string
	// Compression: none (default), gzip, snappy, lz4, zstd.
	Compression string
	// BatchBytes bounds one produce request per partition. Default 1 MiB.
	BatchBytes int64
	// WriteTimeout bounds one produce attempt. Default 10s.
	WriteTimeout time.Duration
	// MaxBackoff bounds the wait between retries of a failed write. Default 5s.
	MaxBackoff time.Duration
}

func (c *Config) defaults() {
	if c.ClientID == "" {
		c.ClientID = "tidemark"
	}
	if c.Partitions <= 0 {
		c.Partitions = 6
	}
	if c.ReplicationFactor <= 0 {
		c.ReplicationFactor = 1
	}
	if c.BatchBytes <= 0 {
		c.BatchBytes = 1 << 20
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = 5 * time.Second
	}
}

// CompressionCodec maps a compression name to kafka-go's codec.
func CompressionCodec(name string) (kafkago.Compression, error) {
	switch name {
	case "", "none":
		return 0, nil
	case "gzip":
		return kafkago.Gzip, nil
	case "snappy":
		return kafkago.Snappy, nil
	case "lz4":
		return kafkago.Lz4, nil
	case "zstd":
		return kafkago.Zstd, nil
	}
	return 0, fmt.Errorf("unknown compression %q (want none, gzip, snappy, lz4 or zstd)", name)
}

// Stats are the sink's counters.
type Stats struct {
	mu          sync.Mutex
	Retries     uint64
	LastError   string
	LastErrorAt time.Time
	Unavailable bool
}

// Sink writes to Kafka. It satisfies pipeline.Sink.
type Sink struct {
	cfg    Config
	log    *zap.Logger
	w      *kafkago.Writer
	client *kafkago.Client

	mu    sync.Mutex
	parts map[string]int // partition counts by topic

	stats Stats
}

var _ pipeline.Sink = (*Sink)(nil)

const partitionHeader = "tidemark-partition"

// batchMessages bounds the messages of one partition in one round.
const batchMessages = 2048

// balancer is murmur2 (Java-compatible, nil keys hashed consistently), except
// for broadcast copies, which carry their partition in a header.
type balancer struct{ m kafkago.Murmur2Balancer }

func (b balancer) Balance(msg kafkago.Message, partitions ...int) int {
	for _, h := range msg.Headers {
		if h.Key == partitionHeader {
			if p, err := strconv.Atoi(string(h.Value)); err == nil {
				return p
			}
		}
	}
	return b.m.Balance(msg, partitions...)
}

// PartitionFor returns the partition of key among n partitions, as the sink
// (and Java clients) compute it.
func PartitionFor(key []byte, n int) int {
	parts := make([]int, n)
	for i := range parts {
		parts[i] = i
	}
	return kafkago.Murmur2Balancer{Consistent: true}.Balance(kafkago.Message{Key: key}, parts...)
}

// New builds a sink. It connects lazily.
func New(cfg Config, log *zap.Logger) (*Sink, error) {
	if len(cfg.Brokers) == 0 {
		return nil, errors.New("kafka sink: no brokers configured")
	}
	cfg.defaults()
	codec, err := CompressionCodec(cfg.Compression)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	transport := &kafkago.Transport{ClientID: cfg.ClientID, MetadataTTL: 30 * time.Second}
	w := &kafkago.Writer{
		Addr:         kafkago.TCP(cfg.Brokers...),
		Balancer:     balancer{kafkago.Murmur2Balancer{Consistent: true}},
		RequiredAcks: kafkago.RequireAll,
		// One batch per partition per round: the sink splits rounds itself
		// so that batches never exceed these limits. (kafka-go preallocates
		// BatchSize messages per batch, so keep it moderate.)
		BatchSize:       batchMessages,
		BatchBytes:      cfg.BatchBytes,
		BatchTimeout:    time.Millisecond,
		MaxAttempts:     3,
		WriteBackoffMin: 50 * time.Millisecond,
		WriteBackoffMax: 500 * time.Millisecond,
		WriteTimeout:    cfg.WriteTimeout,
		ReadTimeout:     cfg.WriteTimeout,
		Compression:     codec,
		Transport:       transport,
	}
	return &Sink{cfg: cfg, log: log, w: w, parts: map[string]int{},
		client: &kafkago.Client{Addr: kafkago.TCP(cfg.Brokers...), Timeout: 30 * time.Second, Transport: transport}}, nil
}

// TopicSpec overrides the partition count and configs of one topic.
type TopicSpec struct {
	Partitions int
	Configs    map[string]string
}

// EnsureTopics creates the topics that do not exist (with the configured
// partitions, replication factor and configs, overridden per topic by specs)
// and learns every topic's partition count.
func (s *Sink) EnsureTopics(ctx context.Context, topics []string, specs map[string]TopicSpec) error {
	meta, err := s.client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return fmt.Errorf("reading topic metadata from %v: %w", s.cfg.Brokers, err)
	}
	existing := map[string]int{}
	for _, t := range meta.Topics {
		if t.Error == nil && len(t.Partitions) > 0 {
			existing[t.Name] = len(t.Partitions)
		}
	}
	var create []kafkago.TopicConfig
	for _, t := range topics {
		if _, ok := existing[t]; ok {
			continue
		}
		spec := specs[t]
		tc := kafkago.TopicConfig{Topic: t, NumPartitions: s.cfg.Partitions, ReplicationFactor: s.cfg.ReplicationFactor}
		if spec.Partitions > 0 {
			tc.NumPartitions = spec.Partitions
		}
		for k, v := range s.cfg.TopicConfigs {
			tc.ConfigEntries = append(tc.ConfigEntries, kafkago.ConfigEntry{ConfigName: k, ConfigValue: v})
		}
		for k, v := range spec.Configs {
			tc.ConfigEntries = append(tc.ConfigEntries, kafkago.ConfigEntry{ConfigName: k, ConfigValue: v})
		}
		create = append(create, tc)
	}
	if len(create) > 0 {
		resp, err := s.client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: create})
		if err != nil {
			return fmt.Errorf("creating topics: %w", err)
		}
		for name, e := range resp.Errors {
			if e != nil && !errors.Is(e, kafkago.TopicAlreadyExists) {
				return fmt.Errorf("creating topic %s: %w", name, e)
			}
		}
		for _, tc := range create {
			existing[tc.Topic] = tc.NumPartitions
		}
		// Wait until the brokers report the new topics' partitions.
		deadline := time.Now().Add(15 * time.Second)
		for {
			meta, err := s.client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
			ready := err == nil
			if err == nil {
				for _, t := range meta.Topics {
					if t.Error != nil || len(t.Partitions) == 0 {
						ready = false
					} else {
						existing[t.Name] = len(t.Partitions)
					}
				}
			}
			if ready {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("topics not ready after creation: %v", err)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	s.mu.Lock()
	for t, n := range existing {
		s.parts[t] = n
	}
	s.mu.Unlock()
	return nil
}

// Partitions returns the known partition count of topic (0 if unknown).
func (s *Sink) Partitions(topic string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.parts[topic]
}

// Write makes msgs durable (acks=all), retrying transient failures with
// backoff until ctx ends. It returns a terminal error for messages Kafka can
// never accept (too large), naming the topic and position.
func (s *Sink) Write(ctx context.Context, msgs []pipeline.Message) error {
	kms, err := s.convert(msgs)
	if err != nil {
		return err
	}
	for len(kms) > 0 {
		n := s.round(kms)
		if err := s.writeRound(ctx, kms[:n]); err != nil {
			return err
		}
		kms = kms[n:]
	}
	return nil
}

func (s *Sink) convert(msgs []pipeline.Message) ([]kafkago.Message, error) {
	out := make([]kafkago.Message, 0, len(msgs))
	for i := range msgs {
		m := &msgs[i]
		hs := make([]kafkago.Header, len(m.Headers), len(m.Headers)+1)
		for j, h := range m.Headers {
			hs[j] = kafkago.Header{Key: h.Key, Value: h.Value}
		}
		km := kafkago.Message{Topic: m.Topic, Key: m.Key, Value: m.Value, Headers: hs}
		if size := int64(len(m.Key) + len(m.Value) + 64); size > s.cfg.BatchBytes {
			return nil, fmt.Errorf("message for topic %s at position %s is %d bytes, over the %d-byte batch limit (kafka.batch_bytes; also check the topic's max.message.bytes)",
				m.Topic, m.Pos, size, s.cfg.BatchBytes)
		}
		if m.Broadcast {
			n := s.Partitions(m.Topic)
			if n == 0 {
				n = 1
			}
			for p := 0; p < n; p++ {
				c := km
				c.Headers = append(hs[:len(hs):len(hs)], kafkago.Header{Key: partitionHeader, Value: strconv.AppendInt(nil, int64(p), 10)})
				out = append(out, c)
			}
			continue
		}
		out = append(out, km)
	}
	return out, nil
}

type tp struct {
	topic string
	part  int
}

// round returns how many leading messages fit in one round: at most
// BatchBytes and batchMessages per partition, so kafka-go builds exactly one
// batch per partition, which succeeds or fails as a whole.
func (s *Sink) round(kms []kafkago.Message) int {
	bytes := map[tp]int64{}
	counts := map[tp]int{}
	for i := range kms {
		m := &kms[i]
		n := s.Partitions(m.Topic)
		if n == 0 {
			n = 1
		}
		p := balancer{kafkago.Murmur2Balancer{Consistent: true}}.Balance(*m, seq(n)...)
		k := tp{m.Topic, p}
		size := int64(len(m.Key)+len(m.Value)) + 64
		for _, h := range m.Headers {
			size += int64(len(h.Key) + len(h.Value))
		}
		if i > 0 && (bytes[k]+size > s.cfg.BatchBytes*9/10 || counts[k] >= batchMessages) {
			return i
		}
		bytes[k] += size
		counts[k]++
	}
	return len(kms)
}

var seqCache sync.Map

func seq(n int) []int {
	if v, ok := seqCache.Load(n); ok {
		return v.([]int)
	}
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	seqCache.Store(n, s)
	return s
}

func (s *Sink) writeRound(ctx context.Context, pending []kafkago.Message) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxInterval = s.cfg.MaxBackoff
	bo.MaxElapsedTime = 0
	failures := 0
	for {
		err := s.w.WriteMessages(ctx, pending...)
		if err == nil {
			if failures > 0 {
				s.setUnavailable(false)
				s.log.Info("kafka writes recovered", zap.Int("failed_attempts", failures))
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var tooLarge kafkago.MessageTooLargeError
		if errors.As(err, &tooLarge) {
			return fmt.Errorf("message for topic %s (key %q) exceeds kafka.batch_bytes", tooLarge.Message.Topic, tooLarge.Message.Key)
		}
		var werrs kafkago.WriteErrors
		if errors.As(err, &werrs) && len(werrs) == len(pending) {
			var failed []kafkago.Message
			for i, e := range werrs {
				if e == nil {
					continue
				}
				if errors.Is(e, kafkago.MessageSizeTooLarge) {
					return fmt.Errorf("kafka rejected a message for topic %s as too large (raise the topic's max.message.bytes): %w", pending[i].Topic, e)
				}
				failed = append(failed, pending[i])
			}
			pending = failed
			err = firstErr(werrs)
		}
		if len(pending) == 0 {
			return nil
		}
		failures++
		s.noteFailure(err)
		wait := bo.NextBackOff()
		if failures == 1 || failures%20 == 0 {
			s.log.Warn("kafka write failed; retrying", zap.Error(err), zap.Int("messages", len(pending)),
				zap.Int("attempt", failures), zap.Duration("backoff", wait))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

func firstErr(errs kafkago.WriteErrors) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func (s *Sink) noteFailure(err error) {
	s.stats.mu.Lock()
	s.stats.Retries++
	s.stats.LastError = err.Error()
	s.stats.LastErrorAt = time.Now()
	s.stats.Unavailable = true
	s.stats.mu.Unlock()
}

func (s *Sink) setUnavailable(v bool) {
	s.stats.mu.Lock()
	s.stats.Unavailable = v
	s.stats.mu.Unlock()
}

// Retries returns how many write attempts failed so far.
func (s *Sink) Retries() uint64 {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return s.stats.Retries
}

// Healthy reports whether the last write succeeded.
func (s *Sink) Healthy() bool {
	s.stats.mu.Lock()
	defer s.stats.mu.Unlock()
	return !s.stats.Unavailable
}

// Close waits for in-flight writes and closes connections.
func (s *Sink) Close(ctx context.Context) error {
	done := make(chan error, 1)
	go func() { done <- s.w.Close() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
