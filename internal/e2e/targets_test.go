package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation/targets"
	"github.com/tidemark/tidemark/pipeline"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

// canonicalTargets is the canonical chat schema's mapping (the defaults),
// with a row filter so that one room's rows are filtered out.
func canonicalTargets() *config.Targets {
	return &config.Targets{Membership: targets.MembershipSource{Filter: "room_id != '!ignored'"}}
}

const canonicalTruth = `SELECT m.room_id, m.user_id FROM room_memberships m LEFT JOIN users u ON u.user_id = m.user_id
WHERE m.membership = 'join' AND NOT coalesce(u.deactivated, false) AND m.room_id <> '!ignored'`

// synapseSchema is a Synapse-like layout: current state in a table without
// a primary key (REPLICA IDENTITY FULL), rewritten as DELETE then INSERT in
// one transaction; users.deactivated is a smallint.
const synapseSchema = `
CREATE TABLE current_state_events (event_id text NOT NULL, room_id text NOT NULL, type text NOT NULL,
  state_key text NOT NULL, membership text);
ALTER TABLE current_state_events REPLICA IDENTITY FULL;
CREATE TABLE synapse_users (name text PRIMARY KEY, deactivated smallint NOT NULL DEFAULT 0);`

func synapseTargets() *config.Targets {
	return &config.Targets{
		Membership: targets.MembershipSource{Table: "public.current_state_events", RoomColumn: "room_id", UserColumn: "state_key",
			MembershipColumn: "membership", Joined: []string{"join"}, Filter: "type = 'm.room.member'"},
		Users: targets.UserSource{Table: "public.synapse_users", UserColumn: "name", DeactivatedColumn: "deactivated"},
	}
}

const synapseTruth = `SELECT DISTINCT c.room_id, c.state_key FROM current_state_events c LEFT JOIN synapse_users u ON u.name = c.state_key
WHERE c.type = 'm.room.member' AND c.membership = 'join' AND coalesce(u.deactivated, 0) = 0`

func targetsConfig(e *env, prefix string, tables []string, tc *config.Targets) *config.Config {
	return e.config(prefix, tables, func(c *config.Config) { c.Targets = tc })
}

// startTargets runs the targets consumer in the test process; stop is
// idempotent and also runs at cleanup.
func (e *env) startTargets(cfg *config.Config) (*app.Targets, func()) {
	return e.startTargetsWith(cfg, nil)
}

// startTargetsWith also registers the role's metrics in reg (when set).
func (e *env) startTargetsWith(cfg *config.Config, reg prometheus.Registerer) (*app.Targets, func()) {
	e.t.Helper()
	log := zaptest.NewLogger(e.t, zaptest.Level(zap.WarnLevel))
	tg, err := app.PrepareTargets(context.Background(), cfg, log)
	if err != nil {
		e.t.Fatalf("prepare targets: %v", err)
	}
	if reg != nil {
		tg.Register(reg)
	}
	stop := runConsumer(e.t, "targets", tg.Run)
	return tg, stop
}

func targetTopics(cfg *config.Config) []string {
	m := cfg.Targets.Mapping()
	var out []string
	for _, tbl := range []string{m.Membership.Table, m.Users.Table} {
		out = append(out, cfg.Kafka.TopicPrefix+"."+tbl)
	}
	return out
}

