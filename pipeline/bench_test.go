package pipeline

import (
	"testing"
	"time"
)

func benchChange() (*Router, *txnState, *Change) {
	rel := &Relation{Schema: "public", Table: "events", Columns: []Column{
		{Name: "event_id", TypeOID: 25, Key: true}, {Name: "room_id", TypeOID: 25}, {Name: "sender", TypeOID: 25},
		{Name: "type", TypeOID: 25}, {Name: "stream_ordering", TypeOID: 20}, {Name: "origin_ts", TypeOID: 20}}}
	ch := &Change{Op: OpCreate, Rel: rel, WALLSN: 23456700, After: Tuple{
		{Value: "$0123456789abcdef0123456789abcdef:bench.test"}, {Value: "!r123:bench.test"}, {Value: "@u1234:bench.test"},
		{Value: "m.room.message"}, {Value: int64(123456)}, {Value: int64(1732262400123)}}}
	r := NewRouter(RouterConfig{TopicPrefix: "tidemark", Database: "app", TableTopics: true,
		EntityStreams: []EntityStream{{Name: "rooms", Key: "room_id", Tables: []string{"public.events"}}}})
	st := &txnState{info: &TxnInfo{Xid: 1234, CommitLSN: 23456789, EndLSN: 23456800, CommitTime: time.Unix(1732262400, 0)}}
	return r, st, ch
}

// BenchmarkEncodeChange: one insert routed to its table topic and an entity
// stream (two messages sharing one envelope).
func BenchmarkEncodeChange(b *testing.B) {
	r, st, ch := benchChange()
	now := time.Now()
	var msgs []Message
	b.ReportAllocs()
	for b.Loop() {
		st.seq = 0
		st.tables = st.tables[:0]
		var err error
		msgs, err = r.encodeChange(msgs[:0], st, ch, now)
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAppendEnvelope: the JSON envelope alone.
func BenchmarkAppendEnvelope(b *testing.B) {
	_, st, ch := benchChange()
	src := EnvelopeSource{Name: "tidemark", Database: "app"}
	buf := make([]byte, 0, 1024)
	now := time.Now()
	layout := newEnvelopeLayout(src, ch.Rel) // the router keeps one per relation
	digits := newTxnDigits(st.info)          // and one per transaction
	b.ReportAllocs()
	for b.Loop() {
		buf = layout.append(buf[:0], digits, ch, ch.Op, nil, ch.After, Position{CommitLSN: 23456789}, 1, now)
	}
	b.SetBytes(int64(len(buf)))
}
