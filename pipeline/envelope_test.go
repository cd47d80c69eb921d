package pipeline_test

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/tidemark/tidemark/pipeline"
)

// decodeJSON parses b with numbers kept exact.
func decodeJSON(t *testing.T, b []byte) any {
	t.Helper()
	if !json.Valid(b) {
		t.Fatalf("not valid JSON: %s", b)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return v
}

func TestAppendValue(t *testing.T) {
	const two53 = int64(1) << 53
	berlin := time.FixedZone("CEST", 2*60*60)
	cases := []struct {
		name string
		in   any
		want string
		// str, when set, is the Go string the JSON output must decode to.
		str *string
	}{
		{name: "nil", in: nil, want: `null`},
		{name: "true", in: true, want: `true`},
		{name: "false", in: false, want: `false`},
		{name: "int64 zero", in: int64(0), want: `0`},
		{name: "int64 2^53", in: two53, want: `9007199254740992`},
		{name: "int64 -2^53", in: -two53, want: `-9007199254740992`},
		{name: "int64 2^53-1", in: two53 - 1, want: `9007199254740991`},
		{name: "int64 2^53+1", in: two53 + 1, want: `"9007199254740993"`},
		{name: "int64 -(2^53+1)", in: -two53 - 1, want: `"-9007199254740993"`},
		{name: "int64 max", in: int64(math.MaxInt64), want: `"9223372036854775807"`},
		{name: "int64 min", in: int64(math.MinInt64), want: `"-9223372036854775808"`},
		{name: "float64 plain", in: 1.5, want: `1.5`},
		{name: "float64 negative", in: -0.25, want: `-0.25`},
		{name: "float64 large exponent", in: 1e21, want: `1e+21`},
		{name: "float64 NaN", in: math.NaN(), want: `"NaN"`},
		{name: "float64 +Inf", in: math.Inf(1), want: `"Infinity"`},
		{name: "float64 -Inf", in: math.Inf(-1), want: `"-Infinity"`},
		{name: "float32 1.1", in: float32(1.1), want: `1.1`},
		{name: "float32 NaN", in: float32(math.NaN()), want: `"NaN"`},
		{name: "float32 -Inf", in: float32(math.Inf(-1)), want: `"-Infinity"`},
		{name: "string plain", in: "hello", want: `"hello"`},
		{name: "string empty", in: "", want: `""`},
		{name: "string quotes and backslash", in: `a"b\c`, want: `"a\"b\\c"`, str: ptr(`a"b\c`)},
		{name: "string newline tab cr", in: "a\nb\tc\rd", want: `"a\nb\tc\rd"`, str: ptr("a\nb\tc\rd")},
		{name: "string control chars", in: "\x00\x01\x1f\x7f", want: `"\u0000\u0001\u001f` + "\x7f" + `"`, str: ptr("\x00\x01\x1f\x7f")},
		{name: "string U+2028 U+2029", in: "a\u2028b\u2029c", want: `"a\u2028b\u2029c"`, str: ptr("a\u2028b\u2029c")},
		{name: "string non-ASCII kept", in: "héllo 🌊", want: `"héllo 🌊"`, str: ptr("héllo 🌊")},
		{name: "string invalid UTF-8", in: "a\xffb", want: `"a\ufffdb"`, str: ptr("a\uFFFDb")},
		{name: "string truncated rune", in: "x\xe2\x82", want: `"x\ufffd\ufffd"`, str: ptr("x\uFFFD\uFFFD")},
		{name: "string HTML is not escaped", in: "<a&b>", want: `"<a&b>"`, str: ptr("<a&b>")},
		{name: "bytea", in: []byte{0, 1, 2, 0xff}, want: `"AAEC/w=="`},
		{name: "bytea empty", in: []byte{}, want: `""`},
		{
			name: "timestamptz in +02:00 rendered UTC",
			in:   time.Date(2024, 11, 22, 10, 0, 0, 123456000, berlin),
			want: `"2024-11-22T08:00:00.123456Z"`,
		},
		{
			name: "timestamptz whole seconds",
			in:   time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC),
			want: `"2024-01-02T03:04:05Z"`,
		},
		{
			name: "timestamp without zone",
			in:   pipeline.Timestamp{Time: time.Date(2024, 11, 22, 10, 0, 0, 123456000, time.UTC)},
			want: `"2024-11-22T10:00:00.123456"`,
		},
		{
			name: "timestamp without zone keeps wall clock",
			in:   pipeline.Timestamp{Time: time.Date(2024, 11, 22, 10, 0, 0, 0, berlin)},
			want: `"2024-11-22T10:00:00"`,
		},
		{name: "date", in: pipeline.Date{Time: time.Date(2024, 2, 29, 0, 0, 0, 0, time.UTC)}, want: `"2024-02-29"`},
		{name: "decimal small", in: pipeline.Decimal("12.50"), want: `12.50`},
		{name: "decimal negative fraction", in: pipeline.Decimal("-0.001"), want: `-0.001`},
		{name: "decimal zero", in: pipeline.Decimal("0"), want: `0`},
		{name: "decimal 15 digits", in: pipeline.Decimal("123456789012345"), want: `123456789012345`},
		{name: "decimal 15 significant after zeros", in: pipeline.Decimal("0.000123456789012345"), want: `0.000123456789012345`},
		{name: "decimal 16 digits", in: pipeline.Decimal("1234567890123456"), want: `"1234567890123456"`},
		{name: "decimal 16 digits with point", in: pipeline.Decimal("-1234567890.123456"), want: `"-1234567890.123456"`},
		{name: "decimal NaN", in: pipeline.Decimal("NaN"), want: `"NaN"`},
		{name: "decimal Infinity", in: pipeline.Decimal("Infinity"), want: `"Infinity"`},
		{name: "decimal -Infinity", in: pipeline.Decimal("-Infinity"), want: `"-Infinity"`},
		{name: "decimal leading zeros", in: pipeline.Decimal("007"), want: `"007"`},
		{name: "decimal negative leading zeros", in: pipeline.Decimal("-00.5"), want: `"-00.5"`},
		{name: "decimal trailing point", in: pipeline.Decimal("1."), want: `"1."`},
		{name: "decimal leading point", in: pipeline.Decimal(".5"), want: `".5"`},
		{name: "decimal exponent", in: pipeline.Decimal("1e5"), want: `"1e5"`},
		{name: "decimal lone minus", in: pipeline.Decimal("-"), want: `"-"`},
		{name: "json object embedded", in: pipeline.JSON(`{"a":[1,2,{"b":null}]}`), want: `{"a":[1,2,{"b":null}]}`},
		{name: "json scalar embedded", in: pipeline.JSON(`"x"`), want: `"x"`},
		{name: "json empty is null", in: pipeline.JSON(nil), want: `null`},
		{
			name: "array nested",
			in: []any{int64(1), "x", nil, []any{true, pipeline.Decimal("1.5")}, two53 + 1,
				math.Inf(1), pipeline.JSON(`{"k":1}`), []byte("hi")},
			want: `[1,"x",null,[true,1.5],"9007199254740993","Infinity",{"k":1},"aGk="]`,
		},
		{name: "array empty", in: []any{}, want: `[]`},
		{name: "other types as text", in: uint8(7), want: `"7"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			prefix := []byte("prefix:")
			out := pipeline.AppendValue(prefix, tc.in)
			if !bytes.HasPrefix(out, []byte("prefix:")) {
				t.Fatalf("AppendValue clobbered dst: %q", out)
			}
			got := out[len("prefix:"):]
			if string(got) != tc.want {
				t.Errorf("AppendValue(%#v) = %s, want %s", tc.in, got, tc.want)
			}
			v := decodeJSON(t, got)
			if tc.str != nil {
				s, ok := v.(string)
				if !ok || s != *tc.str {
					t.Errorf("decoded %#v, want string %q", v, *tc.str)
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// TestAppendValueNumbersExact checks that every number AppendValue emits as a
// JSON number survives a float64 parse, which is what the 2^53 and
// 15-significant-digit rules are for.
func TestAppendValueNumbersExact(t *testing.T) {
	cases := []any{
		int64(1) << 53, -(int64(1) << 53), int64(123456789),
		pipeline.Decimal("999999999999999"), pipeline.Decimal("0.1"), pipeline.Decimal("-12345.6789"),
	}
	for _, in := range cases {
		out := pipeline.AppendValue(nil, in)
		var f float64
		if err := json.Unmarshal(out, &f); err != nil {
			t.Fatalf("AppendValue(%#v) = %s: not a JSON number: %v", in, out, err)
		}
		var n json.Number
		if err := json.Unmarshal(out, &n); err != nil {
			t.Fatal(err)
		}
		// Printing the float64 back with the text's own precision must give
		// the text back (a lossy value would differ).
		var want float64
		if err := json.Unmarshal([]byte(n.String()), &want); err != nil {
			t.Fatal(err)
		}
		if f != want {
			t.Errorf("%s parsed to %v, want %v", out, f, want)
		}
	}
}

func TestAppendEnvelope(t *testing.T) {
	rel := &pipeline.Relation{
		OID: 16384, Schema: "public", Table: "events",
		Columns: []pipeline.Column{
			{Name: "event_id", TypeOID: 25, Key: true},
			{Name: "room_id", TypeOID: 25},
			{Name: "content", TypeOID: 25},
			{Name: "depth", TypeOID: 20},
		},
		ReplicaIdentity: 'f',
	}
	commitTime := time.Date(2024, 11, 22, 8, 0, 0, 100_000_000, time.UTC)
	now := time.Date(2024, 11, 22, 8, 0, 0, 123_000_000, time.UTC)
	txn := &pipeline.TxnInfo{Xid: 1234, CommitLSN: 23456789, EndLSN: 23456900, CommitTime: commitTime, PrevEndLSN: 23456600}
	full := pipeline.Tuple{{Value: "$e1"}, {Value: "!r1"}, {Value: "hello"}, {Value: int64(7)}}

	cases := []struct {
		name          string
		op            pipeline.Op
		before, after pipeline.Tuple
		seq           uint32
		dco           int
		wantBefore    map[string]any // nil: JSON null
		wantAfter     map[string]any
		wantUnchanged []any // nil: key absent
		wantSnapshot  string
		mark          pipeline.SnapshotMark
	}{
		{
			name:   "update with unchanged TOAST column and absent old column",
			op:     pipeline.OpUpdate,
			before: pipeline.Tuple{{Value: "$e1"}, {Value: "!r1"}, {Absent: true}, {Value: int64(6)}},
			after:  pipeline.Tuple{{Value: "$e1"}, {Value: "!r1"}, {Unchanged: true}, {Value: int64(7)}},
			seq:    2, dco: 2,
			wantBefore:    map[string]any{"event_id": "$e1", "room_id": "!r1", "depth": json.Number("6")},
			wantAfter:     map[string]any{"event_id": "$e1", "room_id": "!r1", "depth": json.Number("7")},
			wantUnchanged: []any{"content"},
			wantSnapshot:  "false",
		},
		{
			name: "insert", op: pipeline.OpCreate, after: full, seq: 0, dco: 1,
			wantAfter:    map[string]any{"event_id": "$e1", "room_id": "!r1", "content": "hello", "depth": json.Number("7")},
			wantSnapshot: "false",
		},
		{
			name: "delete with key-only old image", op: pipeline.OpDelete,
			before: pipeline.Tuple{{Value: "$e1"}, {Absent: true}, {Absent: true}, {Absent: true}},
			seq:    5, dco: 3,
			wantBefore:   map[string]any{"event_id": "$e1"},
			wantSnapshot: "false",
		},
		{
			name: "snapshot read", op: pipeline.OpRead, after: full, seq: 0, dco: 1, mark: pipeline.SnapshotRow,
			wantAfter:    map[string]any{"event_id": "$e1", "room_id": "!r1", "content": "hello", "depth": json.Number("7")},
			wantSnapshot: "true",
		},
		{
			name: "first snapshot read", op: pipeline.OpRead, after: full, seq: 0, dco: 1, mark: pipeline.SnapshotFirst,
			wantAfter:    map[string]any{"event_id": "$e1", "room_id": "!r1", "content": "hello", "depth": json.Number("7")},
			wantSnapshot: "first",
		},
		{
			name: "last snapshot read", op: pipeline.OpRead, after: full, seq: 0, dco: 1, mark: pipeline.SnapshotLast,
			wantAfter:    map[string]any{"event_id": "$e1", "room_id": "!r1", "content": "hello", "depth": json.Number("7")},
			wantSnapshot: "last",
		},
		{
			name: "null value is present as null", op: pipeline.OpCreate,
			after: pipeline.Tuple{{Value: "$e1"}, {Value: nil}, {Value: "x"}, {Value: nil}},
			seq:   1, dco: 1,
			wantAfter:    map[string]any{"event_id": "$e1", "room_id": nil, "content": "x", "depth": nil},
			wantSnapshot: "false",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ch := &pipeline.Change{Op: tc.op, Rel: rel, Before: tc.before, After: tc.after, WALLSN: 23456700, Snapshot: tc.mark}
			pos := pipeline.Position{CommitLSN: txn.CommitLSN, Seq: tc.seq}
			out := pipeline.AppendEnvelope(nil, pipeline.EnvelopeSource{Name: "tm", Database: "app", Version: "1.2.3"},
				txn, ch, tc.op, tc.before, tc.after, pos, tc.dco, now)
			env, ok := decodeJSON(t, out).(map[string]any)
			if !ok {
				t.Fatalf("envelope is not an object: %s", out)
			}
			checkImage(t, "before", env, tc.wantBefore)
			checkImage(t, "after", env, tc.wantAfter)
			if u, ok := env["unchanged"]; tc.wantUnchanged == nil && ok {
				t.Errorf("unchanged = %v, want absent", u)
			} else if tc.wantUnchanged != nil && !jsonEqual(u, tc.wantUnchanged) {
				t.Errorf("unchanged = %v, want %v", u, tc.wantUnchanged)
			}
			want := map[string]any{
				"op":    string(rune(tc.op)),
				"ts_ms": json.Number("1732262400123"),
				"ts_us": json.Number("1732262400123000"),
				"ts_ns": json.Number("1732262400123000000"),
				"source": map[string]any{
					"version": "1.2.3", "connector": "tidemark", "name": "tm", "db": "app", "schema": "public", "table": "events",
					"txId": json.Number("1234"), "lsn": json.Number("23456700"), "xmin": nil,
					"sequence": `["23456600","23456700"]`,
					"ts_ms":    json.Number("1732262400100"), "ts_us": json.Number("1732262400100000"),
					"ts_ns": json.Number("1732262400100000000"), "snapshot": tc.wantSnapshot,
					"commit_lsn": json.Number("23456789"),
				},
				"transaction": map[string]any{
					"id":                    "1234:23456789",
					"total_order":           json.Number(strconv.Itoa(int(tc.seq) + 1)),
					"data_collection_order": json.Number(strconv.Itoa(tc.dco)),
				},
			}
			for k, w := range want {
				if g := env[k]; !jsonEqual(g, w) {
					t.Errorf("%s = %#v, want %#v", k, g, w)
				}
			}
			// The sequence is itself JSON: two decimal LSN strings, the
			// second being the change's LSN reported in source.lsn.
			var seqArr []string
			src := env["source"].(map[string]any)
			if s, ok := src["sequence"].(string); !ok || json.Unmarshal([]byte(s), &seqArr) != nil || len(seqArr) != 2 ||
				seqArr[1] != "23456700" {
				t.Errorf("source.sequence = %#v, want a JSON array of two LSN strings ending in the change's LSN", src["sequence"])
			}
			if len(src) != 15 {
				t.Errorf("source has %d fields, want 15: %v", len(src), src)
			}
			allowed := map[string]bool{"before": true, "after": true, "unchanged": true, "op": true, "ts_ms": true,
				"ts_us": true, "ts_ns": true, "source": true, "transaction": true}
			for k := range env {
				if !allowed[k] {
					t.Errorf("unexpected top-level field %q", k)
				}
			}
		})
	}
}

func checkImage(t *testing.T, name string, env map[string]any, want map[string]any) {
	t.Helper()
	got, present := env[name]
	if !present {
		t.Errorf("%s missing from envelope", name)
		return
	}
	if want == nil {
		if got != nil {
			t.Errorf("%s = %v, want null", name, got)
		}
		return
	}
	m, ok := got.(map[string]any)
	if !ok {
		t.Errorf("%s = %#v, want an object", name, got)
		return
	}
	if !jsonEqual(m, want) {
		t.Errorf("%s = %#v, want %#v", name, m, want)
	}
}

func jsonEqual(a, b any) bool {
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && bytes.Equal(ja, jb)
}

func TestAppendKey(t *testing.T) {
	rel := &pipeline.Relation{Schema: "public", Table: "t", Columns: []pipeline.Column{
		{Name: "a"}, {Name: "k2", Key: true}, {Name: "b"}, {Name: "k1", Key: true},
	}}
	cases := []struct {
		name   string
		tuple  pipeline.Tuple
		cols   []int
		want   string
		wantOK bool
	}{
		{"column order", pipeline.Tuple{{Value: "x"}, {Value: "y"}, {Value: "z"}, {Value: int64(5)}}, []int{1, 3}, `{"k2":"y","k1":5}`, true},
		{"single", pipeline.Tuple{{Value: "x"}, {Value: "y"}, {Value: "z"}, {Value: int64(5)}}, []int{0}, `{"a":"x"}`, true},
		{"absent", pipeline.Tuple{{Absent: true}, {Value: "y"}, {Absent: true}, {Value: int64(5)}}, []int{0}, "", false},
		{"unchanged", pipeline.Tuple{{Value: "x"}, {Unchanged: true}, {Value: "z"}, {Value: int64(5)}}, []int{1, 3}, "", false},
		{"short tuple", pipeline.Tuple{{Value: "x"}}, []int{3}, "", false},
		{"nil tuple", nil, []int{1}, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := pipeline.AppendKey(nil, rel, tc.tuple, tc.cols)
			if ok != tc.wantOK {
				t.Fatalf("ok = %v, want %v", ok, tc.wantOK)
			}
			if ok && string(got) != tc.want {
				t.Errorf("key = %s, want %s", got, tc.want)
			}
		})
	}
}

// jsonStringWant is what AppendJSONString's output must decode to: s with each
// byte of invalid UTF-8 replaced by U+FFFD (encoding/json's own rule).
func jsonStringWant(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		b.WriteRune(r) // RuneError for an invalid byte
		i += n
	}
	return b.String()
}

func FuzzAppendJSONString(f *testing.F) {
	for _, s := range []string{
		"", "plain", `"quoted"`, `back\slash`, "\x00\x1f\x7f", "\n\r\t\b\f", "\u2028\u2029",
		"héllo 🌊", "\xff", "a\xe2\x82", "\xed\xa0\x80", "\ufffd", "<script>&</script>",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out := pipeline.AppendJSONString([]byte("x"), s)
		if out[0] != 'x' {
			t.Fatalf("dst prefix clobbered: %q", out)
		}
		out = out[1:]
		if !json.Valid(out) {
			t.Fatalf("AppendJSONString(%q) = %q: invalid JSON", s, out)
		}
		if bytes.Contains(out, []byte("\u2028")) || bytes.Contains(out, []byte("\u2029")) {
			t.Errorf("AppendJSONString(%q) = %q: raw U+2028/U+2029 left in output", s, out)
		}
		var got string
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("AppendJSONString(%q) = %q: %v", s, out, err)
		}
		if want := jsonStringWant(s); got != want {
			t.Errorf("AppendJSONString(%q) decodes to %q, want %q", s, got, want)
		}
	})
}

// FuzzAppendEnvelopeValues: an envelope over arbitrary column values (every
// scalar kind of the value set, and arrays of them) is always valid JSON.
func FuzzAppendEnvelopeValues(f *testing.F) {
	f.Add(int64(1)<<60, 3.25, "héllo\x00\"", []byte{0xff, 0}, "12.5", true)
	f.Add(int64(-1), math.Inf(1), "\u2028", []byte(nil), "NaN", false)
	f.Add(int64(0), math.NaN(), "\xc3\x28", []byte("x"), "007", true)
	f.Fuzz(func(t *testing.T, i int64, fl float64, s string, b []byte, dec string, bo bool) {
		rel := &pipeline.Relation{Schema: "public", Table: "t", Columns: []pipeline.Column{
			{Name: "i", Key: true}, {Name: "f"}, {Name: s}, {Name: "b"}, {Name: "n"}, {Name: "bo"}, {Name: "arr"}, {Name: "j"}, {Name: "ts"}}}
		after := pipeline.Tuple{{Value: i}, {Value: fl}, {Value: s}, {Value: b}, {Value: pipeline.Decimal(dec)}, {Value: bo},
			{Value: []any{i, fl, s, b, nil, []any{pipeline.Decimal(dec)}}}, {Value: pipeline.JSON(`{"k":1}`)}, {Value: time.Unix(i%1e10, 0)}}
		ch := &pipeline.Change{Op: pipeline.OpUpdate, Rel: rel, After: after, Before: pipeline.Tuple{{Value: i}, {Absent: true}, {Unchanged: true},
			{Absent: true}, {Absent: true}, {Absent: true}, {Absent: true}, {Absent: true}, {Absent: true}}}
		txn := &pipeline.TxnInfo{Xid: 7, CommitLSN: 99, CommitTime: time.Unix(0, 0)}
		out := pipeline.AppendEnvelope(nil, pipeline.EnvelopeSource{Name: s, Database: s}, txn, ch, pipeline.OpUpdate, ch.Before, ch.After, pipeline.Position{CommitLSN: 99}, 1, time.Unix(0, 0))
		if !json.Valid(out) {
			t.Fatalf("invalid JSON: %s", out)
		}
		key, ok := pipeline.AppendKey(nil, rel, after, []int{0, 2})
		if !ok || !json.Valid(key) {
			t.Fatalf("invalid key: %s", key)
		}
	})
}
