package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/freeport"
	"github.com/tidemark/tidemark/internal/redistest"
)

// metricRe finds metric names in PromQL expressions.
var metricRe = regexp.MustCompile(`\btidemark_[a-z0-9_]+`)

// queriedMetrics lists the metric names the dashboard's and the alert
// rules' expressions read.
func queriedMetrics(t *testing.T) map[string][]string {
	t.Helper()
	used := map[string][]string{}
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	b, err := os.ReadFile("../../deploy/grafana/tidemark.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("deploy/grafana/tidemark.json: %v", err)
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range metricRe.FindAllString(tg.Expr, -1) {
				used[m] = append(used[m], "dashboard panel "+p.Title)
			}
		}
	}
	var rules struct {
		Groups []struct {
			Rules []struct{ Alert, Expr string }
		}
	}
	b, err = os.ReadFile("../../deploy/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("deploy/prometheus/alerts.yml: %v", err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			for _, m := range metricRe.FindAllString(r.Expr, -1) {
				used[m] = append(used[m], "alert "+r.Alert)
			}
		}
	}
	return used
}

// TestObservability (issue 18, acceptance 2): `tidemark run` with every
// role, under a workload that also breaks an integrity rule, exports every
// metric the Grafana dashboard and the alert rules query (scraped from its
// /metrics); a real Prometheus scrapes it, loads the alert rules, and
// answers a query for tidemark_slot_lag_bytes through its HTTP API.
func TestObservability(t *testing.T) {
	prom := needTool(t, "prometheus", "apt-get install prometheus")
	e := newEnv(t, "")
	rd := redistest.ForTest(t)
	e.exec(demo.Schema)
	// A published table that is not configured (its changes are skipped,
	// counted per table).
	e.exec(`CREATE TABLE scratch (id int PRIMARY KEY)`)
	e.exec(`CREATE PUBLICATION obs_pub FOR TABLE users, rooms, room_memberships, events, event_json, read_markers, scratch WITH (publish_via_partition_root = true)`)
	port, err := freeport.Get()
	if err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := invalidationConfig(e, "obs", rd.Addr(), func(c *config.Config) {
		c.Targets = &config.Targets{Redis: &config.TargetsRedis{Redis: config.Redis{Addr: rd.Addr()}}}
		c.Integrity = &config.Integrity{}
		c.HTTP.Listen = &listen
		c.Log = config.Log{Level: "warn"}
		off := false
		c.Postgres.ManagePublication = &off
		c.Postgres.Filters = map[string]string{"public.rooms": "room_id <> '!hidden'"}
	})
	path, out := runReady(t, cfg)
	get := func(u string) (int, string) {
		resp, err := http.Get(u)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if err := demo.Seed(context.Background(), e.pool); err != nil {
		t.Fatal(err)
	}
	stop := e.workload(200)
	// An event without its event_json: the default integrity rule flags it.
	e.exec(`INSERT INTO events(event_id, room_id, sender, type, origin_ts) VALUES ('$orphan', '!r1', '@u1', 'm.room.message', 1)`)
	e.exec(`INSERT INTO scratch VALUES (1)`)
	e.exec(`INSERT INTO rooms(room_id) VALUES ('!hidden')`)
	if b, err := exec.Command(binary(t), "snapshot", "--config", path, "--table", "public.rooms").CombinedOutput(); err != nil {
		t.Fatalf("tidemark snapshot: %v\n%s", err, b)
	}
	time.Sleep(2 * time.Second)
	stop()
	var metrics string
	want := queriedMetrics(t)
	var missing []string
	t.Cleanup(func() {
		if len(missing) > 0 {
			t.Logf("missing from /metrics: %v\ntidemark's log:\n%s", missing, out)
		}
	})
	waitUntil(t, 30*time.Second, "every queried metric exported", func() bool {
		_, metrics = get("http://" + listen + "/metrics")
		missing = missing[:0]
		for m := range want {
			if !regexp.MustCompile(`(?m)^` + m + `(\{| )`).MatchString(metrics) {
				missing = append(missing, m)
			}
		}
		return len(missing) == 0
	})
	if len(want) < 20 {
		t.Errorf("premise: only %d metrics queried by the dashboard and the alerts", len(want))
	}
	if code, body := get("http://" + listen + "/leader"); code != 200 || !strings.Contains(body, `"role":"leader"`) {
		t.Errorf("/leader: %d %s", code, body)
	}

	// A real Prometheus scrapes it and loads the alert rules.
	pport, err := freeport.Get()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rules, err := filepath.Abs("../../deploy/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	promCfg := fmt.Sprintf("global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [%q]\nscrape_configs:\n  - job_name: tidemark\n    static_configs: [{targets: [%q]}]\n", rules, listen)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(promCfg), 0o600); err != nil {
		t.Fatal(err)
	}
	paddr := fmt.Sprintf("127.0.0.1:%d", pport)
	pcmd := exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"), "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+paddr)
	pout := &syncBuffer{}
	pcmd.Stdout, pcmd.Stderr = pout, pout
	if err := pcmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pcmd.Process.Kill(); _ = pcmd.Wait() })
	var result struct {
		Status string
		Data   struct {
			Result []struct {
				Metric map[string]string
				Value  [2]any
			}
		}
	}
	waitUntil(t, 60*time.Second, "Prometheus answering tidemark_slot_lag_bytes", func() bool {
		code, body := get("http://" + paddr + "/api/v1/query?query=" + url.QueryEscape("tidemark_slot_lag_bytes"))
		if code != 200 || json.Unmarshal([]byte(body), &result) != nil {
			return false
		}
		return result.Status == "success" && len(result.Data.Result) == 1
	})
	if r := result.Data.Result[0]; r.Metric["job"] != "tidemark" || r.Metric["instance"] != listen {
		t.Errorf("tidemark_slot_lag_bytes from %v", r.Metric)
	}
	code, body := get("http://" + paddr + "/api/v1/rules")
	var rs struct {
		Data struct {
			Groups []struct {
				Rules []struct{ Name, Health string }
			}
		}
	}
	if code != 200 || json.Unmarshal([]byte(body), &rs) != nil {
		t.Fatalf("/api/v1/rules: %d %s", code, body)
	}
	n := 0
	for _, g := range rs.Data.Groups {
		for _, r := range g.Rules {
			n++
			if r.Health == "err" {
				t.Errorf("Prometheus evaluates rule %s with an error", r.Name)
			}
		}
	}
	if n < 10 {
		t.Errorf("Prometheus loaded %d rules from alerts.yml\n%s", n, pout)
	}
	names := make([]string, 0, len(want))
	for m := range want {
		names = append(names, m)
	}
	sort.Strings(names)
	t.Logf("%d metrics queried, all exported: %s; Prometheus loaded %d rules", len(names), strings.Join(names, " "), n)
}

// runReady writes cfg (whole, as YAML) to a file, starts `tidemark run`
// on it (killed at cleanup) and waits until its /readyz, on
// cfg.HTTP.Listen, answers 200. It returns the config's path and the
// process's output.
func runReady(t *testing.T, cfg *config.Config) (string, *syncBuffer) {
	t.Helper()
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "tidemark.yml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary(t), "run", "--config", path)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kill(t, cmd) })
	waitUntil(t, 60*time.Second, "tidemark ready", func() bool {
		r, err := http.Get("http://" + *cfg.HTTP.Listen + "/readyz")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	})
	return path, out
}