// waitTargets waits until capture and the targets consumer have passed
// everything committed so far and no room is left unsettled.
func (e *env) waitTargets(cfg *config.Config, timeout time.Duration) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	passed := targets.PipelinePassed(e.pool, cfg.Postgres.Slot, cfg.Kafka.Brokers, e.transport(), cfg.Targets.Group, targetTopics(cfg))
	if err := passed(ctx, e.currentLSN()); err != nil {
		e.t.Logf("slot %s confirmed %s, current WAL insert LSN %s", cfg.Postgres.Slot, e.slotConfirmed(cfg.Postgres.Slot), e.currentLSN())
		e.t.Fatalf("pipeline did not pass the current LSN within %s: %v", timeout, err)
	}
	q := fmt.Sprintf(`SELECT (SELECT count(*) FROM %[1]s.notify_rooms WHERE dirty) + (SELECT count(*) FROM %[1]s.notify_outbox)`, cfg.Targets.Postgres.Schema)
	for {
		var n int
		if err := e.pool.QueryRow(ctx, q).Scan(&n); err != nil {
			e.t.Fatalf("counting dirty rooms: %v", err)
		}
		if n == 0 {
			return
		}
		if ctx.Err() != nil {
			e.t.Fatalf("%d room(s) or outbox record(s) still unsettled after %s", n, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pairs runs a (room, user) query and returns "room user" strings, sorted.
func (e *env) pairs(sql string) []string {
	e.t.Helper()
	rows, err := e.pool.Query(context.Background(), sql)
	if err != nil {
		e.t.Fatalf("query %q: %v", firstLine(sql), err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var r, u string
		if err := rows.Scan(&r, &u); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, r+" "+u)
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

func keptSQL(cfg *config.Config) string {
	return fmt.Sprintf(`SELECT room_id, user_id FROM %s.notify_targets`, cfg.Targets.Postgres.Schema)
}

// changeRec is a notify_target_changes record.
type changeRec struct {
	Room     string `json:"room_id"`
	User     string `json:"user_id"`
	Change   string `json:"change"`
	Reason   string `json:"reason"`
	Version  uint64 `json:"version"`
	Position string `json:"position"`
}

func (c changeRec) String() string { return c.Room + " " + c.User + " " + c.Change + " " + c.Reason }

// changeReader returns the change records not returned before.
type changeReader struct {
	e    *env
	seen map[string]bool
}

func (r *changeReader) next(topic string) []string {
	r.e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, r.e.kafka.Brokers(), topic)
	if err != nil {
		r.e.t.Fatalf("reading %s: %v", topic, err)
	}
	var out []string
	for _, rec := range recs {
		id := fmt.Sprintf("%d/%d", rec.Partition, rec.Offset)
		if r.seen[id] {
			continue
		}
		r.seen[id] = true
		var c changeRec
		if err := json.Unmarshal(rec.Value, &c); err != nil {
			r.e.t.Fatalf("%s record %s: %v", topic, rec.Value, err)
		}
		if string(rec.Key) != c.Room {
			r.e.t.Errorf("%s record keyed %q for room %q", topic, rec.Key, c.Room)
		}
		out = append(out, c.String())
	}
	sort.Strings(out)
	return out
}

// latestTargets reads the compacted topic's latest value per room.
func (e *env) latestTargets(topic string) map[string][]string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), topic)
	if err != nil {
		e.t.Fatalf("reading %s: %v", topic, err)
	}
	out := map[string][]string{}
	for _, rec := range byPartitionOffset(toMsgs(recs)) {
		var v struct {
			Room     string   `json:"room_id"`
			Users    []string `json:"users"`
			Position string   `json:"position"`
		}
		if err := json.Unmarshal(rec.Value, &v); err != nil {
			e.t.Fatalf("%s record: %v", topic, err)
		}
		out[v.Room] = v.Users
	}
	return out
}

func toMsgs(recs []kafkatest.Record) []msg {
	out := make([]msg, len(recs))
	for i, r := range recs {
		out[i] = msg{Record: r}
	}
	return out
}

// replayTopics writes every record of the topics again (same keys, values,
// headers, so the same partitions and positions): a redelivery of the
// whole history.
func (e *env) replayTopics(topics []string) int {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sink, err := kafkasink.New(kafkasink.Config{Brokers: e.kafka.Brokers(), ClientID: "replayer", Partitions: 3, ReplicationFactor: 1}, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer func() {
		if err := sink.Close(context.Background()); err != nil {
			e.t.Errorf("closing the replayer: %v", err)
		}
	}()
	if err := sink.EnsureTopics(ctx, topics, nil); err != nil {
		e.t.Fatal(err)
	}
	n := 0
	for _, topic := range topics {
		recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), topic)
		if err != nil {
			e.t.Fatal(err)
		}
		var msgs []pipeline.Message
		for _, r := range byPartitionOffset(toMsgs(recs)) {
			var hs []pipeline.Header
			for _, k := range []string{"tidemark-table", "tidemark-op", "tidemark-lsn", "tidemark-seq"} {
				hs = append(hs, pipeline.Header{Key: k, Value: []byte(r.Headers[k])})
			}
			msgs = append(msgs, pipeline.Message{Topic: topic, Key: r.Key, Value: r.Value, Headers: hs})
		}
		if err := sink.Write(ctx, msgs); err != nil {
			e.t.Fatal(err)
		}
		n += len(msgs)
	}
	return n
}

type targetStep struct {
	name string
	sql  string
	want []string // change records "room user added|removed reason"
}

type targetScenario struct {
	name   string
	schema string
	tables []string
	tc     func() *config.Targets
	truth  string
	steps  []targetStep
}

