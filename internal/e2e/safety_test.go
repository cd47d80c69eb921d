package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/pipeline"
)

// TestReplicaIdentityRefused: a table without replica identity is refused
// with the exact ALTER TABLE to run, is not added to the publication, and
// the application's UPDATE on it keeps working.
func TestReplicaIdentityRefused(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE ok_table (id int PRIMARY KEY, v text);
CREATE TABLE no_pk (room_id text, user_id text, v text);
CREATE TABLE has_unique (id int NOT NULL, v text);
CREATE UNIQUE INDEX has_unique_id ON has_unique (id);
CREATE TABLE nothing_ident (id int PRIMARY KEY, v text);
ALTER TABLE nothing_ident REPLICA IDENTITY NOTHING;
INSERT INTO no_pk VALUES ('!r', '@u', 'a');`)
	cfg := e.config("ident", []string{"public.ok_table", "public.no_pk", "public.has_unique", "public.nothing_ident"}, nil)
	_, err := app.Prepare(context.Background(), cfg, nil)
	var pe *capture.PreflightError
	if !errors.As(err, &pe) {
		t.Fatalf("Prepare = %v, want a PreflightError", err)
	}
	msg := err.Error()
	for _, want := range []string{
		`public.no_pk: has no replica identity`,
		`fix: ALTER TABLE "public"."no_pk" REPLICA IDENTITY FULL;`,
		`fix: ALTER TABLE "public"."has_unique" REPLICA IDENTITY USING INDEX "has_unique_id";`,
		`public.nothing_ident: has REPLICA IDENTITY NOTHING`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "ok_table") {
		t.Errorf("error mentions the healthy table:\n%s", msg)
	}
	var pubs int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_publication WHERE pubname = $1`, cfg.Postgres.Publication).Scan(&pubs); err != nil {
		t.Fatal(err)
	}
	if pubs != 0 {
		t.Errorf("publication was created despite the refusal")
	}
	// The application's writes keep working.
	e.exec(`UPDATE no_pk SET v = 'b' WHERE user_id = '@u'`)
	e.exec(`DELETE FROM no_pk WHERE user_id = '@u'`)

	// The CLI says the same with exit code 3.
	path := writeConfig(t, cfg)
	out, err := exec.Command(binary(t), "check", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("tidemark check: %v (want exit 3)\n%s", err, out)
	}
	if !strings.Contains(string(out), `ALTER TABLE "public"."no_pk" REPLICA IDENTITY FULL;`) {
		t.Errorf("tidemark check output lacks the fix:\n%s", out)
	}

	// After the fix, capture starts and the table's updates flow.
	e.exec(`ALTER TABLE no_pk REPLICA IDENTITY FULL; ALTER TABLE has_unique REPLICA IDENTITY USING INDEX has_unique_id;
ALTER TABLE nothing_ident REPLICA IDENTITY DEFAULT`)
	e.start(cfg)
	e.exec(`INSERT INTO no_pk VALUES ('!r2', '@u2', 'x'); UPDATE no_pk SET v = 'y' WHERE user_id = '@u2'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	// Without a primary key, the whole row (its FULL identity) is the key:
	// the update is the old row's delete and the new row's create.
	ms := e.read("ident.public.no_pk")
	var ops []string
	for _, m := range ms {
		ops = append(ops, m.Env.Op)
	}
	if strings.Join(ops, ",") != "c,d,c" {
		t.Fatalf("no_pk under FULL identity: ops %v, want c,d,c", ops)
	}
	if string(ms[1].Env.Before["v"]) != `"x"` || string(ms[2].Env.After["v"]) != `"y"` {
		t.Errorf("FULL identity update: before %s after %s", ms[1].Env.Before["v"], ms[2].Env.After["v"])
	}
}

// TestKcatReadsTopics: a third-party client (kcat, librdkafka) consumes our
// topic; the JSON parses and its fields match what we wrote.
func TestKcatReadsTopics(t *testing.T) {
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("kcat is required under CI (apt-get install kcat)")
		}
		t.Skip("kcat not installed (apt-get install kcat); required under CI")
	}
	e := newEnv(t, "")
	e.exec(`CREATE TABLE rooms (room_id text PRIMARY KEY, name text, members int)`)
	cfg := e.config("kc", []string{"public.rooms"}, func(c *config.Config) { c.Kafka.Partitions = 2 })
	e.start(cfg)
	e.exec(`INSERT INTO rooms VALUES ('!a', 'Lobby', 3), ('!b', 'Ops', 5); UPDATE rooms SET members = 4 WHERE room_id = '!a'; DELETE FROM rooms WHERE room_id = '!b'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, kcat, "-C", "-b", e.kafka.Brokers()[0], "-t", "kc.public.rooms", "-e", "-J", "-q").Output()
	if err != nil {
		t.Fatalf("kcat: %v", err)
	}
	type kcatMsg struct {
		Partition int      `json:"partition"`
		Key       string   `json:"key"`
		Payload   string   `json:"payload"`
		Headers   []string `json:"headers"`
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 5 {
		t.Fatalf("kcat read %d messages, want 5 (4 changes, 1 tombstone):\n%s", len(lines), out)
	}
	ours := map[string]msg{}
	for _, m := range e.read("kc.public.rooms") {
		ours[string(m.Key)+m.Headers["tidemark-seq"]+m.Headers["tidemark-lsn"]] = m
	}
	ops := map[string]int{}
	for _, l := range lines {
		var km kcatMsg
		if err := json.Unmarshal([]byte(l), &km); err != nil {
			t.Fatalf("kcat line is not JSON: %v\n%s", err, l)
		}
		if strings.Contains(l, `"payload":null`) {
			if km.Key != `{"room_id":"!b"}` {
				t.Errorf("tombstone for key %s, want the deleted room's", km.Key)
			}
			ops["tombstone"]++
			continue
		}
		var env envelope
		if err := json.Unmarshal([]byte(km.Payload), &env); err != nil {
			t.Fatalf("payload read by kcat is not a JSON envelope: %v\n%s", err, km.Payload)
		}
		hdr := map[string]string{}
		for i := 0; i+1 < len(km.Headers); i += 2 {
			hdr[km.Headers[i]] = km.Headers[i+1]
		}
		if hdr["tidemark-op"] != env.Op || hdr["tidemark-table"] != "public.rooms" {
			t.Errorf("headers %v disagree with envelope op %q", hdr, env.Op)
		}
		m, ok := ours[km.Key+hdr["tidemark-seq"]+hdr["tidemark-lsn"]]
		if !ok {
			t.Errorf("kcat message key %s not among ours", km.Key)
			continue
		}
		if m.Partition != km.Partition || string(m.Value) != km.Payload {
			t.Errorf("kcat sees partition %d payload %s; we wrote partition %d payload %s", km.Partition, km.Payload, m.Partition, m.Value)
		}
		if env.Source.Table != "rooms" || pipeline.LSN(env.Source.CommitLSN) == 0 {
			t.Errorf("source block: %+v", env.Source)
		}
		ops[env.Op]++
	}
	if ops["c"] != 2 || ops["u"] != 1 || ops["d"] != 1 || ops["tombstone"] != 1 {
		t.Errorf("ops read by kcat: %v", ops)
	}
}

