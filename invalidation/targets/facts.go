package targets

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/pipeline"
)

// Reason says why a user was added to or removed from a room's targets.
type Reason string

// The reasons.
const (
	ReasonJoin        Reason = "join"
	ReasonLeave       Reason = "leave"
	ReasonBan         Reason = "ban"
	ReasonDeactivated Reason = "deactivated"
	ReasonReactivated Reason = "reactivated"
	ReasonRebuild     Reason = "rebuild"
)

// MemberFact is what the membership source says about one (room, user):
// the latest membership value and whether it means joined, at a position.
type MemberFact struct {
	Room, User string
	Membership string // "" when the row was deleted (or filtered out)
	Joined     bool
	Pos        pipeline.Position
}

// UserFact is what the user source says about one user at a position.
type UserFact struct {
	User   string
	Active bool
	Pos    pipeline.Position
}

// compiled is a validated Mapping, ready to turn changes into facts and to
// query the source database.
type compiled struct {
	m      Mapping
	filter Filter
	// users is users.filter, on the membership's user id.
	users Filter
}

func compile(m Mapping) (*compiled, error) {
	m.ApplyDefaults()
	if ps := m.Validate("targets"); len(ps) > 0 {
		return nil, fmt.Errorf("invalid targets mapping:\n  - %s", strings.Join(ps, "\n  - "))
	}
	f, _ := ParseFilter(m.Membership.Filter)
	u, _ := ParseFilter(m.Users.Filter)
	return &compiled{m: m, filter: f, users: u}, nil
}

// userCounts reports whether users.filter keeps user as a target.
func (c *compiled) userCounts(user string) bool {
	if c.users.e == nil {
		return true
	}
	v, _ := json.Marshal(user)
	return c.users.Match(map[string]json.RawMessage{c.m.Users.UserColumn: v}, false)
}

// memberFacts appends the facts a membership change implies: the old row
// stops counting (when it matched the filter), the new row counts with its
// membership (when it matches). Later facts of the same key win.
func (c *compiled) memberFacts(env *pipeline.Envelope, pos pipeline.Position, dst []MemberFact) []MemberFact {
	ms := &c.m.Membership
	if env.Before != nil && env.Op != "c" && env.Op != "r" && c.filter.Match(env.Before, true) {
		room, ok1 := pipeline.Text(env.Before, ms.RoomColumn)
		user, ok2 := pipeline.Text(env.Before, ms.UserColumn)
		if ok1 && ok2 {
			dst = append(dst, MemberFact{Room: room, User: user, Pos: pos})
		}
	}
	if env.After != nil && (env.Op == "c" || env.Op == "u" || env.Op == "r") && c.filter.Match(env.After, false) {
		room, ok1 := pipeline.Text(env.After, ms.RoomColumn)
		user, ok2 := pipeline.Text(env.After, ms.UserColumn)
		mem, ok3 := pipeline.Text(env.After, ms.MembershipColumn)
		if ok1 && ok2 {
			if !ok3 {
				mem = ""
			}
			joined := ok3 && slices.Contains(ms.Joined, mem) && c.userCounts(user)
			dst = append(dst, MemberFact{Room: room, User: user, Membership: mem, Joined: joined, Pos: pos})
		}
	}
	return dst
}

// userFact returns the fact a user change implies; a deleted user row
// counts as active (like a user without a row).
func (c *compiled) userFact(env *pipeline.Envelope, pos pipeline.Position) (UserFact, bool) {
	us := &c.m.Users
	if env.Op == "d" {
		user, ok := pipeline.Text(env.Before, us.UserColumn)
		return UserFact{User: user, Active: true, Pos: pos}, ok
	}
	user, ok := pipeline.Text(env.After, us.UserColumn)
	if !ok {
		return UserFact{}, false
	}
	return UserFact{User: user, Active: c.activeFrom(env), Pos: pos}, true
}

