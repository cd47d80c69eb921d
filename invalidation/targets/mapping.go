package targets

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/pipeline"
)

// MembershipSource maps the table that holds room memberships. Defaults fit
// the canonical chat schema (public.room_memberships).
type MembershipSource struct {
	// Table is "schema.table". Default "public.room_memberships".
	Table string `yaml:"table"`
	// RoomColumn holds the room. Default "room_id".
	RoomColumn string `yaml:"room_column"`
	// UserColumn holds the user. Default "user_id".
	UserColumn string `yaml:"user_column"`
	// MembershipColumn holds the membership state. Default "membership".
	MembershipColumn string `yaml:"membership_column"`
	// Joined lists the membership values (compared as text; a boolean is
	// "true"/"false") that mean "joined". Default ["join"].
	Joined []string `yaml:"joined"`
	// Filter keeps only matching rows, e.g. "type = 'm.room.member'". The
	// language is small on purpose: conditions "col = lit", "col != lit"
	// and "col IN (lit, ...)" joined by AND; literals are 'quoted text',
	// numbers, true or false, compared with the column's text form. A NULL
	// column matches no condition (as in SQL). Default: every row.
	Filter string `yaml:"filter"`
}

// UserSource maps the table that says whether an account is active.
// Exactly one of DeactivatedColumn and ActiveColumn is used. A user without
// a row counts as active.
type UserSource struct {
	// Table is "schema.table". Default "public.users".
	Table string `yaml:"table"`
	// UserColumn holds the user id (the values of MembershipSource.UserColumn).
	// Default "user_id".
	UserColumn string `yaml:"user_column"`
	// DeactivatedColumn is a flag (boolean, or an integer where 1 means
	// true, like Synapse's smallint): true means deactivated. Default
	// "deactivated" unless ActiveColumn is set.
	DeactivatedColumn string `yaml:"deactivated_column"`
	// ActiveColumn is a flag: false (or 0) means deactivated (Zulip's
	// is_active).
	ActiveColumn string `yaml:"active_column"`
}

// Mapping is both sources.
type Mapping struct {
	Membership MembershipSource `yaml:"membership"`
	Users      UserSource       `yaml:"users"`
}

// ApplyDefaults fills unset fields with the canonical schema's names.
func (m *Mapping) ApplyDefaults() {
	ms := &m.Membership
	if ms.Table == "" {
		ms.Table = "public.room_memberships"
	}
	ms.Table = pipeline.QualifyTable(ms.Table)
	if ms.RoomColumn == "" {
		ms.RoomColumn = "room_id"
	}
	if ms.UserColumn == "" {
		ms.UserColumn = "user_id"
	}
	if ms.MembershipColumn == "" {
		ms.MembershipColumn = "membership"
	}
	if len(ms.Joined) == 0 {
		ms.Joined = []string{"join"}
	}
	us := &m.Users
	if us.Table == "" {
		us.Table = "public.users"
	}
	us.Table = pipeline.QualifyTable(us.Table)
	if us.UserColumn == "" {
		us.UserColumn = "user_id"
	}
	if us.DeactivatedColumn == "" && us.ActiveColumn == "" {
		us.DeactivatedColumn = "deactivated"
	}
}

var ()