// TestUnmanagedPublication: with manage_publication false, Tidemark only
// verifies the publication and names what is missing, with the statement to
// run.
func TestUnmanagedPublication(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)`)
	off := false
	cfg := e.config("unmanaged", []string{"public.a", "public.b"}, func(c *config.Config) { c.Postgres.ManagePublication = &off })
	_, err := app.Prepare(context.Background(), cfg, nil)
	if err == nil || !strings.Contains(err.Error(), `publication "unmanaged_pub" does not exist (postgres.manage_publication is false, so Tidemark does not create it); fix: CREATE PUBLICATION "unmanaged_pub" FOR TABLE "public"."a", "public"."b";`) {
		t.Fatalf("missing publication: %v", err)
	}
	e.exec(`CREATE PUBLICATION unmanaged_pub FOR TABLE a`)
	_, err = app.Prepare(context.Background(), cfg, nil)
	if err == nil || !strings.Contains(err.Error(), `does not cover "public"."b": their changes would not be captured; fix: ALTER PUBLICATION "unmanaged_pub" ADD TABLE "public"."b";`) {
		t.Fatalf("incomplete publication: %v", err)
	}
	e.exec(`ALTER PUBLICATION unmanaged_pub ADD TABLE b`)
	if _, err := app.Prepare(context.Background(), cfg, nil); err != nil {
		t.Fatalf("complete publication: %v", err)
	}
}

// TestOversizedRowStopsWithoutLoss: a row larger than Kafka accepts stops
// capture, before the row is even decoded, with an error naming the table,
// the change's LSN and its transaction's commit LSN; the slot does not pass
// it, so after raising the limit it is delivered.
func TestOversizedRowStopsWithoutLoss(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	cfg := e.config("big", []string{"public.notes"}, func(c *config.Config) { c.Kafka.BatchBytes = 4096 })
	r := e.start(cfg)
	e.exec(`INSERT INTO notes VALUES (1, 'small')`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	e.exec(`INSERT INTO notes VALUES (2, repeat('x', 10000))`)
	e.exec(`INSERT INTO notes VALUES (3, 'after')`)
	var runErr error
	select {
	case <-r.done:
		runErr = r.err
		if runErr == nil || !strings.Contains(runErr.Error(), "insert on public.notes at ") ||
			!strings.Contains(runErr.Error(), "more than the 4096 a message may have (kafka.batch_bytes)") {
			t.Fatalf("run ended with %v, want an oversized-row error naming table and position", runErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("pipeline did not stop on an oversized message")
	}
	// The slot may legitimately advance over WAL without changes for this
	// database (other tests share the cluster; idle keepalives are
	// confirmed), but never to or past the undelivered row's commit record:
	// Postgres skips on restart every transaction whose commit LSN is below
	// confirmed_flush_lsn.
	m := regexp.MustCompile(`commit LSN (\d+)`).FindStringSubmatch(runErr.Error())
	if m == nil {
		t.Fatalf("error %q names no position", runErr)
	}
	commit, err := strconv.ParseUint(m[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if c := e.slotConfirmed(cfg.Postgres.Slot); c > pipeline.LSN(commit) {
		t.Fatalf("slot confirmed %s, past the undelivered row's commit %s", c, pipeline.LSN(commit))
	}
	cfg2 := e.config("big", []string{"public.notes"}, func(c *config.Config) { c.Kafka.BatchBytes = 1 << 20 })
	e.start(cfg2)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	ids := map[string]bool{}
	for _, m := range e.read("big.public.notes") {
		ids[string(m.Env.After["id"])] = true
	}
	if !ids["1"] || !ids["2"] || !ids["3"] {
		t.Fatalf("after raising the limit, rows delivered: %v", ids)
	}
}
