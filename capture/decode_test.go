package capture

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
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

// Arrays are nested per dimension; bounds other than 1 keep the text.
func TestDecodeArray(t *testing.T) {
	d := newDecoder()
	ts := time.Date(2024, 3, 1, 10, 34, 56, 0, time.UTC)
	cases := []struct {
		name string
		oid  uint32
		text string
		want any
	}{
		{"one dimension", pgtype.Int4ArrayOID, "{1,2,3}", []any{int64(1), int64(2), int64(3)}},
		{"empty", pgtype.Int4ArrayOID, "{}", []any{}},
		{"two dimensions", pgtype.Int4ArrayOID, "{{1,2},{3,4}}", []any{[]any{int64(1), int64(2)}, []any{int64(3), int64(4)}}},
		{"three dimensions", pgtype.Int8ArrayOID, "{{{1}},{{NULL}}}", []any{[]any{[]any{int64(1)}}, []any{[]any{nil}}}},
		{"null elements", pgtype.Int4ArrayOID, "{NULL,1,null}", []any{nil, int64(1), nil}},
		{"lower bound kept as text", pgtype.Int4ArrayOID, "[0:2]={1,2,3}", "[0:2]={1,2,3}"},
		{"bounds of two dimensions", pgtype.Int4ArrayOID, "[-1:0][1:2]={{1,2},{3,4}}", "[-1:0][1:2]={{1,2},{3,4}}"},
		{"quoted and escaped text", pgtype.TextArrayOID, `{a,NULL,"NULL","say \"hi\"","back\\slash","","x,y","{b}"," sp "}`,
			[]any{"a", nil, "NULL", `say "hi"`, `back\slash`, "", "x,y", "{b}", " sp "}},
		{"text in two dimensions", pgtype.TextArrayOID, `{{a,"b c"},{NULL,"\\"}}`, []any{[]any{"a", "b c"}, []any{nil, `\`}}},
		{"numeric keeps its digits", pgtype.NumericArrayOID, "{1.50,NaN}", []any{pipeline.Decimal("1.50"), pipeline.Decimal("NaN")}},
		{"bytea elements", pgtype.ByteaArrayOID, `{"\\xdead",NULL}`, []any{[]byte{0xde, 0xad}, nil}},
		{"timestamptz elements", pgtype.TimestamptzArrayOID, `{"2024-03-01 10:34:56+00",infinity}`, []any{ts.Local(), "infinity"}},
		{"date elements", pgtype.DateArrayOID, `{{2024-03-01}}`, []any{[]any{pipeline.Date{Time: time.Date(2024, 3, 1, 0, 0, 0, 0, time.UTC)}}}},
		{"array of another type keeps its text", pgtype.IntervalArrayOID, `{"1 day"}`, `{"1 day"}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := d.value(c.oid, []byte(c.text))
			if err != nil {
				t.Fatalf("value(%s): %v", c.text, err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("value(%s) = %#v, want %#v", c.text, got, c.want)
			}
		})
	}
	for _, bad := range []string{"", "{", "{1,2", "{1,}", "{,1}", "{{1},2}", "{1,{2}}", "{1}}", "{1}x", `{"a}`, `{a"b}`, `{a\b}`,
		"{{{{{{{1}}}}}}}", "[0:2]{1}", "[0:2]=", "[a:2]={1}", "[0:2={1}", "[0:2][0:1][0:1][0:1][0:1][0:1][0:1]={1}", "{x}", `{"\\xzz"}`} {
		oid := uint32(pgtype.Int4ArrayOID)
		if strings.Contains(bad, `\x`) {
			oid = pgtype.ByteaArrayOID
		}
		if v, err := d.value(oid, []byte(bad)); err == nil {
			t.Errorf("value(%q) = %#v, want an error", bad, v)
		}
	}
}

// FuzzDecodeArray: any text given as an array decodes or is an error, and
// what decodes is valid JSON in an envelope.
func FuzzDecodeArray(f *testing.F) {
	for _, s := range []string{"{1,2,3}", "{{1,NULL},{3,4}}", "[0:2]={1,2,3}", `{a,"b \"c\"",NULL}`, `{"\\xdead"}`, "{}", "{{{1}}}"} {
		f.Add(s, uint8(0))
	}
	oids := []uint32{pgtype.Int4ArrayOID, pgtype.TextArrayOID, pgtype.NumericArrayOID, pgtype.ByteaArrayOID,
		pgtype.TimestamptzArrayOID, pgtype.Float8ArrayOID, pgtype.BoolArrayOID}
	d := newDecoder()
	f.Fuzz(func(t *testing.T, text string, which uint8) {
		v, err := d.value(oids[int(which)%len(oids)], []byte(text))
		if err != nil {
			return
		}
		if b := pipeline.AppendValue(nil, v); !json.Valid(b) {
			t.Fatalf("%q decodes to invalid JSON %s", text, b)
		}
	})
}

// bytea in the escape format (bytea_output = escape) is refused, saying
// why: the replication connection pins hex (textFormats).
func TestDecodeByteaEscapeRefused(t *testing.T) {
	_, err := newDecoder().value(pgtype.ByteaOID, []byte(`\336\255abc`))
	if err == nil || !strings.Contains(err.Error(), "bytea_output = hex") {
		t.Fatalf("escape-format bytea: error %v, want one naming bytea_output = hex", err)
	}
}

// The settings the decoder assumes override what the DSN says.
func TestPinTextFormats(t *testing.T) {
	cfg, err := pgconn.ParseConfig("postgres://u@h/db?bytea_output=escape&IntervalStyle=iso_8601&DateStyle=SQL")
	if err != nil {
		t.Fatal(err)
	}
	pinTextFormats(cfg.RuntimeParams)
	for k, want := range map[string]string{"bytea_output": "hex", "IntervalStyle": "postgres", "DateStyle": "ISO",
		"TimeZone": "UTC", "extra_float_digits": "3", "client_encoding": "UTF8"} {
		if got := cfg.RuntimeParams[k]; got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
}

// Domains decode as their base types, arrays of domains as arrays of the
// base type; other types that are not built in keep their text.
func TestResolveTypes(t *testing.T) {
	const (
		posint    = 20000 // CREATE DOMAIN posint AS int4
		small     = 20001 // CREATE DOMAIN small AS posint
		label     = 20002 // CREATE DOMAIN label AS text
		amount    = 20003 // CREATE DOMAIN amount AS numeric(10,2)
		posints   = 20004 // posint[]
		pair      = 20005 // CREATE DOMAIN pair AS int4[]
		mood      = 20006 // an enum
		moods     = 20007 // mood[]
		moodish   = 20008 // CREATE DOMAIN moodish AS mood
		gone      = 20009 // dropped meanwhile: no row
		smalls    = 20010 // small[]
		labelPair = 20011 // CREATE DOMAIN labels AS label[]
		labels    = 20012 // label[]
	)
	rows := map[uint32]pgType{
		posint: {Domain: true, Base: pgtype.Int4OID}, small: {Domain: true, Base: posint}, label: {Domain: true, Base: pgtype.TextOID},
		amount: {Domain: true, Base: pgtype.NumericOID}, posints: {Elem: posint}, pair: {Domain: true, Base: pgtype.Int4ArrayOID},
		mood: {}, moods: {Elem: mood}, moodish: {Domain: true, Base: mood}, smalls: {Elem: small},
		labelPair: {Domain: true, Base: labels}, labels: {Elem: label},
	}
	var asked [][]uint32
	lookup := func(_ context.Context, oids []uint32) (map[uint32]pgType, error) {
		asked = append(asked, oids)
		return rows, nil
	}
	d := newDecoder()
	cols := []uint32{pgtype.Int4OID, posint, small, label, amount, posints, pair, mood, moods, moodish, gone, smalls, labelPair, posint}
	if err := d.resolveTypes(context.Background(), cols, lookup); err != nil {
		t.Fatal(err)
	}
	if len(asked) != 1 || len(asked[0]) != len(cols)-2 {
		t.Fatalf("lookups %v, want one for the %d types that are not built in, each once", asked, len(cols)-2)
	}
	if err := d.resolveTypes(context.Background(), cols, lookup); err != nil || len(asked) != 1 {
		t.Fatalf("resolved types were looked up again (%v, err %v)", asked, err)
	}
	cases := []struct {
		oid  uint32
		text string
		want any
	}{
		{posint, "7", int64(7)},
		{small, "-3", int64(-3)},
		{label, "hi", "hi"},
		{amount, "12.50", pipeline.Decimal("12.50")},
		{posints, "{1,NULL}", []any{int64(1), nil}},
		{smalls, "{{1},{2}}", []any{[]any{int64(1)}, []any{int64(2)}}},
		{pair, "{1,2}", []any{int64(1), int64(2)}},
		{labelPair, `{a,"b c"}`, []any{"a", "b c"}},
		{mood, "sad", "sad"},
		{moods, "{sad,happy}", "{sad,happy}"},
		{moodish, "sad", "sad"},
		{gone, "x", "x"},
	}
	for _, c := range cases {
		got, err := d.value(c.oid, []byte(c.text))
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("value(%d, %q) = %#v, %v; want %#v", c.oid, c.text, got, err, c.want)
		}
	}
	// Through a tuple: a domain over int4 is a number in the envelope.
	rel := &pipeline.Relation{Schema: "public", Table: "t", Columns: []pipeline.Column{{Name: "n", TypeOID: posint}, {Name: "a", TypeOID: posints}}}
	tup, err := d.decodeTuple(rel, []rawCol{{kind: 't', data: []byte("5")}, {kind: 't', data: []byte("{{1,2},{3,4}}")}}, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(pipeline.AppendValue(nil, tup[0].Get())) + " " + string(pipeline.AppendValue(nil, tup[1].Get())); got != "5 [[1,2],[3,4]]" {
		t.Errorf("tuple values %s, want 5 [[1,2],[3,4]]", got)
	}
	// A failed lookup is an error, and nothing is cached: the next
	// session asks again.
	d = newDecoder()
	fail := func(context.Context, []uint32) (map[uint32]pgType, error) {
		return nil, errors.New("connection refused")
	}
	if err := d.resolveTypes(context.Background(), []uint32{posint}, fail); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("failed lookup: error %v", err)
	}
	if err := d.resolveTypes(context.Background(), []uint32{posint}, lookup); err != nil {
		t.Fatal(err)
	}
	if v, _ := d.value(posint, []byte("9")); v != int64(9) {
		t.Errorf("after a failed lookup and a good one, posint 9 = %#v", v)
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
	for _, c := range r.Columns {
		if !c.Identity {
			t.Errorf("identity follows pgoutput's flags whatever the key: %+v", r.Columns)
		}
	}
	r = relationFromMessage(relMsg(), nil)
	for _, c := range r.Columns {
		if !c.Key || !c.Identity {
			t.Errorf("without a chosen key the flags decide: %+v", r.Columns)
		}
	}
	if r.QualifiedName() != "public.event_json" || r.ReplicaIdentity != 'f' {
		t.Errorf("relation %+v", r)
	}
}

func TestDecodeTuple(t *testing.T) {
	d := newDecoder()
	rel := relationFromMessage(relMsg(), []string{"event_id"})
	// As under the default replica identity: pgoutput flags event_id only,
	// and old-key images ('K') carry just that column.
	for i := range rel.Columns {
		rel.Columns[i].Identity = i == 0
	}
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
	// Absent follows pgoutput's identity flags, not the message key: a key
	// column outside the identity (e.g. a primary key once REPLICA IDENTITY
	// USING INDEX names another index) is absent from an old-key image,
	// never a false null.
	pkRel := relationFromMessage(relMsg(), []string{"room_id"})
	for i := range pkRel.Columns {
		pkRel.Columns[i].Identity = i == 0
	}
	tup, err = d.tuple(pkRel, &pglogrepl.TupleData{ColumnNum: 3, Columns: []*pglogrepl.TupleDataColumn{
		col('t', "$e1"), col('n', ""), col('n', "")}}, true)
	if err != nil {
		t.Fatal(err)
	}
	if tup[0].Absent || !tup[1].Absent || !tup[2].Absent {
		t.Errorf("key-only tuple, key outside the identity: %+v", tup)
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
	// json and jsonb are embedded verbatim in envelopes: text that is not
	// JSON is refused (FuzzParseAndDecodeTyped found it breaking envelopes).
	jsonRel := &pipeline.Relation{Schema: "public", Table: "t", Columns: []pipeline.Column{{Name: "doc", TypeOID: pgtype.JSONBOID}}}
	for _, v := range []string{"00", `{"a":`, "", `{"a":1}x`} {
		_, err = d.tuple(jsonRel, &pglogrepl.TupleData{ColumnNum: 1, Columns: []*pglogrepl.TupleDataColumn{col('t', v)}}, false)
		if !errors.As(err, &de) || de.Table != "public.t" || de.Column != "doc" {
			t.Errorf("jsonb %q: error = %v, want one naming public.t column doc", v, err)
		}
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

// typedColumns is a relation over every type the decoder gives its own Go
// form (and a few it keeps as text), with a valid and an edge-case value
// of each in Postgres' text output format.
var typedColumns = []struct {
	name        string
	oid         uint32
	valid, edge string // "" in edge: NULL
}{
	{"id", pgtype.Int8OID, "9007199254740993", "-9223372036854775808"},
	{"i2", pgtype.Int2OID, "-32768", "0"},
	{"i4", pgtype.Int4OID, "2147483647", ""},
	{"oid", pgtype.OIDOID, "4294967295", "0"},
	{"xid", pgtype.XIDOID, "12345", "1"},
	{"f4", pgtype.Float4OID, "1.1", "-Infinity"},
	{"f8", pgtype.Float8OID, "2.5e-300", "NaN"},
	{"num", pgtype.NumericOID, "123456789012345678901234567890.5", "-0.000"},
	{"b", pgtype.BoolOID, "t", "f"},
	{"txt", pgtype.TextOID, "héllo \"x\"\n\t\\", "\u2028"},
	{"vc", pgtype.VarcharOID, "v", ""},
	{"bp", pgtype.BPCharOID, "ab  ", " "},
	{"nm", pgtype.NameOID, "pg_class", "x"},
	{"u", pgtype.UUIDOID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000000"},
	{"j", pgtype.JSONOID, `{"a": [1, 2.5, "x"], "b": null}`, `"\u0000"`},
	{"jb", pgtype.JSONBOID, `{"a": 1}`, `[]`},
	{"by", pgtype.ByteaOID, `\xdeadbeef`, `\x`},
	{"ts", pgtype.TimestampOID, "2024-03-01 10:34:56.123456", "infinity"},
	{"tstz", pgtype.TimestamptzOID, "2024-03-01 10:34:56.123456+00", "0001-01-01 00:00:00+00 BC"},
	{"d", pgtype.DateOID, "2024-02-29", "-infinity"},
	{"iv", pgtype.IntervalOID, "1 day 02:03:04", "-00:00:01"},
	{"inet", pgtype.InetOID, "10.0.0.1/8", "::1"},
	{"mood", 99999, "sad", ""},
	{"ba", pgtype.BoolArrayOID, "{t,f,NULL}", "{}"},
	{"i2a", pgtype.Int2ArrayOID, "{1,-2}", "{NULL}"},
	{"i4a", pgtype.Int4ArrayOID, "{{1,2},{3,4}}", "[0:1]={5,6}"},
	{"i8a", pgtype.Int8ArrayOID, "{1,NULL,9007199254740993}", "{-9223372036854775808}"},
	{"f4a", pgtype.Float4ArrayOID, "{1.5,-0}", "{Infinity}"},
	{"f8a", pgtype.Float8ArrayOID, "{1.5,NaN,-Infinity}", "{1e308}"},
	{"na", pgtype.NumericArrayOID, "{1.5,NaN,12345678901234567890}", "{Infinity,-Infinity}"},
	{"ta", pgtype.TextArrayOID, `{a,"b c","d\"e",NULL,"NULL"}`, `{"\\","{}"}`},
	{"vca", pgtype.VarcharArrayOID, "{x,y}", `{""}`},
	{"ua", pgtype.UUIDArrayOID, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "{}"},
	{"tsa", pgtype.TimestampArrayOID, `{"2024-03-01 10:34:56"}`, `{infinity}`},
	{"tstza", pgtype.TimestamptzArrayOID, `{"2024-03-01 10:34:56+00",infinity}`, `{"2024-03-01 10:34:56.5+05:30"}`},
	{"da", pgtype.DateArrayOID, "{2024-02-29,-infinity}", "{0001-01-01}"},
	{"bya", pgtype.ByteaArrayOID, `{"\\xdead"}`, `{NULL}`},
	{"jba", pgtype.JSONBArrayOID, `{"{\"a\": 1}"}`, `{}`},
}

func typedRelMsg() *pglogrepl.RelationMessage {
	m := &pglogrepl.RelationMessage{RelationID: 43, Namespace: "public", RelationName: "typed", ReplicaIdentity: 'd'}
	for i, c := range typedColumns {
		var flags uint8
		if i == 0 {
			flags = 1 // the key
		}
		m.Columns = append(m.Columns, &pglogrepl.RelationMessageColumn{Flags: flags, Name: c.name, DataType: c.oid})
	}
	return m
}

// typedTuple encodes a typed row: edge values in the columns marked, and
// an unchanged TOAST value in column toast (-1: none).
func typedTuple(edge func(i int) bool, toast int) []byte {
	vals := make([]*string, len(typedColumns))
	for i, c := range typedColumns {
		switch {
		case i == toast:
			vals[i] = sp("\x00u")
		case edge(i) && c.edge == "":
			vals[i] = nil
		case edge(i):
			vals[i] = sp(c.edge)
		default:
			vals[i] = sp(c.valid)
		}
	}
	return tupleBytes(vals...)
}

// FuzzParseAndDecodeTyped: row messages for a table of every column type
// the decoder knows, through the capture hot path (the in-place row
// decoder, then value decoding). Nothing may panic; a value that does not
// decode is an error naming its table, column and type; and what decodes
// becomes an envelope that is valid JSON which consumers accept, with a
// valid JSON key.
func FuzzParseAndDecodeTyped(f *testing.F) {
	rel := []byte{0, 0, 0, 43}
	none := func(int) bool { return false }
	all := func(int) bool { return true }
	odd := func(i int) bool { return i%2 == 1 }
	f.Add(cat([]byte{'I'}, rel, []byte{'N'}, typedTuple(none, -1)))
	f.Add(cat([]byte{'I'}, rel, []byte{'N'}, typedTuple(all, -1)))
	key := make([]*string, len(typedColumns)) // an old-key image: NULL but the key
	key[0] = sp("1")
	f.Add(cat([]byte{'U'}, rel, []byte{'K'}, tupleBytes(key...), []byte{'N'}, typedTuple(odd, 14)))
	f.Add(cat([]byte{'U'}, rel, []byte{'O'}, typedTuple(odd, -1), []byte{'N'}, typedTuple(none, 30)))
	f.Add(cat([]byte{'D'}, rel, []byte{'O'}, typedTuple(all, -1)))
	d := newDecoder()
	r := relationFromMessage(typedRelMsg(), []string{"id"})
	txn := &pipeline.TxnInfo{Xid: 7, CommitLSN: 99, EndLSN: 107, CommitTime: time.Unix(1700000000, 0)}
	src := pipeline.EnvelopeSource{Name: "tm", Database: "app"}
	var m rowMessage
	f.Fuzz(func(t *testing.T, data []byte) {
		if !isRowMessage(data) || m.parse(data) != nil {
			return
		}
		ch := pipeline.Change{Rel: r, Op: pipeline.Op(map[byte]byte{'I': 'c', 'U': 'u', 'D': 'd'}[m.typ])}
		var err error
		if m.oldKind != 0 {
			ch.Before, err = d.decodeTuple(r, m.old, m.oldKind == 'K')
		}
		if err == nil && m.hasNew {
			ch.After, err = d.decodeTuple(r, m.new, false)
		}
		if err != nil {
			var de *DecodeError
			switch {
			case errors.As(err, &de):
				i := r.ColumnIndex(de.Column)
				if de.Table != "public.typed" || i < 0 || r.Columns[i].TypeOID != de.TypeOID ||
					!strings.Contains(err.Error(), "public.typed."+de.Column) {
					t.Fatalf("decode error %q names no column of public.typed (%+v)", err, de)
				}
			case !strings.Contains(err.Error(), "tuple for public.typed has"):
				t.Fatalf("error %q is neither a value's nor a column count's", err)
			}
			return
		}
		env := pipeline.AppendEnvelope(nil, src, txn, &ch, ch.Op, ch.Before, ch.After, pipeline.Position{CommitLSN: 99}, 1, time.Unix(1700000001, 0))
		if !json.Valid(env) {
			t.Fatalf("envelope is not valid JSON: %s", env)
		}
		if _, err := pipeline.ParseEnvelope(env); err != nil {
			t.Fatalf("consumers refuse the envelope: %v: %s", err, env)
		}
		img := ch.After
		if img == nil {
			img = ch.Before
		}
		if key, ok := pipeline.AppendKey(nil, r, img, []int{0}); ok && !json.Valid(key) {
			t.Fatalf("key is not valid JSON: %s", key)
		}
	})
}

// TestParseMessageRecoversFromParserPanic: a frame that passes the
// pre-checks but makes pglogrepl's parser slice past its end (a logical
// decoding message whose content length exceeds the frame; found by
// random probing) is an error naming the message, not a crash.
func TestParseMessageRecoversFromParserPanic(t *testing.T) {
	for _, frame := range [][]byte{
		[]byte("M\xa9\x10\xae\x00\x00n\xfb\x00\x00Z\x00D\xcc\xde\x00\x00\x00\x06"),
	} {
		m, err := parseMessage(frame)
		if err == nil {
			t.Fatalf("%v: parsed as %T, want an error", frame, m)
		}
		if !strings.Contains(err.Error(), "malformed pgoutput") {
			t.Fatalf("%v: error %q does not say the message is malformed", frame, err)
		}
	}
}
