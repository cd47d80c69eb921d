package e2e

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/targets"
)

// TestTargetsRefuseAnotherSource: a targets state built from one cluster
// is refused when postgres.dsn is another (here: the recorded
// system_identifier is made to differ), with the reset in the message;
// `rebuild targets --all --new-source` forgets the old facts, rebuilds
// from the database, and the role starts again.
func TestTargetsRefuseAnotherSource(t *testing.T) {
	e := newEnv(t, "")
	e.exec(demoSchemaTargets)
	cfg := targetsConfig(e, "srcid", []string{"public.users", "public.room_memberships"}, &config.Targets{})
	e.start(cfg)
	_, stop := e.startTargets(cfg)
	e.exec(`INSERT INTO users(user_id) VALUES ('@a'), ('@b');
INSERT INTO room_memberships(room_id, user_id, membership) VALUES ('!r', '@a', 'join'), ('!r', '@b', 'join')`)
	e.waitTargets(cfg, 30*time.Second)
	stop()
	var recorded string
	if err := e.pool.QueryRow(context.Background(), `SELECT text_value FROM tidemark.notify_meta WHERE key = 'source_system_identifier'`).Scan(&recorded); err != nil {
		t.Fatalf("the source identity was not recorded: %v", err)
	}
	var actual string
	if err := e.pool.QueryRow(context.Background(), `SELECT system_identifier::text FROM pg_control_system()`).Scan(&actual); err != nil {
		t.Fatal(err)
	}
	if recorded != actual {
		t.Fatalf("recorded system %s, the server's is %s", recorded, actual)
	}
	// The state now claims another cluster.
	e.exec(`UPDATE tidemark.notify_meta SET text_value = '6999999999999999999' WHERE key = 'source_system_identifier'`)
	tg, err := app.PrepareTargets(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = tg.Run(ctx)
	if !errors.Is(err, targets.ErrOtherSource) || !strings.Contains(err.Error(), "6999999999999999999") ||
		!strings.Contains(err.Error(), actual) || !strings.Contains(err.Error(), "--new-source") {
		t.Fatalf("the role ran on another source's state: %v", err)
	}
	if _, err := app.RebuildTargets(ctx, cfg, nil, nil, true); !errors.Is(err, targets.ErrOtherSource) {
		t.Fatalf("a rebuild without --new-source ran on another source's state: %v", err)
	}
	rep, err := app.RebuildTargetsFrom(ctx, cfg, nil, nil, true, true)
	if err != nil {
		t.Fatalf("rebuild --new-source: %v", err)
	}
	if rep.Changed != 0 {
		t.Errorf("rebuild --new-source changed %d rooms; the published targets were already right", rep.Changed)
	}
	e.startTargets(cfg)
	e.exec(`UPDATE room_memberships SET membership = 'leave' WHERE user_id = '@b'`)
	e.waitTargets(cfg, 30*time.Second)
	if kept, truth := e.pairs(keptSQL(cfg)), e.pairs(canonicalTruth); !slices.Equal(kept, truth) || len(kept) != 1 {
		t.Fatalf("after the reset kept %v, database %v", kept, truth)
	}
}
