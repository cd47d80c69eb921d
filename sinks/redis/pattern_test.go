package redis

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

// TestInvalidatePattern: every key matching a pattern goes, over several
// SCAN rounds and UNLINK batches; keys that do not match stay; a literal
// glob character matches only itself when escaped.
func TestInvalidatePattern(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	admin := srv.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var match []string
	for i := range 2500 { // more than one SCAN COUNT and many batches of 7
		match = append(match, fmt.Sprintf("room:!r%d:members", i))
	}
	kept := []string{"room:!r1:timeline", "user:@a:rooms", "roomx:!r1:members", `odd\*`}
	setKeys(t, admin, append(append(match, kept...), "odd*", "odd*x"))
	s := newSink(t, srv, Config{BatchSize: 7})
	n, err := s.InvalidatePattern(ctx, []string{"room:*:members", `odd\*`})
	if err != nil {
		t.Fatal(err)
	}
	if n != len(match)+1 {
		t.Errorf("deleted %d keys, want %d", n, len(match)+1)
	}
	if left, err := admin.Exists(ctx, append(match, "odd*")...).Result(); err != nil || left != 0 {
		t.Errorf("%d matching keys left (%v)", left, err)
	}
	if left, err := admin.Exists(ctx, append(kept, "odd*x")...).Result(); err != nil || left != int64(len(kept)+1) {
		t.Errorf("%d of %d other keys left (%v)", left, len(kept)+1, err)
	}
	if n, err := s.InvalidatePattern(ctx, []string{"room:*:members"}); err != nil || n != 0 {
		t.Errorf("again: %d, %v; want 0, nil (idempotent)", n, err)
	}
}

// TestCheckPatternPermissions: Check with UsePattern refuses a user that
// may not run SCAN, naming the command and the ACL fix.
func TestCheckPatternPermissions(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t, redistest.WithUser("noscan", userPassword, "~*", "&*", "-@all", "+del", "+multi", "+unlink"),
		redistest.WithUser("pattern", userPassword, "~*", "&*", "-@all", "+del", "+multi", "+unlink", "+scan"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := newSink(t, srv, Config{Username: "noscan", Password: userPassword}).Check(ctx, UseInvalidate|UsePattern)
	if err == nil || !IsPermanent(err) || !strings.Contains(err.Error(), "SCAN") || !strings.Contains(err.Error(), "+scan +unlink") {
		t.Errorf("Check as a user without scan: %v", err)
	}
	if err := newSink(t, srv, Config{Username: "pattern", Password: userPassword}).Check(ctx, UseInvalidate|UsePattern); err != nil {
		t.Errorf("Check as a user with scan and unlink: %v", err)
	}
}

// TestInvalidatePatternVersioned: in versioned mode the markers and leases
// of the matching keys go too (a fill in flight of a flushed key is then
// refused); other keys' markers stay.
func TestInvalidatePatternVersioned(t *testing.T) {
	t.Parallel()
	srv := redistest.ForTest(t)
	admin := srv.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	prefix := redisfill.DefaultMarkerPrefix
	gone := []string{"room:!a:members", redisfill.MarkerKey(prefix, "room:!a:members"), redisfill.MarkerKey(prefix, "room:{!b}:members")}
	kept := []string{"user:@a:rooms", redisfill.MarkerKey(prefix, "user:@a:rooms")}
	setKeys(t, admin, append(gone, kept...))
	s := newSink(t, srv, Config{Mode: ModeVersioned})
	if _, err := s.InvalidatePattern(ctx, []string{"room:*:members"}); err != nil {
		t.Fatal(err)
	}
	for _, k := range gone {
		if n, _ := admin.Exists(ctx, k).Result(); n != 0 {
			t.Errorf("%s still exists", k)
		}
	}
	if n, err := admin.Exists(ctx, kept...).Result(); err != nil || n != int64(len(kept)) {
		t.Errorf("%d of %d other keys left (%v)", n, len(kept), err)
	}
}

// TestPatternScanOrderMarkersFirst: in versioned mode the markers go
// before the keys (see scanOrder); delete mode scans only the keys.
func TestPatternScanOrderMarkersFirst(t *testing.T) {
	v := &Sink{cfg: Config{Mode: ModeVersioned, MarkerPrefix: "m:"}}
	got := v.scanOrder([]string{"room:*:members", "user:*:rooms"})
	want := []string{"m:{*}room:*:members", "m:{*}user:*:rooms", "room:*:members", "user:*:rooms"}
	if !slices.Equal(got, want) {
		t.Errorf("versioned scan order %q, want %q", got, want)
	}
	d := &Sink{cfg: Config{Mode: ModeDelete}}
	if got := d.scanOrder([]string{"room:*:members"}); !slices.Equal(got, []string{"room:*:members"}) {
		t.Errorf("delete mode scans %q", got)
	}
}
