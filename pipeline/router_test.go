package pipeline_test

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

var roomsStream = pipeline.EntityStream{
	Name: "rooms", Key: "room_id",
	Tables: []string{"public.events", "public.room_memberships"},
}

// wantMsg describes one expected change message. key "<nil>" means no key.
type wantMsg struct {
	topic     string
	key       string
	op        string
	seq       uint32
	broadcast bool
	before    string // JSON of the envelope's before; "" = not checked
	after     string
}

func (w wantMsg) String() string {
	return fmt.Sprintf("%s key=%s op=%s seq=%d broadcast=%v", w.topic, w.key, w.op, w.seq, w.broadcast)
}

func describe(m pipeline.Message) wantMsg {
	key := "<nil>"
	if m.Key != nil {
		key = string(m.Key)
	}
	op, _ := header(m, "tidemark-op")
	return wantMsg{topic: m.Topic, key: key, op: op, seq: m.Pos.Seq, broadcast: m.Broadcast}
}

func sortMsgs(ws []wantMsg) {
	sort.SliceStable(ws, func(i, j int) bool {
		if ws[i].seq != ws[j].seq {
			return ws[i].seq < ws[j].seq
		}
		return ws[i].topic < ws[j].topic
	})
}

func envelopeField(t *testing.T, m pipeline.Message, field string) string {
	t.Helper()
	var env map[string]json.RawMessage
	if err := json.Unmarshal(m.Value, &env); err != nil {
		t.Fatalf("envelope %s: %v", m.Value, err)
	}
	return string(env[field])
}

