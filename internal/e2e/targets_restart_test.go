package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/pipeline"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

// TestTargetsRestartMidRewrite (issue 15, item 3): a Synapse-style
// DELETE+INSERT rewrite of one membership row, in one transaction, whose
// two changes are on different partitions. The targets consumer applies
// the DELETE and is stopped before it sees the INSERT and before the END
// record exists for it; it restarts with the INSERT and the END waiting.
// The room must settle by the END record (the hold is a minute: it settles
// within seconds) and no state without the member is ever published.
//
// The interleaving is forced: capture writes to staging topics (prefix
// rwstg) and the test copies their records (same keys, values and headers,
// so the same partitions and positions) into the consumer's topics (prefix
// rwtg) in the order it needs.
func TestTargetsRestartMidRewrite(t *testing.T) {
	e := newEnv(t, "")
	e.exec(synapseSchema)
	tables := []string{"public.current_state_events", "public.synapse_users"}
	stg := targetsConfig(e, "rwstg", tables, synapseTargets())
	e.start(stg)
	tc := synapseTargets()
	tc.Hold = time.Minute
	cfg := targetsConfig(e, "rwtg", tables, tc)
	memberTopic := func(prefix string) string { return prefix + ".public.current_state_events" }
	usersTopic := func(prefix string) string { return prefix + ".public.synapse_users" }
	txnTopic := func(prefix string) string { return prefix + ".transaction" }

	// The seed, then rewrites of @a's unchanged join: one of them has its
	// DELETE and INSERT on different partitions (the key is the whole row).
	const rewrites = 8
	e.exec(`INSERT INTO synapse_users(name) VALUES ('@a');
INSERT INTO current_state_events VALUES ('$0', '!r1', 'm.room.member', '@a', 'join')`)
	for i := 1; i <= rewrites; i++ {
		e.exec(fmt.Sprintf(`BEGIN; DELETE FROM current_state_events WHERE room_id = '!r1' AND type = 'm.room.member' AND state_key = '@a';
INSERT INTO current_state_events VALUES ('$%d', '!r1', 'm.room.member', '@a', 'join'); COMMIT`, i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// read retries a topic the client's cached metadata does not know yet
	// (kafka-go's transport refreshes it every few seconds).
	read := func(topic string) []kafkatest.Record {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			rctx, rcancel := context.WithTimeout(ctx, 20*time.Second)
			recs, err := kafkatest.ReadAll(rctx, e.kafka.Brokers(), topic)
			rcancel()
			if err == nil {
				return recs
			}
			if time.Now().After(deadline) {
				t.Fatalf("reading %s: %v", topic, err)
			}
		}
	}
	ends := map[string]kafkatest.Record{} // commit LSN (decimal) -> END record
	var members, users []kafkatest.Record
	for deadline := time.Now().Add(60 * time.Second); ; {
		members, users = withoutTombstones(read(memberTopic("rwstg"))), read(usersTopic("rwstg"))
		ends = map[string]kafkatest.Record{}
		for _, r := range read(txnTopic("rwstg")) {
			if tr, err := pipeline.ParseTxnRecord(r.Value); err == nil && tr.IsEnd() {
				ends[strconv.FormatUint(tr.LSN, 10)] = r
			}
		}
		if len(members) == 1+2*rewrites && len(users) == 1 && len(ends) == 1+rewrites {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("staging topics: %d membership, %d user records, %d END records", len(members), len(users), len(ends))
		}
		time.Sleep(100 * time.Millisecond)
	}
	byTxn := map[string][]kafkatest.Record{}
	for _, r := range append(append([]kafkatest.Record(nil), members...), users...) {
		byTxn[r.Headers["tidemark-lsn"]] = append(byTxn[r.Headers["tidemark-lsn"]], r)
	}
	seedLSN := users[0].Headers["tidemark-lsn"]
	var del, ins kafkatest.Record
	var lsn string
	for l, recs := range byTxn {
		if l == seedLSN || len(recs) != 2 {
			continue
		}
		d, c := recs[0], recs[1]
		if d.Headers["tidemark-op"] != "d" {
			d, c = c, d
		}
		if d.Headers["tidemark-op"] == "d" && c.Headers["tidemark-op"] == "c" && d.Partition != c.Partition && (lsn == "" || l < lsn) {
			del, ins, lsn = d, c, l
		}
	}
	if lsn == "" {
		t.Fatalf("no rewrite of %d has its DELETE and INSERT on different partitions", rewrites)
	}
	if _, ok := ends[lsn]; !ok {
		t.Fatalf("no END record for the rewrite at %s", lsn)
	}
	t.Logf("rewrite at %s: DELETE on partition %d, INSERT on partition %d", lsn, del.Partition, ins.Partition)

	sink, err := kafkasink.New(kafkasink.Config{Brokers: e.kafka.Brokers(), ClientID: "copier", Partitions: 3, ReplicationFactor: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sink.Close(context.Background()) }()
	if err := sink.EnsureTopics(ctx, []string{memberTopic("rwtg"), usersTopic("rwtg"), txnTopic("rwtg")},
		map[string]kafkasink.TopicSpec{txnTopic("rwtg"): {Partitions: 1}}); err != nil {
		t.Fatal(err)
	}
	cp := func(topic string, recs ...kafkatest.Record) {
		t.Helper()
		var msgs []pipeline.Message
		for _, r := range recs {
			var hs []pipeline.Header
			for _, k := range []string{"tidemark-table", "tidemark-op", "tidemark-lsn", "tidemark-seq"} {
				if v, ok := r.Headers[k]; ok {
					hs = append(hs, pipeline.Header{Key: k, Value: []byte(v)})
				}
			}
			msgs = append(msgs, pipeline.Message{Topic: topic, Key: r.Key, Value: r.Value, Headers: hs})
		}
		if err := sink.Write(ctx, msgs); err != nil {
			t.Fatal(err)
		}
	}
	// The seed, whole.
	for _, r := range byTxn[seedLSN] {
		topic := memberTopic("rwtg")
		if r.Topic == usersTopic("rwstg") {
			topic = usersTopic("rwtg")
		}
		cp(topic, r)
	}
	cp(txnTopic("rwtg"), ends[seedLSN])

	var n int
	dirtyQ := `SELECT count(*) FROM tidemark.notify_rooms WHERE dirty`
	waitFor := func(what string, within time.Duration, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(within); !ok(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s", what, within)
			}
		}
	}
	tg, stop := e.startTargets(cfg)
	waitFor("the seed settled", 30*time.Second, func() bool {
		// notify_rooms exists once the consumer created its tables (one
		// transaction), so the pairs query below finds notify_targets.
		return e.pool.QueryRow(ctx, dirtyQ).Scan(&n) == nil && n == 0 && slices.Equal(e.pairs(keptSQL(cfg)), []string{"!r1 @a"})
	})
	// The rewrite's DELETE only: applied (the fact says left), the room
	// held, the offset committed; then the consumer stops.
	cp(memberTopic("rwtg"), del)
	waitFor("the DELETE applied and its offset committed", 30*time.Second, func() bool {
		var joined bool
		var l int64
		err := e.pool.QueryRow(ctx, `SELECT joined, lsn FROM tidemark.notify_memberships WHERE room_id = '!r1' AND user_id = '@a'`).Scan(&joined, &l)
		if err != nil || joined || strconv.FormatInt(l, 10) != lsn {
			return false
		}
		return e.committedOffset(ctx, cfg.Targets.Group, memberTopic("rwtg"), del.Partition) > del.Offset
	})
	stop()
	if n := tg.Handler.Stats().HeldExpired.Load(); n != 0 {
		t.Fatalf("premise: %d transaction(s) settled by the hold before the stop", n)
	}
	if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM tidemark.notify_rooms WHERE dirty AND room_id = '!r1'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("premise: room !r1 not left dirty by the stopped consumer (%d, %v)", n, err)
	}
	if kept := e.pairs(keptSQL(cfg)); !slices.Equal(kept, []string{"!r1 @a"}) {
		t.Fatalf("premise: kept %v before the restart, want the seed's", kept)
	}
	// The INSERT and the END wait for the restarted consumer.
	cp(memberTopic("rwtg"), ins)
	cp(txnTopic("rwtg"), ends[lsn])
	restarted := time.Now()
	tg, _ = e.startTargets(cfg)
	const settleWithin = 10 * time.Second
	waitFor("room !r1 settled after the restart (by its END record; the hold is 1m)", settleWithin, func() bool {
		return e.pool.QueryRow(ctx, dirtyQ).Scan(&n) == nil && n == 0
	})
	t.Logf("settled %s after the restart", time.Since(restarted).Round(time.Millisecond))
	if n := tg.Handler.Stats().HeldExpired.Load(); n != 0 {
		t.Errorf("%d transaction(s) settled by the hold, not by their END record", n)
	}
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(synapseTruth); !slices.Equal(kept, truth) {
		t.Errorf("kept %v, database says %v", kept, truth)
	}
	// No intermediate state was ever published: every notify_targets record
	// of !r1 lists @a, and the only change record is the seed's join.
	published := 0
	for _, r := range read("rwtg.notify_targets") {
		var v struct {
			Room  string   `json:"room_id"`
			Users []string `json:"users"`
		}
		if err := json.Unmarshal(r.Value, &v); err != nil {
			t.Fatal(err)
		}
		if v.Room != "!r1" {
			continue
		}
		published++
		if !slices.Equal(v.Users, []string{"@a"}) {
			t.Errorf("notify_targets published an intermediate state of !r1: %s", r.Value)
		}
	}
	if published == 0 {
		t.Error("notify_targets has no record of !r1 (the seed's join)")
	}
	var got []string
	for _, r := range read("rwtg.notify_target_changes") {
		var c changeRec
		if err := json.Unmarshal(r.Value, &c); err != nil {
			t.Fatal(err)
		}
		got = append(got, c.String())
	}
	if !slices.Equal(got, []string{"!r1 @a added join"}) {
		t.Errorf("change records %v, want only the seed's join", got)
	}
}

// committedOffset is the group's committed offset of a partition (-1: none).
func (e *env) committedOffset(ctx context.Context, group, topic string, partition int) int64 {
	client := &kafkago.Client{Addr: kafkago.TCP(e.kafka.Brokers()...), Timeout: 5 * time.Second, Transport: e.transport()}
	resp, err := client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: group, Topics: map[string][]int{topic: {partition}}})
	if err != nil || resp.Error != nil {
		return -1
	}
	for _, p := range resp.Topics[topic] {
		if p.Partition == partition && p.Error == nil {
			return p.CommittedOffset
		}
	}
	return -1
}

// withoutTombstones drops the null-valued records that follow deletes.
func withoutTombstones(recs []kafkatest.Record) []kafkatest.Record {
	out := recs[:0:0]
	for _, r := range recs {
		if len(r.Value) > 0 {
			out = append(out, r)
		}
	}
	return out
}
