package integrity

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/pgserver"
)

func newTestLock(t *testing.T, dsn, group string, log *zap.Logger) *GroupLock {
	t.Helper()
	return &GroupLock{Schema: "tidemark", Group: group, Log: log,
		Poll: 50 * time.Millisecond, Check: 50 * time.Millisecond, LossGrace: 2 * time.Second,
		Connect: func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, dsn) }}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestGroupLockOneMember: a second member of a group waits (warned once,
// naming the holder, Waiting true) until the first stops; another group
// does not wait.
func TestGroupLockOneMember(t *testing.T) {
	dsn := pgserver.ForTest(t)
	ctx := context.Background()
	a := newTestLock(t, dsn, "g1", nil)
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	holdCtx, stopA := context.WithCancel(ctx)
	aDone := make(chan error, 1)
	go func() { aDone <- a.Hold(holdCtx) }()

	other := newTestLock(t, dsn, "g2", nil)
	octx, ocancel := context.WithTimeout(ctx, 5*time.Second)
	defer ocancel()
	if err := other.Acquire(octx); err != nil {
		t.Fatalf("another group waited for g1's lock: %v", err)
	}
	other.release()

	core, logs := observer.New(zap.InfoLevel)
	b := newTestLock(t, dsn, "g1", zap.New(core))
	bDone := make(chan error, 1)
	bctx, bcancel := context.WithCancel(ctx)
	defer bcancel()
	go func() { bDone <- b.Acquire(bctx) }()
	eventually(t, "the second member to wait", b.Waiting)
	time.Sleep(300 * time.Millisecond) // several polls
	select {
	case err := <-bDone:
		t.Fatalf("second member of g1 took the lock while the first held it (err %v)", err)
	default:
	}
	warns := logs.FilterLevelExact(zap.WarnLevel).All()
	if len(warns) != 1 || b.Waits() != 1 {
		t.Fatalf("want one warning and one wait, got %d warnings, %d waits: %v", len(warns), b.Waits(), warns)
	}
	holder := warns[0].ContextMap()["holder"].(string)
	if !strings.Contains(holder, "backend pid ") || strings.Contains(holder, "unknown") {
		t.Fatalf("the warning does not name the holder: %q", holder)
	}

	stopA()
	if err := <-aDone; err != nil {
		t.Fatalf("first member's Hold: %v", err)
	}
	select {
	case err := <-bDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the second member did not take the lock after the first stopped")
	}
	if b.Waiting() {
		t.Fatal("Waiting still true after the lock was taken")
	}
	b.release()
}

func terminate(t *testing.T, dsn string, pid uint32) {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var ok bool
	if err := conn.QueryRow(context.Background(), `SELECT pg_terminate_backend($1)`, int32(pid)).Scan(&ok); err != nil || !ok {
		t.Fatalf("terminating backend %d: %v %v", pid, ok, err)
	}
}

// TestGroupLockLost: a lost lock connection is replaced and the lock taken
// again when nobody else took it; when another member took it meanwhile,
// Hold ends with ErrLockLost naming the group.
func TestGroupLockLost(t *testing.T) {
	dsn := pgserver.ForTest(t)
	ctx := context.Background()
	a := newTestLock(t, dsn, "lost", nil)
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	holdCtx, stopA := context.WithCancel(ctx)
	defer stopA()
	aDone := make(chan error, 1)
	go func() { aDone <- a.Hold(holdCtx) }()

	// Nobody else waits: the lock is taken again on a new connection.
	first := a.pid()
	terminate(t, dsn, first)
	probe := newTestLock(t, dsn, "lost", nil)
	eventually(t, "the lock to be taken again", func() bool {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			return false
		}
		defer conn.Close(ctx)
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
  AND classid = hashtext($1)::oid AND objid = hashtext($2)::oid AND pid <> $3`, lockKeyClass, "tidemark.lost", int32(first)).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 1
	})
	select {
	case err := <-aDone:
		t.Fatalf("Hold ended after a connection loss nobody else used: %v", err)
	default:
	}

	stopA()
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
	// A second member waits; when the holder's connection dies it takes
	// the lock, and the first member must stop. (The holder checks its
	// connection every second, the waiter polls every 50 ms: the waiter
	// wins the released lock.)
	a = newTestLock(t, dsn, "lost", nil)
	a.Check = time.Second
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	holdCtx2, stopA2 := context.WithCancel(ctx)
	defer stopA2()
	go func() { aDone <- a.Hold(holdCtx2) }()
	bctx, bcancel := context.WithCancel(ctx)
	defer bcancel()
	bDone := make(chan error, 1)
	go func() { bDone <- probe.Acquire(bctx) }()
	eventually(t, "the second member to wait", probe.Waiting)
	terminate(t, dsn, a.pid())
	select {
	case err := <-bDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting member did not take the released lock")
	}
	select {
	case err := <-aDone:
		if !errors.Is(err, ErrLockLost) || !strings.Contains(err.Error(), `group "lost"`) {
			t.Fatalf("want ErrLockLost naming the group, got %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the member whose lock another took went on")
	}
	probe.release()
}
