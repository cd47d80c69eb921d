package expr

import (
	"strings"
	"unicode/utf8"
)

// Outcome is the set of truth values an expression may still have on a
// row: one of them when every column it reads is present, several when
// some are absent (their values could be anything, NULL included).
type Outcome uint8

// The truth values, as Outcome bits.
const (
	True    Outcome = 1 << iota // the row matches
	False                       // the row does not match
	Unknown                     // SQL NULL: the row does not match either
	// Undecided is every value: a predicate on an absent column.
	Undecided = True | False | Unknown
)

// Definitely reports whether the row matches whatever the absent columns
// hold (and so, when none is absent, whether it matches).
func (o Outcome) Definitely() bool { return o == True }

// Possibly reports whether the row could match, given values for the
// absent columns (and so, when none is absent, whether it matches).
func (o Outcome) Possibly() bool { return o&True != 0 }

func (o Outcome) String() string {
	var parts []string
	for _, v := range []struct {
		b Outcome
		s string
	}{{True, "true"}, {False, "false"}, {Unknown, "unknown"}} {
		if o&v.b != 0 {
			parts = append(parts, v.s)
		}
	}
	return strings.Join(parts, "|")
}

// Row gives a column's text form: isNull for SQL NULL, present false when
// the row does not carry the column.
type Row func(col string) (text string, isNull bool, present bool)

// Eval evaluates the expression on a row (see the package documentation for
// the semantics).
func (e *Expr) Eval(row Row) Outcome {
	switch e.Kind {
	case And, Or:
		acc := e.Kids[0].Eval(row)
		for _, k := range e.Kids[1:] {
			acc = combine(acc, k.Eval(row), e.Kind == And)
		}
		return acc
	case Not:
		return negate(e.Kids[0].Eval(row))
	}
	v, isNull, present := row(e.Col)
	if !present {
		if e.Kind == IsNull {
			return True | False // never unknown
		}
		return Undecided
	}
	if e.Kind == IsNull {
		return truth(isNull != e.Neg)
	}
	if isNull {
		return Unknown
	}
	var r bool
	switch e.Kind {
	case Cmp:
		r = cmpLit(v, e.Op, e.Lits[0])
	case In:
		for _, l := range e.Lits {
			if cmpLit(v, "=", l) {
				r = true
				break
			}
		}
	case Like:
		r = like(v, e.Lits[0].Text)
	}
	return truth(r != e.Neg)
}

func truth(b bool) Outcome {
	if b {
		return True
	}
	return False
}

func negate(o Outcome) Outcome {
	var r Outcome
	if o&True != 0 {
		r |= False
	}
	if o&False != 0 {
		r |= True
	}
	return r | o&Unknown
}

// combine applies Kleene AND (and) or OR to every pair of possible values.
func combine(a, b Outcome, and bool) Outcome {
	var r Outcome
	for _, x := range []Outcome{True, False, Unknown} {
		if a&x == 0 {
			continue
		}
		for _, y := range []Outcome{True, False, Unknown} {
			if b&y != 0 {
				r |= kleene(x, y, and)
			}
		}
	}
	return r
}

func kleene(x, y Outcome, and bool) Outcome {
	if !and {
		x, y = negate(x), negate(y)
	}
	var r Outcome
	switch {
	case x == False || y == False:
		r = False
	case x == Unknown || y == Unknown:
		r = Unknown
	default:
		r = True
	}
	if !and {
		r = negate(r)
	}
	return r
}

// Boolean texts, as Postgres prints booleans (true/false) and as its short
// form (t/f).
var (
	trueTexts  = []string{"t", "true"}
	falseTexts = []string{"f", "false"}
)

func boolTexts(l Lit) []string {
	if l.Text == "true" {
		return trueTexts
	}
	return falseTexts
}

