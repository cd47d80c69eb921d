package pipeline

import (
	"encoding/base64"
	"fmt"
	"math"
	"strconv"
	"time"
	"unicode/utf8"
)

// EnvelopeSource is the static part of the envelope's "source" block.
type EnvelopeSource struct {
	Name     string // the topic prefix
	Database string
	Version  string // Tidemark's version (source.version)
	Modes    ValueModes
}

// maxSafeInt is 2^53: integers beyond it are emitted as JSON strings so that
// consumers parsing numbers as float64 do not lose precision.
const maxSafeInt = 1 << 53

// AppendEnvelope appends the Debezium-compatible JSON envelope (DESIGN §3) for
// one change to dst. op, before and after may differ from ch's when a key
// change is split into a delete and a create. dataCollectionOrder is the
// change's 1-based index among the transaction's changes to the same table.
func AppendEnvelope(dst []byte, src EnvelopeSource, txn *TxnInfo, ch *Change, op Op, before, after Tuple,
	pos Position, dataCollectionOrder int, now time.Time) []byte {
	return newEnvelopeLayout(src, ch.Rel).append(dst, newTxnDigits(txn), ch, op, before, after, pos, dataCollectionOrder, now)
}

// envelopeLayout holds the parts of a relation's envelopes that do not
// change from row to row, already in JSON.
type envelopeLayout struct {
	rel     *Relation
	colKeys [][]byte // `"name":` per column
	colName [][]byte // `"name"` per column (for "unchanged")
	source  []byte   // `,"source":{...,"table":"t","txId":`
	kinds   []uint8  // per column, how its values are written (ValueModes); nil: all default
}

func newEnvelopeLayout(src EnvelopeSource, rel *Relation) *envelopeLayout {
	l := &envelopeLayout{rel: rel, colKeys: make([][]byte, len(rel.Columns)), colName: make([][]byte, len(rel.Columns))}
	for i, c := range rel.Columns {
		name := AppendJSONString(nil, c.Name)
		l.colName[i] = name
		l.colKeys[i] = append(name[:len(name):len(name)], ':')
		if k := columnKind(c, src.Modes); k != kindDefault {
			if l.kinds == nil {
				l.kinds = make([]uint8, len(rel.Columns))
			}
			l.kinds[i] = k
		}
	}
	version := src.Version
	if version == "" {
		version = "dev"
	}
	b := append([]byte(nil), `,"source":{"version":`...)
	b = AppendJSONString(b, version)
	b = append(b, `,"connector":"tidemark","name":`...)
	b = AppendJSONString(b, src.Name)
	b = append(b, `,"db":`...)
	b = AppendJSONString(b, src.Database)
	b = append(b, `,"schema":`...)
	b = AppendJSONString(b, rel.Schema)
	b = append(b, `,"table":`...)
	b = AppendJSONString(b, rel.Table)
	l.source = append(b, `,"txId":`...)
	return l
}

// txnDigits holds a transaction's numbers in decimal, computed once for all
// of its changes.
type txnDigits struct {
	xid, lsn, commitMs, commitUs, commitNs []byte
	commitLSN                              LSN
	// prev is source.sequence's first element: `"<LSN>"`, or null when
	// the last commit before the transaction is not known.
	prev []byte
}

func newTxnDigits(txn *TxnInfo) *txnDigits {
	b := strconv.AppendUint(make([]byte, 0, 96), uint64(txn.Xid), 10)
	x := len(b)
	b = strconv.AppendUint(b, uint64(txn.CommitLSN), 10)
	l := len(b)
	b = strconv.AppendInt(b, txn.CommitTime.UnixMilli(), 10)
	m := len(b)
	b = strconv.AppendInt(b, txn.CommitTime.UnixMicro(), 10)
	u := len(b)
	b = strconv.AppendInt(b, txn.CommitTime.UnixMicro()*1000, 10)
	n := len(b)
	if txn.PrevEndLSN != 0 {
		b = append(b, `\"`...) // inside the sequence string
		b = strconv.AppendUint(b, uint64(txn.PrevEndLSN), 10)
		b = append(b, `\"`...)
	} else {
		b = append(b, "null"...)
	}
	return &txnDigits{xid: b[:x:x], lsn: b[x:l:l], commitMs: b[l:m:m], commitUs: b[m:u:u], commitNs: b[u:n:n], prev: b[n:], commitLSN: txn.CommitLSN}
}

