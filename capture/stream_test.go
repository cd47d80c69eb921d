package capture

import (
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/tidemark/tidemark/pipeline"
)

// These tests drive the receive path (handleCopyData -> handleWAL ->
// handleRow) with hand-built frames, as the session loop does with each
// CopyData from the server. The connection is nil: on these paths it is only
// used to send standby status, which happens when the server asks for a
// reply, or while the pipeline is full; neither occurs here.

// receiver returns a Stream in the state session leaves it in before the
// first message.
func receiver(t *testing.T) *Stream {
	t.Helper()
	s, err := New(Config{DSN: "postgres://x", Slot: "s", Publication: "p"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.rels = map[uint32]*pipeline.Relation{}
	s.typeNames = map[uint32]string{}
	return s
}

// xlogData wraps a pgoutput message in an XLogData frame ('w') starting at
// walStart.
func xlogData(walStart uint64, msg []byte) []byte {
	b := binary.BigEndian.AppendUint64([]byte{pglogrepl.XLogDataByteID}, walStart)
	b = binary.BigEndian.AppendUint64(b, walStart+uint64(len(msg))) // server WAL end
	b = binary.BigEndian.AppendUint64(b, 0)                         // server time
	return append(b, msg...)
}

// keepalive is a primary keepalive frame ('k').
func keepalive(walEnd uint64, reply bool) []byte {
	b := binary.BigEndian.AppendUint64([]byte{pglogrepl.PrimaryKeepaliveMessageByteID}, walEnd)
	b = binary.BigEndian.AppendUint64(b, 0)
	if reply {
		return append(b, 1)
	}
	return append(b, 0)
}

// relationBytes is a Relation message for relid: table public.items with one
// text column "id", the replica identity.
func relationBytes(relid uint32) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'R'}, relid)
	b = append(b, "public\x00items\x00"...)
	b = append(b, 'd')                      // replica identity default
	b = binary.BigEndian.AppendUint16(b, 1) // columns
	b = append(b, 1)                        // flags: part of the key
	b = append(b, "id\x00"...)
	b = binary.BigEndian.AppendUint32(b, pgtype.TextOID)
	return binary.BigEndian.AppendUint32(b, 0xffffffff) // typmod -1
}

func beginBytes(finalLSN uint64, xid uint32) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'B'}, finalLSN)
	b = binary.BigEndian.AppendUint64(b, 0) // commit time
	return binary.BigEndian.AppendUint32(b, xid)
}

func truncateBytes(relids ...uint32) []byte {
	b := binary.BigEndian.AppendUint32([]byte{'T'}, uint32(len(relids)))
	b = append(b, 0) // options
	for _, id := range relids {
		b = binary.BigEndian.AppendUint32(b, id)
	}
	return b
}

func relBytes(id uint32) []byte { return binary.BigEndian.AppendUint32(nil, id) }

// emitted returns what the stream has produced for the pipeline: batches
// already handed over and the events still pending.
func emitted(s *Stream) []pipeline.Event {
	var evs []pipeline.Event
	for {
		select {
		case b := <-s.out:
			evs = append(evs, b.evs...)
			continue
		default:
		}
		return append(evs, s.pending...)
	}
}

func feed(t *testing.T, s *Stream, frame []byte) {
	t.Helper()
	if err := s.handleCopyData(context.Background(), nil, frame); err != nil {
		t.Fatalf("frame %x: %v", frame, err)
	}
}

