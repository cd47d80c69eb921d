// Package integrity is Tidemark's third consumer: it flags writes that are
// missing their expected related rows (an events row committed without its
// event_json row, a read marker pointing to an event that does not exist),
// rows orphaned by the deletion of what they point to, and columns that must
// never move backwards (a read marker's stream_ordering), as they happen.
//
// It runs on the consumer runtime (package invalidation) over the rule
// tables' own topics and the transaction-metadata topic
// (<prefix>.transaction, DESIGN §2):
//
//   - A same_transaction rule is decided when the transaction is complete: its
//     END record has arrived and, for every subscribed table, as many changes
//     as the END record counts have been seen, whatever topic or partition
//     they came from. Nothing is decided on a partial transaction.
//   - A windowed rule ("within: 30s") keeps a bounded index of pending
//     expectations. A related row seen in the stream satisfies one; at the
//     deadline, measured in stream time (the commit times the consumer has
//     reached, not the wall clock), it is confirmed against the database
//     (read-only, pooled, rate-limited) before anything is flagged, so a row
//     written earlier or a lagging consumer never produces a flag.
//   - A monotonic rule compares a column, by its type (order.go), with its
//     previous value for a key: from the before image when the replica
//     identity provides it, otherwise from the last value seen, kept in a
//     bounded in-memory index backed by a state table (restart-safe). An
//     update split into a delete and an insert (a table keyed by the whole
//     row) is compared within its transaction, whichever half comes first.
//
// Violations have a deterministic id (rule, row key, position), so replays
// never duplicate them; they go to <prefix>.violations, to the
// <schema>.violations table (idempotent upsert), to a Prometheus counter per
// rule and to one warn log line each. A violation is resolved when the
// missing row appears later.
//
// The consumer's state (pending expectations, open transactions, monotonic
// values, the last applied position per partition) is written to
// <schema>.integrity_state in the same database transaction as the
// violations, before offsets are committed, so a restart neither loses a
// decision nor makes one twice. The integrity consumer group must have a
// single member: a transaction's changes are correlated across partitions.
package integrity

import (
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/tidemark/tidemark/invalidation/expr"
	"github.com/tidemark/tidemark/pipeline"
)

// Rule is one declarative integrity rule.
//
// An existence rule (Expect set) says: every change of Table with an op in
// On (matching Where) has a row in Expect.Table whose Expect.Match columns
// equal the changed row's, within Within. With Reverse, deleting that
// related row while the row of Table remains is flagged too (the row is
// orphaned).
//
// A forbid rule (Forbid set) says the opposite of an existence rule: no row
// of Table matching Where has a row in Forbid.Table whose Forbid.Match
// columns equal its own and that matches Forbid.Where (e.g. a deactivated
// user has no joined membership). A change that brings either side into the
// forbidden state (the row of Table starts matching Where, or a related row
// starts matching Forbid.Where) is checked in the database once Within has
// passed in stream time, and flagged only when the database then holds
// both rows (one statement, one snapshot): never from the stream, so
// consumer lag cannot cause a flag.
//
// A monotonic rule (Monotonic set) says: Monotonic.Column never decreases
// for a Monotonic.Key of Table.
type Rule struct {
	// Name identifies the rule in violations and metrics (required, unique;
	// letters, digits, '_', '-', '.').
	Name string `yaml:"name"`
	// Table is "schema.table" ("public." is assumed when omitted).
	Table string `yaml:"table"`
	// On lists the ops that are checked: insert, update, delete. Default
	// [insert] for existence rules, [insert, update] for monotonic and
	// forbid rules (delete does not apply to forbid rules).
	On []string `yaml:"on"`
	// Where restricts the rule to matching rows: an expression such as
	// "type = 'm.room.message' AND state_key IS NULL" (see the README's
	// expression language), or a mapping {column: value} (each column's text
	// equals the value).
	Where Where `yaml:"where,omitempty"`
	// Expect is the related row an existence rule requires.
	Expect *Expect `yaml:"expect"`
	// Forbid is the related row a forbid rule forbids.
	Forbid *Forbid `yaml:"forbid"`
	// Within is "same_transaction" or a duration such as "30s". Default
	// same_transaction. Existence and forbid rules only (a forbid rule's
	// same_transaction is checked in the database as soon as the stream
	// reaches the commit).
	Within string `yaml:"within"`
	// Reverse also flags deleting the related row while this table's row
	// remains. Existence rules only. Default false.
	Reverse bool `yaml:"reverse"`
	// Monotonic makes this a monotonic rule.
	Monotonic *Monotonic `yaml:"monotonic"`
	// Severity: info, warning, error or critical. Default error.
	Severity string `yaml:"severity"`
}

