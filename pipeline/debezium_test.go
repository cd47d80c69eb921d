package pipeline_test

import (
	"context"
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
