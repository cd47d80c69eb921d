package capture

import (
	"encoding/binary"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"
)

// insertBytes builds a pgoutput Insert message for relation 42 with text
// values.
func insertBytes(vals ...string) []byte {
	b := []byte{'I', 0, 0, 0, 42, 'N'}
	b = binary.BigEndian.AppendUint16(b, uint16(len(vals)))
	for _, v := range vals {
		b = append(b, 't')
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		b = append(b, v...)
	}
	return b
}

func eventsRelation() *pglogrepl.RelationMessage {
	return &pglogrepl.RelationMessage{RelationID: 42, Namespace: "public", RelationName: "events", ReplicaIdentity: 'f',
		Columns: []*pglogrepl.RelationMessageColumn{
			{Flags: 1, Name: "event_id", DataType: pgtype.TextOID},
			{Flags: 1, Name: "room_id", DataType: pgtype.TextOID},
			{Flags: 1, Name: "sender", DataType: pgtype.TextOID},
			{Flags: 1, Name: "type", DataType: pgtype.TextOID},
			{Flags: 1, Name: "stream_ordering", DataType: pgtype.Int8OID},
			{Flags: 1, Name: "origin_ts", DataType: pgtype.Int8OID},
		}}
}

// BenchmarkParseDecodeInsert: one pgoutput Insert of an events row, decoded
// in place into pipeline values (the capture hot path, including the copy
// into the stream's slab).
func BenchmarkParseDecodeInsert(b *testing.B) {
	d := newDecoder()
	rel := relationFromMessage(eventsRelation(), []string{"event_id"})
	data := insertBytes("$0123456789abcdef0123456789abcdef:bench.test", "!r123:bench.test", "@u1234:bench.test", "m.room.message", "123456", "1732262400123")
	var s Stream
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if err := s.row.parse(s.own(data)); err != nil {
			b.Fatal(err)
		}
		if _, err := d.decodeTuple(rel, s.row.new, false); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPglogreplParseDecodeInsert: the same through pglogrepl.Parse (the
// path of every other message type), for comparison.
func BenchmarkPglogreplParseDecodeInsert(b *testing.B) {
	d := newDecoder()
	rel := relationFromMessage(eventsRelation(), []string{"event_id"})
	data := insertBytes("$0123456789abcdef0123456789abcdef:bench.test", "!r123:bench.test", "@u1234:bench.test", "m.room.message", "123456", "1732262400123")
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		m, err := parseMessage(data)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := d.tuple(rel, m.(*pglogrepl.InsertMessage).Tuple, false); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeTimestamptz: the most expensive common value type.
func BenchmarkDecodeTimestamptz(b *testing.B) {
	d := newDecoder()
	data := []byte("2024-03-01 10:34:56.123456+00")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := d.value(pgtype.TimestamptzOID, data); err != nil {
			b.Fatal(err)
		}
	}
}
