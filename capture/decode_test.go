package capture

import (
	"errors"
	"math"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/tidemark/tidemark/pipeline"
)

func TestDecodeValue(t *testing.T) {
	d := newDecoder()
	ts := time.Date(2024, 3, 1, 10, 34, 56, 123456000, time.UTC)
	cases := []struct {
		name string
		oid  uint32
		text string
		want any
	}{
		{"bool true", pgtype.BoolOID, "t", true},
		{"bool false", pgtype.BoolOID, "f", false},
		{"int2", pgtype.Int2OID, "-32768", int64(-32768)},
		{"int8 max", pgtype.Int8OID, "9223372036854775807", int64(math.MaxInt64)},
		{"float4", pgtype.Float4OID, "1.1", float32(1.1)},
		{"float8 nan", pgtype.Float8OID, "NaN", math.NaN()},
		{"float8 -inf", pgtype.Float8OID, "-Infinity", math.Inf(-1)},
		{"numeric exact", pgtype.NumericOID, "123456789012345678901234567890.5", pipeline.Decimal("123456789012345678901234567890.5")},
		{"text", pgtype.TextOID, "héllo", "héllo"},
		{"uuid", pgtype.UUIDOID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
		{"jsonb", pgtype.JSONBOID, `{"a": 1}`, pipeline.JSON(`{"a": 1}`)},
		{"bytea hex", pgtype.ByteaOID, `\xdeadbeef`, []byte{0xde, 0xad, 0xbe, 0xef}},
		{"timestamptz", pgtype.TimestamptzOID, "2024-03-01 10:34:56.123456+00", ts},
		{"timestamptz infinity", pgtype.TimestamptzOID, "infinity", "infinity"},
		{"timestamp", pgtype.TimestampOID, "2024-03-01 10:34:56.123456", pipeline.Timestamp{Time: ts}},
		{"date", pgtype.DateOID, "2024-02-29", pipeline.Date{Time: time.Date(2024, 2, 29, 0, 0, 0, 0, time.UTC)}},
		{"int8 array", pgtype.Int8ArrayOID, "{1,NULL,9007199254740993}", []any{int64(1), nil, int64(9007199254740993)}},
		{"text array", pgtype.TextArrayOID, `{a,"b c"}`, []any{"a", "b c"}},
		{"unknown oid (enum) keeps text", 99999, "sad", "sad"},
		{"interval keeps text", pgtype.IntervalOID, "1 day 02:03:04", "1 day 02:03:04"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := d.value(c.oid, []byte(c.text))
			if err != nil {
				t.Fatalf("value: %v", err)
			}
			if f, ok := c.want.(float64); ok && math.IsNaN(f) {
				if g, ok := got.(float64); !ok || !math.IsNaN(g) {
					t.Fatalf("got %#v, want NaN", got)
				}
				return
			}
			if gt, ok := got.(time.Time); ok {
				if wt, ok := c.want.(time.Time); !ok || !gt.Equal(wt) {
					t.Fatalf("got %v, want %v", got, c.want)
				}
				return
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("got %#v (%T), want %#v (%T)", got, got, c.want, c.want)
			}
		})
	}
}

func relMsg() *pglogrepl.RelationMessage {
	return &pglogrepl.RelationMessage{RelationID: 42, Namespace: "public", RelationName: "event_json", ReplicaIdentity: 'f',
		Columns: []*pglogrepl.RelationMessageColumn{
			{Flags: 1, Name: "event_id", DataType: pgtype.TextOID},
			{Flags: 1, Name: "room_id", DataType: pgtype.TextOID},
			{Flags: 1, Name: "json", DataType: pgtype.TextOID},
		}}
}

func TestRelationKeys(t *testing.T) {
	// Under FULL identity pgoutput flags every column; the primary key from
	// preflight wins.
	r := relationFromMessage(relMsg(), []string{"event_id"})
	if !r.Columns[0].Key || r.Columns[1].Key || r.Columns[2].Key {
		t.Errorf("keys with primary key known: %+v", r.Columns)
	}
	r = relationFromMessage(relMsg(), nil)
	for _, c := range r.Columns {
		if !c.Key {
			t.Errorf("without a primary key the flags decide: %+v", r.Columns)
		}
	}
	if r.QualifiedName() != "public.event_json" || r.ReplicaIdentity != 'f' {
		t.Errorf("relation %+v", r)
	}
}

