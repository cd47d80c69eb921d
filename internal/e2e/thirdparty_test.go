package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/config"
)

// jsRecord is one line of testdata/kafkajs/consume.js.
type jsRecord struct {
	Topic     string            `json:"topic"`
	Partition int               `json:"partition"`
	Offset    int64             `json:"offset"`
	Key       *string           `json:"key"`
	Value     *string           `json:"value"`
	Headers   map[string]string `json:"headers"`
}

// needTool returns the path of a program the test needs: under CI it
// must be there, elsewhere the test skips without it.
func needTool(t *testing.T, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required under CI (%s)", name, install)
		}
		t.Skipf("%s not installed (%s); required under CI", name, install)
	}
	return p
}

// kafkajs runs consume.js once and returns what it read.
func kafkajs(t *testing.T, node string, brokers []string, group string, topics []string, max int) []jsRecord {
	t.Helper()
	dir, err := filepath.Abs("testdata/kafkajs")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "kafkajs")); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("kafkajs is not installed in %s (.ci/run runs npm ci there): %v", dir, err)
		}
		t.Skipf("kafkajs not installed: run npm ci in %s", dir)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "consume.js", "--brokers", strings.Join(brokers, ","), "--group", group,
		"--topics", strings.Join(topics, ","), "--max", fmt.Sprint(max), "--idle-ms", "4000")
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kafkajs consumer: %v\n%s", err, stderr.String())
	}
	var recs []jsRecord
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var r jsRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("kafkajs line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

// TestThirdPartyConsumersBuildReplicas (issue 17, acceptance 4 and 5):
// kafkajs, in a consumer group that commits offsets and is stopped half
// way, reads a table topic in envelopes and one in the rows format; the
// records build replica tables in Postgres that equal the sources after a
// mixed workload with updates, deletes, key changes and re-inserts. kcat
// (librdkafka, partitioner murmur2_random) producing Tidemark's keys puts
// each in the partition Tidemark chose.
func TestThirdPartyConsumersBuildReplicas(t *testing.T) {
	node := needTool(t, "node", "apt-get install nodejs npm")
	kcat := needTool(t, "kcat", "apt-get install kcat")
	e := newEnv(t, "")
	const schema = `(id int PRIMARY KEY, name text NOT NULL, n int, note text)`
	e.exec(`CREATE TABLE acct ` + schema + `; CREATE TABLE acct_rows ` + schema)
	e.exec(`CREATE TABLE replica_env ` + schema + `; CREATE TABLE replica_rows ` + schema)
	cfg := e.config("tp", []string{"public.acct", "public.acct_rows"}, func(c *config.Config) {
		c.Kafka.Partitions = 4
		c.Pipeline.Formats = map[string]string{"public.acct_rows": "rows"}
	})
	r := e.start(cfg)
	defer r.stop(t)
	// The same workload on both tables.
	rng := rand.New(rand.NewPCG(17, 17))
	for i := 0; i < 400; i++ {
		id := rng.IntN(150)
		var sql string
		switch k := rng.IntN(10); {
		case k < 4:
			sql = fmt.Sprintf(`INSERT INTO %%[1]s VALUES (%d, 'n%d', %d, NULL) ON CONFLICT (id) DO UPDATE SET n = %%[1]s.n + 1`, id, i, i)
		case k < 6:
			sql = fmt.Sprintf(`UPDATE %%[1]s SET name = 'u%d', note = repeat('z', %d) WHERE id = %d`, i, rng.IntN(50), id)
		case k < 8:
			sql = fmt.Sprintf(`DELETE FROM %%[1]s WHERE id = %d`, id)
		default: // a key change, when the new key is free
			sql = fmt.Sprintf(`UPDATE %%[1]s SET id = %d WHERE id = %d AND NOT EXISTS (SELECT 1 FROM %%[1]s WHERE id = %d)`, id+1000, id, id+1000)
		}
		e.exec(fmt.Sprintf(sql, "acct") + "; " + fmt.Sprintf(sql, "acct_rows"))
	}
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	topics := []string{"tp.public.acct", "tp.public.acct_rows"}
	for _, tp := range topics {
		e.waitTopic(tp, 30*time.Second) // a broker under load may not list it at once
	}
	total := len(e.readRaw(topics[0])) + len(e.readRaw(topics[1]))

	// kafkajs: half, stop, then the rest with the same group.
	first := kafkajs(t, node, e.brokers(), "tp-kafkajs", topics, total/2)
	rest := kafkajs(t, node, e.brokers(), "tp-kafkajs", topics, total)
	seen := map[string]bool{}
	for _, rec := range append(append([]jsRecord(nil), first...), rest...) {
		at := fmt.Sprintf("%s/%d@%d", rec.Topic, rec.Partition, rec.Offset)
		if seen[at] {
			t.Errorf("kafkajs read %s twice: the group's committed offset was not honoured", at)
		}
		seen[at] = true
	}
	if len(first) != total/2 || len(seen) != total {
		t.Fatalf("kafkajs read %d then %d records (%d distinct), want %d then the rest of %d", len(first), len(rest), len(seen), total/2, total)
	}
	all := append(first, rest...)
	sort.SliceStable(all, func(i, j int) bool {
		if all[i].Topic != all[j].Topic {
			return all[i].Topic < all[j].Topic
		}
		if all[i].Partition != all[j].Partition {
			return all[i].Partition < all[j].Partition
		}
		return all[i].Offset < all[j].Offset
	})
	ctx := context.Background()
	cols := []string{"id", "name", "n", "note"}
	upsert := func(table string, row map[string]json.RawMessage) {
		vals := make([]any, len(cols))
		for i, c := range cols {
			var v any
			if raw, ok := row[c]; ok {
				if err := json.Unmarshal(raw, &v); err != nil {
					t.Fatalf("%s.%s: %v", table, c, err)
				}
			}
			vals[i] = v
		}
		if _, err := e.pool.Exec(ctx, `INSERT INTO `+table+` VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, n = EXCLUDED.n, note = EXCLUDED.note`, vals...); err != nil {
			t.Fatalf("upsert into %s: %v", table, err)
		}
	}
	del := func(table string, key *string) {
		var k struct{ ID int }
		if key == nil || json.Unmarshal([]byte(*key), &k) != nil {
			t.Fatalf("%s: a delete with key %v", table, key)
		}
		if _, err := e.pool.Exec(ctx, `DELETE FROM `+table+` WHERE id = $1`, k.ID); err != nil {
			t.Fatal(err)
		}
	}
	ops := map[string]int{}
	for _, rec := range all {
		switch rec.Topic {
		case "tp.public.acct": // Debezium envelopes
			if rec.Value == nil {
				ops["env tombstone"]++
				continue
			}
			var env struct {
				Op            string
				Before, After map[string]json.RawMessage
			}
			if err := json.Unmarshal([]byte(*rec.Value), &env); err != nil {
				t.Fatalf("envelope: %v", err)
			}
			ops["env "+env.Op]++
			switch env.Op {
			case "c", "u", "r":
				upsert("replica_env", env.After)
			case "d":
				del("replica_env", rec.Key)
			}
		case "tp.public.acct_rows": // rows
			if rec.Value == nil {
				ops["rows tombstone"]++
				del("replica_rows", rec.Key)
				continue
			}
			var row map[string]json.RawMessage
			if err := json.Unmarshal([]byte(*rec.Value), &row); err != nil {
				t.Fatalf("rows record: %v", err)
			}
			if string(row["__deleted"]) == `"true"` {
				ops["rows deleted"]++
				del("replica_rows", rec.Key)
			} else {
				ops["rows "+strings.Trim(string(row["__op"]), `"`)]++
				upsert("replica_rows", row)
			}
		}
	}
	t.Logf("kafkajs read %d + %d records: %v", len(first), len(rest), ops)
	if ops["env d"] == 0 || ops["env tombstone"] != ops["env d"] || ops["rows tombstone"] != ops["rows deleted"] || ops["env u"] == 0 {
		t.Errorf("premise: the workload's records %v", ops)
	}
	for _, pair := range [][2]string{{"acct", "replica_env"}, {"acct_rows", "replica_rows"}} {
		var diff int
		q := fmt.Sprintf(`SELECT count(*) FROM ((TABLE %[1]s EXCEPT TABLE %[2]s) UNION ALL (TABLE %[2]s EXCEPT TABLE %[1]s)) d`, pair[0], pair[1])
		if err := e.pool.QueryRow(ctx, q).Scan(&diff); err != nil {
			t.Fatal(err)
		}
		var n int
		if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM `+pair[0]).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if diff != 0 || n == 0 {
			t.Errorf("%s differs from the source %s in %d rows (source has %d)", pair[1], pair[0], diff, n)
		}
	}

	// librdkafka's murmur2_random partitioner agrees with Tidemark's: kcat
	// produces every key Tidemark wrote to a topic with as many partitions.
	want := map[string]int{}
	for _, rec := range all {
		if rec.Topic == "tp.public.acct" && rec.Key != nil {
			want[*rec.Key] = rec.Partition
		}
	}
	conn, err := kafkago.Dial("tcp", e.brokers()[0])
	if err != nil {
		t.Fatal(err)
	}
	err = conn.CreateTopics(kafkago.TopicConfig{Topic: "tp.kcat-check", NumPartitions: 4, ReplicationFactor: 1})
	conn.Close()
	if err != nil {
		t.Fatal(err)
	}
	var in bytes.Buffer
	for k := range want {
		in.WriteString(k + "\t1\n")
	}
	kctx, kcancel := context.WithTimeout(ctx, 60*time.Second)
	defer kcancel()
	prod := exec.CommandContext(kctx, kcat, "-P", "-b", e.brokers()[0], "-t", "tp.kcat-check", "-K", "\t", "-X", "partitioner=murmur2_random")
	prod.Stdin = &in
	if out, err := prod.CombinedOutput(); err != nil {
		t.Fatalf("kcat -P: %v\n%s", err, out)
	}
	out, err := exec.CommandContext(kctx, kcat, "-C", "-b", e.brokers()[0], "-t", "tp.kcat-check", "-e", "-J", "-q").Output()
	if err != nil {
		t.Fatalf("kcat -C: %v", err)
	}
	got := 0
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var km struct {
			Partition int    `json:"partition"`
			Key       string `json:"key"`
		}
		if err := json.Unmarshal([]byte(l), &km); err != nil {
			t.Fatalf("kcat line %q: %v", l, err)
		}
		got++
		if p, ok := want[km.Key]; !ok || p != km.Partition {
			t.Errorf("key %s: librdkafka's murmur2_random put it in partition %d, Tidemark in %d", km.Key, km.Partition, p)
		}
	}
	if got != len(want) || len(want) < 50 {
		t.Errorf("kcat read back %d of %d keys", got, len(want))
	}
}
