package pipeline_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

// show renders messages one per line: topic, key, op header (or
// "tombstone"), position and the key-change headers.
func show(msgs []pipeline.Message) string {
	var b strings.Builder
	for _, m := range msgs {
		op, _ := header(m, "tidemark-op")
		if m.Value == nil {
			op = "tombstone"
			if _, ok := header(m, "tidemark-op"); ok {
				op = "tombstone with an op header"
			}
		}
		b.WriteString(m.Topic + " " + string(m.Key) + " " + op + " " + m.Pos.String())
		if v, ok := header(m, "__debezium.oldkey"); ok {
			b.WriteString(" oldkey=" + v)
		}
		if v, ok := header(m, "__debezium.newkey"); ok {
			b.WriteString(" newkey=" + v)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// TestRouterTombstonesAndKeyChanges: with tombstones on, a delete on a
// table topic is followed by a tombstone (same key and position, null
// value, no op header); an entity stream gets none (its key is an
// entity). A key change carries Debezium's headers: the delete names the
// new key, the create the old one, each in its topic's key.
func TestRouterTombstonesAndKeyChanges(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{EntityStreams: []pipeline.EntityStream{roomsStream},
		TableTopics: true, Tombstones: true}}
	msgs, _, err := runAll(t, cfg, buildEvents(txnN(1,
		pipeline.Change{Op: pipeline.OpDelete, Rel: relMembers, Before: row("leave", "@u:x", "!a")},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relMembers, Before: row("join", "@v:x", "!a"), After: row("join", "@v:x", "!b")},
		pipeline.Change{Op: pipeline.OpDelete, Rel: relUsers, Before: keyRow(relUsers, "@w:x", nil)},
	)))
	if err != nil {
		t.Fatal(err)
	}
	got := show(changeMessages(msgs))
	want := `tm.rooms {"room_id":"!a"} d 1000:0
tm.public.room_memberships {"user_id":"@u:x","room_id":"!a"} d 1000:0
tm.public.room_memberships {"user_id":"@u:x","room_id":"!a"} tombstone 1000:0
tm.rooms {"room_id":"!a"} d 1000:1 newkey={"room_id":"!b"}
tm.public.room_memberships {"user_id":"@v:x","room_id":"!a"} d 1000:1 newkey={"user_id":"@v:x","room_id":"!b"}
tm.public.room_memberships {"user_id":"@v:x","room_id":"!a"} tombstone 1000:1
tm.rooms {"room_id":"!b"} c 1000:2 oldkey={"room_id":"!a"}
tm.public.room_memberships {"user_id":"@v:x","room_id":"!b"} c 1000:2 oldkey={"user_id":"@v:x","room_id":"!a"}
tm.public.users {"name":"@w:x"} d 1000:3
tm.public.users {"name":"@w:x"} tombstone 1000:3
`
	if got != want {
		t.Errorf("messages:\n%s\nwant:\n%s", got, want)
	}
	// The END record counts changes, not tombstones.
	for _, m := range msgs {
		if v, _ := header(m, "tidemark-status"); v == "END" && !strings.Contains(string(m.Value), `"event_count":4`) {
			t.Errorf("END record %s, want event_count 4", m.Value)
		}
	}

	cfg.Router.Tombstones = false
	msgs, _, err = runAll(t, cfg, buildEvents(txnN(1,
		pipeline.Change{Op: pipeline.OpDelete, Rel: relUsers, Before: keyRow(relUsers, "@w:x", nil)})))
	if err != nil {
		t.Fatal(err)
	}
	if got := show(changeMessages(msgs)); got != "tm.public.users {\"name\":\"@w:x\"} d 1000:0\n" {
		t.Errorf("tombstones off:\n%s", got)
	}
}

// TestSkipTruncates: pipeline.truncate: skip publishes nothing for a
// truncate (no record, no BEGIN/END for a transaction of only a truncate),
// counts it, and still acknowledges the transaction.
func TestSkipTruncates(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{TopicPrefix: "tm", Database: "app", TableTopics: true,
		TransactionsTopic: true, SkipTruncates: true}}
	src, sink := newFakeSource(buildEvents(
		txnN(1, pipeline.Change{Op: pipeline.OpTruncate, Rel: relEvents}),
		txnN(2, insertEvent("$1", "!a"), pipeline.Change{Op: pipeline.OpTruncate, Rel: relUsers}),
	)), newFakeSink()
	p := newPipeline(t, cfg, src, sink)
	if err := p.Run(testCtx(t)); err != nil && !errors.Is(err, errDrained) && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	var ops []string
	for _, m := range sink.Written() {
		op, _ := header(m, "tidemark-op")
		st, _ := header(m, "tidemark-status")
		ops = append(ops, m.Topic+":"+op+st)
	}
	if got := strings.Join(ops, " "); got != "tm.transaction:BEGIN tm.public.events:c tm.transaction:END" {
		t.Errorf("published %s", got)
	}
	if n := p.Stats().SkippedTruncates.Load(); n != 2 {
		t.Errorf("SkippedTruncates %d, want 2", n)
	}
	if acks := src.Acks(); len(acks) == 0 || acks[len(acks)-1] != 2008 {
		t.Errorf("acks %v, want the last at 2008", acks)
	}
}

