// Package kafkatest starts an in-process Kafka (franz-go's kfake, which
// speaks the real protocol) for tests and the demo, and reads topics back.
package kafkatest

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"sort"
	"syscall"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/tidemark/tidemark/internal/freeport"
)

// Cluster is a running kfake cluster.
type Cluster struct {
	c          *kfake.Cluster
	port       int
	ports      []int // every broker's, ports[0] == port
	dataDir    string
	partitions int // >0: allow auto-creation of topics with this many partitions
	opts       Options
}

// Options shape a cluster started with StartWith.
type Options struct {
	// Brokers is the number of brokers. Default 1.
	Brokers int
	// TLS, when set, makes every listener TLS-only with this server config.
	TLS *tls.Config
	// Superusers and Users enable SASL: each is mechanism (PLAIN,
	// SCRAM-SHA-256, SCRAM-SHA-512), name and password. Superusers pass
	// every ACL; Users are subject to ACLs (see ACLs).
	Superusers []User
	Users      []User
	// ACLs turns on ACL checks.
	ACLs bool
	// BrokerConfigs are broker-level configs (e.g. min.insync.replicas).
	BrokerConfigs map[string]string
}

// User is a SASL user of a test cluster, with its ACLs.
type User struct {
	Mechanism, Name, Password string
	ACLs                      []kfake.ACL
}

// startAttempts bounds how often a start is retried on fresh ports when
// another process took a port between freeport.Get and the bind (test
// packages run in parallel, each picking ports).
const startAttempts = 5

