// Package capture reads Postgres logical replication (pgoutput, protocol
// version 1) from a permanent slot and produces the pipeline's events.
//
// Protocol: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
// The stream confirms to Postgres (standby status "flush") only what the
// pipeline acknowledged through Ack: the end LSN of the latest transaction
// that, with every earlier one, is durable downstream. When nothing is
// pending, the WAL end reported by the server's keepalive is confirmed, so an
// idle slot does not pin WAL.
package capture

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/pipeline"
)

// Config configures a Stream.
type Config struct {
	// DSN of the database to capture (required). Its password never appears
	// in logs or errors.
	DSN string
	// Slot is the permanent logical replication slot (required).
	Slot string
	// Publication is the pgoutput publication (required).
	Publication string
	// StandbyInterval is the longest time between two standby status
	// messages. Default 10s. It is also the unit of the liveness check:
	// after 2 x StandbyInterval without any message from the server, a
	// status message asks for a reply, and the connection is dropped and
	// re-established when none arrives and the silence reaches the larger
	// of 3 x StandbyInterval and the server's wal_sender_timeout plus a
	// StandbyInterval (a half-open connection, e.g. behind a proxy that
	// stopped forwarding).
	// A session uses at most a third of the server's wal_sender_timeout
	// (with a warning), so that the server does not time it out.
	StandbyInterval time.Duration
	// Buffer sizes the hand-over between the replication connection and
	// the pipeline: events travel in batches (a transaction, or up to 256
	// events of a larger one), and Buffer/256 batches may wait, so at most
	// Buffer events (plus one batch) for large transactions, or Buffer/256
	// small transactions. Default 8192.
	Buffer int
	// BufferBytes bounds the hand-over by bytes too: the row messages of
	// the batches waiting for the pipeline (a batch is also cut once it
	// holds an eighth of it), however wide the rows. One batch may exceed
	// it when nothing else waits. Default 8 MiB.
	BufferBytes int64
	// MaxRowBytes refuses a row message larger than this before decoding
	// it, with a terminal error naming the table and position: its message
	// could never be published (e.g. kafka.batch_bytes). 0: no limit.
	MaxRowBytes int
	// ReconnectMax bounds the backoff between reconnect attempts. Default 30s.
	ReconnectMax time.Duration
	// Messages forwards logical decoding messages (pg_logical_emit_message)
	// other than Tidemark's own (prefixes starting "tidemark.") as
	// OpMessage changes: a transactional one inside its transaction, a
	// non-transactional one as a transaction of its own (commit LSN its
	// LSN, no xid). Off: they are counted only.
	Messages bool
	// ReadCoalesce is how long the receive loop lets the walsender's
	// messages gather when it is flowing and Tidemark has caught up with it
	// (see wireReader): it bounds wake-ups per second instead of per
	// message, and delays a transaction by at most this. Default 1ms;
	// negative: never wait.
	ReadCoalesce time.Duration
	// ConfirmedLSN is the slot's confirmed_flush_lsn when the stream is
	// built: the position already durable downstream, reported until the
	// pipeline acknowledges more.
	ConfirmedLSN pipeline.LSN
	// KeyColumns maps "schema.table" to the columns that key its messages
	// (its primary key; see TableInfo.KeyColumns). Tables not listed are
	// keyed by the replica identity columns pgoutput flags.
	KeyColumns map[string][]string
	// Tables are the configured tables ("schema.table"). They are tracked
	// by OID: a table renamed while running keeps its configured name (and
	// so its topics), with one warning. A relation in the stream that is
	// none of them (an extra table of an unmanaged publication, one added
	// to the publication at runtime) is handled as UnknownTables says.
	// Empty: every relation in the stream is captured under its own name.
	Tables []string
	// UnknownTables is UnknownSkip (the default: the changes of a relation
	// that is not in Tables are counted in Stats.Skipped and not
	// published, with one warning per table) or UnknownStop (a terminal
	// error naming the table).
	UnknownTables string
	// Chunks, when set, is the board on which an Incremental runner hands
	// over the chunks of incremental snapshots: the stream publishes them
	// at their high watermarks (see watermark.go).
	Chunks *ChunkBoard
}

// What Config.UnknownTables may say.
const (
	UnknownSkip = "skip"
	UnknownStop = "stop"
)

func (c *Config) defaults() {
	if c.StandbyInterval <= 0 {
		c.StandbyInterval = 10 * time.Second
	}
	if c.Buffer <= 0 {
		c.Buffer = 8192
	}
	if c.BufferBytes <= 0 {
		c.BufferBytes = 8 << 20
	}
	if c.ReconnectMax <= 0 {
		c.ReconnectMax = 30 * time.Second
	}
	if c.ReadCoalesce == 0 {
		c.ReadCoalesce = time.Millisecond
	}
	if c.UnknownTables == "" {
		c.UnknownTables = UnknownSkip
	}
}

// Stats are the stream's counters, safe to read concurrently.
type Stats struct {
	ReceivedLSN  atomic.Uint64 // end LSN of the last commit received
	ConfirmedLSN atomic.Uint64 // flush LSN last sent to Postgres
	// StatusUpdates counts standby status messages sent.
	StatusUpdates atomic.Uint64
	// Probes counts status messages that asked the server for a reply
	// because it had sent nothing for a while (see Config.StandbyInterval).
	Probes atomic.Uint64
	// ReplyRequests counts the server's keepalives that asked for a status
	// at once: it had heard nothing for half its wal_sender_timeout (status
	// messages come every standby interval, at most a third of it, so a
	// session that keeps up sees none).
	ReplyRequests atomic.Uint64
	ServerWALEnd  atomic.Uint64 // the server's WAL end from its last keepalive
	Reconnects    atomic.Uint64
	Messages      atomic.Uint64 // pgoutput messages decoded
	LogicalMsgs   atomic.Uint64 // pg_logical_emit_message records seen
	// Heartbeats received (see Watcher) and, for the last one, nanoseconds
	// from its write to its receipt here: replication lag, also when idle.
	HeartbeatsSeen atomic.Uint64
	HeartbeatLag   atomic.Int64
	Connected      atomic.Bool

	skipped sync.Map // "schema.table" -> *atomic.Uint64 (see Skipped)
}