// TestTargetsSequences (acceptance 1): invite, join, leave, ban, rejoin,
// deactivate, reactivate, a DELETE+INSERT rewrite in one transaction, a
// filtered-out row and a replay of the whole history; after each step the
// kept sets equal a direct SQL computation on the source tables and the
// changes topic carries exactly the expected records. Run on the canonical
// mapping and on a Synapse-like one.
func TestTargetsSequences(t *testing.T) {
	canonical := targetScenario{
		name: "canonical", schema: demoSchemaTargets, tables: []string{"public.users", "public.room_memberships"},
		tc: canonicalTargets, truth: canonicalTruth,
		steps: []targetStep{
			{"seed", `INSERT INTO users(user_id) VALUES ('@a'), ('@b'), ('@c');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@b', 'join'), ('!r2', '@b', 'join'), ('!r2', '@c', 'join')`,
				[]string{"!r1 @b added join", "!r2 @b added join", "!r2 @c added join"}},
			{"invite", `INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'invite')`, nil},
			{"join", `UPDATE room_memberships SET membership = 'join' WHERE room_id = '!r1' AND user_id = '@a'`, []string{"!r1 @a added join"}},
			{"leave", `UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!r1' AND user_id = '@a'`, []string{"!r1 @a removed leave"}},
			{"ban", `UPDATE room_memberships SET membership = 'ban' WHERE room_id = '!r2' AND user_id = '@c'`, []string{"!r2 @c removed ban"}},
			{"rejoin", `UPDATE room_memberships SET membership = 'join' WHERE room_id = '!r1' AND user_id = '@a'`, []string{"!r1 @a added join"}},
			{"deactivate", `UPDATE users SET deactivated = true WHERE user_id = '@b'`, []string{"!r1 @b removed deactivated", "!r2 @b removed deactivated"}},
			{"reactivate", `UPDATE users SET deactivated = false WHERE user_id = '@b'`, []string{"!r1 @b added reactivated", "!r2 @b added reactivated"}},
			{"rewrite unchanged", `BEGIN; DELETE FROM room_memberships WHERE room_id = '!r1' AND user_id = '@a';
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r1', '@a', 'join'); COMMIT`, nil},
			{"rewrite to leave", `BEGIN; DELETE FROM room_memberships WHERE room_id = '!r2' AND user_id = '@b';
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r2', '@b', 'leave'); COMMIT`, []string{"!r2 @b removed leave"}},
			{"filtered out", `INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!ignored', '@a', 'join')`, nil},
			{"replay", "", nil},
			{"join after replay", `UPDATE room_memberships SET membership = 'join' WHERE room_id = '!r2' AND user_id = '@c'`, []string{"!r2 @c added join"}},
		},
	}
	csv := func(id, room, typ, key, mem string) string {
		m := "NULL"
		if mem != "" {
			m = "'" + mem + "'"
		}
		return fmt.Sprintf(`INSERT INTO current_state_events VALUES ('%s', '%s', '%s', '%s', %s);`, id, room, typ, key, m)
	}
	// rewrite replaces a member's current state the way Synapse does.
	rewrite := func(id, room, user, mem string) string {
		return fmt.Sprintf(`BEGIN; DELETE FROM current_state_events WHERE room_id = '%s' AND type = 'm.room.member' AND state_key = '%s'; %s COMMIT`,
			room, user, csv(id, room, "m.room.member", user, mem))
	}
	synapse := targetScenario{
		name: "synapse", schema: synapseSchema, tables: []string{"public.current_state_events", "public.synapse_users"},
		tc: synapseTargets, truth: synapseTruth,
		steps: []targetStep{
			{"seed", `INSERT INTO synapse_users(name) VALUES ('@a'), ('@b'), ('@c');` +
				csv("$1", "!r1", "m.room.create", "", "") + csv("$2", "!r1", "m.room.member", "@b", "join") +
				csv("$3", "!r2", "m.room.member", "@b", "join") + csv("$4", "!r2", "m.room.member", "@c", "join"),
				[]string{"!r1 @b added join", "!r2 @b added join", "!r2 @c added join"}},
			{"invite", rewrite("$5", "!r1", "@a", "invite"), nil},
			{"join", rewrite("$6", "!r1", "@a", "join"), []string{"!r1 @a added join"}},
			{"leave", rewrite("$7", "!r1", "@a", "leave"), []string{"!r1 @a removed leave"}},
			{"ban", rewrite("$8", "!r2", "@c", "ban"), []string{"!r2 @c removed ban"}},
			{"rejoin", rewrite("$9", "!r1", "@a", "join"), []string{"!r1 @a added join"}},
			{"deactivate", `UPDATE synapse_users SET deactivated = 1 WHERE name = '@b'`, []string{"!r1 @b removed deactivated", "!r2 @b removed deactivated"}},
			{"reactivate", `UPDATE synapse_users SET deactivated = 0 WHERE name = '@b'`, []string{"!r1 @b added reactivated", "!r2 @b added reactivated"}},
			{"rewrite unchanged", rewrite("$10", "!r1", "@a", "join"), nil},
			{"rewrite to leave", rewrite("$11", "!r2", "@b", "leave"), []string{"!r2 @b removed leave"}},
			{"filtered out", csv("$12", "!r1", "m.room.power_levels", "@c", "join") + csv("$13", "!r2", "m.room.name", "@c", ""), nil},
			{"replay", "", nil},
			{"join after replay", rewrite("$14", "!r2", "@c", "join"), []string{"!r2 @c added join"}},
		},
	}
	zulip := targetScenario{
		name: "zulip", schema: zulipSchema, tables: []string{"public.zerver_subscription", "public.zerver_userprofile"},
		tc: zulipTargets, truth: zulipTruth,
		steps: []targetStep{
			{"seed", `INSERT INTO zerver_userprofile(id) VALUES (1), (2), (3);
INSERT INTO zerver_subscription(user_profile_id, recipient_id) VALUES (2, 10), (2, 20), (3, 20)`,
				[]string{"10 2 added join", "20 2 added join", "20 3 added join"}},
			{"unsubscribe", `UPDATE zerver_subscription SET active = false WHERE user_profile_id = 3 AND recipient_id = 20`, []string{"20 3 removed leave"}},
			{"resubscribe", `UPDATE zerver_subscription SET active = true WHERE user_profile_id = 3 AND recipient_id = 20`, []string{"20 3 added join"}},
			{"deactivate", `UPDATE zerver_userprofile SET is_active = false WHERE id = 2`, []string{"10 2 removed deactivated", "20 2 removed deactivated"}},
			{"reactivate", `UPDATE zerver_userprofile SET is_active = true WHERE id = 2`, []string{"10 2 added reactivated", "20 2 added reactivated"}},
			{"rewrite unchanged", `BEGIN; DELETE FROM zerver_subscription WHERE user_profile_id = 1 AND recipient_id = 10;
DELETE FROM zerver_subscription WHERE user_profile_id = 2 AND recipient_id = 10;
INSERT INTO zerver_subscription(user_profile_id, recipient_id) VALUES (2, 10); COMMIT`, nil},
			{"replay", "", nil},
			{"subscribe after replay", `INSERT INTO zerver_subscription(user_profile_id, recipient_id) VALUES (1, 10)`, []string{"10 1 added join"}},
		},
	}
	for _, sc := range []targetScenario{canonical, synapse, zulip} {
		t.Run(sc.name, func(t *testing.T) { runTargetScenario(t, sc) })
	}
}

// zulipSchema is a Zulip-like layout: subscriptions with an active flag
// (and a surrogate key, so REPLICA IDENTITY FULL carries the user and
// recipient of a deleted row), users with is_active; integer ids.
const zulipSchema = `
CREATE TABLE zerver_userprofile (id integer PRIMARY KEY, is_active boolean NOT NULL DEFAULT true);
CREATE TABLE zerver_subscription (id serial PRIMARY KEY, user_profile_id integer NOT NULL, recipient_id integer NOT NULL,
  active boolean NOT NULL DEFAULT true, UNIQUE (user_profile_id, recipient_id));
ALTER TABLE zerver_subscription REPLICA IDENTITY FULL;`

func zulipTargets() *config.Targets {
	return &config.Targets{
		Membership: targets.MembershipSource{Table: "public.zerver_subscription", RoomColumn: "recipient_id", UserColumn: "user_profile_id",
			MembershipColumn: "active", Joined: []string{"true"}},
		Users: targets.UserSource{Table: "public.zerver_userprofile", UserColumn: "id", ActiveColumn: "is_active"},
	}
}

