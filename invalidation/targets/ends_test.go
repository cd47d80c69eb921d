package targets

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/kafkatest"
)

// TestTxnIndexMalformedRecords: a record of the transactions topic that is
// not a valid BEGIN or END record changes nothing in the index (before, an
// END without its tables started the index, one with a negative or
// duplicated count was kept and could mark an incomplete transaction
// complete); it is counted and logged with its offset and the reason, the
// first and then every 100th, never dropped silently.
func TestTxnIndexMalformedRecords(t *testing.T) {
	malformed := []struct {
		name, value, wantErr string
	}{
		{"not JSON", `not json`, "not valid JSON"},
		{"unknown status", `{"status":"COMMIT","lsn":10,"data_collections":[]}`, `unknown status "COMMIT"`},
		{"END without lsn", `{"status":"END","data_collections":[{"data_collection":"public.users","event_count":1}]}`, "lacks its position"},
		{"END without its tables", `{"status":"END","lsn":10}`, "lacks data_collections"},
		{"negative count", `{"status":"END","lsn":10,"data_collections":[{"data_collection":"public.users","event_count":-1}]}`, "event_count -1"},
		{"table twice", `{"status":"END","lsn":10,"data_collections":[{"data_collection":"public.users","event_count":2},{"data_collection":"public.users","event_count":1}]}`,
			`"public.users" twice`},
		{"lsn as a string", `{"status":"END","lsn":"10","data_collections":[]}`, "field lsn: got string"},
	}
	for _, tc := range malformed {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.WarnLevel)
			x := &TxnIndex{Tables: []string{"public.room_memberships", "public.users"}}
			x.read(zap.New(core), &kafkago.Message{Topic: "tm.transactions", Offset: 41, Value: []byte(tc.value)})
			if _, ok := x.Lookup(10); ok || x.Started() || x.Malformed() != 1 {
				t.Errorf("after %s: Lookup(10) ok %v, Started %v, Malformed %d; want false, false, 1", tc.value, ok, x.Started(), x.Malformed())
			}
			entries := logs.All()
			if len(entries) != 1 {
				t.Fatalf("logged %d entries, want one warning", len(entries))
			}
			f := entries[0].ContextMap()
			if f["offset"] != int64(41) || f["topic"] != "tm.transactions" || !strings.Contains(f["error"].(string), tc.wantErr) {
				t.Errorf("warning %q %v, want offset 41 and an error containing %q", entries[0].Message, f, tc.wantErr)
			}
		})
	}

	// Valid records count nothing and log nothing; repeated malformed ones
	// warn at the first and the 100th.
	core, logs := observer.New(zapcore.WarnLevel)
	log := zap.New(core)
	x := &TxnIndex{Tables: []string{"public.users"}}
	for _, v := range []string{
		`{"status":"BEGIN","id":"7:10","txId":7,"lsn":10,"ts_ms":1,"event_count":null,"data_collections":null}`,
		`{"status":"END","id":"7:10","txId":7,"lsn":10,"ts_ms":1,"end_lsn":11,"event_count":3,"data_collections":[{"data_collection":"public.users","event_count":1},{"data_collection":"public.events","event_count":2}]}`,
	} {
		x.read(log, &kafkago.Message{Value: []byte(v)})
	}
	if c, ok := x.Lookup(10); !ok || c["public.users"] != 1 || x.Malformed() != 0 || logs.Len() != 0 {
		t.Fatalf("valid records: Lookup(10) = %v, %v; Malformed %d; %d log entries", c, ok, x.Malformed(), logs.Len())
	}
	for i := 0; i < 150; i++ {
		x.read(log, &kafkago.Message{Value: []byte(`{"status":"END","lsn":12}`)})
	}
	if x.Malformed() != 150 || logs.Len() != 2 {
		t.Errorf("150 malformed records: Malformed %d, %d warnings; want 150, 2", x.Malformed(), logs.Len())
	}
	if _, ok := x.Lookup(12); ok {
		t.Error("a malformed END was indexed")
	}
}

// TestTxnIndexStartOffset: the index starts at a concrete offset, never at
// kafka-go's "last offset" sentinel (resolved only at the first fetch, so
// every END record published between start and first fetch was skipped and
// a fresh deployment's first transactions waited out the hold: the e2e
// TestTargetsSequences/zulip flake). On an empty topic that is 0; when every
// record is older than the lookback, the end offset as it is now; otherwise
// the first record inside the lookback.
func TestTxnIndexStartOffset(t *testing.T) {
	cluster := kafkatest.ForTest(t)
	const topic = "tm.transactions"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	client := &kafkago.Client{Addr: kafkago.TCP(cluster.Brokers()...), Timeout: 10 * time.Second}
	resp, err := client.CreateTopics(ctx, &kafkago.CreateTopicsRequest{Topics: []kafkago.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}}})
	if err != nil || resp.Errors[topic] != nil {
		t.Fatalf("creating %s: %v %v", topic, err, resp.Errors[topic])
	}
	x := &TxnIndex{Brokers: cluster.Brokers(), Topic: topic, Tables: []string{"public.users"}}
	if off, err := x.startOffset(ctx, time.Now().Add(-time.Minute)); err != nil || off != 0 {
		t.Fatalf("empty topic: start offset %d, %v; want 0", off, err)
	}
	w := &kafkago.Writer{Addr: kafkago.TCP(cluster.Brokers()...), Topic: topic, RequiredAcks: kafkago.RequireAll, BatchTimeout: time.Millisecond}
	defer w.Close()
	end := func(lsn int) string {
		return fmt.Sprintf(`{"status":"END","id":"7:%d","txId":7,"lsn":%d,"ts_ms":1,"end_lsn":%d,"event_count":1,"data_collections":[{"data_collection":"public.users","event_count":1}]}`, lsn, lsn, lsn+1)
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := w.WriteMessages(ctx, kafkago.Message{Value: []byte(end(10)), Time: old}, kafkago.Message{Value: []byte(end(12)), Time: old}); err != nil {
		t.Fatal(err)
	}
	if off, err := x.startOffset(ctx, time.Now().Add(-time.Minute)); err != nil || off != 2 {
		t.Fatalf("records all older than the lookback: start offset %d, %v; want the end offset 2", off, err)
	}
	if off, err := x.startOffset(ctx, old.Add(-time.Minute)); err != nil || off != 0 {
		t.Fatalf("records inside the lookback: start offset %d, %v; want 0", off, err)
	}

	// Run on that topic, then an END at once: it is indexed, the old ones are not.
	// The END is written once Run has set its start (written before, it
	// is older than nothing but may precede the start the test means).
	started := make(chan int64, 1)
	x.onStart = func(off int64) { started <- off }
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- x.Run(rctx) }()
	select {
	case off := <-started:
		if off != 2 {
			t.Fatalf("Run started at offset %d, want the end offset 2", off)
		}
	case <-ctx.Done():
		t.Fatal("Run did not start")
	}
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if err := w.WriteMessages(ctx, kafkago.Message{Value: []byte(end(20)), Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for {
		if _, ok := x.Lookup(20); ok {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the END record written after Run started was never indexed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := x.Lookup(10); ok {
		t.Error("an END record older than the lookback was indexed")
	}
}