// Skipped returns, by table ("schema.table", as the stream names it), the
// changes of relations that are not configured that were skipped.
func (st *Stats) Skipped() map[string]uint64 {
	out := map[string]uint64{}
	st.skipped.Range(func(k, v any) bool {
		out[k.(string)] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}

func (st *Stats) skip(table string) {
	v, ok := st.skipped.Load(table)
	if !ok {
		v, _ = st.skipped.LoadOrStore(table, new(atomic.Uint64))
	}
	v.(*atomic.Uint64).Add(1)
}

// ErrTerminal marks errors that reconnecting cannot fix.
var ErrTerminal = errors.New("capture: terminal error")

// Stream is a pipeline.Source over a replication slot.
type Stream struct {
	cfg Config
	// lastCommitEnd is the end of the last commit received (Debezium's
	// lastCommitLsn, see pipeline.TxnInfo.PrevEndLSN).
	lastCommitEnd pipeline.LSN
	log           *zap.Logger
	out           chan handed           // batches, in order
	free          chan []pipeline.Event // emptied batches, for reuse
	done          chan struct{}
	err           error
	acked         atomic.Uint64
	ackCh         chan struct{}
	stats         Stats

	// Owned by the Run goroutine.
	handedEnd     pipeline.LSN // end LSN of the last commit handed to the pipeline
	pendingEnd    pipeline.LSN // end LSN of the last commit in pending
	receivedEnd   pipeline.LSN // end LSN of the last commit received (handed or pending)
	deferred      bool         // pending holds whole transactions held back (see emit)
	wire          *wireReader  // this session's connection reader
	heldFor       int          // messages received since transactions were held (deferred)
	open          bool         // inside a transaction
	idleWALEnd    pipeline.LSN // keepalive WAL end seen while idle
	lastFlush     pipeline.LSN
	lastStatus    time.Time
	standby       time.Duration // this session's StandbyInterval
	senderTimeout time.Duration // the server's wal_sender_timeout (0: none)
	recvCount     uint64        // messages received (counted, not timed, per message)
	seenCount     uint64        // recvCount at lastRecv
	lastRecv      time.Time     // when the status tick last saw recvCount move
	probeAt       time.Time     // when a reply was requested (zero: none pending)
	dec           *decoder
	rels          map[uint32]*pipeline.Relation
	skipRels      map[uint32]string // relations not configured, by id: their names
	tableOIDs     map[uint32]string // configured tables by OID (kept across sessions)
	warned        map[string]bool   // unknown tables and renames already warned about
	typeNames     map[uint32]string
	txn           *pipeline.TxnInfo
	statusTimer   *time.Ticker
	row           rowMessage       // reused by handleRow
	slab          []byte           // see own
	pending       []pipeline.Event // events not yet handed over (see emit)
	windows       []*chunk         // incremental snapshot chunks between their watermarks
	chunkTxn      *chunk           // the chunk the open transaction publishes (its high watermark's)
	recent        []commitMark     // see recordCommit
	recentPos     int

	// Owned by the consumer (Next, NextBatch).
	cur      []pipeline.Event
	curPos   int
	curBytes int64

	// Waking the receive loop for an acknowledgement (see Ack).
	epoch           time.Time    // monotonic origin of lastStatusNanos
	lastStatusNanos atomic.Int64 // when the last status was sent (nanoseconds since epoch)
	wakeable        atomic.Bool  // the loop waits on the connection and may be woken
	wakeMu          sync.Mutex
	wakeConn        net.Conn // this session's connection, for its read deadline

	queued       atomic.Int64  // bytes of the batches handed over and not yet consumed
	released     chan struct{} // signalled when queued shrinks
	pendingBytes int64         // bytes of the rows in pending (Run goroutine)
}

// handed is a batch with the bytes of its row messages.
type handed struct {
	evs   []pipeline.Event
	bytes int64
}

// maxBatch bounds the events of one batch handed to the pipeline.
const maxBatch = 256

var _ pipeline.Source = (*Stream)(nil)

// New builds a Stream. It starts nothing.
func New(cfg Config, log *zap.Logger) (*Stream, error) {
	var missing []string
	if cfg.DSN == "" {
		missing = append(missing, "DSN")
	}
	if cfg.Slot == "" {
		missing = append(missing, "Slot")
	}
	if cfg.Publication == "" {
		missing = append(missing, "Publication")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("capture: missing %s", strings.Join(missing, ", "))
	}
	cfg.defaults()
	if log == nil {
		log = zap.NewNop()
	}
	batches := max(cfg.Buffer/maxBatch, 2)
	st := &Stream{cfg: cfg, log: log, out: make(chan handed, batches), free: make(chan []pipeline.Event, batches+2),
		released: make(chan struct{}, 1),
		done:     make(chan struct{}), ackCh: make(chan struct{}, 1), dec: newDecoder(),
		tableOIDs: map[uint32]string{}, warned: map[string]bool{}, standby: cfg.StandbyInterval, epoch: time.Now()}
	st.acked.Store(uint64(cfg.ConfirmedLSN))
	return st, nil
}

// Stats returns the live counters.
func (s *Stream) Stats() *Stats { return &s.stats }

var _ pipeline.BatchSource = (*Stream)(nil)

// Next returns the next event. It returns the stream's error once Run has
// ended. Next and NextBatch are called from one goroutine.
func (s *Stream) Next(ctx context.Context) (pipeline.Event, error) {
	if s.curPos >= len(s.cur) {
		if err := s.receive(ctx); err != nil {
			return pipeline.Event{}, err
		}
	}
	ev := s.cur[s.curPos]
	s.cur[s.curPos] = pipeline.Event{}
	s.curPos++
	return ev, nil
}

// NextBatch appends the next events (at least one) to dst.
func (s *Stream) NextBatch(ctx context.Context, dst []pipeline.Event) ([]pipeline.Event, error) {
	if s.curPos >= len(s.cur) {
		if err := s.receive(ctx); err != nil {
			return dst, err
		}
	}
	dst = append(dst, s.cur[s.curPos:]...)
	clear(s.cur)
	s.curPos = len(s.cur)
	return dst, nil
}

// receive replaces the consumed current batch with the next one.
func (s *Stream) receive(ctx context.Context) error {
	if s.cur != nil {
		select {
		case s.free <- s.cur[:0]:
		default:
		}
		s.cur, s.curPos = nil, 0
	}
	if s.curBytes > 0 {
		// The previous batch is handled: its rows are encoded.
		s.queued.Add(-s.curBytes)
		s.curBytes = 0
		select {
		case s.released <- struct{}{}:
		default:
		}
	}
	var b handed
	select {
	case b = <-s.out: // the common case, without the cost of a full select
		s.cur, s.curPos, s.curBytes = b.evs, 0, b.bytes
		return nil
	default:
	}
	select {
	case b = <-s.out:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		select {
		case b = <-s.out:
		default:
			return s.err
		}
	}
	s.cur, s.curPos, s.curBytes = b.evs, 0, b.bytes
	return nil
}

// Ack records that every transaction with EndLSN <= lsn is durable; the
// stream confirms it to Postgres within statusMinGap (a few tens of
// milliseconds), waking its receive loop when that waits on a quiet
// connection.
func (s *Stream) Ack(lsn pipeline.LSN) {
	for {
		cur := s.acked.Load()
		if uint64(lsn) <= cur {
			return
		}
		if s.acked.CompareAndSwap(cur, uint64(lsn)) {
			break
		}
	}
	select {
	case s.ackCh <- struct{}{}:
	default:
	}
	// Wake the loop when the status is due (at once, or statusMinGap after
	// the last one): at most once until the loop waits again. Times are
	// monotonic (since s.epoch), so a step of the wall clock cannot push
	// the deadline out.
	if s.wakeable.Load() && s.wakeable.CompareAndSwap(true, false) {
		now := time.Now()
		due := now.Add(max(0, time.Duration(s.lastStatusNanos.Load())+statusMinGap-now.Sub(s.epoch)))
		s.wakeMu.Lock()
		if s.wakeConn != nil {
			_ = s.wakeConn.SetReadDeadline(due)
		}
		s.wakeMu.Unlock()
	}
}

// AckedLSN returns the end LSN up to which the pipeline acknowledged every
// transaction (durable downstream).
func (s *Stream) AckedLSN() pipeline.LSN { return pipeline.LSN(s.acked.Load()) }

// Run connects, streams, and reconnects with backoff until ctx ends or a
// terminal error occurs. Next reports the same error afterwards.
func (s *Stream) Run(ctx context.Context) error {
	err := s.run(ctx)
	s.err = err
	close(s.done)
	return err
}

func (s *Stream) run(ctx context.Context) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 200 * time.Millisecond
	bo.MaxInterval = s.cfg.ReconnectMax
	bo.MaxElapsedTime = 0
	bo.Reset() // NewExponentialBackOff reset with the 500ms default: apply InitialInterval
	for {
		start := time.Now()
		err := s.session(ctx)
		s.stats.Connected.Store(false)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, ErrTerminal) || isTerminalPG(err) {
			return s.explainTerminal(err)
		}
		if time.Since(start) > time.Minute {
			bo.Reset()
		}
		wait := bo.NextBackOff()
		s.stats.Reconnects.Add(1)
		s.log.Warn("replication connection lost; reconnecting", zap.Error(err), zap.Duration("in", wait))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// isTerminalPG reports server errors that a reconnect cannot fix.
func isTerminalPG(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	switch pgErr.Code {
	case "42704", // undefined_object: slot or publication missing
		"28P01", "28000", // authentication
		"42501", // insufficient privilege
		"22023": // invalid_parameter_value: e.g. a pgoutput option the server does not know
		return true
	case "55000": // object_not_in_prerequisite_state: terminal only for an invalidated slot
		// (not, e.g., a failover slot still being synchronized on a standby)
		return slotInvalidated(pgErr)
	case "0A000": // feature_not_supported: terminal for the protocol version only
		// (not "logical decoding cannot be used while in recovery": a
		// standby about to be promoted)
		return strings.Contains(pgErr.Message, "proto_version") || strings.Contains(pgErr.Message, "protocol version")
	}
	return false
}

// slotInvalidated reports the server's error for a slot it invalidated.
// Postgres 15 says "cannot read from logical replication slot", with "This
// slot has been invalidated ..." as the detail; 16 and later "can no longer
// get changes from replication slot".
func slotInvalidated(pgErr *pgconn.PgError) bool {
	return pgErr.Code == "55000" && (strings.Contains(pgErr.Detail, "invalidated") ||
		strings.Contains(pgErr.Message, "can no longer get changes") || strings.Contains(pgErr.Message, "cannot read from logical replication slot"))
}

// explainTerminal adds what a terminal server error means for the
// operator: an invalidated slot lost changes for good, and so did one
// dropped while Tidemark ran (it is never recreated silently).
func (s *Stream) explainTerminal(err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return err
	}
	switch {
	case slotInvalidated(pgErr):
		return fmt.Errorf("%w: replication slot %q is invalidated (wal_status lost): Postgres removed WAL it still needed (max_slot_wal_keep_size; on 16 and later also a conflict with recovery on a standby), so the changes committed since its confirmed position are lost; drop the slot and start again from now with `tidemark run --accept-gap` (%v)",
			ErrTerminal, s.cfg.Slot, err)
	case pgErr.Code == "42704" && strings.Contains(pgErr.Message, "replication slot"):
		return fmt.Errorf("%w: replication slot %q no longer exists (dropped, or a failover to a server without it): the changes committed after its last confirmed position (%s) can no longer be captured, and Tidemark does not create a new slot silently; check postgres.slot and postgres.dsn, or start again from now with `tidemark run --accept-gap` (%v)",
			ErrTerminal, s.cfg.Slot, pipeline.LSN(max(s.acked.Load(), s.stats.ConfirmedLSN.Load())), err)
	}
	return err
}

func (s *Stream) connect(ctx context.Context) (*pgconn.PgConn, error) {
	pcfg, err := pgconn.ParseConfig(s.cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing postgres DSN: %v", ErrTerminal, err)
	}
	pcfg.RuntimeParams["replication"] = "database"
	pcfg.RuntimeParams["application_name"] = "tidemark"
	// Fix the text output formats pgoutput uses for values (see textFormats).
	pinTextFormats(pcfg.RuntimeParams)
	var wire *wireReader
	pcfg.BuildFrontend = func(r io.Reader, w io.Writer) *pgproto3.Frontend {
		wire = newWireReader(r)
		return pgproto3.NewFrontend(wire, w)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := pgconn.ConnectConfig(cctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connecting for replication: %w", ExplainTLS(err))
	}
	if wire == nil {
		conn.Close(context.Background())
		return nil, fmt.Errorf("%w: connecting for replication: pgconn did not build its frontend through BuildFrontend", ErrTerminal)
	}
	wire.raw = socketOf(conn.Conn())
	s.wire = wire
	return conn, nil
}

func (s *Stream) session(ctx context.Context) error {
	conn, err := s.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := pglogrepl.IdentifySystem(ctx, conn); err != nil {
		return fmt.Errorf("IDENTIFY_SYSTEM: %w", err)
	}
	if err := s.resolveTables(ctx, conn); err != nil {
		return err
	}
	if err := s.setStandby(ctx, conn); err != nil {
		return err
	}
	// Resume after what was already handed to the pipeline in this process;
	// Postgres starts at the slot's confirmed position when that is later.
	start := s.handedEnd
	if acked := pipeline.LSN(s.acked.Load()); acked > start {
		start = acked
	}
	args := []string{"proto_version '1'", "publication_names '" + strings.ReplaceAll(s.cfg.Publication, "'", "''") + "'", "messages 'true'"}
	if err := pglogrepl.StartReplication(ctx, conn, s.cfg.Slot, pglogrepl.LSN(start), pglogrepl.StartReplicationOptions{PluginArgs: args}); err != nil {
		return fmt.Errorf("START_REPLICATION on slot %q: %w", s.cfg.Slot, err)
	}
	s.stats.Connected.Store(true)
	// A clean stop (ctx ends) confirms what is durable before the
	// connection closes, so a restart does not replay what Kafka has.
	defer func() {
		if ctx.Err() != nil {
			s.finalStatus(conn)
		}
	}()
	s.log.Info("replication started", zap.String("slot", s.cfg.Slot), zap.Stringer("from", start))
	s.rels = map[uint32]*pipeline.Relation{}
	s.skipRels = map[uint32]string{}
	s.typeNames = map[uint32]string{}
	s.txn, s.open = nil, false
	// The first transaction's source.sequence starts at where the stream
	// resumes: the end of the last commit made durable (0, unknown, on a
	// slot's first start).
	s.lastCommitEnd = start
	s.idleWALEnd = 0
	s.lastStatus = time.Time{}
	s.seenCount, s.lastRecv, s.probeAt = s.recvCount, time.Now(), time.Time{}
	// Events of a transaction left open by the previous session are
	// dropped: Postgres sends the transaction again, whole, and the
	// pipeline abandons an open transaction at the next Begin.
	clear(s.pending)
	s.pending, s.pendingBytes = s.pending[:0], 0
	s.pendingEnd, s.receivedEnd, s.deferred = s.handedEnd, s.handedEnd, false
	s.wire.flushFirst = func() bool { return s.deferred }
	if _, isTLS := conn.Conn().(*tls.Conn); s.cfg.ReadCoalesce > 0 && !isTLS {
		// Not under TLS: a TLS read returns one record (16 KiB at most),
		// which the short-read rule would take for a caught-up stream.
		s.wire.coalesce = s.cfg.ReadCoalesce
	}
	s.statusTimer = time.NewTicker(statusTick)
	defer s.statusTimer.Stop()
	if err := s.maybeSendStatus(ctx, conn, false); err != nil {
		return err
	}

	// Receive with a read deadline on the socket rather than a context per
	// message (pgconn starts a watcher for every cancellable context); a
	// timeout leaves the connection usable and lets the loop send status and
	// notice ctx. The clock is read only on the status tick (every
	// statusTick), which also re-arms the deadline, not per message.
	netConn := conn.Conn()
	s.wakeMu.Lock()
	s.wakeConn = netConn
	s.wakeMu.Unlock()
	defer func() {
		s.wakeable.Store(false)
		s.wakeMu.Lock()
		s.wakeConn = nil
		s.wakeMu.Unlock()
	}()
	// Stopping wakes the loop too.
	stopWake := context.AfterFunc(ctx, func() { _ = netConn.SetReadDeadline(time.Now()) })
	defer stopWake()
	armed := false
	for n := uint(0); ; n++ {
		// Looking at the channels costs more than a message: do it every
		// statusEvery messages. A quiet stream still gets here on every
		// read timeout (at most readDeadline after the deadline was armed).
		if n%statusEvery == 0 {
			if err := s.checkStatus(ctx, conn, &armed); err != nil {
				return err
			}
		}
		if !armed {
			d := s.readDeadline()
			if err := netConn.SetReadDeadline(d); err != nil {
				return fmt.Errorf("setting read deadline: %w", err)
			}
			armed = true
			s.wakeable.Store(true)
			// An acknowledgement or a stop that came while arming found
			// the loop not yet wakeable: look again.
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if d2 := s.readDeadline(); d2.Before(d) {
				if err := netConn.SetReadDeadline(d2); err != nil {
					return fmt.Errorf("setting read deadline: %w", err)
				}
			}
		}
		msg, err := conn.ReceiveMessage(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pgconn.Timeout(err) && s.wire.tookFlush() {
				// Nothing more is here: hand over the transactions held.
				if err := s.flushPending(ctx, conn); err != nil {
					return err
				}
				continue
			}
			if pgconn.Timeout(err) {
				armed = false
				s.wakeable.Store(false)
				n = statusEvery - 1 // check the channels next
				continue
			}
			return fmt.Errorf("receiving replication data: %w", err)
		}
		s.recvCount++
		if s.deferred {
			// Held transactions wait for at most maxBatch messages that
			// add nothing (skipped tables, relations, logical messages).
			if s.heldFor++; s.heldFor >= maxBatch {
				if err := s.flushPending(ctx, conn); err != nil {
					return err
				}
			}
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			if err := s.handleCopyData(ctx, conn, m.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return pgconn.ErrorResponseToPgError(m)
		default:
			// CopyDone, notices: nothing to do.
		}
	}
}

// statusEvery is how many messages the receive loop handles between two
// looks at the acknowledgement and status-tick channels.
const statusEvery = 64

// checkStatus sends standby status when an acknowledgement is not yet
// confirmed (and statusMinGap has passed) or the status tick arrived, and on
// the tick notices ctx and asks for the read deadline to be re-armed.
func (s *Stream) checkStatus(ctx context.Context, conn *pgconn.PgConn, armed *bool) error {
	select {
	case <-s.ackCh:
		if err := s.maybeSendStatus(ctx, conn, false); err != nil {
			return err
		}
		if s.unconfirmed() {
			*armed = false // re-armed to wake when the status is due
		}
	case <-s.statusTimer.C:
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.maybeSendStatus(ctx, conn, false); err != nil {
			return err
		}
		if err := s.checkLiveness(ctx, conn); err != nil {
			return err
		}
		*armed = false
	default:
		if s.unconfirmed() {
			if err := s.maybeSendStatus(ctx, conn, false); err != nil {
				return err
			}
		}
	}
	return nil
}

// unconfirmed reports an acknowledgement not yet sent to Postgres.
func (s *Stream) unconfirmed() bool { return s.acked.Load() > uint64(s.lastFlush) }

// readDeadline is when a read that finds nothing gives up: readDeadline
// from now, or sooner when an acknowledgement waits for statusMinGap to
// pass since the last status.
func (s *Stream) readDeadline() time.Time {
	now := time.Now()
	d := now.Add(readDeadline)
	if s.unconfirmed() {
		due := s.lastStatus.Add(statusMinGap)
		if due.Before(now) {
			due = now
		}
		if due.Before(d) {
			d = due
		}
	}
	return d
}

// finalStatus confirms what is durable as the session ends on a clean
// stop. It is best effort: a failure only means the next start replays a
// little (it is logged).
func (s *Stream) finalStatus(conn *pgconn.PgConn) {
	flush := s.flushLSN()
	if flush == 0 {
		return
	}
	_ = conn.Conn().SetDeadline(time.Now().Add(3 * time.Second))
	if err := s.sendStatus(context.Background(), conn, flush, time.Now(), false); err != nil {
		s.log.Warn("could not confirm the last acknowledged position on stopping; the next start replays from the slot's position", zap.Error(err))
		return
	}
	// End the stream properly (CopyDone, then read what the server still
	// sends until it ends too): the server handles its input in order, so
	// its answer means it applied the status. Closing at once could reset
	// the connection (unread data) before the server read it.
	s.wire.flushFirst, s.wire.coalesce = nil, 0
	if _, err := pglogrepl.SendStandbyCopyDone(context.Background(), conn); err != nil {
		s.log.Debug("ending the replication stream on stopping", zap.Error(err))
	}
	s.log.Debug("confirmed on stopping", zap.Stringer("flush", flush))
}

// checkLiveness runs on the status tick while the loop reads: after
// 2 x standby without a message from the server it asks for a reply; when
// none comes and the silence reaches deadAfter, the connection is
// half-open and the session ends (to be re-established).
func (s *Stream) checkLiveness(ctx context.Context, conn *pgconn.PgConn) error {
	now := time.Now()
	if s.recvCount != s.seenCount {
		s.seenCount, s.lastRecv, s.probeAt = s.recvCount, now, time.Time{}
		return nil
	}
	silent := now.Sub(s.lastRecv)
	switch {
	case s.probeAt.IsZero() && silent >= 2*s.standby:
		s.probeAt = now
		s.stats.Probes.Add(1)
		return s.sendStatus(ctx, conn, s.flushLSN(), now, true)
	case !s.probeAt.IsZero() && now.Sub(s.probeAt) >= s.standby && silent >= s.deadAfter():
		return fmt.Errorf("the server sent nothing for %s, not even the reply to a keepalive request sent %s ago: the replication connection is half-open",
			silent.Round(time.Millisecond), now.Sub(s.probeAt).Round(time.Millisecond))
	}
	return nil
}

// deadAfter is how long the server may stay silent before the connection
// is taken for half-open: 3 x standby, and at least the server's
// wal_sender_timeout plus a standby, since a walsender busy decoding (e.g.
// a large transaction of tables it does not publish) may not answer a
// request for a reply before half of its timeout has passed.
func (s *Stream) deadAfter() time.Duration {
	return max(3*s.standby, s.senderTimeout+s.standby)
}

// setStandby sets this session's standby interval: Config.StandbyInterval,
// or a third of the server's wal_sender_timeout when that is shorter.
func (s *Stream) setStandby(ctx context.Context, conn *pgconn.PgConn) error {
	s.standby = s.cfg.StandbyInterval
	res, err := conn.Exec(ctx, "SHOW wal_sender_timeout").ReadAll()
	if err != nil {
		return fmt.Errorf("reading wal_sender_timeout: %w", err)
	}
	if len(res) != 1 || res[0].Err != nil || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 1 {
		return fmt.Errorf("reading wal_sender_timeout: unexpected answer %+v", res)
	}
	timeout, err := parsePGDuration(string(res[0].Rows[0][0]))
	if err != nil {
		return fmt.Errorf("reading wal_sender_timeout: %w", err)
	}
	s.senderTimeout = timeout
	if limit := timeout / 3; timeout > 0 && s.standby > limit {
		if !s.warned["standby"] {
			s.warned["standby"] = true
			s.log.Warn("postgres.standby_interval is more than a third of the server's wal_sender_timeout; using a third of it, so that the server does not time the connection out",
				zap.Duration("standby_interval", s.cfg.StandbyInterval), zap.Duration("wal_sender_timeout", timeout), zap.Duration("using", limit))
		}
		s.standby = limit
	}
	return nil
}

// parsePGDuration parses a time setting as SHOW prints it ("60s", "500ms",
// "1min", "0").
func parsePGDuration(v string) (time.Duration, error) {
	i := 0
	for i < len(v) && v[i] >= '0' && v[i] <= '9' {
		i++
	}
	n, err := strconv.ParseInt(v[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration", v)
	}
	units := map[string]time.Duration{"": time.Millisecond, "us": time.Microsecond, "ms": time.Millisecond, "s": time.Second,
		"min": time.Minute, "h": time.Hour, "d": 24 * time.Hour}
	u, ok := units[v[i:]]
	if !ok {
		return 0, fmt.Errorf("%q has an unknown unit", v)
	}
	return time.Duration(n) * u, nil
}

func (s *Stream) handleCopyData(ctx context.Context, conn *pgconn.PgConn, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("parsing keepalive: %w", err)
		}
		s.stats.ServerWALEnd.Store(uint64(ka.ServerWALEnd))
		if !s.open {
			s.idleWALEnd = pipeline.LSN(ka.ServerWALEnd)
		}
		if ka.ReplyRequested {
			s.stats.ReplyRequests.Add(1)
			return s.maybeSendStatus(ctx, conn, true)
		}
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("parsing XLogData: %w", err)
		}
		return s.handleWAL(ctx, conn, xld)
	}
	return nil
}

func (s *Stream) handleWAL(ctx context.Context, conn *pgconn.PgConn, xld pglogrepl.XLogData) error {
	if isRowMessage(xld.WALData) {
		return s.handleRow(ctx, conn, xld)
	}
	at := pipeline.LSN(xld.WALStart)
	msg, err := parseMessage(xld.WALData)
	if err != nil {
		return undecodable(xld.WALData, at, err)
	}
	s.stats.Messages.Add(1)
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		s.txn = &pipeline.TxnInfo{Xid: m.Xid, CommitLSN: pipeline.LSN(m.FinalLSN), CommitTime: m.CommitTime, PrevEndLSN: s.lastCommitEnd}
		s.open, s.chunkTxn = true, nil
		return s.emit(ctx, conn, pipeline.Event{Kind: pipeline.EventBegin, Txn: s.txn})
	case *pglogrepl.CommitMessage:
		if s.txn == nil {
			return fmt.Errorf("%w: commit at %s without begin", ErrTerminal, xld.WALStart)
		}
		s.txn.EndLSN = pipeline.LSN(m.TransactionEndLSN)
		s.recordCommit(s.txn.Xid, s.txn.CommitLSN)
		if s.chunkTxn != nil {
			s.commitChunk(s.txn.EndLSN)
		}
		ev := pipeline.Event{Kind: pipeline.EventCommit, Txn: s.txn}
		s.pendingEnd, s.receivedEnd = s.txn.EndLSN, s.txn.EndLSN
		s.lastCommitEnd = s.txn.EndLSN
		s.stats.ReceivedLSN.Store(uint64(s.txn.EndLSN))
		s.txn, s.open = nil, false
		if err := s.emit(ctx, conn, ev); err != nil {
			return err
		}
	case *pglogrepl.RelationMessage:
		if err := s.handleRelation(m, at); err != nil {
			return err
		}
		if _, captured := s.rels[m.RelationID]; !captured {
			return nil // skipped: its types are never decoded
		}
		return s.resolveTypes(ctx, m)
	case *pglogrepl.TypeMessage:
		s.typeNames[m.DataType] = m.Namespace + "." + m.Name
	case *pglogrepl.OriginMessage:
		// Replicated-in changes carry their origin; Tidemark captures them like
		// local ones.
	case *pglogrepl.LogicalDecodingMessage:
		s.stats.LogicalMsgs.Add(1)
		if m.Prefix == WatermarkPrefix {
			return s.handleWatermark(ctx, conn, m, at)
		}
		if s.cfg.Messages && !strings.HasPrefix(m.Prefix, "tidemark.") {
			return s.logicalMessage(ctx, conn, m, at)
		}
		if !m.Transactional && m.Prefix == HeartbeatPrefix {
			if sent, ok := parseHeartbeat(m.Content, s.cfg.Slot); ok {
				s.stats.HeartbeatsSeen.Add(1)
				s.stats.HeartbeatLag.Store(time.Now().UnixNano() - sent)
			}
		}
	// Insert, Update and Delete never get here: handleRow decodes them.
	case *pglogrepl.TruncateMessage:
		// Every relation is resolved before any change is emitted: a
		// message is refused whole, never half handed to the pipeline.
		rels := make([]*pipeline.Relation, 0, len(m.RelationIDs))
		for _, id := range m.RelationIDs {
			if name, skip := s.skipRels[id]; skip {
				if err := s.skipChange(id, name, at); err != nil {
					return err
				}
				continue
			}
			rel, err := s.relation(id, at)
			if err != nil {
				return err
			}
			rels = append(rels, rel)
		}
		for _, rel := range rels {
			if err := s.change(ctx, conn, pipeline.Change{Op: pipeline.OpTruncate, Rel: rel, WALLSN: at}); err != nil {
				return err
			}
		}
	default:
		// pglogrepl.Parse returns no other message type (it refuses the
		// Stream* messages of protocol version 2: see undecodable).
		return fmt.Errorf("%w: unexpected pgoutput message %s at %s", ErrTerminal, msg.Type(), at)
	}
	return nil
}

