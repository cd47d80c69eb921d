// Package expr is the row-condition language shared by targets' membership
// filter, integrity rules' where clauses and invalidation rules' filter: a
// small SQL-like boolean expression over one row's columns that Tidemark
// evaluates on change images (Eval) and renders as parameterized SQL for the
// source database (SQL), with the same meaning in both.
//
// The parser is hand-written (recursive descent): no small dependency-free
// library both evaluates an expression on a row image and renders it as
// parameterized Postgres SQL with matching semantics, and the grammar is
// small.
//
// # Grammar
//
//	expr      = or
//	or        = and { "OR" and }
//	and       = not { "AND" not }
//	not       = "NOT" not | "(" expr ")" | predicate
//	predicate = column ( cmp literal
//	                   | "IS" ["NOT"] "NULL"
//	                   | ["NOT"] "IN" "(" literal { "," literal } ")"
//	                   | ["NOT"] "LIKE" text )
//	cmp       = "=" | "!=" | "<>" | "<" | ">" | "<=" | ">="
//	column    = identifier | '"' quoted identifier ('""' for '"') '"'
//	literal   = text | number | "true" | "false"
//	text      = "'" characters ("''" for "'") "'"
//	number    = ["-"] digits ["." digits]
//
// Keywords are case-insensitive; an unquoted identifier is used as written
// (no case folding) and may not be a keyword (quote it: "not"). NOT binds
// tighter than AND, AND tighter than OR. NULL appears only in IS [NOT] NULL.
//
// # Semantics
//
// Values are columns' text forms (a change image's JSON value, or col::text
// in SQL). A comparison with a text literal compares texts in byte order
// (SQL renders COLLATE "C" for <, >, <=, >=, so Postgres agrees whatever the
// database's collation). A comparison with a number compares numerically
// when the column's text is a plain decimal number (optional sign, digits,
// optional fraction; no exponent) and as texts otherwise. A boolean literal
// matches the texts 't' and 'true' (true) or 'f' and 'false' (false); only
// = and != apply to booleans. LIKE is Postgres's: % any run, _ one
// character, backslash escapes the next character; case-sensitive.
// col IN (a, b) means col = a OR col = b; col NOT IN (...) is NOT of that.
//
// Logic is SQL's three-valued logic: a comparison with a NULL column is
// unknown, NOT unknown is unknown, unknown AND false is false, unknown OR
// true is true. A row matches only when the expression is true.
//
// A column absent from the row (a key-only old image carries only the
// replica identity) makes its predicates undecided: Eval returns the set of
// outcomes still possible (Outcome), and the caller decides: Definitely()
// treats undecided as not matching, Possibly() as matching when the missing
// values could make the expression true.
//
// # SQL
//
// SQL never inlines a literal: every value becomes a placeholder from the
// caller's nextArg, and columns are cast to text (col::text) so that the
// comparison is the same as Eval's whatever the column's type.
package expr

import (
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"
)

// Kind is a node's kind.
type Kind int

// The node kinds.
const (
	And    Kind = iota + 1 // Kids joined by AND
	Or                     // Kids joined by OR
	Not                    // NOT Kids[0]
	Cmp                    // Col Op Lits[0]
	IsNull                 // Col IS [NOT] NULL
	In                     // Col [NOT] IN (Lits)
	Like                   // Col [NOT] LIKE Lits[0]
)

// LitKind is a literal's type.
type LitKind int

// The literal types.
const (
	Text LitKind = iota + 1
	Number
	Bool
)

// Lit is a literal: Text holds the text, the number as written, or
// "true"/"false".
type Lit struct {
	Kind LitKind
	Text string
}

// Expr is a parsed expression node.
type Expr struct {
	Kind Kind
	Kids []*Expr // And, Or (two or more), Not (one)
	Col  string
	Op   string // Cmp: "=", "!=", "<", ">", "<=", ">="
	Neg  bool   // IS NOT NULL, NOT IN, NOT LIKE
	Lits []Lit
}

// Error is a parse error at a byte offset.
type Error struct {
	Pos int
	Msg string
}

func (e *Error) Error() string { return fmt.Sprintf("at offset %d: %s", e.Pos, e.Msg) }

