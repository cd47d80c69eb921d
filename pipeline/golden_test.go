package pipeline_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/golden")

// debeziumFields is the Debezium PostgreSQL connector's change-event value
// (JSON converter, schemas off, provide.transaction.metadata on), field by
// field with the JSON type each has, as its documentation shows it. Every
// record Tidemark writes for a row change must carry each of them with
// that type; "null|object" means either.
var debeziumFields = map[string]string{
	"before":                            "null|object",
	"after":                             "null|object",
	"op":                                "string",
	"ts_ms":                             "number",
	"ts_us":                             "number",
	"ts_ns":                             "number",
	"source.version":                    "string",
	"source.connector":                  "string",
	"source.name":                       "string",
	"source.ts_ms":                      "number",
	"source.ts_us":                      "number",
	"source.ts_ns":                      "number",
	"source.snapshot":                   "string",
	"source.db":                         "string",
	"source.sequence":                   "string",
	"source.schema":                     "string",
	"source.table":                      "string",
	"source.txId":                       "number",
	"source.lsn":                        "number",
	"source.xmin":                       "null",
	"transaction.id":                    "string",
	"transaction.total_order":           "number",
	"transaction.data_collection_order": "number",
}

// debeziumMessageFields is Debezium's op "m" record (a logical decoding
// message).
var debeziumMessageFields = map[string]string{
	"op": "string", "ts_ms": "number", "ts_us": "number", "ts_ns": "number",
	"source.version": "string", "source.connector": "string", "source.name": "string", "source.db": "string",
	"source.schema": "string", "source.table": "string", "source.txId": "number", "source.lsn": "number",
	"source.xmin": "null", "source.sequence": "string", "source.ts_ms": "number", "source.ts_us": "number",
	"source.ts_ns": "number", "source.snapshot": "string", "message": "object",
}

// tidemarkAdditions are the fields Tidemark adds (README: the field table).
var tidemarkAdditions = map[string]string{
	"unchanged":         "array",
	"source.commit_lsn": "number",
}

func jsonType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	case string:
		return "string"
	case json.Number:
		return "number"
	case bool:
		return "boolean"
	}
	return "?"
}

// flatten lists an envelope's fields by path, descending into source and
// transaction only (images are the table's columns).
func flatten(m map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok && (k == "source" || k == "transaction") {
			for k2, v2 := range sub {
				out[k+"."+k2] = v2
			}
			continue
		}
		out[k] = v
	}
	return out
}