// undecodable is the error for a pgoutput message that parseMessage
// refused: it names the message type and position. The Stream Start, Stop,
// Commit and Abort messages of protocol version 2 (streaming of in-progress
// transactions), which pglogrepl's version 1 parser does not know, get their
// own explanation: Tidemark requests version 1 and cannot handle them.
func undecodable(data []byte, at pipeline.LSN, err error) error {
	if len(data) == 0 {
		return fmt.Errorf("%w: decoding pgoutput message at %s: %v", ErrTerminal, at, err)
	}
	t := pglogrepl.MessageType(data[0])
	switch t {
	case pglogrepl.MessageTypeStreamStart, pglogrepl.MessageTypeStreamStop, pglogrepl.MessageTypeStreamCommit, pglogrepl.MessageTypeStreamAbort:
		return fmt.Errorf("%w: pgoutput message %q (%s) at %s belongs to protocol version 2 (streaming of in-progress transactions); Tidemark requests version 1 and cannot decode it",
			ErrTerminal, data[0], t, at)
	}
	return fmt.Errorf("%w: decoding pgoutput message %q (%s) at %s: %v", ErrTerminal, data[0], t, at, err)
}

// handleRow decodes an Insert, Update or Delete in place (see rowMessage).
// The message is first copied into the stream's slab: the connection reuses
// its buffer, while decoded values alias their bytes until the pipeline has
// encoded them.
func (s *Stream) handleRow(ctx context.Context, conn *pgconn.PgConn, xld pglogrepl.XLogData) error {
	at := pipeline.LSN(xld.WALStart)
	m := &s.row
	if err := m.parse(s.own(xld.WALData)); err != nil {
		return fmt.Errorf("%w: decoding pgoutput message at %s: %v", ErrTerminal, at, err)
	}
	s.stats.Messages.Add(1)
	if name, skip := s.skipRels[m.relID]; skip {
		return s.skipChange(m.relID, name, at)
	}
	rel, err := s.relation(m.relID, at)
	if err != nil {
		return err
	}
	if n := len(xld.WALData); s.cfg.MaxRowBytes > 0 && n > s.cfg.MaxRowBytes {
		var commit pipeline.LSN
		if s.txn != nil {
			commit = s.txn.CommitLSN
		}
		return fmt.Errorf("%w: %s on %s at %s (in the transaction with commit LSN %d, %s) is %d bytes, more than the %d a message may have (kafka.batch_bytes): it cannot be published; raise kafka.batch_bytes (and the topic's max.message.bytes) or make the row smaller",
			ErrTerminal, rowMessageName(m.typ), rel.QualifiedName(), at, uint64(commit), commit, n, s.cfg.MaxRowBytes)
	}
	s.pendingBytes += int64(len(xld.WALData))
	ch := pipeline.Change{Rel: rel, WALLSN: at}
	if m.oldKind != 0 {
		if ch.Before, err = s.dec.decodeTuple(rel, m.old, m.oldKind == 'K'); err != nil {
			return fmt.Errorf("%w: %s at %s: %v", ErrTerminal, rowMessageName(m.typ), at, err)
		}
	}
	if m.hasNew {
		if ch.After, err = s.dec.decodeTuple(rel, m.new, false); err != nil {
			return fmt.Errorf("%w: %s at %s: %v", ErrTerminal, rowMessageName(m.typ), at, err)
		}
	}
	switch m.typ {
	case 'I':
		ch.Op = pipeline.OpCreate
	case 'U':
		ch.Op = pipeline.OpUpdate
		if m.oldKind == 'O' {
			fillUnchanged(ch.After, ch.Before)
		}
	default:
		ch.Op = pipeline.OpDelete
	}
	return s.change(ctx, conn, ch)
}