const zulipTruth = `SELECT s.recipient_id::text, s.user_profile_id::text FROM zerver_subscription s
LEFT JOIN zerver_userprofile u ON u.id = s.user_profile_id WHERE s.active AND coalesce(u.is_active, true)`

// demoSchemaTargets is the canonical schema's two tables the targets read.
const demoSchemaTargets = `
CREATE TABLE users (user_id text PRIMARY KEY, deactivated boolean NOT NULL DEFAULT false, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE room_memberships (room_id text NOT NULL, user_id text NOT NULL,
  membership text NOT NULL CHECK (membership IN ('join','leave','invite','ban')), event_id text,
  updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (room_id, user_id));`

func runTargetScenario(t *testing.T, sc targetScenario) {
	e := newEnv(t, "")
	e.exec(sc.schema)
	prefix := "tg" + sc.name[:3]
	tc := sc.tc()
	// Settling waits for END records, not for the hold: a long hold keeps
	// a loaded machine from settling by timeout (checkEnds below).
	tc.Hold = 10 * time.Second
	cfg := targetsConfig(e, prefix, sc.tables, tc)
	e.start(cfg)
	tg, stop := e.startTargets(cfg)
	changes := &changeReader{e: e, seen: map[string]bool{}}
	changesTopic := prefix + ".notify_target_changes"
	// Every transaction is settled once its END record says it is whole,
	// never by the hold's timeout.
	checkEnds := func() {
		if n := tg.Handler.Stats().HeldExpired.Load(); n != 0 {
			t.Errorf("%d transaction(s) settled by the hold, not by their END record", n)
		}
	}
	for _, st := range sc.steps {
		if st.name == "replay" {
			// A restarted consumer has no per-partition positions in memory:
			// only the kept state's own position guard stands between a
			// replayed history and resurrected members.
			stop()
			checkEnds()
			n := e.replayTopics(targetTopics(cfg))
			if n == 0 {
				t.Fatal("nothing to replay")
			}
			tg, stop = e.startTargets(cfg)
		} else {
			e.exec(st.sql)
		}
		e.waitTargets(cfg, 30*time.Second)
		kept, truth := e.pairs(keptSQL(cfg)), e.pairs(sc.truth)
		if !slices.Equal(kept, truth) {
			t.Fatalf("%s: kept targets %v, database says %v", st.name, kept, truth)
		}
		want := append([]string(nil), st.want...)
		sort.Strings(want)
		e.waitTopic(changesTopic, 30*time.Second) // a broker under load may not list it at once
		if got := changes.next(changesTopic); !slices.Equal(got, want) {
			t.Errorf("%s: change records %v, want %v", st.name, got, want)
		}
	}
	checkEnds()
	e.checkOutputs(cfg)
	// The compacted topic's latest value per room is the kept set.
	latest := e.latestTargets(prefix + ".notify_targets")
	byRoom := map[string][]string{}
	for _, p := range e.pairs(sc.truth) {
		r, u, ok := strings.Cut(p, " ")
		if !ok {
			t.Fatalf("pair %q is not \"room user\"", p)
		}
		byRoom[r] = append(byRoom[r], u)
	}
	for r, us := range byRoom {
		if !slices.Equal(latest[r], us) {
			t.Errorf("notify_targets latest for %s = %v, want %v", r, latest[r], us)
		}
	}
}

// canonicalEnv starts capture and the targets consumer on the canonical
// tables.
func canonicalEnv(t *testing.T, prefix string, mod func(*config.Targets)) (*env, *config.Config, func()) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	tc := &config.Targets{}
	if mod != nil {
		mod(tc)
	}
	cfg := targetsConfig(e, prefix, []string{"public.users", "public.room_memberships"}, tc)
	e.start(cfg)
	_, stop := e.startTargets(cfg)
	return e, cfg, stop
}

// checkOutputs checks the topics against the kept state: per room, the
// change records (a record repeated after a crash, same position, aside)
// each flip a member's state and end at the kept set, and the compacted
// topic's latest value is the kept set.
func (e *env) checkOutputs(cfg *config.Config) {
	e.t.Helper()
	kept := map[string][]string{}
	for _, p := range e.pairs(keptSQL(cfg)) {
		r, u, ok := strings.Cut(p, " ")
		if !ok {
			e.t.Fatalf("pair %q is not \"room user\"", p)
		}
		kept[r] = append(kept[r], u)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), cfg.Kafka.TopicPrefix+".notify_target_changes")
	if err != nil {
		e.t.Fatal(err)
	}
	// A consumer's view: per room, versions only grow; a version seen
	// before is a republication after a crash and is skipped.
	state := map[string]map[string]bool{}
	version := map[string]uint64{}
	inVersion := map[string]map[string]bool{}
	for _, m := range byPartitionOffset(toMsgs(recs)) {
		var c changeRec
		if err := json.Unmarshal(m.Value, &c); err != nil {
			e.t.Fatal(err)
		}
		cur := version[c.Room]
		switch {
		case c.Version < cur || (c.Version == cur && inVersion[c.Room][c.User]):
			continue // published again after a crash
		case c.Version > cur+1:
			e.t.Errorf("room %s: version %d follows %d: an update was lost", c.Room, c.Version, cur)
		}
		if c.Version > cur {
			version[c.Room] = c.Version
			inVersion[c.Room] = map[string]bool{}
		}
		inVersion[c.Room][c.User] = true
		if state[c.Room] == nil {
			state[c.Room] = map[string]bool{}
		}
		added := c.Change == "added"
		if state[c.Room][c.User] == added {
			e.t.Errorf("change record %v at %d/%d changes nothing: the stream is out of order or lost a record", c, m.Partition, m.Offset)
		}
		state[c.Room][c.User] = added
	}
	rooms := map[string]bool{}
	for r := range state {
		rooms[r] = true
	}
	for r := range kept {
		rooms[r] = true
	}
	latest := e.latestTargets(cfg.Kafka.TopicPrefix + ".notify_targets")
	for r := range rooms {
		var folded []string
		for u, in := range state[r] {
			if in {
				folded = append(folded, u)
			}
		}
		sort.Strings(folded)
		if !slices.Equal(folded, kept[r]) {
			e.t.Errorf("room %s: change records fold to %v, kept %v", r, folded, kept[r])
		}
		if len(latest[r])+len(kept[r]) > 0 && !slices.Equal(latest[r], kept[r]) {
			e.t.Errorf("room %s: latest notify_targets %v, kept %v", r, latest[r], kept[r])
		}
	}
}

