package targets

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/pipeline"
)

// readSnapshot runs fn in a read-only REPEATABLE READ transaction on the
// source whose snapshot holds every transaction that committed before lsn
// (and perhaps some after it), so state read there is exactly "as of a
// position at or after stampBelow(lsn)".
//
// Reading pg_current_wal_insert_lsn() alone is not enough: a transaction
// writes its commit record before it becomes visible, so one with a commit
// LSN below lsn may still be invisible to a snapshot taken just after. So
// the LSN is read first, then the transactions in progress at that moment
// are noted, and the snapshot is retaken until none of them is still in
// progress in it.
func readSnapshot(ctx context.Context, pool *pgxpool.Pool, fn func(tx pgx.Tx, lsn pipeline.LSN) error) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connecting to the source database: %w", err)
	}
	defer conn.Release()
	var lsnText string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&lsnText); err != nil {
		return fmt.Errorf("reading the WAL position: %w", err)
	}
	lsn, err := pipeline.ParseLSN(lsnText)
	if err != nil {
		return err
	}
	const xipSQL = `SELECT ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(pg_current_snapshot()) x)`
	var running []int64
	if err := conn.QueryRow(ctx, xipSQL).Scan(&running); err != nil {
		return fmt.Errorf("reading transactions in progress: %w", err)
	}
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 10 * time.Millisecond
	bo.MaxInterval = 500 * time.Millisecond
	bo.MaxElapsedTime = 5 * time.Minute
	return backoff.Retry(func() error {
		tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
		if err != nil {
			return backoff.Permanent(err)
		}
		defer func() { _ = tx.Rollback(context.Background()) }()
		var inProgress []int64
		if err := tx.QueryRow(ctx, xipSQL).Scan(&inProgress); err != nil {
			return backoff.Permanent(err)
		}
		for _, x := range running {
			if slices.Contains(inProgress, x) {
				return fmt.Errorf("transaction %d, in progress at %s, still runs", x, lsn)
			}
		}
		if err := fn(tx, lsn); err != nil {
			return backoff.Permanent(err)
		}
		return nil
	}, backoff.WithContext(bo, ctx))
}
