package targets

import (
	"encoding/json"
	"math/big"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tidemark/tidemark/invalidation/expr"
)

// FuzzParseFilter: every filter the language before expr accepted (the
// legacy oracle) still parses and matches the same row images (built from
// its own literals, another value, NULL and absent columns); any accepted
// filter renders back (String) to the same filter, and its SQL carries
// values only as parameters. (expr's own FuzzParse covers the language.)
func FuzzParseFilter(f *testing.F) {
	for _, s := range []string{"type = 'm.room.member'", "a IN ('x', 'y''z') AND b != 3", "kind not in ('a,b') and flag = true", "x = ''", "a = 'and' AND b = ' AND '", "n <> -3.5 and k in (1, 'x')"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		flt, err := ParseFilter(s)
		old, oldErr := legacyParseFilter(s)
		if oldErr == nil && legacyQuirk(s) {
			return
		}
		if oldErr == nil && err != nil && utf8.ValidString(s) { // YAML text is UTF-8; expr rejects invalid UTF-8
			t.Fatalf("ParseFilter(%q): %v, but the legacy parser accepted it as %v", s, err, old)
		}
		if err != nil || flt.e == nil {
			return
		}
		again, err := ParseFilter(flt.String())
		if err != nil || again.String() != flt.String() {
			t.Fatalf("ParseFilter(%q) renders %q, which parses to %v (%v)", s, flt.String(), again, err)
		}
		sql, args := flt.SQL("m", nil)
		if len(args) == 0 || strings.Contains(quotedIdent.ReplaceAllString(sql, `""`), "'") {
			t.Fatalf("SQL %q has no parameters or inlines a literal", sql)
		}
		if oldErr != nil {
			return
		}
		// Same meaning on images made of the filter's own values.
		var cols []string
		vals := []string{"zz-other"}
		for _, c := range old {
			cols = append(cols, c.Col)
			vals = append(vals, c.Values...)
		}
		if numericallyAmbiguous(vals) {
			return // "3" and "03": text-compared before, numerically now (documented)
		}
		for k := 0; k < 3*(len(vals)+2); k++ {
			img := map[string]json.RawMessage{}
			for j, c := range cols {
				switch n := (k + j*(k/3+1)) % (len(vals) + 2); n {
				case len(vals):
					img[c] = json.RawMessage("null")
				case len(vals) + 1: // absent
				default:
					b, _ := json.Marshal(vals[n])
					img[c] = b
				}
			}
			for _, absent := range []bool{false, true} {
				if got, want := flt.Match(img, absent), old.Match(img, absent); got != want {
					t.Fatalf("%q on %s (absentMatches %v): Match %v, legacy %v", s, img, absent, got, want)
				}
			}
		}
	})
}

// legacyQuirk reports a legacy parse that glued IN to the column ("Ain
// ('x')" read as A IN ('x')), which expr rightly reads as column Ain.
func legacyQuirk(s string) bool {
	for _, part := range legacySplitAnd(s) {
		if m := legacyCondRe.FindStringSubmatchIndex(part); m != nil && m[3] == m[4] && part[m[4]] != '=' && part[m[4]] != '!' && part[m[4]] != '<' {
			return true
		}
	}
	return false
}

var quotedIdent = regexp.MustCompile(`"(?:[^"]|"")*"`)

func numericallyAmbiguous(vals []string) bool {
	for i, a := range vals {
		for _, b := range vals[:i] {
			if a != b && expr.IsDecimal(a) && expr.IsDecimal(b) {
				ra, _ := new(big.Rat).SetString(a)
				rb, _ := new(big.Rat).SetString(b)
				if ra != nil && rb != nil && ra.Cmp(rb) == 0 {
					return true
				}
			}
		}
	}
	return false
}
