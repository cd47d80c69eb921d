package pipeline

import (
	"context"
	"testing"
	"time"
)

// TestFillStopsWhenReaderBlocked: a lingering writer returns as soon as the
// reader cannot push (here: the next entry does not fit the byte budget,
// although the budget is not yet full), not when the linger ends.
func TestFillStopsWhenReaderBlocked(t *testing.T) {
	var st Stats
	q := newQueue(1000, 10000, &st)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	big := entry{msg: Message{Topic: "t", Value: make([]byte, 3000)}}
	if err := q.push(ctx, big); err != nil {
		t.Fatal(err)
	}
	pushed := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < 5 && err == nil; i++ { // the fourth does not fit
			err = q.push(ctx, big)
		}
		pushed <- err
	}()
	batch, err := q.take(ctx, nil, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	start := time.Now()
	batch, err = q.fill(ctx, batch, 100, 50, 5*time.Second, timer, nil)
	if err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		t.Fatalf("fill waited %v with the reader blocked", waited)
	}
	if len(batch) != 3 {
		t.Fatalf("fill returned %d entries, want the 3 that fit", len(batch))
	}
	var size int64
	for i := range batch {
		size += batch[i].size
	}
	q.release(len(batch), size)
	if err := <-pushed; err != nil {
		t.Fatal(err)
	}
}

// TestFillLingers: with nothing more coming, fill returns after its linger
// with what it had; entries pushed meanwhile are included.
func TestFillLingers(t *testing.T) {
	var st Stats
	q := newQueue(1000, 1<<20, &st)
	ctx := context.Background()
	_ = q.push(ctx, entry{msg: Message{Topic: "t"}})
	batch, _ := q.take(ctx, nil, 100, nil)
	go func() {
		time.Sleep(5 * time.Millisecond)
		_ = q.push(ctx, entry{msg: Message{Topic: "t"}})
	}()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	start := time.Now()
	batch, err := q.fill(ctx, batch, 100, 50, 200*time.Millisecond, timer, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(batch) != 2 {
		t.Fatalf("fill returned %d entries, want 2", len(batch))
	}
	if waited := time.Since(start); waited < 150*time.Millisecond {
		t.Fatalf("fill returned after %v, before its linger", waited)
	}
}
