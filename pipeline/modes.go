package pipeline

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"time"
)

// ValueModes choose how some types are written, for readers that expect
// Debezium's defaults. The zero value is Tidemark's default for each.
// Every mode gives a column one JSON type for all its values (except
// numeric NaN and ±Infinity and timestamp ±infinity, which stay strings:
// no number can carry them). Keys are not affected: they keep the default
// forms, so that partitions do not move with a mode.
type ValueModes struct {
	// JSON: "embed" (default: json/jsonb as JSON) or "string" (as a JSON
	// string, Debezium's io.debezium.data.Json).
	JSON string
	// Decimal (numeric): "number" (default: a column declared with a
	// precision of at most 15 digits as JSON numbers, any other numeric
	// column as strings), "string" (always strings, exact) or "double"
	// (always JSON numbers, which float readers may round).
	Decimal string
	// Time: "iso" (default: ISO-8601 text) or "micros" (Debezium's
	// MicroTimestamp, MicroTime and MicroDuration: timestamp and
	// timestamptz as microseconds since the epoch, time as microseconds
	// since midnight, interval as microseconds with a month of 30.4375
	// days; date as days since the epoch).
	Time string
	// Bigint (int8): "number" (default: JSON numbers with every digit) or
	// "string".
	Bigint string
}

// Validate names a mode value that is not known.
func (m ValueModes) Validate() error {
	check := func(name, v string, ok ...string) error {
		if v == "" {
			return nil
		}
		for _, o := range ok {
			if v == o {
				return nil
			}
		}
		return errors.New(name + ": " + strconv.Quote(v) + " is not one of " + strings.Join(ok, ", "))
	}
	return errors.Join(check("json_mode", m.JSON, "embed", "string"),
		check("decimal_mode", m.Decimal, "number", "string", "precise-string", "double"),
		check("time_mode", m.Time, "iso", "micros"),
		check("bigint_mode", m.Bigint, "number", "string"))
}

// Column kinds for the envelope layout: how appendImage writes a column.
const (
	kindDefault    = iota
	kindDecNumber  // numeric, as a JSON number (when plain)
	kindDecString  // numeric, as a string
	kindInt8Number // int8, every digit as a JSON number
	kindInt8String // int8, as a string
	kindJSONString // json/jsonb as a JSON string
	kindMicrosTS   // timestamp/timestamptz as epoch micros
	kindMicrosTime // time as micros since midnight
	kindMicrosIntv // interval as micros
	kindEpochDays  // date as days since the epoch
)

// Type OIDs the modes look at.
const (
	oidInt8        = 20
	oidJSON        = 114
	oidDate        = 1082
	oidTime        = 1083
	oidTimestamp   = 1114
	oidTimestamptz = 1184
	oidInterval    = 1186
	oidNumeric     = 1700
	oidJSONB       = 3802
)

// columnKind picks a column's kind from its type and the modes.
func columnKind(c Column, m ValueModes) uint8 {
	switch c.TypeOID {
	case oidNumeric:
		switch m.Decimal {
		case "string", "precise-string":
			return kindDecString
		case "double":
			return kindDecNumber
		}
		// numeric(p,s) has typmod ((p << 16) | s) + 4; unconstrained -1.
		if c.TypeMod >= 4 && (c.TypeMod-4)>>16&0xffff <= 15 {
			return kindDecNumber
		}
		return kindDecString
	case oidInt8:
		if m.Bigint == "string" {
			return kindInt8String
		}
		return kindInt8Number
	case oidJSON, oidJSONB:
		if m.JSON == "string" {
			return kindJSONString
		}
	case oidTimestamp, oidTimestamptz:
		if m.Time == "micros" {
			return kindMicrosTS
		}
	case oidTime:
		if m.Time == "micros" {
			return kindMicrosTime
		}
	case oidInterval:
		if m.Time == "micros" {
			return kindMicrosIntv
		}
	case oidDate:
		if m.Time == "micros" {
			return kindEpochDays
		}
	}
	return kindDefault
}

