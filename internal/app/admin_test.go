package app

import (
	"context"
	"encoding/json"
	"errors"
	"github.com/tidemark/tidemark/internal/buildinfo"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/invalidation/integrity"
	"github.com/tidemark/tidemark/invalidation/targets"
)

const testToken = "s3cret-admin-token-0123456789"

// fakeAdmin records what the admin handler passed to its features.
type fakeAdmin struct {
	mu      sync.Mutex
	rooms   []string
	all     bool
	sample  int
	filter  integrity.Filter
	calls   int
	failing error
}

func (f *fakeAdmin) deps() AdminDeps {
	return AdminDeps{
		Token: testToken,
		Status: func(ctx context.Context) (any, error) {
			if _, ok := ctx.Deadline(); !ok {
				return nil, errors.New("no deadline")
			}
			return map[string]string{"state": "streaming"}, nil
		},
		Violations: func(_ context.Context, flt integrity.Filter) ([]*integrity.Violation, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.calls++
			f.filter = flt
			return nil, f.failing
		},
		RebuildTargets: func(_ context.Context, rooms []string, all bool) (targets.RebuildReport, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.calls++
			f.rooms, f.all = rooms, all
			return targets.RebuildReport{LSN: 0x1_0000_0010, Rooms: len(rooms), Changed: 1, Added: 2, Removed: 3}, f.failing
		},
		AuditTargets: func(_ context.Context, sample int) (targets.AuditReport, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.calls++
			f.sample = sample
			return targets.AuditReport{Rooms: 2, Consistent: 1, Ratio: 0.5,
				Mismatches: []targets.Mismatch{{Room: "r1", Missing: []string{"u1"}}}}, f.failing
		},
	}
}

type adminResp struct {
	code int
	hdr  http.Header
	body string
}

func (r adminResp) errorText(t *testing.T) string {
	t.Helper()
	var e struct{ Error string }
	if err := json.Unmarshal([]byte(r.body), &e); err != nil || e.Error == "" {
		t.Fatalf("body is not a JSON error: %q", r.body)
	}
	return e.Error
}

// do sends method target to h with the bearer token auth ("" for none).
func do(t *testing.T, h http.Handler, method, target, auth string) adminResp {
	t.Helper()
	req := httptest.NewRequest(method, target, nil)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	body, _ := io.ReadAll(rec.Result().Body)
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s %s: Content-Type %q", method, target, ct)
	}
	if strings.Contains(string(body), testToken) || strings.Contains(string(body), testToken[:16]) {
		t.Errorf("%s %s: the body shows the token: %s", method, target, body)
	}
	return adminResp{rec.Code, rec.Header(), string(body)}
}

func TestAdminAuth(t *testing.T) {
	f := &fakeAdmin{}
	h := AdminHandler(f.deps(), nil)
	cases := []struct {
		name, auth string
		want       int
	}{
		{"no header", "", http.StatusUnauthorized},
		{"wrong token", "Bearer wrong-token-wrong-token-xx", http.StatusUnauthorized},
		{"prefix of the token", "Bearer " + testToken[:len(testToken)-1], http.StatusUnauthorized},
		{"token plus a suffix", "Bearer " + testToken + "x", http.StatusUnauthorized},
		{"empty bearer", "Bearer ", http.StatusUnauthorized},
		{"basic scheme", "Basic " + testToken, http.StatusUnauthorized},
		{"bare token", testToken, http.StatusUnauthorized},
		{"right token", "Bearer " + testToken, http.StatusOK},
		{"scheme is case-insensitive", "bearer " + testToken, http.StatusOK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, req := range [][2]string{{http.MethodGet, "/admin/status"}, {http.MethodPost, "/admin/rebuild/targets?all=true"}} {
				r := do(t, h, req[0], req[1], tc.auth)
				if r.code != tc.want {
					t.Fatalf("%s %s: status %d, want %d: %s", req[0], req[1], r.code, tc.want, r.body)
				}
				if tc.want == http.StatusUnauthorized {
					if got := r.hdr.Get("WWW-Authenticate"); got != "Bearer" {
						t.Errorf("WWW-Authenticate = %q", got)
					}
					r.errorText(t)
				}
			}
		})
	}
	if f.calls != 2 {
		t.Errorf("the features ran %d times, want 2 (only with the right token)", f.calls)
	}
}

func TestAdminDisabled(t *testing.T) {
	for name, h := range map[string]http.Handler{
		"no token":          AdminHandler(AdminDeps{RebuildTargets: (&fakeAdmin{}).deps().RebuildTargets}, nil),
		"Serve without one": serveMux(t, nil),
	} {
		t.Run(name, func(t *testing.T) {
			for _, p := range []string{"/admin/status", "/admin/rebuild/targets?all=true", "/admin/nothing"} {
				for _, auth := range []string{"", "Bearer " + testToken} {
					r := do(t, h, http.MethodPost, p, auth)
					if r.code != http.StatusNotFound {
						t.Fatalf("%s: status %d, want 404", p, r.code)
					}
					if got := r.errorText(t); got != "admin API disabled: set http.admin_token or TIDEMARK_ADMIN_TOKEN" {
						t.Errorf("%s: error %q", p, got)
					}
				}
			}
		})
	}
}

