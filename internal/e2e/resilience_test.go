package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/demo"
)

// TestReplicationConnectionKilled: when Postgres drops the replication
// connection (its walsender is terminated), capture reconnects with backoff
// and resumes from the slot; nothing is lost.
func TestReplicationConnectionKilled(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demo.Schema)
	cfg := e.config("reconn", demo.Tables, nil)
	tr := e.newTruth("truth_reconn")
	r := e.start(cfg)
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	stop := e.workload(300)
	for i := 0; i < 3; i++ {
		time.Sleep(500 * time.Millisecond)
		deadline := time.Now().Add(15 * time.Second)
		for {
			var active bool
			if err := e.pool.QueryRow(context.Background(), `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, cfg.Postgres.Slot).Scan(&active); err != nil {
				t.Fatal(err)
			}
			if active {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: capture did not reconnect within 15s", i)
			}
			time.Sleep(20 * time.Millisecond)
		}
		var n int
		if err := e.pool.QueryRow(context.Background(), `SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots
			WHERE slot_name = $1 AND active_pid IS NOT NULL`, cfg.Postgres.Slot).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Fatalf("round %d: terminated %d walsenders, want 1", i, n)
		}
	}
	stop()
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 60*time.Second)
	if got := r.Stream.Stats().Reconnects.Load(); got < 3 {
		t.Errorf("reconnects = %d, want at least 3", got)
	}
	view := e.kafkaView("reconn", canonicalTopics)
	txns := tr.txns()
	if miss := view.missing(txns, 0); len(miss) > 0 {
		t.Fatalf("Kafka lacks %d of %d transactions, e.g. %v", len(miss), len(txns), miss[:min(3, len(miss))])
	}
	for _, topic := range canonicalTopics {
		e.checkKeyOrder("reconn."+topic, e.read("reconn."+topic), true)
	}
}

// TestSchemaChangeFollowed: a new Relation message (ALTER TABLE mid-stream)
// replaces the table's shape; later rows carry the new column, earlier ones
// keep the old shape.
func TestSchemaChangeFollowed(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE rooms (room_id text PRIMARY KEY, name text)`)
	cfg := e.config("ddl", []string{"public.rooms"}, nil)
	e.start(cfg)
	e.exec(`INSERT INTO rooms VALUES ('!a', 'Lobby')`)
	e.exec(`ALTER TABLE rooms ADD COLUMN topic text DEFAULT 'none'`)
	e.exec(`INSERT INTO rooms VALUES ('!b', 'Ops', 'incidents')`)
	e.exec(`ALTER TABLE rooms DROP COLUMN name`)
	e.exec(`UPDATE rooms SET topic = 'chat' WHERE room_id = '!a'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	ms := e.read("ddl.public.rooms")
	// Per room, in position order: the columns of each row image as the
	// table had them when the change was made, and the values written.
	sort.Slice(ms, func(i, j int) bool { return ms[i].Pos.Less(ms[j].Pos) })
	got := map[string][]string{}
	for _, m := range ms {
		var id string
		if err := json.Unmarshal(m.Env.After["room_id"], &id); err != nil {
			t.Fatalf("%s/%d@%d: after image without a room_id: %v", m.Topic, m.Partition, m.Offset, m.Env.After)
		}
		cols := make([]string, 0, len(m.Env.After))
		for c, v := range m.Env.After {
			cols = append(cols, fmt.Sprintf("%s=%s", c, v))
		}
		sort.Strings(cols)
		got[id] = append(got[id], m.Env.Op+" "+strings.Join(cols, ","))
	}
	want := map[string][]string{
		"!a": {`c name="Lobby",room_id="!a"`, `u room_id="!a",topic="chat"`},
		"!b": {`c name="Ops",room_id="!b",topic="incidents"`},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("row shapes per room:\n got %v\nwant %v", got, want)
	}
}

// TestBadConfigExitCode: `tidemark run` with a bad file exits 2 and names
// every problem by field path, without echoing the DSN's password.
func TestBadConfigExitCode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.yml")
	if err := os.WriteFile(path, []byte(`
postgres:
  dsn: "postgres://app:s3cret-pw@db:5432/"
  tables: [public.events, "not a table", public.events]
kafka:
  brokers: ["nohostport"]
  compression: brotli
pipeline:
  entity_streams:
    - name: rooms
      key: room_id
      tables: [public.missing]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary(t), "run", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("exit: %v, want code 2\n%s", err, out)
	}
	for _, want := range []string{
		"postgres.dsn: names no database",
		`postgres.tables[1]: "not a table" is not schema.table`,
		`postgres.tables[2]: "public.events" is listed twice`,
		`kafka.brokers[0]: "nohostport" needs host:port`,
		`kafka.compression: "brotli"`,
		`pipeline.entity_streams[0].tables[0]: "public.missing" is not in postgres.tables`,
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "s3cret-pw") {
		t.Errorf("output leaks the password:\n%s", out)
	}
	out, err = exec.Command(binary(t), "run").CombinedOutput()
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "--config") {
		t.Errorf("run without --config: %v\n%s", err, out)
	}
}

// TestDemoCommand runs `tidemark demo` briefly: it exits 0 and prints
// envelopes read back from Kafka.
func TestDemoCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the demo binary")
	}
	if _, err := exec.LookPath("initdb"); err != nil {
		m, err := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
		if err != nil {
			t.Fatal(err)
		}
		if len(m) == 0 && os.Getenv("CI") != "true" {
			t.Skip("no initdb: the demo needs a local PostgreSQL server package (required under CI)")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary(t), "demo", "--duration", "3s", "--rate", "100").CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	for _, want := range []string{"summary", "caught up: true", `"connector": "tidemark"`, ".transaction", `"status": "END"`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
