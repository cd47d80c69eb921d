package capture

import (
	"encoding/binary"
	"fmt"

	"github.com/jackc/pglogrepl"
)

// The hot path: Insert, Update and Delete messages are decoded in place
// (pgoutput protocol version 1, "Logical Replication Message Formats"):
//
//	Insert: 'I' relid:int32 'N' TupleData
//	Update: 'U' relid:int32 [('K'|'O') TupleData] 'N' TupleData
//	Delete: 'D' relid:int32 ('K'|'O') TupleData
//	TupleData: ncols:int16, then per column kind:byte ('n' null,
//	'u' unchanged TOAST, 't' text, 'b' binary) and for 't'/'b' len:int32 data
//
// pglogrepl.Parse allocates a message, a column struct and a copy of every
// value; here column data alias the message and the column slices are
// reused, so a row costs no allocation before its values are decoded.
// FuzzRowMessage checks this decoder against pglogrepl's on arbitrary input.

// rawCol is one column of a tuple; data aliases the message.
type rawCol struct {
	kind byte
	data []byte
}

// rowMessage is a decoded Insert, Update or Delete. It is reused: parse
// overwrites it, and its columns are valid until the message bytes change.
type rowMessage struct {
	typ     byte // 'I', 'U' or 'D'
	relID   uint32
	oldKind byte // 0 (no old image), 'K' (key columns) or 'O' (old row)
	old     []rawCol
	new     []rawCol
	hasNew  bool
}

// isRowMessage reports whether data is an Insert, Update or Delete.
func isRowMessage(data []byte) bool {
	return len(data) > 0 && (data[0] == 'I' || data[0] == 'U' || data[0] == 'D')
}

// parse decodes data, which isRowMessage accepted. Every length is checked:
// malformed input is an error, never a panic.
func (m *rowMessage) parse(data []byte) error {
	m.typ = data[0]
	m.oldKind, m.hasNew = 0, false
	m.old, m.new = m.old[:0], m.new[:0]
	if len(data) < 6 {
		return fmt.Errorf("malformed pgoutput %q message: %d bytes", m.typ, len(data))
	}
	m.relID = binary.BigEndian.Uint32(data[1:5])
	p := data[5:]
	var err error
	switch m.typ {
	case 'I':
		if p[0] != 'N' {
			return fmt.Errorf("malformed pgoutput insert: tuple marker %q, want 'N'", p[0])
		}
		m.hasNew = true
		m.new, p, err = parseTuple(m.new, p[1:])
	case 'U':
		if p[0] == 'K' || p[0] == 'O' {
			m.oldKind = p[0]
			if m.old, p, err = parseTuple(m.old, p[1:]); err != nil {
				return fmt.Errorf("malformed pgoutput update (old image): %w", err)
			}
			if len(p) == 0 {
				return fmt.Errorf("malformed pgoutput update: no new tuple")
			}
		}
		if p[0] != 'N' {
			return fmt.Errorf("malformed pgoutput update: tuple marker %q, want 'N'", p[0])
		}
		m.hasNew = true
		m.new, p, err = parseTuple(m.new, p[1:])
	case 'D':
		if p[0] != 'K' && p[0] != 'O' {
			return fmt.Errorf("malformed pgoutput delete: tuple marker %q, want 'K' or 'O'", p[0])
		}
		m.oldKind = p[0]
		m.old, p, err = parseTuple(m.old, p[1:])
	}
	if err != nil {
		return fmt.Errorf("malformed pgoutput %s: %w", rowMessageName(m.typ), err)
	}
	if len(p) != 0 {
		return fmt.Errorf("malformed pgoutput %s: %d trailing bytes", rowMessageName(m.typ), len(p))
	}
	return nil
}

func rowMessageName(t byte) string {
	switch t {
	case 'I':
		return "insert"
	case 'U':
		return "update"
	}
	return "delete"
}

// parseTuple appends the columns of the TupleData at the start of p to dst
// and returns the rest of p.
func parseTuple(dst []rawCol, p []byte) ([]rawCol, []byte, error) {
	if len(p) < 2 {
		return dst, p, fmt.Errorf("tuple truncated before its column count")
	}
	n := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	for i := 0; i < n; i++ {
		if len(p) < 1 {
			return dst, p, fmt.Errorf("tuple truncated at column %d of %d", i+1, n)
		}
		kind := p[0]
		p = p[1:]
		switch kind {
		case pglogrepl.TupleDataTypeNull, pglogrepl.TupleDataTypeToast:
			dst = append(dst, rawCol{kind: kind})
		case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
			if len(p) < 4 {
				return dst, p, fmt.Errorf("tuple truncated in the length of column %d", i+1)
			}
			l := binary.BigEndian.Uint32(p)
			p = p[4:]
			if uint64(l) > uint64(len(p)) {
				return dst, p, fmt.Errorf("column %d claims %d bytes, %d remain", i+1, l, len(p))
			}
			dst = append(dst, rawCol{kind: kind, data: p[:l:l]})
			p = p[l:]
		default:
			return dst, p, fmt.Errorf("column %d has unknown kind %q", i+1, kind)
		}
	}
	return dst, p, nil
}

// rawColumns converts pglogrepl's tuple to the in-place form.
func rawColumns(td *pglogrepl.TupleData) []rawCol {
	if td == nil {
		return nil
	}
	out := make([]rawCol, len(td.Columns))
	for i, c := range td.Columns {
		out[i] = rawCol{kind: c.DataType, data: c.Data}
	}
	return out
}