// TestReceiveUnknownRelation: a change for a relation no Relation message
// described is a terminal error naming the relation id and the change's
// LSN, and none of it reaches the pipeline. A change for the described
// relation, fed first, shows the same message is otherwise accepted.
func TestReceiveUnknownRelation(t *testing.T) {
	const known, unknown = 42, 4711
	tests := []struct {
		name string
		msg  func(relid uint32) []byte
	}{
		{"insert", func(id uint32) []byte { return cat([]byte{'I'}, relBytes(id), []byte{'N'}, tupleBytes(sp("a"))) }},
		{"update", func(id uint32) []byte { return cat([]byte{'U'}, relBytes(id), []byte{'N'}, tupleBytes(sp("a"))) }},
		{"update with old key", func(id uint32) []byte {
			return cat([]byte{'U'}, relBytes(id), []byte{'K'}, tupleBytes(sp("a")), []byte{'N'}, tupleBytes(sp("b")))
		}},
		{"delete", func(id uint32) []byte { return cat([]byte{'D'}, relBytes(id), []byte{'K'}, tupleBytes(sp("a"))) }},
		{"truncate", func(id uint32) []byte { return truncateBytes(id) }},
		// The known relation first: nothing of the message may be emitted.
		{"truncate of a known and an unknown relation", func(id uint32) []byte {
			if id == known {
				return truncateBytes(known)
			}
			return truncateBytes(known, id)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := receiver(t)
			feed(t, s, xlogData(0x1000, relationBytes(known)))
			feed(t, s, xlogData(0x1100, beginBytes(0x3000, 77)))
			feed(t, s, xlogData(0x1200, tt.msg(known)))
			if len(s.pending) != 2 || s.pending[1].Kind != pipeline.EventChange || s.pending[1].Change.Rel.OID != known {
				t.Fatalf("the change for the known relation: pending %+v", s.pending)
			}

			err := s.handleCopyData(context.Background(), nil, xlogData(0x16B3F28, tt.msg(unknown)))
			if !errors.Is(err, ErrTerminal) {
				t.Fatalf("err = %v, want ErrTerminal", err)
			}
			for _, want := range []string{"unknown relation 4711", "0/16B3F28"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name %q", err, want)
				}
			}
			if evs := emitted(s); len(evs) != 2 {
				t.Errorf("emitted after the error: %+v, want only the Begin and the known relation's change", evs)
			}
		})
	}
}

// TestReceiveRefusesProtocolV2Messages: Tidemark asks for pgoutput protocol
// version 1; a Stream Start, Stop, Commit or Abort (version 2, streaming of
// in-progress transactions) is a terminal error naming the message and its
// LSN, neither a panic nor skipped.
func TestReceiveRefusesProtocolV2Messages(t *testing.T) {
	xid := relBytes(77)
	lsns := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, 0x3000), 0x3010)
	tests := []struct {
		name, want string
		msg        []byte
	}{
		{"stream start", "'S' (StreamStart)", cat([]byte{'S'}, xid, []byte{1})},
		{"stream stop", "'E' (StreamStop)", []byte{'E'}},
		{"stream commit", "'c' (StreamCommit)", cat([]byte{'c'}, xid, []byte{0}, lsns, make([]byte, 8))},
		{"stream abort", "'A' (StreamAbort)", cat([]byte{'A'}, xid, xid)},
	}
	for _, tt := range tests {
		for _, inTxn := range []bool{false, true} {
			name := tt.name + " between transactions"
			if inTxn {
				name = tt.name + " inside a transaction"
			}
			t.Run(name, func(t *testing.T) {
				s := receiver(t)
				if inTxn {
					feed(t, s, xlogData(0x1000, beginBytes(0x3000, 77)))
				}
				err := s.handleCopyData(context.Background(), nil, xlogData(0x2A0B0, tt.msg))
				if !errors.Is(err, ErrTerminal) {
					t.Fatalf("err = %v, want ErrTerminal", err)
				}
				for _, want := range []string{tt.want, "0/2A0B0", "protocol version 2"} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q does not name %q", err, want)
					}
				}
				for _, ev := range emitted(s) {
					if ev.Kind != pipeline.EventBegin {
						t.Errorf("emitted %+v", ev)
					}
				}
			})
		}
	}
}

