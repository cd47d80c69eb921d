package invalidation

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/pipeline"
)

// TestReplayFloorCountsResentRecords: records a capture crash re-sent (at
// later offsets, with older positions) and not yet consumed bound the
// floor; without them it would be the last consumed record's position.
func TestReplayFloorCountsResentRecords(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, pgserver.ForTest(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `SELECT pg_create_logical_replication_slot('floor_slot', 'pgoutput')`); err != nil {
		t.Fatal(err)
	}
	defer func() { _, _ = pool.Exec(context.Background(), `SELECT pg_drop_replication_slot('floor_slot')`) }()
	cl := kafkatest.ForTest(t)
	const topic, group = "floor.public.t", "floor-group"
	rec := func(lsn int) kafkago.Message {
		return kafkago.Message{Value: []byte("{}"), Headers: []kafkago.Header{
			{Key: "tidemark-lsn", Value: []byte(strconv.Itoa(lsn))}, {Key: "tidemark-seq", Value: []byte("0")}}}
	}
	var msgs []kafkago.Message
	for lsn := 1; lsn <= 10; lsn++ { // offsets 0-9
		msgs = append(msgs, rec(lsn))
	}
	for lsn := 6; lsn <= 10; lsn++ { // re-sent after a crash: offsets 10-14
		msgs = append(msgs, rec(lsn))
	}
	produce(t, ctx, cl.Brokers(), topic, msgs...)
	client := &kafkago.Client{Addr: kafkago.TCP(cl.Brokers()...), Timeout: 10 * time.Second}
	commit := func(off int64) {
		t.Helper()
		if _, err := client.OffsetCommit(ctx, &kafkago.OffsetCommitRequest{GroupID: group, GenerationID: -1,
			Topics: map[string][]kafkago.OffsetCommit{topic: {{Partition: 0, Offset: off}}}}); err != nil {
			t.Fatal(err)
		}
	}
	commit(10) // consumed 0-9, the re-sent 10-14 not yet
	w, why, err := ReplayFloor(ctx, pool, "floor_slot", cl.Brokers(), nil, group, []string{topic})
	if err != nil || why != "" {
		t.Fatalf("floor: %v %q", err, why)
	}
	if want := (pipeline.Position{CommitLSN: 6}); w != want {
		t.Fatalf("floor %s with re-sent records from 6 unconsumed, want %s", w, want)
	}
	commit(15)
	if w, why, err = ReplayFloor(ctx, pool, "floor_slot", cl.Brokers(), nil, group, []string{topic}); err != nil || why != "" {
		t.Fatalf("floor: %v %q", err, why)
	}
	if want := (pipeline.Position{CommitLSN: 10}); w != want {
		t.Fatalf("floor %s once everything is consumed, want %s", w, want)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	pgserver.StopShared()
	os.Exit(code)
}
