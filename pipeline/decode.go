package pipeline

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
)

// Envelope is a decoded change envelope (DESIGN §3), for consumers.
type Envelope struct {
	Before    map[string]json.RawMessage `json:"before"`
	After     map[string]json.RawMessage `json:"after"`
	Unchanged []string                   `json:"unchanged"`
	Op        string                     `json:"op"`
	TsMs      int64                      `json:"ts_ms"`
	Source    struct {
		Name   string `json:"name"`
		DB     string `json:"db"`
		Schema string `json:"schema"`
		Table  string `json:"table"`
		TxID   uint32 `json:"txId"`
		// LSN is the change's own LSN (Debezium's meaning).
		LSN  uint64 `json:"lsn"`
		TsMs int64  `json:"ts_ms"`
		// CommitLSN is the transaction's commit LSN, the position's first
		// part. Records of Tidemark before 0.9 lack it; their source.lsn
		// was the commit LSN (see CommitPosLSN).
		CommitLSN uint64 `json:"commit_lsn"`
	} `json:"source"`
	Transaction struct {
		ID         string `json:"id"`
		TotalOrder uint32 `json:"total_order"`
	} `json:"transaction"`
}

// ParseEnvelope decodes and checks a change envelope: it must be a JSON
// object with a known op, source.schema and source.table, and a position
// (source.commit_lsn, transaction.total_order); a transaction.id, when
// present, must agree with source.txId and source.commit_lsn. The error names what is
// wrong.
func ParseEnvelope(b []byte) (*Envelope, error) {
	var e Envelope
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, jsonError("envelope", err)
	}
	if !isObject(b) {
		return nil, errors.New("envelope is not a JSON object")
	}
	switch {
	case e.Op == "":
		return nil, errors.New("envelope lacks op")
	case !validOp(e.Op):
		return nil, fmt.Errorf("envelope has unknown op %q (want c, u, d, r or t)", e.Op)
	case e.Source == (Envelope{}).Source:
		return nil, errors.New("envelope has no source block")
	case e.Source.Schema == "":
		return nil, errors.New("envelope lacks source.schema")
	case e.Source.Table == "":
		return nil, errors.New("envelope lacks source.table")
	case e.CommitPosLSN() == 0:
		return nil, errors.New("envelope lacks its position: source.commit_lsn (the commit LSN) is missing or 0")
	case e.Transaction.TotalOrder == 0:
		return nil, errors.New("envelope lacks its position: transaction.total_order is missing or 0")
	}
	if err := checkTxnID(e.Transaction.ID, e.Source.TxID, e.CommitPosLSN()); err != nil {
		return nil, fmt.Errorf("envelope transaction.id: %w", err)
	}
	return &e, nil
}

func validOp(s string) bool {
	if len(s) != 1 {
		return false
	}
	switch Op(s[0]) {
	case OpCreate, OpUpdate, OpDelete, OpRead, OpTruncate:
		return true
	}
	return false
}

// isObject reports whether b, valid JSON, is an object.
func isObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{'
}

// jsonError explains a json.Unmarshal error of what (a record kind): a
// syntax error, or a field of the wrong type named by its path.
func jsonError(what string, err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		if te.Field == "" {
			return fmt.Errorf("%s is not a JSON object (got %s)", what, te.Value)
		}
		return fmt.Errorf("%s field %s: got %s, want %s", what, te.Field, te.Value, jsonKind(te.Type))
	}
	return fmt.Errorf("%s is not valid JSON: %w", what, err)
}

// jsonKind describes the JSON values a Go type accepts.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n := uint64(1) << (t.Bits() - 1)
		return fmt.Sprintf("an integer from -%d to %d", n, n-1)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return fmt.Sprintf("an integer from 0 to %d", uint64(math.MaxUint64)>>(64-t.Bits()))
	}
	return t.String()
}

// checkTxnID checks a transaction id ("txId:lsn", as the encoder writes it;
// empty when absent) against the record's txId (0 when absent) and commit
// LSN.
func checkTxnID(id string, xid uint32, lsn uint64) error {
	if id == "" {
		return nil
	}
	x, l, ok := strings.Cut(id, ":")
	xv, err1 := strconv.ParseUint(x, 10, 32)
	lv, err2 := strconv.ParseUint(l, 10, 64)
	switch {
	case !ok || err1 != nil || err2 != nil:
		return fmt.Errorf("%q is not txId:lsn", id)
	case lv != lsn:
		return fmt.Errorf("%q names commit LSN %d, the record says %d", id, lv, lsn)
	case xid != 0 && uint32(xv) != xid:
		return fmt.Errorf("%q names txId %d, the record says %d", id, xv, xid)
	}
	return nil
}

// Table returns "schema.table".
func (e *Envelope) Table() string { return e.Source.Schema + "." + e.Source.Table }

// CommitPosLSN returns the transaction's commit LSN: source.commit_lsn,
// or source.lsn in records written before commit_lsn existed (when
// source.lsn was the commit LSN).
func (e *Envelope) CommitPosLSN() uint64 {
	if e.Source.CommitLSN != 0 {
		return e.Source.CommitLSN
	}
	return e.Source.LSN
}

// Position returns the change's position.
func (e *Envelope) Position() Position {
	return Position{CommitLSN: LSN(e.CommitPosLSN()), Seq: e.Transaction.TotalOrder - 1}
}

// Text returns a column's value as text for cache keys: strings unquoted,
// numbers and booleans as written; ok is false for NULL, absent and
// unchanged columns.
func Text(img map[string]json.RawMessage, col string) (string, bool) {
	raw, ok := img[col]
	if !ok || len(raw) == 0 || string(raw) == "null" {
		return "", false
	}
	if raw[0] == '"' {
		if len(raw) >= 2 && raw[len(raw)-1] == '"' && !bytes.ContainsAny(raw[1:len(raw)-1], "\\\"") {
			return string(raw[1 : len(raw)-1]), true // no escapes: the bytes are the text
		}
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", false
		}
		return s, true
	}
	return string(raw), true
}

// DatumText returns a value's text as Text reads it from an envelope:
// strings unquoted, numbers and booleans as written; ok is false for NULL,
// absent and unchanged values.
func DatumText(d *Datum) (string, bool) {
	switch {
	case d.Absent || d.Unchanged || (!d.IsText && !d.IsInt && d.Value == nil):
		return "", false
	case d.IsText:
		return d.Text, true
	case d.IsInt:
		return strconv.FormatInt(d.Int, 10), true
	}
	if s, ok := d.Value.(string); ok {
		return s, true
	}
	raw := AppendValue(nil, d.Value)
	return Text(map[string]json.RawMessage{"v": raw}, "v")
}

// ParsePositionHeaders reads tidemark-lsn and tidemark-seq.
func ParsePositionHeaders(lsn, seq string) (Position, error) {
	l, err := strconv.ParseUint(lsn, 10, 64)
	if err != nil {
		return Position{}, fmt.Errorf("header tidemark-lsn %q: %w", lsn, err)
	}
	s, err := strconv.ParseUint(seq, 10, 32)
	if err != nil {
		return Position{}, fmt.Errorf("header tidemark-seq %q: %w", seq, err)
	}
	return Position{CommitLSN: LSN(l), Seq: uint32(s)}, nil
}