// appendKind writes d by its column's kind; ok is false when the kind does
// not apply to the value (then the default form is written by the caller).
func appendKind(dst []byte, kind uint8, d *Datum) ([]byte, bool) {
	if !d.IsText && !d.IsInt && d.Value == nil {
		return append(dst, "null"...), true
	}
	switch kind {
	case kindDecNumber, kindDecString:
		s, ok := d.Value.(Decimal)
		if !ok {
			return dst, false
		}
		if kind == kindDecNumber && plainDecimal(string(s)) {
			return append(dst, s...), true
		}
		return AppendJSONString(dst, string(s)), true
	case kindInt8Number, kindInt8String:
		v, ok := d.Int, d.IsInt
		if !ok {
			v, ok = d.Value.(int64)
		}
		if !ok {
			return dst, false
		}
		if kind == kindInt8String {
			dst = append(dst, '"')
			dst = strconv.AppendInt(dst, v, 10)
			return append(dst, '"'), true
		}
		return strconv.AppendInt(dst, v, 10), true
	case kindJSONString:
		j, ok := d.Value.(JSON)
		if !ok {
			return dst, false
		}
		return AppendJSONString(dst, string(j)), true
	case kindMicrosTS:
		switch t := d.Value.(type) {
		case time.Time:
			return strconv.AppendInt(dst, t.UnixMicro(), 10), true
		case Timestamp:
			return strconv.AppendInt(dst, t.Time.UnixMicro(), 10), true
		}
	case kindEpochDays:
		if t, ok := d.Value.(Date); ok {
			return strconv.AppendInt(dst, int64(math.Floor(float64(t.Time.Unix())/86400)), 10), true
		}
	case kindMicrosTime:
		if us, ok := parseTimeMicros(d.text()); ok {
			return strconv.AppendInt(dst, us, 10), true
		}
	case kindMicrosIntv:
		if us, ok := parseIntervalMicros(d.text()); ok {
			return strconv.AppendInt(dst, us, 10), true
		}
	}
	return dst, false
}

// text returns a text datum's string ("" for other kinds).
func (d *Datum) text() string {
	if d.IsText {
		return d.Text
	}
	s, _ := d.Value.(string)
	return s
}

// plainDecimal reports whether s is a decimal JSON can carry as a number
// ("-12.340"), not NaN or Infinity.
func plainDecimal(s string) bool {
	if s == "" {
		return false
	}
	i, digits := 0, 0
	if s[0] == '-' {
		i = 1
	}
	dot := false
	for ; i < len(s); i++ {
		switch c := s[i]; {
		case c >= '0' && c <= '9':
			digits++
		case c == '.' && !dot && digits > 0:
			dot = true
		default:
			return false
		}
	}
	return digits > 0 && s[len(s)-1] != '.'
}

// parseTimeMicros reads "HH:MM:SS[.ffffff]" (Postgres' time output; 24:00:00
// is allowed).
func parseTimeMicros(s string) (int64, bool) {
	h, rest, ok1 := strings.Cut(s, ":")
	m, sec, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return 0, false
	}
	hv, err1 := strconv.ParseInt(h, 10, 64)
	mv, err2 := strconv.ParseInt(m, 10, 64)
	su, ok3 := secondsMicros(sec)
	if err1 != nil || err2 != nil || !ok3 {
		return 0, false
	}
	return (hv*60+mv)*60_000_000 + su, true
}

// secondsMicros reads "SS[.ffffff]" as microseconds.
func secondsMicros(s string) (int64, bool) {
	whole, frac, _ := strings.Cut(s, ".")
	sv, err := strconv.ParseInt(whole, 10, 64)
	if err != nil || len(frac) > 6 {
		return 0, false
	}
	us := int64(0)
	if frac != "" {
		f, err := strconv.ParseInt(frac+strings.Repeat("0", 6-len(frac)), 10, 64)
		if err != nil {
			return 0, false
		}
		us = f
	}
	return sv*1_000_000 + us, true
}

// parseIntervalMicros reads an interval in IntervalStyle postgres ("1 year
// 2 mons -3 days 04:05:06.5", "-00:00:01") as microseconds, a month
// counting 30.4375 days (Debezium's MicroDuration).
func parseIntervalMicros(s string) (int64, bool) {
	const day = 86_400_000_000
	f := strings.Fields(s)
	var total float64
	for i := 0; i < len(f); i++ {
		tok := f[i]
		if strings.Contains(tok, ":") {
			neg := strings.HasPrefix(tok, "-")
			tok = strings.TrimLeft(tok, "+-")
			us, ok := parseTimeMicros(tok)
			if !ok {
				return 0, false
			}
			if neg {
				us = -us
			}
			total += float64(us)
			continue
		}
		if i+1 >= len(f) {
			return 0, false
		}
		n, err := strconv.ParseFloat(tok, 64)
		if err != nil {
			return 0, false
		}
		i++
		switch strings.TrimSuffix(f[i], "s") {
		case "year":
			total += n * 12 * 30.4375 * day
		case "mon":
			total += n * 30.4375 * day
		case "day":
			total += n * day
		default:
			return 0, false
		}
	}
	if len(f) == 0 || math.Abs(total) > math.MaxInt64/2 {
		return 0, false
	}
	return int64(math.Round(total)), true
}