func TestRouterTopicsAndKeys(t *testing.T) {
	cases := []struct {
		name        string
		streams     []pipeline.EntityStream
		tableTopics bool
		changes     []pipeline.Change
		want        []wantMsg
	}{
		{
			name:        "default table topic, key from the primary key",
			tableTopics: true,
			changes:     []pipeline.Change{insertEvent("$1", "!a")},
			want:        []wantMsg{{topic: "tm.public.events", key: `{"event_id":"$1"}`, op: "c", seq: 0}},
		},
		{
			name:        "composite replica identity in column order",
			tableTopics: true,
			changes:     []pipeline.Change{{Op: pipeline.OpCreate, Rel: relMembers, After: row("join", "@u:x", "!a")}},
			want:        []wantMsg{{topic: "tm.public.room_memberships", key: `{"user_id":"@u:x","room_id":"!a"}`, op: "c"}},
		},
		{
			name:        "delete keyed by the old key image",
			tableTopics: true,
			changes:     []pipeline.Change{{Op: pipeline.OpDelete, Rel: relEvents, Before: keyRow(relEvents, "$1", nil, nil)}},
			want: []wantMsg{{topic: "tm.public.events", key: `{"event_id":"$1"}`, op: "d",
				before: `{"event_id":"$1"}`, after: `null`}},
		},
		{
			name:        "update keeping its key stays one update",
			tableTopics: true,
			changes: []pipeline.Change{{Op: pipeline.OpUpdate, Rel: relEvents,
				Before: keyRow(relEvents, "$1", nil, nil), After: row("$1", "!a", "new")}},
			want: []wantMsg{{topic: "tm.public.events", key: `{"event_id":"$1"}`, op: "u"}},
		},
		{
			name:        "update without old image stays one update",
			tableTopics: true,
			changes:     []pipeline.Change{{Op: pipeline.OpUpdate, Rel: relEvents, After: row("$1", "!a", "new")}},
			want:        []wantMsg{{topic: "tm.public.events", key: `{"event_id":"$1"}`, op: "u", before: `null`}},
		},
		{
			name:        "update changing the primary key: delete old key, create new key",
			tableTopics: true,
			changes: []pipeline.Change{
				insertEvent("$0", "!a"),
				{Op: pipeline.OpUpdate, Rel: relEvents, Before: keyRow(relEvents, "$1", nil, nil), After: row("$2", "!a", "x")},
			},
			want: []wantMsg{
				{topic: "tm.public.events", key: `{"event_id":"$0"}`, op: "c", seq: 0},
				{topic: "tm.public.events", key: `{"event_id":"$1"}`, op: "d", seq: 1, before: `{"event_id":"$1"}`, after: `null`},
				{topic: "tm.public.events", key: `{"event_id":"$2"}`, op: "c", seq: 2, before: `null`,
					after: `{"event_id":"$2","room_id":"!a","content":"x"}`},
			},
		},
		{
			name:        "entity stream and table topic",
			streams:     []pipeline.EntityStream{roomsStream},
			tableTopics: true,
			changes:     []pipeline.Change{insertEvent("$1", "!a")},
			want: []wantMsg{
				{topic: "tm.public.events", key: `{"event_id":"$1"}`, op: "c"},
				{topic: "tm.rooms", key: `{"room_id":"!a"}`, op: "c"},
			},
		},
		{
			name:        "entity stream only",
			streams:     []pipeline.EntityStream{roomsStream},
			tableTopics: false,
			changes: []pipeline.Change{
				insertEvent("$1", "!a"),
				{Op: pipeline.OpCreate, Rel: relMembers, After: row("join", "@u:x", "!a")},
				{Op: pipeline.OpCreate, Rel: relUsers, After: row("@u:x", false)}, // not in a stream
			},
			want: []wantMsg{
				{topic: "tm.rooms", key: `{"room_id":"!a"}`, op: "c", seq: 0},
				{topic: "tm.rooms", key: `{"room_id":"!a"}`, op: "c", seq: 1},
				{topic: "tm.public.users", key: `{"name":"@u:x"}`, op: "c", seq: 2},
			},
		},
		{
			name:        "entity stream delete with a full old image",
			streams:     []pipeline.EntityStream{roomsStream},
			tableTopics: false,
			changes:     []pipeline.Change{{Op: pipeline.OpDelete, Rel: relMembers, Before: row("leave", "@u:x", "!a")}},
			want:        []wantMsg{{topic: "tm.rooms", key: `{"room_id":"!a"}`, op: "d"}},
		},
		{
			name:        "update moving a row to another entity: delete in the old, create in the new",
			streams:     []pipeline.EntityStream{roomsStream},
			tableTopics: true,
			changes: []pipeline.Change{{Op: pipeline.OpUpdate, Rel: relMembers,
				Before: row("join", "@u:x", "!a"), After: row("join", "@u:x", "!b")}},
			want: []wantMsg{
				{topic: "tm.public.room_memberships", key: `{"user_id":"@u:x","room_id":"!a"}`, op: "d", seq: 0},
				{topic: "tm.rooms", key: `{"room_id":"!a"}`, op: "d", seq: 0},
				{topic: "tm.public.room_memberships", key: `{"user_id":"@u:x","room_id":"!b"}`, op: "c", seq: 1},
				{topic: "tm.rooms", key: `{"room_id":"!b"}`, op: "c", seq: 1},
			},
		},
		{
			name:        "truncate is broadcast without a key",
			streams:     []pipeline.EntityStream{roomsStream},
			tableTopics: true,
			changes:     []pipeline.Change{{Op: pipeline.OpTruncate, Rel: relEvents}},
			want: []wantMsg{
				{topic: "tm.public.events", key: "<nil>", op: "t", broadcast: true, before: `null`, after: `null`},
				{topic: "tm.rooms", key: "<nil>", op: "t", broadcast: true},
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := pipeline.Config{Router: pipeline.RouterConfig{EntityStreams: tc.streams, TableTopics: tc.tableTopics}}
			msgs, _, err := runAll(t, cfg, buildEvents(txnN(1, tc.changes...)))
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			checkOrder(t, msgs)
			var got []wantMsg
			for _, m := range msgs {
				got = append(got, describe(m))
			}
			want := slices.Clone(tc.want)
			sortMsgs(got)
			sortMsgs(want)
			var gs, ws []string
			for i := range got {
				gs = append(gs, got[i].String())
			}
			for i := range want {
				ws = append(ws, want[i].String())
			}
			if strings.Join(gs, "\n") != strings.Join(ws, "\n") {
				t.Fatalf("messages:\n%s\nwant:\n%s", strings.Join(gs, "\n"), strings.Join(ws, "\n"))
			}
			// Find each expected message again to check its envelope.
			for _, w := range tc.want {
				for _, m := range msgs {
					d := describe(m)
					if d.topic != w.topic || d.key != w.key || d.seq != w.seq {
						continue
					}
					var env struct {
						Source struct{ Schema, Table string }
					}
					if err := json.Unmarshal(m.Value, &env); err != nil {
						t.Fatal(err)
					}
					if h, _ := header(m, "tidemark-table"); h != env.Source.Schema+"."+env.Source.Table {
						t.Errorf("%s: tidemark-table header %q, envelope source %s.%s", w, h, env.Source.Schema, env.Source.Table)
					}
					if op := strings.Trim(envelopeField(t, m, "op"), `"`); op != w.op {
						t.Errorf("%s: envelope op %q, header op %q", w, op, w.op)
					}
					if w.before != "" && envelopeField(t, m, "before") != w.before {
						t.Errorf("%s: before = %s, want %s", w, envelopeField(t, m, "before"), w.before)
					}
					if w.after != "" && envelopeField(t, m, "after") != w.after {
						t.Errorf("%s: after = %s, want %s", w, envelopeField(t, m, "after"), w.after)
					}
				}
			}
		})
	}
}

