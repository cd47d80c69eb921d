package kafka

import (
	"bytes"
	"fmt"
	"hash/crc32"
	"io"
	"testing"

	kafkago "github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kbin"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/tidemark/tidemark/pipeline"
)

// TestBatchEncoding decodes encoded batches with franz-go's kmsg (an
// independent decoder) for every codec: header fields, CRC-32C, Length and
// every record's key (incl. nil), value, headers and offset delta.
func TestBatchEncoding(t *testing.T) {
	var recs []*record
	for i := 0; i < 300; i++ {
		r := &record{value: bytes.Repeat([]byte{byte('a' + i%26)}, i*7%500),
			headers: []pipeline.Header{{Key: "tidemark-lsn", Value: []byte(fmt.Sprint(1000 + i))}, {Key: "tidemark-seq", Value: []byte{}}}}
		if i%5 != 0 {
			r.key = []byte(fmt.Sprintf(`{"room_id":"!r%d"}`, i))
		}
		if i%17 == 0 {
			r.value = nil // a tombstone
			r.headers = nil
		}
		recs = append(recs, r)
	}
	for _, codec := range []kafkago.Compression{0, kafkago.Gzip, kafkago.Snappy, kafkago.Lz4, kafkago.Zstd} {
		name := "none"
		if codec != 0 {
			name = codec.String()
		}
		t.Run(name, func(t *testing.T) {
			enc := batchEncoder{codec: codec}
			prefix := []byte("prefix")
			out, err := enc.appendBatch(append([]byte(nil), prefix...), recs, 1732262400123)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out[:len(prefix)], prefix) {
				t.Fatal("appendBatch overwrote dst")
			}
			raw := out[len(prefix):]
			var b kmsg.RecordBatch
			if err := b.ReadFrom(raw); err != nil {
				t.Fatalf("kmsg cannot read the batch: %v", err)
			}
			if int(b.Length) != len(raw)-12 {
				t.Fatalf("Length %d, want %d", b.Length, len(raw)-12)
			}
			if want := int32(crc32.Checksum(raw[21:], crc32.MakeTable(crc32.Castagnoli))); b.CRC != want {
				t.Fatalf("CRC %d, want %d", b.CRC, want)
			}
			if b.Magic != 2 || b.NumRecords != int32(len(recs)) || b.LastOffsetDelta != int32(len(recs)-1) ||
				b.FirstTimestamp != 1732262400123 || b.MaxTimestamp != 1732262400123 || b.ProducerID != -1 ||
				b.FirstOffset != 0 || b.PartitionLeaderEpoch != -1 || b.ProducerEpoch != -1 || b.FirstSequence != -1 ||
				b.Attributes&7 != int16(codec) {
				t.Fatalf("header: %+v", b)
			}
			records := b.Records
			if codec != 0 {
				r := codec.Codec().NewReader(bytes.NewReader(b.Records))
				if records, err = io.ReadAll(r); err != nil {
					t.Fatal(err)
				}
			}
			for i, want := range recs {
				l, n := kbin.Varint(records)
				if n == 0 || int(l)+n > len(records) {
					t.Fatalf("record %d: bad length", i)
				}
				var got kmsg.Record
				if err := got.ReadFrom(records[:n+int(l)]); err != nil {
					t.Fatalf("record %d: %v", i, err)
				}
				records = records[n+int(l):]
				if got.OffsetDelta != int32(i) || got.TimestampDelta64 != 0 {
					t.Fatalf("record %d: offset delta %d, timestamp delta %d", i, got.OffsetDelta, got.TimestampDelta64)
				}
				if (got.Key == nil) != (want.key == nil) || !bytes.Equal(got.Key, want.key) {
					t.Fatalf("record %d: key %q, want %q", i, got.Key, want.key)
				}
				if (got.Value == nil) != (want.value == nil) || !bytes.Equal(got.Value, want.value) {
					t.Fatalf("record %d: value of %d bytes, want %d", i, len(got.Value), len(want.value))
				}
				if len(got.Headers) != len(want.headers) {
					t.Fatalf("record %d: %d headers, want %d", i, len(got.Headers), len(want.headers))
				}
				for j, h := range want.headers {
					if got.Headers[j].Key != h.Key || !bytes.Equal(got.Headers[j].Value, h.Value) {
						t.Fatalf("record %d header %d: %q=%q, want %q=%q", i, j, got.Headers[j].Key, got.Headers[j].Value, h.Key, h.Value)
					}
				}
			}
			if len(records) != 0 {
				t.Fatalf("%d trailing bytes", len(records))
			}
		})
	}
}

// TestRestamp: a re-stamped record set still decodes, with the new
// timestamps, a valid CRC and unchanged records; the other header fields
// keep their values.
func TestRestamp(t *testing.T) {
	recs := []*record{{key: []byte("k"), value: []byte("v")}, {value: []byte("w")}}
	enc := batchEncoder{}
	set, err := enc.appendBatch([]byte{0, 0, 0, 0}, recs, 1000)
	if err != nil {
		t.Fatal(err)
	}
	before := append([]byte(nil), set...)
	restamp(set, 1732262400999)
	var b kmsg.RecordBatch
	if err := b.ReadFrom(set[4:]); err != nil {
		t.Fatal(err)
	}
	if b.FirstTimestamp != 1732262400999 || b.MaxTimestamp != 1732262400999 {
		t.Fatalf("timestamps %d/%d", b.FirstTimestamp, b.MaxTimestamp)
	}
	if want := int32(crc32.Checksum(set[4+21:], crc32.MakeTable(crc32.Castagnoli))); b.CRC != want {
		t.Fatalf("CRC %d, want %d", b.CRC, want)
	}
	if b.FirstOffset != 0 || b.PartitionLeaderEpoch != -1 || b.ProducerEpoch != -1 || b.FirstSequence != -1 || b.NumRecords != 2 {
		t.Fatalf("header: %+v", b)
	}
	if !bytes.Equal(set[4+61:], before[4+61:]) {
		t.Fatal("records changed")
	}
}
