package app

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

type concurrencyProbe struct {
	in, overlaps atomic.Int32
}

func (p *concurrencyProbe) Write(context.Context, []pipeline.Message) error {
	if p.in.Add(1) > 1 {
		p.overlaps.Add(1)
	}
	time.Sleep(time.Millisecond)
	p.in.Add(-1)
	return nil
}
func (p *concurrencyProbe) Close(context.Context) error { return nil }

// TestSerialSinkNeverOverlaps: writers on several goroutines (the consumer
// and the webhook's dead-letter hook) never call the shared sink at once.
func TestSerialSinkNeverOverlaps(t *testing.T) {
	probe := &concurrencyProbe{}
	s := &serialSink{sink: probe}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				_ = s.Write(context.Background(), nil)
			}
		}()
	}
	wg.Wait()
	if n := probe.overlaps.Load(); n != 0 {
		t.Fatalf("%d writes overlapped another", n)
	}
}
