package integrity

import (
	"fmt"
	"slices"
	"testing"
)

// BenchmarkNewTxnAtBound: opening a transaction when
// max_open_transactions are open evicts the oldest one.
func BenchmarkNewTxnAtBound(b *testing.B) {
	for _, n := range []int{1000, 10000, 100000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			c := newTestChecker(&testing.T{})
			c.opt.MaxOpenTransactions = n
			lsn := uint64(1)
			for ; lsn <= uint64(n); lsn++ {
				c.newTxn(lsn)
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c.newTxn(lsn)
				lsn++
			}
		})
	}
}

// TestOpenTransactionBoundEvictsLowestLSN: at max_open_transactions, the
// open transaction with the lowest commit LSN is dropped, whatever order
// transactions opened in and after others were decided in between.
func TestOpenTransactionBoundEvictsLowestLSN(t *testing.T) {
	c := newTestChecker(t)
	c.opt.MaxOpenTransactions = 3
	open := func() []uint64 {
		var out []uint64
		for l := range c.txns {
			out = append(out, l)
		}
		slices.Sort(out)
		return out
	}
	step := func(lsn uint64, want ...uint64) {
		t.Helper()
		c.newTxn(lsn)
		if got := open(); !slices.Equal(got, want) {
			t.Fatalf("after opening %d: open %v, want %v", lsn, got, want)
		}
	}
	c.newTxn(50)
	c.newTxn(10)
	step(40, 10, 40, 50)
	step(30, 30, 40, 50) // 10 dropped
	c.removeTxn(40)      // decided
	step(45, 30, 45, 50)
	step(20, 20, 45, 50) // 30 dropped; then 20 opened (late, lowest)
	step(60, 45, 50, 60) // 20 dropped
	for _, l := range []uint64{10, 20, 30} {
		if !c.decided.has(fmt.Sprint(l)) {
			t.Errorf("dropped transaction %d not remembered as decided", l)
		}
	}
	if c.decided.has("40") || c.decided.has("50") {
		t.Error("a transaction still open or decided elsewhere was marked dropped")
	}
	// A transaction decided when complete leaves the heap too.
	feed(t, c, change("events", "c", 70, 0, key("$e"), nil, ev("$e")), change("event_json", "c", 70, 1, key("$e"), nil, js("$e")),
		end(t, 70, map[string]int{"public.events": 1, "public.event_json": 1}))
	if _, open := c.txns[70]; open || c.txnOrder.Len() != len(c.txns) {
		t.Errorf("after a decision: heap holds %d, map %d", c.txnOrder.Len(), len(c.txns))
	}
}
