package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"

	"github.com/tidemark/tidemark/pipeline"
)

// truth is a test_decoding slot created before a workload: the server's own
// record of every committed transaction, to compare Kafka against.
type truth struct {
	e    *env
	slot string
}

type truthTxn struct {
	xid     uint32
	end     pipeline.LSN // end LSN of the commit record
	changes int
}

func (e *env) newTruth(name string) *truth {
	e.t.Helper()
	e.exec(`SELECT pg_create_logical_replication_slot($1, 'test_decoding')`, name)
	return &truth{e: e, slot: name}
}

// txns returns every transaction with changes committed so far, in commit
// order. It aggregates server-side, so that a transaction of hundreds of
// thousands of changes is not shipped to the test row by row; it sees only
// WAL the server has flushed.
func (tr *truth) txns() []truthTxn {
	tr.e.t.Helper()
	rows, err := tr.e.pool.Query(context.Background(), `
		SELECT xid::text, count(*) FILTER (WHERE data LIKE 'table %' AND data NOT LIKE 'table tidemark.%'), max(lsn) FILTER (WHERE data LIKE 'COMMIT%')::text
		FROM pg_logical_slot_peek_changes($1, NULL, NULL, 'include-xids', '1', 'skip-empty-xacts', '1')
		GROUP BY xid
		-- Tidemark's own bookkeeping (schema tidemark) is not captured.
		HAVING NOT (count(*) FILTER (WHERE data LIKE 'table tidemark.%') > 0 AND count(*) FILTER (WHERE data LIKE 'table %' AND data NOT LIKE 'table tidemark.%') = 0)
		ORDER BY max(lsn) FILTER (WHERE data LIKE 'COMMIT%')`, tr.slot)
	if err != nil {
		tr.e.t.Fatalf("peeking truth slot: %v", err)
	}
	defer rows.Close()
	var out []truthTxn
	for rows.Next() {
		var xidS string
		var n int
		var end *string
		if err := rows.Scan(&xidS, &n, &end); err != nil {
			tr.e.t.Fatal(err)
		}
		if end == nil {
			continue // not committed (cannot happen for a peek; be safe)
		}
		x, err := strconv.ParseUint(xidS, 10, 32)
		if err != nil {
			tr.e.t.Fatalf("truth slot xid %q: %v", xidS, err)
		}
		l, err := pipeline.ParseLSN(*end)
		if err != nil {
			tr.e.t.Fatal(err)
		}
		out = append(out, truthTxn{xid: uint32(x), end: l, changes: n})
	}
	if err := rows.Err(); err != nil {
		tr.e.t.Fatal(err)
	}
	return out
}

// kafkaTxns reads what Kafka holds: END records by xid, and the distinct
// positions per commit LSN in the table topics.
type kafkaView struct {
	ends      map[uint32]txnRecord
	positions map[uint64]map[uint32]bool
}

func (e *env) kafkaView(prefix string, tables []string) kafkaView {
	e.t.Helper()
	v := kafkaView{ends: map[uint32]txnRecord{}, positions: map[uint64]map[uint32]bool{}}
	for _, tr := range e.readTxns(prefix + ".transaction") {
		if tr.Status == "END" {
			v.ends[tr.TxID] = tr
		}
	}
	for _, t := range tables {
		for _, m := range e.read(prefix + "." + t) {
			l := uint64(m.Pos.CommitLSN)
			if v.positions[l] == nil {
				v.positions[l] = map[uint32]bool{}
			}
			v.positions[l][m.Pos.Seq] = true
		}
	}
	return v
}

// missing lists the transactions with end LSN <= upTo (all when upTo is 0)
// that Kafka does not hold completely.
func (v kafkaView) missing(txns []truthTxn, upTo pipeline.LSN) []string {
	var out []string
	for _, tt := range txns {
		if upTo != 0 && tt.end > upTo {
			continue
		}
		end, ok := v.ends[tt.xid]
		if !ok {
			out = append(out, fmt.Sprintf("xid %d (end %s): no END record", tt.xid, tt.end))
			continue
		}
		if pipeline.LSN(end.EndLSN) != tt.end {
			out = append(out, fmt.Sprintf("xid %d: END end_lsn %d, server says %s", tt.xid, end.EndLSN, tt.end))
		}
		if n := len(v.positions[end.LSN]); n != tt.changes || end.EventCount == nil || *end.EventCount != tt.changes {
			out = append(out, fmt.Sprintf("xid %d: server committed %d changes, Kafka holds %d (END says %v)", tt.xid, tt.changes, n, end.EventCount))
		}
	}
	return out
}

var buildOnce sync.Once
var buildErr error

// binary builds cmd/tidemark once per test run.
func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "tidemark-bin-")
		if buildErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", filepath.Join(binDir, "tidemark"), "github.com/tidemark/tidemark/cmd/tidemark").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "tidemark")
}

// kill SIGKILLs a running binary and waits for it, failing the test (not
// fatally) unless it died of that signal: a process that had already exited
// was not killed mid-anything, and its exit status says why it stopped.
func kill(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Errorf("SIGKILL pid %d: %v", cmd.Process.Pid, err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Errorf("pid %d after SIGKILL: wait returned %v, not a kill", cmd.Process.Pid, err)
		return
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("pid %d was not killed by SIGKILL: %v", cmd.Process.Pid, err)
	}
}
