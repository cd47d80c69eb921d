package redis

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/pipeline"
	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

// TestModes: in versioned mode InvalidateAt deletes each key and leaves its
// marker with the change's position and the marker TTL; in delete mode
// (the default) it sends plain DELs and writes nothing else.
func TestModes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	at := []KeyAt{
		{Key: "room:!r1:members", Pos: pipeline.Position{CommitLSN: 0x16B3748, Seq: 2}},
		{Key: "room:{!r2}:timeline", Pos: pipeline.Position{CommitLSN: 1<<40 + 1, Seq: 0}},
	}
	for _, tc := range []struct {
		name    string
		mode    Mode
		markers bool
	}{
		{name: "default", mode: "", markers: false},
		{name: "delete", mode: ModeDelete, markers: false},
		{name: "versioned", mode: ModeVersioned, markers: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := redistest.ForTest(t)
			c := srv.Client()
			s := newSink(t, srv, Config{Mode: tc.mode, MarkerPrefix: "m:", MarkerTTL: 30 * time.Second})
			setKeys(t, c, []string{at[0].Key, at[1].Key, "kept"})
			if err := s.InvalidateAt(ctx, at); err != nil {
				t.Fatalf("InvalidateAt: %v", err)
			}
			if n := c.Exists(ctx, at[0].Key, at[1].Key).Val(); n != 0 {
				t.Errorf("%d invalidated keys still exist", n)
			}
			markers := c.Keys(ctx, "m:*").Val()
			if !tc.markers {
				if len(markers) != 0 || c.DBSize(ctx).Val() != 1 {
					t.Errorf("delete mode wrote %v (database size %d); want only the untouched key left", markers, c.DBSize(ctx).Val())
				}
				return
			}
			for _, k := range at {
				mk := redisfill.MarkerKey("m:", k.Key)
				if got, want := c.Get(ctx, mk).Val(), redisfill.Marker(k.Pos); got != want {
					t.Errorf("marker %q = %q, want %q", mk, got, want)
				}
				if ttl := c.PTTL(ctx, mk).Val(); ttl <= 25*time.Second || ttl > 30*time.Second {
					t.Errorf("marker %q TTL = %v, want about 30s", mk, ttl)
				}
			}
			if len(markers) != 2 {
				t.Errorf("markers %v, want 2", markers)
			}
			// Without positions, the markers go too (every fill in flight is
			// refused).
			if err := s.Invalidate(ctx, []string{at[0].Key}); err != nil {
				t.Fatal(err)
			}
			if n := c.Exists(ctx, redisfill.MarkerKey("m:", at[0].Key)).Val(); n != 0 {
				t.Error("Invalidate in versioned mode left the marker")
			}
		})
	}
}

// TestVersionedAfterScriptFlush: a server that forgot the script (restart,
// SCRIPT FLUSH) gets it again by EVAL; the invalidation succeeds.
func TestVersionedAfterScriptFlush(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv := redistest.ForTest(t)
	c := srv.Client()
	s := newSink(t, srv, Config{Mode: ModeVersioned, BatchSize: 2})
	keys := []KeyAt{{Key: "a", Pos: pipeline.Position{CommitLSN: 10}}, {Key: "b", Pos: pipeline.Position{CommitLSN: 10, Seq: 1}},
		{Key: "c", Pos: pipeline.Position{CommitLSN: 11}}}
	for round := range 2 {
		if err := c.ScriptFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		setKeys(t, c, []string{"a", "b", "c"})
		if err := s.InvalidateAt(ctx, keys); err != nil {
			t.Fatalf("round %d: InvalidateAt after SCRIPT FLUSH: %v", round, err)
		}
		if n := c.Exists(ctx, "a", "b", "c").Val(); n != 0 {
			t.Fatalf("round %d: %d keys left", round, n)
		}
	}
	if got := c.Get(ctx, redisfill.MarkerKey(redisfill.DefaultMarkerPrefix, "c")).Val(); got != redisfill.Marker(keys[2].Pos) {
		t.Errorf("marker of c = %q", got)
	}
}

// TestVersionedACL: an ACL user with the commands Commands lists for
// versioned mode passes Check and invalidates; one without EVALSHA is
// refused at Check, with the rule to grant.
func TestVersionedACL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	probe, err := New(Config{Addr: "h:1", Mode: ModeVersioned}, nil)
	if err != nil {
		t.Fatal(err)
	}
	rules := strings.Fields(probe.ACLRules(UseInvalidate))
	if got, want := strings.Join(rules, " "), "-@all +del +evalsha +eval +get +set"; got != want {
		t.Fatalf("ACLRules = %q, want %q", got, want)
	}
	srv := redistest.ForTest(t,
		redistest.WithUser("versioned", userPassword, append(append([]string{"~*"}, rules...), "+multi")...), // +multi after -@all: Check probes inside MULTI
		redistest.WithUser("noeval", userPassword, "~*", "-@all", "+multi", "+del", "+get", "+set"))
	ok := newSink(t, srv, Config{Mode: ModeVersioned, Username: "versioned", Password: userPassword})
	if err := ok.Check(ctx, UseInvalidate); err != nil {
		t.Fatalf("Check with the documented rules: %v", err)
	}
	if err := ok.InvalidateAt(ctx, []KeyAt{{Key: "k", Pos: pipeline.Position{CommitLSN: 1}}}); err != nil {
		t.Fatalf("InvalidateAt with the documented rules: %v", err)
	}
	bad := newSink(t, srv, Config{Mode: ModeVersioned, Username: "noeval", Password: userPassword})
	err = bad.Check(ctx, UseInvalidate)
	if err == nil || !IsPermanent(err) || !strings.Contains(err.Error(), "may not run EVALSHA") || !strings.Contains(err.Error(), "+evalsha") {
		t.Fatalf("Check without EVALSHA = %v; want a permanent error naming EVALSHA and the rule", err)
	}
}
