package pipeline

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
)

// EntityStream puts several tables into one topic, keyed by a column they
// share, so that everything about one entity (a room) is totally ordered in
// one partition across tables.
type EntityStream struct {
	// Name is the topic suffix: the topic is "<prefix>.<name>".
	Name string `yaml:"name"`
	// Key is the shared column, e.g. room_id.
	Key string `yaml:"key"`
	// Tables are "schema.table" names.
	Tables []string `yaml:"tables"`
}

// RouterConfig says where changes go.
type RouterConfig struct {
	// TopicPrefix prefixes every topic (required).
	TopicPrefix string
	// Database is the envelope's source.db.
	Database string
	// EntityStreams lists the shared-topic streams.
	EntityStreams []EntityStream
	// TableTopics publishes every change to "<prefix>.<schema>.<table>" as
	// well; when false, tables that belong to an entity stream are published
	// only there.
	TableTopics bool
	// TransactionsTopic publishes BEGIN and END records to
	// TransactionTopic.
	TransactionsTopic bool
	// TransactionTopic names the transaction-metadata topic; empty means
	// "<prefix>.transaction" (Debezium's name).
	TransactionTopic string
	// Tombstones follows each delete on a table topic with a tombstone:
	// the same key with a null value (Debezium's tombstones.on.delete), so
	// log compaction removes deleted keys. Entity-stream topics get none: a
	// key there is an entity (a room), not a row.
	Tombstones bool
	// SkipTruncates drops truncates instead of publishing op "t" records
	// (counted in Stats.SkippedTruncates, warned once).
	SkipTruncates bool
	// Version is source.version (Tidemark's version).
	Version string
	// Modes choose how some types are written (see ValueModes).
	Modes ValueModes
	// Filters keep only the rows of a table ("schema.table") that match
	// (postgres.filters), with Postgres' publication row-filter rules for
	// updates: a row that stops matching is published as a delete, one
	// that starts matching as an insert. Dropped changes are counted in
	// Stats.Filtered.
	Filters map[string]RowFilter
	// Messages publishes logical decoding messages (OpMessage changes, which
	// capture sends only then) to MessageTopic as Debezium's op "m"
	// records; "" means "<prefix>.message".
	Messages     bool
	MessageTopic string
	// Columns keeps columns out of records, by "schema.table".
	Columns map[string]ColumnPolicy
	// RowsTables publishes these tables ("schema.table") to their table
	// topics in the "rows" format (see appendRows) instead of envelopes;
	// their truncates are not published there (counted in
	// Stats.SkippedTruncates). Entity streams keep envelopes.
	RowsTables map[string]bool
}

// RowFilter decides whether a row image is published. known is false when
// the image lacks a column the filter needs (an old-key image): the
// change is then published.
type RowFilter interface {
	Match(rel *Relation, t Tuple) (match, known bool)
}

// filterChange applies f to ch: ok is false when the change is not
// published; otherwise out is the change to publish (an update may become
// a delete or an insert).
func filterChange(f RowFilter, ch *Change) (out Change, ok bool) {
	matches := func(t Tuple) bool {
		if t == nil {
			return false
		}
		m, known := f.Match(ch.Rel, t)
		return m || !known
	}
	switch ch.Op {
	case OpCreate, OpRead:
		return *ch, matches(ch.After)
	case OpDelete:
		return *ch, ch.Before == nil || matches(ch.Before)
	case OpUpdate:
		newOK := matches(ch.After)
		if ch.Before == nil {
			if newOK {
				return *ch, true
			}
			// No old row (default identity): it may have matched, so the
			// row leaves as a delete of its key (key columns only: what the
			// filter keeps out is not published).
			c := *ch
			c.Op, c.After, c.Before = OpDelete, nil, keyImage(ch.Rel, ch.After)
			return c, true
		}
		oldOK := matches(ch.Before)
		switch {
		case oldOK && newOK:
			return *ch, true
		case oldOK:
			c := *ch
			c.Op, c.After = OpDelete, nil
			return c, true
		case newOK:
			c := *ch
			c.Op, c.Before = OpCreate, nil
			return c, true
		}
		return *ch, false
	}
	return *ch, true
}