// serveMux runs Serve on a free port with admin and returns a handler that
// forwards to it.
func serveMux(t *testing.T, admin http.Handler) http.Handler {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ln, err := net.Listen("tcp", "127.0.0.1:0") // only for a free address
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, addr, NewRegistry(), func() error { return nil }, admin) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequest(r.Method, "http://"+addr+r.URL.RequestURI(), nil)
		req.Header = r.Header.Clone()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	})
}

func TestAdminServeMountsHandler(t *testing.T) {
	f := &fakeAdmin{}
	h := serveMux(t, AdminHandler(f.deps(), nil))
	if r := do(t, h, http.MethodPost, "/admin/rebuild/targets?room=a", "Bearer "+testToken); r.code != http.StatusOK {
		t.Fatalf("status %d: %s", r.code, r.body)
	}
	if r := do(t, h, http.MethodGet, "/admin/status", ""); r.code != http.StatusUnauthorized {
		t.Fatalf("status %d without a token", r.code)
	}
}

func TestAdminNotConfigured(t *testing.T) {
	h := AdminHandler(AdminDeps{Token: testToken}, nil)
	cases := []struct{ method, path, section string }{
		{http.MethodGet, "/admin/violations", "integrity"},
		{http.MethodPost, "/admin/rebuild/targets?all=true", "targets"},
		{http.MethodPost, "/admin/audit/targets", "targets"},
		{http.MethodGet, "/admin/status", ""},
	}
	for _, tc := range cases {
		r := do(t, h, tc.method, tc.path, "Bearer "+testToken)
		if r.code != http.StatusNotFound {
			t.Fatalf("%s %s: status %d, want 404", tc.method, tc.path, r.code)
		}
		if msg := r.errorText(t); !strings.Contains(msg, "no "+tc.section+" section") && tc.section != "" {
			t.Errorf("%s: error %q does not name the %s section", tc.path, msg, tc.section)
		}
	}
	if r := do(t, h, http.MethodGet, "/admin/unknown", "Bearer "+testToken); r.code != http.StatusNotFound {
		t.Errorf("unknown path: status %d", r.code)
	}
}

func TestAdminBadRequests(t *testing.T) {
	f := &fakeAdmin{}
	h := AdminHandler(f.deps(), nil)
	cases := []struct {
		name, method, target string
		code                 int
		mention              string // the error must name it
	}{
		{"GET on rebuild", http.MethodGet, "/admin/rebuild/targets?all=true", http.StatusMethodNotAllowed, "POST"},
		{"POST on status", http.MethodPost, "/admin/status", http.StatusMethodNotAllowed, "GET"},
		{"room and all", http.MethodPost, "/admin/rebuild/targets?room=a&all=true", http.StatusBadRequest, "room"},
		{"neither room nor all", http.MethodPost, "/admin/rebuild/targets", http.StatusBadRequest, "all"},
		{"all=false and no room", http.MethodPost, "/admin/rebuild/targets?all=false", http.StatusBadRequest, "all"},
		{"bad all", http.MethodPost, "/admin/rebuild/targets?all=yes", http.StatusBadRequest, "all"},
		{"empty room", http.MethodPost, "/admin/rebuild/targets?room=", http.StatusBadRequest, "room"},
		{"misspelt parameter", http.MethodPost, "/admin/rebuild/targets?rooms=a", http.StatusBadRequest, "rooms"},
		{"bad sample", http.MethodPost, "/admin/audit/targets?sample=many", http.StatusBadRequest, "sample"},
		{"negative sample", http.MethodPost, "/admin/audit/targets?sample=-1", http.StatusBadRequest, "sample"},
		{"sample twice", http.MethodPost, "/admin/audit/targets?sample=1&sample=2", http.StatusBadRequest, "sample"},
		{"bad since", http.MethodGet, "/admin/violations?since=yesterday", http.StatusBadRequest, "since"},
		{"negative since", http.MethodGet, "/admin/violations?since=-1h", http.StatusBadRequest, "since"},
		{"bad status", http.MethodGet, "/admin/violations?status=closed", http.StatusBadRequest, "status"},
		{"bad limit", http.MethodGet, "/admin/violations?limit=-3", http.StatusBadRequest, "limit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, h, tc.method, tc.target, "Bearer "+testToken)
			if r.code != tc.code {
				t.Fatalf("status %d, want %d: %s", r.code, tc.code, r.body)
			}
			if msg := r.errorText(t); !strings.Contains(msg, tc.mention) {
				t.Errorf("error %q does not mention %q", msg, tc.mention)
			}
			if tc.code == http.StatusMethodNotAllowed && r.hdr.Get("Allow") != tc.mention {
				t.Errorf("Allow = %q, want %q", r.hdr.Get("Allow"), tc.mention)
			}
		})
	}
	if f.calls != 0 {
		t.Errorf("a bad request reached a feature (%d calls)", f.calls)
	}
}