// Validate reports every problem by field path under prefix (e.g.
// "targets"). It needs no database; Check compares with the tables.
func (m *Mapping) Validate(prefix string) []string {
	var ps []string
	add := func(path, format string, args ...any) {
		ps = append(ps, prefix+"."+path+": "+fmt.Sprintf(format, args...))
	}
	ms := m.Membership
	if !pipeline.IsQualifiedTable(ms.Table) {
		add("membership.table", "%q is not schema.table", ms.Table)
	}
	for f, v := range map[string]string{"room_column": ms.RoomColumn, "user_column": ms.UserColumn, "membership_column": ms.MembershipColumn} {
		if !pipeline.IsIdentifier(v) {
			add("membership."+f, "%q is not a column name", v)
		}
	}
	if ms.RoomColumn == ms.UserColumn {
		add("membership.user_column", "%q is also the room_column", ms.UserColumn)
	}
	for i, j := range ms.Joined {
		if j == "" {
			add(fmt.Sprintf("membership.joined[%d]", i), "empty value")
		}
	}
	if _, err := ParseFilter(ms.Filter); err != nil {
		add("membership.filter", "%v", err)
	}
	us := m.Users
	if !pipeline.IsQualifiedTable(us.Table) {
		add("users.table", "%q is not schema.table", us.Table)
	}
	if !pipeline.IsIdentifier(us.UserColumn) {
		add("users.user_column", "%q is not a column name", us.UserColumn)
	}
	switch {
	case us.DeactivatedColumn != "" && us.ActiveColumn != "":
		add("users.active_column", "set either deactivated_column or active_column, not both (deactivated_column is %q)", us.DeactivatedColumn)
	case us.DeactivatedColumn != "" && !pipeline.IsIdentifier(us.DeactivatedColumn):
		add("users.deactivated_column", "%q is not a column name", us.DeactivatedColumn)
	case us.ActiveColumn != "" && !pipeline.IsIdentifier(us.ActiveColumn):
		add("users.active_column", "%q is not a column name", us.ActiveColumn)
	}
	if ms.Table == us.Table && ms.Table != "" {
		add("users.table", "%q is also the membership table", us.Table)
	}
	return ps
}

// TableInfo is what Check needs to know about a captured table.
type TableInfo struct {
	Columns []string
	// Identity lists the columns sent in old-row images (all under
	// REPLICA IDENTITY FULL).
	Identity []string
}

// Check compares the mapping with the captured tables' columns and replica
// identities, reporting every problem by field path under prefix.
func (m *Mapping) Check(prefix string, tables map[string]TableInfo) []string {
	var ps []string
	add := func(path, format string, args ...any) {
		ps = append(ps, prefix+"."+path+": "+fmt.Sprintf(format, args...))
	}
	ms := m.Membership
	if ti, ok := tables[ms.Table]; !ok {
		add("membership.table", "%q is not a captured table (postgres.tables)", ms.Table)
	} else {
		cols := map[string]string{"room_column": ms.RoomColumn, "user_column": ms.UserColumn, "membership_column": ms.MembershipColumn}
		for _, f := range []string{"room_column", "user_column", "membership_column"} {
			if !slices.Contains(ti.Columns, cols[f]) {
				add("membership."+f, "%s has no column %q (columns: %s)", ms.Table, cols[f], strings.Join(ti.Columns, ", "))
			}
		}
		for _, f := range []string{"room_column", "user_column"} {
			if slices.Contains(ti.Columns, cols[f]) && !slices.Contains(ti.Identity, cols[f]) {
				add("membership."+f, "%q is not in %s's replica identity, so a deleted membership could not be attributed; run ALTER TABLE %s REPLICA IDENTITY FULL;",
					cols[f], ms.Table, quoteTable(ms.Table))
			}
		}
		if f, err := ParseFilter(ms.Filter); err == nil {
			for _, c := range f {
				if !slices.Contains(ti.Columns, c.Col) {
					add("membership.filter", "%s has no column %q", ms.Table, c.Col)
				}
			}
		}
	}
	us := m.Users
	if ti, ok := tables[us.Table]; !ok {
		add("users.table", "%q is not a captured table (postgres.tables)", us.Table)
	} else {
		if !slices.Contains(ti.Columns, us.UserColumn) {
			add("users.user_column", "%s has no column %q", us.Table, us.UserColumn)
		} else if !slices.Contains(ti.Identity, us.UserColumn) {
			add("users.user_column", "%q is not in %s's replica identity; run ALTER TABLE %s REPLICA IDENTITY FULL;", us.UserColumn, us.Table, quoteTable(us.Table))
		}
		if c := us.DeactivatedColumn; c != "" && !slices.Contains(ti.Columns, c) {
			add("users.deactivated_column", "%s has no column %q", us.Table, c)
		}
		if c := us.ActiveColumn; c != "" && !slices.Contains(ti.Columns, c) {
			add("users.active_column", "%s has no column %q", us.Table, c)
		}
	}
	return ps
}

