package bench

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// userHZ is the unit of the CPU times in /proc/<pid>/stat (USER_HZ, 100 on
// every Linux architecture Go supports).
const userHZ = 100

// procCPU returns the user+system CPU time a process has used so far, read
// from /proc/<pid>/stat (Linux only; false elsewhere or once it has exited).
func procCPU(pid int) (time.Duration, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// The command name (field 2) may contain spaces; fields after its
	// closing parenthesis start at field 3 (state).
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, false
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(utime+stime) * time.Second / userHZ, true
}

// walsenderCPU samples the CPU time of the walsender serving a slot while a
// drain runs (Postgres on this machine only). Stop returns the last sample,
// taken at most 10 ms before the walsender exited or Stop was called.
type walsenderCPU struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	last   time.Duration
}

func (e *env) sampleWalsender(ctx context.Context, slot string) *walsenderCPU {
	ctx, cancel := context.WithCancel(ctx)
	w := &walsenderCPU{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		pid := 0
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			if pid == 0 {
				var p *int32
				if err := e.pool.QueryRow(ctx, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&p); err == nil && p != nil {
					pid = int(*p)
				}
			}
			if pid != 0 {
				if c, ok := procCPU(pid); ok {
					w.mu.Lock()
					w.last = c
					w.mu.Unlock()
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

// Stop ends sampling and returns the walsender's CPU time (0 when it could
// not be read, e.g. Postgres on another machine).
func (w *walsenderCPU) Stop() time.Duration {
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.last
}

// procPeakRSS returns a process's peak resident set size so far (VmHWM in
// /proc/<pid>/status; Linux only, false elsewhere or once it has exited).
//
// It is read instead of the rusage that wait4 returns: on Linux a child's
// ru_maxrss also takes the high-water mark of the memory it was forked from
// (exec records the old mm's peak, and os/exec forks with the parent's
// memory), so a bench process that has grown (e.g. by counting a million
// positions) made a 70 MB Tidemark report 134 MB.
func procPeakRSS(pid int) (mb float64, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, found := strings.CutPrefix(l, "VmHWM:"); found {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				return 0, false
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, false
			}
			return float64(kb) / 1024, true
		}
	}
	return 0, false
}
