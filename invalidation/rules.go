package invalidation

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/tidemark/tidemark/invalidation/expr"
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
	// Filter limits the rule to rows matching it, in the expression
	// language of package invalidation/expr (see the README), e.g.
	// "type = 'm.room.member' AND state_key LIKE '%:example.org'". The rule
	// applies to a change when its before image or its after image
	// matches, so a row moving out of (or into) the filtered set still
	// invalidates its keys; an image lacking a filter column (a delete's
	// key-only old image, an unchanged TOAST value) matches when the
	// missing values could make the filter true. A change no rule applies
	// to because of filters is skipped (reason "filtered"). Default: every
	// row.
	Filter string `yaml:"filter,omitempty"`
	// Columns limits updates to those that change one of these columns.
	// An update whose old values are unknown counts as changing them.
	Columns []string `yaml:"columns"`
	// OnTruncate is what a TRUNCATE of the table does: "flush_pattern"
	// deletes every key the templates can produce (each {column} read as
	// "*": Redis SCAN MATCH + UNLINK), "dlq" dead-letters the truncate
	// once, "ignore" counts it as skipped. Default: flush_pattern when the
	// consumer has a Redis sink, else dlq (see DefaultOnTruncate).
	OnTruncate string `yaml:"on_truncate,omitempty"`
}

// The values of Rule.OnTruncate.
const (
	TruncateFlushPattern = "flush_pattern"
	TruncateDLQ          = "dlq"
	TruncateIgnore       = "ignore"
)

// DefaultOnTruncate is the default of Rule.OnTruncate: a cache user
// expects a truncated table's cached values to go, which only a sink that
// deletes by pattern (Redis) can do; without one the truncate is
// dead-lettered, so it is seen.
func DefaultOnTruncate(hasPatternSink bool) string {
	if hasPatternSink {
		return TruncateFlushPattern
	}
	return TruncateDLQ
}

// Table is what Compile knows of a captured table.
type Table struct {
	// Columns are the table's column names.
	Columns []string
	// Identity are the columns deletes carry in their old image (the
	// replica identity: primary key, or the replica identity index).
	Identity []string
	// Full is REPLICA IDENTITY FULL: deletes and every update carry the
	// whole old row. Without it an update carries an old image only when it
	// changes an identity column.
	Full bool
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
	at         string     // "invalidation.rules[i]"
	filter     *expr.Expr // nil: every row
	templates  []template
	ops        string
	columns    []string
	onTruncate string
}

// Engine turns changes into cache keys. It is safe for concurrent use.
type Engine struct {
	byTable map[string][]compiledRule
}

// Compile checks rules against the tables' columns (columns maps
// "schema.table" to its column names) and reports every problem, by rule
// index and field. It knows nothing of replica identities, so it cannot
// tell whether deletes and updates carry the templates' columns; the
// consumer uses CompileTables.
func Compile(rules []Rule, columns map[string][]string) (*Engine, error) {
	tables := make(map[string]Table, len(columns))
	for t, cols := range columns {
		tables[t] = Table{Columns: cols, Identity: cols, Full: true}
	}
	return CompileTables(rules, tables, true)
}

