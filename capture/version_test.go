package capture

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestVersionProblem(t *testing.T) {
	for _, c := range []struct {
		num  int
		text string
		bad  bool
	}{
		{100023, "10.23", true},
		{130011, "13.11", true},
		{139999, "13.99", true},
		{140000, "14.0", false},
		{150005, "15.5 (Debian 15.5-0+deb12u1)", false},
		{170002, "17.2", false},
	} {
		p := versionProblem(c.num, c.text)
		if (p != nil) != c.bad {
			t.Errorf("versionProblem(%d) = %+v, want a problem: %v", c.num, p, c.bad)
			continue
		}
		if p != nil && (!strings.Contains(p.What, c.text) || !strings.Contains(p.What, "14 or later") || p.Fix == "") {
			t.Errorf("versionProblem(%d) does not name the version and the minimum: %+v", c.num, p)
		}
	}
}

func TestParsePGDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{"60s": time.Minute, "5s": 5 * time.Second, "500ms": 500 * time.Millisecond,
		"1min": time.Minute, "2h": 2 * time.Hour, "0": 0, "1d": 24 * time.Hour} {
		if got, err := parsePGDuration(in); err != nil || got != want {
			t.Errorf("parsePGDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "s", "10 s", "10parsecs", "-1s"} {
		if got, err := parsePGDuration(in); err == nil {
			t.Errorf("parsePGDuration(%q) = %v, want an error", in, got)
		}
	}
}

// TestTerminalServerErrors: server errors no reconnect can fix end capture;
// the others (e.g. the slot still held by an old walsender) are retried.
// An invalidated slot's error says that changes were lost.
func TestTerminalServerErrors(t *testing.T) {
	for _, c := range []struct {
		code, msg, detail string
		terminal          bool
	}{
		{"42704", `replication slot "tm" does not exist`, "", true},
		{"28P01", "password authentication failed", "", true},
		{"42501", "permission denied", "", true},
		{"55000", `cannot read from logical replication slot "tm"`, "This slot has been invalidated because it exceeded the maximum reserved size.", true},
		{"55000", `can no longer get changes from replication slot "tm"`, "", true},
		{"55000", `cannot use replication slot "tm" for logical decoding`, "This slot is being synchronized from the primary server.", false},
		{"22023", `unrecognized pgoutput option: "messages"`, "", true},
		{"0A000", "client sent proto_version=9 but server only supports protocol 4 or lower", "", true},
		{"0A000", "logical decoding cannot be used while in recovery", "", false},
		{"55006", `replication slot "tm" is active for PID 42`, "", false},
		{"57P01", "terminating connection due to administrator command", "", false},
		{"08006", "connection failure", "", false},
	} {
		err := fmt.Errorf("START_REPLICATION: %w", &pgconn.PgError{Code: c.code, Message: c.msg, Detail: c.detail})
		if got := isTerminalPG(err); got != c.terminal {
			t.Errorf("isTerminalPG(%s %q) = %v, want %v", c.code, c.msg, got, c.terminal)
		}
	}
	s := &Stream{cfg: Config{Slot: "tm"}}
	err := s.explainTerminal(&pgconn.PgError{Code: "55000", Message: `cannot read from logical replication slot "tm"`,
		Detail: "This slot has been invalidated because it exceeded the maximum reserved size."})
	if !errors.Is(err, ErrTerminal) || !strings.Contains(err.Error(), `replication slot "tm" is invalidated (wal_status lost)`) || !strings.Contains(err.Error(), "lost") {
		t.Errorf("explainTerminal = %v", err)
	}
	err = s.explainTerminal(fmt.Errorf("START_REPLICATION: %w", &pgconn.PgError{Code: "42704", Message: `replication slot "tm" does not exist`}))
	if !errors.Is(err, ErrTerminal) || !strings.Contains(err.Error(), `replication slot "tm" no longer exists`) || !strings.Contains(err.Error(), "--accept-gap") {
		t.Errorf("explainTerminal (slot dropped) = %v", err)
	}
	pub := &pgconn.PgError{Code: "42704", Message: `publication "tm" does not exist`}
	if err := s.explainTerminal(pub); err != pub {
		t.Errorf("explainTerminal changed a missing publication's error: %v", err)
	}
	other := &pgconn.PgError{Code: "22023", Message: `unrecognized pgoutput option: "messages"`}
	if err := s.explainTerminal(other); err != other {
		t.Errorf("explainTerminal changed an unrelated error: %v", err)
	}
}