func quoteTable(t string) string {
	s, n, _ := strings.Cut(t, ".")
	return pgx.Identifier{s, n}.Sanitize()
}

// Cond is one filter condition: Col = Values[0], Col != Values[0], or Col IN
// Values (texts).
type Cond struct {
	Col    string
	Not    bool // "!=" (and "NOT IN")
	Values []string
}

// Filter is a conjunction of conditions; empty matches every row.
type Filter []Cond

var (
	condRe = regexp.MustCompile(`(?is)^\s*([A-Za-z_][A-Za-z0-9_$]*)\s*(=|!=|<>|not\s+in|in)\s*(.+?)\s*$`)
	litRe  = regexp.MustCompile(`^(?:'((?:[^']|'')*)'|(-?[0-9]+(?:\.[0-9]+)?)|(?i:(true|false)))$`)
)

// ParseFilter parses "col = 'v' AND col2 IN ('a', 'b')".
func ParseFilter(s string) (Filter, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var f Filter
	for _, part := range splitAnd(s) {
		m := condRe.FindStringSubmatch(part)
		if m == nil {
			return nil, fmt.Errorf("%q: want col = 'value', col != 'value' or col IN ('a', 'b'), joined by AND", strings.TrimSpace(part))
		}
		c := Cond{Col: m[1]}
		op := strings.ToLower(strings.Join(strings.Fields(m[2]), " "))
		rhs := strings.TrimSpace(m[3])
		var lits []string
		switch op {
		case "in", "not in":
			if !strings.HasPrefix(rhs, "(") || !strings.HasSuffix(rhs, ")") {
				return nil, fmt.Errorf("%q: IN needs a parenthesised list", strings.TrimSpace(part))
			}
			lits = splitList(rhs[1 : len(rhs)-1])
			c.Not = op == "not in"
		default:
			lits = []string{rhs}
			c.Not = op != "="
		}
		for _, l := range lits {
			v, err := literal(l)
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

// splitAnd splits on AND outside quotes.
func splitAnd(s string) []string {
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

// splitList splits a literal list on commas outside quotes.
func splitList(s string) []string {
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

func literal(l string) (string, error) {
	m := litRe.FindStringSubmatch(strings.TrimSpace(l))
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
func (f Filter) Match(img map[string]json.RawMessage, absentMatches bool) bool {
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

// SQL renders the filter as a WHERE condition over alias, appending its
// parameters to args (placeholders continue after len(args)). It returns
// "true" for an empty filter.
func (f Filter) SQL(alias string, args []any) (string, []any) {
	if len(f) == 0 {
		return "true", args
	}
	var conds []string
	for _, c := range f {
		args = append(args, c.Values)
		op := "= ANY"
		if c.Not {
			op = "<> ALL"
		}
		conds = append(conds, fmt.Sprintf("%s.%s::text %s($%d::text[])", alias, pgx.Identifier{c.Col}.Sanitize(), op, len(args)))
	}
	return strings.Join(conds, " AND "), args
}

// String renders the filter back in its own syntax.
func (f Filter) String() string {
	var parts []string
	for _, c := range f {
		q := make([]string, len(c.Values))
		for i, v := range c.Values {
			q[i] = "'" + strings.ReplaceAll(v, "'", "''") + "'"
		}
		switch {
		case len(q) == 1 && !c.Not:
			parts = append(parts, c.Col+" = "+q[0])
		case len(q) == 1:
			parts = append(parts, c.Col+" != "+q[0])
		case c.Not:
			parts = append(parts, c.Col+" NOT IN ("+strings.Join(q, ", ")+")")
		default:
			parts = append(parts, c.Col+" IN ("+strings.Join(q, ", ")+")")
		}
	}
	return strings.Join(parts, " AND ")
}
