package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/pipeline"
)

// vmHWM is the peak resident set size of process pid, in bytes.
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}

// TestWideRowsWhileKafkaPaused: with the broker down, one transaction of
// 12,000 rows of 20 KB (240 MB) arrives from Postgres. Every stage holding
// it is bounded by bytes (the capture hand-over, the pipeline's in-flight
// budget), so the process (the real binary, with its default soft memory
// limit) stays under 150 MB of peak RSS while the walsender is held back;
// once the broker returns, every row arrives.
func TestWideRowsWhileKafkaPaused(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary with 240 MB of rows")
	}
	const rows, width = 12000, 20000
	e := newEnv(t, t.TempDir())
	e.exec(`CREATE TABLE wide (id int PRIMARY KEY, pad text)`)
	cfg := e.config("wide", []string{"public.wide"}, nil)
	path := writeConfig(t, cfg)
	if _, err := app.Prepare(context.Background(), cfg, nil); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary(t), "run", "--config", path)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if cmd.ProcessState == nil {
			kill(t, cmd)
		}
	}()
	e.exec(`INSERT INTO wide VALUES (0, 'first')`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)

	e.kafka.Stop()
	e.exec(fmt.Sprintf(`INSERT INTO wide SELECT g, substr(repeat(md5(g::text) || md5((g+1)::text), %d), 1, %d) FROM generate_series(1, %d) g`,
		width/64+1, width, rows))
	end := e.currentLSN()
	// The walsender is held back once every bounded stage is full: its
	// sent position stops moving.
	var sent pipeline.LSN
	for stable, deadline := time.Now(), time.Now().Add(120*time.Second); time.Since(stable) < 3*time.Second; time.Sleep(100 * time.Millisecond) {
		var s *string
		if err := e.pool.QueryRow(context.Background(), `SELECT sent_lsn::text FROM pg_stat_replication WHERE application_name = 'tidemark'`).Scan(&s); err != nil {
			t.Fatalf("reading the walsender's position: %v\n%s", err, &out)
		}
		if s == nil {
			continue
		}
		l, err := pipeline.ParseLSN(*s)
		if err != nil {
			t.Fatal(err)
		}
		if l != sent {
			sent, stable = l, time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the walsender kept sending for 120s with the broker down (at %s)", sent)
		}
	}
	peak := vmHWM(t, cmd.Process.Pid)
	t.Logf("broker down: walsender held at %s (transaction ends at %s); peak RSS %d MB", sent, end, peak>>20)
	if peak > 150<<20 {
		t.Errorf("peak RSS %d MB with the broker down, want under 150 MB", peak>>20)
	}

	if err := e.kafka.Restart(); err != nil {
		t.Fatal(err)
	}
	e.waitSlot(cfg.Postgres.Slot, end, 180*time.Second)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("graceful stop: %v\n%s", err, &out)
	}
	msgs := readRaw(t, e.kafka.Brokers(), "wide.public.wide")
	distinct := map[pipeline.Position]bool{}
	for _, m := range msgs {
		distinct[m.Pos] = true
	}
	if len(distinct) != rows+1 {
		t.Errorf("%d distinct positions in wide.public.wide, want %d rows", len(distinct), rows+1)
	}
	t.Logf("after the broker returned: %d records (%d distinct), final peak RSS %d MB", len(msgs), len(distinct), exitedPeakRSS(cmd)>>20)
}

// exitedPeakRSS is the peak RSS of an exited process (from its rusage).
func exitedPeakRSS(cmd *exec.Cmd) int64 {
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		return ru.Maxrss << 10
	}
	return 0
}