// Expect names the related row of an existence rule.
type Expect struct {
	// Table is the related "schema.table" (required).
	Table string `yaml:"table"`
	// Match maps this table's columns to the related table's columns, all
	// of which must be equal (required; several entries for a multi-column
	// match), e.g. {event_id: event_id}.
	Match map[string]string `yaml:"match"`
	// Where restricts the related rows that count (expression or mapping,
	// as Rule.Where).
	Where Where `yaml:"where,omitempty"`
}

// Forbid names the related row a forbid rule forbids: a row of Table whose
// Match columns equal the rule row's and that matches Where.
type Forbid struct {
	// Table is the related "schema.table" (required).
	Table string `yaml:"table"`
	// Match maps this table's columns to the related table's columns
	// (required), e.g. {name: user_id}.
	Match map[string]string `yaml:"match"`
	// Where restricts the related rows that are forbidden (expression or
	// mapping, as Rule.Where), e.g. "membership = 'join'".
	Where Where `yaml:"where,omitempty"`
}

// Monotonic describes a column that must never move backwards for a key.
type Monotonic struct {
	// Column is compared by its type (required): integers, numeric and
	// floats exactly as numbers; timestamptz, timestamp and date as
	// instants; text, varchar, char and uuid as text (byte order, not the
	// collation). Any other type is refused at start.
	Column string `yaml:"column"`
	// Key columns identify the row whose values are compared (required),
	// e.g. [user_id, room_id].
	Key []string `yaml:"key"`
}

// SameTransaction is the Within value of rules decided at the END record.
const SameTransaction = "same_transaction"

// DefaultRules are the rules for the canonical chat schema (shared/bench):
// events need their event_json in the same transaction (and deleting the
// event_json of a live event orphans it); a read marker's event must exist
// within 30 s; a read marker's stream_ordering never moves backwards per
// (user_id, room_id).
func DefaultRules() []Rule {
	return []Rule{
		{Name: "events_have_json", Table: "public.events", On: []string{"insert"},
			Expect: &Expect{Table: "public.event_json", Match: map[string]string{"event_id": "event_id"}},
			Within: SameTransaction, Reverse: true, Severity: "critical"},
		{Name: "read_marker_event_exists", Table: "public.read_markers", On: []string{"insert", "update"},
			Expect: &Expect{Table: "public.events", Match: map[string]string{"event_id": "event_id"}},
			Within: "30s", Severity: "error"},
		{Name: "read_marker_monotonic", Table: "public.read_markers", On: []string{"insert", "update"},
			Monotonic: &Monotonic{Column: "stream_ordering", Key: []string{"user_id", "room_id"}}, Severity: "warning"},
	}
}

// Problem is one configuration problem, by field path.
type Problem struct {
	Path string
	Msg  string
}

// Error renders "path: message".
func (p Problem) Error() string { return p.Path + ": " + p.Msg }

var nameRe = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

// ApplyDefaults qualifies table names and fills On, Within and Severity.
func ApplyDefaults(rules []Rule) {
	for i := range rules {
		r := &rules[i]
		r.Table = pipeline.QualifyTable(r.Table)
		if r.Expect != nil {
			r.Expect.Table = pipeline.QualifyTable(r.Expect.Table)
			if r.Within == "" {
				r.Within = SameTransaction
			}
		}
		if r.Forbid != nil {
			r.Forbid.Table = pipeline.QualifyTable(r.Forbid.Table)
			if r.Within == "" {
				r.Within = SameTransaction
			}
		}
		if len(r.On) == 0 {
			if r.Monotonic != nil || r.Forbid != nil {
				r.On = []string{"insert", "update"}
			} else {
				r.On = []string{"insert"}
			}
		}
		if r.Severity == "" {
			r.Severity = "error"
		}
	}
}