// keyImage is t with only rel's key columns (the others absent).
func keyImage(rel *Relation, t Tuple) Tuple {
	out := make(Tuple, len(t))
	for i := range t {
		if i < len(rel.Columns) && rel.Columns[i].Key {
			out[i] = t[i]
		} else {
			out[i] = Datum{Absent: true}
		}
	}
	return out
}

// ColumnPolicy keeps a table's columns out of its records: an excluded
// column is in no image, key or header (it may not be a key column); a
// masked one is published as the hex SHA-256 of Salt, a zero byte and its
// value's text (NULL stays null), in images and keys alike.
type ColumnPolicy struct {
	Exclude []string
	Mask    []string
	Salt    string
}

// MessageTopicName returns the logical-decoding-message topic.
func (c RouterConfig) MessageTopicName() string {
	if c.MessageTopic != "" {
		return c.MessageTopic
	}
	return c.TopicPrefix + ".message"
}

// TableTopic returns the default topic of a table.
func (c RouterConfig) TableTopic(schema, table string) string {
	return c.TopicPrefix + "." + schema + "." + table
}

// StreamTopic returns an entity stream's topic.
func (c RouterConfig) StreamTopic(s EntityStream) string { return c.TopicPrefix + "." + s.Name }

// TransactionsTopicName returns the transaction-metadata topic.
func (c RouterConfig) TransactionsTopicName() string {
	if c.TransactionTopic != "" {
		return c.TransactionTopic
	}
	return c.TopicPrefix + ".transaction"
}

// Topics returns every topic the router can write to for the given tables.
func (c RouterConfig) Topics(tables []string) []string {
	var out []string
	inStream := map[string]bool{}
	for _, s := range c.EntityStreams {
		out = append(out, c.StreamTopic(s))
		for _, t := range s.Tables {
			inStream[t] = true
		}
	}
	for _, t := range tables {
		if c.TableTopics || !inStream[t] {
			out = append(out, c.TopicPrefix+"."+t)
		}
	}
	if c.TransactionsTopic {
		out = append(out, c.TransactionsTopicName())
	}
	if c.Messages {
		out = append(out, c.MessageTopicName())
	}
	return out
}

type route struct {
	topic   string
	keyCols []int // nil: no key
	stream  string
	rows    bool // the "rows" format (RouterConfig.RowsTables)
}

// Router maps changes to topics and keys. It is used by one goroutine.
type Router struct {
	cfg       RouterConfig
	byName    map[string][]EntityStream
	cache     map[uint32]*relInfo // by relation OID; see info
	scratch   []byte
	slab      []byte      // see headerSet
	headers   []headerSet // unused part of the current header chunk
	kscratch  []byte      // keyChanged's scratch
	kscratch2 []byte
	txnTopic  string
	msgTopic  string
	// skippedTruncates counts truncates left out of rows-format topics.
	skippedTruncates uint64
	// counts gives a table's counters (the pipeline's Stats); nil: none.
	counts func(table string) *TableCounts
}

// relInfo is what the router derives once per relation shape.
type relInfo struct {
	rel       *Relation // the shape it was derived from
	routes    []route
	name      string // schema.table
	nameBytes []byte
	layout    *envelopeLayout
	// exclude and mask are column indexes (ColumnPolicy); salt is the
	// mask's.
	exclude, mask []int
	salt          string
	rows          bool         // a route uses the rows format
	counts        *TableCounts // nil without Router.counts
}

// NewRouter builds a Router.
func NewRouter(cfg RouterConfig) *Router {
	r := &Router{cfg: cfg, byName: map[string][]EntityStream{}, cache: map[uint32]*relInfo{}, txnTopic: cfg.TransactionsTopicName(), msgTopic: cfg.MessageTopicName()}
	for _, s := range cfg.EntityStreams {
		for _, t := range s.Tables {
			r.byName[t] = append(r.byName[t], s)
		}
	}
	return r
}