// logicalMessage forwards a pg_logical_emit_message record (Config.Messages).
func (s *Stream) logicalMessage(ctx context.Context, conn *pgconn.PgConn, m *pglogrepl.LogicalDecodingMessage, at pipeline.LSN) error {
	if n := len(m.Content); s.cfg.MaxRowBytes > 0 && n > s.cfg.MaxRowBytes {
		return fmt.Errorf("%w: the logical message with prefix %q at %s is %d bytes, more than the %d a message may have (kafka.batch_bytes): it cannot be published; raise kafka.batch_bytes (and the topic's max.message.bytes), or turn pipeline.messages off",
			ErrTerminal, m.Prefix, at, n, s.cfg.MaxRowBytes)
	}
	s.pendingBytes += int64(len(m.Content))
	ch := pipeline.Change{Op: pipeline.OpMessage, WALLSN: at, Message: &pipeline.LogicalMessage{
		Prefix: m.Prefix, Content: append([]byte(nil), m.Content...), Transactional: m.Transactional}}
	if m.Transactional {
		if s.txn == nil {
			return fmt.Errorf("%w: a transactional logical message (prefix %q) at %s outside a transaction", ErrTerminal, m.Prefix, at)
		}
		return s.emit(ctx, conn, pipeline.Event{Kind: pipeline.EventChange, Txn: s.txn, Change: ch})
	}
	if s.open {
		return fmt.Errorf("%w: a non-transactional logical message (prefix %q) at %s inside a transaction", ErrTerminal, m.Prefix, at)
	}
	// A transaction of its own, ending at at: the walsender reports a
	// message at the end of its record, so once at is confirmed a restart
	// does not send the message again (its record starts before at), while
	// a commit whose record starts at at is still sent.
	txn := &pipeline.TxnInfo{CommitLSN: at, EndLSN: at, CommitTime: time.Now(), PrevEndLSN: s.lastCommitEnd}
	for _, ev := range []pipeline.Event{{Kind: pipeline.EventBegin, Txn: txn}, {Kind: pipeline.EventChange, Txn: txn, Change: ch}} {
		if err := s.emit(ctx, conn, ev); err != nil {
			return err
		}
	}
	s.pendingEnd, s.receivedEnd = txn.EndLSN, txn.EndLSN
	s.stats.ReceivedLSN.Store(uint64(txn.EndLSN))
	return s.emit(ctx, conn, pipeline.Event{Kind: pipeline.EventCommit, Txn: txn})
}

