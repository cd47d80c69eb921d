package e2e

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/bench"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

// TestIntegrityMonotonicByType (issue 15, acceptance 6): through real
// Postgres, capture and Kafka, a timestamptz moving from .1 s to .123 s and
// a numeric moving by 1e-20 are not regressions, moving back is; on a
// key-less REPLICA IDENTITY FULL table an update that lowers the value is
// flagged.
func TestIntegrityMonotonicByType(t *testing.T) {
	e := newEnv(t, "")
	e.exec(bench.Schema)
	e.exec(bench.Seed)
	e.exec(`CREATE TABLE seen (user_id text PRIMARY KEY, at timestamptz, amount numeric);
CREATE TABLE logs (stream text, n numeric);
ALTER TABLE logs REPLICA IDENTITY FULL`)
	tables := append(slices.Clone(bench.Tables), "public.seen", "public.logs")
	cfg := e.config("imono", tables, func(c *config.Config) {
		// logs has no primary key: keyed by its whole row, an update of n
		// would be a delete and an insert under two keys, possibly in two
		// partitions read in either order (see the note on Keys); keyed by
		// stream, its updates stay in order.
		c.Postgres.KeyColumns = map[string][]string{"public.logs": {"stream"}}
		rules := integrity.DefaultRules()
		for i := range rules {
			if rules[i].Name == "read_marker_event_exists" {
				rules[i].Within = "1s"
			}
		}
		rules = append(rules,
			integrity.Rule{Name: "seen_at", Table: "public.seen", Monotonic: &integrity.Monotonic{Column: "at", Key: []string{"user_id"}}},
			integrity.Rule{Name: "seen_amount", Table: "public.seen", Monotonic: &integrity.Monotonic{Column: "amount", Key: []string{"user_id"}}},
			integrity.Rule{Name: "logs_n", Table: "public.logs", Monotonic: &integrity.Monotonic{Column: "n", Key: []string{"stream"}}})
		c.Integrity = &config.Integrity{Rules: rules}
	})
	ie := &integrityEnv{env: e, cfg: cfg, prefix: "imono"}
	e.start(cfg)
	ig, _ := ie.startIntegrity("imono-integrity")
	e.exec(`INSERT INTO seen VALUES ('@a', '2026-01-01 00:00:00.1+00', 1.5)`)
	e.exec(`UPDATE seen SET at = '2026-01-01 00:00:00.123+00', amount = 1.50000000000000000001 WHERE user_id = '@a'`) // forward
	e.exec(`UPDATE seen SET at = '2026-01-01 00:00:00.12+00' WHERE user_id = '@a'`)                                   // at back
	e.exec(`UPDATE seen SET amount = 1.5 WHERE user_id = '@a'`)                                                       // amount back
	e.exec(`INSERT INTO logs VALUES ('s', 10)`)
	e.exec(`UPDATE logs SET n = 10.5 WHERE stream = 's'`) // forward
	e.exec(`UPDATE logs SET n = 5 WHERE stream = 's'`)    // back
	ie.settle(ig, time.Second, 3*time.Minute)
	var got []string
	for _, v := range ie.violations() {
		got = append(got, v.Rule+": "+v.Detail)
	}
	slices.Sort(got)
	want := []string{
		"logs_n: public.logs.n moved backwards from 10.5 to 5 for (stream) = (s)",
		"seen_amount: public.seen.amount moved backwards from 1.50000000000000000001 to 1.5 for (user_id) = (@a)",
		"seen_at: public.seen.at moved backwards from 2026-01-01T00:00:00.123Z to 2026-01-01T00:00:00.12Z for (user_id) = (@a)",
	}
	if !slices.Equal(got, want) {
		t.Errorf("violations:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