// Validate checks the rules' shape (not the database) and returns every
// problem, by field path under at (e.g. "integrity.rules").
func Validate(at string, rules []Rule) []Problem {
	var ps []Problem
	add := func(path, format string, args ...any) {
		ps = append(ps, Problem{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	names := map[string]int{}
	for i, r := range rules {
		p := fmt.Sprintf("%s[%d]", at, i)
		switch {
		case r.Name == "":
			add(p+".name", "required")
		case !nameRe.MatchString(r.Name):
			add(p+".name", "%q may only hold letters, digits, '_', '-' and '.'", r.Name)
		default:
			if j, dup := names[r.Name]; dup {
				add(p+".name", "%q is also the name of %s[%d]", r.Name, at, j)
			}
			names[r.Name] = i
		}
		if !pipeline.IsQualifiedTable(r.Table) {
			add(p+".table", "%q is not schema.table", r.Table)
		}
		for j, op := range r.On {
			if op != "insert" && op != "update" && op != "delete" {
				add(fmt.Sprintf("%s.on[%d]", p, j), "%q is not one of insert, update, delete", op)
			}
		}
		checkWhere(add, p+".where", r.Where)
		switch r.Severity {
		case "info", "warning", "error", "critical":
		default:
			add(p+".severity", "%q is not one of info, warning, error, critical", r.Severity)
		}
		var kinds []string
		for _, k := range []struct {
			set  bool
			name string
		}{{r.Expect != nil, "expect"}, {r.Forbid != nil, "forbid"}, {r.Monotonic != nil, "monotonic"}} {
			if k.set {
				kinds = append(kinds, k.name)
			}
		}
		switch {
		case len(kinds) > 1:
			add(p, "sets both %s; a rule is one of expect, forbid and monotonic", strings.Join(kinds, " and "))
		case len(kinds) == 0:
			add(p, "sets none of expect, forbid and monotonic")
		case r.Forbid != nil:
			f := r.Forbid
			if !pipeline.IsQualifiedTable(f.Table) {
				add(p+".forbid.table", "%q is not schema.table", f.Table)
			}
			if len(f.Match) == 0 {
				add(p+".forbid.match", "required: map this table's columns to the related table's, e.g. {name: user_id}")
			}
			for _, c := range sortedKeys(f.Match) {
				if !pipeline.IsIdentifier(c) || !pipeline.IsIdentifier(f.Match[c]) {
					add(p+".forbid.match", "%q: %q is not a pair of column names", c, f.Match[c])
				}
			}
			checkWhere(add, p+".forbid.where", f.Where)
			if _, err := ParseWithin(r.Within); err != nil {
				add(p+".within", "%v", err)
			}
			if r.Reverse {
				add(p+".reverse", "only existence rules (expect) have a reverse direction")
			}
			for j, op := range r.On {
				if op == "delete" {
					add(fmt.Sprintf("%s.on[%d]", p, j), "a deleted row cannot hold a forbidden related row; forbid rules check insert and update")
				}
			}
		case r.Expect != nil:
			e := r.Expect
			if !pipeline.IsQualifiedTable(e.Table) {
				add(p+".expect.table", "%q is not schema.table", e.Table)
			}
			if len(e.Match) == 0 {
				add(p+".expect.match", "required: map this table's columns to the related table's, e.g. {event_id: event_id}")
			}
			for _, c := range sortedKeys(e.Match) {
				if !pipeline.IsIdentifier(c) || !pipeline.IsIdentifier(e.Match[c]) {
					add(p+".expect.match", "%q: %q is not a pair of column names", c, e.Match[c])
				}
			}
			checkWhere(add, p+".expect.where", e.Where)
			if _, err := ParseWithin(r.Within); err != nil {
				add(p+".within", "%v", err)
			}
			if r.Reverse && r.Table == e.Table {
				add(p+".reverse", "needs a related table other than the rule's table")
			}
		default:
			m := r.Monotonic
			if !pipeline.IsIdentifier(m.Column) {
				add(p+".monotonic.column", "%q is not a column name", m.Column)
			}
			if len(m.Key) == 0 {
				add(p+".monotonic.key", "required: the columns that identify the row, e.g. [user_id, room_id]")
			}
			for j, c := range m.Key {
				if !pipeline.IsIdentifier(c) {
					add(fmt.Sprintf("%s.monotonic.key[%d]", p, j), "%q is not a column name", c)
				}
			}
			if r.Within != "" {
				add(p+".within", "only existence rules (expect) have a window")
			}
			if r.Reverse {
				add(p+".reverse", "only existence rules (expect) have a reverse direction")
			}
		}
	}
	return ps
}

// ParseWithin parses a Within value: 0 for same_transaction, else a
// positive duration.
func ParseWithin(s string) (time.Duration, error) {
	if s == SameTransaction {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%q is neither %s nor a positive duration such as 30s", s, SameTransaction)
	}
	return d, nil
}

// Tables returns every table the rules read (rule tables and related
// tables), sorted.
func Tables(rules []Rule) []string {
	var out []string
	for _, r := range rules {
		if !slices.Contains(out, r.Table) {
			out = append(out, r.Table)
		}
		if r.Expect != nil && !slices.Contains(out, r.Expect.Table) {
			out = append(out, r.Expect.Table)
		}
		if r.Forbid != nil && !slices.Contains(out, r.Forbid.Table) {
			out = append(out, r.Forbid.Table)
		}
	}
	sort.Strings(out)
	return out
}

// checkWhere reports a condition that does not parse, or a mapping key
// that is not a column name.
func checkWhere(add func(path, format string, args ...any), path string, w Where) {
	for _, c := range sortedKeys(w.Equal) {
		if !pipeline.IsIdentifier(c) {
			add(path, "%q is not a column name", c)
		}
	}
	if _, err := w.parse(); err != nil {
		add(path, "%q: %v", w.String(), err)
	}
}

func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// TableSchema is what rules are compiled against: a table's columns with
// their types, and the columns its old-row images carry.
type TableSchema struct {
	Name string // schema.table
	// Columns in ordinal order, and their types (a type name usable in a
	// cast, e.g. "pg_catalog"."text").
	Columns []string
	Types   map[string]string
	// Identity are the columns deletes and key-changing updates carry in
	// their before image (all columns under REPLICA IDENTITY FULL).
	Identity []string
}

func (t *TableSchema) has(c string) bool { return slices.Contains(t.Columns, c) }

// Compile checks validated rules against the tables' real columns and
// replica identities and returns every problem, naming rule and column.
func Compile(at string, rules []Rule, schema map[string]*TableSchema) (*Engine, error) {
	e := &Engine{}
	var probs []string
	for i, r := range rules {
		p := fmt.Sprintf("%s[%d] (%s)", at, i, r.Name)
		ts := schema[r.Table]
		if ts == nil {
			probs = append(probs, fmt.Sprintf("%s.table: %s does not exist or is not captured", p, r.Table))
			continue
		}
		missing := func(field string, t *TableSchema, c string) {
			probs = append(probs, fmt.Sprintf("%s.%s: %s has no column %q (columns: %s)", p, field, t.Name, c, strings.Join(t.Columns, ", ")))
		}
		cr := &compiled{Rule: r, idx: i, table: ts}
		for _, op := range r.On {
			cr.ops += opCode(op)
		}
		cr.where = compileWhere(&probs, p+".where", r.Where, ts, missing)
		if r.Forbid != nil {
			rt := schema[r.Forbid.Table]
			if rt == nil {
				probs = append(probs, fmt.Sprintf("%s.forbid.table: %s does not exist or is not captured", p, r.Forbid.Table))
				continue
			}
			cr.related = rt
			cr.window, _ = ParseWithin(r.Within)
			for _, c := range sortedKeys(r.Forbid.Match) {
				rc := r.Forbid.Match[c]
				if !ts.has(c) {
					missing("forbid.match", ts, c)
				}
				if !rt.has(rc) {
					missing("forbid.match", rt, rc)
				}
				cr.cols = append(cr.cols, c)
				cr.relCols = append(cr.relCols, rc)
			}
			cr.relWhere = compileWhere(&probs, p+".forbid.where", r.Forbid.Where, rt, missing)
		} else if r.Expect != nil {
			rt := schema[r.Expect.Table]
			if rt == nil {
				probs = append(probs, fmt.Sprintf("%s.expect.table: %s does not exist or is not captured", p, r.Expect.Table))
				continue
			}
			cr.related = rt
			cr.window, _ = ParseWithin(r.Within)
			for _, c := range sortedKeys(r.Expect.Match) {
				rc := r.Expect.Match[c]
				if !ts.has(c) {
					missing("expect.match", ts, c)
				}
				if !rt.has(rc) {
					missing("expect.match", rt, rc)
				}
				cr.cols = append(cr.cols, c)
				cr.relCols = append(cr.relCols, rc)
				if strings.Contains(cr.ops, "d") && !slices.Contains(ts.Identity, c) {
					probs = append(probs, fmt.Sprintf("%s.on: deletes of %s do not carry column %q (replica identity: %v); "+
						"run ALTER TABLE %s REPLICA IDENTITY FULL or drop delete from on", p, ts.Name, c, ts.Identity, ts.Name))
				}
				if r.Reverse && !slices.Contains(rt.Identity, rc) {
					probs = append(probs, fmt.Sprintf("%s.reverse: deletes of %s do not carry column %q (replica identity: %v); "+
						"run ALTER TABLE %s REPLICA IDENTITY FULL", p, rt.Name, rc, rt.Identity, rt.Name))
				}
			}
			cr.relWhere = compileWhere(&probs, p+".expect.where", r.Expect.Where, rt, missing)
			for _, c := range cr.relWhere.Columns() {
				if rt.has(c) && r.Reverse && !slices.Contains(rt.Identity, c) {
					probs = append(probs, fmt.Sprintf("%s.reverse: deletes of %s do not carry expect.where column %q; "+
						"run ALTER TABLE %s REPLICA IDENTITY FULL", p, rt.Name, c, rt.Name))
				}
			}
		} else {
			m := r.Monotonic
			if !ts.has(m.Column) {
				missing("monotonic.column", ts, m.Column)
			}
			for _, c := range m.Key {
				if !ts.has(c) {
					missing("monotonic.key", ts, c)
				}
			}
			if ts.has(m.Column) {
				if cr.order, cr.orderName = orderFor(ts.Types[m.Column]); cr.order == nil {
					probs = append(probs, fmt.Sprintf("%s.monotonic.column: %s.%s has type %s, which has no order Tidemark compares "+
						"(numbers, numeric, timestamptz, timestamp, date, text, varchar, char, uuid); choose an ordered column",
						p, ts.Name, m.Column, ts.Types[m.Column]))
				}
			}
			if strings.Contains(cr.ops, "u") && len(ts.Identity) == 0 {
				probs = append(probs, fmt.Sprintf("%s.on: updates of %s carry no old row (replica identity: none, or default "+
					"without a primary key), so a monotonic rule cannot see which row an update moved; "+
					"run ALTER TABLE %s REPLICA IDENTITY FULL (or add a primary key), or drop update from on", p, ts.Name, ts.Name))
			}
			cr.cols = m.Key
		}
		e.rules = append(e.rules, cr)
	}
	if len(probs) > 0 {
		return nil, fmt.Errorf("invalid integrity rules:\n  - %s", strings.Join(probs, "\n  - "))
	}
	e.index()
	return e, nil
}

func opCode(op string) string {
	switch op {
	case "insert":
		return "c"
	case "update":
		return "u"
	case "delete":
		return "d"
	}
	return ""
}

// compileWhere parses a condition and checks that every column it reads
// exists in t.
func compileWhere(probs *[]string, path string, w Where, t *TableSchema, missing func(field string, t *TableSchema, c string)) *expr.Expr {
	e, err := w.parse()
	if err != nil {
		*probs = append(*probs, fmt.Sprintf("%s: %q: %v", path, w.String(), err))
		return nil
	}
	field := path[strings.LastIndex(path, ")")+2:]
	for _, c := range e.Columns() {
		if !t.has(c) {
			missing(field, t, c)
		}
	}
	return e
}

// compiled is a rule checked against the schema.
type compiled struct {
	Rule
	idx      int
	table    *TableSchema
	where    *expr.Expr    // Rule.Where (nil: every row)
	relWhere *expr.Expr    // Expect.Where or Forbid.Where
	related  *TableSchema  // existence and forbid rules
	window   time.Duration // 0: same transaction
	ops      string        // "c", "u", "d"
	cols     []string      // match columns in table (sorted by column), or the monotonic key
	relCols  []string      // the related table's columns, in cols' order
	// order compares a monotonic rule's column by its type (orderName:
	// number, time, date or text).
	order     orderFunc
	orderName string
}

// Engine holds compiled rules, indexed by table.
type Engine struct {
	rules     []*compiled
	byTable   map[string][]*compiled // rules on a table
	byRelated map[string][]*compiled // existence rules whose related table it is
}

func (e *Engine) index() {
	e.byTable = map[string][]*compiled{}
	e.byRelated = map[string][]*compiled{}
	for _, r := range e.rules {
		e.byTable[r.Rule.Table] = append(e.byTable[r.Rule.Table], r)
		if r.related != nil {
			e.byRelated[r.related.Name] = append(e.byRelated[r.related.Name], r)
		}
	}
}

// Tables returns the tables the engine reads, sorted.
func (e *Engine) Tables() []string {
	var rs []Rule
	for _, r := range e.rules {
		rs = append(rs, r.Rule)
	}
	return Tables(rs)
}

// SameTransaction reports whether any rule is decided at END records.
func (e *Engine) SameTransaction() bool {
	for _, r := range e.rules {
		if r.Expect != nil && r.window == 0 {
			return true
		}
	}
	return false
}
