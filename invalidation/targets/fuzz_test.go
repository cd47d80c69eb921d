package targets

import (
	"reflect"
	"strings"
	"testing"
)

// FuzzParseFilter: any accepted filter renders back (String) to a filter
// that parses to the same conditions, and its SQL carries values only as
// parameters.
func FuzzParseFilter(f *testing.F) {
	for _, s := range []string{"type = 'm.room.member'", "a IN ('x', 'y''z') AND b != 3", "kind not in ('a,b') and flag = true", "x = ''", "a = 'and' AND b = ' AND '"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		flt, err := ParseFilter(s)
		if err != nil || len(flt) == 0 {
			return
		}
		again, err := ParseFilter(flt.String())
		if err != nil {
			t.Fatalf("ParseFilter(%q) = %v, but its rendering %q does not parse: %v", s, flt, flt.String(), err)
		}
		if !reflect.DeepEqual(again, flt) {
			t.Fatalf("ParseFilter(%q) = %#v; rendering %q parses to %#v", s, flt, flt.String(), again)
		}
		sql, args := flt.SQL("m", nil)
		if len(args) != len(flt) {
			t.Fatalf("SQL %q has %d parameters for %d conditions", sql, len(args), len(flt))
		}
		if strings.Contains(sql, "'") {
			t.Fatalf("SQL %q inlines a literal", sql)
		}
	})
}
