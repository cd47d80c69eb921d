package capture

import (
	"io"
	"net"
	"sync/atomic"
	"time"
)

// wireReader sits between a replication connection and pgproto3's message
// reader (see connect: pgconn's BuildFrontend hook). It exists so that
// neither Tidemark nor the walsender wakes per message while a backlog
// streams in:
//
//   - Reads from the connection are large (wireBufSize), so a burst of
//     messages costs one read rather than one per message.
//   - It tells the stream whether more data is already here (Buffered), so
//     a commit followed by more messages does not hand its batch to the
//     pipeline at once: batches then carry many small transactions.
//   - Before it would wait on the connection it lets the stream hand over
//     what it holds (flushFirst / errFlush), so holding a batch never delays
//     a transaction behind a silent connection: the latency of a trickle is
//     unchanged.
//   - When the stream is flowing but the last read found little (Tidemark
//     keeps up with the walsender, which then sends one message per write),
//     it waits coalesce before reading again, with the socket's receive low
//     watermark raised meanwhile so that arriving data wakes nobody. The
//     next read then takes everything that arrived. This bounds the
//     wake-ups of a draining stream by time, not by message count; a
//     transaction that arrives during the wait is delayed by at most
//     coalesce.
//
// The connection's read deadline (set by the receive loop) still applies to
// every read. wireReader is used by the Run goroutine only, apart from the
// counters.
type wireReader struct {
	r   io.Reader // pgconn's reader of the (TLS) connection
	raw net.Conn  // the TCP or Unix socket below TLS, for the low watermark; nil: none
	buf []byte
	rp  int
	wp  int

	// flushFirst, when set and true, makes a read that finds the buffer
	// empty return errFlush instead of reading: the stream hands over its
	// held batch and reads again.
	flushFirst func() bool
	flushed    bool // the last error returned was errFlush

	coalesce time.Duration // 0: never wait
	lastN    int           // bytes the last read returned
	lowat    bool          // the receive low watermark is raised

	waits atomic.Uint64 // coalescing waits
}

const (
	// wireBufSize is the most one read takes from the connection.
	wireBufSize = 256 << 10
	// coalesceBelow: a read that returned fewer bytes than this, while the
	// stream flows, found Tidemark caught up with the walsender.
	coalesceBelow = 32 << 10
	// lowWatermark is the receive low watermark while coalescing: the
	// socket signals readable only once this much is queued.
	lowWatermark = 64 << 10
)

func newWireReader(r io.Reader) *wireReader {
	return &wireReader{r: r, buf: make([]byte, wireBufSize)}
}

// errFlush is returned by a read that would have waited while the stream
// holds a batch. It is a timeout, which pgconn and pgproto3 treat as
// resumable: the connection stays usable and a partly read message is kept.
var errFlush error = flushError{}

type flushError struct{}

func (flushError) Error() string   { return "capture: hand over before reading" }
func (flushError) Timeout() bool   { return true }
func (flushError) Temporary() bool { return true }

var _ net.Error = flushError{}

// Buffered is how many bytes were read from the connection and not yet
// taken by the message reader.
func (w *wireReader) Buffered() int { return w.wp - w.rp }

// tookFlush reports whether the last error was errFlush, and forgets it.
func (w *wireReader) tookFlush() bool {
	f := w.flushed
	w.flushed = false
	return f
}

// Read implements io.Reader for pgproto3.
func (w *wireReader) Read(p []byte) (int, error) {
	if w.rp == w.wp {
		if w.flushFirst != nil && w.flushFirst() {
			w.flushed = true
			return 0, errFlush
		}
		if err := w.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, w.buf[w.rp:w.wp])
	w.rp += n
	return n, nil
}

// fill reads once from the connection into the (empty) buffer.
func (w *wireReader) fill() error {
	w.rp, w.wp = 0, 0
	if w.coalesce > 0 && w.lastN > 0 && w.lastN < coalesceBelow {
		// Flowing, and caught up: let the walsender's messages gather.
		if w.raw != nil && !w.lowat {
			w.lowat = setRecvLowat(w.raw, lowWatermark) == nil
		}
		w.waits.Add(1)
		time.Sleep(w.coalesce)
	}
	if w.lowat {
		// Back to waking on the first byte: a read that has to wait must
		// not wait for a watermark a trickle never reaches.
		if setRecvLowat(w.raw, 1) == nil {
			w.lowat = false
		}
	}
	n, err := w.r.Read(w.buf)
	w.lastN = n
	if n > 0 {
		w.wp = n
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// socketOf returns the socket under c (below TLS), or nil.
func socketOf(c net.Conn) net.Conn {
	type netConner interface{ NetConn() net.Conn }
	for i := 0; i < 4 && c != nil; i++ {
		switch c.(type) {
		case *net.TCPConn, *net.UnixConn:
			return c
		}
		nc, ok := c.(netConner)
		if !ok {
			return nil
		}
		c = nc.NetConn()
	}
	return nil
}
