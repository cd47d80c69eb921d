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
// Writing: one Write is split into rounds in which every partition receives
// exactly one record batch (at most kafka.batch_bytes); a round is one
// produce request per partition leader, sent concurrently with acks=all
// through kafka-go's transport (raw produce: each batch is encoded once, in
// the standard record-batch format v2 with a CRC-32C, and resent as is on a
// retry). A partition's batch succeeds or fails as a
// whole; failed batches are retried with backoff before anything later is
// written, so per-key order holds across retries. Without an idempotent
// producer, a retry after a lost acknowledgement may write a batch twice
// (at-least-once); consumers dedupe by position.
package kafka

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	kafkago "github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/protocol"
	produceapi "github.com/segmentio/kafka-go/protocol/produce"
	"github.com/segmentio/kafka-go/protocol/rawproduce"
	"github.com/segmentio/kafka-go/sasl"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/kafkanet"
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
	// TopicBatchBytes overrides BatchBytes for some topics (whose
	// max.message.bytes is larger); SetTopicBatchBytes changes it later.
	TopicBatchBytes map[string]int64
	// WriteTimeout bounds one produce attempt. Default 10s.
	WriteTimeout time.Duration
	// MaxBackoff bounds the wait between retries of a failed write. Default 5s.
	MaxBackoff time.Duration
	// TLS, when set, encrypts every connection to the brokers.
	TLS *tls.Config
	// SASL, when set, authenticates every connection (kafka-go's plain or
	// scram mechanisms).
	SASL sasl.Mechanism
}

func (c *Config) net() kafkanet.Settings { return kafkanet.Settings{TLS: c.TLS, SASL: c.SASL} }

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
	cfg   Config
	log   *zap.Logger
	fence atomic.Pointer[func() error] // see SetFence
	codec kafkago.Compression
	addr  net.Addr

	mu        sync.Mutex
	transport *kafkago.Transport // replaced by refreshMetadata
	client    *kafkago.Client    // uses transport
	refreshes uint64
	parts     map[string]int // partition counts by topic
	leaders   map[tp]int     // leader broker by partition

	topicLimits atomic.Pointer[map[string]int64] // see SetTopicBatchBytes

	// Owned by Write (never called concurrently).
	enc   batchEncoder
	arena []byte // the encoded batches of the current round

	stats Stats
}

var _ pipeline.Sink = (*Sink)(nil)

// PartitionFor returns the partition of key among n partitions:
// (murmur2(key) & 0x7fffffff) % n, as Java clients compute it (and
// kafka-go's Murmur2Balancer; a nil key hashes like an empty one).
func PartitionFor(key []byte, n int) int {
	return int((murmur2(key) & 0x7fffffff) % uint32(n))
}

// murmur2 is Kafka's murmur2 (the Java client's Utils.murmur2), reading
// four bytes at a time (kafka-go's port reads a byte at a time); the
// partition tests hold it to a transcription of the Java code and to known
// vectors.
func murmur2(data []byte) uint32 {
	const (
		seed uint32 = 0x9747b28c
		m    uint32 = 0x5bd1e995
		r           = 24
	)
	h := seed ^ uint32(len(data))
	i := 0
	for ; i+4 <= len(data); i += 4 {
		k := binary.LittleEndian.Uint32(data[i:])
		k *= m
		k ^= k >> r
		k *= m
		h *= m
		h ^= k
	}
	switch len(data) - i {
	case 3:
		h ^= uint32(data[i+2]) << 16
		fallthrough
	case 2:
		h ^= uint32(data[i+1]) << 8
		fallthrough
	case 1:
		h ^= uint32(data[i])
		h *= m
	}
	h ^= h >> 13
	h *= m
	h ^= h >> 15
	return h
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
	addr := kafkago.TCP(cfg.Brokers...)
	sink := &Sink{cfg: cfg, log: log, codec: codec, addr: addr,
		parts: map[string]int{}, leaders: map[tp]int{}, enc: batchEncoder{codec: codec}}
	sink.transport, sink.client = sink.newTransport()
	for t, n := range cfg.TopicBatchBytes {
		sink.SetTopicBatchBytes(t, n)
	}
	return sink, nil
}

