package targets

// The filter parser and matcher before the expr language, kept as the
// oracle that every filter it accepted still parses and means the same
// (FuzzParseFilter).

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/tidemark/tidemark/pipeline"
)

// legacyCond is one filter condition: Col = Values[0], Col != Values[0], or Col IN
// Values (texts).
type legacyCond struct {
	Col    string
	Not    bool // "!=" (and "NOT IN")
	Values []string
}

// legacyFilter is a conjunction of conditions; empty matches every row.
type legacyFilter []legacyCond

var (
	legacyCondRe = regexp.MustCompile(`(?is)^\s*([A-Za-z_][A-Za-z0-9_$]*)\s*(=|!=|<>|not\s+in|in)\s*(.+?)\s*$`)
	legacyLitRe  = regexp.MustCompile(`^(?:'((?:[^']|'')*)'|(-?[0-9]+(?:\.[0-9]+)?)|(?i:(true|false)))$`)
)

// legacyParseFilter parses "col = 'v' AND col2 IN ('a', 'b')".
func legacyParseFilter(s string) (legacyFilter, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var f legacyFilter
	for _, part := range legacySplitAnd(s) {
		m := legacyCondRe.FindStringSubmatch(part)
		if m == nil {
			return nil, fmt.Errorf("%q: want col = 'value', col != 'value' or col IN ('a', 'b'), joined by AND", strings.TrimSpace(part))
		}
		c := legacyCond{Col: m[1]}
		op := strings.ToLower(strings.Join(strings.Fields(m[2]), " "))
		rhs := strings.TrimSpace(m[3])
		var lits []string
		switch op {
		case "in", "not in":
			if !strings.HasPrefix(rhs, "(") || !strings.HasSuffix(rhs, ")") {
				return nil, fmt.Errorf("%q: IN needs a parenthesised list", strings.TrimSpace(part))
			}
			lits = legacySplitList(rhs[1 : len(rhs)-1])
			c.Not = op == "not in"
		default:
			lits = []string{rhs}
			c.Not = op != "="
		}
		for _, l := range lits {
			v, err := legacyLiteral(l)
			if err != nil {
				return nil, fmt.Errorf("%q: %v", strings.TrimSpace(part), err)
			}
			c.Values = append(c.Values, v)
		}
		if len(c.Values) == 0 {
			return nil, fmt.Errorf("%q: empty list", strings.TrimSpace(part))
		}
		f = append(f, c)
	}
	return f, nil
}

// legacySplitAnd splits on AND outside quotes.
func legacySplitAnd(s string) []string {
	var parts []string
	inQ := false
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\'' {
			inQ = !inQ
			continue
		}
		if !inQ && i+5 <= len(s) && strings.EqualFold(s[i:i+5], " and ") {
			parts = append(parts, s[start:i])
			start = i + 5
			i += 4
		}
	}
	return append(parts, s[start:])
}

// legacySplitList splits a literal list on commas outside quotes.
func legacySplitList(s string) []string {
	var out []string
	inQ := false
	start := 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\'':
			inQ = !inQ
		case s[i] == ',' && !inQ:
			out = append(out, strings.TrimSpace(s[start:i]))
			start = i + 1
		}
	}
	if last := strings.TrimSpace(s[start:]); last != "" || len(out) > 0 {
		out = append(out, last)
	}
	return out
}

func legacyLiteral(l string) (string, error) {
	m := legacyLitRe.FindStringSubmatch(strings.TrimSpace(l))
	if m == nil {
		return "", fmt.Errorf("%q is not a 'quoted' text, a number, true or false", l)
	}
	switch {
	case m[2] != "":
		return m[2], nil
	case m[3] != "":
		return strings.ToLower(m[3]), nil
	}
	return strings.ReplaceAll(m[1], "''", "'"), nil
}

// Match evaluates the filter on a row image. A condition on a column the
// image does not carry (a key-only old image) counts as matching when
// absentMatches is set; a NULL column matches no condition.
func (f legacyFilter) Match(img map[string]json.RawMessage, absentMatches bool) bool {
	for _, c := range f {
		if _, present := img[c.Col]; !present {
			if absentMatches {
				continue
			}
			return false
		}
		v, ok := pipeline.Text(img, c.Col)
		if !ok {
			return false
		}
		if slices.Contains(c.Values, v) == c.Not {
			return false
		}
	}
	return true
}