// TestColumnPolicy: an excluded column is in no image, key or unchanged
// list; a masked one is its salted SHA-256 in images and keys, the same
// hash whichever form the decoder left the value in; NULL stays null; an
// excluded key column is refused by name.
func TestColumnPolicy(t *testing.T) {
	rel := &pipeline.Relation{OID: 9, Schema: "public", Table: "accounts", ReplicaIdentity: 'f',
		Columns: []pipeline.Column{{Name: "email", Key: true}, {Name: "password_hash"}, {Name: "note"}, {Name: "phone"}}}
	const salt = "0123456789abcdef"
	cfg := pipeline.Config{Router: pipeline.RouterConfig{TableTopics: true, Tombstones: true,
		Columns: map[string]pipeline.ColumnPolicy{"public.accounts": {Exclude: []string{"password_hash"}, Mask: []string{"email", "phone"}, Salt: salt}}}}
	secret := "$argon2id$v=19$SECRET"
	msgs, _, err := runAll(t, cfg, buildEvents(txnN(1,
		pipeline.Change{Op: pipeline.OpCreate, Rel: rel, After: pipeline.Tuple{{Text: "a@x.org", IsText: true}, {Text: secret, IsText: true}, {Value: "n"}, {Value: nil}}},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: rel, Before: pipeline.Tuple{{Value: "a@x.org"}, {Value: secret}, {Value: "n"}, {Value: nil}},
			After: pipeline.Tuple{{Value: "a@x.org"}, {Unchanged: true}, {Value: "m"}, {Value: "+1 555"}}},
		pipeline.Change{Op: pipeline.OpDelete, Rel: rel, Before: pipeline.Tuple{{Value: "a@x.org"}, {Value: secret}, {Value: "m"}, {Value: "+1 555"}}},
	)))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(salt + "\x00a@x.org"))
	hash := hex.EncodeToString(sum[:])
	phone := sha256.Sum256([]byte(salt + "\x00+1 555"))
	changes := changeMessages(msgs)
	if len(changes) != 4 {
		t.Fatalf("%d records:\n%s", len(changes), show(changes))
	}
	for _, m := range changes {
		all := string(m.Key) + string(m.Value)
		for _, h := range m.Headers {
			all += h.Key + string(h.Value)
		}
		if strings.Contains(all, "SECRET") || strings.Contains(all, "password_hash") || strings.Contains(all, "a@x.org") {
			t.Errorf("record leaks an excluded or masked column: key %s value %s", m.Key, m.Value)
		}
		if string(m.Key) != `{"email":"`+hash+`"}` {
			t.Errorf("key %s, want the masked email", m.Key)
		}
	}
	if v := string(changes[0].Value); !strings.Contains(v, `"after":{"email":"`+hash+`","note":"n","phone":null}`) {
		t.Errorf("insert: %s", v)
	}
	if v := string(changes[1].Value); !strings.Contains(v, `"after":{"email":"`+hash+`","note":"m","phone":"`+hex.EncodeToString(phone[:])+`"}`) ||
		strings.Contains(v, `"unchanged"`) {
		t.Errorf("update: %s", v)
	}

	cfg.Router.Columns = map[string]pipeline.ColumnPolicy{"public.accounts": {Exclude: []string{"email"}}}
	_, _, err = runAll(t, cfg, buildEvents(txnN(1,
		pipeline.Change{Op: pipeline.OpCreate, Rel: rel, After: pipeline.Tuple{{Value: "a@x.org"}, {Value: secret}, {Value: "n"}, {Value: nil}}})))
	if err == nil || !strings.Contains(err.Error(), `postgres.columns.public.accounts.exclude: "email" keys the messages of topic tm.public.accounts`) {
		t.Errorf("an excluded key column: %v", err)
	}
}