// newTransport builds a transport with its own metadata cache, and a
// client on it.
func (s *Sink) newTransport() (*kafkago.Transport, *kafkago.Client) {
	t := s.cfg.net().Transport(s.cfg.ClientID, 30*time.Second)
	return t, &kafkago.Client{Addr: s.addr, Timeout: 30 * time.Second, Transport: t}
}

// brokerList names the bootstrap brokers in errors.
func (s *Sink) brokerList() string { return strings.Join(s.cfg.Brokers, ",") }

// conn returns the current transport and client.
func (s *Sink) conn() (*kafkago.Transport, *kafkago.Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.transport, s.client
}

// MaxMessageBytes reads a topic's max.message.bytes (the largest record
// batch the brokers accept for it).
func (s *Sink) MaxMessageBytes(ctx context.Context, topic string) (int64, error) {
	_, client := s.conn()
	resp, err := client.DescribeConfigs(ctx, &kafkago.DescribeConfigsRequest{Resources: []kafkago.DescribeConfigRequestResource{{
		ResourceType: kafkago.ResourceTypeTopic, ResourceName: topic, ConfigNames: []string{"max.message.bytes"}}}})
	if err != nil {
		return 0, fmt.Errorf("describing topic %s: %w", topic, err)
	}
	for _, r := range resp.Resources {
		if r.Error != nil {
			return 0, fmt.Errorf("describing topic %s: %w", topic, r.Error)
		}
		for _, e := range r.ConfigEntries {
			if e.ConfigName == "max.message.bytes" {
				n, err := strconv.ParseInt(e.ConfigValue, 10, 64)
				if err != nil {
					return 0, fmt.Errorf("topic %s: max.message.bytes %q: %w", topic, e.ConfigValue, err)
				}
				return n, nil
			}
		}
	}
	return 0, fmt.Errorf("topic %s: the brokers did not report max.message.bytes", topic)
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
	_, client := s.conn()
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return fmt.Errorf("reading topic metadata from %v: %w", s.cfg.Brokers, kafkanet.Explain(err, s.brokerList(), s.cfg.net()))
	}
	existing := map[string]int{}
	for _, t := range meta.Topics {
		if t.Error != nil && kafkanet.IsAccess(t.Error) {
			return fmt.Errorf("topic %s: %w", t.Name, kafkanet.Explain(t.Error, s.brokerList(), s.cfg.net()))
		}
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
		resp, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: create})
		if err != nil {
			return fmt.Errorf("creating topics: %w", kafkanet.Explain(err, s.brokerList(), s.cfg.net()))
		}
		for name, e := range resp.Errors {
			if e != nil && !errors.Is(e, kafkago.TopicAlreadyExists) {
				return fmt.Errorf("creating topic %s: %w", name, kafkanet.Explain(e, s.brokerList(), s.cfg.net()))
			}
		}
		for _, tc := range create {
			existing[tc.Topic] = tc.NumPartitions
		}
		// Wait until the brokers report the new topics' partitions.
		deadline := time.Now().Add(15 * time.Second)
		for {
			meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
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
	if meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics}); err == nil {
		s.learn(meta)
	}
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
	recs, err := s.convert(msgs)
	if err != nil {
		return err
	}
	for _, round := range s.plan(recs) {
		if err := s.writeRound(ctx, round); err != nil {
			return err
		}
	}
	return nil
}

// record is one message bound for a partition.
type record struct {
	topic      string
	part       int
	size       int64
	key, value []byte
	headers    []pipeline.Header
	pos        pipeline.Position
}

