package invalidation

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/tidemark/tidemark/pipeline"
)

// Rule maps a table's changes to cache keys.
type Rule struct {
	// Table is "schema.table".
	Table string `yaml:"table"`
	// Keys are templates over the row's columns, e.g. "room:{room_id}:members".
	// Each is filled from the before and the after image, so an update that
	// moves a row (its room changes) invalidates the old and the new keys.
	Keys []string `yaml:"keys"`
	// Ops limits the rule to c (insert), u (update), d (delete), r
	// (snapshot read). Default: c, u, d.
	Ops []string `yaml:"ops"`
	// Columns limits updates to those that change one of these columns.
	// An update whose old values are unknown counts as changing them.
	Columns []string `yaml:"columns"`
}

type segment struct {
	lit string
	col string // "" for a literal
}

type template []segment

func parseTemplate(s string) (template, error) {
	var t template
	for len(s) > 0 {
		i := strings.IndexAny(s, "{}")
		if i < 0 {
			t = append(t, segment{lit: s})
			break
		}
		if s[i] == '}' {
			return nil, fmt.Errorf("unmatched '}'")
		}
		if i > 0 {
			t = append(t, segment{lit: s[:i]})
		}
		j := strings.IndexByte(s[i:], '}')
		if j < 0 {
			return nil, fmt.Errorf("unclosed '{'")
		}
		col := s[i+1 : i+j]
		if col == "" || strings.ContainsAny(col, "{ ") {
			return nil, fmt.Errorf("bad column reference {%s}", col)
		}
		t = append(t, segment{col: col})
		s = s[i+j+1:]
	}
	return t, nil
}

type compiledRule struct {
	templates []template
	ops       string
	columns   []string
}

// Engine turns changes into cache keys. It is safe for concurrent use.
type Engine struct {
	byTable map[string][]compiledRule
}

// Compile checks rules against the tables' columns (columns maps
// "schema.table" to its column names) and reports every problem, by rule
// index and field.
func Compile(rules []Rule, columns map[string][]string) (*Engine, error) {
	e := &Engine{byTable: map[string][]compiledRule{}}
	var probs []string
	for i, r := range rules {
		at := fmt.Sprintf("invalidation.rules[%d]", i)
		cols, ok := columns[r.Table]
		if !ok {
			probs = append(probs, fmt.Sprintf("%s.table: %q is not a captured table", at, r.Table))
			continue
		}
		cr := compiledRule{ops: "cud", columns: r.Columns}
		if len(r.Ops) > 0 {
			cr.ops = ""
			for j, op := range r.Ops {
				if len(op) != 1 || !strings.Contains("cudr", op) {
					probs = append(probs, fmt.Sprintf("%s.ops[%d]: %q is not one of c, u, d, r", at, j, op))
					continue
				}
				cr.ops += op
			}
		}
		if len(r.Keys) == 0 {
			probs = append(probs, fmt.Sprintf("%s.keys: at least one key template is required", at))
		}
		for j, k := range r.Keys {
			t, err := parseTemplate(k)
			if err != nil {
				probs = append(probs, fmt.Sprintf("%s.keys[%d]: %q: %v", at, j, k, err))
				continue
			}
			for _, s := range t {
				if s.col != "" && !slices.Contains(cols, s.col) {
					probs = append(probs, fmt.Sprintf("%s.keys[%d]: %q uses column %q, which %s does not have (columns: %s)",
						at, j, k, s.col, r.Table, strings.Join(cols, ", ")))
				}
			}
			cr.templates = append(cr.templates, t)
		}
		for j, c := range r.Columns {
			if !slices.Contains(cols, c) {
				probs = append(probs, fmt.Sprintf("%s.columns[%d]: %s has no column %q", at, j, r.Table, c))
			}
		}
		e.byTable[r.Table] = append(e.byTable[r.Table], cr)
	}
	if len(probs) > 0 {
		return nil, fmt.Errorf("invalid invalidation rules:\n  - %s", strings.Join(probs, "\n  - "))
	}
	return e, nil
}

// Tables returns the tables that have rules.
func (e *Engine) Tables() []string {
	out := make([]string, 0, len(e.byTable))
	for t := range e.byTable {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// Keys appends the cache keys a change invalidates to dst (without
// duplicates) and reports whether any rule of its table accepted its op.
func (e *Engine) Keys(env *pipeline.Envelope, dst []string) ([]string, bool) {
	rules := e.byTable[env.Table()]
	accepted := false
	for _, r := range rules {
		if !strings.Contains(r.ops, env.Op) {
			continue
		}
		accepted = true
		if env.Op == "u" && len(r.columns) > 0 && !changed(env, r.columns) {
			continue
		}
		for _, t := range r.templates {
			for _, img := range []map[string]json.RawMessage{env.Before, env.After} {
				if img == nil {
					continue
				}
				if k, ok := fill(t, img); ok && !slices.Contains(dst, k) {
					dst = append(dst, k)
				}
			}
		}
	}
	return dst, accepted
}

// fill renders t from one row image; ok is false when a referenced column
// is NULL, absent or unchanged there.
func fill(t template, img map[string]json.RawMessage) (string, bool) {
	var b strings.Builder
	for _, s := range t {
		if s.col == "" {
			b.WriteString(s.lit)
			continue
		}
		v, ok := pipeline.Text(img, s.col)
		if !ok {
			return "", false
		}
		b.WriteString(v)
	}
	return b.String(), true
}

// changed reports whether an update changed one of cols. Without an old
// image (default replica identity) it cannot know and says yes.
func changed(env *pipeline.Envelope, cols []string) bool {
	if env.Before == nil {
		return true
	}
	for _, c := range cols {
		if slices.Contains(env.Unchanged, c) {
			continue
		}
		b, okB := env.Before[c]
		a, okA := env.After[c]
		if !okB || !okA || string(a) != string(b) {
			return true
		}
	}
	return false
}