func TestDecodeTuple(t *testing.T) {
	d := newDecoder()
	rel := relationFromMessage(relMsg(), []string{"event_id"})
	col := func(kind byte, data string) *pglogrepl.TupleDataColumn {
		return &pglogrepl.TupleDataColumn{DataType: kind, Data: []byte(data), Length: uint32(len(data))}
	}
	// New image of an update that did not touch the TOASTed json.
	tup, err := d.tuple(rel, &pglogrepl.TupleData{ColumnNum: 3, Columns: []*pglogrepl.TupleDataColumn{
		col('t', "$e1"), col('n', ""), col('u', "")}}, false)
	if err != nil {
		t.Fatal(err)
	}
	if tup[0].Get() != "$e1" || tup[1].Get() != nil || tup[1].Absent || tup[1].Unchanged || !tup[2].Unchanged || tup[2].Value != nil {
		t.Errorf("tuple %+v", tup)
	}
	// Old-key image: nulls in non-key columns mean "not sent".
	tup, err = d.tuple(rel, &pglogrepl.TupleData{ColumnNum: 3, Columns: []*pglogrepl.TupleDataColumn{
		col('t', "$e1"), col('n', ""), col('n', "")}}, true)
	if err != nil {
		t.Fatal(err)
	}
	if tup[0].Absent || !tup[1].Absent || !tup[2].Absent {
		t.Errorf("key-only tuple %+v", tup)
	}
	// Column count mismatch and undecodable values are errors naming the place.
	if _, err := d.tuple(rel, &pglogrepl.TupleData{ColumnNum: 1, Columns: []*pglogrepl.TupleDataColumn{col('t', "x")}}, false); err == nil {
		t.Error("column count mismatch accepted")
	}
	intRel := &pipeline.Relation{Schema: "public", Table: "t", Columns: []pipeline.Column{{Name: "n", TypeOID: pgtype.Int8OID}}}
	_, err = d.tuple(intRel, &pglogrepl.TupleData{ColumnNum: 1, Columns: []*pglogrepl.TupleDataColumn{col('t', "12x")}}, false)
	var de *DecodeError
	if !errors.As(err, &de) || de.Table != "public.t" || de.Column != "n" {
		t.Errorf("decode error = %v, want one naming public.t column n", err)
	}
	if _, err := d.tuple(intRel, &pglogrepl.TupleData{ColumnNum: 1, Columns: []*pglogrepl.TupleDataColumn{col('b', "\x00")}}, false); err == nil {
		t.Error("binary tuple data accepted without binary mode")
	}
}

// FuzzParseAndDecode feeds arbitrary bytes through pglogrepl's pgoutput
// parser and Tidemark's tuple decoder: nothing may panic.
func FuzzParseAndDecode(f *testing.F) {
	f.Add([]byte{'I', 0, 0, 0, 42, 'N', 0, 3, 't', 0, 0, 0, 3, '$', 'e', '1', 'n', 'u'})
	f.Add([]byte{'U', 0, 0, 0, 42, 'K', 0, 3, 't', 0, 0, 0, 1, 'x', 'n', 'n', 'N', 0, 3, 'u', 'u', 'u'})
	f.Add([]byte{'B', 0, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7})
	d := newDecoder()
	rel := relationFromMessage(relMsg(), []string{"event_id"})
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseMessage(data)
		if err != nil {
			return
		}
		switch m := m.(type) {
		case *pglogrepl.InsertMessage:
			_, _ = d.tuple(rel, m.Tuple, false)
		case *pglogrepl.UpdateMessage:
			_, _ = d.tuple(rel, m.OldTuple, true)
			_, _ = d.tuple(rel, m.NewTuple, false)
		case *pglogrepl.RelationMessage:
			_ = relationFromMessage(m, nil)
		}
	})
}

// A row message whose column declares a length beyond the message is an
// error, without allocating that length first (pglogrepl would allocate
// 808 MB for these 16 bytes: 'b' column, length 0x30303030).
func TestParseMessageRefusesForgedColumnLength(t *testing.T) {
	for _, data := range [][]byte{
		[]byte("I0000N00b0000000"),
		append([]byte{'U', 0, 0, 0, 1, 'N', 0, 1, 't'}, 0xff, 0xff, 0xff, 0xf0, 'x'),
	} {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := parseMessage(data)
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Errorf("parseMessage(%q) accepted a column longer than the message", data)
		}
		if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
			t.Errorf("parseMessage(%q) allocated %d bytes for a %d-byte message", data, n, len(data))
		}
	}
}
