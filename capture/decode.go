package capture

import (
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
}

func newDecoder() *decoder { return &decoder{types: pgtype.NewMap()} }

// relationFromMessage converts a Relation message into the pipeline's shape.
// Column.Key follows keys (the table's primary key, from preflight) when
// given: pgoutput flags every column under REPLICA IDENTITY FULL, which would
// key messages by the whole row. Without keys, the flags are used.
func relationFromMessage(m *pglogrepl.RelationMessage, keys []string) *pipeline.Relation {
	r := &pipeline.Relation{
		OID: m.RelationID, Schema: m.Namespace, Table: m.RelationName,
		ReplicaIdentity: m.ReplicaIdentity,
		Columns:         make([]pipeline.Column, len(m.Columns)),
	}
	for i, c := range m.Columns {
		key := c.Flags&1 == 1
		if len(keys) > 0 {
			key = slices.Contains(keys, c.Name)
		}
		r.Columns[i] = pipeline.Column{Name: c.Name, TypeOID: c.DataType, Key: key}
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
			if keyOnly && !col.Key {
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

// value decodes one value in Postgres' text output format. The result may
// alias data.
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
		if len(data) >= 2 && data[0] == '\\' && data[1] == 'x' {
			b := make([]byte, hex.DecodedLen(len(data)-2))
			_, err := hex.Decode(b, data[2:])
			return b, err
		}
	}
	t, ok := d.types.TypeForOID(oid)
	if !ok {
		// Enums, domains over unknown types, extension types: their text.
		return str(data), nil
	}
	switch codec := t.Codec.(type) {
	case *pgtype.ArrayCodec:
		if !knownElement(codec.ElementType.OID) {
			return str(data), nil
		}
		v, err := codec.DecodeValue(d.types, oid, pgtype.TextFormatCode, data)
		if err != nil {
			return nil, err
		}
		return normalize(v, codec.ElementType.OID)
	case *pgtype.TimestamptzCodec, *pgtype.TimestampCodec, pgtype.DateCodec, *pgtype.ByteaCodec, pgtype.ByteaCodec:
		v, err := t.Codec.DecodeValue(d.types, oid, pgtype.TextFormatCode, data)
		if err != nil {
			return nil, err
		}
		return normalize(v, oid)
	}
	return str(data), nil
}

func knownElement(oid uint32) bool {
	switch oid {
	case pgtype.BoolOID, pgtype.Int2OID, pgtype.Int4OID, pgtype.Int8OID, pgtype.Float4OID, pgtype.Float8OID,
		pgtype.NumericOID, pgtype.TextOID, pgtype.VarcharOID, pgtype.BPCharOID, pgtype.NameOID, pgtype.UUIDOID,
		pgtype.TimestamptzOID, pgtype.TimestampOID, pgtype.DateOID, pgtype.ByteaOID:
		return true
	}
	return false
}

// normalize maps pgx's decoded values onto the pipeline's value set.
func normalize(v any, oid uint32) (any, error) {
	switch x := v.(type) {
	case nil, bool, int64, string, []byte:
		return x, nil
	case int16:
		return int64(x), nil
	case int32:
		return int64(x), nil
	case float32, float64:
		return x, nil
	case pgtype.Numeric:
		s, err := x.Value()
		if err != nil {
			return nil, err
		}
		str, _ := s.(string)
		return pipeline.Decimal(str), nil
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
	case [16]byte:
		return fmt.Sprintf("%x-%x-%x-%x-%x", x[0:4], x[4:6], x[6:8], x[8:10], x[10:16]), nil
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			n, err := normalize(e, oid)
			if err != nil {
				return nil, err
			}
			out[i] = n
		}
		return out, nil
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
