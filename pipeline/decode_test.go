package pipeline

import (
	"bytes"
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

// Consumer-side parsing (ParseEnvelope, ParseTxnRecord) against what the
// producer side writes. These tests are internal so that they can drive the
// real encoder the way the run loop does (Pipeline.handle): the BEGIN
// record, every change through Router.encodeChange, the END record.

var (
	decodeNow  = time.Date(2024, 11, 22, 8, 0, 1, 0, time.UTC)
	decodeTxn1 = &TxnInfo{Xid: 507, CommitLSN: 7000, EndLSN: 7008, CommitTime: time.Date(2024, 11, 22, 8, 0, 0, 507_000_000, time.UTC)}

	decEvents = &Relation{OID: 1, Schema: "public", Table: "events", ReplicaIdentity: 'f',
		Columns: []Column{{Name: "event_id", TypeOID: 25, Key: true}, {Name: "room_id", TypeOID: 25}, {Name: "content", TypeOID: 25}}}
	decMembers = &Relation{OID: 2, Schema: "public", Table: "room_memberships", ReplicaIdentity: 'f',
		Columns: []Column{{Name: "membership", TypeOID: 25}, {Name: "user_id", TypeOID: 25, Key: true}, {Name: "room_id", TypeOID: 25, Key: true}}}
	decTyped = &Relation{OID: 3, Schema: "app", Table: "typed", ReplicaIdentity: 'd',
		Columns: []Column{{Name: "id", TypeOID: 20, Key: true}, {Name: "n", TypeOID: 1700}, {Name: "j", TypeOID: 3802},
			{Name: "b", TypeOID: 17}, {Name: "ts", TypeOID: 1184}, {Name: "arr", TypeOID: 1007}, {Name: "big", TypeOID: 25}}}
)

func textRow(vals ...string) Tuple {
	t := make(Tuple, len(vals))
	for i, v := range vals {
		t[i] = Datum{Text: v, IsText: true}
	}
	return t
}

// decodeChanges has every op the encoder writes, over text and typed
// columns, an unchanged TOAST column and an old-key image.
func decodeChanges() []Change {
	typed := Tuple{{Int: 1 << 60, IsInt: true}, {Value: Decimal("12.50")}, {Value: JSON(`{"k":[1,"<x>"]}`)},
		{Value: []byte{0, 0xff}}, {Value: time.Date(2024, 1, 2, 3, 4, 5, 6000, time.UTC)},
		{Value: []any{int64(1), nil, int64(3)}}, {Unchanged: true}}
	return []Change{
		{Op: OpCreate, Rel: decEvents, After: textRow("$1", "!a", "héllo \"quoted\"\n")},
		{Op: OpUpdate, Rel: decEvents, Before: textRow("$1", "!a", "héllo \"quoted\"\n"), After: textRow("$1", "!a", "edited")},
		{Op: OpUpdate, Rel: decEvents, Before: textRow("$1", "!a", "edited"), After: textRow("$2", "!a", "re-keyed")}, // split: d + c
		{Op: OpDelete, Rel: decEvents, Before: textRow("$2", "!a", "re-keyed")},
		{Op: OpUpdate, Rel: decTyped, Before: Tuple{{Int: 1 << 60, IsInt: true}, {Absent: true}, {Absent: true}, {Absent: true}, {Absent: true}, {Absent: true}, {Absent: true}},
			After: typed},
		{Op: OpCreate, Rel: decMembers, After: textRow("join", "@u:x", "!a")},
		{Op: OpRead, Rel: decTyped, After: typed},
		{Op: OpTruncate, Rel: decMembers},
	}
}

// encodeTxn encodes one transaction as the run loop does: its BEGIN
// record, its changes' messages (table topics and the rooms entity
// stream), its END record.
func encodeTxn(tb testing.TB, info *TxnInfo, changes []Change) (begin Message, msgs []Message, end Message) {
	tb.Helper()
	r := NewRouter(RouterConfig{TopicPrefix: "tm", Database: "app", TableTopics: true, TransactionsTopic: true,
		EntityStreams: []EntityStream{{Name: "rooms", Key: "room_id", Tables: []string{"public.events", "public.room_memberships"}}}})
	st := &txnState{info: info}
	begin = r.txnRecord(st, false)
	for i := range changes {
		var err error
		if msgs, err = r.encodeChange(msgs, st, &changes[i], decodeNow); err != nil {
			tb.Fatal(err)
		}
	}
	return begin, msgs, r.txnRecord(st, true)
}

func msgHeader(m Message, key string) string {
	for _, h := range m.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// editJSON decodes b (numbers kept exact), lets edit change it and
// encodes it again.
func editJSON(tb testing.TB, b []byte, edit func(m map[string]any)) []byte {
	tb.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		tb.Fatal(err)
	}
	edit(m)
	out, err := json.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

func sub(m map[string]any, k string) map[string]any { return m[k].(map[string]any) }

func TestParseEnvelope(t *testing.T) {
	_, msgs, _ := encodeTxn(t, decodeTxn1, decodeChanges())
	valid := msgs[0].Value // a create on public.events
	set := func(path string, v any) []byte {
		return editJSON(t, valid, func(m map[string]any) {
			keys := strings.Split(path, ".")
			for _, k := range keys[:len(keys)-1] {
				m = sub(m, k)
			}
			if v == nil {
				delete(m, keys[len(keys)-1])
			} else {
				m[keys[len(keys)-1]] = v
			}
		})
	}
	del := func(path string) []byte { return set(path, nil) }
	rejects := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"not JSON", valid[:len(valid)-1], "envelope is not valid JSON"},
		{"empty", nil, "envelope is not valid JSON"},
		{"trailing garbage", append(append([]byte(nil), valid...), '}'), "envelope is not valid JSON"},
		{"array", []byte(`[1]`), "envelope is not a JSON object (got array)"},
		{"null", []byte(`null`), "envelope is not a JSON object"},
		{"no op", del("op"), "envelope lacks op"},
		{"empty op", set("op", ""), "envelope lacks op"},
		{"unknown op", set("op", "x"), `envelope has unknown op "x"`},
		{"op in capitals", set("op", "C"), `envelope has unknown op "C"`},
		{"two-letter op", set("op", "cu"), `envelope has unknown op "cu"`},
		{"op not a string", set("op", 1), "envelope field op: got number, want a string"},
		{"no source", del("source"), "envelope has no source block"},
		{"null source", set("source", json.RawMessage(`null`)), "envelope has no source block"},
		{"empty source", set("source", map[string]any{}), "envelope has no source block"},
		{"source not an object", set("source", "public.events"), "envelope field source: got string, want an object"},
		{"no source.schema", del("source.schema"), "envelope lacks source.schema"},
		{"empty source.schema", set("source.schema", ""), "envelope lacks source.schema"},
		{"no source.table", del("source.table"), "envelope lacks source.table"},
		{"empty source.table", set("source.table", ""), "envelope lacks source.table"},
		{"no source.commit_lsn nor source.lsn", editJSON(t, del("source.commit_lsn"), func(m map[string]any) { delete(sub(m, "source"), "lsn") }),
			"source.commit_lsn (the commit LSN) is missing or 0"},
		{"source.commit_lsn and source.lsn 0", editJSON(t, set("source.commit_lsn", 0), func(m map[string]any) { sub(m, "source")["lsn"] = 0 }),
			"source.commit_lsn (the commit LSN) is missing or 0"},
		{"an older record (no commit_lsn) whose source.lsn is not the transaction's", editJSON(t, del("source.commit_lsn"), func(m map[string]any) { sub(m, "source")["lsn"] = 6999 }),
			`names commit LSN 7000, the record says 6999`},
		{"negative source.lsn", set("source.lsn", -7000), "envelope field source.lsn: got number -7000, want an integer from 0 to 18446744073709551615"},
		{"fractional source.lsn", set("source.lsn", 7000.5), "envelope field source.lsn: got number 7000.5, want an integer"},
		{"source.lsn beyond uint64", set("source.lsn", json.Number("18446744073709551616")), "envelope field source.lsn: got number 18446744073709551616, want an integer"},
		{"source.lsn as a string", set("source.lsn", "7000"), "envelope field source.lsn: got string, want an integer"},
		{"source.txId beyond uint32", set("source.txId", json.Number("4294967296")), "envelope field source.txId: got number 4294967296, want an integer from 0 to 4294967295"},
		{"no transaction", del("transaction"), "transaction.total_order is missing or 0"},
		{"no transaction.total_order", del("transaction.total_order"), "transaction.total_order is missing or 0"},
		{"transaction.total_order 0", set("transaction.total_order", 0), "transaction.total_order is missing or 0"},
		{"transaction.total_order beyond uint32", set("transaction.total_order", json.Number("4294967296")), "envelope field transaction.total_order: got number 4294967296, want an integer from 0 to 4294967295"},
		{"transaction.id of another commit", set("transaction.id", "507:7001"), `envelope transaction.id: "507:7001" names commit LSN 7001, the record says 7000`},
		{"transaction.id of another xid", set("transaction.id", "508:7000"), `envelope transaction.id: "508:7000" names txId 508, the record says 507`},
		{"transaction.id not txId:lsn", set("transaction.id", "7000"), `envelope transaction.id: "7000" is not txId:lsn`},
		{"before not an object", set("before", 5), "envelope field before: got number, want an object"},
		{"unchanged not a list", set("unchanged", "content"), "envelope field unchanged: got string, want an array"},
	}
	for _, tc := range rejects {
		t.Run(tc.name, func(t *testing.T) {
			e, err := ParseEnvelope(tc.in)
			if err == nil {
				t.Fatalf("accepted %s as %+v", tc.in, e)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %q, want it to contain %q (input %s)", err, tc.wantErr, tc.in)
			}
		})
	}

	// Every op the encoder writes, and the minimal envelope hand-built by
	// consumer tests (no transaction.id, no source.name/db/ts_ms).
	accepts := map[string][]byte{
		"minimal":                            []byte(`{"before":null,"after":{"k":1},"op":"c","source":{"schema":"public","table":"t","lsn":100},"transaction":{"total_order":1}}`),
		"transaction.id without source.txId": []byte(`{"op":"d","before":{"k":1},"source":{"schema":"s","table":"t","lsn":100},"transaction":{"id":"9:100","total_order":3}}`),
	}
	ops := map[string]bool{}
	for _, m := range msgs {
		op := msgHeader(m, "tidemark-op")
		if !ops[op] {
			ops[op] = true
			accepts["op "+op] = m.Value
		}
	}
	if len(ops) != 5 {
		t.Fatalf("the encoder wrote ops %v, want all five", ops)
	}
	for name, in := range accepts {
		if _, err := ParseEnvelope(in); err != nil {
			t.Errorf("%s: %v: %s", name, err, in)
		}
	}
}