// fillUnchanged gives after the values of its unchanged TOASTed columns
// from before, the whole old row that REPLICA IDENTITY FULL sends
// (Postgres inlines its TOASTed values), as Debezium does: after is then
// the whole new row.
func fillUnchanged(after, before pipeline.Tuple) {
	for i := range after {
		if after[i].Unchanged && i < len(before) && !before[i].Unchanged && !before[i].Absent {
			after[i] = before[i]
		}
	}
}

// slabSize is the unit in which own allocates copies of row messages.
const slabSize = 64 << 10

// own returns a copy of data that is never modified afterwards: a slice of
// the current slab (a fresh one when it is full), or a copy of its own for
// a message larger than a quarter slab. A slab is freed once no decoded
// value points into it.
func (s *Stream) own(data []byte) []byte {
	if len(data) > slabSize/4 {
		return append([]byte(nil), data...)
	}
	if cap(s.slab)-len(s.slab) < len(data) {
		s.slab = make([]byte, 0, slabSize)
	}
	start := len(s.slab)
	s.slab = append(s.slab, data...)
	return s.slab[start:len(s.slab):len(s.slab)]
}

// resolveTables maps the configured tables that exist to their OIDs, so
// that a table renamed later is still known by its configured name. It
// keeps what earlier sessions found: a table renamed while disconnected is
// still recognised.
func (s *Stream) resolveTables(ctx context.Context, conn *pgconn.PgConn) error {
	if len(s.cfg.Tables) == 0 {
		return nil
	}
	names := make([]string, len(s.cfg.Tables))
	for i, t := range s.cfg.Tables {
		names[i] = "'" + strings.ReplaceAll(t, "'", "''") + "'"
	}
	// A replication connection speaks the simple query protocol only.
	res, err := conn.Exec(ctx, `SELECT c.oid, n.nspname || '.' || c.relname FROM pg_catalog.pg_class c
		JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname || '.' || c.relname IN (`+strings.Join(names, ", ")+`)`).ReadAll()
	if err != nil {
		return fmt.Errorf("resolving the configured tables: %w", err)
	}
	for _, r := range res {
		if r.Err != nil {
			return fmt.Errorf("resolving the configured tables: %w", r.Err)
		}
		for _, row := range r.Rows {
			oid, err := strconv.ParseUint(string(row[0]), 10, 32)
			if err != nil {
				return fmt.Errorf("resolving the configured tables: oid %q: %w", row[0], err)
			}
			s.claim(uint32(oid), string(row[1]))
		}
	}
	return nil
}

