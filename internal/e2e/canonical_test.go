package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/pipeline"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

func str(t *testing.T, raw json.RawMessage) string {
	t.Helper()
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		t.Fatalf("not a JSON string: %s", raw)
	}
	return s
}

// TestCanonicalTables: inserts, updates (one changing the primary key),
// deletes, a truncate and an unchanged TOASTed column on the canonical chat
// tables arrive with correct envelopes, keys, topics and partitions; per-key
// order is commit order; BEGIN/END records match the transactions.
func TestCanonicalTables(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	cfg := e.config("canon", demo.Tables, func(c *config.Config) {
		c.Pipeline.EntityStreams = []pipeline.EntityStream{{Name: "rooms", Key: "room_id",
			Tables: []string{"public.room_memberships", "public.events", "public.event_json"}}}
	})
	r := e.start(cfg)

	big := make([]byte, 8000) // incompressible, so Postgres stores it out of line (TOAST)
	rand.Read(big)            // never fails (crypto/rand)
	bigJSON := `{"body":"` + hex.EncodeToString(big) + `"}`

	e.exec(`INSERT INTO users(user_id) VALUES ('@a:x'), ('@b:x')`)
	e.exec(`INSERT INTO rooms(room_id) VALUES ('!r1:x'), ('!r2:x')`)
	// One transaction: join, event, event_json.
	e.exec(`BEGIN;
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1:x', '@a:x', 'join');
INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ('$e1', '!r1:x', '@a:x', 'm.room.message', 1);
INSERT INTO event_json(event_id, room_id, json) VALUES ('$e1', '!r1:x', '` + bigJSON + `');
COMMIT;`)
	e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!r1:x' AND user_id = '@a:x'`)
	e.exec(`UPDATE room_memberships SET membership = 'join' WHERE room_id = '!r1:x' AND user_id = '@a:x'`)
	// A primary-key change: the row moves from @a to @b.
	e.exec(`UPDATE room_memberships SET user_id = '@b:x' WHERE room_id = '!r1:x' AND user_id = '@a:x'`)
	// TOAST: json is not touched, so Postgres does not send it.
	e.exec(`UPDATE event_json SET room_id = room_id WHERE event_id = '$e1'`)
	e.exec(`INSERT INTO read_markers(user_id, room_id, event_id, stream_ordering) VALUES ('@b:x', '!r1:x', '$e1', 1)`)
	e.exec(`DELETE FROM room_memberships WHERE room_id = '!r1:x' AND user_id = '@b:x'`)
	e.exec(`TRUNCATE read_markers`)

	end := e.currentLSN()
	e.waitSlot(cfg.Postgres.Slot, end, 30*time.Second)

	// room_memberships: c(@a), u(leave), u(join), d(@a)+c(@b), d(@b).
	mt := e.read("canon.public.room_memberships")
	var got []string
	for _, m := range mt {
		got = append(got, m.Env.Op+" "+string(m.Key))
	}
	// All keys of one room/user pair hash somewhere; order across partitions
	// is not defined, so compare per key.
	byKey := map[string][]string{}
	for _, m := range mt {
		byKey[string(m.Key)] = append(byKey[string(m.Key)], m.Env.Op)
	}
	keyA := `{"room_id":"!r1:x","user_id":"@a:x"}`
	keyB := `{"room_id":"!r1:x","user_id":"@b:x"}`
	if g := strings.Join(byKey[keyA], ","); g != "c,u,u,d" {
		t.Errorf("ops for %s = %s, want c,u,u,d (all: %v)", keyA, g, got)
	}
	if g := strings.Join(byKey[keyB], ","); g != "c,d" {
		t.Errorf("ops for %s = %s, want c,d", keyB, g)
	}
	for _, m := range mt {
		if want := kafkasink.PartitionFor(m.Key, 3); m.Partition != want {
			t.Errorf("key %s in partition %d, murmur2 says %d", m.Key, m.Partition, want)
		}
		if m.Env.Source.Table != "room_memberships" || m.Env.Source.Schema != "public" || m.Env.Source.Connector != "tidemark" || m.Env.Source.Name != "canon" {
			t.Errorf("source block wrong: %+v", m.Env.Source)
		}
		if m.Headers["tidemark-table"] != "public.room_memberships" || m.Headers["tidemark-op"] != m.Env.Op {
			t.Errorf("headers wrong: %v", m.Headers)
		}
		if m.Env.Source.CommitLSN != uint64(m.Pos.CommitLSN) || m.Env.Transaction.TotalOrder != int(m.Pos.Seq)+1 {
			t.Errorf("envelope position (lsn %d, total_order %d) disagrees with headers %s", m.Env.Source.CommitLSN, m.Env.Transaction.TotalOrder, m.Pos)
		}
		if !strings.HasPrefix(m.Env.Transaction.ID, fmt.Sprint(m.Env.Source.TxID)+":") {
			t.Errorf("transaction id %q does not start with txId %d", m.Env.Transaction.ID, m.Env.Source.TxID)
		}
	}
	for _, m := range mt {
		switch {
		case m.Env.Op == "u" && string(m.Key) == keyA:
			if m.Env.After == nil || m.Env.Before != nil {
				t.Errorf("update: want after and no before (default identity, key unchanged): %s", m.Value)
			}
		case m.Env.Op == "d" && string(m.Key) == keyA:
			// The delete half of the key change carries the old key image.
			if str(t, m.Env.Before["user_id"]) != "@a:x" || m.Env.After != nil {
				t.Errorf("key-change delete: %s", m.Value)
			}
			if _, ok := m.Env.Before["membership"]; ok {
				t.Errorf("old-key image carries a non-key column: %s", m.Value)
			}
		case m.Env.Op == "c" && string(m.Key) == keyB:
			if str(t, m.Env.After["user_id"]) != "@b:x" || str(t, m.Env.After["membership"]) != "join" {
				t.Errorf("key-change create: %s", m.Value)
			}
		case m.Env.Op == "d" && string(m.Key) == keyB:
			if str(t, m.Env.Before["user_id"]) != "@b:x" {
				t.Errorf("delete: %s", m.Value)
			}
		}
	}
	e.checkKeyOrder("canon.public.room_memberships", mt, false)

	// TOAST: event_json has REPLICA IDENTITY FULL, so the update carries
	// the unchanged json, filled from the whole old row (as Debezium does);
	// TestFullIdentityFillsUnchangedToast covers the default identity.
	ej := e.read("canon.public.event_json")
	if len(ej) != 2 {
		t.Fatalf("event_json: %d messages, want 2", len(ej))
	}
	if ej[0].Env.Op != "c" || str(t, ej[0].Env.After["json"]) != bigJSON {
		t.Errorf("event_json insert does not carry the full json")
	}
	upd := ej[1].Env
	if upd.Op != "u" {
		t.Fatalf("second event_json message op %q", upd.Op)
	}
	if str(t, upd.After["json"]) != bigJSON {
		t.Errorf("the unchanged TOAST column is not in after (REPLICA IDENTITY FULL): %s", ej[1].Value[:200])
	}
	if len(upd.Unchanged) != 0 {
		t.Errorf("unchanged = %v, want none", upd.Unchanged)
	}
	if str(t, upd.After["event_id"]) != "$e1" {
		t.Errorf("after lacks event_id")
	}
	// REPLICA IDENTITY FULL logs whole old rows, but messages are keyed by
	// the primary key only.
	for _, m := range ej {
		if string(m.Key) != `{"event_id":"$e1"}` {
			t.Errorf("event_json key %s, want the primary key", m.Key)
		}
	}

	// Truncate: one 't' record in every partition of read_markers.
	rm := e.read("canon.public.read_markers")
	truncParts := map[int]bool{}
	for _, m := range rm {
		if m.Env.Op == "t" {
			truncParts[m.Partition] = true
			if m.Env.Before != nil || m.Env.After != nil {
				t.Errorf("truncate carries row images: %s", m.Value)
			}
		}
	}
	if len(truncParts) != 3 {
		t.Errorf("truncate reached partitions %v, want all 3", truncParts)
	}

	// Entity stream: everything about room !r1 in one partition, in order.
	rooms := e.read("canon.rooms")
	part := kafkasink.PartitionFor([]byte(`{"room_id":"!r1:x"}`), 3)
	var tables []string
	for _, m := range rooms {
		if string(m.Key) != `{"room_id":"!r1:x"}` {
			t.Errorf("rooms stream key %s", m.Key)
			continue
		}
		if m.Partition != part {
			t.Errorf("room !r1 in partition %d, want %d", m.Partition, part)
		}
		tables = append(tables, m.Env.Source.Table+":"+m.Env.Op)
	}
	wantRooms := "room_memberships:c,events:c,event_json:c,room_memberships:u,room_memberships:u,room_memberships:d,room_memberships:c,event_json:u,room_memberships:d"
	if g := strings.Join(tables, ","); g != wantRooms {
		t.Errorf("rooms stream order\n got %s\nwant %s", g, wantRooms)
	}
	e.checkKeyOrder("canon.rooms", rooms, false)

	// BEGIN/END records match the transactions seen in the table topics.
	perTxn := map[uint64]map[string]map[uint32]bool{}
	for _, tbl := range []string{"users", "rooms", "room_memberships", "events", "event_json", "read_markers"} {
		for _, m := range e.read("canon.public." + tbl) {
			lsn := uint64(m.Pos.CommitLSN)
			if perTxn[lsn] == nil {
				perTxn[lsn] = map[string]map[uint32]bool{}
			}
			name := "public." + tbl
			if perTxn[lsn][name] == nil {
				perTxn[lsn][name] = map[uint32]bool{}
			}
			perTxn[lsn][name][m.Pos.Seq] = true
		}
	}
	txns := e.readTxns("canon.transaction")
	begins := map[string]bool{}
	ends := 0
	var lastLSN uint64
	for _, tr := range txns {
		if tr.Status == "BEGIN" {
			begins[tr.ID] = true
			if tr.LSN < lastLSN {
				t.Errorf("transactions topic out of commit order at %s", tr.ID)
			}
			lastLSN = tr.LSN
			continue
		}
		ends++
		if !begins[tr.ID] {
			t.Errorf("END %s without BEGIN before it", tr.ID)
		}
		seen := perTxn[tr.LSN]
		total := 0
		for _, dc := range tr.DataCollections {
			if n := len(seen[dc.Name]); n != dc.Count {
				t.Errorf("txn %s: END says %d changes in %s, topics hold %d", tr.ID, dc.Count, dc.Name, n)
			}
			total += dc.Count
		}
		if tr.EventCount == nil || *tr.EventCount != total {
			t.Errorf("txn %s: event_count %v, data collections sum %d", tr.ID, tr.EventCount, total)
		}
		if tr.EndLSN <= tr.LSN {
			t.Errorf("txn %s: end_lsn %d not after commit lsn %d", tr.ID, tr.EndLSN, tr.LSN)
		}
		delete(perTxn, tr.LSN)
	}
	if ends != 10 {
		t.Errorf("%d END records, want 10 transactions", ends)
	}
	if len(perTxn) != 0 {
		t.Errorf("changes of transactions without END records: %v", perTxn)
	}
	if err := r.stop(t); err != nil {
		t.Errorf("stop: %v", err)
	}
}