// TestGoldenRecords writes one record per kind (c, u, d, r, t, a tombstone,
// a key change's two halves) and compares each with its golden file in
// testdata/golden (go test -run TestGoldenRecords -update rewrites them),
// then checks every Debezium field is present with Debezium's type and that
// nothing else is there but Tidemark's documented additions.
func TestGoldenRecords(t *testing.T) {
	rel := &pipeline.Relation{OID: 16385, Schema: "public", Table: "customers", ReplicaIdentity: 'd',
		Columns: []pipeline.Column{{Name: "id", Key: true}, {Name: "first_name"}, {Name: "email"}}}
	anne := pipeline.Tuple{{Value: int64(1)}, {Value: "Anne"}, {Value: "annek@noanswer.org"}}
	anneMarie := pipeline.Tuple{{Value: int64(1)}, {Value: "Anne Marie"}, {Unchanged: true}}
	key1 := pipeline.Tuple{{Value: int64(1)}, {Absent: true}, {Absent: true}}
	moved := pipeline.Tuple{{Value: int64(2)}, {Value: "Anne"}, {Value: "annek@noanswer.org"}}
	info := &pipeline.TxnInfo{Xid: 555, CommitLSN: 24023200, EndLSN: 24023248, PrevEndLSN: 24023119,
		CommitTime: time.Date(2019, 5, 28, 9, 38, 24, 863123000, time.UTC)}
	evs := []pipeline.Event{{Kind: pipeline.EventBegin, Txn: info}}
	for i, ch := range []pipeline.Change{
		{Op: pipeline.OpCreate, Rel: rel, After: anne},
		{Op: pipeline.OpUpdate, Rel: rel, After: anneMarie},
		{Op: pipeline.OpUpdate, Rel: rel, Before: key1, After: moved},
		{Op: pipeline.OpDelete, Rel: rel, Before: pipeline.Tuple{{Value: int64(2)}, {Absent: true}, {Absent: true}}},
		{Op: pipeline.OpTruncate, Rel: rel},
	} {
		ch.WALLSN = 24023128 + pipeline.LSN(i*8)
		evs = append(evs, pipeline.Event{Kind: pipeline.EventChange, Txn: info, Change: ch})
	}
	evs = append(evs, pipeline.Event{Kind: pipeline.EventChange, Txn: info, Change: pipeline.Change{Op: pipeline.OpMessage,
		WALLSN: 24023190, Message: &pipeline.LogicalMessage{Prefix: "outbox", Content: []byte("bar"), Transactional: true}}})
	evs = append(evs, pipeline.Event{Kind: pipeline.EventCommit, Txn: info})
	snapInfo := &pipeline.TxnInfo{Xid: 0, CommitLSN: 24023000, EndLSN: 24023000, CommitTime: info.CommitTime}
	snap := []pipeline.Event{{Kind: pipeline.EventBegin, Txn: snapInfo},
		{Kind: pipeline.EventChange, Txn: snapInfo, Change: pipeline.Change{Op: pipeline.OpRead, Rel: rel, After: anne,
			WALLSN: 24023000, Snapshot: pipeline.SnapshotRow}},
		{Kind: pipeline.EventCommit, Txn: snapInfo}}
	cfg := pipeline.Config{Router: pipeline.RouterConfig{TopicPrefix: "PostgreSQL_server", Database: "postgres",
		TableTopics: true, Tombstones: true, Version: "0.9.0"}}
	msgs, _, err := runAll(t, cfg, append(snap, evs...))
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"read", "create", "update_unchanged_toast", "keychange_delete", "keychange_tombstone",
		"keychange_create", "delete", "tombstone", "truncate", "message"}
	if len(msgs) != len(names) {
		t.Fatalf("%d records, want %d:\n%s", len(msgs), len(names), show(msgs))
	}
	for i, m := range msgs {
		name := names[i]
		var rec bytes.Buffer
		rec.WriteString("key: " + string(m.Key) + "\nheaders:\n")
		hs := make([]string, 0, len(m.Headers))
		for _, h := range m.Headers {
			hs = append(hs, "  "+h.Key+": "+string(h.Value))
		}
		sort.Strings(hs)
		rec.WriteString(strings.Join(hs, "\n") + "\nvalue:\n")
		if m.Value == nil {
			rec.WriteString("null\n")
		} else {
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, m.Value, "", "  "); err != nil {
				t.Fatalf("%s: %v: %s", name, err, m.Value)
			}
			rec.Write(pretty.Bytes())
			rec.WriteString("\n")
		}
		path := filepath.Join("testdata", "golden", name+".txt")
		if *updateGolden {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, rec.Bytes(), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v (run with -update to write it)", name, err)
		}
		if !bytes.Equal(want, rec.Bytes()) {
			t.Errorf("%s differs from %s:\n%s", name, path, rec.String())
		}
		if m.Value == nil {
			continue
		}
		env := flatten(decodeJSON(t, m.Value).(map[string]any))
		if name == "message" {
			// Debezium's message record: no images and no transaction
			// block, a message block, empty schema and table.
			fields := debeziumMessageFields
			for f, typ := range fields {
				if got := jsonType(env[f]); got != typ {
					t.Errorf("message: %s is %s, Debezium's is %s", f, got, typ)
				}
			}
			for f := range env {
				if _, ok := fields[f]; !ok && f != "source.commit_lsn" {
					t.Errorf("message: field %s is neither Debezium's nor a documented addition", f)
				}
			}
			if string(m.Key) != `{"prefix":"outbox"}` || env["message"].(map[string]any)["content"] != "YmFy" {
				t.Errorf("message: key %s, message %v", m.Key, env["message"])
			}
			continue
		}
		for f, typ := range debeziumFields {
			v, ok := env[f]
			if !ok {
				t.Errorf("%s: Debezium field %s missing", name, f)
			} else if got := jsonType(v); !strings.Contains("|"+typ+"|", "|"+got+"|") {
				t.Errorf("%s: %s is %s, Debezium's is %s", name, f, got, typ)
			}
		}
		for f, v := range env {
			if _, ok := debeziumFields[f]; ok {
				continue
			}
			if typ, ok := tidemarkAdditions[f]; !ok || jsonType(v) != typ {
				t.Errorf("%s: field %s (%s) is neither Debezium's nor a documented addition", name, f, jsonType(v))
			}
		}
		// Debezium's meanings: source.lsn is the change's own LSN, the
		// sequence ends with it and starts with the last commit's end.
		var seq []*string
		if err := json.Unmarshal([]byte(env["source.sequence"].(string)), &seq); err != nil || len(seq) != 2 || seq[1] == nil ||
			*seq[1] != string(env["source.lsn"].(json.Number)) {
			t.Errorf("%s: source.sequence %v does not end with source.lsn %v", name, env["source.sequence"], env["source.lsn"])
		}
		if name != "read" && (seq[0] == nil || *seq[0] != "24023119") {
			t.Errorf("%s: source.sequence starts with %v, want the previous commit's end 24023119", name, seq[0])
		}
	}
}
