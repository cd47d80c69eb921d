package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
)

// TestSnapshotMemoryBench (issue 16, acceptance 4; a benchmark, run with
// TIDEMARK_SNAPSHOT_BENCH_ROWS=2000000): the built binary publishes a
// table of that many rows (i) as an initial snapshot (postgres.snapshot:
// initial_only, until it exits) and (ii) as an incremental snapshot
// requested while it streams, each round against a fresh broker in its
// own process. It reports, per round and as min / median / max, the wall
// time, rows/s and the process's peak RSS (getrusage maxrss), beside
// pg_dump of the same table to /dev/null and a live drain (a backlog of
// 200,000 updates in 1,000-row transactions, streamed after a restart).
// Peak RSS must stay under 100 MB.
func TestSnapshotMemoryBench(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("TIDEMARK_SNAPSHOT_BENCH_ROWS"))
	if n <= 0 {
		t.Skip("a benchmark: set TIDEMARK_SNAPSHOT_BENCH_ROWS (e.g. 2000000)")
	}
	rounds := 3
	if v, err := strconv.Atoi(os.Getenv("TIDEMARK_SNAPSHOT_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	e := newEnv(t, "")
	e.exec(incrTable)
	e.exec(`INSERT INTO items SELECT g, g, md5(g::text) || repeat('x', 8) FROM generate_series(1, ` + strconv.Itoa(n) + `) g; ANALYZE items`)
	var tableBytes int64
	if err := e.pool.QueryRow(context.Background(), `SELECT pg_table_size('items')`).Scan(&tableBytes); err != nil {
		t.Fatal(err)
	}
	t.Logf("table items: %d rows, %d MB", n, tableBytes>>20)
	bin := binary(t)
	type result struct {
		secs  float64
		rssMB float64
	}
	var initial, incremental, dump, drain []result
	maxRSS := func(ps *os.ProcessState) float64 {
		if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
			return float64(ru.Maxrss) / 1024
		}
		return 0
	}
	for round := 0; round < rounds; round++ {
		// pg_dump of the table, for reference.
		start := time.Now()
		if out, err := exec.Command("pg_dump", "--data-only", "-t", "public.items", "-f", "/dev/null", e.dsn).CombinedOutput(); err != nil {
			t.Fatalf("pg_dump: %v: %s", err, out)
		}
		dump = append(dump, result{secs: time.Since(start).Seconds()})

		// (i) Initial snapshot, initial_only: the process exits once it is
		// durable.
		brokers := startDevKafka(t)
		e.external = brokers
		prefix := fmt.Sprintf("sbi%d", round)
		cfg := e.config(prefix, []string{"public.items"}, func(c *config.Config) {
			c.Kafka.Brokers = brokers
			c.Postgres.Snapshot = config.SnapshotInitialOnly
		})
		path := writeIncrementalConfig(t, cfg, 2000, "")
		cmd := exec.Command(bin, "run", "--config", path)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		start = time.Now()
		if err := cmd.Run(); err != nil {
			t.Fatalf("initial_only: %v\n%s", err, out.String())
		}
		initial = append(initial, result{secs: time.Since(start).Seconds(), rssMB: maxRSS(cmd.ProcessState)})
		if state, rows := e.snapshotState(cfg.Postgres.Slot); state != capture.SnapshotDone || rows != int64(n) {
			t.Fatalf("initial snapshot: %s, %d rows", state, rows)
		}

		// (ii) Incremental snapshot while streaming (same slot, now
		// streaming; its broker holds the initial snapshot already).
		cfg.Postgres.Snapshot = config.SnapshotNever
		path = writeIncrementalConfig(t, cfg, 2000, "")
		cmd = exec.Command(bin, "run", "--config", path)
		out.Reset()
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		id, res := e.signalSnapshot(cfg.Postgres.Slot, capture.SnapshotRequest{Tables: []string{"public.items"}})
		if id == 0 {
			t.Fatalf("signal: %s\n%s", res, out.String())
		}
		rows, _ := e.waitIncrementalDone(id, 10*time.Minute, nil)
		secs := time.Since(start).Seconds()
		if rows != int64(n) {
			t.Errorf("incremental snapshot: %d rows, want %d", rows, n)
		}

		// A live drain on the same process: 200,000 rows in 1,000-row
		// transactions committed while it runs (the rate it keeps up with
		// is the drain rate only if it falls behind; so commit them while
		// it is stopped and time the catch-up).
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		incremental = append(incremental, result{secs: secs, rssMB: maxRSS(cmd.ProcessState)})
		e.exec(`DO $$ BEGIN FOR i IN 0..199 LOOP UPDATE items SET v = v + 1 WHERE id > i * 1000 AND id <= (i + 1) * 1000; COMMIT; END LOOP; END $$`)
		target := e.currentLSN()
		cmd = exec.Command(bin, "run", "--config", path)
		out.Reset()
		cmd.Stdout, cmd.Stderr = &out, &out
		start = time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		e.waitSlot(cfg.Postgres.Slot, target, 5*time.Minute)
		dsecs := time.Since(start).Seconds()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		drain = append(drain, result{secs: dsecs, rssMB: maxRSS(cmd.ProcessState)})
		t.Logf("round %d: pg_dump %.2fs; initial %.2fs %.0f MB; incremental %.2fs %.0f MB; drain of 200000 updates %.2fs %.0f MB",
			round+1, dump[round].secs, initial[round].secs, initial[round].rssMB, incremental[round].secs, incremental[round].rssMB, drain[round].secs, drain[round].rssMB)
	}
	report := func(name string, rs []result, rows int) {
		s := make([]float64, len(rs))
		m := make([]float64, len(rs))
		for i, r := range rs {
			s[i], m[i] = r.secs, r.rssMB
		}
		slices.Sort(s)
		slices.Sort(m)
		med := func(v []float64) float64 { return v[len(v)/2] }
		t.Logf("%-12s wall %.2f / %.2f / %.2f s (min / median / max), %.0f / %.0f / %.0f rows/s, peak RSS %.0f / %.0f / %.0f MB",
			name, s[0], med(s), s[len(s)-1], float64(rows)/s[len(s)-1], float64(rows)/med(s), float64(rows)/s[0], m[0], med(m), m[len(m)-1])
		if m[len(m)-1] >= 100 {
			t.Errorf("%s: peak RSS %.0f MB, want under 100", name, m[len(m)-1])
		}
	}
	report("initial", initial, n)
	report("incremental", incremental, n)
	report("drain", drain, 200000)
	ds := make([]float64, len(dump))
	for i, d := range dump {
		ds[i] = d.secs
	}
	slices.Sort(ds)
	t.Logf("%-12s wall %.2f / %.2f / %.2f s, %.0f rows/s at the median", "pg_dump", ds[0], ds[len(ds)/2], ds[len(ds)-1], float64(n)/ds[len(ds)/2])
}