// Parse parses an expression. The empty (or blank) string is an error; the
// callers treat an empty filter as "every row" themselves.
func Parse(s string) (*Expr, error) {
	p := &parser{src: s}
	if err := p.lex(); err != nil {
		return nil, err
	}
	if len(p.toks) == 1 {
		return nil, &Error{0, "empty expression"}
	}
	e, err := p.or(0)
	if err != nil {
		return nil, err
	}
	if t := p.peek(); t.kind != tEOF {
		return nil, p.errf(t, "expected AND, OR or the end, found %s", t)
	}
	return e, nil
}

// MustParse is Parse that panics on an error (for tests and constants).
func MustParse(s string) *Expr {
	e, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return e
}

type tokKind int

const (
	tEOF tokKind = iota
	tIdent
	tQIdent
	tText
	tNum
	tOp
	tLParen
	tRParen
	tComma
	tKeyword
)

type token struct {
	kind tokKind
	s    string // identifier/text value, operator, upper-cased keyword
	raw  string
	pos  int
}

func (t token) String() string {
	if t.kind == tEOF {
		return "the end"
	}
	return fmt.Sprintf("%q", t.raw)
}

var keywords = []string{"AND", "OR", "NOT", "IS", "NULL", "IN", "LIKE", "TRUE", "FALSE"}

// IsKeyword reports whether an unquoted identifier would be a keyword.
func IsKeyword(s string) bool { return slices.Contains(keywords, strings.ToUpper(s)) }

type parser struct {
	src  string
	toks []token
	i    int
}

func isIdentStart(c byte) bool { return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
func isDigit(c byte) bool      { return c >= '0' && c <= '9' }

func (p *parser) lex() error {
	s := p.src
	i := 0
	for i < len(s) {
		c := s[i]
		start := i
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v':
			i++
			continue
		case isIdentStart(c):
			for i < len(s) && (isIdentStart(s[i]) || isDigit(s[i]) || s[i] == '$') {
				i++
			}
			w := s[start:i]
			if IsKeyword(w) {
				p.toks = append(p.toks, token{tKeyword, strings.ToUpper(w), w, start})
			} else {
				p.toks = append(p.toks, token{tIdent, w, w, start})
			}
			continue
		case c == '"' || c == '\'':
			var b strings.Builder
			i++
			closed := false
			for i < len(s) {
				if s[i] == c {
					if i+1 < len(s) && s[i+1] == c {
						b.WriteByte(c)
						i += 2
						continue
					}
					i++
					closed = true
					break
				}
				b.WriteByte(s[i])
				i++
			}
			if !closed {
				what := "text"
				if c == '"' {
					what = "quoted identifier"
				}
				return &Error{start, "unterminated " + what}
			}
			k := tText
			if c == '"' {
				k = tQIdent
				if b.Len() == 0 {
					return &Error{start, "empty quoted identifier"}
				}
			}
			if !utf8.ValidString(b.String()) {
				return &Error{start, "invalid UTF-8"}
			}
			p.toks = append(p.toks, token{k, b.String(), s[start:i], start})
			continue
		case isDigit(c) || c == '-' && i+1 < len(s) && isDigit(s[i+1]):
			i++
			for i < len(s) && isDigit(s[i]) {
				i++
			}
			if i+1 < len(s) && s[i] == '.' && isDigit(s[i+1]) {
				i++
				for i < len(s) && isDigit(s[i]) {
					i++
				}
			}
			if i < len(s) && (isIdentStart(s[i]) || s[i] == '.') {
				return &Error{start, fmt.Sprintf("malformed number %q", s[start:i+1])}
			}
			p.toks = append(p.toks, token{tNum, s[start:i], s[start:i], start})
			continue
		case c == '(':
			p.toks = append(p.toks, token{tLParen, "(", "(", start})
		case c == ')':
			p.toks = append(p.toks, token{tRParen, ")", ")", start})
		case c == ',':
			p.toks = append(p.toks, token{tComma, ",", ",", start})
		case c == '=':
			p.toks = append(p.toks, token{tOp, "=", "=", start})
		case c == '!' && i+1 < len(s) && s[i+1] == '=':
			p.toks = append(p.toks, token{tOp, "!=", "!=", start})
			i++
		case c == '<' || c == '>':
			op := string(c)
			if i+1 < len(s) && (s[i+1] == '=' || c == '<' && s[i+1] == '>') {
				op = s[i : i+2]
				i++
			}
			norm := op
			if op == "<>" {
				norm = "!="
			}
			p.toks = append(p.toks, token{tOp, norm, op, start})
		default:
			r, _ := utf8.DecodeRuneInString(s[i:])
			return &Error{start, fmt.Sprintf("unexpected character %q", r)}
		}
		i++
	}
	p.toks = append(p.toks, token{kind: tEOF, pos: len(s)})
	return nil
}

