package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/freeport"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

// TestConsoleInBrowser (issue 18, acceptance 3): headless Chromium loads
// the operator console of a running `tidemark run` (capture and
// integrity, with an open violation), and the figures it shows match
// GET /admin/status and the open violation; a screenshot is saved (to
// $TIDEMARK_CONSOLE_SCREENSHOT when set).
func TestConsoleInBrowser(t *testing.T) {
	browser := ""
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			browser = p
			break
		}
	}
	if browser == "" {
		needTool(t, "chromium", "apt-get install chromium")
	}
	e := newEnv(t, "")
	e.exec(demo.Schema)
	port, err := freeport.Get()
	if err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	const token = "console-test-token-0123456789"
	cfg := e.config("cons", demo.Tables, func(c *config.Config) {
		rules := integrity.DefaultRules()
		c.Integrity = &config.Integrity{Rules: rules}
		c.HTTP.Listen = &listen
		c.HTTP.AdminToken = token
		c.Log = config.Log{Level: "warn"}
	})
	_, out := runReady(t, cfg)
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	e.exec(`INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ('$orphan', '!r1', '@u1', 'm.room.message', 1)`)
	status := func() map[string]any {
		req, _ := http.NewRequest(http.MethodGet, "http://"+listen+"/admin/status", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		var st map[string]any
		if err := json.NewDecoder(r.Body).Decode(&st); err != nil {
			t.Fatal(err)
		}
		return st
	}

	// The integrity consumer flags the orphan first (on a loaded machine
	// its group join can take a while); then the page must show it.
	openViolations := func() int {
		req, _ := http.NewRequest(http.MethodGet, "http://"+listen+"/admin/violations?status=open", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0
		}
		defer r.Body.Close()
		var v any
		if r.StatusCode != 200 || json.NewDecoder(r.Body).Decode(&v) != nil {
			return 0
		}
		switch x := v.(type) {
		case []any:
			return len(x)
		case map[string]any:
			if l, ok := x["violations"].([]any); ok {
				return len(l)
			}
		}
		return 0
	}
	for deadline := time.Now().Add(3 * time.Minute); openViolations() == 0; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("premise: no open violation after 3 minutes\ntidemark's log:\n%s", out)
		}
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox,
		chromedp.Flag("headless", "new"), chromedp.WindowSize(1400, 1000), chromedp.DisableGPU)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	// The first Run starts the browser: no timeout on its context.
	if _, err := chromedp.Run(bctx, chromedp.Navigate("http://"+listen+"/#token="+token)); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	ctx, cancel := context.WithTimeout(bctx, 2*time.Minute)
	defer cancel()
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("chromium: %s: %v\ntidemark's log:\n%s", what, err, out)
		}
	}
	_, err = chromedp.Run(ctx, chromedp.WaitVisible(`#violations tbody tr`))
	must("the open violation shown", err)
	time.Sleep(2500 * time.Millisecond) // one more refresh: every figure from one status answer
	raw, err := chromedp.Run(ctx, chromedp.TextContent(`#raw-status`))
	must("#raw-status", err)
	slotName, err := chromedp.Run(ctx, chromedp.Text(`#slot-name`))
	must("#slot-name", err)
	walStatus, err := chromedp.Run(ctx, chromedp.Text(`#wal-status`))
	must("#wal-status", err)
	lagAttr, err := chromedp.Run(ctx, chromedp.AttributeValue(`#slot-lag`, "data-value"))
	must("#slot-lag", err)
	slotLag := lagAttr.Value
	pubName, err := chromedp.Run(ctx, chromedp.Text(`#pub-name`))
	must("#pub-name", err)
	role, err := chromedp.Run(ctx, chromedp.Text(`#role`))
	must("#role", err)
	groups, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#groups tbody tr").length`))
	must("#groups", err)
	violations, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#violations tbody tr").length`))
	must("#violations", err)
	var page map[string]any
	if err := json.Unmarshal([]byte(raw), &page); err != nil {
		t.Fatalf("the page's status %q: %v", raw, err)
	}
	slot := page["slot"].(map[string]any)
	if slotName != slot["slot"] || walStatus != slot["wal_status"] || slotLag != fmt.Sprint(slot["lag_bytes"]) {
		t.Errorf("the page shows slot %q, WAL status %q, lag %s; its status answer says %v, %v, %v", slotName, walStatus, slotLag, slot["slot"], slot["wal_status"], slot["lag_bytes"])
	}
	if pubName != page["publication"].(map[string]any)["name"] || groups != len(page["consumer_groups"].([]any)) {
		t.Errorf("the page shows publication %q and %d groups; its status answer: %v", pubName, groups, page)
	}
	// The stable parts equal what /admin/status answers the test.
	st := status()
	if slot["slot"] != cfg.Postgres.Slot || st["slot"].(map[string]any)["slot"] != slot["slot"] ||
		st["slot"].(map[string]any)["wal_status"] != slot["wal_status"] || st["publication"].(map[string]any)["name"] != pubName {
		t.Errorf("page %v, /admin/status %v", page, st)
	}
	if role != "leader" || violations != 1 {
		t.Errorf("role %q, %d open violations shown; want leader and 1", role, violations)
	}
	shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	must("screenshot", err)
	dst := os.Getenv("TIDEMARK_CONSOLE_SCREENSHOT")
	if dst == "" {
		dst = filepath.Join(t.TempDir(), "console.png")
	}
	if err := os.WriteFile(dst, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	if len(shot) < 10000 || !strings.HasPrefix(string(shot[:8]), "\x89PNG") {
		t.Errorf("screenshot of %d bytes", len(shot))
	}
	t.Logf("console screenshot: %s (%d bytes); slot %s, WAL %s, lag %s, %d groups, %d open violations", dst, len(shot), slotName, walStatus, slotLag, groups, violations)
}
