package kafkatest

import (
	"io"

	kafkago "github.com/segmentio/kafka-go"
)

func readAllBytes(b kafkago.Bytes) ([]byte, error) {
	defer b.Close()
	return io.ReadAll(b)
}
