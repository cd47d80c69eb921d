package app

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestRedisLoggerBoundsRepeats: go-redis's per-attempt lines ("failed to
// dial") reach the log once per format per minute, with the count held
// back, instead of once per retry on stderr.
func TestRedisLoggerBoundsRepeats(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	now := time.Unix(1000, 0)
	l := &redisLogger{now: func() time.Time { return now }, seen: map[string]*redisLogEntry{}}
	l.log.Store(zap.New(core))
	const dial = "redis: connection pool: failed to dial after %d attempts: %v"
	for i := 0; i < 50; i++ {
		l.Printf(context.Background(), dial, 5, "connection refused")
		now = now.Add(100 * time.Millisecond)
	}
	l.Printf(context.Background(), "redis: discarding bad PubSub connection: %v", "EOF")
	if logs.Len() != 2 {
		t.Fatalf("50 dial failures in 5 s and one other line logged %d entries, want 2", logs.Len())
	}
	now = now.Add(time.Minute)
	l.Printf(context.Background(), dial, 5, "connection refused")
	all := logs.All()
	if len(all) != 3 || all[2].ContextMap()["similar_lines_withheld"] != int64(49) {
		t.Fatalf("after a minute: %d entries, last %v; want 3 with 49 withheld", len(all), all[len(all)-1].ContextMap())
	}
}
