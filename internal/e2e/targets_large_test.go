package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
)

// TestTargetsLargeRoomDeltas: a room above targets.full_set_max_members
// publishes only its changes: notify_target_changes records and Redis
// SADD/SREM; its notify_targets record comes from the full-set schedule,
// at the version the room has then, and (applied with the change records
// above that version) gives the kept set. A Redis that lost the set and
// its version is repaired whole from the state on the next change, and
// counted. A small room keeps getting its full set on every change, and a
// deactivation reaches every room, large or small.
func TestTargetsLargeRoomDeltas(t *testing.T) {
	rd := redistest.ForTest(t)
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "largedelta", []string{"public.users", "public.room_memberships"}, &config.Targets{
		Redis:             &config.TargetsRedis{Redis: config.Redis{Addr: rd.Addr()}},
		FullSetMaxMembers: 100,
		FullSetInterval:   time.Second,
	})
	e.start(cfg)
	reg := prometheus.NewRegistry()
	e.startTargetsWith(cfg, reg)
	ctx := context.Background()
	rc := rd.Client()
	defer rc.Close()

	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!big', '@m' || lpad(g::text, 4, '0'), 'join' FROM generate_series(1, 300) g`)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!small', '@m0001', 'join'), ('!small', '@s', 'join')`)
	e.waitTargets(cfg, time.Minute)
	kept := func(room string) []string {
		var out []string
		for _, p := range e.pairs(keptSQL(cfg)) {
			if r, u, _ := strings.Cut(p, " "); r == room {
				out = append(out, u)
			}
		}
		return out
	}
	redisSet := func(room string) []string {
		t.Helper()
		m, err := rc.SMembers(ctx, "notify_targets:"+room).Result()
		if err != nil {
			t.Fatalf("SMEMBERS %s: %v", room, err)
		}
		sort.Strings(m)
		return m
	}
	checkRedis := func(step string) {
		t.Helper()
		for _, room := range []string{"!big", "!small"} {
			if got, want := redisSet(room), kept(room); !slices.Equal(got, want) {
				t.Fatalf("%s: Redis set of %s has %d users, kept %d (first Redis %v)", step, room, len(got), len(want), got[:min(3, len(got))])
			}
		}
	}
	checkRedis("after the fill")

	// Changes in the large room: deltas only.
	targetsTopic := cfg.Kafka.TopicPrefix + ".notify_targets"
	before := e.targetRecords(targetsTopic)
	for i := 0; i < 5; i++ {
		e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!big', $1, 'join')`, fmt.Sprintf("@late%d", i))
		e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!big' AND user_id = $1`, fmt.Sprintf("@m%04d", i+1))
	}
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!small', '@s2', 'join')`)
	e.waitTargets(cfg, time.Minute)
	checkRedis("after 10 changes in !big")
	// Within a second of the changes, the schedule has at most begun; the
	// records of !big are the full sets it wrote, never one per change.
	after := e.targetRecords(targetsTopic)
	bigRecords := 0
	for _, r := range after[len(before):] {
		if r.Room == "!big" {
			bigRecords++
		}
	}
	if bigRecords > 3 {
		t.Errorf("%d notify_targets records of !big for 10 changes: the large room still publishes its set per change", bigRecords)
	}
	if last := after[len(after)-1]; last.Room == "!small" && !slices.Equal(last.Users, kept("!small")) {
		t.Errorf("last !small record lists %v, kept %v", last.Users, kept("!small"))
	}
	// The schedule publishes !big's full set at its current version.
	waitFullSet := func() {
		t.Helper()
		var version uint64
		if err := e.pool.QueryRow(ctx, `SELECT version FROM tidemark.notify_rooms WHERE room_id = '!big'`).Scan(&version); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			recs := e.targetRecords(targetsTopic)
			var last *targetRecord
			for i := range recs {
				if recs[i].Room == "!big" {
					last = &recs[i]
				}
			}
			if last != nil && last.Version == version {
				if !slices.Equal(last.Users, kept("!big")) {
					t.Fatalf("full set of !big at version %d lists %d users, kept %d", version, len(last.Users), len(kept("!big")))
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("no full set of !big at version %d within 30s (latest %+v)", version, last)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitFullSet()
	if n := metricOf(t, reg, "tidemark_notify_targets_full_sets_total", "", ""); n < 1 {
		t.Errorf("tidemark_notify_targets_full_sets_total = %v", n)
	}

	// Redis loses the set and its version: the next change repairs it whole.
	if err := rc.Del(ctx, "notify_targets:!big", "notify_targets:!big:version").Err(); err != nil {
		t.Fatal(err)
	}
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!big', '@after-loss', 'join')`)
	e.waitTargets(cfg, time.Minute)
	checkRedis("after Redis lost !big")
	if n := metricOf(t, reg, "tidemark_notify_targets_redis_gaps_total", "", ""); n != 1 {
		t.Errorf("tidemark_notify_targets_redis_gaps_total = %v, want 1", n)
	}

	// A deactivation of a member of both rooms.
	e.exec(`INSERT INTO users(user_id, deactivated) VALUES ('@m0001', true)`)
	e.waitTargets(cfg, time.Minute)
	checkRedis("after deactivating @m0001")
	if slices.Contains(kept("!big"), "@m0001") || slices.Contains(kept("!small"), "@m0001") {
		t.Fatalf("@m0001 still kept after deactivation")
	}
	if k, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(k, truth) {
		t.Errorf("kept %d pairs, database %d", len(k), len(truth))
	}
	// The change records fold to the kept sets, and once the schedule has
	// run again the compacted topic's latest values are the kept sets.
	waitFullSet()
	e.checkOutputs(cfg)
}

type targetRecord struct {
	Room    string   `json:"room_id"`
	Users   []string `json:"users"`
	Version uint64   `json:"version"`
}

// targetRecords reads the notify_targets topic, in partition and offset
// order.
func (e *env) targetRecords(topic string) []targetRecord {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), topic)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []targetRecord
	for _, m := range byPartitionOffset(toMsgs(recs)) {
		var r targetRecord
		if err := json.Unmarshal(m.Value, &r); err != nil {
			e.t.Fatalf("%s record %s: %v", topic, m.Value, err)
		}
		out = append(out, r)
	}
	return out
}