// TestReceiveMalformedFrames: a truncated or garbled frame is an error that
// names what failed to parse (and where, once the XLogData header is
// readable), never a panic. Well-formed frames of each kind pass.
func TestReceiveMalformedFrames(t *testing.T) {
	tests := []struct {
		name     string
		frame    []byte
		want     []string // fragments of the error; nil: no error
		terminal bool
	}{
		{name: "keepalive", frame: keepalive(0x5000, false)},
		{name: "keepalive truncated", frame: keepalive(0x5000, false)[:6],
			want: []string{"parsing keepalive", "17 bytes, got 5"}},
		{name: "keepalive with a trailing byte", frame: append(keepalive(0x5000, false), 0),
			want: []string{"parsing keepalive", "17 bytes, got 18"}},
		{name: "keepalive without its body", frame: []byte{'k'}, want: []string{"parsing keepalive", "got 0"}},
		{name: "XLogData header truncated", frame: xlogData(0x5000, nil)[:11],
			want: []string{"parsing XLogData", "at least 24 bytes, got 10"}},
		{name: "XLogData without its header", frame: []byte{'w'}, want: []string{"parsing XLogData", "got 0"}},
		{name: "XLogData without a message", frame: xlogData(0x5000, nil), terminal: true,
			want: []string{"0/5000", "empty pgoutput message"}},
		{name: "relation", frame: xlogData(0x5000, relationBytes(42))},
		{name: "relation truncated in its name", frame: xlogData(0x5000, relationBytes(42)[:9]), terminal: true,
			want: []string{"'R' (Relation) at 0/5000"}},
		{name: "relation truncated in its columns", frame: xlogData(0x5000, relationBytes(42)[:22]), terminal: true,
			want: []string{"'R' (Relation) at 0/5000"}},
		{name: "begin truncated", frame: xlogData(0x5000, beginBytes(0x6000, 7)[:12]), terminal: true,
			want: []string{"'B' (Begin) at 0/5000", "BeginMessage must have 20 bytes, got 11"}},
		{name: "commit truncated", frame: xlogData(0x5000, []byte{'C', 0, 0, 0}), terminal: true,
			want: []string{"'C' (Commit) at 0/5000"}},
		{name: "type truncated", frame: xlogData(0x5000, []byte{'Y', 0, 0, 0, 1, 'p'}), terminal: true,
			want: []string{"'Y' (Type) at 0/5000"}},
		{name: "logical message truncated", frame: xlogData(0x5000, []byte{'M', 1, 0, 0}), terminal: true,
			want: []string{"'M' (Message) at 0/5000"}},
		{name: "truncate with more relations than bytes", frame: xlogData(0x5000, cat([]byte{'T', 0, 0, 0, 9, 0}, relBytes(42))), terminal: true,
			want: []string{"'T' (Truncate) at 0/5000", "9 relations"}},
		{name: "unknown message type", frame: xlogData(0x5000, []byte{'Z', 1, 2, 3}), terminal: true,
			want: []string{"'Z' (Unknown) at 0/5000"}},
		{name: "insert truncated in its header", frame: xlogData(0x5000, []byte{'I', 0, 0}), terminal: true,
			want: []string{"0/5000", `malformed pgoutput 'I' message: 3 bytes`}},
		{name: "insert with a column longer than the message", frame: xlogData(0x5000, cat([]byte{'I'}, relBytes(42), []byte{'N', 0, 1, 't', 0, 0, 0, 9, 'a'})),
			terminal: true, want: []string{"0/5000", "malformed pgoutput insert", "column 1 claims 9 bytes, 1 remain"}},
		{name: "delete without its old image", frame: xlogData(0x5000, cat([]byte{'D'}, relBytes(42), []byte{'K'})), terminal: true,
			want: []string{"0/5000", "malformed pgoutput delete", "tuple truncated before its column count"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := receiver(t)
			err := s.handleCopyData(context.Background(), nil, tt.frame)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("well-formed frame refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("frame %x accepted", tt.frame)
			}
			if errors.Is(err, ErrTerminal) != tt.terminal {
				t.Errorf("error %q: terminal %v, want %v", err, errors.Is(err, ErrTerminal), tt.terminal)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name %q", err, want)
				}
			}
			if evs := emitted(s); len(evs) != 0 {
				t.Errorf("emitted %+v", evs)
			}
		})
	}
}