// info returns what the router derives from rel. Capture builds a new
// *Relation whenever Postgres sends a Relation message (after DDL, and
// again after every reconnect), so the cache keeps one entry per relation
// OID, replaced when the shape changes: it stays as small as the set of
// captured tables however long the process runs.
func (r *Router) info(rel *Relation) (*relInfo, error) {
	if ri, ok := r.cache[rel.OID]; ok && ri.rel == rel {
		return ri, nil
	}
	var rs []route
	streams := r.byName[rel.QualifiedName()]
	for _, s := range streams {
		i := rel.ColumnIndex(s.Key)
		if i < 0 {
			return nil, fmt.Errorf("entity stream %q: table %s has no column %q", s.Name, rel.QualifiedName(), s.Key)
		}
		rs = append(rs, route{topic: r.cfg.StreamTopic(s), keyCols: []int{i}, stream: s.Name})
	}
	if r.cfg.TableTopics || len(streams) == 0 {
		var keys []int
		for i, c := range rel.Columns {
			if c.Key {
				keys = append(keys, i)
			}
		}
		rs = append(rs, route{topic: r.cfg.TableTopic(rel.Schema, rel.Table), keyCols: keys, rows: r.cfg.RowsTables[rel.QualifiedName()]})
	}
	name := rel.QualifiedName()
	ri := &relInfo{rel: rel, routes: rs, name: name, nameBytes: []byte(name),
		layout: newEnvelopeLayout(EnvelopeSource{Name: r.cfg.TopicPrefix, Database: r.cfg.Database, Version: r.cfg.Version, Modes: r.cfg.Modes}, rel)}
	for _, rt := range rs {
		ri.rows = ri.rows || rt.rows
	}
	if r.counts != nil {
		ri.counts = r.counts(name)
	}
	if cp, ok := r.cfg.Columns[name]; ok {
		ri.salt = cp.Salt
		for _, c := range cp.Exclude {
			i := rel.ColumnIndex(c)
			if i < 0 {
				continue // not published, or gone: nothing to keep out
			}
			for _, rt := range rs {
				if slices.Contains(rt.keyCols, i) {
					return nil, fmt.Errorf("postgres.columns.%s.exclude: %q keys the messages of topic %s; "+
						"a key column cannot be excluded: mask it, or key the table by other columns (postgres.key_columns)", name, c, rt.topic)
				}
			}
			ri.exclude = append(ri.exclude, i)
		}
		for _, c := range cp.Mask {
			if i := rel.ColumnIndex(c); i >= 0 {
				ri.mask = append(ri.mask, i)
			}
		}
	}
	r.cache[rel.OID] = ri
	return ri, nil
}

// applyPolicy returns t with the relation's excluded columns absent and
// its masked ones hashed: a copy, so that the source's tuple is left as
// it is (t itself when the table has no policy).
func (ri *relInfo) applyPolicy(t Tuple) Tuple {
	if t == nil || (len(ri.exclude) == 0 && len(ri.mask) == 0) {
		return t
	}
	out := slices.Clone(t)
	for _, i := range ri.exclude {
		if i < len(out) {
			out[i] = Datum{Absent: true}
		}
	}
	for _, i := range ri.mask {
		if i >= len(out) {
			continue
		}
		d := &out[i]
		if d.Absent || d.Unchanged || (!d.IsText && !d.IsInt && d.Value == nil) {
			continue
		}
		*d = Datum{Text: maskText(ri.salt, d), IsText: true}
	}
	return out
}

