package capture

import (
	"strings"
	"testing"
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
