package e2e

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
)

// TestCompactedTopicForgetsDeletedKeys (issue 17, acceptance 2): a table
// topic created with cleanup.policy=compact, after inserts, updates, key
// changes and deletes and a compaction, holds exactly the keys of the rows
// that exist, each with its current row. Without the tombstones that
// follow deletes, compaction keeps each deleted key's delete record.
func TestCompactedTopicForgetsDeletedKeys(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, pad text NOT NULL)`)
	cfg := e.config("compact", []string{"public.items"}, func(c *config.Config) {
		c.Kafka.TopicConfigs = map[string]string{"cleanup.policy": "compact", "delete.retention.ms": "0", "min.compaction.lag.ms": "0"}
	})
	r := e.start(cfg)
	defer r.stop(t)
	// Each statement is written on its own (the slot confirms it before
	// the next), so that it lands in batches of its own: compaction never
	// touches a partition's last batch, and the last transaction, updating
	// every row, makes everything before it cleanable.
	for _, sql := range []string{
		`INSERT INTO items SELECT g, 0, 'p' FROM generate_series(1, 300) g`,
		`UPDATE items SET v = v + 1 WHERE id % 3 = 0`,
		`DELETE FROM items WHERE id % 5 = 0`,
		`UPDATE items SET id = id + 1000 WHERE id % 7 = 0`, // key changes: old keys are gone
		`DELETE FROM items WHERE id BETWEEN 100 AND 120`,
		`INSERT INTO items VALUES (105, 42, 'back')`, // deleted, then back
		`UPDATE items SET v = v + 1000`,
	} {
		e.exec(sql)
		e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	}

	const topic = "compact.public.items"
	// (The broker's cleaner may have compacted some already.)
	before := len(e.readRaw(topic))
	e.kafka.Fake().Compact()
	recs := e.readRaw(topic)
	latest := map[string][]byte{}
	for _, rec := range recs {
		latest[string(rec.Key)] = rec.Value
	}
	want := map[string]string{}
	rows, err := e.pool.Query(t.Context(), `SELECT id, v FROM items`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id, v int
		if err := rows.Scan(&id, &v); err != nil {
			t.Fatal(err)
		}
		want[fmt.Sprintf(`{"id":%d}`, id)] = fmt.Sprint(v)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	var stale []string
	for k, v := range latest {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
			continue
		}
		var env envelope
		if err := json.Unmarshal(v, &env); err != nil || env.After == nil || string(env.After["v"]) != want[k] {
			t.Errorf("key %s: latest record %s, want v=%s", k, v, want[k])
		}
	}
	if len(stale) > 0 {
		t.Errorf("%d deleted keys are still in the compacted topic, e.g. %s", len(stale), strings.Join(stale[:min(5, len(stale))], " "))
	}
	for k := range want {
		if _, ok := latest[k]; !ok {
			t.Errorf("key %s of an existing row is missing from the compacted topic", k)
		}
	}
	t.Logf("%d records before compaction, %d after, %d rows", before, len(recs), len(want))
}

// TestFullIdentityFillsUnchangedToast: under REPLICA IDENTITY FULL, an
// update that leaves a TOASTed column alone still carries it in after
// (filled from before, as Debezium does), with no "unchanged" list.
func TestFullIdentityFillsUnchangedToast(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE docs (id int PRIMARY KEY, title text, body text)`)
	e.exec(`ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL`)
	e.exec(`CREATE TABLE docs_default (id int PRIMARY KEY, title text, body text)`)
	e.exec(`ALTER TABLE docs_default ALTER COLUMN body SET STORAGE EXTERNAL`)
	cfg := e.config("toast", []string{"public.docs", "public.docs_default"}, nil)
	e.exec(`ALTER TABLE docs REPLICA IDENTITY FULL`)
	r := e.start(cfg)
	defer r.stop(t)
	body := strings.Repeat("0123456789", 1000) // 10 kB: stored out of line
	e.exec(`INSERT INTO docs VALUES (1, 'a', $1)`, body)
	e.exec(`INSERT INTO docs_default VALUES (1, 'a', $1)`, body)
	e.exec(`UPDATE docs SET title = 'b'`)
	e.exec(`UPDATE docs_default SET title = 'b'`)
	ms := e.waitRecords("toast.public.docs", 2, 30*time.Second)
	u := ms[1].Env
	var got string
	if u.Op != "u" || json.Unmarshal(u.After["body"], &got) != nil || got != body || len(u.Unchanged) != 0 {
		t.Errorf("FULL: update after has body %d bytes, unchanged %v; want the whole body and no unchanged list", len(got), u.Unchanged)
	}
	// The premise: without FULL, Postgres leaves the body out.
	ms = e.waitRecords("toast.public.docs_default", 2, 30*time.Second)
	if d := ms[1].Env; d.Op != "u" || d.After["body"] != nil || len(d.Unchanged) != 1 || d.Unchanged[0] != "body" {
		t.Errorf("default identity: after %v, unchanged %v; want body absent and listed as unchanged", d.After, d.Unchanged)
	}
}

