package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/pipeline"
)

const incrTable = `CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v int NOT NULL, pad text NOT NULL)`

// seedItems inserts rows 1..n of items.
func (e *env) seedItems(n int) {
	e.exec(incrTable)
	e.exec(`INSERT INTO items SELECT g, 0, repeat('x', 40) FROM generate_series(1, ` + strconv.Itoa(n) + `) g`)
}

// itemsWorkload updates, deletes and inserts random rows of items (ids up
// to max) until stop; n counts its statements.
func (e *env) itemsWorkload(seed uint64, maxID int, n *atomic.Int64) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var werr error
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, w))
			stmts := []string{
				`UPDATE items SET v = v + 1 WHERE id = $1`,
				`UPDATE items SET v = v + 1 WHERE id = $1`,
				`DELETE FROM items WHERE id = $1`,
				`INSERT INTO items VALUES ($1, 100, 'live') ON CONFLICT (id) DO UPDATE SET v = items.v + 100`,
			}
			for ctx.Err() == nil {
				if _, err := e.pool.Exec(ctx, stmts[rng.IntN(len(stmts))], 1+rng.IntN(maxID)); err != nil {
					if ctx.Err() == nil {
						werr = err
					}
					return
				}
				n.Add(1)
			}
		}(uint64(w))
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			wg.Wait()
			if werr != nil {
				e.t.Errorf("workload: %v", werr)
			}
		})
	}
	e.t.Cleanup(stop)
	return stop
}

// incrementalState reads a snapshot's row.
func (e *env) incrementalState(id int64) (state string, rows, chunks int64, errText string) {
	e.t.Helper()
	if err := e.pool.QueryRow(context.Background(), `SELECT state, rows, chunks, coalesce(error, '') FROM tidemark.incremental_snapshots WHERE id = $1`, id).
		Scan(&state, &rows, &chunks, &errText); err != nil {
		e.t.Fatalf("reading incremental snapshot %d: %v", id, err)
	}
	return
}