func cmpLit(v, op string, l Lit) bool {
	var c int
	switch l.Kind {
	case Bool:
		in := false
		for _, t := range boolTexts(l) {
			in = in || v == t
		}
		return in == (op == "=")
	case Number:
		if IsDecimal(v) {
			c = compareDecimal(v, l.Text)
		} else {
			c = strings.Compare(v, l.Text)
		}
	default:
		c = strings.Compare(v, l.Text)
	}
	switch op {
	case "=":
		return c == 0
	case "!=":
		return c != 0
	case "<":
		return c < 0
	case ">":
		return c > 0
	case "<=":
		return c <= 0
	}
	return c >= 0 // ">="
}

// DecimalPattern is the Postgres regular expression equivalent of IsDecimal
// (SQL uses it to decide, like Eval, between numeric and text comparison).
const DecimalPattern = `^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$`

// IsDecimal reports whether s is a plain decimal number: optional sign,
// digits with an optional fraction (either side of the point may be empty,
// not both), no exponent, no spaces.
func IsDecimal(s string) bool {
	if s != "" && (s[0] == '+' || s[0] == '-') {
		s = s[1:]
	}
	ip, fp, dot := strings.Cut(s, ".")
	if ip == "" && fp == "" {
		return false
	}
	if !dot && ip == "" {
		return false
	}
	return allDigits(ip) && allDigits(fp)
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isDigit(s[i]) {
			return false
		}
	}
	return true
}

// compareDecimal compares two IsDecimal numbers exactly.
func compareDecimal(a, b string) int {
	na, ia, fa := splitDecimal(a)
	nb, ib, fb := splitDecimal(b)
	zeroA, zeroB := ia == "" && fa == "", ib == "" && fb == ""
	if zeroA && zeroB {
		return 0
	}
	if zeroA || zeroB || na != nb {
		sa, sb := sign(na, zeroA), sign(nb, zeroB)
		switch {
		case sa < sb:
			return -1
		case sa > sb:
			return 1
		}
	}
	c := compareMagnitude(ia, fa, ib, fb)
	if na {
		return -c
	}
	return c
}

func sign(neg, zero bool) int {
	switch {
	case zero:
		return 0
	case neg:
		return -1
	}
	return 1
}

// splitDecimal returns the sign and the integer and fraction digits without
// leading (integer) and trailing (fraction) zeros.
func splitDecimal(s string) (neg bool, ip, fp string) {
	if s[0] == '+' || s[0] == '-' {
		neg = s[0] == '-'
		s = s[1:]
	}
	ip, fp, _ = strings.Cut(s, ".")
	return neg, strings.TrimLeft(ip, "0"), strings.TrimRight(fp, "0")
}

func compareMagnitude(ia, fa, ib, fb string) int {
	if len(ia) != len(ib) {
		if len(ia) < len(ib) {
			return -1
		}
		return 1
	}
	if c := strings.Compare(ia, ib); c != 0 {
		return c
	}
	return strings.Compare(fa, fb) // digit strings without trailing zeros
}

// like matches Postgres LIKE: % any run of characters, _ one character,
// backslash escapes the next character.
func like(s, pat string) bool {
	// Iterative matching with one backtrack point for the last %.
	si, pi := 0, 0
	starP, starS := -1, 0
	for si < len(s) {
		if pi < len(pat) {
			switch c := pat[pi]; c {
			case '%':
				starP, starS = pi+1, si
				pi++
				continue
			case '_':
				_, n := utf8.DecodeRuneInString(s[si:])
				si += n
				pi++
				continue
			default:
				lit := pi
				if c == '\\' && pi+1 < len(pat) {
					lit = pi + 1
				}
				_, pn := utf8.DecodeRuneInString(pat[lit:])
				_, sn := utf8.DecodeRuneInString(s[si:])
				if pat[lit:lit+pn] == s[si:si+sn] {
					si += sn
					pi = lit + pn
					continue
				}
			}
		}
		if starP < 0 {
			return false
		}
		_, n := utf8.DecodeRuneInString(s[starS:])
		starS += n
		si, pi = starS, starP
	}
	for pi < len(pat) && pat[pi] == '%' {
		pi++
	}
	return pi == len(pat)
}