// SetTopicBatchBytes sets the batch bound of topic (n <= 0 restores
// BatchBytes). Writes after it returns use the new bound.
func (s *Sink) SetTopicBatchBytes(topic string, n int64) {
	for {
		old := s.topicLimits.Load()
		m := map[string]int64{}
		if old != nil {
			for k, v := range *old {
				m[k] = v
			}
		}
		if n > 0 {
			m[topic] = n
		} else {
			delete(m, topic)
		}
		if s.topicLimits.CompareAndSwap(old, &m) {
			return
		}
	}
}

// batchLimit is the batch bound of topic under limits (a snapshot of
// topicLimits; nil for none).
func (s *Sink) batchLimit(limits *map[string]int64, topic string) int64 {
	if limits != nil {
		if n, ok := (*limits)[topic]; ok {
			return n
		}
	}
	return s.cfg.BatchBytes
}

func (s *Sink) convert(msgs []pipeline.Message) ([]record, error) {
	out := make([]record, 0, len(msgs))
	limits := s.topicLimits.Load()
	for i := range msgs {
		m := &msgs[i]
		size := int64(len(m.Key) + len(m.Value) + 64)
		for _, h := range m.Headers {
			size += int64(len(h.Key) + len(h.Value))
		}
		if limit := s.batchLimit(limits, m.Topic); size > limit {
			return nil, fmt.Errorf("message for topic %s at position %s is %d bytes, over the %d-byte batch limit (kafka.batch_bytes; also check the topic's max.message.bytes)",
				m.Topic, m.Pos, size, limit)
		}
		n := s.Partitions(m.Topic)
		if n == 0 {
			n = 1
		}
		r := record{topic: m.Topic, size: size, pos: m.Pos, key: m.Key, value: m.Value, headers: m.Headers}
		if m.Broadcast {
			for p := 0; p < n; p++ {
				c := r
				c.part = p
				out = append(out, c)
			}
			continue
		}
		r.part = PartitionFor(m.Key, n)
		out = append(out, r)
	}
	return out, nil
}

type tp struct {
	topic string
	part  int
}

// plan splits records into rounds. Each partition's records are cut, in
// order, into chunks of at most BatchBytes; chunk i goes into round i. So a
// round holds at most one record batch per partition, and a partition's
// later records are never written before its earlier ones. A busy partition
// (the transactions topic) does not hold back the others.
func (s *Sink) plan(recs []record) [][]partBatch {
	type state struct {
		round int
		bytes int64
		idx   int // index of the current batch in rounds[round]
	}
	parts := map[tp]*state{}
	var rounds [][]partBatch
	limits := s.topicLimits.Load()
	for i := range recs {
		r := &recs[i]
		k := tp{r.topic, r.part}
		st := parts[k]
		switch {
		case st == nil:
			st = &state{round: 0, idx: -1}
			parts[k] = st
		case st.bytes > 0 && st.bytes+r.size > s.batchLimit(limits, r.topic):
			st.round++
			st.bytes = 0
			st.idx = -1
		}
		for len(rounds) <= st.round {
			rounds = append(rounds, nil)
		}
		if st.idx < 0 {
			st.idx = len(rounds[st.round])
			rounds[st.round] = append(rounds[st.round], partBatch{tp: k, pos: r.pos})
		}
		b := &rounds[st.round][st.idx]
		b.recs = append(b.recs, r)
		st.bytes += r.size
	}
	return rounds
}

// writeRound produces one round: a produce request per partition leader,
// carrying one record batch per partition, sent concurrently. Partitions
// that fail are retried, in their original order, until they succeed.
// SetFence makes every produce attempt (the first and each retry) call
// fence first, and stop with its error, unretried, when it returns one: a
// capture leader whose lease ran out must not send another request.
func (s *Sink) SetFence(fence func() error) { s.fence.Store(&fence) }

func (s *Sink) fenced() error {
	if f := s.fence.Load(); f != nil {
		if err := (*f)(); err != nil {
			return &terminalError{err}
		}
	}
	return nil
}