func TestAdminRebuild(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	f := &fakeAdmin{}
	h := AdminHandler(f.deps(), zap.New(core))
	r := do(t, h, http.MethodPost, "/admin/rebuild/targets?room=b&room=a&room=b&room=%21x", "Bearer "+testToken)
	if r.code != http.StatusOK {
		t.Fatalf("status %d: %s", r.code, r.body)
	}
	if want := []string{"b", "a", "b", "!x"}; !reflect.DeepEqual(f.rooms, want) || f.all {
		t.Errorf("rebuild got rooms %q all %v, want %q", f.rooms, f.all, want)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(r.body), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"lsn": "1/10", "rooms": 4.0, "changed": 1.0, "added": 2.0, "removed": 3.0}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("report %v, want %v", got, want)
	}
	if r := do(t, h, http.MethodPost, "/admin/rebuild/targets?all=true", "Bearer "+testToken); r.code != http.StatusOK || !f.all || len(f.rooms) != 0 {
		t.Errorf("all=true: status %d, rooms %q, all %v", r.code, f.rooms, f.all)
	}
	entries := logs.FilterMessage("admin rebuild of notification targets").All()
	if len(entries) != 2 {
		t.Fatalf("%d log lines for 2 rebuilds", len(entries))
	}
	for _, e := range logs.All() {
		if _, ok := e.ContextMap()["remote"]; !ok {
			t.Errorf("log line %q lacks the remote address", e.Message)
		}
		for k, v := range e.ContextMap() {
			if strings.Contains(k+" "+e.Message+" "+toString(v), testToken[:16]) {
				t.Errorf("log line %q shows the token", e.Message)
			}
		}
	}
}

func toString(v any) string { b, _ := json.Marshal(v); return string(b) }

func TestAdminAuditAndViolations(t *testing.T) {
	f := &fakeAdmin{}
	h := AdminHandler(f.deps(), nil)
	r := do(t, h, http.MethodPost, "/admin/audit/targets?sample=25", "Bearer "+testToken)
	if r.code != http.StatusOK || f.sample != 25 {
		t.Fatalf("audit: status %d, sample %d: %s", r.code, f.sample, r.body)
	}
	if !strings.Contains(r.body, `"ratio": 0.5`) || !strings.Contains(r.body, `"room": "r1"`) {
		t.Errorf("audit body: %s", r.body)
	}
	before := time.Now()
	r = do(t, h, http.MethodGet, "/admin/violations?rule=fk&status=open&since=1h&limit=7", "Bearer "+testToken)
	if r.code != http.StatusOK || strings.TrimSpace(r.body) != "[]" {
		t.Fatalf("violations: status %d: %s", r.code, r.body)
	}
	if f.filter.Rule != "fk" || f.filter.Status != integrity.StatusOpen || f.filter.Limit != 7 ||
		f.filter.Since.Before(before.Add(-time.Hour)) || f.filter.Since.After(time.Now().Add(-time.Hour)) {
		t.Errorf("filter %+v", f.filter)
	}
	r = do(t, h, http.MethodGet, "/admin/violations?status=all&since=2026-11-26T10:00:00Z", "Bearer "+testToken)
	if r.code != http.StatusOK || f.filter.Status != "" || f.filter.Limit != 1000 || !f.filter.Since.Equal(time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)) {
		t.Errorf("status=all: %d, filter %+v", r.code, f.filter)
	}
	f.failing = errors.New("state database unreachable")
	r = do(t, h, http.MethodPost, "/admin/audit/targets", "Bearer "+testToken)
	if r.code != http.StatusInternalServerError || !strings.Contains(r.errorText(t), "state database unreachable") {
		t.Errorf("failing audit: status %d: %s", r.code, r.body)
	}
}

func TestParseSince(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"90m":                  now.Add(-90 * time.Minute),
		"2026-11-26T10:00:00Z": time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC),
	} {
		if got, err := ParseSince(in, now); err != nil || !got.Equal(want) {
			t.Errorf("ParseSince(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0s", "-1h", "2026-11-26", "soon"} {
		if _, err := ParseSince(in, now); err == nil {
			t.Errorf("ParseSince(%q) accepted", in)
		}
	}
}

// TestBuildInfoMetric: every registry exports tidemark_build_info with the
// build's version.
func TestBuildInfoMetric(t *testing.T) {
	mfs, err := NewRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "tidemark_build_info" {
			continue
		}
		labels := map[string]string{}
		for _, l := range mf.GetMetric()[0].GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["version"] != buildinfo.Version() || labels["go_version"] == "" || labels["revision"] == "" || mf.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Errorf("tidemark_build_info %v", mf.GetMetric()[0])
		}
		return
	}
	t.Error("no tidemark_build_info")
}