// TestParseEnvelopeRoundTrip: every envelope the encoder writes parses back
// to what was encoded.
func TestParseEnvelopeRoundTrip(t *testing.T) {
	_, msgs, _ := encodeTxn(t, decodeTxn1, decodeChanges())
	for _, m := range msgs {
		e, err := ParseEnvelope(m.Value)
		if err != nil {
			t.Fatalf("%s: %v: %s", m.Topic, err, m.Value)
		}
		if e.Position() != m.Pos || e.Table() != msgHeader(m, "tidemark-table") || e.Op != msgHeader(m, "tidemark-op") {
			t.Errorf("parsed position %s, table %s, op %s; the message says %s, %s, %s",
				e.Position(), e.Table(), e.Op, m.Pos, msgHeader(m, "tidemark-table"), msgHeader(m, "tidemark-op"))
		}
		if e.Source.TxID != decodeTxn1.Xid || e.Transaction.ID != decodeTxn1.ID() || e.Source.TsMs != decodeTxn1.CommitTime.UnixMilli() ||
			e.Source.Name != "tm" || e.Source.DB != "app" || e.TsMs != decodeNow.UnixMilli() {
			t.Errorf("parsed source %+v, transaction %+v, ts_ms %d", e.Source, e.Transaction, e.TsMs)
		}
		var whole map[string]json.RawMessage
		if err := json.Unmarshal(m.Value, &whole); err != nil {
			t.Fatal(err)
		}
		for _, img := range []struct {
			name string
			got  map[string]json.RawMessage
		}{{"before", e.Before}, {"after", e.After}} {
			if g, w := jsonOf(t, img.got), jsonOf(t, whole[img.name]); !reflect.DeepEqual(g, w) {
				t.Errorf("%s %s: parsed %v, encoded %v", e.Op, img.name, g, w)
			}
		}
		if e.Op == "u" && e.Table() == "app.typed" && !reflect.DeepEqual(e.Unchanged, []string{"big"}) {
			t.Errorf("unchanged %v, want [big]", e.Unchanged)
		}
	}
}

