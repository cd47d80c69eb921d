package expr

import (
	"strings"
)

// SQL renders the expression as a Postgres boolean condition. quoteCol
// renders a column reference (e.g. `m."type"`); nextArg records a parameter
// value and returns its placeholder (e.g. "$3"). Literals only ever reach
// the SQL as parameters; values are compared on col::text as Eval compares
// them (see the package documentation).
func (e *Expr) SQL(quoteCol func(col string) string, nextArg func(v any) string) string {
	var b strings.Builder
	e.sql(&b, quoteCol, nextArg)
	return b.String()
}

func (e *Expr) sql(b *strings.Builder, quoteCol func(string) string, nextArg func(any) string) {
	switch e.Kind {
	case And, Or:
		sep := " AND "
		if e.Kind == Or {
			sep = " OR "
		}
		b.WriteByte('(')
		for i, k := range e.Kids {
			if i > 0 {
				b.WriteString(sep)
			}
			k.sql(b, quoteCol, nextArg)
		}
		b.WriteByte(')')
		return
	case Not:
		b.WriteString("NOT ")
		k := e.Kids[0]
		if k.Kind != And && k.Kind != Or {
			b.WriteByte('(')
			defer b.WriteByte(')')
		}
		k.sql(b, quoteCol, nextArg)
		return
	}
	col := quoteCol(e.Col)
	text := col + "::text"
	switch e.Kind {
	case IsNull:
		b.WriteString(col)
		if e.Neg {
			b.WriteString(" IS NOT NULL")
		} else {
			b.WriteString(" IS NULL")
		}
	case Cmp:
		cmpSQL(b, text, e.Op, e.Lits[0], nextArg)
	case Like:
		b.WriteString(text)
		if e.Neg {
			b.WriteString(" NOT")
		}
		b.WriteString(" LIKE " + nextArg(e.Lits[0].Text) + "::text")
	case In:
		allText := true
		var texts []string
		for _, l := range e.Lits {
			allText = allText && l.Kind == Text
			texts = append(texts, l.Text)
		}
		if allText {
			op := " = ANY("
			if e.Neg {
				op = " <> ALL("
			}
			b.WriteString(text + op + nextArg(texts) + "::text[])")
			return
		}
		if e.Neg {
			b.WriteString("NOT ")
		}
		b.WriteByte('(')
		for i, l := range e.Lits {
			if i > 0 {
				b.WriteString(" OR ")
			}
			cmpSQL(b, text, "=", l, nextArg)
		}
		b.WriteByte(')')
	}
}

func cmpSQL(b *strings.Builder, text, op string, l Lit, nextArg func(any) string) {
	sqlOp := op
	if op == "!=" {
		sqlOp = "<>"
	}
	collate := ""
	if op != "=" && op != "!=" {
		collate = ` COLLATE "C"`
	}
	switch l.Kind {
	case Bool:
		if op == "=" {
			b.WriteString(text + " = ANY(" + nextArg(boolTexts(l)) + "::text[])")
		} else {
			b.WriteString(text + " <> ALL(" + nextArg(boolTexts(l)) + "::text[])")
		}
	case Number:
		// Numerically when the column's text is a decimal, as texts
		// otherwise (CASE evaluates the cast only for decimals).
		b.WriteString("CASE WHEN " + text + " ~ " + nextArg(DecimalPattern) + "::text THEN " +
			text + "::numeric " + sqlOp + " " + nextArg(l.Text) + "::numeric ELSE " +
			text + " " + sqlOp + " " + nextArg(l.Text) + "::text" + collate + " END")
	default:
		b.WriteString(text + " " + sqlOp + " " + nextArg(l.Text) + "::text" + collate)
	}
}
