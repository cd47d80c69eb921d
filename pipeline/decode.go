package pipeline

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
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
		LSN    uint64 `json:"lsn"`
		TsMs   int64  `json:"ts_ms"`
	} `json:"source"`
	Transaction struct {
		ID         string `json:"id"`
		TotalOrder uint32 `json:"total_order"`
	} `json:"transaction"`
}

// ParseEnvelope decodes and checks a change envelope.
func ParseEnvelope(b []byte) (*Envelope, error) {
	var e Envelope
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, fmt.Errorf("envelope is not valid JSON: %w", err)
	}
	switch Op(opByte(e.Op)) {
	case OpCreate, OpUpdate, OpDelete, OpRead, OpTruncate:
	default:
		return nil, fmt.Errorf("envelope has unknown op %q", e.Op)
	}
	if e.Source.Table == "" || e.Source.Schema == "" {
		return nil, errors.New("envelope lacks source.schema or source.table")
	}
	if e.Transaction.TotalOrder == 0 || e.Source.LSN == 0 {
		return nil, errors.New("envelope lacks its position (source.lsn, transaction.total_order)")
	}
	return &e, nil
}

func opByte(s string) byte {
	if len(s) != 1 {
		return 0
	}
	return s[0]
}

// Table returns "schema.table".
func (e *Envelope) Table() string { return e.Source.Schema + "." + e.Source.Table }

// Position returns the change's position.
func (e *Envelope) Position() Position {
	return Position{CommitLSN: LSN(e.Source.LSN), Seq: e.Transaction.TotalOrder - 1}
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
