package capture

import (
	"encoding/json"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func i64(v int64) *int64 { return &v }

func TestSlotHealthProblems(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name string
		h    SlotHealth
		want []string // substrings, one per problem, in order
	}{
		{"missing", SlotHealth{Slot: "s"}, []string{`"s" does not exist`}},
		{"healthy, unlimited", SlotHealth{Slot: "s", Exists: true, WALStatus: "reserved", SafeWALSize: nil, MaxSlotWALKeepSize: -1}, nil},
		{"healthy, limited", SlotHealth{Slot: "s", Exists: true, WALStatus: "reserved", SafeWALSize: i64(900 * mib), MaxSlotWALKeepSize: 1024 * mib}, nil},
		{"near the limit", SlotHealth{Slot: "s", Exists: true, WALStatus: "reserved", SafeWALSize: i64(100 * mib), MaxSlotWALKeepSize: 1024 * mib},
			[]string{"only 100.0 MiB of WAL left before max_slot_wal_keep_size (1.0 GiB)"}},
		{"extended and near the limit", SlotHealth{Slot: "s", Exists: true, WALStatus: "extended", RetainedBytes: 3 << 30, SafeWALSize: i64(10 * mib), MaxSlotWALKeepSize: 4096 * mib},
			[]string{"retains 3.0 GiB of WAL, beyond max_wal_size", "only 10.0 MiB"}},
		{"unreserved", SlotHealth{Slot: "s", Exists: true, WALStatus: "unreserved", RetainedBytes: 5 << 30, SafeWALSize: i64(0), MaxSlotWALKeepSize: 4096 * mib},
			[]string{"beyond max_slot_wal_keep_size: the next checkpoint invalidates it"}},
		{"lost", SlotHealth{Slot: "s", Exists: true, WALStatus: "lost"}, []string{"invalidated (wal_status lost)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.h.Problems()
			if len(got) != len(tc.want) {
				t.Fatalf("Problems() = %q, want %d problem(s) %q", got, len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("problem %d = %q, want it to contain %q", i, got[i], w)
				}
			}
		})
	}
}

func TestSlotHealthJSON(t *testing.T) {
	b, err := json.Marshal(SlotHealth{Slot: "s", Exists: true, ConfirmedFlush: 0x1_0000_0010, WALStatus: "reserved"})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"slot":"s"`, `"confirmed_flush_lsn":"1/10"`, `"wal_status":"reserved"`, `"restart_lsn":"0/0"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
}

// A problem is logged when it appears, not again on every check while it
// lasts, and its clearing is logged once; a lost slot is an error.
func TestWatcherReportsChangesOnly(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	w := NewWatcher(WatcherConfig{DSN: "postgres://x", Slot: "s"}, zap.New(core))
	// WAL keeps growing: the figures in the sentence change on every check,
	// the condition does not.
	for i := 0; i < 3; i++ {
		near := SlotHealth{Slot: "s", Exists: true, WALStatus: "reserved", SafeWALSize: i64(int64(3-i) << 20), MaxSlotWALKeepSize: 1 << 30}
		w.report(near.problems(), near)
	}
	if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 1 {
		t.Fatalf("%d warnings for a lasting problem over 3 checks, want 1: %v", n, logs.AllUntimed())
	}
	near := SlotHealth{Slot: "s", Exists: true, WALStatus: "reserved", SafeWALSize: i64(1 << 20), MaxSlotWALKeepSize: 1 << 30}
	lost := SlotHealth{Slot: "s", Exists: true, WALStatus: "lost"}
	w.report(lost.problems(), lost)
	if e := logs.FilterLevelExact(zapcore.ErrorLevel).All(); len(e) != 1 || !strings.Contains(e[0].Message, "invalidated") {
		t.Fatalf("lost slot logged %v, want one error naming the invalidation", e)
	}
	ok := SlotHealth{Slot: "s", Exists: true, WALStatus: "reserved", SafeWALSize: nil, MaxSlotWALKeepSize: -1}
	w.report(ok.problems(), ok)
	w.report(ok.problems(), ok)
	if n := logs.FilterMessage("replication slot healthy again").Len(); n != 1 {
		t.Fatalf("recovery logged %d times, want 1", n)
	}
	w.report(near.problems(), near)
	if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 2 {
		t.Fatalf("a problem returning after recovery logged %d warnings in all, want 2", n)
	}
}