func (p *parser) peek() token { return p.toks[p.i] }
func (p *parser) next() token { t := p.toks[p.i]; p.i++; return t }
func (p *parser) isKw(kw string) bool {
	t := p.peek()
	return t.kind == tKeyword && t.s == kw
}

func (p *parser) errf(t token, format string, args ...any) error {
	return &Error{t.pos, fmt.Sprintf(format, args...)}
}

// maxDepth bounds nesting (parentheses and NOT) so that a hostile input
// cannot exhaust the stack.
const maxDepth = 100

func (p *parser) or(depth int) (*Expr, error) {
	return p.chain(depth, "OR", Or, p.and)
}

func (p *parser) and(depth int) (*Expr, error) {
	return p.chain(depth, "AND", And, p.not)
}

func (p *parser) chain(depth int, kw string, k Kind, sub func(int) (*Expr, error)) (*Expr, error) {
	first, err := sub(depth)
	if err != nil {
		return nil, err
	}
	if !p.isKw(kw) {
		return first, nil
	}
	e := &Expr{Kind: k, Kids: []*Expr{first}}
	for p.isKw(kw) {
		p.next()
		kid, err := sub(depth)
		if err != nil {
			return nil, err
		}
		e.Kids = append(e.Kids, kid)
	}
	return e, nil
}

func (p *parser) not(depth int) (*Expr, error) {
	if depth > maxDepth {
		return nil, p.errf(p.peek(), "nested more than %d deep", maxDepth)
	}
	t := p.peek()
	switch {
	case t.kind == tKeyword && t.s == "NOT":
		p.next()
		kid, err := p.not(depth + 1)
		if err != nil {
			return nil, err
		}
		return &Expr{Kind: Not, Kids: []*Expr{kid}}, nil
	case t.kind == tLParen:
		p.next()
		e, err := p.or(depth + 1)
		if err != nil {
			return nil, err
		}
		if t := p.next(); t.kind != tRParen {
			return nil, p.errf(t, "expected ')' (or AND, OR), found %s", t)
		}
		return e, nil
	case t.kind == tIdent || t.kind == tQIdent:
		p.next()
		return p.predicate(t.s)
	}
	return nil, p.errf(t, "expected a column, NOT or '(', found %s", t)
}

func (p *parser) predicate(col string) (*Expr, error) {
	t := p.next()
	switch {
	case t.kind == tOp:
		l, err := p.literal()
		if err != nil {
			return nil, err
		}
		if l.Kind == Bool && t.s != "=" && t.s != "!=" {
			return nil, p.errf(t, "only = and != compare with a boolean")
		}
		return &Expr{Kind: Cmp, Col: col, Op: t.s, Lits: []Lit{l}}, nil
	case t.kind == tKeyword && t.s == "IS":
		e := &Expr{Kind: IsNull, Col: col}
		if p.isKw("NOT") {
			p.next()
			e.Neg = true
		}
		if t := p.next(); t.kind != tKeyword || t.s != "NULL" {
			return nil, p.errf(t, "expected NULL after IS [NOT], found %s", t)
		}
		return e, nil
	case t.kind == tKeyword && (t.s == "NOT" || t.s == "IN" || t.s == "LIKE"):
		neg := t.s == "NOT"
		if neg {
			t = p.next()
			if t.kind != tKeyword || t.s != "IN" && t.s != "LIKE" {
				return nil, p.errf(t, "expected IN or LIKE after NOT, found %s", t)
			}
		}
		if t.s == "LIKE" {
			pt := p.next()
			if pt.kind != tText {
				return nil, p.errf(pt, "expected a 'quoted' pattern after LIKE, found %s", pt)
			}
			if trailingEscape(pt.s) {
				return nil, p.errf(pt, "LIKE pattern must not end with the escape character \\")
			}
			return &Expr{Kind: Like, Col: col, Neg: neg, Lits: []Lit{{Text, pt.s}}}, nil
		}
		if t := p.next(); t.kind != tLParen {
			return nil, p.errf(t, "expected '(' after IN, found %s", t)
		}
		e := &Expr{Kind: In, Col: col, Neg: neg}
		for {
			l, err := p.literal()
			if err != nil {
				return nil, err
			}
			e.Lits = append(e.Lits, l)
			t := p.next()
			if t.kind == tRParen {
				return e, nil
			}
			if t.kind != tComma {
				return nil, p.errf(t, "expected ',' or ')' in the IN list, found %s", t)
			}
		}
	}
	return nil, p.errf(t, "expected =, !=, <>, <, >, <=, >=, IS, IN, NOT IN, LIKE or NOT LIKE after column %q, found %s", col, t)
}