// TestRowsFormat: a rows-format table topic gets the flattened row with
// __op, __deleted, __lsn and __ts_ms (a delete: the old row, deleted
// "true", then a tombstone), no truncate (counted); its entity stream
// keeps envelopes.
func TestRowsFormat(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{EntityStreams: []pipeline.EntityStream{roomsStream},
		TableTopics: true, Tombstones: true, RowsTables: map[string]bool{"public.room_memberships": true}}}
	src, sink := newFakeSource(buildEvents(txnN(1,
		pipeline.Change{Op: pipeline.OpCreate, Rel: relMembers, After: row("join", "@u:x", "!a")},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relMembers, Before: row("join", "@u:x", "!a"), After: row("leave", "@u:x", "!a")},
		pipeline.Change{Op: pipeline.OpDelete, Rel: relMembers, Before: row("leave", "@u:x", "!a")},
		pipeline.Change{Op: pipeline.OpTruncate, Rel: relMembers},
	))), newFakeSink()
	p := newPipeline(t, cfg, src, sink)
	if err := p.Run(testCtx(t)); err != nil && !errors.Is(err, errDrained) && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	var rows []string
	streamOps := ""
	for _, m := range changeMessages(sink.Written()) {
		switch m.Topic {
		case "tm.public.room_memberships":
			rows = append(rows, string(m.Value))
		case "tm.rooms":
			streamOps += strings.Trim(envelopeField(t, m, "op"), `"`)
		}
	}
	want := []string{
		`{"membership":"join","user_id":"@u:x","room_id":"!a","__op":"c","__deleted":"false","__lsn":900,"__ts_ms":1732262400501}`,
		`{"membership":"leave","user_id":"@u:x","room_id":"!a","__op":"u","__deleted":"false","__lsn":901,"__ts_ms":1732262400501}`,
		`{"membership":"leave","user_id":"@u:x","room_id":"!a","__op":"d","__deleted":"true","__lsn":902,"__ts_ms":1732262400501}`,
		``, // the tombstone
	}
	if strings.Join(rows, "\n") != strings.Join(want, "\n") {
		t.Errorf("rows topic:\n%s\nwant:\n%s", strings.Join(rows, "\n"), strings.Join(want, "\n"))
	}
	if streamOps != "cudt" {
		t.Errorf("entity stream ops %q, want cudt (envelopes)", streamOps)
	}
	if n := p.Stats().SkippedTruncates.Load(); n != 1 {
		t.Errorf("SkippedTruncates %d, want 1", n)
	}
}

// colFilter matches rows whose column col is not skip (a test RowFilter);
// an image without the column is unknown.
type colFilter struct {
	col  int
	skip string
}

func (f colFilter) Match(_ *pipeline.Relation, t pipeline.Tuple) (bool, bool) {
	if f.col >= len(t) || t[f.col].Absent {
		return false, false
	}
	return t[f.col].Value != f.skip, true
}