// TestTargetsDeactivateFiftyRooms (acceptance 2): deactivating a user who
// is in 50 rooms emits exactly 50 removals with reason "deactivated", and
// the compacted topic's latest value of each room no longer lists them.
func TestTargetsDeactivateFiftyRooms(t *testing.T) {
	e, cfg, _ := canonicalEnv(t, "deact", nil)
	e.exec(`INSERT INTO users(user_id) VALUES ('@d'), ('@o');
INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!room' || g, u, 'join' FROM generate_series(1, 50) g, (VALUES ('@d'), ('@o')) AS v(u);
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!other', '@o', 'join'), ('!left', '@d', 'leave')`)
	e.waitTargets(cfg, 30*time.Second)
	changes := &changeReader{e: e, seen: map[string]bool{}}
	topic := cfg.Kafka.TopicPrefix + ".notify_target_changes"
	if got := len(changes.next(topic)); got != 101 {
		t.Fatalf("seeding produced %d change records, want 101 additions", got)
	}
	e.exec(`UPDATE users SET deactivated = true WHERE user_id = '@d'`)
	e.waitTargets(cfg, 30*time.Second)
	got := changes.next(topic)
	var want []string
	for g := 1; g <= 50; g++ {
		want = append(want, fmt.Sprintf("!room%d @d removed deactivated", g))
	}
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Fatalf("deactivation emitted %d records %v, want exactly the 50 removals %v", len(got), got, want)
	}
	latest := e.latestTargets(cfg.Kafka.TopicPrefix + ".notify_targets")
	for g := 1; g <= 50; g++ {
		room := fmt.Sprintf("!room%d", g)
		if !slices.Equal(latest[room], []string{"@o"}) {
			t.Errorf("latest notify_targets of %s = %v, want [@o]", room, latest[room])
		}
	}
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) {
		t.Errorf("kept %d pairs, database %d", len(kept), len(truth))
	}
}

