package app

import (
	"context"
	"strings"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
)

// TestReadPublished: what the prefix's topics hold decides whether a
// missing slot is a first start or a gap, and names the last published
// transaction: from the transactions topic when it has records (a BEGIN
// last means that transaction may be incomplete), else from the newest
// tidemark-lsn header of the other topics' partitions.
func TestReadPublished(t *testing.T) {
	kc := kafkatest.ForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := &kafkago.Client{Addr: kafkago.TCP(kc.Brokers()...), Timeout: 10 * time.Second}
	create := func(topic string, parts int) {
		t.Helper()
		resp, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{{Topic: topic, NumPartitions: parts, ReplicationFactor: 1}}})
		if err != nil || resp.Errors[topic] != nil {
			t.Fatalf("creating %s: %v %v", topic, err, resp)
		}
	}
	produce := func(topic string, part int, recs ...kafkago.Record) {
		t.Helper()
		resp, err := client.Produce(ctx, &kafkago.ProduceRequest{Topic: topic, Partition: part, RequiredAcks: kafkago.RequireAll,
			Records: kafkago.NewRecordReader(recs...)})
		if err != nil || resp.Error != nil {
			t.Fatalf("producing to %s/%d: %v %v", topic, part, err, resp)
		}
	}
	value := func(s string) kafkago.Record { return kafkago.Record{Value: kafkago.NewBytes([]byte(s))} }
	change := func(lsn string) kafkago.Record {
		return kafkago.Record{Key: kafkago.NewBytes([]byte(`{"id":1}`)), Value: kafkago.NewBytes([]byte(`{}`)),
			Headers: []kafkago.Header{{Key: "tidemark-lsn", Value: []byte(lsn)}, {Key: "tidemark-seq", Value: []byte("0")}}}
	}
	read := func(topics []string, txnTopic string) Published {
		t.Helper()
		p, err := readPublished(ctx, client, topics, txnTopic)
		if err != nil {
			t.Fatalf("readPublished(%v, %q): %v", topics, txnTopic, err)
		}
		return p
	}

	if p := read([]string{"a.public.t", "a.transactions"}, "a.transactions"); p != (Published{}) {
		t.Errorf("no topics: %+v, want nothing published", p)
	}
	create("a.public.t", 3)
	create("a.transactions", 1)
	if p := read([]string{"a.public.t", "a.transactions"}, "a.transactions"); p != (Published{}) {
		t.Errorf("empty topics: %+v, want nothing published", p)
	}

	produce("a.public.t", 1, change("1000"))
	produce("a.transactions", 0,
		value(`{"status":"BEGIN","id":"7:1000","txId":7,"lsn":1000}`),
		value(`{"status":"END","id":"7:1000","txId":7,"lsn":1000,"end_lsn":1010,"event_count":1,"data_collections":[{"data_collection":"public.t","event_count":1}]}`))
	want := Published{Any: true, CommitLSN: 1000, EndLSN: 1010, Topic: "a.transactions"}
	if p := read([]string{"a.public.t", "a.transactions"}, "a.transactions"); p != want {
		t.Errorf("after an END: %+v, want %+v", p, want)
	}
	produce("a.transactions", 0, value(`{"status":"BEGIN","id":"8:2000","txId":8,"lsn":2000}`))
	want = Published{Any: true, CommitLSN: 2000, Incomplete: true, Topic: "a.transactions"}
	if p := read([]string{"a.public.t", "a.transactions"}, "a.transactions"); p != want {
		t.Errorf("after a BEGIN: %+v, want %+v", p, want)
	}

	// Without a transactions topic: the newest header over the partitions.
	produce("a.public.t", 0, change("1500"), change("3000"))
	produce("a.public.t", 2, change("2500"))
	want = Published{Any: true, CommitLSN: 3000, Topic: "a.public.t"}
	if p := read([]string{"a.public.t"}, ""); p != want {
		t.Errorf("table topic only: %+v, want %+v", p, want)
	}
	// Records that carry no position: published, position unknown.
	create("b.public.t", 1)
	produce("b.public.t", 0, value(`not ours`))
	if p := read([]string{"b.public.t", "b.transactions"}, "b.transactions"); p != (Published{Any: true}) {
		t.Errorf("records without positions: %+v, want published at an unknown position", p)
	}
}

// TestSlotGapErrorText: the refusal names the slot, the prefix, the last
// published position and the way on, in each case.
func TestSlotGapErrorText(t *testing.T) {
	for _, tc := range []struct {
		name string
		last Published
		want []string
	}{
		{"complete", Published{Any: true, CommitLSN: pipeline.LSN(0x1_0000_0010), Topic: "p.transactions"},
			[]string{"the last published transaction committed at LSN 1/10 (p.transactions)", "the changes committed after 1/10 until now would never be captured"}},
		{"incomplete", Published{Any: true, CommitLSN: 0x20, Incomplete: true, Topic: "p.transactions"},
			[]string{"committed at LSN 0/20 (p.transactions, a BEGIN record: its END, and maybe some of its changes, were not published)", "committed at or after 0/20 until now"}},
		{"unknown", Published{Any: true},
			[]string{"(the position of its last record could not be read)", "committed after the last published transaction until now"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := (&SlotGapError{Slot: "s", Prefix: "p", Last: tc.last}).Error()
			for _, w := range append(tc.want, `replication slot "s" does not exist, but topic prefix "p" has published before`, "`tidemark run --accept-gap`") {
				if !strings.Contains(msg, w) {
					t.Errorf("message lacks %q:\n%s", w, msg)
				}
			}
		})
	}
}
