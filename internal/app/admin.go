package app

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/invalidation/integrity"
	"github.com/tidemark/tidemark/invalidation/targets"
)

// DefaultAuditWait is how long an audit waits for the pipeline to pass its
// snapshot before re-checking rooms that differ (`audit targets --wait`
// and the admin API).
const DefaultAuditWait = time.Minute

// Admin request time bounds: rebuilds and audits read whole tables (an
// audit also waits up to DefaultAuditWait for the pipeline); the rest are
// single queries.
const (
	adminLongTimeout  = 10 * time.Minute
	adminShortTimeout = time.Minute
)

// adminDisabled is the answer to every /admin/ request without a token.
const adminDisabled = "admin API disabled: set http.admin_token or TIDEMARK_ADMIN_TOKEN"

// AdminDeps are the admin API's features. A nil func means the feature is
// not configured: its endpoint answers 404 naming the config section it
// needs. The funcs MUST honour ctx (the request's, with a time bound) and
// MUST NOT put secrets in their errors: error text is sent to the client.
type AdminDeps struct {
	// Token is the bearer token; "" disables the whole API.
	Token string
	// Status reports the pipeline's state (GET /admin/status).
	Status func(ctx context.Context) (any, error)
	// Violations lists integrity violations (GET /admin/violations).
	Violations func(ctx context.Context, f integrity.Filter) ([]*integrity.Violation, error)
	// RebuildTargets recomputes notification targets of rooms, or of all
	// of them (POST /admin/rebuild/targets).
	RebuildTargets func(ctx context.Context, rooms []string, all bool) (targets.RebuildReport, error)
	// AuditTargets compares sample rooms (all when 0) with the database
	// (POST /admin/audit/targets).
	AuditTargets func(ctx context.Context, sample int) (targets.AuditReport, error)
	// Snapshot starts incremental snapshots (POST /admin/snapshot); a
	// *capture.RequestError is the request's fault (400).
	Snapshot func(ctx context.Context, req capture.SnapshotRequest) ([]int64, error)
}

// AdminHandler serves the admin API under /admin/:
//
//	GET  /admin/status
//	GET  /admin/violations?rule=R&status=open|resolved|all&since=1h|RFC3339&limit=N
//	POST /admin/rebuild/targets?room=A&room=B  or  ?all=true
//	POST /admin/audit/targets?sample=N
//	POST /admin/snapshot  {"tables": ["public.x"], "where": "..."}  (or ?table=public.x&where=...)
//
// Every request needs "Authorization: Bearer <token>" (401 otherwise);
// without a token every path answers 404. Answers are JSON, errors
// {"error": "..."}. A nil log means no logging.
func AdminHandler(d AdminDeps, log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	if d.Token == "" {
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			writeError(w, http.StatusNotFound, adminDisabled)
		})
	}
	a := &admin{d: d, log: log.With(zap.String("component", "admin")), token: sha256.Sum256([]byte(d.Token))}
	mux := http.NewServeMux()
	mux.Handle("/admin/status", a.endpoint(http.MethodGet, adminShortTimeout, d.Status != nil, "", a.status))
	mux.Handle("/admin/violations", a.endpoint(http.MethodGet, adminShortTimeout, d.Violations != nil, "integrity", a.violations))
	mux.Handle("/admin/rebuild/targets", a.endpoint(http.MethodPost, adminLongTimeout, d.RebuildTargets != nil, "targets", a.rebuild))
	mux.Handle("/admin/audit/targets", a.endpoint(http.MethodPost, adminLongTimeout, d.AuditTargets != nil, "targets", a.audit))
	mux.Handle("/admin/snapshot", a.endpoint(http.MethodPost, adminShortTimeout, d.Snapshot != nil, "", a.snapshot))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no admin endpoint %s (see GET /admin/status, /admin/violations; POST /admin/rebuild/targets, /admin/audit/targets, /admin/snapshot)", r.URL.Path))
	})
	return a.authenticate(mux)
}

type admin struct {
	d     AdminDeps
	log   *zap.Logger
	token [sha256.Size]byte
}

// authenticate passes requests bearing the token. Both sides are hashed
// before the constant-time compare, so neither the token's content nor its
// length leaks through timing.
func (a *admin) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, cred, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		got := sha256.Sum256([]byte(strings.TrimSpace(cred)))
		if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(got[:], a.token[:]) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			writeError(w, http.StatusUnauthorized, "missing or wrong bearer token (Authorization: Bearer <http.admin_token>)")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// paramError is a bad query parameter: 400.