// signalSnapshot inserts an execute-snapshot signal and waits for its
// answer; it returns the snapshot id.
func (e *env) signalSnapshot(slot string, req capture.SnapshotRequest) (int64, string) {
	e.t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		e.t.Fatal(err)
	}
	defer conn.Close(ctx)
	id, err := capture.InsertSignal(ctx, conn, slot, req)
	if err != nil {
		e.t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		res, err := capture.SignalResult(ctx, conn, id)
		if err != nil {
			e.t.Fatal(err)
		}
		if res != "" {
			var sid int64
			if _, err := fmt.Sscanf(res, "accepted: snapshot %d", &sid); err != nil {
				return 0, res
			}
			return sid, res
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("signal %s not answered within 30s", id)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *env) waitIncrementalDone(id int64, timeout time.Duration, during func(rows, chunks int64)) (rows, chunks int64) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		state, rows, chunks, errText := e.incrementalState(id)
		switch state {
		case capture.IncrementalDone:
			return rows, chunks
		case capture.IncrementalFailed, capture.IncrementalCancelled:
			e.t.Fatalf("incremental snapshot %d: %s: %s", id, state, errText)
		}
		if during != nil {
			during(rows, chunks)
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("incremental snapshot %d not done after %s (state %s, %d rows, %d chunks)", id, timeout, state, rows, chunks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// foldCheck folds the items topic by position and checks it against the
// table, and that no snapshot row is stale: each equals what the live
// changes before it left of its key (so none resurrects a deleted key or
// reverts an update). It returns the snapshot records, the snapshot rows
// published again (a key in an earlier snapshot chunk: chunks re-read
// after a crash) and the chunks those were in.
func (e *env) foldCheck(topic string) (reads, again int, againChunks int) {
	e.t.Helper()
	ms := e.read(topic)
	sortByPosition(ms)
	fold := map[string]map[string]json.RawMessage{}
	lastLive := map[string]bool{}
	deleted := map[string]bool{}
	seenIn := map[string]pipeline.LSN{}
	chunksAgain := map[pipeline.LSN]bool{}
	stale := 0
	var prev pipeline.Position
	for i, m := range ms {
		if i > 0 && m.Pos == prev {
			continue // a record published twice (at least once on the wire)
		}
		prev = m.Pos
		img := m.Env.After
		if m.Env.Op == "d" {
			img = m.Env.Before
		}
		k := string(img["id"])
		switch m.Env.Op {
		case "r":
			reads++
			if m.Env.Source.Snapshot != "incremental" {
				e.t.Errorf("snapshot row with source.snapshot %q", m.Env.Source.Snapshot)
			}
			if at, ok := seenIn[k]; ok && at != m.Pos.CommitLSN {
				again++
				chunksAgain[m.Pos.CommitLSN] = true
			}
			seenIn[k] = m.Pos.CommitLSN
			// Before the snapshot row, the fold holds what the live
			// changes left; the row must say the same (or the key was
			// never changed live: the fold holds nothing or an older
			// snapshot row of it).
			if cur, ok := fold[k]; ok && string(cur["v"]) != string(m.Env.After["v"]) && stale < 5 {
				if lastLive[k] {
					stale++
					e.t.Errorf("key %s: snapshot row at %s says v=%s, the live changes before it left v=%s", k, m.Pos, m.Env.After["v"], cur["v"])
				}
			}
			if deleted[k] && stale < 5 {
				stale++
				e.t.Errorf("key %s: snapshot row at %s after the key's delete: it resurrects a deleted row", k, m.Pos)
			}
			fold[k] = m.Env.After
		case "c", "u":
			fold[k] = m.Env.After
			lastLive[k] = true
			delete(deleted, k)
		case "d":
			delete(fold, k)
			deleted[k] = true
		}
	}
	extra := e.compareItems(topic, fold)
	if len(extra) > 0 {
		e.t.Errorf("the fold of %s has %d keys the table lacks (e.g. %v)", topic, len(extra), extra[:min(3, len(extra))])
	}
	return reads, again, len(chunksAgain)
}

// foldAgainstItems folds topic by position (deletes remove) and compares it
// with the items table: rows missing from the fold or differing fail the
// test; the keys the table lacks are returned.
func (e *env) foldAgainstItems(topic string) (fold map[string]map[string]json.RawMessage, extra []string) {
	e.t.Helper()
	ms := e.read(topic)
	sortByPosition(ms)
	fold = map[string]map[string]json.RawMessage{}
	for _, m := range ms {
		if m.Env.Op == "d" {
			delete(fold, string(m.Env.Before["id"]))
			continue
		}
		fold[string(m.Env.After["id"])] = m.Env.After
	}
	return fold, e.compareItems(topic, fold)
}

// compareItems compares a fold with the items table (see foldAgainstItems).
func (e *env) compareItems(topic string, fold map[string]map[string]json.RawMessage) (extra []string) {
	e.t.Helper()
	rows, err := e.pool.Query(context.Background(), "SELECT id, v FROM items")
	if err != nil {
		e.t.Fatal(err)
	}
	src := map[string]string{}
	var id, v int
	if _, err := pgx.ForEachRow(rows, []any{&id, &v}, func() error {
		src[strconv.Itoa(id)] = strconv.Itoa(v)
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	var missing, differ []string
	for k, v := range src {
		got, ok := fold[k]
		switch {
		case !ok:
			missing = append(missing, k)
		case string(got["v"]) != v:
			differ = append(differ, fmt.Sprintf("%s: topic v=%s, table v=%s", k, got["v"], v))
		}
	}
	for k := range fold {
		if _, ok := src[k]; !ok {
			extra = append(extra, k)
		}
	}
	if len(missing)+len(differ) > 0 {
		e.t.Errorf("the fold of %s differs from the table (%d rows): %d missing (e.g. %v), %d differ (e.g. %v)",
			topic, len(src), len(missing), missing[:min(3, len(missing))], len(differ), differ[:min(3, len(differ))])
	}
	return extra
}

// TestIncrementalSnapshotUnderWorkload (issue 16, acceptance 2, in
// process): a table whose rows existed before the slot (postgres.snapshot
// never, so no initial snapshot) is snapshotted incrementally, requested
// through the signal table, while a workload updates, deletes and inserts
// random rows of it. Folding the topic equals the table, and no snapshot
// row is stale (none reverts a live update or resurrects a deleted row).
// Without the watermark dedupe, rows read before a live change would be
// published after it.
func TestIncrementalSnapshotUnderWorkload(t *testing.T) {
	const n = 20000
	e := newEnv(t, "")
	e.seedItems(n)
	cfg := e.config("incrw", []string{"public.items"}, func(c *config.Config) {
		c.Snapshot.ChunkSize = 500
		c.Snapshot.SignalInterval = 50 * time.Millisecond
	})
	r := e.start(cfg)
	var statements atomic.Int64
	stop := e.itemsWorkload(rand.Uint64(), n+2000, &statements)
	time.Sleep(300 * time.Millisecond)
	id, res := e.signalSnapshot(cfg.Postgres.Slot, capture.SnapshotRequest{Tables: []string{"items"}})
	if id == 0 {
		t.Fatalf("signal: %s", res)
	}
	before := statements.Load()
	rows, chunks := e.waitIncrementalDone(id, 120*time.Second, nil)
	during := statements.Load() - before
	time.Sleep(300 * time.Millisecond)
	stop()
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 60*time.Second)
	st := r.Incremental.Stats().Table("public.items")
	t.Logf("snapshot %d: %d rows, %d chunks; %d statements meanwhile; dropped (live wins) %d", id, rows, chunks, during, st.Dropped.Load())
	if during < 100 {
		t.Errorf("only %d workload statements ran during the snapshot", during)
	}
	reads, again, _ := e.foldCheck("incrw.public.items")
	if int64(reads) != rows {
		t.Errorf("%d snapshot records in the topic, the snapshot recorded %d rows", reads, rows)
	}
	if again != 0 {
		t.Errorf("%d snapshot rows published twice without a restart", again)
	}
	if rows < n/2 {
		t.Errorf("the snapshot published %d rows of about %d", rows, n)
	}
}

// writeIncrementalConfig writes cfg's essentials and a snapshot section
// as a YAML file for the binary.
func writeIncrementalConfig(t *testing.T, cfg *config.Config, chunkSize int, listen string) string {
	t.Helper()
	path := writeConfigWith(t, cfg, fmt.Sprintf("snapshot:\n  chunk_size: %d\n  signal_interval: 100ms\nhttp:\n  listen: %q\n  admin_token: test-admin-token-0123456789\nlog:\n  level: warn\n", chunkSize, listen))
	loaded, err := config.Load(path)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	if loaded.Snapshot.ChunkSize != chunkSize {
		t.Fatalf("config file not applied: %+v", loaded.Snapshot)
	}
	return path
}

// snapshotSessions samples, every 10ms until stop, the snapshot runner's
// sessions: every lock it holds on the snapshotted table (only
// AccessShareLock is allowed) and each of its transactions with the chunk
// counts seen while it was open (a transaction may span no more than one
// chunk's progress).
func (e *env) snapshotSessions(table string) (stop func() (samples, xacts int, problems []string)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var samples int
	var problems []string
	type span struct{ first, last int64 }
	xacts := map[time.Time]*span{}
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			rows, err := e.pool.Query(ctx, `SELECT l.mode FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
				WHERE a.application_name = 'tidemark-incremental-snapshot' AND l.locktype = 'relation'
				AND l.relation IN (SELECT oid FROM pg_class WHERE relname = $1 OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = $1::regclass))`, table)
			if err == nil {
				var mode string
				_, err = pgx.ForEachRow(rows, []any{&mode}, func() error {
					if mode != "AccessShareLock" && len(problems) < 10 {
						problems = append(problems, "the snapshot runner holds "+mode+" on "+table)
					}
					return nil
				})
			}
			if err == nil {
				rows, err = e.pool.Query(ctx, `SELECT a.xact_start, coalesce((SELECT max(chunks) FROM tidemark.incremental_snapshots WHERE state IN ('running', 'done')), 0)
					FROM pg_stat_activity a WHERE a.application_name = 'tidemark-incremental-snapshot' AND a.xact_start IS NOT NULL AND a.state <> 'idle'`)
			}
			if err == nil {
				var at time.Time
				var chunks int64
				_, err = pgx.ForEachRow(rows, []any{&at, &chunks}, func() error {
					if s, ok := xacts[at]; ok {
						s.last = chunks
					} else {
						xacts[at] = &span{chunks, chunks}
					}
					return nil
				})
			}
			if err != nil && ctx.Err() == nil && !strings.Contains(err.Error(), "does not exist") {
				problems = append(problems, "sampling: "+err.Error())
				return
			}
			samples++
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return func() (int, int, []string) {
		cancel()
		<-done
		for at, s := range xacts {
			if s.last-s.first > 1 {
				problems = append(problems, fmt.Sprintf("a snapshot transaction (started %s) stayed open over %d chunks", at.Format(time.RFC3339Nano), s.last-s.first))
			}
		}
		return samples, len(xacts), problems
	}
}

// TestIncrementalSnapshotKilledResumes (issue 16, acceptances 2 and 3):
// a 200,000-row table is snapshotted by the built binary while a workload
// updates, deletes and inserts random rows; the process is killed
// (SIGKILL) at about half, restarted, and the snapshot resumes from its
// last durable chunk: fewer than 2 chunks are published again, and the
// fold of the topic still equals the table with no stale snapshot row.
// Meanwhile the runner holds no lock on the table beyond AccessShareLock
// and none of its transactions stays open across chunks.
func TestIncrementalSnapshotKilledResumes(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the binary; skipped in -short")
	}
	const n = 200000
	e := newEnv(t, "")
	brokers := startDevKafka(t)
	e.external = brokers
	e.seedItems(n)
	cfg := e.config("incrkill", []string{"public.items"}, func(c *config.Config) { c.Kafka.Brokers = brokers })
	path := writeIncrementalConfig(t, cfg, 2000, "")
	bin := binary(t)
	start := func() (*exec.Cmd, *syncBuffer) {
		cmd := exec.Command(bin, "run", "--config", path)
		out := &syncBuffer{}
		cmd.Stderr, cmd.Stdout = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd, out
	}
	sessions := e.snapshotSessions("items")
	cmd, out := start()
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var statements atomic.Int64
	stopLoad := e.itemsWorkload(rand.Uint64(), n+5000, &statements)
	// Requested with the CLI: first a table that is not captured (exit 2,
	// named), then the table.
	if b, err := exec.Command(bin, "snapshot", "--config", path, "--table", "public.nope").CombinedOutput(); err == nil || !strings.Contains(string(b), "public.nope: not in postgres.tables") {
		t.Errorf("tidemark snapshot of an unknown table: %v: %s", err, b)
	}
	b, err := exec.Command(bin, "snapshot", "--config", path, "--table", "items").CombinedOutput()
	var id int64
	_, answer, _ := strings.Cut(string(b), ": ")
	if _, serr := fmt.Sscanf(answer, "accepted: snapshot %d", &id); err != nil || serr != nil {
		t.Fatalf("tidemark snapshot: %v: %s\n%s", err, b, out.String())
	}
	t.Logf("tidemark snapshot: %s", strings.TrimSpace(string(b)))
	// Kill at about half.
	deadline := time.Now().Add(120 * time.Second)
	var rowsAtKill, chunksAtKill int64
	for {
		state, rows, chunks, errText := e.incrementalState(id)
		if state != capture.IncrementalRunning && state != capture.IncrementalQueued {
			t.Fatalf("snapshot %s before the kill (%s)\n%s", state, errText, out.String())
		}
		if chunks >= 50 {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			_ = cmd.Wait()
			rowsAtKill, chunksAtKill = rows, chunks
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot at %d chunks after 120s\n%s", chunks, out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("killed at %d rows, %d chunks", rowsAtKill, chunksAtKill)
	cmd, out = start()
	rows, chunks := e.waitIncrementalDone(id, 180*time.Second, nil)
	time.Sleep(200 * time.Millisecond)
	stopLoad()
	samples, xacts, problems := sessions()
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 60*time.Second)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	t.Logf("snapshot %d: %d rows, %d chunks; %d workload statements; %d samples of %d snapshot transactions", id, rows, chunks, statements.Load(), samples, xacts)
	for _, p := range problems {
		t.Error(p)
	}
	if xacts < 10 {
		t.Errorf("sampled only %d snapshot transactions over %d chunks: the lock and transaction checks saw too little", xacts, chunks)
	}
	reads, again, againChunks := e.foldCheck("incrkill.public.items")
	t.Logf("%d snapshot records; %d rows in %d chunk(s) published again after the kill", reads, again, againChunks)
	if againChunks >= 2 {
		t.Errorf("%d chunks published again after the kill, want fewer than 2", againChunks)
	}
	if rows < n/2 {
		t.Errorf("the snapshot published %d rows of about %d", rows, n)
	}
}

// sortByPosition orders records by position (commit LSN, then seq).
func sortByPosition(ms []msg) {
	slices.SortFunc(ms, func(a, b msg) int {
		if a.Pos.Less(b.Pos) {
			return -1
		}
		if b.Pos.Less(a.Pos) {
			return 1
		}
		return 0
	})
}

// TestIncrementalSnapshotRepairsPartialImages: a row whose snapshot copy is
// dropped because a live update touched it between the watermarks, when
// that update left its TOASTed column out (unchanged), is read again, so
// that every row of the table reaches the topic with its whole image at
// least once: merging the topic's records by position (an update's absent
// unchanged columns keep their earlier values) gives every row its body.
// Without the repair, the rows dropped that way have no body anywhere in
// the topic.
func TestIncrementalSnapshotRepairsPartialImages(t *testing.T) {
	const n = 3000
	e := newEnv(t, "")
	e.exec(`CREATE TABLE docs (id int PRIMARY KEY, v int NOT NULL, body text NOT NULL);
ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
INSERT INTO docs SELECT g, 0, repeat(md5(g::text), 100) FROM generate_series(1, ` + strconv.Itoa(n) + `) g`)
	cfg := e.config("incrtoast", []string{"public.docs"}, func(c *config.Config) {
		c.Snapshot.ChunkSize = 100
		c.Snapshot.SignalInterval = 50 * time.Millisecond
	})
	r := e.start(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var updates atomic.Int64
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, seed))
			for ctx.Err() == nil {
				if _, err := e.pool.Exec(ctx, `UPDATE docs SET v = v + 1 WHERE id = $1`, 1+rng.IntN(n)); err == nil {
					updates.Add(1)
				}
			}
		}(uint64(w) + rand.Uint64())
	}
	ids, err := r.Incremental.Enqueue(context.Background(), capture.SnapshotRequest{Tables: []string{"docs"}})
	if err != nil {
		t.Fatal(err)
	}
	e.waitIncrementalDone(ids[0], 120*time.Second, nil)
	cancel()
	wg.Wait()
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 60*time.Second)
	dropped := r.Incremental.Stats().Table("public.docs").Dropped.Load()
	ms := e.read("incrtoast.public.docs")
	sortByPosition(ms)
	merged := map[string]map[string]json.RawMessage{}
	for _, m := range ms {
		k := string(m.Env.After["id"])
		img := merged[k]
		if img == nil || m.Env.Op == "r" || m.Env.Op == "c" {
			img = map[string]json.RawMessage{}
		}
		for col, v := range m.Env.After {
			img[col] = v
		}
		merged[k] = img
	}
	missing := 0
	for id := 1; id <= n; id++ {
		img, ok := merged[strconv.Itoa(id)]
		if !ok || len(img["body"]) < 3000 {
			missing++
		}
	}
	t.Logf("%d updates during the snapshot, %d chunk rows left to live changes, %d records", updates.Load(), dropped, len(ms))
	if dropped == 0 {
		t.Fatalf("premise: no chunk row was left to a live update")
	}
	if missing > 0 {
		t.Errorf("%d of %d rows have no body anywhere in the topic", missing, n)
	}
}