func (s *Sink) writeRound(ctx context.Context, batches []partBatch) error {
	// Encode every batch of the round once; a retry resends a re-stamped
	// copy of the same records (below), never re-encodes them.
	// Offsets first, slices after: the arena may move while it grows.
	s.arena = s.arena[:0]
	now := time.Now().UnixMilli()
	ends := make([]int, len(batches))
	for i := range batches {
		// A record set on the wire is its int32 size, then the batch.
		start := len(s.arena)
		s.arena = append(s.arena, 0, 0, 0, 0)
		var err error
		if s.arena, err = s.enc.appendBatch(s.arena, batches[i].recs, now); err != nil {
			return &terminalError{err}
		}
		putInt32(s.arena[start:], int32(len(s.arena)-start-4))
		ends[i] = len(s.arena)
	}
	for i := range batches {
		start := 0
		if i > 0 {
			start = ends[i-1]
		}
		batches[i].encoded = s.arena[start:ends[i]:ends[i]]
	}
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 100 * time.Millisecond
	bo.MaxInterval = s.cfg.MaxBackoff
	bo.MaxElapsedTime = 0
	bo.Reset() // NewExponentialBackOff reset with the 500ms default: apply InitialInterval
	failures := 0
	pending := batches
	for {
		if err := s.fenced(); err != nil {
			return err
		}
		failed, err := s.produce(ctx, pending)
		if err == nil && len(failed) == 0 {
			if failures > 0 {
				s.setUnavailable(false)
				s.log.Info("kafka writes recovered", zap.Int("failed_attempts", failures))
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var terminal *terminalError
		if errors.As(err, &terminal) {
			return err
		}
		// A failed attempt's request may still be in kafka-go's hands
		// (e.g. after a timeout): never write to its bytes again. The next
		// round gets a fresh arena, and each batch retried here is a copy,
		// re-stamped with the current time (a broker may refuse a batch
		// whose timestamp is older than message.timestamp.before.max.ms).
		s.arena = nil
		pending = append([]partBatch(nil), failed...)
		stamp := time.Now().UnixMilli()
		for i := range pending {
			pending[i].encoded = restamp(append([]byte(nil), pending[i].encoded...), stamp)
		}
		failures++
		s.noteFailure(err)
		s.refreshMetadata(ctx)
		wait := bo.NextBackOff()
		if failures == 1 || failures%20 == 0 {
			s.log.Warn("kafka write failed; retrying", zap.Error(err), zap.Int("partitions", len(pending)),
				zap.Int("attempt", failures), zap.Duration("backoff", wait))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

type partBatch struct {
	tp      tp
	recs    []*record
	pos     pipeline.Position // of the first record, for errors
	encoded []byte            // the record batch, set by writeRound
}

type terminalError struct{ err error }

func (e *terminalError) Error() string { return e.err.Error() }
func (e *terminalError) Unwrap() error { return e.err }

// produce sends the batches, one request per leader, and returns the
// batches that failed with the first error.
func (s *Sink) produce(ctx context.Context, batches []partBatch) ([]partBatch, error) {
	byLeader := map[int][]int{}
	for i := range batches {
		l := s.leader(batches[i].tp)
		byLeader[l] = append(byLeader[l], i)
	}
	type result struct {
		idx []int
		ok  map[tp]bool
		err error
	}
	results := make(chan result, len(byLeader))
	transport, _ := s.conn()
	for _, idx := range byLeader {
		go func(idx []int) {
			req := &rawproduce.Request{Acks: -1, Timeout: int32(s.cfg.WriteTimeout / time.Millisecond)}
			topicIdx := map[string]int{}
			for _, i := range idx {
				b := &batches[i]
				ti, ok := topicIdx[b.tp.topic]
				if !ok {
					ti = len(req.Topics)
					topicIdx[b.tp.topic] = ti
					req.Topics = append(req.Topics, rawproduce.RequestTopic{Topic: b.tp.topic})
				}
				req.Topics[ti].Partitions = append(req.Topics[ti].Partitions, rawproduce.RequestPartition{
					Partition: int32(b.tp.part),
					// A fresh reader per attempt: the request consumes it.
					RecordSet: protocol.RawRecordSet{Reader: bytes.NewReader(b.encoded)},
				})
			}
			rctx, cancel := context.WithTimeout(ctx, s.cfg.WriteTimeout+5*time.Second)
			defer cancel()
			resp, err := transport.RoundTrip(rctx, s.addr, req)
			res := result{idx: idx, ok: map[tp]bool{}}
			if err != nil {
				if err = kafkanet.Explain(err, s.brokerList(), s.cfg.net()); kafkanet.IsAccess(err) {
					res.err = &terminalError{err}
				} else {
					res.err = fmt.Errorf("producing to kafka: %w", err)
				}
				results <- res
				return
			}
			pr, _ := resp.(*produceapi.Response)
			if pr == nil {
				res.err = fmt.Errorf("producing to kafka: unexpected response %T", resp)
				results <- res
				return
			}
			for _, t := range pr.Topics {
				for _, p := range t.Partitions {
					k := tp{t.Topic, int(p.Partition)}
					if p.ErrorCode == 0 {
						res.ok[k] = true
						continue
					}
					kerr := kafkago.Error(p.ErrorCode)
					if kafkanet.IsAccess(kerr) {
						res.err = &terminalError{fmt.Errorf("producing to %s partition %d: %w", k.topic, k.part, kafkanet.Explain(kerr, s.brokerList(), s.cfg.net()))}
					} else if errors.Is(kerr, kafkago.MessageSizeTooLarge) || errors.Is(kerr, kafkago.InvalidRecord) {
						res.err = &terminalError{fmt.Errorf("kafka rejected a batch for %s partition %d (from position %s): %w; raise the topic's max.message.bytes or lower kafka.batch_bytes",
							k.topic, k.part, posOf(batches, idx, k), kerr)}
					} else if res.err == nil {
						res.err = fmt.Errorf("producing to %s partition %d: %w", k.topic, k.part, kerr)
					}
				}
			}
			results <- res
		}(idx)
	}
	var failed []partBatch
	var firstErr error
	for range byLeader {
		res := <-results
		if res.err != nil {
			var t *terminalError
			if firstErr == nil || errors.As(res.err, &t) {
				firstErr = res.err
			}
		}
		for _, i := range res.idx {
			if !res.ok[batches[i].tp] {
				failed = append(failed, batches[i])
			}
		}
	}
	if len(failed) > 0 && firstErr == nil {
		firstErr = errors.New("producing to kafka: partitions missing from the response")
	}
	// Keep the original order of partitions (not significant for
	// correctness: partitions are independent).
	return failed, firstErr
}

func posOf(batches []partBatch, idx []int, k tp) pipeline.Position {
	for _, i := range idx {
		if batches[i].tp == k {
			return batches[i].pos
		}
	}
	return pipeline.Position{}
}

// leader returns the leader broker of a partition (0 when unknown: a
// request to any broker is then routed by kafka-go's transport).
func (s *Sink) leader(k tp) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leaders[k]
}

// refreshMetadata makes the next produce route by metadata read from the
// brokers now. kafka-go's transport routes produce requests by its own
// cache, refreshed on a random timer of up to MetadataTTL, and answers
// metadata requests from that cache: so after a failed write (a moved
// leader, a broker restarting, a connection lost) the sink replaces the
// transport, whose new pool reads the metadata afresh before its first
// request. Requests still in flight on the old one finish; its connections
// close once they have.
func (s *Sink) refreshMetadata(ctx context.Context) {
	t, c := s.newTransport()
	s.mu.Lock()
	old := s.transport
	s.transport, s.client = t, c
	s.refreshes++
	topics := make([]string, 0, len(s.parts))
	for t := range s.parts {
		topics = append(topics, t)
	}
	s.mu.Unlock()
	old.CloseIdleConnections()
	mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	meta, err := c.Metadata(mctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return // the next attempt fails or succeeds on its own; it is retried
	}
	s.learn(meta)
}

// MetadataRefreshes returns how many times the sink re-read the cluster's
// metadata after a failed write.
func (s *Sink) MetadataRefreshes() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refreshes
}

func (s *Sink) learn(meta *kafkago.MetadataResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range meta.Topics {
		if t.Error != nil || len(t.Partitions) == 0 {
			continue
		}
		s.parts[t.Name] = len(t.Partitions)
		for _, p := range t.Partitions {
			s.leaders[tp{t.Name, p.ID}] = p.Leader.ID
		}
	}
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

// Close closes idle connections. Writes are synchronous, so once the
// pipeline has stopped calling Write nothing is in flight.
func (s *Sink) Close(ctx context.Context) error {
	// Write is synchronous: nothing is in flight once it has returned.
	t, _ := s.conn()
	t.CloseIdleConnections()
	return nil
}

// DurabilityWarnings reads how the brokers keep topics (those that exist)
// and returns one warning per setting under which acks=all guarantees
// little: a replicated topic whose min.insync.replicas is 1 (the leader
// alone acknowledges), a topic with one replica on a cluster of several
// brokers (a broker loss loses its records), and a topic of onePartition
// (the transactions topic, whose records are ordered by commit only within
// one partition) with more than one partition. Each names the topic and
// the fix.
func (s *Sink) DurabilityWarnings(ctx context.Context, topics []string, onePartition map[string]bool) ([]string, error) {
	_, client := s.conn()
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return nil, fmt.Errorf("reading topic metadata: %w", err)
	}
	brokers := len(meta.Brokers)
	replicas := map[string]int{}
	var names []string
	var res []kafkago.DescribeConfigRequestResource
	var out []string
	for _, t := range meta.Topics {
		if t.Error != nil || len(t.Partitions) == 0 {
			continue
		}
		n := len(t.Partitions[0].Replicas)
		for _, p := range t.Partitions {
			n = min(n, len(p.Replicas))
		}
		replicas[t.Name] = n
		names = append(names, t.Name)
		res = append(res, kafkago.DescribeConfigRequestResource{ResourceType: kafkago.ResourceTypeTopic, ResourceName: t.Name,
			ConfigNames: []string{"min.insync.replicas"}})
		if onePartition[t.Name] && len(t.Partitions) > 1 {
			out = append(out, fmt.Sprintf("topic %s has %d partitions: the BEGIN/END records of transactions are in commit order only within one partition, "+
				"so readers may see them out of order; recreate it with 1 partition (delete it while Tidemark is stopped: Tidemark creates it with one)", t.Name, len(t.Partitions)))
		}
	}
	sort.Strings(names)
	minISR := map[string]int{}
	if len(res) > 0 {
		resp, err := client.DescribeConfigs(ctx, &kafkago.DescribeConfigsRequest{Resources: res})
		if err != nil {
			return out, fmt.Errorf("describing topics: %w", err)
		}
		for _, r := range resp.Resources {
			if r.Error != nil {
				continue
			}
			for _, e := range r.ConfigEntries {
				if e.ConfigName == "min.insync.replicas" {
					if n, err := strconv.Atoi(e.ConfigValue); err == nil {
						minISR[r.ResourceName] = n
					}
				}
			}
		}
	}
	for _, t := range names {
		rf := replicas[t]
		isr, known := minISR[t]
		switch {
		case rf == 1 && brokers > 1:
			out = append(out, fmt.Sprintf("topic %s has replication factor 1 on a cluster of %d brokers: losing one broker loses its records, whatever acks=all says; "+
				"add replicas (kafka-reassign-partitions) or recreate it with kafka.replication_factor 3", t, brokers))
		case rf > 1 && known && isr <= 1:
			out = append(out, fmt.Sprintf("topic %s has replication factor %d but min.insync.replicas=%d: acks=all is then satisfied by the leader alone, "+
				"and a leader lost before its followers copied a write loses it; set min.insync.replicas to %d (kafka-configs --alter --entity-type topics --entity-name %s --add-config min.insync.replicas=%d)",
				t, rf, isr, min(rf-1, 2), t, min(rf-1, 2)))
		}
	}
	return out, nil
}
