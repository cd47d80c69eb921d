package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/targets"
)

// TestAdminRebuildTargets: POST /admin/rebuild/targets on the operator
// listener repairs a corrupted room against a real Postgres and Kafka, as
// `tidemark rebuild targets --room` does; without the token it is refused
// and nothing runs.
func TestAdminRebuildTargets(t *testing.T) {
	const token = "e2e-admin-token-0123456789"
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "admin", []string{"public.users", "public.room_memberships"}, &config.Targets{})
	e.start(cfg)
	e.startTargets(cfg)
	e.exec(`INSERT INTO users(user_id) SELECT '@u' || g FROM generate_series(1, 4) g;
INSERT INTO room_memberships(room_id, user_id, membership)
  SELECT '!c' || r, '@u' || u, CASE WHEN u <= 3 THEN 'join' ELSE 'leave' END FROM generate_series(1, 5) r, generate_series(1, 4) u`)
	e.waitTargets(cfg, 30*time.Second)
	e.exec(`DELETE FROM tidemark.notify_targets WHERE room_id = '!c1' AND user_id = '@u2'`)

	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	admin := app.AdminHandler(app.AdminDeps{
		Token: token,
		RebuildTargets: func(ctx context.Context, rooms []string, all bool) (targets.RebuildReport, error) {
			return app.RebuildTargets(ctx, cfg, log, rooms, all)
		},
	}, log)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	stop := runConsumer(t, "http listener", func(ctx context.Context) error {
		return app.Serve(ctx, addr, app.NewRegistry(), func() error { return nil }, admin)
	})
	defer stop()
	post := func(auth string) (int, []byte) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/admin/rebuild/targets?room=%21c1", nil)
		if err != nil {
			t.Fatal(err)
		}
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		var resp *http.Response
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if resp, err = http.DefaultClient.Do(req); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("reading the admin response: %v", err)
		}
		return resp.StatusCode, body
	}
	kept := func() []string { return e.pairs(keptSQL(cfg) + " WHERE room_id = '!c1'") }
	if code, body := post("Bearer not-" + token); code != http.StatusUnauthorized {
		t.Fatalf("wrong token: %d %s", code, body)
	}
	if got := kept(); slices.Contains(got, "!c1 @u2") {
		t.Fatalf("a refused request rebuilt the room: %v", got)
	}
	code, body := post("Bearer " + token)
	if code != http.StatusOK {
		t.Fatalf("rebuild: %d %s", code, body)
	}
	var rep struct {
		LSN                            string
		Rooms, Changed, Added, Removed int
	}
	if err := json.Unmarshal(body, &rep); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	if rep.Rooms != 1 || rep.Changed != 1 || rep.Added != 1 || rep.Removed != 0 || rep.LSN == "" || rep.LSN == "0/0" {
		t.Errorf("report %s, want 1 room changed, 1 added, at an LSN", body)
	}
	if got, want := kept(), []string{"!c1 @u1", "!c1 @u2", "!c1 @u3"}; !slices.Equal(got, want) {
		t.Errorf("kept targets of !c1 after the rebuild %v, want %v", got, want)
	}
}