func (l *envelopeLayout) append(dst []byte, txn *txnDigits, ch *Change, op Op, before, after Tuple,
	pos Position, dataCollectionOrder int, now time.Time) []byte {
	dst = append(dst, `{"before":`...)
	dst = l.appendImage(dst, before)
	dst = append(dst, `,"after":`...)
	dst = l.appendImage(dst, after)
	if after != nil {
		first := true
		for i := range after {
			if after[i].Unchanged {
				if first {
					dst = append(dst, `,"unchanged":[`...)
					first = false
				} else {
					dst = append(dst, ',')
				}
				dst = append(dst, l.colName[i]...)
			}
		}
		if !first {
			dst = append(dst, ']')
		}
	}
	dst = append(dst, `,"op":"`...)
	dst = append(dst, byte(op))
	ns := now.UnixNano()
	dst = append(dst, `","ts_ms":`...)
	dst = strconv.AppendInt(dst, ns/1e6, 10)
	dst = append(dst, `,"ts_us":`...)
	dst = strconv.AppendInt(dst, ns/1e3, 10)
	dst = append(dst, `,"ts_ns":`...)
	dst = strconv.AppendInt(dst, ns, 10)
	// source.lsn is the change's own LSN and source.sequence is [the end
	// of the last commit before this transaction, the change's LSN], as
	// Debezium writes them; source.commit_lsn is the position's LSN.
	at := ch.WALLSN
	if at == 0 {
		at = txn.commitLSN
	}
	dst = append(dst, l.source...)
	dst = append(dst, txn.xid...)
	dst = append(dst, `,"lsn":`...)
	dst = strconv.AppendUint(dst, uint64(at), 10)
	dst = append(dst, `,"xmin":null,"sequence":"[`...)
	dst = append(dst, txn.prev...)
	dst = append(dst, `,\"`...)
	dst = strconv.AppendUint(dst, uint64(at), 10)
	dst = append(dst, `\"]","ts_ms":`...)
	dst = append(dst, txn.commitMs...)
	dst = append(dst, `,"ts_us":`...)
	dst = append(dst, txn.commitUs...)
	dst = append(dst, `,"ts_ns":`...)
	dst = append(dst, txn.commitNs...)
	dst = append(dst, `,"commit_lsn":`...)
	dst = append(dst, txn.lsn...)
	if op == OpRead {
		switch ch.Snapshot {
		case SnapshotFirst:
			dst = append(dst, `,"snapshot":"first"},"transaction":{"id":"`...)
		case SnapshotLast:
			dst = append(dst, `,"snapshot":"last"},"transaction":{"id":"`...)
		case SnapshotIncremental, SnapshotIncrementalFirst:
			dst = append(dst, `,"snapshot":"incremental"},"transaction":{"id":"`...)
		default:
			dst = append(dst, `,"snapshot":"true"},"transaction":{"id":"`...)
		}
	} else {
		dst = append(dst, `,"snapshot":"false"},"transaction":{"id":"`...)
	}
	dst = append(dst, txn.xid...)
	dst = append(dst, ':')
	dst = append(dst, txn.lsn...)
	dst = append(dst, `","total_order":`...)
	dst = strconv.AppendUint(dst, uint64(pos.Seq)+1, 10)
	dst = append(dst, `,"data_collection_order":`...)
	dst = strconv.AppendInt(dst, int64(dataCollectionOrder), 10)
	dst = append(dst, `}}`...)
	return dst
}

func (l *envelopeLayout) appendImage(dst []byte, t Tuple) []byte {
	if t == nil {
		return append(dst, "null"...)
	}
	dst = append(dst, '{')
	first := true
	for i := range t {
		if t[i].Unchanged || t[i].Absent {
			continue
		}
		if !first {
			dst = append(dst, ',')
		}
		first = false
		if i < len(l.colKeys) {
			dst = append(dst, l.colKeys[i]...)
		} else {
			dst = AppendJSONString(dst, l.rel.Columns[i].Name)
			dst = append(dst, ':')
		}
		if l.kinds != nil && i < len(l.kinds) && l.kinds[i] != kindDefault {
			var ok bool
			if dst, ok = appendKind(dst, l.kinds[i], &t[i]); ok {
				continue
			}
		}
		dst = appendDatum(dst, &t[i])
	}
	return append(dst, '}')
}