// TestRowFilter: rows that do not match are not published (counted); an
// update leaving the filter is a delete, one entering it an insert; a
// delete with a key-only image (the filter cannot tell) is published.
func TestRowFilter(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{TableTopics: true,
		Filters: map[string]pipeline.RowFilter{"public.events": colFilter{col: 2, skip: "redacted"}}}}
	src, sink := newFakeSource(buildEvents(txnN(1,
		pipeline.Change{Op: pipeline.OpCreate, Rel: relEvents, After: row("$1", "!a", "hello")},
		pipeline.Change{Op: pipeline.OpCreate, Rel: relEvents, After: row("$2", "!a", "redacted")},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, Before: row("$1", "!a", "hello"), After: row("$1", "!a", "redacted")},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, Before: row("$2", "!a", "redacted"), After: row("$2", "!a", "back")},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, Before: row("$3", "!a", "redacted"), After: row("$3", "!a", "redacted")},
		pipeline.Change{Op: pipeline.OpDelete, Rel: relEvents, Before: keyRow(relEvents, "$2", nil, nil)},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, After: row("$4", "!a", "redacted")}, // no old row: leaves
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relEvents, After: row("$5", "!a", "kept")},
		pipeline.Change{Op: pipeline.OpCreate, Rel: relUsers, After: row("@u", false)},
	))), newFakeSink()
	p := newPipeline(t, cfg, src, sink)
	if err := p.Run(testCtx(t)); err != nil && !errors.Is(err, errDrained) && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	var got []string
	for _, m := range changeMessages(sink.Written()) {
		op, _ := header(m, "tidemark-op")
		got = append(got, op+" "+string(m.Key))
		if op == "d" && strings.Contains(string(m.Value), "redacted") {
			t.Errorf("a delete for a row leaving the filter carries the filtered row: %s", m.Value)
		}
	}
	want := `c {"event_id":"$1"}|d {"event_id":"$1"}|c {"event_id":"$2"}|d {"event_id":"$2"}|d {"event_id":"$4"}|u {"event_id":"$5"}|c {"name":"@u"}`
	if strings.Join(got, "|") != want {
		t.Errorf("published %s\nwant      %s", strings.Join(got, "|"), want)
	}
	if f := p.Stats().Filtered(); f["public.events"] != 2 || len(f) != 1 {
		t.Errorf("Filtered %v, want public.events: 2", f)
	}
}

// TestTableCounts: row changes are counted per table and op, a key change
// once (as the update it was), a filtered one not at all.
func TestTableCounts(t *testing.T) {
	cfg := pipeline.Config{Router: pipeline.RouterConfig{TableTopics: true,
		Filters: map[string]pipeline.RowFilter{"public.events": colFilter{col: 2, skip: "redacted"}}}}
	src, sink := newFakeSource(buildEvents(txnN(1,
		insertEvent("$1", "!a"),
		pipeline.Change{Op: pipeline.OpCreate, Rel: relEvents, After: row("$2", "!a", "redacted")},
		pipeline.Change{Op: pipeline.OpUpdate, Rel: relMembers, Before: row("join", "@v:x", "!a"), After: row("join", "@v:x", "!b")},
		pipeline.Change{Op: pipeline.OpDelete, Rel: relMembers, Before: row("join", "@v:x", "!b")},
	))), newFakeSink()
	p := newPipeline(t, cfg, src, sink)
	if err := p.Run(testCtx(t)); err != nil && !errors.Is(err, errDrained) && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	got := p.Stats().Tables()
	ev, mem := got["public.events"], got["public.room_memberships"]
	if ev == nil || mem == nil || ev.Create.Load() != 1 || mem.Update.Load() != 1 || mem.Delete.Load() != 1 || mem.Create.Load() != 0 {
		t.Errorf("table counts: events %+v, memberships %+v", ev, mem)
	}
}
