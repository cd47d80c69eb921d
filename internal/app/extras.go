package app

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
)

// ExtraTablesWarning is what `tidemark check` says about the tables the
// publication publishes beyond postgres.tables (an unmanaged publication,
// or one FOR ALL TABLES, which Tidemark does not narrow): their changes
// reach capture, which skips or refuses them (postgres.unknown_tables).
// "" when there are none.
func ExtraTablesWarning(ctx context.Context, cfg *config.Config, infos map[string]capture.TableInfo) (string, error) {
	conn, err := pgx.Connect(ctx, cfg.Postgres.DSN)
	if err != nil {
		return "", fmt.Errorf("connecting to postgres: %w", err)
	}
	defer conn.Close(context.Background())
	extras, err := extraTables(ctx, conn, cfg, infos)
	if err != nil || len(extras) == 0 {
		return "", err
	}
	const shown = 10
	list := strings.Join(extras[:min(len(extras), shown)], ", ")
	if len(extras) > shown {
		list += fmt.Sprintf(" and %d more", len(extras)-shown)
	}
	then := "their changes are skipped, counted in tidemark_skipped_changes_total{table} and warned about once per table (postgres.unknown_tables: skip)"
	if cfg.Postgres.UnknownTables == capture.UnknownStop {
		then = "the first change of one stops capture (postgres.unknown_tables: stop)"
	}
	return fmt.Sprintf("publication %q also publishes %d table(s) that are not in postgres.tables: %s; %s. Add them to postgres.tables or remove them from the publication",
		cfg.Postgres.Publication, len(extras), list, then), nil
}

// extraTables lists the tables the publication publishes beyond the
// configured ones, when Tidemark does not keep it equal to them.
func extraTables(ctx context.Context, conn *pgx.Conn, cfg *config.Config, infos map[string]capture.TableInfo) ([]string, error) {
	if *cfg.Postgres.ManagePublication {
		pub, err := capture.ReadPublication(ctx, conn, cfg.Postgres.Publication)
		if err != nil || !pub.AllTables {
			return nil, err // kept equal to postgres.tables at start
		}
	}
	return capture.ExtraTables(ctx, conn, cfg.Postgres.Publication, configuredTables(cfg, infos))
}
