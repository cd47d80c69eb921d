package integrity

import (
	"context"
	"strings"
	"testing"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

// TestDecodeTransactionRecords: Decode gives BEGIN and END records their
// positions and refuses a malformed record with an error naming what is
// wrong, which the consumer runtime dead-letters as the reason.
func TestDecodeTransactionRecords(t *testing.T) {
	const (
		begin = `{"status":"BEGIN","id":"7:10","txId":7,"lsn":10,"ts_ms":10000,"event_count":null,"data_collections":null}`
		end   = `{"status":"END","id":"7:10","txId":7,"lsn":10,"ts_ms":10000,"end_lsn":11,"event_count":2,"data_collections":[{"data_collection":"public.events","event_count":2}]}`
	)
	cases := []struct {
		name    string
		value   string
		wantPos pipeline.Position
		wantErr string
	}{
		{name: "BEGIN", value: begin, wantPos: pipeline.Position{CommitLSN: 10}},
		{name: "END", value: end, wantPos: pipeline.Position{CommitLSN: 10, Seq: 1}},
		{name: "not JSON", value: `{"status":"END"`, wantErr: "transaction record is not valid JSON"},
		{name: "unknown status", value: strings.Replace(end, `"END"`, `"COMMIT"`, 1), wantErr: `unknown status "COMMIT"`},
		{name: "no lsn", value: strings.Replace(end, `"lsn":10,`, ``, 1), wantErr: "END record lacks its position"},
		{name: "negative lsn", value: strings.Replace(end, `"lsn":10,`, `"lsn":-10,`, 1), wantErr: "field lsn: got number -10"},
		{name: "id of another commit", value: strings.Replace(end, `"id":"7:10"`, `"id":"7:12"`, 1), wantErr: `id "7:12" names commit LSN 12`},
		{name: "END without its tables", value: strings.Replace(end, `,"data_collections":[{"data_collection":"public.events","event_count":2}]`, ``, 1),
			wantErr: "END record at lsn 10 lacks data_collections"},
		{name: "END with a negative count", value: strings.Replace(end, `"event_count":2}]`, `"event_count":-2}]`, 1), wantErr: "has event_count -2"},
		{name: "END whose total disagrees", value: strings.Replace(end, `"event_count":2,`, `"event_count":5,`, 1), wantErr: "event_count 5, but data_collections count 2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Decode(&kafkago.Message{Topic: "t.transactions", Partition: 0, Offset: 4, Value: []byte(tc.value)})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || m != nil {
					t.Fatalf("Decode = %+v, %v; want an error containing %q", m, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.Table != TransactionsTable || m.Pos != tc.wantPos || m.Offset != 4 || string(m.Value) != tc.value {
				t.Errorf("Decode = %+v, want table %s at %s", m, TransactionsTable, tc.wantPos)
			}
		})
	}
}

// TestMalformedEndRecordDecidesNothing: an END record without its tables
// used to decide its transaction as if it had touched none of them (a
// false events_have_json/missing here). Now Decode refuses it, and Handle,
// given it anyway, fails without changing the checker or recording its
// position, so the valid END record at that position still decides.
func TestMalformedEndRecordDecidesNothing(t *testing.T) {
	c := newTestChecker(t)
	feed(t, c, change("events", "c", 10, 0, key("$a"), nil, ev("$a")))
	bad := []byte(`{"status":"END","id":"10:10","txId":10,"lsn":10,"ts_ms":10000,"end_lsn":11,"event_count":2}`)
	if m, err := Decode(&kafkago.Message{Topic: "t.transactions", Value: bad}); err == nil {
		t.Fatalf("Decode accepted %s as %+v", bad, m)
	}
	m := &invalidation.Message{Topic: "t.transactions", Value: bad, Table: TransactionsTable, Pos: pipeline.Position{CommitLSN: 10, Seq: 1}}
	if err := c.Handle(context.Background(), m); err == nil || !strings.Contains(err.Error(), "lacks data_collections") {
		t.Fatalf("Handle(malformed END) = %v, want an error naming data_collections", err)
	}
	if p := c.Progress(); len(c.violations) != 0 || p.OpenTransactions != 1 {
		t.Fatalf("after a malformed END: violations %v, %d open transactions; want none, 1", kinds(c), p.OpenTransactions)
	}
	feed(t, c, change("event_json", "c", 10, 1, key("$a"), nil, js("$a")),
		end(t, 10, map[string]int{"public.events": 1, "public.event_json": 1}))
	if p := c.Progress(); len(c.violations) != 0 || p.OpenTransactions != 0 {
		t.Errorf("after the valid END: violations %v, %d open transactions; want none, 0", kinds(c), p.OpenTransactions)
	}
}