// claim gives the configured name to relation oid. Another relation that
// had it (renamed away, e.g. by a swap migration that then created a new
// table under the name) loses it: its changes are skipped from now on, as a
// table that is not configured, with one warning.
func (s *Stream) claim(oid uint32, name string) {
	for other, n := range s.tableOIDs {
		if n != name || other == oid {
			continue
		}
		delete(s.tableOIDs, other)
		if s.rels != nil {
			delete(s.rels, other)
		}
		if s.skipRels != nil {
			s.skipRels[other] = fmt.Sprintf("%s (renamed, relation %d)", name, other)
		}
		s.log.Warn("another table now has a configured table's name: its changes are captured under the name, those of the table that had it (renamed) are skipped from now on",
			zap.String("table", name), zap.Uint32("relation", oid), zap.Uint32("previous_relation", other))
	}
	s.tableOIDs[oid] = name
}

// handleRelation records a relation of the stream: under its configured
// name (found by OID, so a renamed table keeps it), or as one whose
// changes are skipped (or refused, see Config.UnknownTables).
func (s *Stream) handleRelation(m *pglogrepl.RelationMessage, at pipeline.LSN) error {
	name := m.Namespace + "." + m.RelationName
	configured, ok := name, true
	if len(s.cfg.Tables) > 0 {
		if c, known := s.tableOIDs[m.RelationID]; known {
			configured = c
		} else if ok = slices.Contains(s.cfg.Tables, name); ok {
			s.claim(m.RelationID, name) // e.g. created after the start
		}
	}
	if !ok {
		// Judged when one of its changes arrives (skipChange): under
		// publish_via_partition_root Postgres also describes each
		// partition, whose changes then come under the root's relation.
		delete(s.rels, m.RelationID)
		s.skipRels[m.RelationID] = name
		return nil
	}
	delete(s.skipRels, m.RelationID)
	keys, err := s.relationKey(m, configured, at)
	if err != nil {
		return err
	}
	rel := relationFromMessage(m, keys)
	if configured != name {
		if key := "renamed " + configured + " " + name; !s.warned[key] {
			s.warned[key] = true
			s.log.Warn("a configured table was renamed; its changes keep going to the topics of its configured name (tables are tracked by OID): rename it in postgres.tables when convenient",
				zap.String("configured", configured), zap.String("now", name), zap.Uint32("relation", m.RelationID))
		}
		rel.Schema, rel.Table, _ = strings.Cut(configured, ".")
	}
	s.rels[m.RelationID] = rel
	return nil
}

