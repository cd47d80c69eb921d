package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/pipeline"
)

// TestTargetsLargeRoomBench measures a join and a leave in one room of
// TIDEMARK_LARGE_ROOM_MEMBERS members (skipped without it), end to end
// with the default targets configuration, Kafka topics and Redis: from the
// source's commit to the user's presence in the Redis set changing, and to
// the update being published (the room settled and its outbox empty);
// and the bytes each change writes: the cluster's WAL (the source row and
// the state; the state lives in the same cluster here), Redis's input and
// the records of the two targets topics. TIDEMARK_LARGE_ROOM_ROUNDS
// (default 10) rounds of one join and one leave; every round is printed,
// then min / median / max. It is a benchmark, not a timed test: it asserts
// only that the outputs are right.
func TestTargetsLargeRoomBench(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("TIDEMARK_LARGE_ROOM_MEMBERS"))
	if n <= 0 {
		t.Skip("set TIDEMARK_LARGE_ROOM_MEMBERS (e.g. 500000) to run the large-room benchmark")
	}
	rounds := 10
	if v, _ := strconv.Atoi(os.Getenv("TIDEMARK_LARGE_ROOM_ROUNDS")); v > 0 {
		rounds = v
	}
	rd := redistest.ForTest(t)
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "largebench", []string{"public.users", "public.room_memberships"}, &config.Targets{
		Redis: &config.TargetsRedis{Redis: config.Redis{Addr: rd.Addr()}},
	})
	e.start(cfg)
	e.startTargets(cfg)
	ctx := context.Background()
	rc := rd.Client()
	defer rc.Close()
	fillStart := time.Now()
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!huge', '@member-' || lpad(g::text, 7, '0') || ':example.org', 'join' FROM generate_series(1, $1) g`, n)
	e.waitTargets(cfg, 15*time.Minute)
	t.Logf("filled !huge with %d members in %s", n, time.Since(fillStart).Round(time.Millisecond))
	if c, err := rc.SCard(ctx, "notify_targets:!huge").Result(); err != nil || c != int64(n) {
		t.Fatalf("Redis set of !huge: %d members (%v), want %d", c, err, n)
	}
	netIn := func() int64 {
		info, err := rc.Info(ctx, "stats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(l, "total_net_input_bytes:"); ok {
				b, _ := strconv.ParseInt(v, 10, 64)
				return b
			}
		}
		t.Fatal("no total_net_input_bytes in INFO stats")
		return 0
	}
	published := func() bool {
		var k int
		if err := e.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM tidemark.notify_rooms WHERE dirty) + (SELECT count(*) FROM tidemark.notify_outbox)`).Scan(&k); err != nil {
			t.Fatal(err)
		}
		return k == 0
	}
	type sample struct {
		redis, pub          time.Duration
		wal, redisIn, kafka int64
	}
	var joins, leaves []sample
	startLSN := e.currentLSN()
	// kafkaBytes reads both targets topics and returns the bytes of the
	// records not seen before, from after the fill. Read after every
	// change: notify_targets is compacted, so a later read could miss a
	// record its successor replaced.
	seen := map[string]bool{}
	kafkaBytes := func() int64 {
		t.Helper()
		rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		var n int64
		for _, topic := range []string{cfg.Kafka.TopicPrefix + ".notify_targets", cfg.Kafka.TopicPrefix + ".notify_target_changes"} {
			recs, err := kafkatest.ReadAll(rctx, e.kafka.Brokers(), topic)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range recs {
				id := fmt.Sprintf("%s/%d/%d", topic, r.Partition, r.Offset)
				if seen[id] {
					continue
				}
				seen[id] = true
				l, err := strconv.ParseUint(r.Headers["tidemark-lsn"], 10, 64)
				if err != nil {
					t.Fatalf("%s record %d/%d: tidemark-lsn %q: %v", topic, r.Partition, r.Offset, r.Headers["tidemark-lsn"], err)
				}
				if pipeline.LSN(l) < startLSN {
					continue
				}
				n += int64(len(r.Key) + len(r.Value))
				for k, v := range r.Headers {
					n += int64(len(k) + len(v))
				}
			}
		}
		return n
	}
	kafkaBytes()
	change := func(sql, user string, member bool) sample {
		t.Helper()
		wal0, in0 := e.currentLSN(), netIn()
		// The throwaway server runs synchronous_commit=off, whose commits
		// reach the walsender only at the WAL writer's next flush (up to
		// wal_writer_delay, 200 ms): this change commits synchronously.
		if err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = on`); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, sql, user)
			return err
		}); err != nil {
			t.Fatalf("%s %s: %v", sql, user, err)
		}
		committed := time.Now()
		var s sample
		polls := 0
		deadline := committed.Add(5 * time.Minute)
		for s.redis == 0 || s.pub == 0 {
			if s.redis == 0 {
				polls++
				if ok, err := rc.SIsMember(ctx, "notify_targets:!huge", user).Result(); err != nil {
					t.Fatal(err)
				} else if ok == member {
					s.redis = time.Since(committed)
				}
			}
			if s.pub == 0 && published() {
				polls++
				if ok, err := rc.SIsMember(ctx, "notify_targets:!huge", user).Result(); err == nil && ok == member {
					s.pub = time.Since(committed)
					if s.redis == 0 {
						s.redis = s.pub
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s %s: not published within 5 minutes", sql, user)
			}
			time.Sleep(200 * time.Microsecond)
		}
		// Redis input less this test's own commands: the polls and one
		// INFO (the first INFO's bytes were counted before it answered).
		s.wal = int64(e.currentLSN() - wal0)
		s.redisIn = netIn() - in0 - int64(polls)*respSize("SISMEMBER", "notify_targets:!huge", user) - respSize("info", "stats")
		s.kafka = kafkaBytes()
		return s
	}
	for i := 0; i < rounds; i++ {
		u := fmt.Sprintf("@bench-%03d:example.org", i)
		j := change(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!huge', $1, 'join')`, u, true)
		l := change(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = '!huge' AND user_id = $1`, u, false)
		joins, leaves = append(joins, j), append(leaves, l)
		t.Logf("round %2d: join redis %7.1f ms published %7.1f ms wal %8d B redis-in %8d B kafka %8d B | leave redis %7.1f ms published %7.1f ms wal %8d B redis-in %8d B kafka %8d B",
			i+1, ms(j.redis), ms(j.pub), j.wal, j.redisIn, j.kafka, ms(l.redis), ms(l.pub), l.wal, l.redisIn, l.kafka)
	}
	report := func(what string, ss []sample) {
		pick := func(f func(sample) float64) string {
			v := make([]float64, len(ss))
			for i, s := range ss {
				v[i] = f(s)
			}
			slices.Sort(v)
			return fmt.Sprintf("%.1f / %.1f / %.1f", v[0], v[len(v)/2], v[len(v)-1])
		}
		t.Logf("%s (min / median / max of %d): commit to Redis %s ms; commit to published %s ms; WAL %s KB; Redis input %s KB; Kafka records %s KB",
			what, len(ss), pick(func(s sample) float64 { return ms(s.redis) }), pick(func(s sample) float64 { return ms(s.pub) }),
			pick(func(s sample) float64 { return float64(s.wal) / 1024 }), pick(func(s sample) float64 { return float64(s.redisIn) / 1024 }),
			pick(func(s sample) float64 { return float64(s.kafka) / 1024 }))
	}
	report("join", joins)
	report("leave", leaves)
	if c, err := rc.SCard(ctx, "notify_targets:!huge").Result(); err != nil || c != int64(n) {
		t.Fatalf("Redis set of !huge after the rounds: %d members (%v), want %d", c, err, n)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// respSize is the size of a command in RESP, as a client sends it.
func respSize(args ...string) int64 {
	n := len(fmt.Sprintf("*%d\r\n", len(args)))
	for _, a := range args {
		n += len(fmt.Sprintf("$%d\r\n%s\r\n", len(a), a))
	}
	return int64(n)
}

// TestTargetsMassDeactivationBench deactivates a user who is in
// TIDEMARK_DEACTIVATE_ROOMS rooms (skipped without it) and, right after,
// commits a join in another room (named to sort after every room of the
// deactivation, so settling in name order would reach it last): it reports how long the join took to
// reach Redis while the deactivation was being settled, and how long the
// deactivation took to reach every room's set. A benchmark, not a timed
// test: it asserts only that the outputs end right.
func TestTargetsMassDeactivationBench(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("TIDEMARK_DEACTIVATE_ROOMS"))
	if n <= 0 {
		t.Skip("set TIDEMARK_DEACTIVATE_ROOMS (e.g. 100000) to run the mass-deactivation benchmark")
	}
	rd := redistest.ForTest(t)
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "deactbench", []string{"public.users", "public.room_memberships"}, &config.Targets{
		Redis: &config.TargetsRedis{Redis: config.Redis{Addr: rd.Addr()}},
	})
	e.start(cfg)
	e.startTargets(cfg)
	ctx := context.Background()
	rc := rd.Client()
	defer rc.Close()
	e.exec(`INSERT INTO users(user_id) VALUES ('@d'), ('@o')`)
	e.exec(`INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!r' || g, u, 'join' FROM generate_series(1, $1) g, unnest(ARRAY['@d', '@o']) u`, n)
	fillStart := time.Now()
	e.waitTargets(cfg, 15*time.Minute)
	t.Logf("%d rooms of 2 members settled in %s", n, time.Since(fillStart).Round(time.Millisecond))
	syncExec := func(sql string) time.Time {
		t.Helper()
		if err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = on`); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, sql)
			return err
		}); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return time.Now()
	}
	deact := syncExec(`UPDATE users SET deactivated = true WHERE user_id = '@d'`)
	joined := syncExec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!zz-other', '@o', 'join')`)
	var joinLat, lastRoom time.Duration
	deadline := time.Now().Add(10 * time.Minute)
	for joinLat == 0 || lastRoom == 0 {
		if joinLat == 0 {
			if ok, err := rc.SIsMember(ctx, "notify_targets:!zz-other", "@o").Result(); err != nil {
				t.Fatal(err)
			} else if ok {
				joinLat = time.Since(joined)
			}
		}
		if lastRoom == 0 {
			// Every room settled and published: no kept target of @d
			// and nothing in the outbox.
			var left int
			if err := e.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM tidemark.notify_targets WHERE user_id = '@d') + (SELECT count(*) FROM tidemark.notify_outbox)`).Scan(&left); err != nil {
				t.Fatal(err)
			}
			if left == 0 {
				lastRoom = time.Since(deact)
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("not settled within 10 minutes")
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("deactivation in %d rooms: every room settled %.0f ms after its commit; a join in another room committed right after reached Redis in %.1f ms",
		n, ms(lastRoom), ms(joinLat))
	e.waitTargets(cfg, 10*time.Minute)
	for _, r := range []int{1, n / 2, n} {
		if ok, err := rc.SIsMember(ctx, fmt.Sprintf("notify_targets:!r%d", r), "@d").Result(); err != nil || ok {
			t.Fatalf("!r%d still lists @d in Redis (%v)", r, err)
		}
	}
}
