// Package leakcheck fails a test binary that leaves goroutines of the code
// under test running (what prometheus' util/testutil does with goleak),
// looking only at goroutines whose stacks mention the given markers, so the
// harnesses' own servers do not count.
package leakcheck

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Main runs the tests, then, when they passed, waits up to 5 s for
// goroutines whose stack contains any of markers to end; any left make the
// binary fail, and their stacks are printed. Call it from TestMain.
func Main(m *testing.M, markers ...string) {
	code := m.Run()
	if code == 0 {
		if leaked := Wait(5*time.Second, markers...); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines leaked by the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// Wait returns the stacks of goroutines mentioning a marker that are still
// running after within ("" when none).
func Wait(within time.Duration, markers ...string) string {
	deadline := time.Now().Add(within)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "leakcheck.") {
				continue // this check itself
			}
			for _, m := range markers {
				if strings.Contains(g, m) {
					leaked = append(leaked, g)
					break
				}
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