// CompileTables checks rules against the tables and reports every
// problem, by rule index and field, with the fix. Beyond Compile's checks,
// a rule is refused when its templates use a column that the ops it covers
// do not carry in the old image: a delete carries only the replica
// identity's columns (unless REPLICA IDENTITY FULL), and an update under
// the default identity carries old values only when an identity column
// changes, so a row moved between keys by a non-identity column would
// leave the old key cached. hasPatternSink (a Redis sink) sets the default
// and the admissible values of on_truncate.
func CompileTables(rules []Rule, tables map[string]Table, hasPatternSink bool) (*Engine, error) {
	e := &Engine{byTable: map[string][]compiledRule{}}
	var probs []string
	for i, r := range rules {
		at := fmt.Sprintf("invalidation.rules[%d]", i)
		ti, ok := tables[r.Table]
		if !ok {
			probs = append(probs, fmt.Sprintf("%s.table: %q is not a captured table", at, r.Table))
			continue
		}
		cols := ti.Columns
		cr := compiledRule{at: at, ops: "cud", columns: r.Columns, onTruncate: r.OnTruncate}
		if len(r.Ops) > 0 {
			cr.ops = ""
			for j, op := range r.Ops {
				if len(op) != 1 || !strings.Contains("cudr", op) {
					probs = append(probs, fmt.Sprintf("%s.ops[%d]: %q is not one of c, u, d, r (truncates: on_truncate)", at, j, op))
					continue
				}
				cr.ops += op
			}
		}
		switch cr.onTruncate {
		case "":
			cr.onTruncate = DefaultOnTruncate(hasPatternSink)
		case TruncateFlushPattern:
			if !hasPatternSink {
				probs = append(probs, fmt.Sprintf("%s.on_truncate: flush_pattern needs invalidation.redis (only Redis deletes by pattern); set on_truncate: dlq or ignore", at))
			}
		case TruncateDLQ, TruncateIgnore:
		default:
			probs = append(probs, fmt.Sprintf("%s.on_truncate: %q is not one of flush_pattern, dlq, ignore", at, cr.onTruncate))
		}
		if len(r.Keys) == 0 {
			probs = append(probs, fmt.Sprintf("%s.keys: at least one key template is required", at))
		}
		var noOld []string // template columns deletes or updates may not carry
		for j, k := range r.Keys {
			t, err := parseTemplate(k)
			if err != nil {
				probs = append(probs, fmt.Sprintf("%s.keys[%d]: %q: %v", at, j, k, err))
				continue
			}
			for _, s := range t {
				if s.col == "" {
					continue
				}
				if !slices.Contains(cols, s.col) {
					probs = append(probs, fmt.Sprintf("%s.keys[%d]: %q uses column %q, which %s does not have (columns: %s)",
						at, j, k, s.col, r.Table, strings.Join(cols, ", ")))
				} else if !ti.Full && !slices.Contains(ti.Identity, s.col) && !slices.Contains(noOld, s.col) {
					noOld = append(noOld, s.col)
				}
			}
			cr.templates = append(cr.templates, t)
		}
		probs = append(probs, oldImageProblems(at, r.Table, cr.ops, noOld, ti.Identity)...)
		if strings.TrimSpace(r.Filter) != "" {
			f, err := expr.Parse(r.Filter)
			if err != nil {
				probs = append(probs, fmt.Sprintf("%s.filter: %q: %v", at, r.Filter, err))
			} else {
				for _, c := range f.Columns() {
					if !slices.Contains(cols, c) {
						probs = append(probs, fmt.Sprintf("%s.filter: %s has no column %q (columns: %s)", at, r.Table, c, strings.Join(cols, ", ")))
					}
				}
				cr.filter = f
			}
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

// oldImageProblems reports, for a rule covering ops, the template columns
// (noOld: outside the replica identity) that its deletes and updates do not
// carry in their old image.
func oldImageProblems(at, table, ops string, noOld, identity []string) []string {
	if len(noOld) == 0 {
		return nil
	}
	var what []string
	if strings.Contains(ops, "d") {
		what = append(what, "a DELETE's old image carries only the replica identity")
	}
	if strings.Contains(ops, "u") {
		what = append(what, "an UPDATE carries no old image unless an identity column changes, so a row moved to another key leaves the old key cached")
	}
	if len(what) == 0 {
		return nil
	}
	id := "none"
	if len(identity) > 0 {
		id = strings.Join(identity, ", ")
	}
	limit := "c"
	if strings.Contains(ops, "r") {
		limit = "c, r"
	}
	return []string{fmt.Sprintf("%s (%s): its templates use column(s) %s, which %s (replica identity: %s); fix: ALTER TABLE %s REPLICA IDENTITY FULL; or limit the rule to ops: [%s]",
		at, table, strings.Join(noOld, ", "), strings.Join(what, ", and "), id, quoteTable(table), limit)}
}

// quoteTable renders "schema.table" as SQL, quoting where needed.
func quoteTable(t string) string {
	parts := strings.SplitN(t, ".", 2)
	for i, p := range parts {
		if !plainIdent(p) {
			parts[i] = `"` + strings.ReplaceAll(p, `"`, `""`) + `"`
		}
	}
	return strings.Join(parts, ".")
}

func plainIdent(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		if !(r == '_' || r >= 'a' && r <= 'z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return true
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
	dst, ok, _ := e.Resolve(env, dst)
	return dst, ok
}

// Resolve is Keys, and also reports a change that a rule accepted but whose
// images lack a column of every template of that rule (a delete under a
// key-only replica identity, say): it invalidates nothing that rule
// covers, which is an error, never a silent no-op. A column present but
// NULL renders no key and is no error.
func (e *Engine) Resolve(env *pipeline.Envelope, dst []string) ([]string, bool, error) {
	dst, accepted, _, err := e.resolve(env, dst)
	return dst, accepted, err
}

// resolve is Resolve, also reporting a change whose op a rule accepts but
// that every such rule's filter excludes (accepted is then false).
func (e *Engine) resolve(env *pipeline.Envelope, dst []string) (_ []string, accepted, filtered bool, _ error) {
	rules := e.byTable[env.Table()]
	var errs []string
	for _, r := range rules {
		if !strings.Contains(r.ops, env.Op) {
			continue
		}
		if !r.applies(env) {
			filtered = true
			continue
		}
		accepted = true
		if env.Op == "u" && len(r.columns) > 0 && !changed(env, r.columns) {
			continue
		}
		filled, missing := false, ""
		for _, t := range r.templates {
			for _, img := range []map[string]json.RawMessage{env.Before, env.After} {
				if img == nil {
					continue
				}
				k, ok := fill(t, img)
				if ok {
					filled = true
					if !slices.Contains(dst, k) {
						dst = append(dst, k)
					}
				} else if c := absent(t, img); c != "" && missing == "" {
					missing = c
				}
			}
		}
		if !filled && missing != "" {
			errs = append(errs, fmt.Sprintf("%s (%s): op %q: no key template could be filled: the change does not carry column %q (set REPLICA IDENTITY FULL on the table)",
				r.at, env.Table(), env.Op, missing))
		}
	}
	if len(errs) > 0 {
		return dst, accepted, filtered && !accepted, errors.New(strings.Join(errs, "; "))
	}
	return dst, accepted, filtered && !accepted, nil
}

// applies reports whether the rule's filter matches the change's before
// image or its after image. An image lacking a filter column (a key-only
// old image, an unchanged TOAST value) matches when the missing values
// could make the filter true: invalidating too much is safe, too little
// leaves a stale cache.
func (r *compiledRule) applies(env *pipeline.Envelope) bool {
	if r.filter == nil {
		return true
	}
	row := func(img map[string]json.RawMessage) expr.Row {
		return func(col string) (string, bool, bool) {
			if _, ok := img[col]; !ok {
				return "", false, false
			}
			v, ok := pipeline.Text(img, col)
			return v, !ok, true
		}
	}
	if env.Before != nil && r.filter.Eval(row(env.Before)).Possibly() {
		return true
	}
	return env.After != nil && r.filter.Eval(row(env.After)).Possibly()
}

// absent returns the first column of t that img does not hold at all (as
// opposed to holding NULL), or "".
func absent(t template, img map[string]json.RawMessage) string {
	for _, s := range t {
		if s.col == "" {
			continue
		}
		if _, ok := img[s.col]; !ok {
			return s.col
		}
	}
	return ""
}

// TruncateAction is what a truncate of a table does under its rules.
type TruncateAction struct {
	// Patterns are Redis glob patterns matching every key the
	// flush_pattern rules' templates can produce.
	Patterns []string
	// DLQ names the rules ("invalidation.rules[i]") with on_truncate: dlq.
	DLQ []string
}

// Truncate returns the action for a truncate of table.
func (e *Engine) Truncate(table string) TruncateAction {
	var a TruncateAction
	for _, r := range e.byTable[table] {
		switch r.onTruncate {
		case TruncateFlushPattern:
			for _, t := range r.templates {
				if p := t.pattern(); !slices.Contains(a.Patterns, p) {
					a.Patterns = append(a.Patterns, p)
				}
			}
		case TruncateDLQ:
			a.DLQ = append(a.DLQ, r.at)
		}
	}
	return a
}

// pattern renders t as a Redis glob: each column reference becomes "*",
// literal glob characters are escaped.
func (t template) pattern() string {
	var b strings.Builder
	for _, s := range t {
		if s.col != "" {
			b.WriteByte('*')
			continue
		}
		for _, r := range s.lit {
			if strings.ContainsRune(`*?[]\^`, r) {
				b.WriteByte('\\')
			}
			b.WriteRune(r)
		}
	}
	return b.String()
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