func (c *compiled) activeFrom(env *pipeline.Envelope) bool {
	us := &c.m.Users
	if us.ActiveColumn != "" {
		v, _ := pipeline.Text(env.After, us.ActiveColumn)
		return !slices.Contains(falseTexts, v)
	}
	v, _ := pipeline.Text(env.After, us.DeactivatedColumn)
	return !slices.Contains(trueTexts, v)
}

// Flags may be booleans or integers (Synapse's users.deactivated is a
// smallint): these texts count as true and false; NULL counts as neither
// (the account stays active).
var (
	trueTexts  = []string{"true", "t", "1"}
	falseTexts = []string{"false", "f", "0"}
)

func ident(s string) string { return pgx.Identifier{s}.Sanitize() }

// memberRowsSQL selects (room, user, membership, joined) from the source
// membership table, one row per (room, user) (a layout without a key may
// hold several rows: the pair counts as joined when any row says so),
// optionally limited to the rooms in a text[] parameter.
func (c *compiled) memberRowsSQL(limitRooms bool) (string, []any) {
	ms := &c.m.Membership
	args := []any{ms.Joined}
	where, args := c.filter.SQL("m", args)
	// users.filter reads the user id, here the membership's user column
	// (rendered before the rooms placeholder, which the caller replaces
	// as the last parameter).
	userCol := "m." + ident(ms.UserColumn)
	counts, args := c.users.SQLOver(func(string) string { return userCol }, args)
	if limitRooms {
		args = append(args, []string(nil)) // placeholder, replaced by the caller
		where += fmt.Sprintf(" AND m.%s::text = ANY($%d::text[])", ident(ms.RoomColumn), len(args))
	}
	q := fmt.Sprintf(`SELECT m.%[1]s::text, m.%[2]s::text, max(m.%[3]s::text), coalesce(bool_or(m.%[3]s::text = ANY($1::text[])) AND bool_and(%[6]s), false)
FROM %[4]s m WHERE m.%[1]s IS NOT NULL AND m.%[2]s IS NOT NULL AND %[5]s GROUP BY 1, 2`,
		ident(ms.RoomColumn), ident(ms.UserColumn), ident(ms.MembershipColumn), quoteTable(ms.Table), where, counts)
	return q, args
}

// inactiveSQL is the condition on alias u meaning "deactivated".
func (c *compiled) inactiveSQL(alias string) string {
	us := &c.m.Users
	if us.ActiveColumn != "" {
		return fmt.Sprintf("coalesce(%s.%s::text IN ('false', 'f', '0'), false)", alias, ident(us.ActiveColumn))
	}
	return fmt.Sprintf("coalesce(%s.%s::text IN ('true', 't', '1'), false)", alias, ident(us.DeactivatedColumn))
}

// usersSQL selects (user, active) of the given users (text[] $1), or of
// every user when all is set.
func (c *compiled) usersSQL(all bool) string {
	us := &c.m.Users
	where := fmt.Sprintf("u.%s::text = ANY($1::text[])", ident(us.UserColumn))
	if all {
		where = "true"
	}
	return fmt.Sprintf(`SELECT u.%s::text, bool_and(NOT (%s)) FROM %s u WHERE u.%s IS NOT NULL AND %s GROUP BY 1`,
		ident(us.UserColumn), c.inactiveSQL("u"), quoteTable(us.Table), ident(us.UserColumn), where)
}

// truthSQL selects (room, user) of every target (joined, account active)
// straight from the source, optionally for the rooms in the last parameter.
func (c *compiled) truthSQL(limitRooms bool) (string, []any) {
	inner, args := c.memberRowsSQL(limitRooms)
	us := &c.m.Users
	q := fmt.Sprintf(`SELECT t.room, t.usr FROM (%s) AS t(room, usr, membership, joined)
WHERE t.joined AND NOT EXISTS (SELECT 1 FROM %s u WHERE u.%s::text = t.usr AND %s)`,
		inner, quoteTable(us.Table), ident(us.UserColumn), c.inactiveSQL("u"))
	return q, args
}