// jsonOf decodes v's JSON form with exact numbers, for comparing.
func jsonOf(tb testing.TB, v any) any {
	tb.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var out any
	if err := dec.Decode(&out); err != nil {
		tb.Fatal(err)
	}
	return out
}

// FuzzParseEnvelope: ParseEnvelope never panics, and what it accepts is a
// self-consistent envelope: a known op, a table, a position, and its JSON
// form parses back to the same envelope.
func FuzzParseEnvelope(f *testing.F) {
	_, msgs, _ := encodeTxn(f, decodeTxn1, decodeChanges())
	for _, m := range msgs {
		f.Add(m.Value)
	}
	f.Add([]byte(`{"op":"c","source":{"schema":"s","table":"t","lsn":1},"transaction":{"id":"0:1","total_order":1}}`))
	f.Add([]byte(`{"op":"c","source":{"schema":"s","table":"t","lsn":-1},"transaction":{"total_order":1}}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := ParseEnvelope(b)
		if err != nil {
			if e != nil {
				t.Fatalf("error %v with an envelope", err)
			}
			return
		}
		if !validOp(e.Op) || e.Source.Schema == "" || e.Source.Table == "" || e.Position().CommitLSN == 0 ||
			e.Position().Seq != e.Transaction.TotalOrder-1 || e.Transaction.TotalOrder == 0 {
			t.Fatalf("accepted %s as %+v", b, e)
		}
		again, err := json.Marshal(e)
		if err != nil {
			t.Fatalf("accepted %s, but its parse does not encode: %v", b, err)
		}
		e2, err := ParseEnvelope(again)
		if err != nil {
			t.Fatalf("accepted %s, but not its re-encoding %s: %v", b, again, err)
		}
		if !reflect.DeepEqual(jsonOf(t, e), jsonOf(t, e2)) || e2.Position() != e.Position() || e2.Table() != e.Table() {
			t.Fatalf("%s parses to %+v, its re-encoding %s to %+v", b, e, again, e2)
		}
	})
}

func TestParseTxnRecord(t *testing.T) {
	begin, msgs, end := encodeTxn(t, decodeTxn1, decodeChanges())
	set := func(k string, v any) []byte {
		return editJSON(t, end.Value, func(m map[string]any) {
			if v == nil {
				delete(m, k)
			} else {
				m[k] = v
			}
		})
	}
	dcs := func(js string) []byte { return set("data_collections", json.RawMessage(js)) }
	var long []string
	for _, c := range "abcdefghij" {
		long = append(long, `{"data_collection":"s.`+string(c)+`","event_count":1}`)
	}
	long = append(long, `{"data_collection":"s.c","event_count":1}`)
	rejects := []struct {
		name    string
		in      []byte
		wantErr string
	}{
		{"not JSON", end.Value[:len(end.Value)-1], "transaction record is not valid JSON"},
		{"empty", nil, "transaction record is not valid JSON"},
		{"array", []byte(`[]`), "transaction record is not a JSON object (got array)"},
		{"null", []byte(`null`), "transaction record is not a JSON object"},
		{"no status", set("status", nil), "transaction record lacks status"},
		{"unknown status", set("status", "COMMIT"), `transaction record has unknown status "COMMIT"`},
		{"status in lower case", set("status", "end"), `transaction record has unknown status "end"`},
		{"status not a string", set("status", true), "transaction record field status: got bool, want a string"},
		{"no lsn", set("lsn", nil), "END record lacks its position: lsn (the commit LSN) is missing or 0"},
		{"BEGIN without lsn", editJSON(t, begin.Value, func(m map[string]any) { delete(m, "lsn") }), "BEGIN record lacks its position"},
		{"lsn 0", set("lsn", 0), "lsn (the commit LSN) is missing or 0"},
		{"negative lsn", set("lsn", -7000), "transaction record field lsn: got number -7000, want an integer from 0"},
		{"lsn as a string", set("lsn", "7000"), "transaction record field lsn: got string, want an integer"},
		{"id of another commit", set("id", "507:7001"), `END record at lsn 7000: id "507:7001" names commit LSN 7001`},
		{"id of another xid", set("id", "1:7000"), `END record at lsn 7000: id "1:7000" names txId 1, the record says 507`},
		{"id not txId:lsn", set("id", "x"), `id "x" is not txId:lsn`},
		{"END without data_collections", set("data_collections", nil), "END record at lsn 7000 lacks data_collections"},
		{"END with null data_collections", dcs(`null`), "END record at lsn 7000 lacks data_collections"},
		{"data_collections not a list", dcs(`{"public.events":3}`), "transaction record field data_collections: got object, want an array"},
		{"table without a name", dcs(`[{"event_count":1}]`), "data_collections[0] lacks data_collection"},
		{"negative table count", dcs(`[{"data_collection":"public.events","event_count":-1}]`), "data_collections[0] (public.events) has event_count -1, want 0 to 4294967295"},
		{"table count beyond uint32", dcs(`[{"data_collection":"public.events","event_count":4294967296}]`), "has event_count 4294967296"},
		{"table listed twice", dcs(`[{"data_collection":"public.events","event_count":1},{"data_collection":"public.events","event_count":1}]`), `lists data_collection "public.events" twice`},
		{"table listed twice in a long list", editJSON(t, end.Value, func(m map[string]any) {
			m["data_collections"], m["event_count"] = json.RawMessage("["+strings.Join(long, ",")+"]"), len(long)
		}), `lists data_collection "s.c" twice`},
		{"event_count disagrees", set("event_count", 3), "END record at lsn 7000: event_count 3, but data_collections count 9"},
		{"negative event_count", set("event_count", -1), "transaction record field event_count: got number -1, want an integer from 0 to 4294967295"},
	}
	for _, tc := range rejects {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ParseTxnRecord(tc.in)
			if err == nil {
				t.Fatalf("accepted %s as %+v", tc.in, r)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %q, want it to contain %q (input %s)", err, tc.wantErr, tc.in)
			}
			if !reflect.DeepEqual(r, TxnRecord{}) {
				t.Errorf("error with a record: %+v", r)
			}
		})
	}

	// What the encoder writes: the BEGIN and END of a transaction (the END
	// counts each table's changes once, not once per topic), the END of a
	// transaction without changes; and the END hand-built by consumer tests.
	b, err := ParseTxnRecord(begin.Value)
	if err != nil || b.IsEnd() || b.Status != "BEGIN" || b.LSN != 7000 || b.TxID != 507 || b.ID != "507:7000" ||
		b.TsMs != decodeTxn1.CommitTime.UnixMilli() || b.EventCount != nil || b.DataCollections != nil {
		t.Errorf("BEGIN %s parses to %+v, %v", begin.Value, b, err)
	}
	e, err := ParseTxnRecord(end.Value)
	if err != nil {
		t.Fatalf("END %s: %v", end.Value, err)
	}
	seen := map[string]map[Position]bool{}
	for _, m := range msgs {
		tbl := msgHeader(m, "tidemark-table")
		if seen[tbl] == nil {
			seen[tbl] = map[Position]bool{}
		}
		seen[tbl][m.Pos] = true
	}
	got, want := map[string]int{}, map[string]int{}
	total := 0
	for tbl, ps := range seen {
		want[tbl] = len(ps)
		total += len(ps)
	}
	for _, dc := range e.DataCollections {
		got[dc.Table] = dc.Count
	}
	if !e.IsEnd() || e.LSN != 7000 || e.EndLSN != 7008 || e.ID != "507:7000" || e.EventCount == nil || int(*e.EventCount) != total ||
		!reflect.DeepEqual(got, want) {
		t.Errorf("END %s parses to %+v (counts %v), want counts %v, %d in all", end.Value, e, got, want, total)
	}
	_, _, empty := encodeTxn(t, &TxnInfo{Xid: 9, CommitLSN: 9000, EndLSN: 9008, CommitTime: decodeNow}, nil)
	if e, err := ParseTxnRecord(empty.Value); err != nil || e.DataCollections == nil || len(e.DataCollections) != 0 || *e.EventCount != 0 {
		t.Errorf("END without changes %s parses to %+v, %v", empty.Value, e, err)
	}
	for _, minimal := range []string{
		`{"status":"END","lsn":10,"data_collections":[{"data_collection":"public.users","event_count":1}]}`,
		`{"status":"END","lsn":10,"data_collections":[{"data_collection":"public.users","event_count":0}]}`,
	} {
		if _, err := ParseTxnRecord([]byte(minimal)); err != nil {
			t.Errorf("%s: %v", minimal, err)
		}
	}
}

// FuzzParseTxnRecord: ParseTxnRecord never panics, and what it accepts
// keeps the record's rules (status, position, an END's counts) and parses
// back to itself from its JSON form.
func FuzzParseTxnRecord(f *testing.F) {
	begin, _, end := encodeTxn(f, decodeTxn1, decodeChanges())
	_, _, empty := encodeTxn(f, &TxnInfo{Xid: 9, CommitLSN: 9000, EndLSN: 9008, CommitTime: decodeNow}, nil)
	_, _, one := encodeTxn(f, &TxnInfo{Xid: 1, CommitLSN: 2, EndLSN: 3, CommitTime: time.Unix(0, 0)}, // short: mutations hit its counts
		[]Change{{Op: OpTruncate, Rel: &Relation{OID: 9, Schema: "s", Table: "t"}}})
	f.Add(begin.Value)
	f.Add(end.Value)
	f.Add(empty.Value)
	f.Add(one.Value)
	f.Add([]byte(`{"status":"END","lsn":10,"data_collections":[{"data_collection":"a","event_count":1},{"data_collection":"a","event_count":2}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseTxnRecord(b)
		if err != nil {
			return
		}
		if (r.Status != "BEGIN" && r.Status != "END") || r.LSN == 0 || checkTxnID(r.ID, r.TxID, r.LSN) != nil {
			t.Fatalf("accepted %s as %+v", b, r)
		}
		if r.IsEnd() {
			if r.DataCollections == nil {
				t.Fatalf("accepted END %s without data_collections", b)
			}
			tables, total := map[string]bool{}, uint64(0)
			for _, dc := range r.DataCollections {
				if dc.Table == "" || dc.Count < 0 || dc.Count > math.MaxUint32 || tables[dc.Table] {
					t.Fatalf("accepted END %s with table count %+v", b, dc)
				}
				tables[dc.Table] = true
				total += uint64(dc.Count)
			}
			if r.EventCount != nil && uint64(*r.EventCount) != total {
				t.Fatalf("accepted END %s: event_count %d, tables count %d", b, *r.EventCount, total)
			}
		}
		again, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		r2, err := ParseTxnRecord(again)
		if err != nil || !reflect.DeepEqual(r, r2) {
			t.Fatalf("%s parses to %+v; its re-encoding %s to %+v, %v", b, r, again, r2, err)
		}
	})
}

// TestParseEnvelopeOlderRecords: a record of Tidemark before commit_lsn
// existed (source.lsn was the commit LSN) keeps its position.
func TestParseEnvelopeOlderRecords(t *testing.T) {
	_, msgs, _ := encodeTxn(t, decodeTxn1, decodeChanges())
	old := editJSON(t, msgs[0].Value, func(m map[string]any) {
		src := sub(m, "source")
		src["lsn"] = src["commit_lsn"]
		delete(src, "commit_lsn")
	})
	e, err := ParseEnvelope(old)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := e.Position(), msgs[0].Pos; got != want {
		t.Errorf("position %s, want %s", got, want)
	}
}