// maskText is the hex SHA-256 of salt, a zero byte and d's text.
func maskText(salt string, d *Datum) string {
	h := sha256.New()
	h.Write([]byte(salt))
	h.Write([]byte{0})
	switch {
	case d.IsText:
		h.Write([]byte(d.Text))
	case d.IsInt:
		h.Write(strconv.AppendInt(nil, d.Int, 10))
	default:
		// The same text whichever form a decoder chose (the stream keeps
		// text and integers unboxed, a snapshot may box them).
		switch v := d.Value.(type) {
		case string:
			h.Write([]byte(v))
		case int64:
			h.Write(strconv.AppendInt(nil, v, 10))
		case int32:
			h.Write(strconv.AppendInt(nil, int64(v), 10))
		case int16:
			h.Write(strconv.AppendInt(nil, int64(v), 10))
		default:
			h.Write(AppendValue(nil, d.Value))
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// txnState accumulates what the END record needs.
type txnState struct {
	info   *TxnInfo
	digits *txnDigits // set by the first change
	seq    uint32
	tables []tableCount
	begun  bool // its BEGIN record is queued
	// msgs numbers the transaction's logical messages: their positions
	// are (commit LSN, messageSeq + n), apart from its changes', which
	// the END record counts.
	msgs uint32
}

// messageSeq is where the positions of a transaction's logical messages
// start (far above any change's).
const messageSeq = 1 << 31

type tableCount struct {
	name  string
	count int
}

func (s *txnState) bump(name string) int {
	for i := range s.tables {
		if s.tables[i].name == name {
			s.tables[i].count++
			return s.tables[i].count
		}
	}
	s.tables = append(s.tables, tableCount{name, 1})
	return 1
}

// encodeChange turns one change into messages, assigning positions. An
// update that changes a routing key (the replica identity, or an entity
// stream's key) becomes a delete of the old row followed by a create of the
// new one, each with its own position, so that every key's stream stays
// complete and compacted topics drop the old key.
func (r *Router) encodeChange(dst []Message, st *txnState, ch *Change, now time.Time) ([]Message, error) {
	ri, err := r.info(ch.Rel)
	if err != nil {
		return dst, err
	}
	if ri.counts != nil {
		ri.counts.add(ch.Op)
	}
	if ri.exclude != nil || ri.mask != nil {
		c := *ch
		c.Before, c.After = ri.applyPolicy(ch.Before), ri.applyPolicy(ch.After)
		ch = &c
	}
	if ch.Op == OpUpdate && ch.Before != nil && r.keyChanged(ri.routes, ch) {
		// Debezium's key-change headers: the delete names the new key
		// (__debezium.newkey), the create the old one (__debezium.oldkey),
		// each route in its own key.
		n := len(dst)
		if dst, err = r.emit(dst, st, ch, OpDelete, ch.Before, nil, ri, now); err != nil {
			return dst, err
		}
		m := len(dst)
		if dst, err = r.emit(dst, st, ch, OpCreate, nil, ch.After, ri, now); err != nil {
			return dst, err
		}
		r.keyChangeHeaders(dst[n:m], dst[m:])
		return dst, nil
	}
	return r.emit(dst, st, ch, ch.Op, ch.Before, ch.After, ri, now)
}

// encodeMessage publishes a logical decoding message as Debezium's op "m"
// record, keyed by its prefix.
func (r *Router) encodeMessage(dst []Message, st *txnState, ch *Change, now time.Time) []Message {
	m := ch.Message
	// A transactional message takes (commit LSN, 2^31 + n). A
	// non-transactional one is a transaction of its own at its LSN, which
	// may be the commit LSN of the transaction that follows it: it takes
	// (LSN, 0), below that transaction's messages.
	pos := Position{CommitLSN: st.info.CommitLSN, Seq: messageSeq + st.msgs}
	if !m.Transactional {
		pos.Seq = st.msgs
	}
	st.msgs++
	if st.digits == nil {
		st.digits = newTxnDigits(st.info)
	}
	d := st.digits
	b := make([]byte, 0, 512+len(m.Content)*4/3)
	b = append(b, `{"op":"m"`...)
	ns := now.UnixNano()
	b = append(b, `,"ts_ms":`...)
	b = strconv.AppendInt(b, ns/1e6, 10)
	b = append(b, `,"ts_us":`...)
	b = strconv.AppendInt(b, ns/1e3, 10)
	b = append(b, `,"ts_ns":`...)
	b = strconv.AppendInt(b, ns, 10)
	version := r.cfg.Version
	if version == "" {
		version = "dev"
	}
	b = append(b, `,"source":{"version":`...)
	b = AppendJSONString(b, version)
	b = append(b, `,"connector":"tidemark","name":`...)
	b = AppendJSONString(b, r.cfg.TopicPrefix)
	b = append(b, `,"db":`...)
	b = AppendJSONString(b, r.cfg.Database)
	b = append(b, `,"schema":"","table":"","txId":`...)
	if m.Transactional {
		b = append(b, d.xid...)
	} else {
		b = append(b, "null"...)
	}
	b = append(b, `,"lsn":`...)
	b = strconv.AppendUint(b, uint64(ch.WALLSN), 10)
	b = append(b, `,"xmin":null,"sequence":"[`...)
	b = append(b, d.prev...)
	b = append(b, `,\"`...)
	b = strconv.AppendUint(b, uint64(ch.WALLSN), 10)
	b = append(b, `\"]","ts_ms":`...)
	b = append(b, d.commitMs...)
	b = append(b, `,"ts_us":`...)
	b = append(b, d.commitUs...)
	b = append(b, `,"ts_ns":`...)
	b = append(b, d.commitNs...)
	b = append(b, `,"commit_lsn":`...)
	b = append(b, d.lsn...)
	b = append(b, `,"snapshot":"false"},"message":{"prefix":`...)
	b = AppendJSONString(b, m.Prefix)
	b = append(b, `,"content":"`...)
	b = base64.StdEncoding.AppendEncode(b, m.Content)
	b = append(b, `"}}`...)
	valueEnd := len(b)
	b = append(b, `{"prefix":`...)
	b = AppendJSONString(b, m.Prefix)
	b = append(b, '}')
	keyEnd := len(b)
	b = append(b, d.lsn...)
	lsnEnd := len(b)
	b = strconv.AppendUint(b, uint64(pos.Seq), 10)
	hs := []Header{
		{Key: "tidemark-op", Value: opBytes[OpMessage]},
		{Key: "tidemark-lsn", Value: b[keyEnd:lsnEnd:lsnEnd]},
		{Key: "tidemark-seq", Value: b[lsnEnd:]},
	}
	return append(dst, Message{Topic: r.msgTopic, Key: b[valueEnd:keyEnd:keyEnd], Value: b[:valueEnd:valueEnd], Headers: hs, Pos: pos})
}

// keyChangeHeaders adds __debezium.newkey to the delete half of a key
// change and __debezium.oldkey to its create half. dels and creates are
// the messages of each half: per route, the change record then, on the
// delete half, its tombstone; both halves list the routes in order.
func (r *Router) keyChangeHeaders(dels, creates []Message) {
	var newKeys [][]byte
	for i := range creates {
		newKeys = append(newKeys, creates[i].Key)
	}
	var oldKeys [][]byte
	ci := 0
	for i := range dels {
		if dels[i].Value == nil {
			continue // a tombstone carries no headers of its own
		}
		if ci < len(newKeys) {
			dels[i].Headers = withHeader(dels[i].Headers, "__debezium.newkey", newKeys[ci])
		}
		oldKeys = append(oldKeys, dels[i].Key)
		ci++
	}
	for i := range creates {
		if i < len(oldKeys) {
			creates[i].Headers = withHeader(creates[i].Headers, "__debezium.oldkey", oldKeys[i])
		}
	}
}

// withHeader returns hs plus one header, in a new slice (header sets are
// shared by a change's messages).
func withHeader(hs []Header, k string, v []byte) []Header {
	out := make([]Header, len(hs), len(hs)+1)
	copy(out, hs)
	return append(out, Header{Key: k, Value: v})
}

func (r *Router) keyChanged(rs []route, ch *Change) bool {
	a, b := r.kscratch[:0], r.kscratch2[:0]
	defer func() { r.kscratch, r.kscratch2 = a[:0], b[:0] }()
	for _, rt := range rs {
		if len(rt.keyCols) == 0 {
			continue
		}
		var okA, okB bool
		a, okA = AppendKey(a[:0], ch.Rel, ch.Before, rt.keyCols)
		b, okB = AppendKey(b[:0], ch.Rel, ch.After, rt.keyCols)
		if okA && okB && !bytes.Equal(a, b) {
			return true
		}
	}
	return false
}

var opBytes = map[Op][]byte{OpCreate: []byte("c"), OpUpdate: []byte("u"), OpDelete: []byte("d"), OpRead: []byte("r"), OpTruncate: []byte("t"), OpMessage: []byte("m")}

func (r *Router) emit(dst []Message, st *txnState, ch *Change, op Op, before, after Tuple, ri *relInfo, now time.Time) ([]Message, error) {
	pos := Position{CommitLSN: st.info.CommitLSN, Seq: st.seq}
	st.seq++
	order := st.bump(ri.name)
	// Encode the value, the position digits and every route's key straight
	// into the current slab (see headerSet), where the messages share them:
	// a message owns its bytes until the sink has written them.
	// A change that may not fit the headroom (a large row) is encoded in
	// the scratch buffer instead and copied once at its exact size.
	inSlab := approxSize(before)+approxSize(after) < slabHeadroom/2
	buf, base := r.scratch[:0], 0
	if inSlab {
		if cap(r.slab)-len(r.slab) < slabHeadroom {
			r.slab = make([]byte, 0, slabSize)
		}
		buf, base = r.slab, len(r.slab)
	}
	if st.digits == nil {
		st.digits = newTxnDigits(st.info)
	}
	b := ri.layout.append(buf, st.digits, ch, op, before, after, pos, order, now)
	rowsStart := len(b)
	if ri.rows && op != OpTruncate {
		b = ri.layout.appendRows(b, st.digits, ch, op, before, after)
	}
	rowsEnd := len(b)
	valueEnd := len(b)
	b = append(b, st.digits.lsn...)
	lsnEnd := len(b)
	b = strconv.AppendUint(b, uint64(pos.Seq), 10)
	seqEnd := len(b)
	var keyEnds [4]int // routes are few: a table topic and its entity streams
	ends := keyEnds[:0]
	for _, rt := range ri.routes {
		if op != OpTruncate && len(rt.keyCols) > 0 {
			img := after
			if img == nil {
				img = before
			}
			start := len(b)
			var ok bool
			b, ok = AppendKey(b, ch.Rel, img, rt.keyCols)
			if !ok && before != nil && after != nil {
				b, ok = AppendKey(b[:start], ch.Rel, before, rt.keyCols)
			}
			if !ok {
				return dst, fmt.Errorf("%s on %s at %s: the row image lacks key column(s) for topic %s; "+
					"set REPLICA IDENTITY FULL on the table so deletes carry the key",
					opName(op), ri.name, pos, rt.topic)
			}
		}
		ends = append(ends, len(b))
	}
	var mem []byte
	if inSlab && cap(b) == cap(r.slab) {
		// Encoded in place (append did not move to a new array).
		mem = b[base:len(b):len(b)]
		r.slab = b
	} else {
		// Encoded in scratch, or it outgrew the slab after all: it gets an
		// allocation of its exact size (so no larger array that append
		// made is kept alive by it).
		mem = append([]byte(nil), b[base:]...)
		if !inSlab {
			r.scratch = b[:0]
		}
	}
	valueEnd, lsnEnd, seqEnd = valueEnd-base, lsnEnd-base, seqEnd-base
	rowsStart, rowsEnd = rowsStart-base, rowsEnd-base
	for i := range ends {
		ends[i] -= base
	}
	hs := r.headerSet()
	hs.h = [4]Header{
		{Key: "tidemark-table", Value: ri.nameBytes},
		{Key: "tidemark-op", Value: opBytes[op]},
		{Key: "tidemark-lsn", Value: mem[valueEnd:lsnEnd:lsnEnd]},
		{Key: "tidemark-seq", Value: mem[lsnEnd:seqEnd:seqEnd]},
	}
	value := mem[:rowsStart:rowsStart]
	rowsValue := mem[rowsStart:rowsEnd:rowsEnd]
	prev := seqEnd
	for i, rt := range ri.routes {
		m := Message{Topic: rt.topic, Value: value, Headers: hs.h[:], Pos: pos}
		if rt.rows {
			if op == OpTruncate {
				r.skippedTruncates++
				prev = ends[i]
				continue
			}
			m.Value = rowsValue
		}
		if op == OpTruncate {
			m.Broadcast = true
		} else if ends[i] > prev {
			m.Key = mem[prev:ends[i]:ends[i]]
		}
		prev = ends[i]
		dst = append(dst, m)
		if op == OpDelete && r.cfg.Tombstones && rt.stream == "" && m.Key != nil {
			// The tombstone: same key and position, a null value, and
			// the headers without tidemark-op (it is no change of its own).
			dst = append(dst, Message{Topic: rt.topic, Key: m.Key, Headers: tombstoneHeaders(hs), Pos: pos})
		}
	}
	return dst, nil
}

// tombstoneHeaders are a delete's headers without tidemark-op: table, lsn
// and seq (the delete's position).
func tombstoneHeaders(hs *headerSet) []Header {
	return []Header{hs.h[0], hs.h[2], hs.h[3]}
}

// approxSize estimates the encoded size of a row image from its values'
// lengths (exact enough to route large rows around the slab).
func approxSize(t Tuple) int {
	n := 0
	for i := range t {
		d := &t[i]
		n += 24
		switch v := d.Value.(type) {
		case nil:
			n += len(d.Text)
		case string:
			n += len(v)
		case []byte:
			n += len(v) * 4 / 3
		case JSON:
			n += len(v)
		case Decimal:
			n += len(v)
		case []any:
			n += 32 * len(v)
		}
	}
	return n
}

// headerSet holds a change's headers.
type headerSet struct{ h [4]Header }

// Messages are carved out of slabs rather than allocated one by one: the
// router encodes each change straight into the current byte slab and takes
// its headers from the current header chunk. A slab is freed by the garbage
// collector once the sink has released every message in it, so memory
// stays bounded by the pipeline's in-flight limits plus one slab.
const (
	slabSize     = 256 << 10
	slabHeadroom = 16 << 10 // a change that may not fit starts a new slab
	headerChunk  = 512
)

func (r *Router) headerSet() *headerSet {
	if len(r.headers) == 0 {
		r.headers = make([]headerSet, headerChunk)
	}
	hs := &r.headers[0]
	r.headers = r.headers[1:]
	return hs
}

func opName(op Op) string {
	switch op {
	case OpCreate:
		return "insert"
	case OpUpdate:
		return "update"
	case OpDelete:
		return "delete"
	case OpTruncate:
		return "truncate"
	}
	return "read"
}

// txnRecord builds a BEGIN or END record for the transactions topic, in
// Debezium's transaction-metadata shape.
func (r *Router) txnRecord(st *txnState, end bool) Message {
	b := r.scratch[:0]
	b = append(b, `{"status":"`...)
	if end {
		b = append(b, "END"...)
	} else {
		b = append(b, "BEGIN"...)
	}
	b = append(b, `","id":"`...)
	idStart := len(b)
	b = strconv.AppendUint(b, uint64(st.info.Xid), 10)
	b = append(b, ':')
	b = strconv.AppendUint(b, uint64(st.info.CommitLSN), 10)
	idEnd := len(b)
	b = append(b, `","txId":`...)
	b = strconv.AppendUint(b, uint64(st.info.Xid), 10)
	b = append(b, `,"lsn":`...)
	b = strconv.AppendUint(b, uint64(st.info.CommitLSN), 10)
	b = append(b, `,"ts_ms":`...)
	b = strconv.AppendInt(b, st.info.CommitTime.UnixMilli(), 10)
	if end {
		b = append(b, `,"end_lsn":`...)
		b = strconv.AppendUint(b, uint64(st.info.EndLSN), 10)
		b = append(b, `,"event_count":`...)
		b = strconv.AppendUint(b, uint64(st.seq), 10)
		b = append(b, `,"data_collections":[`...)
		for i, t := range st.tables {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"data_collection":`...)
			b = AppendJSONString(b, t.name)
			b = append(b, `,"event_count":`...)
			b = strconv.AppendInt(b, int64(t.count), 10)
			b = append(b, '}')
		}
		b = append(b, ']')
	} else {
		b = append(b, `,"event_count":null,"data_collections":null`...)
	}
	b = append(b, '}')
	r.scratch = b
	// The value, the key and the LSN header are carved out of the slab
	// (see headerSet).
	need := len(b) + (idEnd - idStart) + 12 + 20
	if cap(r.slab)-len(r.slab) < need {
		r.slab = make([]byte, 0, max(slabSize, need))
	}
	base := len(r.slab)
	buf := append(r.slab, b...)
	lsnStart := len(buf)
	buf = strconv.AppendUint(buf, uint64(st.info.CommitLSN), 10)
	keyStart := len(buf)
	buf = append(buf, `{"id":"`...)
	buf = append(buf, b[idStart:idEnd]...)
	buf = append(buf, `"}`...)
	r.slab = buf
	status := statusBegin
	if end {
		status = statusEnd
	}
	hs := r.headerSet()
	hs.h[0] = Header{Key: "tidemark-status", Value: status}
	hs.h[1] = Header{Key: "tidemark-lsn", Value: buf[lsnStart:keyStart:keyStart]}
	return Message{
		Topic: r.txnTopic, Key: buf[keyStart:len(buf):len(buf)], Value: buf[base:lsnStart:lsnStart],
		Headers: hs.h[:2:2],
	}
}

var (
	statusBegin = []byte("BEGIN")
	statusEnd   = []byte("END")
)

// TxnRecord is a decoded BEGIN or END record of the transactions topic, for
// consumers; Router.txnRecord above writes them.
type TxnRecord struct {
	Status string `json:"status"`  // "BEGIN" or "END"
	ID     string `json:"id"`      // "txId:lsn"; optional
	TxID   uint32 `json:"txId"`    // optional
	LSN    uint64 `json:"lsn"`     // the commit LSN
	TsMs   int64  `json:"ts_ms"`   // the commit time; optional
	EndLSN uint64 `json:"end_lsn"` // END: the end of the commit record; optional
	// EventCount is the number of changes of the transaction (END; optional),
	// the sum of DataCollections' counts.
	EventCount *uint32 `json:"event_count"`
	// DataCollections counts the changes per table (END: required, one
	// entry per table, possibly none).
	DataCollections []TxnTableCount `json:"data_collections"`
}

// TxnTableCount is one table's change count in an END record.
type TxnTableCount struct {
	Table string `json:"data_collection"` // schema.table
	Count int    `json:"event_count"`
}

// IsEnd reports whether r is an END record.
func (r *TxnRecord) IsEnd() bool { return r.Status == "END" }

// ParseTxnRecord decodes and checks a record of the transactions topic: a
// JSON object with status BEGIN or END and a commit LSN; an id, when
// present, must agree with txId and lsn. An END record must list its
// tables (data_collections: a table at most once, each with a count from
// 0 to 2^32-1) and, when it has event_count, count as many changes in
// total. The error names what is wrong.
func ParseTxnRecord(b []byte) (TxnRecord, error) {
	var r TxnRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return TxnRecord{}, jsonError("transaction record", err)
	}
	if !isObject(b) {
		return TxnRecord{}, errors.New("transaction record is not a JSON object")
	}
	switch {
	case r.Status == "":
		return TxnRecord{}, errors.New("transaction record lacks status")
	case r.Status != "BEGIN" && r.Status != "END":
		return TxnRecord{}, fmt.Errorf("transaction record has unknown status %q (want BEGIN or END)", r.Status)
	case r.LSN == 0:
		return TxnRecord{}, fmt.Errorf("%s record lacks its position: lsn (the commit LSN) is missing or 0", r.Status)
	}
	if err := checkTxnID(r.ID, r.TxID, r.LSN); err != nil {
		return TxnRecord{}, fmt.Errorf("%s record at lsn %d: id %w", r.Status, r.LSN, err)
	}
	if !r.IsEnd() {
		return r, nil
	}
	if r.DataCollections == nil {
		return TxnRecord{}, fmt.Errorf("END record at lsn %d lacks data_collections", r.LSN)
	}
	var total uint64
	var seen map[string]bool // for long lists; short ones are scanned
	if len(r.DataCollections) > 8 {
		seen = make(map[string]bool, len(r.DataCollections))
	}
	for i, dc := range r.DataCollections {
		switch {
		case dc.Table == "":
			return TxnRecord{}, fmt.Errorf("END record at lsn %d: data_collections[%d] lacks data_collection", r.LSN, i)
		case dc.Count < 0 || dc.Count > math.MaxUint32:
			return TxnRecord{}, fmt.Errorf("END record at lsn %d: data_collections[%d] (%s) has event_count %d, want 0 to %d",
				r.LSN, i, dc.Table, dc.Count, uint32(math.MaxUint32))
		}
		dup := seen[dc.Table]
		if seen != nil {
			seen[dc.Table] = true
		} else {
			dup = slices.ContainsFunc(r.DataCollections[:i], func(p TxnTableCount) bool { return p.Table == dc.Table })
		}
		if dup {
			return TxnRecord{}, fmt.Errorf("END record at lsn %d lists data_collection %q twice", r.LSN, dc.Table)
		}
		total += uint64(dc.Count)
	}
	if r.EventCount != nil && uint64(*r.EventCount) != total {
		return TxnRecord{}, fmt.Errorf("END record at lsn %d: event_count %d, but data_collections count %d", r.LSN, *r.EventCount, total)
	}
	return r, nil
}
