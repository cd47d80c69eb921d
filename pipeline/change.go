// Package pipeline is the hub of Tidemark: the change model, positions,
// routing and keys, the Debezium-compatible envelope, the Source and Sink
// contracts, and the run loop that hands changes to sinks in order and
// acknowledges durable positions back to the source.
//
// Data flows one way: a Source (capture) produces Events; the Pipeline turns
// them into Messages and writes them to a Sink; once a Sink has made a
// transaction durable, the Pipeline calls Source.Ack with the transaction's
// end LSN. pipeline imports no client library.
package pipeline

import (
	"fmt"
	"regexp"
	"strconv"
	"time"
)

// LSN is a Postgres WAL position.
type LSN uint64

// String renders the LSN the way Postgres does (e.g. "16/B374D848").
func (l LSN) String() string { return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l)) }

// ParseLSN parses the "X/Y" form.
func ParseLSN(s string) (LSN, error) {
	var hi, lo uint32
	if _, err := fmt.Sscanf(s, "%X/%X", &hi, &lo); err != nil {
		return 0, fmt.Errorf("parsing LSN %q: %w", s, err)
	}
	return LSN(uint64(hi)<<32 | uint64(lo)), nil
}

// Position identifies one change: the commit LSN of its transaction and its
// 0-based index among the changes Tidemark emits for that transaction.
// Positions increase strictly in commit order and are identical when a change
// is delivered again.
type Position struct {
	CommitLSN LSN
	Seq       uint32
}

// Less reports whether p sorts before q.
func (p Position) Less(q Position) bool {
	return p.CommitLSN < q.CommitLSN || (p.CommitLSN == q.CommitLSN && p.Seq < q.Seq)
}

// String renders "commitLSN:seq" with the LSN in decimal.
func (p Position) String() string {
	return strconv.FormatUint(uint64(p.CommitLSN), 10) + ":" + strconv.FormatUint(uint64(p.Seq), 10)
}

// Op is the kind of a change, using Debezium's letters.
type Op byte

// The change kinds.
const (
	OpCreate   Op = 'c'
	OpUpdate   Op = 'u'
	OpDelete   Op = 'd'
	OpRead     Op = 'r' // snapshot read
	OpTruncate Op = 't'
	// OpMessage is a logical decoding message (pg_logical_emit_message),
	// published with RouterConfig.Messages; Change.Message carries it and
	// Rel is nil.
	OpMessage Op = 'm'
)

// LogicalMessage is a pg_logical_emit_message record.
type LogicalMessage struct {
	Prefix        string
	Content       []byte
	Transactional bool
}

// String returns the one-letter form.
func (o Op) String() string { return string(rune(o)) }

// Column describes one column of a captured table.
type Column struct {
	Name    string
	TypeOID uint32
	// TypeMod is the column's type modifier (atttypmod; -1 for none), e.g.
	// a numeric's declared precision and scale.
	TypeMod int32
	// Key is true when the column keys the table's messages (see the
	// README on keys: the primary key, the replica identity index, a
	// unique index, postgres.key_columns or the whole row).
	Key bool
	// Identity is true when the column is part of the replica identity
	// (pgoutput's flag): old-row key images carry exactly these columns.
	Identity bool
}

// Relation is the shape of a captured table at some point in the WAL. A new
// Relation replaces the old one when the table's schema changes; Changes keep
// a pointer to the shape they were decoded with.
type Relation struct {
	OID     uint32
	Schema  string
	Table   string
	Columns []Column
	// ReplicaIdentity is Postgres' relreplident: 'd' default (primary key),
	// 'n' nothing, 'f' full, 'i' index.
	ReplicaIdentity byte
}

var (
	identRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_$]*$`)
	tableRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$`)
)

// IsIdentifier reports whether s is a plain (unquoted) SQL identifier.
func IsIdentifier(s string) bool { return identRe.MatchString(s) }

// IsQualifiedTable reports whether s is "schema.table" of plain identifiers.
func IsQualifiedTable(s string) bool { return tableRe.MatchString(s) }

// QualifyTable returns t with "public." prepended when it names no schema.
func QualifyTable(t string) string {
	if identRe.MatchString(t) {
		return "public." + t
	}
	return t
}

// QualifiedName returns "schema.table".
func (r *Relation) QualifiedName() string { return r.Schema + "." + r.Table }

// ColumnIndex returns the index of the named column or -1.
func (r *Relation) ColumnIndex(name string) int {
	for i := range r.Columns {
		if r.Columns[i].Name == name {
			return i
		}
	}
	return -1
}