// StartWith starts a cluster shaped by o on free ports of 127.0.0.1.
func StartWith(o Options) (*Cluster, error) {
	n := max(o.Brokers, 1)
	for attempt := 1; ; attempt++ {
		cl := &Cluster{opts: o}
		for i := 0; i < n; i++ {
			port, err := freeport.Get()
			if err != nil {
				return nil, err
			}
			cl.ports = append(cl.ports, port)
		}
		cl.port = cl.ports[0]
		err := cl.start()
		if err == nil {
			return cl, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || attempt >= startAttempts {
			return nil, err
		}
	}
}

// ForTestWith is StartWith for t, stopped at cleanup.
func ForTestWith(t testing.TB, o Options) *Cluster {
	t.Helper()
	cl, err := StartWith(o)
	if err != nil {
		t.Fatalf("kafkatest: %v", err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// Fake is the running kfake cluster, for its control functions (moving
// partition leaders, ...). It changes on Restart.
func (cl *Cluster) Fake() *kfake.Cluster { return cl.c }

// Start starts a one-broker kfake cluster on a free port on 127.0.0.1. With a
// dataDir, records persist there and survive Restart.
func Start(dataDir string) (*Cluster, error) {
	for attempt := 1; ; attempt++ {
		port, err := freeport.Get()
		if err != nil {
			return nil, err
		}
		cl := &Cluster{port: port, dataDir: dataDir}
		err = cl.start()
		if err == nil {
			return cl, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || attempt >= startAttempts {
			return nil, err
		}
	}
}

// StartOn starts a cluster on a given port that also auto-creates topics
// with the given partition count (0: no auto-creation).
func StartOn(port int, dataDir string, partitions int) (*Cluster, error) {
	cl := &Cluster{port: port, dataDir: dataDir, partitions: partitions}
	if err := cl.start(); err != nil {
		return nil, err
	}
	return cl, nil
}

func (cl *Cluster) start() error {
	ports := cl.ports
	if len(ports) == 0 {
		ports = []int{cl.port}
	}
	bc := map[string]string{"log.cleaner.backoff.ms": "1000"}
	for k, v := range cl.opts.BrokerConfigs {
		bc[k] = v
	}
	opts := []kfake.Opt{kfake.NumBrokers(len(ports)), kfake.Ports(ports...), kfake.BrokerConfigs(bc)}
	if cl.opts.TLS != nil {
		opts = append(opts, kfake.TLS(cl.opts.TLS))
	}
	if len(cl.opts.Superusers)+len(cl.opts.Users) > 0 {
		opts = append(opts, kfake.EnableSASL())
		for _, u := range cl.opts.Superusers {
			opts = append(opts, kfake.Superuser(u.Mechanism, u.Name, u.Password))
		}
		for _, u := range cl.opts.Users {
			opts = append(opts, kfake.User(u.Mechanism, u.Name, u.Password, u.ACLs...))
		}
	}
	if cl.opts.ACLs {
		opts = append(opts, kfake.EnableACLs())
	}
	if cl.dataDir != "" {
		opts = append(opts, kfake.DataDir(cl.dataDir))
	}
	if cl.partitions > 0 {
		opts = append(opts, kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(cl.partitions))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		return fmt.Errorf("starting kfake: %w", err)
	}
	cl.c = c
	return nil
}

// Brokers returns the bootstrap addresses.
func (cl *Cluster) Brokers() []string {
	if len(cl.ports) == 0 {
		return []string{fmt.Sprintf("127.0.0.1:%d", cl.port)}
	}
	out := make([]string, len(cl.ports))
	for i, p := range cl.ports {
		out[i] = fmt.Sprintf("127.0.0.1:%d", p)
	}
	return out
}

// Stop shuts the broker down (clients see it as unreachable).
func (cl *Cluster) Stop() {
	if cl.c != nil {
		cl.c.Close()
		cl.c = nil
	}
}

// Restart starts the broker again on the same port (and data dir).
func (cl *Cluster) Restart() error {
	cl.Stop()
	var err error
	for i := 0; i < 50; i++ {
		if err = cl.start(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// DelayFetches makes the broker take at least d to answer each fetch (it
// stalls while doing so), like a broker behind a slow network or one
// building a large response.
func (cl *Cluster) DelayFetches(d time.Duration) {
	cl.c.ControlKey(int16(kmsg.Fetch), func(kmsg.Request) (kmsg.Response, error, bool) {
		time.Sleep(d)
		return nil, nil, false // not handled: the broker answers as usual, and the control stays
	})
}

// DelayProduces makes the broker wait at least d before it appends the
// records of each produce request (other connections are served
// meanwhile), like a broker whose replicas are slow to acknowledge.
func (cl *Cluster) DelayProduces(d time.Duration) {
	c := cl.c
	c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.SleepControl(func() { time.Sleep(d) })
		return nil, nil, false // not handled: the broker appends as usual, and the control stays
	})
}

// EndOffsets returns the end offset of every partition of topics, by topic
// and partition, in one ListOffsets request.
func EndOffsets(ctx context.Context, client *kafkago.Client, partitions map[string]int) (map[string][]int64, error) {
	req := &kafkago.ListOffsetsRequest{Topics: map[string][]kafkago.OffsetRequest{}}
	for topic, n := range partitions {
		for p := 0; p < n; p++ {
			req.Topics[topic] = append(req.Topics[topic], kafkago.LastOffsetOf(p))
		}
	}
	resp, err := client.ListOffsets(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("list offsets: %w", err)
	}
	out := map[string][]int64{}
	for topic, n := range partitions {
		ends := make([]int64, n)
		got := 0
		for _, po := range resp.Topics[topic] {
			if po.Error != nil {
				return nil, fmt.Errorf("list offsets %s/%d: %w", topic, po.Partition, po.Error)
			}
			if po.Partition >= 0 && po.Partition < n {
				ends[po.Partition] = po.LastOffset
				got++
			}
		}
		if got != n {
			return nil, fmt.Errorf("list offsets %s: %d of %d partitions answered", topic, got, n)
		}
		out[topic] = ends
	}
	return out, nil
}

// Close stops the cluster.
func (cl *Cluster) Close() { cl.Stop() }

// ForTest starts a cluster for t and stops it at cleanup.
func ForTest(t testing.TB) *Cluster {
	t.Helper()
	cl, err := Start("")
	if err != nil {
		t.Fatalf("kafkatest: %v", err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// Record is one message read back, with its partition and offset.
type Record struct {
	Topic     string
	Partition int
	Offset    int64
	Key       []byte
	Value     []byte
	Headers   map[string]string
}

// PartitionCount returns the number of partitions of topic.
func PartitionCount(ctx context.Context, brokers []string, topic string) (int, error) {
	return PartitionCountVia(ctx, nil, brokers, topic)
}

// PartitionCountVia is PartitionCount through transport (nil: kafka-go's
// default), for a cluster that needs TLS or SASL.
func PartitionCountVia(ctx context.Context, transport kafkago.RoundTripper, brokers []string, topic string) (int, error) {
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second, Transport: transport}
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: []string{topic}})
	if err != nil {
		return 0, fmt.Errorf("metadata for %s: %w", topic, err)
	}
	if len(meta.Topics) != 1 {
		return 0, fmt.Errorf("topic %s not found", topic)
	}
	if meta.Topics[0].Error != nil {
		return 0, fmt.Errorf("topic %s: %w", topic, meta.Topics[0].Error)
	}
	return len(meta.Topics[0].Partitions), nil
}

// ReadAll reads every record currently in topic, partition by partition, in
// offset order within each partition.
func ReadAll(ctx context.Context, brokers []string, topic string) ([]Record, error) {
	return ReadAllVia(ctx, nil, brokers, topic)
}

// ReadAllVia is ReadAll through transport (nil: kafka-go's default), for a
// cluster that needs TLS or SASL.
func ReadAllVia(ctx context.Context, transport kafkago.RoundTripper, brokers []string, topic string) ([]Record, error) {
	client := &kafkago.Client{Addr: kafkago.TCP(brokers...), Timeout: 10 * time.Second, Transport: transport}
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: []string{topic}})
	if err != nil {
		return nil, fmt.Errorf("metadata for %s: %w", topic, err)
	}
	if len(meta.Topics) != 1 || meta.Topics[0].Error != nil {
		if len(meta.Topics) == 1 {
			return nil, fmt.Errorf("topic %s: %w", topic, meta.Topics[0].Error)
		}
		return nil, fmt.Errorf("topic %s not found", topic)
	}
	var parts []int
	for _, p := range meta.Topics[0].Partitions {
		parts = append(parts, p.ID)
	}
	sort.Ints(parts)
	var out []Record
	for _, p := range parts {
		recs, err := readPartition(ctx, client, topic, p)
		if err != nil {
			return nil, err
		}
		out = append(out, recs...)
	}
	return out, nil
}

func readPartition(ctx context.Context, client *kafkago.Client, topic string, part int) ([]Record, error) {
	offs, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: map[string][]kafkago.OffsetRequest{
		topic: {kafkago.FirstOffsetOf(part), kafkago.LastOffsetOf(part)}}})
	if err != nil {
		return nil, fmt.Errorf("list offsets %s/%d: %w", topic, part, err)
	}
	var start, end int64
	for _, po := range offs.Topics[topic] {
		if po.Partition == part {
			if po.Error != nil {
				return nil, po.Error
			}
			// Compaction and retention move the first offset past 0.
			start, end = po.FirstOffset, po.LastOffset
		}
	}
	var out []Record
	offset := start
	for offset < end {
		resp, err := client.Fetch(ctx, &kafkago.FetchRequest{Topic: topic, Partition: part, Offset: offset, MaxBytes: 16 << 20, MaxWait: 100 * time.Millisecond})
		if err != nil {
			return nil, fmt.Errorf("fetch %s/%d@%d: %w", topic, part, offset, err)
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("fetch %s/%d@%d: %w", topic, part, offset, resp.Error)
		}
		n := 0
		for {
			r, err := resp.Records.ReadRecord()
			if errors.Is(err, io.EOF) {
				break // the end of this response's records
			}
			if err != nil {
				return nil, fmt.Errorf("reading %s/%d after offset %d: %w", topic, part, offset, err)
			}
			rec := Record{Topic: topic, Partition: part, Offset: r.Offset, Headers: map[string]string{}}
			if r.Key != nil {
				if rec.Key, err = readAllBytes(r.Key); err != nil {
					return nil, fmt.Errorf("reading the key of %s/%d@%d: %w", topic, part, r.Offset, err)
				}
			}
			if r.Value != nil {
				if rec.Value, err = readAllBytes(r.Value); err != nil {
					return nil, fmt.Errorf("reading the value of %s/%d@%d: %w", topic, part, r.Offset, err)
				}
			}
			for _, h := range r.Headers {
				rec.Headers[h.Key] = string(h.Value)
			}
			if r.Offset >= offset {
				out = append(out, rec)
				offset = r.Offset + 1
				n++
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("fetch %s/%d@%d returned no records before end offset %d", topic, part, offset, end)
		}
	}
	return out, nil
}

// GroupBehind returns how many records of topics (by topic, their partition
// counts) group has not committed: the sum over partitions of the end offset
// minus the committed offset (a partition without a commit counts from 0).
// 0 means the group has committed everything the topics held when asked.
func GroupBehind(ctx context.Context, client *kafkago.Client, group string, partitions map[string]int) (int64, error) {
	ends, err := EndOffsets(ctx, client, partitions)
	if err != nil {
		return 0, err
	}
	req := &kafkago.OffsetFetchRequest{GroupID: group, Topics: map[string][]int{}}
	for topic, n := range partitions {
		for p := 0; p < n; p++ {
			req.Topics[topic] = append(req.Topics[topic], p)
		}
	}
	resp, err := client.OffsetFetch(ctx, req)
	if err != nil {
		return 0, fmt.Errorf("offset fetch for group %s: %w", group, err)
	}
	if resp.Error != nil {
		return 0, fmt.Errorf("offset fetch for group %s: %w", group, resp.Error)
	}
	var behind int64
	for topic, n := range partitions {
		committed := make([]int64, n)
		for _, po := range resp.Topics[topic] {
			if po.Error != nil {
				return 0, fmt.Errorf("offset fetch for group %s, %s/%d: %w", group, topic, po.Partition, po.Error)
			}
			if po.Partition >= 0 && po.Partition < n && po.CommittedOffset > 0 {
				committed[po.Partition] = po.CommittedOffset
			}
		}
		for p, end := range ends[topic] {
			behind += max(end-committed[p], 0)
		}
	}
	return behind, nil
}