// TestTargetsAuditAndRebuild (acceptance 3): corrupting the kept state on
// purpose makes audit report exactly the corrupted rooms and the right
// ratio; rebuild repairs the state (and the Redis sets and topics, with
// reason "rebuild"); a second audit reports 1.0.
func TestTargetsAuditAndRebuild(t *testing.T) {
	rd := redistest.ForTest(t)
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "audit", []string{"public.users", "public.room_memberships"}, &config.Targets{
		Redis:         &config.TargetsRedis{Redis: config.Redis{Addr: rd.Addr()}},
		AuditInterval: 200 * time.Millisecond, // the role's periodic audit feeds the gauge
	})
	e.start(cfg)
	reg := prometheus.NewRegistry()
	_, stop := e.startTargetsWith(cfg, reg)
	gauge := func(name string) float64 { return auditMetric(t, reg, name) }
	// waitGauge waits for a periodic audit that started after now to
	// report want.
	waitGauge := func(want float64) {
		t.Helper()
		start := gauge("tidemark_notify_targets_audits_total")
		deadline := time.Now().Add(30 * time.Second)
		for gauge("tidemark_notify_targets_audits_total") < start+2 || gauge("tidemark_notify_targets_consistency_ratio") != want {
			if time.Now().After(deadline) {
				t.Fatalf("consistency gauge %v after %v audits, want %v", gauge("tidemark_notify_targets_consistency_ratio"),
					gauge("tidemark_notify_targets_audits_total")-start, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	ctx := context.Background()
	e.exec(`INSERT INTO users(user_id) SELECT '@u' || g FROM generate_series(1, 8) g;
INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!c' || r, '@u' || u, CASE WHEN u <= 5 THEN 'join' ELSE 'leave' END FROM generate_series(1, 20) r, generate_series(1, 8) u`)
	e.waitTargets(cfg, 30*time.Second)
	audit := func() targets.AuditReport {
		t.Helper()
		rep, err := app.AuditTargets(ctx, cfg, 0, 30*time.Second)
		if err != nil {
			t.Fatalf("audit: %v", err)
		}
		return rep
	}
	if rep := audit(); rep.Ratio != 1 || rep.Rooms != 20 {
		t.Fatalf("audit before corruption: %d rooms, ratio %v, mismatches %v", rep.Rooms, rep.Ratio, rep.Mismatches)
	}
	// Corrupt: a member missing in !c1, a stranger in !c2, !c3 emptied.
	e.exec(`DELETE FROM tidemark.notify_targets WHERE room_id = '!c1' AND user_id = '@u2';
INSERT INTO tidemark.notify_targets(room_id, user_id, lsn, seq) VALUES ('!c2', '@stranger', 0, 0);
DELETE FROM tidemark.notify_targets WHERE room_id = '!c3'`)
	rep := audit()
	if rep.Rooms != 20 || rep.Consistent != 17 || rep.Ratio != 17.0/20 || rep.Unconfirmed {
		t.Fatalf("audit after corruption: %d rooms, %d consistent, ratio %v (unconfirmed %v); want 20, 17, 0.85",
			rep.Rooms, rep.Consistent, rep.Ratio, rep.Unconfirmed)
	}
	got := fmt.Sprint(rep.Mismatches)
	want := "[{!c1 [@u2] []} {!c2 [] [@stranger]} {!c3 [@u1 @u2 @u3 @u4 @u5] []}]"
	if got != want {
		t.Fatalf("mismatches %s, want %s", got, want)
	}
	waitGauge(17.0 / 20)
	changes := &changeReader{e: e, seen: map[string]bool{}}
	topic := cfg.Kafka.TopicPrefix + ".notify_target_changes"
	changes.next(topic) // skip the seeding's records
	rb, err := app.RebuildTargets(ctx, cfg, nil, []string{"!c1"}, false)
	if err != nil {
		t.Fatalf("rebuild --room: %v", err)
	}
	if rb.Rooms != 1 || rb.Added != 1 || rb.Removed != 0 {
		t.Errorf("rebuild --room !c1 = %+v, want 1 room, 1 added", rb)
	}
	if rep := audit(); rep.Consistent != 18 {
		t.Errorf("after rebuilding !c1: %d consistent, want 18 (%v)", rep.Consistent, rep.Mismatches)
	}
	rb, err = app.RebuildTargets(ctx, cfg, nil, nil, true)
	if err != nil {
		t.Fatalf("rebuild --all: %v", err)
	}
	if rb.Changed != 2 || rb.Added != 5 || rb.Removed != 1 {
		t.Errorf("rebuild --all = %+v, want 2 rooms changed, 5 added, 1 removed", rb)
	}
	if rep := audit(); rep.Ratio != 1 || rep.Rooms != 20 {
		t.Fatalf("audit after rebuild: ratio %v, mismatches %v", rep.Ratio, rep.Mismatches)
	}
	waitGauge(1)
	wantChanges := []string{"!c1 @u2 added rebuild", "!c2 @stranger removed rebuild"}
	for u := 1; u <= 5; u++ {
		wantChanges = append(wantChanges, fmt.Sprintf("!c3 @u%d added rebuild", u))
	}
	sort.Strings(wantChanges)
	if got := changes.next(topic); !slices.Equal(got, wantChanges) {
		t.Errorf("rebuild change records %v, want %v", got, wantChanges)
	}
	// The Redis sets follow: every room's set is its kept targets.
	rc := rd.Client()
	for r := 1; r <= 20; r++ {
		room := fmt.Sprintf("!c%d", r)
		members, err := rc.SMembers(ctx, "notify_targets:"+room).Result()
		if err != nil {
			t.Fatal(err)
		}
		sort.Strings(members)
		if want := []string{"@u1", "@u2", "@u3", "@u4", "@u5"}; !slices.Equal(members, want) {
			t.Errorf("redis set of %s = %v, want %v", room, members, want)
		}
	}
	// A rebuild with nothing to repair changes nothing.
	if rb, err = app.RebuildTargets(ctx, cfg, nil, nil, true); err != nil || rb.Changed != 0 {
		t.Errorf("second rebuild --all = %+v, %v; want no change", rb, err)
	}

	// Lag is no inconsistency: with the consumer stopped, the database
	// moves on (a join, a deactivation touching every room); the audit sees
	// the differences, waits for the pipeline to pass the LSN it read at,
	// re-checks and reports 1.0.
	stop()
	e.exec(`INSERT INTO users(user_id) VALUES ('@late');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!c4', '@late', 'join');
UPDATE users SET deactivated = true WHERE user_id = '@u1'`)
	type result struct {
		rep targets.AuditReport
		err error
	}
	res := make(chan result, 1)
	go func() {
		rep, err := app.AuditTargets(ctx, cfg, 0, 60*time.Second)
		res <- result{rep, err}
	}()
	time.Sleep(time.Second)
	select {
	case r := <-res:
		t.Fatalf("audit finished while the consumer was stopped: %+v, %v", r.rep, r.err)
	default:
	}
	e.startTargets(cfg)
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.rep.Ratio != 1 || r.rep.Unconfirmed || r.rep.Suspected != 20 {
		t.Errorf("audit while lagging: ratio %v, unconfirmed %v, suspected %d (want 1, false, 20), mismatches %v",
			r.rep.Ratio, r.rep.Unconfirmed, r.rep.Suspected, r.rep.Mismatches)
	}
}

// membershipWorkload commits n random membership transactions on the
// canonical tables: joins, leaves, bans, invites, DELETE+INSERT rewrites,
// deletions, deactivations and reactivations, over 12 rooms and 40 users.
func membershipWorkload(ctx context.Context, e *env, n int, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, seed*31+7))
	states := []string{"join", "join", "leave", "ban", "invite"}
	for i := 0; i < n; i++ {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		room := fmt.Sprintf("!w%d", rng.IntN(12))
		user := fmt.Sprintf("@w%d", rng.IntN(40))
		var sql string
		switch k := rng.IntN(100); {
		case k < 60:
			sql = fmt.Sprintf(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('%s', '%s', '%s')
ON CONFLICT (room_id, user_id) DO UPDATE SET membership = EXCLUDED.membership`, room, user, states[rng.IntN(len(states))])
		case k < 80:
			sql = fmt.Sprintf(`BEGIN; DELETE FROM room_memberships WHERE room_id = '%s' AND user_id = '%s';
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('%s', '%s', '%s'); COMMIT`, room, user, room, user, states[rng.IntN(len(states))])
		case k < 87:
			sql = fmt.Sprintf(`DELETE FROM room_memberships WHERE room_id = '%s' AND user_id = '%s'`, room, user)
		default:
			sql = fmt.Sprintf(`INSERT INTO users(user_id, deactivated) VALUES ('%s', %v)
ON CONFLICT (user_id) DO UPDATE SET deactivated = EXCLUDED.deactivated`, user, rng.IntN(2) == 0)
		}
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			return fmt.Errorf("workload transaction %d: %w", i, err)
		}
	}
	return nil
}

// TestTargetsRebuildDuringWorkload (acceptance 4): rebuilds of all rooms
// and of single rooms run while a membership workload commits; once the
// pipeline has caught up, the kept state equals the database and the
// audit reports 1.0. Audits running during the workload (the consumer
// lagging, rebuilds rewriting) report 1.0 too: lag raises no false alarm.
func TestTargetsRebuildDuringWorkload(t *testing.T) {
	e, cfg, _ := canonicalEnv(t, "rbw", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The workload goes on (2,500 statements, then more) until at least
	// three rebuilds and one audit have run during it.
	done, stopWorkload := make(chan error, 1), make(chan struct{})
	go func() {
		for seed := uint64(4); ; seed++ {
			if err := membershipWorkload(ctx, e, 2500, seed); err != nil {
				done <- err
				return
			}
			select {
			case <-stopWorkload:
				done <- nil
				return
			default:
			}
		}
	}()
	// Audits run meanwhile, while the consumer lags the workload and
	// rebuilds rewrite the state: none may raise a false alarm.
	auditDone, auditStop := make(chan struct{}), make(chan struct{})
	var audits atomic.Int64
	var auditErr error
	go func() {
		defer close(auditDone)
		for ctx.Err() == nil {
			select {
			case <-auditStop:
				return
			default:
			}
			rep, err := app.AuditTargets(ctx, cfg, 0, 30*time.Second)
			if err != nil {
				auditErr = err
				return
			}
			if rep.Ratio != 1 || rep.Unconfirmed {
				auditErr = fmt.Errorf("audit during the workload: ratio %v (unconfirmed %v), mismatches %v", rep.Ratio, rep.Unconfirmed, rep.Mismatches)
				return
			}
			audits.Add(1)
		}
	}()
	rebuilds := 0
	stopping := false
	var lastRep targets.RebuildReport
loop:
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			break loop
		default:
		}
		rooms, all := []string{fmt.Sprintf("!w%d", rebuilds%12)}, rebuilds%3 == 0
		if all {
			rooms = nil
		}
		rep, err := app.RebuildTargets(ctx, cfg, nil, rooms, all)
		if err != nil {
			t.Fatalf("rebuild %d: %v", rebuilds, err)
		}
		lastRep = rep
		rebuilds++
		if !stopping && rebuilds >= 3 && audits.Load() >= 1 {
			stopping = true
			close(stopWorkload)
		}
	}
	close(auditStop)
	<-auditDone
	if auditErr != nil {
		t.Fatal(auditErr)
	}
	if rebuilds < 3 || audits.Load() < 1 {
		t.Fatalf("only %d rebuilds and %d audits ran during the workload", rebuilds, audits.Load())
	}
	t.Logf("%d audits ran during the workload, each with ratio 1", audits.Load())
	t.Logf("%d rebuilds ran during the workload (last: %+v)", rebuilds, lastRep)
	e.waitTargets(cfg, 60*time.Second)
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) {
		t.Fatalf("kept state differs from the database after catch-up:\nkept  %v\ntruth %v", kept, truth)
	}
	e.checkOutputs(cfg)
	rep, err := app.AuditTargets(context.Background(), cfg, 0, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Ratio != 1 || rep.Rooms == 0 {
		t.Fatalf("audit after catch-up: %d rooms, ratio %v, mismatches %v", rep.Rooms, rep.Ratio, rep.Mismatches)
	}
}

// TestTargetsConsumerKilled (acceptance 5): the targets role (the real
// binary) is SIGKILLed mid-stream and restarted; the kept state ends equal
// to the database and the audit reports 1.0.
func TestTargetsConsumerKilled(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "kill", []string{"public.users", "public.room_memberships"}, &config.Targets{})
	e.start(cfg)
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "targets.yml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	bin := binary(t)
	run := func() *exec.Cmd {
		cmd := exec.Command(bin, "run", "--role", "targets", "--config", path)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- membershipWorkload(ctx, e, 3000, 5) }()
	cmd := run()
	// Kill it once it has applied part of the stream.
	deadline := time.Now().Add(60 * time.Second)
	for {
		var n int
		err := e.pool.QueryRow(ctx, `SELECT count(*) FROM tidemark.notify_memberships`).Scan(&n)
		if err == nil && n >= 100 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the consumer applied nothing within 60s (%v)", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	kill(t, cmd)
	select {
	case err := <-done:
		t.Fatalf("the workload ended before the kill (%v): make it longer", err)
	default:
	}
	cmd = run()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	e.waitTargets(cfg, 60*time.Second)
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) {
		t.Fatalf("kept state differs from the database after the restart:\nkept  %v\ntruth %v", kept, truth)
	}
	e.checkOutputs(cfg)
	rep, err := app.AuditTargets(context.Background(), cfg, 0, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Ratio != 1 || rep.Rooms == 0 {
		t.Fatalf("audit after restart: %d rooms, ratio %v, mismatches %v", rep.Rooms, rep.Ratio, rep.Mismatches)
	}
	// The commands, as an operator runs them.
	cli := func(wantCode int, args ...string) string {
		t.Helper()
		out, err := exec.Command(bin, append(args, "--config", path)...).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != wantCode {
			t.Fatalf("tidemark %v: exit %d, want %d\n%s", args, code, wantCode, out)
		}
		return string(out)
	}
	if out := cli(0, "check"); !strings.Contains(out, "targets mapping: checked against the tables") {
		t.Errorf("check output: %s", out)
	}
	if out := cli(0, "audit", "targets"); !strings.Contains(out, "ratio 1.0000") {
		t.Errorf("audit output: %s", out)
	}
	e.exec(`DELETE FROM tidemark.notify_targets WHERE room_id = (SELECT min(room_id) FROM tidemark.notify_targets)`)
	if out := cli(4, "audit", "targets", "--sample", "100", "--wait", "20s"); !strings.Contains(out, "missing [@w") {
		t.Errorf("audit of a corrupted room: %s", out)
	}
	cli(2, "rebuild", "targets")
	if out := cli(0, "rebuild", "targets", "--all"); !strings.Contains(out, "user(s) added") {
		t.Errorf("rebuild output: %s", out)
	}
	cli(0, "audit", "targets")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("graceful stop: %v", err)
	}
}

// TestTargetsMappingChecked: a mapping that does not fit the database is
// refused before anything runs, every problem named by field path, with
// the fix.
func TestTargetsMappingChecked(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE current_state_events (event_id text NOT NULL, room_id text NOT NULL, type text NOT NULL,
  state_key text NOT NULL, membership text);
CREATE TABLE synapse_users (name text PRIMARY KEY, deactivated smallint NOT NULL DEFAULT 0);
ALTER TABLE synapse_users REPLICA IDENTITY FULL;`)
	tc := synapseTargets()
	tc.Membership.Filter = "kind = 'm.room.member'"
	tc.Users.DeactivatedColumn = "is_deactivated"
	cfg := targetsConfig(e, "map", []string{"public.current_state_events", "public.synapse_users"}, tc)
	_, err := app.PrepareTargets(context.Background(), cfg, nil)
	if err == nil {
		t.Fatal("PrepareTargets accepted a mapping that does not fit")
	}
	for _, want := range []string{
		`targets.membership.room_column: "room_id" is not in public.current_state_events's replica identity`,
		`ALTER TABLE "public"."current_state_events" REPLICA IDENTITY FULL;`,
		`targets.membership.filter: public.current_state_events has no column "kind"`,
		`targets.users.deactivated_column: public.synapse_users has no column "is_deactivated"`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if err := app.CheckTargets(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "REPLICA IDENTITY FULL") {
		t.Errorf("CheckTargets = %v", err)
	}
}

// A room whose full target set is larger than Kafka's default 1 MiB record
// limit (12,000 members of 107-byte ids, ~1.3 MB of JSON) is published whole, and a later
// join updates it: one big room must not stall the consumer.
//
// The room stays below targets.full_set_max_members here, so every update
// carries the set; TestTargetsLargeRoomDeltas covers rooms above it.
func TestTargetsLargeRoom(t *testing.T) {
	e, cfg, _ := canonicalEnv(t, "bigroom", func(tc *config.Targets) { tc.FullSetMaxMembers = 20000 })
	const n = 12000
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!big', '@member-' || lpad(g::text, 6, '0') || ':' || repeat('x', 80) || '.example.org', 'join' FROM generate_series(1, $1) g`, n)
	e.waitTargets(cfg, 3*time.Minute)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!big', '@late:big.example.org', 'join'), ('!small', '@a', 'join')`)
	e.waitTargets(cfg, time.Minute)
	latest := e.latestTargets(cfg.Kafka.TopicPrefix + ".notify_targets")
	if got := len(latest["!big"]); got != n+1 {
		t.Fatalf("latest notify_targets of !big lists %d users, want %d", got, n+1)
	}
	if !slices.Equal(latest["!small"], []string{"@a"}) {
		t.Fatalf("latest notify_targets of !small = %v", latest["!small"])
	}
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) {
		t.Errorf("kept %d pairs, database %d", len(kept), len(truth))
	}
}

// When the notify_targets topic already exists with the broker's default
// max.message.bytes (1 MiB), a room too large for it is published without
// its list ("truncated": true, "user_count"), counted, and the other rooms
// keep flowing.
func TestTargetsLargeRoomOnSmallTopic(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "smalltopic", []string{"public.users", "public.room_memberships"}, &config.Targets{FullSetMaxMembers: 20000})
	pre, err := kafkasink.New(kafkasink.Config{Brokers: cfg.Kafka.Brokers, Partitions: cfg.Kafka.Partitions}, nil)
	if err != nil {
		t.Fatal(err)
	}
	topic := cfg.Kafka.TopicPrefix + ".notify_targets"
	if err := pre.EnsureTopics(context.Background(), []string{topic}, nil); err != nil {
		t.Fatal(err)
	}
	if err := pre.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.start(cfg)
	reg := prometheus.NewRegistry()
	e.startTargetsWith(cfg, reg)
	const n = 12000
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!big', '@member-' || lpad(g::text, 6, '0') || ':' || repeat('x', 80) || '.example.org', 'join' FROM generate_series(1, $1) g`, n)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!small', '@a', 'join')`)
	e.waitTargets(cfg, 3*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	recs, err := kafkatest.ReadAll(ctx, e.kafka.Brokers(), topic)
	if err != nil {
		t.Fatal(err)
	}
	type rec struct {
		Room      string   `json:"room_id"`
		Users     []string `json:"users"`
		Truncated bool     `json:"truncated"`
		Count     int      `json:"user_count"`
	}
	latest := map[string]rec{}
	for _, m := range byPartitionOffset(toMsgs(recs)) {
		var r rec
		if err := json.Unmarshal(m.Value, &r); err != nil {
			t.Fatalf("%s record %s: %v", topic, m.Value, err)
		}
		latest[r.Room] = r
	}
	if b := latest["!big"]; !b.Truncated || b.Count != n || b.Users != nil {
		t.Fatalf("latest !big record: truncated %v, user_count %d, %d users listed; want truncated, %d, none", b.Truncated, b.Count, len(b.Users), n)
	}
	if s := latest["!small"]; s.Truncated || !slices.Equal(s.Users, []string{"@a"}) {
		t.Fatalf("latest !small record: %+v", s)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var truncated float64
	for _, mf := range mfs {
		if mf.GetName() == "tidemark_notify_targets_truncated_records_total" {
			truncated = mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if truncated < 1 {
		t.Errorf("tidemark_notify_targets_truncated_records_total = %v, want >= 1", truncated)
	}
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) {
		t.Errorf("kept %d pairs, database %d", len(kept), len(truth))
	}
}
