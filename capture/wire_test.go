package capture

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// wirePair is a TCP connection whose client side reads through a
// wireReader into pgproto3, as a replication connection does.
type wirePair struct {
	server net.Conn
	client net.Conn
	wire   *wireReader
	fe     *pgproto3.Frontend
}

func newWirePair(t *testing.T) *wirePair {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	w := newWireReader(client)
	w.raw = socketOf(client)
	return &wirePair{server: server, client: client, wire: w, fe: pgproto3.NewFrontend(w, io.Discard)}
}

func copyData(t *testing.T, payload string) []byte {
	t.Helper()
	b, err := (&pgproto3.CopyData{Data: []byte(payload)}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (p *wirePair) receive(t *testing.T, within time.Duration) (string, error) {
	t.Helper()
	if err := p.client.SetReadDeadline(time.Now().Add(within)); err != nil {
		t.Fatal(err)
	}
	msg, err := p.fe.Receive()
	if err != nil {
		return "", err
	}
	cd, ok := msg.(*pgproto3.CopyData)
	if !ok {
		t.Fatalf("received %T, want CopyData", msg)
	}
	return string(cd.Data), nil
}

// netTimeout reports a timeout as pgconn judges one when deciding whether
// the connection survives it (pgconn then wraps it in its own errTimeout).
func netTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (p *wirePair) buffered() bool { return p.wire.Buffered() > 0 || p.fe.ReadBufferLen() > 0 }

// TestWireReaderHandsOverBeforeWaiting: while messages are buffered the
// stream can see it (and hold its batch); once nothing is buffered, a read
// with a batch held returns errFlush at once instead of waiting, and a
// message split across writes survives errFlush intact.
func TestWireReaderHandsOverBeforeWaiting(t *testing.T) {
	p := newWirePair(t)
	held := false
	p.wire.flushFirst = func() bool { return held }
	if _, err := p.server.Write(append(copyData(t, "one"), copyData(t, "two")...)); err != nil {
		t.Fatal(err)
	}
	if got, err := p.receive(t, 5*time.Second); err != nil || got != "one" {
		t.Fatalf("first message %q, %v", got, err)
	}
	if !p.buffered() {
		t.Error("the second message, read with the first, is not reported as buffered")
	}
	if got, err := p.receive(t, 5*time.Second); err != nil || got != "two" {
		t.Fatalf("second message %q, %v", got, err)
	}
	if p.buffered() {
		t.Error("nothing is left, yet data is reported as buffered")
	}

	held = true
	start := time.Now()
	_, err := p.receive(t, 5*time.Second)
	if !errors.Is(err, errFlush) || !netTimeout(err) || !p.wire.tookFlush() {
		t.Fatalf("read with a batch held and nothing buffered: %v, want errFlush (a timeout)", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("errFlush came after %s: the read waited on the connection", d)
	}
	held = false

	// A message split across two writes, with errFlush between its halves.
	third := copyData(t, "three, in two halves")
	if _, err := p.server.Write(third[:7]); err != nil {
		t.Fatal(err)
	}
	if _, err := p.receive(t, 200*time.Millisecond); !netTimeout(err) {
		t.Fatalf("half a message: %v, want a timeout", err)
	}
	held = true
	if _, err := p.receive(t, 5*time.Second); !errors.Is(err, errFlush) {
		t.Fatalf("half a message, batch held: %v, want errFlush", err)
	}
	held = false
	if _, err := p.server.Write(third[7:]); err != nil {
		t.Fatal(err)
	}
	if got, err := p.receive(t, 5*time.Second); err != nil || got != "three, in two halves" {
		t.Fatalf("the split message after errFlush: %q, %v", got, err)
	}
}

// TestWireReaderCoalesces: after a short read of a flowing stream the next
// read first waits (counted), and a trickle still arrives promptly after a
// wait (the raised low watermark is lowered again before a read that has to
// wait).
func TestWireReaderCoalesces(t *testing.T) {
	p := newWirePair(t)
	p.wire.coalesce = 5 * time.Millisecond
	if _, err := p.server.Write(copyData(t, "a")); err != nil {
		t.Fatal(err)
	}
	if got, err := p.receive(t, 5*time.Second); err != nil || got != "a" {
		t.Fatalf("%q, %v", got, err)
	}
	if w := p.wire.waits.Load(); w != 0 {
		t.Errorf("%d waits before the first read", w)
	}
	// The next message arrives after the wait begins; it must still come
	// promptly, well before the deadline.
	go func() {
		time.Sleep(30 * time.Millisecond)
		_, _ = p.server.Write(copyData(t, "b"))
	}()
	start := time.Now()
	if got, err := p.receive(t, 3*time.Second); err != nil || got != "b" {
		t.Fatalf("a trickle after a coalescing wait: %q, %v (after %s)", got, err, time.Since(start))
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("a small message took %s after a coalescing wait (low watermark left raised?)", d)
	}
	if w := p.wire.waits.Load(); w != 1 {
		t.Errorf("%d coalescing waits after a short read, want 1", w)
	}

	// Whether a read waits depends on the previous read only: see
	// TestWireReaderWaitsOnlyAfterShortReads for the rule itself.
}

// chunkedReader returns the given sizes of bytes, one per Read.
type chunkedReader struct{ sizes []int }

func (c *chunkedReader) Read(p []byte) (int, error) {
	if len(c.sizes) == 0 {
		return 0, io.EOF
	}
	n := min(c.sizes[0], len(p))
	c.sizes = c.sizes[1:]
	return n, nil
}

// TestWireReaderWaitsOnlyAfterShortReads: a read waits (coalesces) only
// when the previous one returned less than coalesceBelow; after a read that
// filled the buffer, or the first read, it reads at once.
func TestWireReaderWaitsOnlyAfterShortReads(t *testing.T) {
	src := &chunkedReader{sizes: []int{wireBufSize, wireBufSize, 100, 100, wireBufSize, 100}}
	w := newWireReader(src)
	w.coalesce = time.Microsecond
	want := []uint64{0, 0, 0, 1, 2, 2} // waits after each fill
	buf := make([]byte, wireBufSize)
	for i, wv := range want {
		if _, err := w.Read(buf); err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
		for w.Buffered() > 0 { // take the rest of this fill
			if _, err := w.Read(buf); err != nil {
				t.Fatalf("read %d: %v", i, err)
			}
		}
		if got := w.waits.Load(); got != wv {
			t.Errorf("after fill %d (sizes %v): %d coalescing waits, want %d", i, []int{wireBufSize, wireBufSize, 100, 100, wireBufSize, 100}[:i+1], got, wv)
		}
	}
}
