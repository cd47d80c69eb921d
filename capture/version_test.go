package capture

import (
	"strings"
	"testing"
	"time"
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
