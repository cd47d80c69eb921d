package integrity

import (
	"math/big"
	"strings"
	"time"
)

// orderFunc compares two values of a column as the envelope renders them
// (pipeline.Text): ok is false when one does not parse as the column's type.
type orderFunc func(a, b string) (cmp int, ok bool)

// orderFor returns how a monotonic rule compares values of a column of type
// typ (a quoted type name as TableSchema.Types holds it), with the order's
// name, or nil for a type Tidemark cannot order.
func orderFor(typ string) (orderFunc, string) {
	name := typ
	if i := strings.LastIndex(name, "."); i >= 0 {
		name = name[i+1:]
	}
	name = strings.Trim(name, `"`)
	switch name {
	case "int2", "int4", "int8", "oid", "numeric", "float4", "float8":
		return compareNumbers, "number"
	case "timestamptz", "timestamp":
		return compareTimes, "time"
	case "date":
		return compareDates, "date"
	case "text", "varchar", "bpchar", "name", "uuid", "citext":
		return func(a, b string) (int, bool) { return strings.Compare(a, b), true }, "text"
	}
	return nil, ""
}

// special orders the infinities (and numeric NaN, which Postgres sorts
// above every number): -1 below everything, 1 above, 0 when v is finite.
func special(v string) (rank int, is bool) {
	switch strings.ToLower(v) {
	case "-infinity", "-inf":
		return -1, true
	case "infinity", "+infinity", "inf":
		return 1, true
	case "nan":
		return 2, true
	}
	return 0, false
}

func compareSpecial(a, b string) (int, bool, bool) {
	ra, sa := special(a)
	rb, sb := special(b)
	if !sa && !sb {
		return 0, false, false
	}
	return cmpInt(ra, rb), true, true
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// compareNumbers compares exactly (math/big), never through float64.
func compareNumbers(a, b string) (int, bool) {
	if c, ok, done := compareSpecial(a, b); done {
		return c, ok
	}
	var ra, rb big.Rat
	if _, ok := ra.SetString(a); !ok {
		return 0, false
	}
	if _, ok := rb.SetString(b); !ok {
		return 0, false
	}
	return ra.Cmp(&rb), true
}

// compareTimes compares ISO-8601 timestamps as instants (with or without an
// offset; fractions of any length), or integer epoch values (Debezium's
// micro/nano representations) as numbers.
func compareTimes(a, b string) (int, bool) {
	if c, ok, done := compareSpecial(a, b); done {
		return c, ok
	}
	ta, errA := parseTime(a)
	tb, errB := parseTime(b)
	if errA != nil || errB != nil {
		if errA != nil && errB != nil {
			return compareNumbers(a, b)
		}
		return 0, false
	}
	return ta.Compare(tb), true
}

func parseTime(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	return time.Parse("2006-01-02T15:04:05.999999999", s)
}

func compareDates(a, b string) (int, bool) {
	if c, ok, done := compareSpecial(a, b); done {
		return c, ok
	}
	ta, errA := time.Parse("2006-01-02", a)
	tb, errB := time.Parse("2006-01-02", b)
	if errA != nil || errB != nil {
		if errA != nil && errB != nil {
			return compareNumbers(a, b) // days since the epoch
		}
		return 0, false
	}
	return ta.Compare(tb), true
}
