package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/internal/config"
)

// TestTargetsStateBounded (issue 15, acceptance 7): under a steady workload
// that keeps adding users who join, leave and are deleted, and rooms that
// fill and empty, the state tables stay flat after warm-up because pruning
// deletes what no older change can reach again; the kept targets still
// equal the database afterwards. TIDEMARK_PRUNE_SOAK sets the workload's
// length (default 30s; the figure is 10m).
func TestTargetsStateBounded(t *testing.T) {
	soak := 30 * time.Second
	if v := os.Getenv("TIDEMARK_PRUNE_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("TIDEMARK_PRUNE_SOAK: %v", err)
		}
		soak = d
	}
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "prune", []string{"public.users", "public.room_memberships"}, &config.Targets{PruneInterval: 500 * time.Millisecond})
	e.start(cfg)
	reg := prometheus.NewRegistry()
	e.startTargetsWith(cfg, reg)

	ctx, cancel := context.WithTimeout(context.Background(), soak+2*time.Minute)
	defer cancel()
	count := func() (m, u, r int) {
		t.Helper()
		if err := e.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM tidemark.notify_memberships), (SELECT count(*) FROM tidemark.notify_users),
  (SELECT count(*) FROM tidemark.notify_rooms)`).Scan(&m, &u, &r); err != nil {
			t.Fatalf("counting state rows: %v", err)
		}
		return
	}
	for {
		var ok bool
		if err := e.pool.QueryRow(ctx, `SELECT to_regclass('tidemark.notify_meta') IS NOT NULL`).Scan(&ok); err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the targets state tables were not created")
		}
		time.Sleep(20 * time.Millisecond)
	}
	type sample struct {
		at      time.Duration
		m, u, r int
	}
	var samples []sample
	start := time.Now()
	next := start
	i := 0
	for time.Since(start) < soak {
		// One step: a new user joins a shared room and a room of their
		// own; the user of 20 steps ago leaves both; the user of 40
		// steps ago is deleted with their rows.
		step := fmt.Sprintf(`
INSERT INTO users(user_id) VALUES ('@u%[1]d');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!shared%[2]d', '@u%[1]d', 'join'), ('!own%[1]d', '@u%[1]d', 'join');
UPDATE room_memberships SET membership = 'leave' WHERE user_id = '@u%[3]d';
DELETE FROM room_memberships WHERE user_id = '@u%[4]d';
DELETE FROM users WHERE user_id = '@u%[4]d';`, i, i%10, i-20, i-40)
		if _, err := e.pool.Exec(ctx, step, pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatalf("workload step %d: %v", i, err)
		}
		i++
		if time.Since(next) >= 0 {
			m, u, r := count()
			samples = append(samples, sample{time.Since(start), m, u, r})
			next = next.Add(soak / 60) // often enough to catch the floor right after a prune round, also when a busy machine delays rounds
		}
		time.Sleep(20 * time.Millisecond) // ~40 steps/s
	}
	e.waitTargets(cfg, time.Minute)
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) {
		t.Fatalf("after pruning, kept %d pairs, database %d", len(kept), len(truth))
	}
	for i, s := range samples {
		if i%3 == 0 {
			t.Logf("t=%5.1fs memberships=%d users=%d rooms=%d", s.at.Seconds(), s.m, s.u, s.r)
		}
	}
	pruned := map[string]float64{}
	for _, table := range []string{"notify_memberships", "notify_users", "notify_rooms"} {
		pruned[table] = metricOf(t, reg, "tidemark_notify_targets_pruned_total", "table", table)
	}
	t.Logf("%d steps; pruned %v", i, pruned)
	if pruned["notify_memberships"] == 0 || pruned["notify_users"] == 0 || pruned["notify_rooms"] == 0 {
		t.Fatalf("nothing pruned in some table: %v", pruned)
	}
	// Flat after warm-up: the last third's lowest counts (the state right
	// after a prune round) are no higher than the middle third's, and its
	// peaks stay within twice theirs. Single samples swing between the
	// two (a sample right before a round holds about a second of steps'
	// rows, more when a busy machine delays the round): growth shows as a
	// rising floor, or as peaks far above the middle's.
	third := len(samples) / 3
	if third < 2 {
		t.Fatalf("only %d samples", len(samples))
	}
	stat := func(ss []sample, f func(sample) int) (low, peak int) {
		low = f(ss[0])
		for _, s := range ss {
			low, peak = min(low, f(s)), max(peak, f(s))
		}
		return low, peak
	}
	for _, c := range []struct {
		name string
		f    func(sample) int
	}{{"memberships", func(s sample) int { return s.m }}, {"users", func(s sample) int { return s.u }}, {"rooms", func(s sample) int { return s.r }}} {
		mLow, mPeak := stat(samples[third:2*third], c.f)
		lLow, lPeak := stat(samples[2*third:], c.f)
		if lLow > mLow+mLow/4+40 || lPeak > 2*mPeak+80 {
			t.Fatalf("%s grow after warm-up: middle third low %d peak %d, last third low %d peak %d", c.name, mLow, mPeak, lLow, lPeak)
		}
	}
	lm, lr := 0, 0
	for _, s := range samples[2*third:] {
		lm, lr = max(lm, s.m), max(lr, s.r)
	}
	// Without pruning the tables would hold every row ever written.
	if lm >= 3*i || lr >= i {
		t.Fatalf("memberships %d and rooms %d after %d steps: nothing was pruned", lm, lr, i)
	}
}
