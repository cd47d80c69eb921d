package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
)

// TestIncrementalSnapshotRequests (issue 16, acceptance 6): requests
// through Enqueue (what the admin endpoint calls), the admin endpoint and
// the signal table are refused with a message naming the problem when
// the table is not captured, has no key to chunk by and no condition, or
// the condition does not compile; a table without a key is snapshotted
// with a condition as one chunk; a paced snapshot shows its progress in
// the status report (rows, percent, rate) while it runs, and in the
// metrics; a stop-snapshot signal cancels a running one.
func TestIncrementalSnapshotRequests(t *testing.T) {
	const token = "e2e-admin-token-0123456789"
	e := newEnv(t, "")
	e.seedItems(6000)
	e.exec(`CREATE TABLE nokey (a int, b text); ALTER TABLE nokey REPLICA IDENTITY FULL;
INSERT INTO nokey SELECT g, 'v' || g FROM generate_series(1, 50) g; ANALYZE items`)
	cfg := e.config("incrreq", []string{"public.items", "public.nokey"}, func(c *config.Config) {
		c.Snapshot.ChunkSize = 200
		c.Snapshot.MaxRowsPerSecond = 2000
		c.Snapshot.SignalInterval = 50 * time.Millisecond
	})
	r := e.start(cfg)
	ctx := context.Background()

	refused := func(req capture.SnapshotRequest, want string) {
		t.Helper()
		_, err := r.Incremental.Enqueue(ctx, req)
		var re *capture.RequestError
		if !errors.As(err, &re) || !strings.Contains(err.Error(), want) {
			t.Errorf("Enqueue(%+v) = %v, want a request error saying %q", req, err, want)
		}
	}
	refused(capture.SnapshotRequest{Tables: []string{"public.nope"}}, "public.nope is not in postgres.tables")
	refused(capture.SnapshotRequest{Tables: []string{"nokey"}}, "public.nokey has no primary key or unique index")
	refused(capture.SnapshotRequest{Tables: []string{"items"}, Where: "nosuchcol = 1"}, `column "nosuchcol" does not exist`)
	refused(capture.SnapshotRequest{Tables: []string{"items"}, Where: "true; DROP TABLE items"}, "holds a ';'")
	if _, res := e.signalSnapshot(cfg.Postgres.Slot, capture.SnapshotRequest{Tables: []string{"public.nope"}}); !strings.HasPrefix(res, "refused: table public.nope is not in postgres.tables") {
		t.Errorf("signal for an unknown table answered %q", res)
	}

	// The admin endpoint.
	srv := httptest.NewServer(app.AdminHandler(app.AdminDeps{Token: token, Snapshot: r.Incremental.Enqueue}, nil))
	defer srv.Close()
	post := func(body string) (int, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/admin/snapshot", bytes.NewBufferString(body))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var out map[string]any
		if err := json.Unmarshal(b, &out); err != nil {
			t.Fatalf("admin answer %s: %v", b, err)
		}
		return resp.StatusCode, out
	}
	if code, out := post(`{"tables": ["nokey"]}`); code != http.StatusBadRequest || !strings.Contains(out["error"].(string), "no primary key") {
		t.Errorf("admin: keyless table without a condition: %d %v", code, out)
	}
	if code, out := post(`{"tables": ["nokey"], "where": "a <= 3"}`); code != http.StatusOK {
		t.Fatalf("admin: keyless table with a condition: %d %v", code, out)
	} else {
		id := int64(out["snapshots"].([]any)[0].(float64))
		if rows, chunks := e.waitIncrementalDone(id, 30*time.Second, nil); rows != 3 || chunks != 1 {
			t.Errorf("keyless snapshot: %d rows in %d chunks, want 3 in 1", rows, chunks)
		}
	}
	code, out := post(`{"tables": ["items"]}`)
	if code != http.StatusOK {
		t.Fatalf("admin: %d %v", code, out)
	}
	id := int64(out["snapshots"].([]any)[0].(float64))

	// Progress while it runs (paced at 2000 rows/s: about 3 s).
	var seen *capture.IncrementalSnapshot
	deadline := time.Now().Add(30 * time.Second)
	for seen == nil {
		rep, err := app.CollectStatus(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		for i, s := range rep.Snapshots {
			if s.ID == id && s.State == capture.IncrementalRunning && s.Rows > 0 {
				seen = &rep.Snapshots[i]
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no running snapshot with rows in the status report: %+v", rep.Snapshots)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if seen.Percent == nil || *seen.Percent <= 0 || *seen.Percent >= 100 || seen.Rate <= 0 || seen.ETA == "" || seen.Table != "public.items" {
		t.Errorf("running snapshot's progress: %+v (percent %v)", *seen, seen.Percent)
	}
	t.Logf("running: %d rows, %.1f%%, %.0f rows/s, ETA %s", seen.Rows, *seen.Percent, seen.Rate, seen.ETA)
	rows, _ := e.waitIncrementalDone(id, 60*time.Second, nil)
	reg := prometheus.NewRegistry()
	r.Register(reg)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() == "tidemark_snapshot_rows_total" {
			for _, m := range mf.GetMetric() {
				got[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
			}
		}
	}
	if got["public.items"] != float64(rows) || got["public.nokey"] != 3 {
		t.Errorf("tidemark_snapshot_rows_total = %v, want public.items %d, public.nokey 3", got, rows)
	}

	// A stop-snapshot signal cancels a running one.
	id2, res := e.signalSnapshot(cfg.Postgres.Slot, capture.SnapshotRequest{Tables: []string{"items"}})
	if id2 == 0 {
		t.Fatalf("signal: %s", res)
	}
	for {
		if state, rows, _, _ := e.incrementalState(id2); state == capture.IncrementalRunning && rows > 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.exec(`INSERT INTO tidemark.tidemark_signals (type, data) VALUES ('stop-snapshot', '{"data-collections": ["public.items"]}')`)
	deadline = time.Now().Add(10 * time.Second)
	for {
		state, rows, _, _ := e.incrementalState(id2)
		if state == capture.IncrementalCancelled {
			if rows >= 6000 {
				t.Errorf("cancelled after all %d rows", rows)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot %d still %s 10s after stop-snapshot", id2, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