// Datum is one column value of a row image.
//
// Value is nil for SQL NULL, otherwise one of: bool, int64, float32, float64,
// string, []byte (bytea), time.Time (timestamptz), Timestamp (timestamp
// without time zone), Date, Decimal (numeric), JSON (json/jsonb text),
// []any (arrays, elements of these same types). Types without a dedicated Go
// form (enums, uuid, interval, inet, ...) arrive as their Postgres text form
// in a string.
type Datum struct {
	Value any
	// Text holds a text-like value (text, varchar, char, name, uuid) when
	// IsText is set; Value is then nil. Decoders use it so that a string is
	// not boxed in an interface (one allocation per column saved); Get
	// returns either form.
	Text   string
	IsText bool
	// Int holds an integer value (int2, int4, int8) when IsInt is set;
	// Value is then nil (no boxing, as for Text).
	Int   int64
	IsInt bool
	// Unchanged is true for a TOASTed column whose value the update did not
	// change: Postgres did not send it. Value is nil then, and the column is
	// absent from the envelope's "after" and listed in "unchanged".
	Unchanged bool
	// Absent is true for a column the image does not carry (non-key columns
	// of an old-key image).
	Absent bool
}

// Get returns the datum's value: Text when IsText is set, Int when IsInt
// is set, else Value.
func (d *Datum) Get() any {
	switch {
	case d.IsText:
		return d.Text
	case d.IsInt:
		return d.Int
	}
	return d.Value
}

// Tuple is a row image aligned with its Relation's Columns.
type Tuple []Datum

// Decimal is an exact numeric value in Postgres' text form ("12.50", "NaN",
// "Infinity").
type Decimal string

// JSON is the text of a json or jsonb value, embedded verbatim in envelopes.
type JSON []byte

// Date is a calendar date (Postgres date); rendered "2006-01-02". Infinite
// dates arrive as the strings "infinity" / "-infinity".
type Date struct{ time.Time }

// Timestamp is a timestamp without time zone; rendered ISO-8601 without an
// offset, since Postgres stored none.
type Timestamp struct{ time.Time }

// Change is one row change inside a transaction.
type Change struct {
	Op  Op
	Rel *Relation
	// Before is the old image (nil when Postgres sent none); After the new one
	// (nil for deletes and truncates).
	Before, After Tuple
	// WALLSN is the LSN of the change's own WAL record.
	WALLSN LSN
	// Message is the logical decoding message of an OpMessage change.
	Message *LogicalMessage
	// Snapshot marks a snapshot read (Op OpRead): the envelope's
	// source.snapshot is "first", "true" or "last" by it (Debezium's
	// values). Live changes leave it zero ("false").
	Snapshot SnapshotMark
}

// SnapshotMark says where a snapshot row stands in its snapshot.
type SnapshotMark uint8

// The marks: SnapshotRow is any row but the first and the last.
const (
	SnapshotNone SnapshotMark = iota
	SnapshotFirst
	SnapshotRow
	SnapshotLast
	// SnapshotIncremental marks a row of an incremental snapshot
	// (source.snapshot "incremental", Debezium's value); the first row of
	// such a snapshot is SnapshotIncrementalFirst (rendered the same: the
	// mark lets consumers see where a table's snapshot began).
	SnapshotIncremental
	SnapshotIncrementalFirst
)

// TxnInfo describes one transaction. It is shared by the events of the
// transaction; EndLSN is set when the commit has been received.
type TxnInfo struct {
	Xid        uint32
	CommitLSN  LSN
	EndLSN     LSN
	CommitTime time.Time
	// PrevEndLSN is the end of the last commit the source saw before this
	// transaction (Debezium's lastCommitLsn, the first element of
	// source.sequence); 0 when unknown (a snapshot).
	PrevEndLSN LSN
}

// ID is the transaction's identity in envelopes: "xid:commitLSN".
func (t *TxnInfo) ID() string {
	return strconv.FormatUint(uint64(t.Xid), 10) + ":" + strconv.FormatUint(uint64(t.CommitLSN), 10)
}

// EventKind says what an Event carries.
type EventKind uint8

// Event kinds, in the order they arrive for one transaction: Begin, any
// number of Change, Commit. A Begin while another transaction is still open
// means the source reconnected and abandons the open one; it will be
// delivered again, whole.
const (
	EventBegin EventKind = iota + 1
	EventChange
	EventCommit
)

// Event is one item produced by a Source.
type Event struct {
	Kind   EventKind
	Txn    *TxnInfo
	Change Change // for EventChange
}