// TestRouterCopiesShareTheChange: the copies of one change to a table topic
// and a stream topic carry the same position, value and headers.
func TestRouterCopiesShareTheChange(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{EntityStreams: []pipeline.EntityStream{roomsStream}, TableTopics: true}}
	msgs, _, err := runAll(t, cfg, buildEvents(txnN(1, insertEvent("$1", "!a"))))
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 {
		t.Fatalf("got %d messages, want 2", len(msgs))
	}
	a, b := msgs[0], msgs[1]
	if a.Pos != b.Pos || string(a.Value) != string(b.Value) || fmt.Sprint(a.Headers) != fmt.Sprint(b.Headers) {
		t.Errorf("copies differ:\n%+v\n%+v", a, b)
	}
	for _, h := range []struct{ key, want string }{
		{"tidemark-table", "public.events"}, {"tidemark-op", "c"}, {"tidemark-lsn", "1000"}, {"tidemark-seq", "0"},
	} {
		if got, ok := header(a, h.key); !ok || got != h.want {
			t.Errorf("header %s = %q, want %q", h.key, got, h.want)
		}
	}
}

type txnRecord struct {
	Status          string `json:"status"`
	ID              string `json:"id"`
	TxID            uint32 `json:"txId"`
	LSN             uint64 `json:"lsn"`
	EndLSN          uint64 `json:"end_lsn"`
	TsMs            int64  `json:"ts_ms"`
	EventCount      *int   `json:"event_count"`
	DataCollections []struct {
		DataCollection string `json:"data_collection"`
		EventCount     int    `json:"event_count"`
	} `json:"data_collections"`
}

