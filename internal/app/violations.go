package app

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

// ParseSince accepts an RFC 3339 time or a positive duration before now
// (`violations --since` and the admin API's since parameter). The error
// quotes s; callers prefix the flag or parameter name.
func ParseSince(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(s); err == nil && d > 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("%q: want an RFC 3339 time (2026-11-26T10:00:00Z) or a duration such as 1h", s)
}

// ListViolations connects to the integrity database (integrity.dsn) and
// lists the violations f selects, newest first.
func ListViolations(ctx context.Context, cfg *config.Config, f integrity.Filter) ([]*integrity.Violation, error) {
	if cfg.Integrity == nil {
		return nil, errors.New("no integrity section in the config")
	}
	conn, err := pgx.Connect(ctx, cfg.Integrity.DSN)
	if err != nil {
		return nil, fmt.Errorf("connecting to the violations database: %w", err)
	}
	defer conn.Close(ctx)
	return integrity.List(ctx, conn, cfg.Integrity.Schema, f)
}
