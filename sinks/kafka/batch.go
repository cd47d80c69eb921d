package kafka

import (
	"bytes"
	"fmt"
	"hash/crc32"

	kafkago "github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kbin"
	"github.com/twmb/franz-go/pkg/kmsg"
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// crcStart is the offset of Attributes, where the batch CRC-32C begins.
const crcStart = 21

// batchEncoder encodes the records of one partition into a Kafka record
// batch (magic 2, the format of produce v3+): no producer id, every record
// stamped with the batch's timestamp, offsets 0..n-1. The batch is sent
// pre-encoded (kafka-go's raw produce), so each record is encoded once, by
// appending, rather than through kafka-go's generic protocol encoder.
//
// A batchEncoder is used by one goroutine; it reuses its buffers.
type batchEncoder struct {
	codec   kafkago.Compression
	records []byte       // uncompressed records, when compressing
	zbuf    bytes.Buffer // compressed records
}

// appendBatch appends the batch holding recs, in order, to dst.
func (e *batchEncoder) appendBatch(dst []byte, recs []*record, timestampMs int64) ([]byte, error) {
	start := len(dst)
	b := kmsg.RecordBatch{
		FirstOffset:          0,
		PartitionLeaderEpoch: -1,
		Magic:                2,
		Attributes:           int16(e.codec) & 0x07,
		LastOffsetDelta:      int32(len(recs) - 1),
		FirstTimestamp:       timestampMs,
		MaxTimestamp:         timestampMs,
		ProducerID:           -1,
		ProducerEpoch:        -1,
		FirstSequence:        -1,
		NumRecords:           int32(len(recs)),
	}
	dst = b.AppendTo(dst) // Length and CRC are patched below
	if e.codec == 0 {
		for i, r := range recs {
			dst = appendRecord(dst, r, int32(i))
		}
	} else {
		e.records = e.records[:0]
		for i, r := range recs {
			e.records = appendRecord(e.records, r, int32(i))
		}
		e.zbuf.Reset()
		w := e.codec.Codec().NewWriter(&e.zbuf)
		if _, err := w.Write(e.records); err != nil {
			return dst[:start], fmt.Errorf("compressing a record batch (%s): %w", e.codec.Codec().Name(), err)
		}
		if err := w.Close(); err != nil {
			return dst[:start], fmt.Errorf("compressing a record batch (%s): %w", e.codec.Codec().Name(), err)
		}
		dst = append(dst, e.zbuf.Bytes()...)
	}
	batch := dst[start:]
	// Length counts the bytes after itself (FirstOffset and Length are 12).
	putInt32(batch[8:], int32(len(batch)-12))
	putInt32(batch[17:], int32(crc32.Checksum(batch[crcStart:], crc32c)))
	return dst, nil
}

// restamp sets the timestamps of an encoded record set (its int32 size,
// then the batch) to timestampMs and recomputes the batch CRC. Records keep
// their zero deltas, so every record takes the new time.
func restamp(set []byte, timestampMs int64) []byte {
	batch := set[4:]
	putInt64(batch[27:], timestampMs) // FirstTimestamp
	putInt64(batch[35:], timestampMs) // MaxTimestamp
	putInt32(batch[17:], int32(crc32.Checksum(batch[crcStart:], crc32c)))
	return set
}

func putInt64(b []byte, v int64) {
	putInt32(b, int32(v>>32))
	putInt32(b[4:], int32(v))
}

func putInt32(b []byte, v int32) {
	_ = b[3]
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}

// recordBodyLen is the encoded size of a record after its length prefix.
func recordBodyLen(r *record, offsetDelta int32) int {
	n := 1 + 1 + kbin.VarintLen(offsetDelta) // attributes, timestamp delta 0, offset delta
	if r.key == nil {
		n += kbin.VarintLen(-1)
	} else {
		n += kbin.VarintLen(int32(len(r.key))) + len(r.key)
	}
	if r.value == nil {
		n += kbin.VarintLen(-1)
	} else {
		n += kbin.VarintLen(int32(len(r.value))) + len(r.value)
	}
	n += kbin.VarintLen(int32(len(r.headers)))
	for _, h := range r.headers {
		n += kbin.VarintLen(int32(len(h.Key))) + len(h.Key) + kbin.VarintLen(int32(len(h.Value))) + len(h.Value)
	}
	return n
}

// appendRecord appends one record (Kafka's Record, with its length prefix).
func appendRecord(dst []byte, r *record, offsetDelta int32) []byte {
	dst = kbin.AppendVarint(dst, int32(recordBodyLen(r, offsetDelta)))
	dst = append(dst, 0)             // attributes
	dst = kbin.AppendVarlong(dst, 0) // timestamp delta
	dst = kbin.AppendVarint(dst, offsetDelta)
	if r.key == nil {
		dst = kbin.AppendVarint(dst, -1)
	} else {
		dst = kbin.AppendVarintBytes(dst, r.key)
	}
	if r.value == nil {
		dst = kbin.AppendVarint(dst, -1)
	} else {
		dst = kbin.AppendVarintBytes(dst, r.value)
	}
	dst = kbin.AppendVarint(dst, int32(len(r.headers)))
	for _, h := range r.headers {
		dst = kbin.AppendVarintString(dst, h.Key)
		dst = kbin.AppendVarintBytes(dst, h.Value)
	}
	return dst
}