func TestRouterTransactionRecords(t *testing.T) {
	ts := txnN(7,
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, Before: keyRow(relEvents, "$1", nil, nil), After: row("$2", "!a", "x")}, // split: 2
		pipeline.Change{Op: pipeline.OpCreate, Rel: relUsers, After: row("@u", false)},
		insertEvent("$3", "!a"),
	)
	cfg := pipeline.Config{Router: pipeline.RouterConfig{TableTopics: true, TransactionsTopic: true}}
	msgs, _, err := runAll(t, cfg, buildEvents(ts))
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 6 {
		t.Fatalf("got %d messages, want BEGIN + 4 changes + END", len(msgs))
	}
	begin, end := msgs[0], msgs[len(msgs)-1]
	wantKey := `{"id":"507:7000"}`
	for _, c := range []struct {
		m      pipeline.Message
		status string
	}{{begin, "BEGIN"}, {end, "END"}} {
		if c.m.Topic != "tm.transaction" {
			t.Errorf("%s topic %q, want tm.transaction", c.status, c.m.Topic)
		}
		if string(c.m.Key) != wantKey {
			t.Errorf("%s key %s, want %s", c.status, c.m.Key, wantKey)
		}
		if s, _ := header(c.m, "tidemark-status"); s != c.status {
			t.Errorf("%s: tidemark-status header %q", c.status, s)
		}
		if c.m.Pos != (pipeline.Position{}) {
			t.Errorf("%s: Pos = %v, want zero", c.status, c.m.Pos)
		}
		var rec txnRecord
		if err := json.Unmarshal(c.m.Value, &rec); err != nil {
			t.Fatalf("%s: %v in %s", c.status, err, c.m.Value)
		}
		if rec.Status != c.status || rec.ID != "507:7000" || rec.TxID != 507 || rec.LSN != 7000 ||
			rec.TsMs != commitTime.UnixMilli()+507 {
			t.Errorf("%s record = %s", c.status, c.m.Value)
		}
		if c.status == "BEGIN" && (rec.EventCount != nil || rec.DataCollections != nil) {
			t.Errorf("BEGIN carries counts: %s", c.m.Value)
		}
	}
	var rec txnRecord
	if err := json.Unmarshal(end.Value, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.EventCount == nil || *rec.EventCount != 4 {
		t.Errorf("END event_count = %v, want 4 (the split update counts twice): %s", rec.EventCount, end.Value)
	}
	if rec.EndLSN != 7008 {
		t.Errorf("END end_lsn = %d, want 7008", rec.EndLSN)
	}
	counts := map[string]int{}
	for _, dc := range rec.DataCollections {
		counts[dc.DataCollection] += dc.EventCount
	}
	if want := map[string]int{"public.events": 3, "public.users": 1}; fmt.Sprint(counts) != fmt.Sprint(want) {
		t.Errorf("END data_collections = %v, want %v", counts, want)
	}
	// The change envelopes agree with the END record.
	orders := map[string][]string{}
	for _, m := range msgs[1 : len(msgs)-1] {
		var env struct {
			Source      struct{ Table string }
			Transaction struct {
				ID                  string `json:"id"`
				TotalOrder          int    `json:"total_order"`
				DataCollectionOrder int    `json:"data_collection_order"`
			}
		}
		if err := json.Unmarshal(m.Value, &env); err != nil {
			t.Fatal(err)
		}
		if env.Transaction.ID != "507:7000" || env.Transaction.TotalOrder != int(m.Pos.Seq)+1 {
			t.Errorf("transaction block %+v at %s", env.Transaction, m.Pos)
		}
		orders[env.Source.Table] = append(orders[env.Source.Table], fmt.Sprint(env.Transaction.DataCollectionOrder))
	}
	if want := map[string][]string{"events": {"1", "2", "3"}, "users": {"1"}}; fmt.Sprint(orders) != fmt.Sprint(want) {
		t.Errorf("data_collection_order per table = %v, want %v", orders, want)
	}
}

// TestRouterMissingStreamKey: a delete whose old image lacks the entity
// stream's key column cannot be routed; the error names the table and the
// fix, and the transaction is not acknowledged.
func TestRouterMissingStreamKey(t *testing.T) {
	cases := []struct {
		name string
		ch   pipeline.Change
		op   string
	}{
		{"delete with key-only old image", pipeline.Change{Op: pipeline.OpDelete, Rel: relEvents, Before: keyRow(relEvents, "$1", nil, nil)}, "delete"},
		{"delete without old image", pipeline.Change{Op: pipeline.OpDelete, Rel: relEvents}, "delete"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := pipeline.Config{Router: pipeline.RouterConfig{EntityStreams: []pipeline.EntityStream{roomsStream}, TableTopics: true}}
			good := txnN(1, insertEvent("$1", "!a"))
			bad := txnN(2, insertEvent("$2", "!a"), tc.ch)
			src, sink := newFakeSource(buildEvents(good, bad)), newFakeSink()
			p := newPipeline(t, cfg, src, sink)
			err := p.Run(testCtx(t))
			if err == nil {
				t.Fatal("Run succeeded")
			}
			for _, s := range []string{tc.op, "public.events", "REPLICA IDENTITY FULL", "tm.rooms"} {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			for _, a := range src.Acks() {
				if a >= bad.end {
					t.Errorf("acknowledged %d: the failed transaction", a)
				}
			}
		})
	}
}

func TestRouterUnknownStreamColumn(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{EntityStreams: []pipeline.EntityStream{
		{Name: "rooms", Key: "room_id", Tables: []string{"public.users"}},
	}}}
	_, _, err := runAll(t, cfg, buildEvents(txnN(1, pipeline.Change{Op: pipeline.OpCreate, Rel: relUsers, After: row("@u", false)})))
	if err == nil || !strings.Contains(err.Error(), "public.users") || !strings.Contains(err.Error(), "room_id") {
		t.Errorf("Run = %v, want an error naming public.users and room_id", err)
	}
}