// TestLogicalMessagesPublished: with pipeline.messages, a transactional
// and a non-transactional pg_logical_emit_message reach <prefix>.message
// as op "m" records (key {"prefix":...}, content base64, the transactional
// one with its transaction's xid and commit LSN); Tidemark's own prefixes
// stay internal; the transaction's END record counts only its row
// changes; and the slot moves past both.
func TestLogicalMessagesPublished(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, pad text NOT NULL)`)
	cfg := e.config("msg", []string{"public.items"}, func(c *config.Config) { c.Pipeline.Messages = true })
	r := e.start(cfg)
	defer r.stop(t)
	e.exec(`BEGIN; INSERT INTO items VALUES (1, 1, 'x'); SELECT pg_logical_emit_message(true, 'outbox', 'order 1 placed'); COMMIT`)
	e.exec(`SELECT pg_logical_emit_message(false, 'audit', '\x00ff'::bytea)`)
	e.exec(`SELECT pg_logical_emit_message(false, 'tidemark.private', 'internal')`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	recs := e.readRaw("msg.message")
	if len(recs) != 2 {
		t.Fatalf("msg.message holds %d records, want 2: %v", len(recs), recs)
	}
	type rec struct {
		Op     string
		Source struct {
			TxID      *uint32 `json:"txId"`
			LSN       uint64  `json:"lsn"`
			CommitLSN uint64  `json:"commit_lsn"`
			Table     string  `json:"table"`
		}
		Message struct{ Prefix, Content string }
	}
	var got []rec
	for _, r := range recs {
		var m rec
		if err := json.Unmarshal(r.Value, &m); err != nil {
			t.Fatal(err)
		}
		if string(r.Key) != `{"prefix":"`+m.Message.Prefix+`"}` || r.Headers["tidemark-op"] != "m" {
			t.Errorf("key %s headers %v for prefix %s", r.Key, r.Headers, m.Message.Prefix)
		}
		got = append(got, m)
	}
	sortByPrefix := func(i int) int {
		if got[i].Message.Prefix == "outbox" {
			return 0
		}
		return 1
	}
	if sortByPrefix(0) == 1 {
		got[0], got[1] = got[1], got[0]
	}
	ins := e.read("msg.public.items")[0]
	if o := got[0]; o.Op != "m" || o.Message.Content != "b3JkZXIgMSBwbGFjZWQ=" || o.Source.TxID == nil || *o.Source.TxID != ins.Env.Source.TxID ||
		o.Source.CommitLSN != ins.Env.Source.CommitLSN || o.Source.LSN == 0 || o.Source.Table != "" {
		t.Errorf("transactional message: %+v (its transaction: xid %d, commit %d)", o, ins.Env.Source.TxID, ins.Env.Source.CommitLSN)
	}
	if a := got[1]; a.Message.Prefix != "audit" || a.Message.Content != "AP8=" || a.Source.TxID != nil || a.Source.CommitLSN != a.Source.LSN {
		t.Errorf("non-transactional message: %+v", a)
	}
	for _, tr := range e.readTxns("msg.transaction") {
		if tr.Status == "END" && (tr.EventCount == nil || *tr.EventCount != 1) {
			t.Errorf("END record counts %v changes, want 1 (the insert, not the message)", tr.EventCount)
		}
	}
}

// TestRowFilterConfigured: postgres.filters in the rules' expression
// language keeps redactions out of the events topic; an update into the
// filtered set is published as a delete, and the dropped changes are
// counted per table.
func TestRowFilterConfigured(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE events (event_id text PRIMARY KEY, type text NOT NULL, body text)`)
	e.exec(`ALTER TABLE events REPLICA IDENTITY FULL`)
	cfg := e.config("flt", []string{"public.events"}, func(c *config.Config) {
		c.Postgres.Filters = map[string]string{"public.events": "type <> 'm.room.redaction'"}
	})
	r := e.start(cfg)
	defer r.stop(t)
	e.exec(`INSERT INTO events VALUES ('$1', 'm.room.message', 'hi'), ('$2', 'm.room.redaction', NULL), ('$3', 'm.room.message', 'yo')`)
	e.exec(`UPDATE events SET type = 'm.room.redaction' WHERE event_id = '$3'`)
	e.exec(`UPDATE events SET body = 'x' WHERE event_id = '$2'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	var got []string
	for _, m := range e.read("flt.public.events") {
		got = append(got, m.Env.Op+string(m.Key))
	}
	sort.Strings(got)
	if want := `c{"event_id":"$1"} c{"event_id":"$3"} d{"event_id":"$3"}`; strings.Join(got, " ") != want {
		t.Errorf("published %v, want %s", got, want)
	}
	if f := r.Pipeline.Stats().Filtered(); f["public.events"] != 2 {
		t.Errorf("filtered %v, want public.events: 2", f)
	}
}

// TestDebeziumValueModes: with Debezium's representations selected, real
// Postgres values come out as Debezium writes them: json as a string,
// numerics as strings, int8 as a string, timestamps as epoch
// microseconds, time as microseconds since midnight, interval as
// microseconds (a month 30.4375 days), date as epoch days; each checked
// against Postgres' own arithmetic.
func TestDebeziumValueModes(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE vals (id int PRIMARY KEY, ts timestamptz, tsl timestamp, tod time, iv interval, d date,
		j jsonb, n numeric(10,2), i8 int8)`)
	cfg := e.config("modes", []string{"public.vals"}, func(c *config.Config) {
		c.Pipeline.JSONMode, c.Pipeline.DecimalMode, c.Pipeline.TimeMode, c.Pipeline.BigintMode = "string", "string", "micros", "string"
	})
	r := e.start(cfg)
	defer r.stop(t)
	e.exec(`INSERT INTO vals VALUES (1, '2024-03-01 12:34:56.123456+02', '1999-12-31 23:59:59.5', '13:14:15.25',
		'1 year 2 mons 3 days 04:05:06.5', '1960-06-15', '{"a": [1, 2]}', 12.5, 9007199254740993)`)
	ms := e.waitRecords("modes.public.vals", 1, 30*time.Second)
	var ts, tsl, tod, iv, d string
	if err := e.pool.QueryRow(t.Context(), `SELECT
		(extract(epoch FROM ts) * 1000000)::bigint::text, (extract(epoch FROM tsl) * 1000000)::bigint::text,
		(extract(epoch FROM tod) * 1000000)::bigint::text,
		round((extract(year FROM iv) * 12 + extract(month FROM iv)) * 30.4375 * 86400000000
			+ extract(day FROM iv) * 86400000000 + extract(epoch FROM (iv - date_trunc('day', iv))) * 1000000)::bigint::text,
		(d - DATE '1970-01-01')::text FROM vals`).Scan(&ts, &tsl, &tod, &iv, &d); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"ts": ts, "tsl": tsl, "tod": tod, "iv": iv, "d": d,
		"j": `"{\"a\": [1, 2]}"`, "n": `"12.50"`, "i8": `"9007199254740993"`}
	after := ms[0].Env.After
	for col, w := range want {
		if got := string(after[col]); got != w {
			t.Errorf("%s = %s, want %s", col, got, w)
		}
	}
}
