package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/redistest"
)

// Heartbeats written by the watcher travel through the slot and come back
// to the stream, which measures the lag; the watcher reports the slot's WAL
// retention; an idle slot keeps confirming.
func TestHeartbeatsAndSlotHealth(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE hb (id int PRIMARY KEY)`)
	cfg := e.config("hb", []string{"public.hb"}, func(c *config.Config) {
		hb := time.Second
		c.Postgres.HeartbeatInterval = &hb
		c.Postgres.SlotCheckInterval = time.Second
	})
	r := e.start(cfg)
	e.exec(`INSERT INTO hb VALUES (1)`)
	deadline := time.Now().Add(30 * time.Second)
	for r.Stream.Stats().HeartbeatsSeen.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d heartbeats received in 30s (written %d, failed %d), want 3", r.Stream.Stats().HeartbeatsSeen.Load(),
				r.Watcher.Stats().Heartbeats.Load(), r.Watcher.Stats().HeartbeatErrors.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if lag := time.Duration(r.Stream.Stats().HeartbeatLag.Load()); lag < 0 || lag > 5*time.Second {
		t.Errorf("heartbeat lag %s on an idle local server", lag)
	}
	h := r.Watcher.Last()
	if h == nil || !h.Exists || !h.Active || h.WALStatus != "reserved" || h.CurrentLSN == 0 || h.ConfirmedFlush == 0 {
		t.Fatalf("slot health %+v, want an existing active reserved slot with positions", h)
	}
	if ps := h.Problems(); len(ps) != 0 {
		t.Errorf("healthy slot reported problems: %q", ps)
	}
	// Idle: the slot confirms up to the latest heartbeat.
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	if err := r.Ready(); err != nil {
		t.Errorf("ready: %v", err)
	}

	// A missing slot is reported as such.
	missing, err := capture.ReadSlotHealth(context.Background(), e.pool, "no_such_slot")
	if err != nil {
		t.Fatal(err)
	}
	if missing.Exists || len(missing.Problems()) != 1 || !strings.Contains(missing.Problems()[0], "does not exist") {
		t.Errorf("missing slot: %+v, problems %q", missing, missing.Problems())
	}
}

// On a server with max_slot_wal_keep_size, a slot nobody consumes is warned
// about while WAL piles up, and reported invalidated (an error) once a
// checkpoint removes WAL it needed. Runs its own server: the setting would
// endanger other tests' slots.
func TestSlotWatcherWarnsBeforeInvalidation(t *testing.T) {
	// Its own server, also when TIDEMARK_TEST_PG_DSN names a shared one.
	ctx := context.Background()
	srv := throwawayServer(t, map[string]string{
		"max_slot_wal_keep_size": "64MB", "max_wal_size": "32MB", "min_wal_size": "32MB", "wal_keep_size": "0",
	})
	conn, err := pgx.Connect(ctx, srv.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	mustExec := func(sql string) {
		t.Helper()
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	mustExec(`SELECT pg_create_logical_replication_slot('stuck', 'pgoutput')`)
	mustExec(`CREATE TABLE filler (id bigserial PRIMARY KEY, pad text)`)

	core, logs := observer.New(zapcore.InfoLevel)
	w := capture.NewWatcher(capture.WatcherConfig{DSN: srv.DSN("postgres"), Slot: "stuck", Interval: time.Second}, zap.New(core))
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	var runErr error
	go func() { runErr = w.Run(wctx); close(done) }()
	defer func() {
		cancel()
		<-done
		if runErr != nil && !errors.Is(runErr, context.Canceled) {
			t.Errorf("slot watcher: %v", runErr)
		}
	}()

	// Write WAL in ~8 MiB steps (one segment switch each) until the slot is
	// lost. Once a step leaves it at risk, wait for the watcher's warning
	// before going on.
	var sawRisk bool
	for i := 0; i < 40; i++ {
		mustExec(`INSERT INTO filler (pad) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 25000) g`)
		mustExec(`SELECT pg_switch_wal()`)
		mustExec(`CHECKPOINT`)
		h, err := capture.ReadSlotHealth(ctx, conn, "stuck")
		if err != nil {
			t.Fatal(err)
		}
		if h.WALStatus == "lost" {
			break
		}
		if h.WALStatus == "extended" || h.WALStatus == "unreserved" || (h.SafeWALSize != nil && *h.SafeWALSize < 64<<20/5) {
			if !sawRisk {
				deadline := time.Now().Add(10 * time.Second)
				for logs.FilterLevelExact(zapcore.WarnLevel).Len() == 0 && time.Now().Before(deadline) {
					time.Sleep(50 * time.Millisecond)
				}
			}
			sawRisk = true
		}
	}
	if !sawRisk {
		t.Fatal("the slot went from healthy to lost without a check seeing it at risk first")
	}
	deadline := time.Now().Add(10 * time.Second)
	for w.Last() == nil || w.Last().WALStatus != "lost" {
		if time.Now().After(deadline) {
			t.Fatalf("watcher's last check %+v, want wal_status lost", w.Last())
		}
		time.Sleep(100 * time.Millisecond)
	}
	warns := logs.FilterLevelExact(zapcore.WarnLevel).All()
	if len(warns) == 0 || !strings.Contains(warns[0].Message, `replication slot "stuck"`) {
		t.Fatalf("warnings before the invalidation: %v, want the slot named at risk", warns)
	}
	errs := logs.FilterLevelExact(zapcore.ErrorLevel).All()
	if len(errs) != 1 || !strings.Contains(errs[0].Message, `replication slot "stuck" is invalidated`) {
		t.Fatalf("error logs %v, want exactly one naming the invalidated slot", errs)
	}
	if w.Stats().CheckErrors.Load() != 0 {
		t.Errorf("%d failed checks", w.Stats().CheckErrors.Load())
	}
}

// tidemark status: healthy when capture and the consumer keep up; then it
// names the consumer group's lag, an inactive slot and a table missing
// from the publication.
func TestStatusReport(t *testing.T) {
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	cfg := invalidationConfig(e, "status", rd.Addr(), nil)
	r := e.start(cfg)
	_, stopInv := e.startInvalidation(cfg)
	for i := 0; i < 5; i++ {
		e.exec(`INSERT INTO room_memberships(room_id, user_id, membership) VALUES ($1, '@a', 'join')`, fmt.Sprintf("!s%d", i))
	}
	ctx := context.Background()
	var rep *app.StatusReport
	waitFor := func(what string, ok func(*app.StatusReport) bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			var err error
			if rep, err = app.CollectStatus(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if ok(rep) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("status never showed %s:\n%+v", what, rep)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	waitFor("a healthy, caught-up pipeline", func(r *app.StatusReport) bool {
		return len(r.Problems) == 0 && len(r.Groups) == 1 && r.Groups[0].Partitions > 0 && r.Groups[0].Lag == 0
	})
	if rep.Slot == nil || !rep.Slot.Active || rep.Publication == nil || len(rep.Publication.Tables) != len(cfg.Postgres.Tables) ||
		rep.Groups[0].Role != "invalidation" || rep.Groups[0].Group != cfg.Invalidation.Group {
		t.Fatalf("healthy report incomplete: %+v", rep)
	}
	// A password in the DSN (the test server trusts any) never shows.
	withPw := *cfg
	u, err := url.Parse(cfg.Postgres.DSN)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), "s3cret-pw")
	withPw.Postgres.DSN = u.String()
	pwRep, err := app.CollectStatus(ctx, &withPw)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(pwRep)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "s3cret-pw") || pwRep.Slot == nil {
		t.Errorf("status with a password in the DSN: %s", b)
	}
	// The same report through the admin API.
	const token = "status-test-token-0123456789"
	srv := httptest.NewServer(app.AdminHandler(app.AdminDeps{Token: token,
		Status: func(ctx context.Context) (any, error) { return app.CollectStatus(ctx, cfg) }}, zap.NewNop()))
	defer srv.Close()
	req, err := http.NewRequest(http.MethodGet, srv.URL+"/admin/status", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var viaAPI app.StatusReport
	err = json.NewDecoder(resp.Body).Decode(&viaAPI)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || viaAPI.Slot == nil || !viaAPI.Slot.Active || len(viaAPI.Groups) != 1 ||
		viaAPI.Groups[0].Group != cfg.Invalidation.Group {
		t.Fatalf("GET /admin/status: %d %v %+v", resp.StatusCode, err, viaAPI)
	}

	stopInv()
	for i := 0; i < 5; i++ {
		e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE room_id = $1`, fmt.Sprintf("!s%d", i))
	}
	waitFor("the stopped group's lag", func(r *app.StatusReport) bool {
		return len(r.Groups) == 1 && r.Groups[0].Lag >= 5
	})

	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	e.exec(`ALTER PUBLICATION status_pub DROP TABLE read_markers`)
	waitFor("the inactive slot and the missing table", func(r *app.StatusReport) bool {
		var inactive, missing bool
		for _, p := range r.Problems {
			inactive = inactive || strings.Contains(p, `replication slot "status_slot" has no active consumer`)
			missing = missing || strings.Contains(p, `publication "status_pub" lacks configured table(s) [public.read_markers]`)
		}
		return inactive && missing
	})
}
