package app

import (
	_ "embed"
	"net/http"
)

//go:embed console.html
var consoleHTML []byte

// ConsoleHandler serves the read-only operator console at "/": one page,
// every asset embedded (it works offline), refreshing itself every 2 s from
// /leader, /metrics and, with the admin token (entered on the page, or
// given as #token=... in the address), /admin/status and
// /admin/violations; its actions (audit, rebuild one room) are admin API
// calls.
func ConsoleHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "GET only", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(consoleHTML)
	})
}