func TestRouterConfigTopics(t *testing.T) {
	tables := []string{"public.events", "public.room_memberships", "public.users"}
	cases := []struct {
		name string
		cfg  pipeline.RouterConfig
		want []string
	}{
		{"tables only", pipeline.RouterConfig{TopicPrefix: "tm"},
			[]string{"tm.public.events", "tm.public.room_memberships", "tm.public.users"}},
		{"streams replace table topics", pipeline.RouterConfig{TopicPrefix: "tm", EntityStreams: []pipeline.EntityStream{roomsStream}},
			[]string{"tm.rooms", "tm.public.users"}},
		{"streams and table topics", pipeline.RouterConfig{TopicPrefix: "tm", EntityStreams: []pipeline.EntityStream{roomsStream}, TableTopics: true, TransactionsTopic: true},
			[]string{"tm.rooms", "tm.public.events", "tm.public.room_memberships", "tm.public.users", "tm.transaction"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.cfg.Topics(tables)
			sort.Strings(got)
			want := slices.Clone(tc.want)
			sort.Strings(want)
			if !slices.Equal(got, want) {
				t.Errorf("Topics = %v, want %v", got, want)
			}
		})
	}
}

// TestRouterSlabsKeepEveryMessageIntact: changes of very different sizes
// (a few bytes to 300 KB, larger than a slab) are carved from shared slabs
// or get their own memory; when the sink writes them, every message still
// holds exactly its own value, key and headers, in both representations of
// a text value (boxed and Datum.Text).
func TestRouterSlabsKeepEveryMessageIntact(t *testing.T) {
	sizes := []int{3, 10, 700, 5000, 9000, 20000, 70000, 300000, 1, 15000}
	var txns []txnSpec
	n := 0
	for i := 0; i < 60; i++ {
		var chs []pipeline.Change
		for j := 0; j < 5; j++ {
			id := fmt.Sprintf("$%d", n)
			body := strings.Repeat(string(rune('a'+n%26)), sizes[n%len(sizes)])
			after := row(id, "!r", body)
			if n%2 == 0 {
				after[2] = pipeline.Datum{Text: body, IsText: true}
			}
			chs = append(chs, pipeline.Change{Op: pipeline.OpCreate, Rel: relEvents, After: after})
			n++
		}
		txns = append(txns, txnN(i+1, chs...))
	}
	msgs, _, err := runAll(t, pipeline.Config{Router: pipeline.RouterConfig{TableTopics: true, TransactionsTopic: true,
		EntityStreams: []pipeline.EntityStream{roomsStream}}, MaxBatchMessages: 7}, buildEvents(txns...))
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, m := range changeMessages(msgs) {
		var env struct {
			After map[string]string `json:"after"`
		}
		if err := json.Unmarshal(m.Value, &env); err != nil {
			t.Fatalf("message at %s: %v", m.Pos, err)
		}
		var k int
		if _, err := fmt.Sscanf(env.After["event_id"], "$%d", &k); err != nil {
			t.Fatalf("message at %s: event_id %q", m.Pos, env.After["event_id"])
		}
		want := strings.Repeat(string(rune('a'+k%26)), sizes[k%len(sizes)])
		if env.After["content"] != want {
			t.Fatalf("event %d: content of %d bytes, want %d", k, len(env.After["content"]), len(want))
		}
		wantKey := fmt.Sprintf(`{"event_id":"$%d"}`, k)
		if m.Topic == "tm.rooms" {
			wantKey = `{"room_id":"!r"}`
		}
		if string(m.Key) != wantKey {
			t.Fatalf("event %d on %s: key %s, want %s", k, m.Topic, m.Key, wantKey)
		}
		if seq, _ := header(m, "tidemark-seq"); seq != fmt.Sprint(m.Pos.Seq) {
			t.Fatalf("event %d: seq header %q, position %s", k, seq, m.Pos)
		}
		seen++
	}
	if seen != 2*n {
		t.Fatalf("%d change messages, want %d", seen, 2*n)
	}
}
