package targets

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/invalidation/expr"
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
	// Filter keeps only matching rows, e.g. "type = 'm.room.member'", in
	// the shared expression language of package invalidation/expr
	// (comparisons, IS [NOT] NULL, [NOT] IN, [NOT] LIKE, AND, OR, NOT; see
	// the README). A NULL column makes its conditions unknown (as in SQL),
	// so they do not match. A deleted row's key-only old image counts when
	// its missing columns could make the filter true. Default: every row.
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
	// Filter keeps as targets only the users whose id matches, a row
	// condition (README "Row conditions") that reads only UserColumn,
	// e.g. "name LIKE '%:example.org'" for Synapse's local users. It is
	// evaluated on the membership's user id, so it also applies to users
	// without a row in Table (Synapse's remote users). Default: every user.
	Filter string `yaml:"filter"`
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
	if f, err := ParseFilter(us.Filter); err != nil {
		add("users.filter", "%v", err)
	} else {
		for _, c := range f.Columns() {
			if c != us.UserColumn {
				add("users.filter", "reads column %q; it may read only the user id, users.user_column (%q)", c, us.UserColumn)
			}
		}
	}
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
			for _, c := range f.Columns() {
				if !slices.Contains(ti.Columns, c) {
					add("membership.filter", "%s has no column %q", ms.Table, c)
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

// Filter is a parsed membership filter (the expr language); the zero
// Filter (from an empty string) matches every row.
type Filter struct{ e *expr.Expr }

// ParseFilter parses a filter in the expr language, e.g.
// "type = 'm.room.member' AND state_key LIKE '%:example.org'". The empty
// string is the filter that matches every row.
func ParseFilter(s string) (Filter, error) {
	if strings.TrimSpace(s) == "" {
		return Filter{}, nil
	}
	e, err := expr.Parse(s)
	if err != nil {
		return Filter{}, fmt.Errorf("%q: %w", s, err)
	}
	return Filter{e}, nil
}

// Columns lists the columns the filter reads.
func (f Filter) Columns() []string {
	if f.e == nil {
		return nil
	}
	return f.e.Columns()
}

// ImageRow adapts a change image to expr.Row: a JSON null is NULL, a
// column the image lacks is absent.
func ImageRow(img map[string]json.RawMessage) expr.Row {
	return func(col string) (string, bool, bool) {
		if _, present := img[col]; !present {
			return "", false, false
		}
		v, ok := pipeline.Text(img, col)
		return v, !ok, true
	}
}

// Match evaluates the filter on a row image. When the image does not carry
// a column the filter reads (a key-only old image), the row matches when
// absentMatches is set and the missing values could make the filter true;
// a NULL column makes its conditions unknown (as in SQL), so they do not
// match.
func (f Filter) Match(img map[string]json.RawMessage, absentMatches bool) bool {
	if f.e == nil {
		return true
	}
	o := f.e.Eval(ImageRow(img))
	if absentMatches {
		return o.Possibly()
	}
	return o.Definitely()
}

// SQL renders the filter as a WHERE condition over alias, appending its
// parameters to args (placeholders continue after len(args)). It returns
// "true" for an empty filter.
func (f Filter) SQL(alias string, args []any) (string, []any) {
	if f.e == nil {
		return "true", args
	}
	sql := f.e.SQL(func(c string) string { return alias + "." + pgx.Identifier{c}.Sanitize() },
		func(v any) string { args = append(args, v); return fmt.Sprintf("$%d", len(args)) })
	return sql, args
}

// SQLOver renders the filter like SQL, with col naming each column it
// reads.
func (f Filter) SQLOver(col func(string) string, args []any) (string, []any) {
	if f.e == nil {
		return "true", args
	}
	sql := f.e.SQL(col, func(v any) string { args = append(args, v); return fmt.Sprintf("$%d", len(args)) })
	return sql, args
}

// String renders the filter back in its own syntax ("" for the empty
// filter).
func (f Filter) String() string {
	if f.e == nil {
		return ""
	}
	return f.e.String()
}