// relationKey returns the key columns for m, a relation of the configured
// table: the ones preflight chose, while m has them all. When some are gone
// (a key column renamed or dropped), a table keyed by its replica identity
// (the primary key or the identity index) is keyed by the columns pgoutput
// flags, under the names they had when the change was made, with one
// warning; any other is a terminal error: publishing on would key its
// messages by nothing (or by less), and the slot stays before it.
func (s *Stream) relationKey(m *pglogrepl.RelationMessage, configured string, at pipeline.LSN) ([]string, error) {
	keys := s.cfg.KeyColumns[configured]
	var missing []string
	for _, k := range keys {
		if !slices.ContainsFunc(m.Columns, func(c *pglogrepl.RelationMessageColumn) bool { return c.Name == k }) {
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return keys, nil
	}
	var flagged []string
	for _, c := range m.Columns {
		if c.Flags&1 == 1 {
			flagged = append(flagged, c.Name)
		}
	}
	if m.ReplicaIdentity == 'f' || len(flagged) != len(keys) {
		return nil, fmt.Errorf("%w: the key column(s) %s of table %s are gone at %s (renamed or dropped); set postgres.key_columns for it to columns it has, or restart Tidemark to key it by what it has now (tidemark check shows the key)",
			ErrTerminal, strings.Join(missing, ", "), configured, at)
	}
	if key := "key " + configured + " " + strings.Join(flagged, ","); !s.warned[key] {
		s.warned[key] = true
		s.log.Warn("a key column of a table was renamed; its messages are keyed by the replica identity columns under their names at the time of the change (the key's JSON field names change with them)",
			zap.String("table", configured), zap.Strings("configured_key", keys), zap.Strings("key_now", flagged), zap.Stringer("at", at))
	}
	return flagged, nil
}

// skipChange handles a change of a relation that is not configured (see
// Config.UnknownTables): counted and, the first time for its table,
// warned about; or a terminal error naming it.
func (s *Stream) skipChange(id uint32, name string, at pipeline.LSN) error {
	if s.cfg.UnknownTables == UnknownStop {
		return fmt.Errorf("%w: a change of table %s (relation %d, at %s) arrived: it is published by %q but is not in postgres.tables; add it to postgres.tables, remove it from the publication, or set postgres.unknown_tables: skip",
			ErrTerminal, name, id, at, s.cfg.Publication)
	}
	s.stats.skip(name)
	if !s.warned["unknown "+name] {
		s.warned["unknown "+name] = true
		s.log.Warn("skipping the changes of a table that is not in postgres.tables (counted in tidemark_skipped_changes_total; add it to postgres.tables, or remove it from the publication)",
			zap.String("table", name), zap.Uint32("relation", id), zap.String("publication", s.cfg.Publication))
	}
	return nil
}

func (s *Stream) relation(id uint32, at pipeline.LSN) (*pipeline.Relation, error) {
	rel, ok := s.rels[id]
	if !ok {
		return nil, fmt.Errorf("%w: change at %s for unknown relation %d (no Relation message)", ErrTerminal, at, id)
	}
	return rel, nil
}

func (s *Stream) change(ctx context.Context, conn *pgconn.PgConn, ch pipeline.Change) error {
	if s.txn == nil {
		return fmt.Errorf("%w: change on %s at %s outside a transaction", ErrTerminal, ch.Rel.QualifiedName(), ch.WALLSN)
	}
	if len(s.windows) > 0 && ch.Op != pipeline.OpRead {
		s.touch(&ch)
	}
	return s.emit(ctx, conn, pipeline.Event{Kind: pipeline.EventChange, Txn: s.txn, Change: ch})
}

// Timing of the receive loop.
const (
	statusTick   = 100 * time.Millisecond // status checks and deadline re-arming
	readDeadline = 250 * time.Millisecond // longest wait for data between checks
	// statusMinGap is the least time between two status messages that
	// confirm newly acknowledged positions: an acknowledgement is confirmed
	// within about this, and Postgres gets at most 1/statusMinGap of them
	// per second.
	statusMinGap = 20 * time.Millisecond
)

// emit queues an event for the pipeline. Events travel in batches: a batch
// is handed over at a commit when nothing more has arrived yet (so a
// transaction becomes visible as soon as it is complete; while a backlog
// streams in, a batch carries many transactions and the pipeline wakes per
// batch, not per transaction), and whenever maxBatch events or an eighth of
// BufferBytes are pending (so a large transaction streams through in
// bounded memory). Transactions held back are handed over before the
// receive loop would wait for data (see wireReader.flushFirst).
func (s *Stream) emit(ctx context.Context, conn *pgconn.PgConn, ev pipeline.Event) error {
	if s.pending == nil {
		select {
		case b := <-s.free:
			s.pending = b
		default:
			s.pending = make([]pipeline.Event, 0, 8)
		}
	}
	s.pending = append(s.pending, ev)
	if len(s.pending) < maxBatch && s.pendingBytes < s.cfg.BufferBytes/8 {
		if ev.Kind != pipeline.EventCommit {
			return nil
		}
		if s.moreBuffered(conn) {
			if !s.deferred {
				s.deferred, s.heldFor = true, 0
			}
			return nil
		}
	}
	return s.flushPending(ctx, conn)
}

// moreBuffered reports whether data already read from the connection waits
// to be decoded: the next message is (most likely) here.
func (s *Stream) moreBuffered(conn *pgconn.PgConn) bool {
	if s.wire == nil || conn == nil { // driven without a connection (tests)
		return false
	}
	return s.wire.Buffered() > 0 || conn.Frontend().ReadBufferLen() > 0
}

// flushPending hands the pending events to the pipeline.
func (s *Stream) flushPending(ctx context.Context, conn *pgconn.PgConn) error {
	s.deferred = false
	if len(s.pending) == 0 {
		return nil
	}
	b := handed{evs: s.pending, bytes: s.pendingBytes}
	end := s.pendingEnd
	s.pending, s.pendingBytes = nil, 0
	if err := s.handOver(ctx, conn, b); err != nil {
		return err
	}
	if end > s.handedEnd {
		s.handedEnd = end
	}
	return nil
}

// handOver gives a batch to the pipeline. While the pipeline is full it
// keeps sending standby status, so Postgres does not time the connection
// out.
func (s *Stream) handOver(ctx context.Context, conn *pgconn.PgConn, b handed) error {
	// Wait for bytes first (unless nothing waits: one batch always goes).
	for q := s.queued.Load(); q > 0 && q+b.bytes > s.cfg.BufferBytes; q = s.queued.Load() {
		select {
		case <-s.released:
		case <-s.ackCh:
			if err := s.maybeSendStatus(ctx, conn, false); err != nil {
				return err
			}
		case <-s.statusTimer.C:
			if err := s.maybeSendStatus(ctx, conn, false); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// Counted before it is in the channel (so the consumer, which
	// subtracts, never sees it uncounted), and uncounted again when the
	// batch is dropped: a failed status write or the end of ctx.
	s.queued.Add(b.bytes)
	select {
	case s.out <- b:
		return nil
	default:
	}
	for {
		var err error
		select {
		case s.out <- b:
			return nil
		case <-s.ackCh:
			err = s.maybeSendStatus(ctx, conn, false)
		case <-s.statusTimer.C:
			err = s.maybeSendStatus(ctx, conn, false)
		case <-ctx.Done():
			err = ctx.Err()
		}
		if err != nil {
			s.queued.Add(-b.bytes)
			return err
		}
	}
}

// flushLSN is what may be confirmed: the pipeline's acknowledgement, or the
// server's WAL end when everything received has been acknowledged and no
// transaction is open.
func (s *Stream) flushLSN() pipeline.LSN {
	flush := pipeline.LSN(s.acked.Load())
	if !s.open && flush >= s.receivedEnd && s.idleWALEnd > flush {
		flush = s.idleWALEnd
	}
	return flush
}

func (s *Stream) maybeSendStatus(ctx context.Context, conn *pgconn.PgConn, force bool) error {
	flush := s.flushLSN()
	now := time.Now()
	due := now.Sub(s.lastStatus) >= s.standby
	advanced := flush > s.lastFlush && now.Sub(s.lastStatus) >= statusMinGap
	if !force && !due && !advanced {
		return nil
	}
	return s.sendStatus(ctx, conn, flush, now, false)
}

// sendStatus reports flush, asking the server for a reply when reply is set.
func (s *Stream) sendStatus(ctx context.Context, conn *pgconn.PgConn, flush pipeline.LSN, now time.Time, reply bool) error {
	// Report only what is confirmed, in all three positions. (pglogrepl
	// replaces a zero flush position with the write position, so reporting
	// a write position beyond flush could confirm transactions that are not
	// durable yet; and Postgres ignores a zero flush.)
	write := flush
	err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: pglogrepl.LSN(write),
		WALFlushPosition: pglogrepl.LSN(flush),
		WALApplyPosition: pglogrepl.LSN(flush),
		ClientTime:       now,
		ReplyRequested:   reply,
	})
	if err != nil {
		return fmt.Errorf("sending standby status at %s: %w", flush, err)
	}
	s.lastStatus = now
	s.lastStatusNanos.Store(int64(now.Sub(s.epoch)))
	s.lastFlush = flush
	s.stats.ConfirmedLSN.Store(uint64(flush))
	s.stats.StatusUpdates.Add(1)
	return nil
}