func trailingEscape(pat string) bool {
	n := 0
	for i := len(pat) - 1; i >= 0 && pat[i] == '\\'; i-- {
		n++
	}
	return n%2 == 1
}

func (p *parser) literal() (Lit, error) {
	t := p.next()
	switch {
	case t.kind == tText:
		return Lit{Text, t.s}, nil
	case t.kind == tNum:
		return Lit{Number, t.s}, nil
	case t.kind == tKeyword && (t.s == "TRUE" || t.s == "FALSE"):
		return Lit{Bool, strings.ToLower(t.s)}, nil
	case t.kind == tKeyword && t.s == "NULL":
		return Lit{}, p.errf(t, "NULL is not a value: use IS NULL or IS NOT NULL")
	case t.kind == tIdent || t.kind == tQIdent:
		return Lit{}, p.errf(t, "expected a literal ('text', number, true or false), found column %s (quote text with ')", t)
	}
	return Lit{}, p.errf(t, "expected a literal ('text', number, true or false), found %s", t)
}

// Columns lists the columns the expression reads, each once, in order of
// appearance.
func (e *Expr) Columns() []string {
	var cols []string
	e.walk(func(n *Expr) {
		if n.Col != "" && !slices.Contains(cols, n.Col) {
			cols = append(cols, n.Col)
		}
	})
	return cols
}

func (e *Expr) walk(f func(*Expr)) {
	if e == nil {
		return
	}
	f(e)
	for _, k := range e.Kids {
		k.walk(f)
	}
}

// String renders the expression in its own syntax; Parse(e.String())
// yields the same tree.
func (e *Expr) String() string {
	var b strings.Builder
	e.write(&b)
	return b.String()
}

func quoteIdent(c string) string {
	if len(c) > 0 && isIdentStart(c[0]) && !IsKeyword(c) && strings.IndexFunc(c, func(r rune) bool {
		return !(r < utf8.RuneSelf && (isIdentStart(byte(r)) || isDigit(byte(r)) || r == '$'))
	}) < 0 {
		return c
	}
	return `"` + strings.ReplaceAll(c, `"`, `""`) + `"`
}

func (l Lit) String() string {
	if l.Kind == Text {
		return "'" + strings.ReplaceAll(l.Text, "'", "''") + "'"
	}
	return l.Text
}

func (e *Expr) write(b *strings.Builder) {
	kid := func(k *Expr, paren bool) {
		if paren {
			b.WriteByte('(')
		}
		k.write(b)
		if paren {
			b.WriteByte(')')
		}
	}
	switch e.Kind {
	case And, Or:
		sep := " AND "
		if e.Kind == Or {
			sep = " OR "
		}
		for i, k := range e.Kids {
			if i > 0 {
				b.WriteString(sep)
			}
			kid(k, k.Kind == Or || k.Kind == e.Kind)
		}
	case Not:
		b.WriteString("NOT ")
		kid(e.Kids[0], e.Kids[0].Kind == And || e.Kids[0].Kind == Or)
	case Cmp:
		fmt.Fprintf(b, "%s %s %s", quoteIdent(e.Col), e.Op, e.Lits[0])
	case IsNull:
		b.WriteString(quoteIdent(e.Col))
		if e.Neg {
			b.WriteString(" IS NOT NULL")
		} else {
			b.WriteString(" IS NULL")
		}
	case In, Like:
		b.WriteString(quoteIdent(e.Col))
		if e.Neg {
			b.WriteString(" NOT")
		}
		if e.Kind == Like {
			b.WriteString(" LIKE " + e.Lits[0].String())
			return
		}
		b.WriteString(" IN (")
		for i, l := range e.Lits {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteString(l.String())
		}
		b.WriteByte(')')
	}
}
