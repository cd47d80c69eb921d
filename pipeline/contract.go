package pipeline

import "context"

// Source produces the events of committed transactions, in commit order, and
// learns which of them are durable downstream.
//
// Next blocks until an event is available, ctx ends, or the source fails.
// Events of one transaction arrive contiguously (Begin, Changes, Commit).
// Ack reports that every transaction whose EndLSN is <= lsn is durable in
// every sink; the source MAY then confirm lsn to Postgres. Ack MUST be cheap
// and MUST NOT block; it is called from the pipeline's writer goroutine.
type Source interface {
	Next(ctx context.Context) (Event, error)
	Ack(lsn LSN)
}

// BatchSource is a Source that can hand over several events per call, which
// the pipeline prefers. NextBatch appends the next events (at least one, in
// order) to dst, blocking like Next; the source MUST NOT keep references to
// dst. Next and NextBatch are called from one goroutine.
type BatchSource interface {
	Source
	NextBatch(ctx context.Context, dst []Event) ([]Event, error)
}

// Header is a Kafka-style message header.
type Header struct {
	Key   string
	Value []byte
}

// Message is one record for a sink.
type Message struct {
	Topic string
	// Key decides the partition (murmur2, as Java clients do). Nil means no
	// key.
	Key   []byte
	Value []byte
	// Headers repeat what consumers route on: tidemark-table, tidemark-op,
	// tidemark-lsn, tidemark-seq.
	Headers []Header
	// Broadcast asks the sink to deliver a copy to every partition of Topic
	// (used for truncates, which concern every key).
	Broadcast bool
	// Pos is the change's position (zero for transaction records).
	Pos Position
}

// Sink makes messages durable downstream.
//
// Write blocks until every message in msgs is durable, or returns an error.
// Messages with the same Topic and Key MUST become visible to consumers in
// the order they appear in msgs and after those of earlier Write calls, also
// when the sink retries internally. Write retries transient failures itself
// until ctx ends; an error it returns is terminal for this run. Write MUST
// NOT keep msgs after returning. Write is never called concurrently.
//
// Close flushes and releases resources; it waits for in-flight writes.
type Sink interface {
	Write(ctx context.Context, msgs []Message) error
	Close(ctx context.Context) error
}
