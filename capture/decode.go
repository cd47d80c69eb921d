package capture

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
	"unsafe"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/tidemark/tidemark/pipeline"
)

// decoder turns pgoutput tuples (text format) into pipeline values. It is
// used by one goroutine.
type decoder struct {
	types *pgtype.Map
	// decodeAs maps each type that is not built in and that resolveTypes
	// looked up to the built-in type its values decode as (itself when
	// none).
	decodeAs map[uint32]uint32
}

func newDecoder() *decoder { return &decoder{types: pgtype.NewMap(), decodeAs: map[uint32]uint32{}} }

// textFormats are the session settings the decoder assumes. pgoutput writes
// each value with its type's output function in the walsender, under the
// replication session's settings; without these, the database's or role's
// defaults (ALTER DATABASE ... SET) would apply, and a value would be
// refused (bytea in escape format, dates in SQL style) or published in
// another form (intervals in ISO 8601, floats rounded, text in another
// encoding). Startup parameters take precedence over those defaults.
var textFormats = map[string]string{
	"DateStyle":          "ISO",      // 2024-03-01 10:34:56.5+00, the form pgx parses
	"TimeZone":           "UTC",      // timestamptz written in UTC
	"IntervalStyle":      "postgres", // intervals are published as this text: 1 day 02:03:04
	"bytea_output":       "hex",      // \xdeadbeef
	"extra_float_digits": "3",        // floats in their shortest exact form, never rounded
	"client_encoding":    "UTF8",     // pgoutput converts text to the client encoding
}

// pinTextFormats sets textFormats in the startup parameters of a
// connection whose values the decoder reads (the replication connection).
func pinTextFormats(params map[string]string) {
	for k, v := range textFormats {
		params[k] = v
	}
}

// firstNormalOID is Postgres' FirstNormalObjectId: types with lower OIDs are
// built in (the decoder knows them by OID); higher ones were created by
// users or extensions, and resolveTypes looks them up.
const firstNormalOID = 16384

// pgType is what the decoder needs of a pg_type row.
type pgType struct {
	Domain bool   // typtype 'd'
	Base   uint32 // a domain's typbasetype
	Elem   uint32 // a true array's element type (typelem), else 0
}

// typeLookup reads the pg_type rows of oids and of the types they are built
// on (domains' base types, arrays' element types), as far as they are not
// built in. A type that does not exist is missing from the result.
type typeLookup func(ctx context.Context, oids []uint32) (map[uint32]pgType, error)

