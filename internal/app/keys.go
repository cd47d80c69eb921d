package app

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
)

// chooseKeys picks each inspected table's message key (capture.ChooseKey),
// storing it in infos, and returns the problems of configured keys.
func chooseKeys(ctx context.Context, conn *pgx.Conn, cfg *config.Config, infos map[string]capture.TableInfo) ([]capture.Problem, error) {
	var problems []capture.Problem
	for _, name := range cfg.Postgres.Tables {
		ti, ok := infos[name]
		if !ok {
			continue // reported as missing already
		}
		var uniqueName string
		var unique []string
		if len(ti.PrimaryKey) == 0 && ti.ReplicaIdentity != 'i' && len(cfg.Postgres.KeyColumns[name]) == 0 {
			var err error
			if uniqueName, unique, err = capture.UniqueNotNullIndex(ctx, conn, ti.OID); err != nil {
				return nil, err
			}
		}
		k, ps := capture.ChooseKey(ti, cfg.Postgres.KeyColumns[name], uniqueName, unique)
		ti.Key = &k
		infos[name] = ti
		problems = append(problems, ps...)
	}
	return problems, nil
}