// plainASCII marks the bytes AppendJSONString copies without escaping or
// UTF-8 validation.
var plainASCII = func() (t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// AppendKey appends a JSON object of the named columns' values from t, in
// the given column order: {"room_id":"!r1"}. ok is false when a column is
// absent or unchanged in t.
func AppendKey(dst []byte, rel *Relation, t Tuple, cols []int) (out []byte, ok bool) {
	dst = append(dst, '{')
	for n, i := range cols {
		if i >= len(t) || t[i].Absent || t[i].Unchanged {
			return dst, false
		}
		if n > 0 {
			dst = append(dst, ',')
		}
		dst = AppendJSONString(dst, rel.Columns[i].Name)
		dst = append(dst, ':')
		dst = appendDatum(dst, &t[i])
	}
	return append(dst, '}'), true
}

// appendDatum appends the JSON form of a datum's value.
func appendDatum(dst []byte, d *Datum) []byte {
	switch {
	case d.IsText:
		return AppendJSONString(dst, d.Text)
	case d.IsInt:
		return appendInt(dst, d.Int)
	}
	return AppendValue(dst, d.Value)
}

// appendInt writes integers beyond ±2^53 as strings (see AppendValue).
func appendInt(dst []byte, x int64) []byte {
	if x > maxSafeInt || x < -maxSafeInt {
		dst = append(dst, '"')
		dst = strconv.AppendInt(dst, x, 10)
		return append(dst, '"')
	}
	return strconv.AppendInt(dst, x, 10)
}

// AppendValue appends the JSON form of one column value (see Datum for the
// value set): integers beyond 2^53 and numerics beyond float64's exact range
// become strings; NaN and infinities become "NaN", "Infinity", "-Infinity";
// bytea is base64; json is embedded; timestamptz is ISO-8601 in UTC.
func AppendValue(dst []byte, v any) []byte {
	switch x := v.(type) {
	case nil:
		return append(dst, "null"...)
	case bool:
		return strconv.AppendBool(dst, x)
	case int64:
		return appendInt(dst, x)
	case int32:
		return strconv.AppendInt(dst, int64(x), 10)
	case int16:
		return strconv.AppendInt(dst, int64(x), 10)
	case int:
		return AppendValue(dst, int64(x))
	case float64:
		return appendFloat(dst, x, 64)
	case float32:
		return appendFloat(dst, float64(x), 32)
	case string:
		return AppendJSONString(dst, x)
	case []byte:
		dst = append(dst, '"')
		dst = base64.StdEncoding.AppendEncode(dst, x)
		return append(dst, '"')
	case time.Time:
		dst = append(dst, '"')
		dst = x.UTC().AppendFormat(dst, time.RFC3339Nano)
		return append(dst, '"')
	case Timestamp:
		dst = append(dst, '"')
		dst = x.Time.AppendFormat(dst, "2006-01-02T15:04:05.999999999")
		return append(dst, '"')
	case Date:
		dst = append(dst, '"')
		dst = x.Time.AppendFormat(dst, "2006-01-02")
		return append(dst, '"')
	case Decimal:
		if decimalFitsFloat(string(x)) {
			return append(dst, x...)
		}
		return AppendJSONString(dst, string(x))
	case JSON:
		if len(x) == 0 {
			return append(dst, "null"...)
		}
		return append(dst, x...)
	case []any:
		dst = append(dst, '[')
		for i, e := range x {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = AppendValue(dst, e)
		}
		return append(dst, ']')
	default:
		return AppendJSONString(dst, fmt.Sprint(x))
	}
}

func appendFloat(dst []byte, f float64, bits int) []byte {
	switch {
	case math.IsNaN(f):
		return append(dst, `"NaN"`...)
	case math.IsInf(f, 1):
		return append(dst, `"Infinity"`...)
	case math.IsInf(f, -1):
		return append(dst, `"-Infinity"`...)
	}
	return strconv.AppendFloat(dst, f, 'g', -1, bits)
}

// decimalFitsFloat reports whether s is a plain decimal ("-12.340") with at
// most 15 significant digits, so that any JSON parser reading it as a float64
// gets the exact value back when printing it.
func decimalFitsFloat(s string) bool {
	if s == "" {
		return false
	}
	i := 0
	if s[0] == '-' {
		i = 1
	}
	if i == len(s) {
		return false
	}
	digits, sig, dot, leading := 0, 0, false, true
	for ; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if dot || digits == 0 {
				return false
			}
			dot = true
		case c >= '0' && c <= '9':
			digits++
			if c != '0' || !leading {
				leading = false
				sig++
			}
		default:
			return false
		}
	}
	if s[len(s)-1] == '.' {
		return false
	}
	// Leading zeros ("007") are not valid JSON numbers.
	start := 0
	if s[0] == '-' {
		start = 1
	}
	if len(s) > start+1 && s[start] == '0' && s[start+1] != '.' {
		return false
	}
	return sig <= 15
}

const hexDigits = "0123456789abcdef"

// AppendJSONString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func AppendJSONString(dst []byte, s string) []byte {
	// Fast path: printable ASCII without quotes or backslashes (most
	// identifiers and text) is copied as is.
	i := 0
	for i < len(s) && plainASCII[s[i]] {
		i++
	}
	if i == len(s) {
		dst = append(dst, '"')
		dst = append(dst, s...)
		return append(dst, '"')
	}
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// appendRows appends the "rows" form of a change (Debezium's
// ExtractNewRecordState with delete rewriting): the new row (for a delete,
// the old one) flattened, plus "__op", "__deleted" ("true" for a delete),
// "__lsn" (the change's LSN) and "__ts_ms" (the commit time).
func (l *envelopeLayout) appendRows(dst []byte, txn *txnDigits, ch *Change, op Op, before, after Tuple) []byte {
	img, deleted := after, op == OpDelete
	if deleted || img == nil {
		img = before
	}
	if img == nil {
		dst = append(dst, '{')
	} else if dst = l.appendImage(dst, img); dst[len(dst)-2] != '{' {
		dst[len(dst)-1] = ','
	} else {
		dst = dst[:len(dst)-1]
	}
	dst = append(dst, `"__op":"`...)
	dst = append(dst, byte(op))
	if deleted {
		dst = append(dst, `","__deleted":"true","__lsn":`...)
	} else {
		dst = append(dst, `","__deleted":"false","__lsn":`...)
	}
	at := ch.WALLSN
	if at == 0 {
		at = txn.commitLSN
	}
	dst = strconv.AppendUint(dst, uint64(at), 10)
	dst = append(dst, `,"__ts_ms":`...)
	dst = append(dst, txn.commitMs...)
	return append(dst, '}')
}