// resolveTypes looks up, once per decoder, each type among oids (a
// relation's column types) that is not built in, so that value decodes a
// domain as its base type, and an array of domains as an array of the
// base type: a domain over int4 is a number, one over text a string.
// Other types (enums, composites, extension types) keep their text.
func (d *decoder) resolveTypes(ctx context.Context, oids []uint32, lookup typeLookup) error {
	var todo []uint32
	for _, oid := range oids {
		if _, done := d.decodeAs[oid]; !done && oid >= firstNormalOID && !slices.Contains(todo, oid) {
			todo = append(todo, oid)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	rows, err := lookup(ctx, todo)
	if err != nil {
		return fmt.Errorf("looking up types %v: %w", todo, err)
	}
	for _, oid := range todo {
		d.decodeAs[oid] = decodeAs(oid, rows, 0)
	}
	return nil
}

// decodeAs follows oid through rows to the built-in type its values are
// written as: a domain's base type, recursively; for an array of domains,
// the array type of the element's base type when the decoder decodes it.
func decodeAs(oid uint32, rows map[uint32]pgType, depth int) uint32 {
	r, ok := rows[oid]
	if oid < firstNormalOID || !ok || depth > 32 {
		return oid
	}
	switch {
	case r.Domain:
		return decodeAs(r.Base, rows, depth+1)
	case r.Elem != 0:
		if a, ok := arrayOf[decodeAs(r.Elem, rows, depth+1)]; ok {
			return a
		}
	}
	return oid
}

// relationFromMessage converts a Relation message into the pipeline's shape.
// Column.Key follows keys (the table's key, chosen at preflight: see
// ChooseKey) when given: pgoutput flags every column under REPLICA IDENTITY
// FULL, which would key messages by the whole row. Without keys, the flags
// are used. Column.Identity is always the flag: old-row key images carry
// those columns, and only those.
func relationFromMessage(m *pglogrepl.RelationMessage, keys []string) *pipeline.Relation {
	r := &pipeline.Relation{
		OID: m.RelationID, Schema: m.Namespace, Table: m.RelationName,
		ReplicaIdentity: m.ReplicaIdentity,
		Columns:         make([]pipeline.Column, len(m.Columns)),
	}
	for i, c := range m.Columns {
		identity := c.Flags&1 == 1
		key := identity
		if len(keys) > 0 {
			key = slices.Contains(keys, c.Name)
		}
		r.Columns[i] = pipeline.Column{Name: c.Name, TypeOID: c.DataType, TypeMod: c.TypeModifier, Key: key, Identity: identity}
	}
	return r
}

// DecodeError names the table, column and type of a value that could not be
// decoded.
type DecodeError struct {
	Table, Column string
	TypeOID       uint32
	Err           error
}

func (e *DecodeError) Error() string {
	return fmt.Sprintf("decoding %s.%s (type oid %d): %v", e.Table, e.Column, e.TypeOID, e.Err)
}

func (e *DecodeError) Unwrap() error { return e.Err }

// tuple decodes pglogrepl's td against rel (see decodeTuple).
func (d *decoder) tuple(rel *pipeline.Relation, td *pglogrepl.TupleData, keyOnly bool) (pipeline.Tuple, error) {
	if td == nil {
		return nil, nil
	}
	return d.decodeTuple(rel, rawColumns(td), keyOnly)
}

// decodeTuple decodes cols against rel. keyOnly marks the non-key columns of
// an old-key image ('K') as absent. Decoded values may alias the columns'
// data, which the caller MUST NOT modify afterwards.
func (d *decoder) decodeTuple(rel *pipeline.Relation, cols []rawCol, keyOnly bool) (pipeline.Tuple, error) {
	if len(cols) != len(rel.Columns) {
		return nil, fmt.Errorf("tuple for %s has %d columns, relation has %d", rel.QualifiedName(), len(cols), len(rel.Columns))
	}
	out := make(pipeline.Tuple, len(cols))
	for i, c := range cols {
		col := &rel.Columns[i]
		switch c.kind {
		case pglogrepl.TupleDataTypeNull:
			// An old-row key image sends the identity columns; the others
			// are not null, but absent.
			if keyOnly && !col.Identity {
				out[i].Absent = true
			}
		case pglogrepl.TupleDataTypeToast:
			out[i].Unchanged = true
		case pglogrepl.TupleDataTypeText:
			switch col.TypeOID {
			case pgtype.TextOID, pgtype.VarcharOID, pgtype.BPCharOID, pgtype.NameOID, pgtype.UUIDOID:
				out[i].Text, out[i].IsText = str(c.data), true
				continue
			case pgtype.Int2OID, pgtype.Int4OID, pgtype.Int8OID:
				n, err := strconv.ParseInt(str(c.data), 10, 64)
				if err != nil {
					return nil, &DecodeError{Table: rel.QualifiedName(), Column: col.Name, TypeOID: col.TypeOID, Err: err}
				}
				out[i].Int, out[i].IsInt = n, true
				continue
			}
			v, err := d.value(col.TypeOID, c.data)
			if err != nil {
				return nil, &DecodeError{Table: rel.QualifiedName(), Column: col.Name, TypeOID: col.TypeOID, Err: err}
			}
			out[i].Value = v
		default:
			return nil, &DecodeError{Table: rel.QualifiedName(), Column: col.Name, TypeOID: col.TypeOID,
				Err: fmt.Errorf("unsupported tuple data kind %q", c.kind)}
		}
	}
	return out, nil
}

// str returns data as a string without copying. Safe because the decoder's
// input is never modified after decoding (see decodeTuple).
func str(data []byte) string {
	if len(data) == 0 {
		return ""
	}
	return unsafe.String(&data[0], len(data))
}

// value decodes one value in Postgres' text output format (as written under
// textFormats). The result may alias data.
func (d *decoder) value(oid uint32, data []byte) (any, error) {
	switch oid {
	case pgtype.BoolOID:
		return len(data) > 0 && data[0] == 't', nil
	case pgtype.Int2OID, pgtype.Int4OID, pgtype.Int8OID, pgtype.OIDOID, pgtype.XIDOID:
		return strconv.ParseInt(str(data), 10, 64)
	case pgtype.Float4OID:
		f, err := strconv.ParseFloat(str(data), 32)
		return float32(f), err
	case pgtype.Float8OID:
		return strconv.ParseFloat(str(data), 64)
	case pgtype.NumericOID:
		return pipeline.Decimal(str(data)), nil
	case pgtype.TextOID, pgtype.VarcharOID, pgtype.BPCharOID, pgtype.NameOID, pgtype.UUIDOID:
		return str(data), nil
	case pgtype.JSONOID, pgtype.JSONBOID:
		// Envelopes embed it verbatim (pipeline.JSON): text that is not
		// JSON would make the whole envelope unreadable to consumers.
		if !json.Valid(data) {
			return nil, errors.New("not valid JSON")
		}
		return pipeline.JSON(data[:len(data):len(data)]), nil
	case pgtype.ByteaOID:
		if len(data) < 2 || data[0] != '\\' || data[1] != 'x' {
			return nil, errors.New(`bytea not in hex format ("\x..."): the replication connection must run with bytea_output = hex`)
		}
		b := make([]byte, hex.DecodedLen(len(data)-2))
		_, err := hex.Decode(b, data[2:])
		return b, err
	case pgtype.TimestamptzOID, pgtype.TimestampOID, pgtype.DateOID:
		t, _ := d.types.TypeForOID(oid)
		v, err := t.Codec.DecodeValue(d.types, oid, pgtype.TextFormatCode, data)
		if err != nil {
			return nil, err
		}
		return normalize(v, oid)
	}
	if elem, ok := arrayElems[oid]; ok {
		return d.array(elem, data)
	}
	if base, ok := d.decodeAs[oid]; ok && base != oid {
		// A domain (or an array of domains): its text is its base type's.
		return d.value(base, data)
	}
	// Enums, intervals, inet, arrays of other types, extension types:
	// their text.
	return str(data), nil
}

// arrayElems maps the array types whose elements the decoder decodes to
// their element types. Arrays of other types keep their text.
var arrayElems = map[uint32]uint32{
	pgtype.BoolArrayOID: pgtype.BoolOID, pgtype.Int2ArrayOID: pgtype.Int2OID, pgtype.Int4ArrayOID: pgtype.Int4OID,
	pgtype.Int8ArrayOID: pgtype.Int8OID, pgtype.Float4ArrayOID: pgtype.Float4OID, pgtype.Float8ArrayOID: pgtype.Float8OID,
	pgtype.NumericArrayOID: pgtype.NumericOID, pgtype.TextArrayOID: pgtype.TextOID, pgtype.VarcharArrayOID: pgtype.VarcharOID,
	pgtype.BPCharArrayOID: pgtype.BPCharOID, pgtype.NameArrayOID: pgtype.NameOID, pgtype.UUIDArrayOID: pgtype.UUIDOID,
	pgtype.TimestamptzArrayOID: pgtype.TimestamptzOID, pgtype.TimestampArrayOID: pgtype.TimestampOID,
	pgtype.DateArrayOID: pgtype.DateOID, pgtype.ByteaArrayOID: pgtype.ByteaOID,
}

// arrayOf is arrayElems reversed: the array type of each element type.
var arrayOf = func() map[uint32]uint32 {
	m := make(map[uint32]uint32, len(arrayElems))
	for a, e := range arrayElems {
		m[e] = a
	}
	return m
}()

// maxArrayDims is Postgres' limit on array dimensions (MAXDIM).
const maxArrayDims = 6

// array decodes an array in array_out's text form, its elements of type
// elem: one JSON-ready []any per dimension, nested ({{1,2},{3,4}} becomes
// [[1,2],[3,4]]), SQL NULL elements as nil. An array with a lower bound
// other than 1 is written with its bounds ("[0:2]={1,2,3}"), which JSON
// arrays cannot carry: it is validated and kept as that text, from which
// Postgres (or a consumer) can rebuild it exactly.
func (d *decoder) array(elem uint32, data []byte) (any, error) {
	p := arrayParser{d: d, elem: elem, data: data}
	bounds := len(data) > 0 && data[0] == '['
	if bounds {
		if err := p.bounds(); err != nil {
			return nil, err
		}
	}
	v, err := p.parse(1)
	if err != nil {
		return nil, err
	}
	if p.pos != len(data) {
		return nil, fmt.Errorf("array: unexpected %q at offset %d", data[p.pos], p.pos)
	}
	if bounds {
		return str(data), nil
	}
	return v, nil
}

// arrayParser reads array_out's output: elements separated by commas (the
// delimiter of every type in arrayElems), quoted when they are empty,
// contain any of `{}",\` or white space, or read NULL; inside quotes, `"`
// and `\` are escaped with a backslash.
type arrayParser struct {
	d    *decoder
	elem uint32
	data []byte
	pos  int
}

func (p *arrayParser) errorf(format string, args ...any) error {
	return fmt.Errorf("array: "+format+" at offset %d", append(args, p.pos)...)
}

// bounds skips the dimensions of an array with explicit bounds:
// "[lo:hi]" for each dimension, then "=".
func (p *arrayParser) bounds() error {
	dims := 0
	for p.pos < len(p.data) && p.data[p.pos] == '[' {
		if dims++; dims > maxArrayDims {
			return p.errorf("more than %d dimensions", maxArrayDims)
		}
		p.pos++
		for _, stop := range []byte{':', ']'} {
			start := p.pos
			if p.pos < len(p.data) && p.data[p.pos] == '-' {
				p.pos++
			}
			for p.pos < len(p.data) && p.data[p.pos] >= '0' && p.data[p.pos] <= '9' {
				p.pos++
			}
			if _, err := strconv.ParseInt(str(p.data[start:p.pos]), 10, 32); err != nil || p.pos == len(p.data) || p.data[p.pos] != stop {
				return p.errorf("malformed dimensions")
			}
			p.pos++
		}
	}
	if p.pos == len(p.data) || p.data[p.pos] != '=' {
		return p.errorf("malformed dimensions")
	}
	p.pos++
	return nil
}

// parse reads one "{...}" at nesting depth (1 for the outermost).
func (p *arrayParser) parse(depth int) ([]any, error) {
	if depth > maxArrayDims {
		return nil, p.errorf("more than %d dimensions", maxArrayDims)
	}
	if p.pos == len(p.data) || p.data[p.pos] != '{' {
		return nil, p.errorf("expected {")
	}
	p.pos++
	out := []any{}
	if p.pos < len(p.data) && p.data[p.pos] == '}' {
		p.pos++
		return out, nil
	}
	nested := p.pos < len(p.data) && p.data[p.pos] == '{'
	for {
		if p.pos == len(p.data) {
			return nil, p.errorf("unterminated array")
		}
		var v any
		var err error
		if nested {
			v, err = p.parse(depth + 1)
		} else {
			v, err = p.element()
		}
		if err != nil {
			return nil, err
		}
		out = append(out, v)
		if p.pos == len(p.data) {
			return nil, p.errorf("unterminated array")
		}
		switch p.data[p.pos] {
		case ',':
			p.pos++
		case '}':
			p.pos++
			return out, nil
		default:
			return nil, p.errorf("unexpected %q", p.data[p.pos])
		}
	}
}

// element reads and decodes one element (not a sub-array).
func (p *arrayParser) element() (any, error) {
	if p.data[p.pos] != '"' {
		start := p.pos
		for p.pos < len(p.data) {
			c := p.data[p.pos]
			if c == ',' || c == '}' {
				break
			}
			if c == '{' || c == '"' || c == '\\' {
				return nil, p.errorf("unexpected %q in an unquoted element", c)
			}
			p.pos++
		}
		text := p.data[start:p.pos]
		switch {
		case len(text) == 0:
			return nil, p.errorf("empty unquoted element")
		case len(text) == 4 && (text[0]|0x20) == 'n' && (text[1]|0x20) == 'u' && (text[2]|0x20) == 'l' && (text[3]|0x20) == 'l':
			return nil, nil
		}
		return p.decode(text)
	}
	p.pos++ // the opening quote
	start, esc := p.pos, false
	for ; p.pos < len(p.data) && p.data[p.pos] != '"'; p.pos++ {
		if p.data[p.pos] == '\\' {
			esc = true
			p.pos++
		}
	}
	if p.pos >= len(p.data) {
		return nil, p.errorf("unterminated quoted element")
	}
	text := p.data[start:p.pos]
	p.pos++ // the closing quote
	if esc {
		unq := make([]byte, 0, len(text))
		for i := 0; i < len(text); i++ {
			if text[i] == '\\' && i+1 < len(text) {
				i++
			}
			unq = append(unq, text[i])
		}
		text = unq
	}
	return p.decode(text)
}

func (p *arrayParser) decode(text []byte) (any, error) {
	v, err := p.d.value(p.elem, text)
	if err != nil {
		return nil, fmt.Errorf("array element %q: %w", text, err)
	}
	return v, nil
}

// normalize maps pgx's decoded timestamps and dates onto the pipeline's
// value set.
func normalize(v any, oid uint32) (any, error) {
	switch x := v.(type) {
	case pgtype.InfinityModifier:
		if x == pgtype.Infinity {
			return "infinity", nil
		}
		return "-infinity", nil
	case time.Time:
		switch oid {
		case pgtype.DateOID:
			return pipeline.Date{Time: x}, nil
		case pgtype.TimestampOID:
			return pipeline.Timestamp{Time: x}, nil
		}
		return x, nil
	default:
		return nil, fmt.Errorf("unexpected decoded value of Go type %T", v)
	}
}

// parseMessage parses one pgoutput message. pglogrepl's parser trusts its
// input and can panic on truncated data; a malformed message from the server
// becomes an error naming its type and size instead of a crash.
func parseMessage(data []byte) (m pglogrepl.Message, err error) {
	if len(data) == 0 {
		return nil, errors.New("empty pgoutput message")
	}
	// A Truncate's relation count sizes an allocation before it is checked
	// against the message length.
	if data[0] == byte(pglogrepl.MessageTypeTruncate) && len(data) >= 5 {
		if n := binary.BigEndian.Uint32(data[1:5]); uint64(n)*4 > uint64(len(data)) {
			return nil, fmt.Errorf("malformed pgoutput truncate: %d relations in %d bytes", n, len(data))
		}
	}
	// pglogrepl allocates each tuple column at its declared length before
	// checking it against the message (a 30-byte message can ask for 4 GiB),
	// so row messages are validated by the bounds-checked in-place decoder
	// first. (The stream decodes them in place and never gets here.)
	if isRowMessage(data) {
		var rm rowMessage
		if err := rm.parse(data); err != nil {
			return nil, err
		}
	}
	defer func() {
		if r := recover(); r != nil {
			m, err = nil, fmt.Errorf("malformed pgoutput message (type %q, %d bytes): %v", data[0], len(data), r)
		}
	}()
	return pglogrepl.Parse(data)
}
