package targets

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/capture"
)

// TestCheckSource: the first source is recorded; the same one passes; a
// new timeline with positions continuing is recorded; another cluster, or a
// source whose WAL is behind the stored positions, is refused with the
// reset; after ForgetSource a new cluster is accepted.
func TestCheckSource(t *testing.T) {
	s, _ := newTestStore(t)
	ctx := context.Background()
	a := capture.SourceIdentity{SystemID: "7000000000000000001", Timeline: 1, WALPos: 1000}
	if changed, err := s.CheckSource(ctx, a, "slot_a"); err != nil || changed {
		t.Fatalf("first source: changed %v, %v", changed, err)
	}
	if changed, err := s.CheckSource(ctx, a, "slot_a"); err != nil || changed {
		t.Fatalf("same source: changed %v, %v", changed, err)
	}
	if _, err := s.Apply(ctx, []MemberFact{{Room: "!r", User: "@u", Membership: "join", Joined: true, Pos: posAt(900)}}, nil, nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	promoted := a
	promoted.Timeline, promoted.WALPos = 2, 1200
	if changed, err := s.CheckSource(ctx, promoted, "slot_a"); err != nil || !changed {
		t.Fatalf("promoted standby: changed %v, %v; want accepted and recorded", changed, err)
	}
	restored := promoted
	restored.WALPos = 800
	if _, err := s.CheckSource(ctx, restored, "slot_a"); !errors.Is(err, ErrOtherSource) || !strings.Contains(err.Error(), "beyond the source's current WAL position 0/320") {
		t.Fatalf("restored to an earlier point: %v", err)
	}
	other := capture.SourceIdentity{SystemID: "7000000000000000002", Timeline: 1, WALPos: 5000}
	_, err := s.CheckSource(ctx, other, "slot_b")
	if !errors.Is(err, ErrOtherSource) || !strings.Contains(err.Error(), "system 7000000000000000001 (slot slot_a)") ||
		!strings.Contains(err.Error(), "--new-source") {
		t.Fatalf("another cluster: %v", err)
	}
	if err := s.ForgetSource(ctx); err != nil {
		t.Fatal(err)
	}
	other.WALPos = 100 // lower than anything the old source stored
	if changed, err := s.CheckSource(ctx, other, "slot_b"); err != nil || changed {
		t.Fatalf("after ForgetSource: changed %v, %v", changed, err)
	}
}