type paramError struct{ msg string }

func (e *paramError) Error() string { return e.msg }

func badParam(format string, args ...any) error { return &paramError{fmt.Sprintf(format, args...)} }

// endpoint checks the method and that the feature is configured, bounds
// the request's time and writes serve's result (or error) as JSON.
// section names the config section the feature needs ("" for none that
// can be named).
func (a *admin) endpoint(method string, timeout time.Duration, configured bool, section string, serve func(ctx context.Context, r *http.Request) (any, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != method {
			w.Header().Set("Allow", method)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s %s: use %s", r.Method, r.URL.Path, method))
			return
		}
		if !configured {
			msg := r.URL.Path + " is not available in this process"
			if section != "" {
				msg = fmt.Sprintf("%s is not configured: the config has no %s section", r.URL.Path, section)
			}
			writeError(w, http.StatusNotFound, msg)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		v, err := serve(ctx, r)
		if err != nil {
			if pe, ok := err.(*paramError); ok {
				writeError(w, http.StatusBadRequest, pe.msg)
				return
			}
			writeError(w, http.StatusInternalServerError, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
}

// query returns r's query parameters after checking that each is one of
// known and that single-valued ones appear once.
func query(r *http.Request, multi map[string]bool, known ...string) (url.Values, error) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, badParam("malformed query string")
	}
	for k, vs := range q {
		ok := multi[k]
		for _, n := range known {
			ok = ok || k == n
		}
		if !ok {
			return nil, badParam("unknown parameter %q", k)
		}
		if !multi[k] && len(vs) > 1 {
			return nil, badParam("%s: given %d times, want once", k, len(vs))
		}
	}
	return q, nil
}

// nonNegative parses parameter name of q (def when absent).
func nonNegative(q url.Values, name string, def int) (int, error) {
	s, ok := q[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(s[0])
	if err != nil || n < 0 {
		return 0, badParam("%s %q: want a whole number >= 0", name, s[0])
	}
	return n, nil
}

func (a *admin) status(ctx context.Context, r *http.Request) (any, error) {
	if _, err := query(r, nil); err != nil {
		return nil, err
	}
	return a.d.Status(ctx)
}

func (a *admin) violations(ctx context.Context, r *http.Request) (any, error) {
	q, err := query(r, nil, "rule", "status", "since", "limit")
	if err != nil {
		return nil, err
	}
	f := integrity.Filter{Rule: q.Get("rule")}
	switch s := q.Get("status"); s {
	case "", "all":
	case integrity.StatusOpen, integrity.StatusResolved:
		f.Status = s
	default:
		return nil, badParam("status %q: want open, resolved or all", s)
	}
	if s := q.Get("since"); s != "" {
		if f.Since, err = ParseSince(s, time.Now()); err != nil {
			return nil, badParam("since %v", err)
		}
	}
	if f.Limit, err = nonNegative(q, "limit", 1000); err != nil {
		return nil, err
	}
	vs, err := a.d.Violations(ctx, f)
	if vs == nil {
		vs = []*integrity.Violation{} // [] rather than null
	}
	return vs, err
}

// rebuildResponse is RebuildReport for JSON clients.
type rebuildResponse struct {
	LSN     string `json:"lsn"`
	Rooms   int    `json:"rooms"`
	Changed int    `json:"changed"`
	Added   int    `json:"added"`
	Removed int    `json:"removed"`
	// Held: rooms left to the targets consumer (held for an incomplete
	// transaction newer than the snapshot).
	Held int `json:"held,omitempty"`
}

func (a *admin) rebuild(ctx context.Context, r *http.Request) (any, error) {
	q, err := query(r, map[string]bool{"room": true}, "all")
	if err != nil {
		return nil, err
	}
	rooms := q["room"]
	for _, room := range rooms {
		if room == "" {
			return nil, badParam("room: empty room id")
		}
	}
	all := false
	if s, ok := q["all"]; ok {
		if all, err = strconv.ParseBool(s[0]); err != nil {
			return nil, badParam("all %q: want true or false", s[0])
		}
	}
	if all == (len(rooms) > 0) {
		return nil, badParam("give either room (repeatable: ?room=A&room=B) or all=true, not both or neither")
	}
	start := time.Now()
	rep, err := a.d.RebuildTargets(ctx, rooms, all)
	a.logMutation(r, "admin rebuild of notification targets", start, err, zap.Strings("rooms", rooms), zap.Bool("all", all),
		zap.Int("rebuilt", rep.Rooms), zap.Int("changed", rep.Changed))
	if err != nil {
		return nil, fmt.Errorf("rebuilding notification targets: %w", err)
	}
	return rebuildResponse{LSN: rep.LSN.String(), Rooms: rep.Rooms, Changed: rep.Changed, Added: rep.Added, Removed: rep.Removed, Held: rep.Held}, nil
}

// auditResponse is AuditReport for JSON clients.
type auditResponse struct {
	LSN         string          `json:"lsn"`
	Rooms       int             `json:"rooms"`
	Consistent  int             `json:"consistent"`
	Ratio       float64         `json:"ratio"`
	Suspected   int             `json:"suspected"`
	Unconfirmed bool            `json:"unconfirmed"`
	Mismatches  []auditMismatch `json:"mismatches"`
}

type auditMismatch struct {
	Room    string   `json:"room"`
	Missing []string `json:"missing"`
	Extra   []string `json:"extra"`
}

func (a *admin) audit(ctx context.Context, r *http.Request) (any, error) {
	q, err := query(r, nil, "sample")
	if err != nil {
		return nil, err
	}
	sample, err := nonNegative(q, "sample", 0)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	rep, err := a.d.AuditTargets(ctx, sample)
	a.logMutation(r, "admin audit of notification targets", start, err, zap.Int("sample", sample),
		zap.Int("audited", rep.Rooms), zap.Int("mismatches", len(rep.Mismatches)))
	if err != nil {
		return nil, fmt.Errorf("auditing notification targets: %w", err)
	}
	out := auditResponse{LSN: rep.LSN.String(), Rooms: rep.Rooms, Consistent: rep.Consistent, Ratio: rep.Ratio,
		Suspected: rep.Suspected, Unconfirmed: rep.Unconfirmed, Mismatches: []auditMismatch{}}
	for _, m := range rep.Mismatches {
		out.Mismatches = append(out.Mismatches, auditMismatch{Room: m.Room, Missing: m.Missing, Extra: m.Extra})
	}
	return out, nil
}

// logMutation writes the one line an admin mutation leaves: who (remote
// address; never the token), what, how long and how it ended.
func (a *admin) logMutation(r *http.Request, msg string, start time.Time, err error, fields ...zap.Field) {
	fields = append(fields, zap.String("remote", r.RemoteAddr), zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	if err != nil {
		a.log.Warn(msg+" failed", append(fields, zap.Error(err))...)
		return
	}
	a.log.Info(msg, fields...)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		writeError(w, http.StatusInternalServerError, "encoding the answer: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, code int, msg string) {
	b, _ := json.Marshal(struct {
		Error string `json:"error"`
	}{msg})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

// snapshot starts incremental snapshots: tables and where from a JSON
// body or from the query (table may repeat).
func (a *admin) snapshot(ctx context.Context, r *http.Request) (any, error) {
	q, err := query(r, map[string]bool{"table": true}, "where")
	if err != nil {
		return nil, err
	}
	req := capture.SnapshotRequest{Tables: q["table"], Where: q.Get("where"), By: "admin"}
	if r.Body != nil {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			return nil, badParam("reading the body: %v", err)
		}
		if len(strings.TrimSpace(string(body))) > 0 {
			var b capture.SnapshotRequest
			dec := json.NewDecoder(strings.NewReader(string(body)))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&b); err != nil {
				return nil, badParam("the body is not {\"tables\": [...], \"where\": \"...\"}: %v", err)
			}
			req.Tables = append(req.Tables, b.Tables...)
			if b.Where != "" {
				req.Where = b.Where
			}
		}
	}
	ids, err := a.d.Snapshot(ctx, req)
	var re *capture.RequestError
	if errors.As(err, &re) {
		return nil, badParam("%s", re.Msg)
	}
	if err != nil {
		return nil, err
	}
	a.log.Info("incremental snapshot requested through the admin API", zap.Strings("tables", req.Tables), zap.String("where", req.Where), zap.Int64s("ids", ids))
	return map[string]any{"snapshots": ids, "status": "queued (GET /admin/status or tidemark status shows progress)"}, nil
}
