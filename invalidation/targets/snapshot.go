package targets

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/pipeline"
)

// readSnapshot runs fn in a read-only REPEATABLE READ transaction on the
// source whose snapshot holds exactly the transactions that committed
// before lsn: every change with a commit LSN below lsn is in it, none at or
// after lsn is. State read there is exactly "as of stampBelow(lsn)".
//
// A snapshot taken from the ProcArray (any ordinary transaction's) cannot
// promise that against a WAL position: a transaction writes and flushes its
// commit record and marks itself committed in clog before it leaves the
// ProcArray, so one with a commit LSN below pg_current_wal_insert_lsn() can
// still be invisible, for as long as it likes (a synchronous-replication
// wait holds it there), and pg_snapshot_xip does not even list it when its
// xid is at or above the snapshot's xmax. So the snapshot comes from
// logical decoding instead: a temporary logical slot is created on a
// replication connection (replication=database, from the pool's own
// config, so TLS and the rest carry over) with an exported snapshot, whose
// consistent point is lsn and whose snapshot shows exactly the
// transactions committed before it; creating it waits for the
// transactions in progress to end. The read transaction imports that
// snapshot (SET TRANSACTION SNAPSHOT). The replication connection stays
// open and idle until fn returns (another command on it, or closing it,
// ends the export), then it is closed, which drops the temporary slot.
//
// It needs the REPLICATION attribute (or superuser) for the pool's role, a
// free replication slot (max_replication_slots) and wal sender
// (max_wal_senders), and wal_level=logical: the errors say which.
func readSnapshot(ctx context.Context, pool *pgxpool.Pool, fn func(tx pgx.Tx, lsn pipeline.LSN) error) error {
	rcfg := pool.Config().ConnConfig.Config.Copy()
	rcfg.RuntimeParams["replication"] = "database"
	if rcfg.RuntimeParams["application_name"] == "" {
		rcfg.RuntimeParams["application_name"] = "tidemark-snapshot"
	}
	repl, err := pgconn.ConnectConfig(ctx, rcfg)
	if err != nil {
		return explainSnapshotErr("opening a replication connection to the source database for a snapshot", capture.ExplainTLS(err))
	}
	defer repl.Close(context.Background())
	var suffix [8]byte
	_, _ = rand.Read(suffix[:])
	slot := "tidemark_snapshot_" + hex.EncodeToString(suffix[:])
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{
		Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication,
	})
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("taking a snapshot of the source database (creating temporary replication slot %s, which waits for the transactions in progress to end): %w", slot, ctx.Err())
		}
		return explainSnapshotErr(fmt.Sprintf("creating temporary replication slot %s for a snapshot of the source database", slot), err)
	}
	lsn, err := pipeline.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return fmt.Errorf("temporary replication slot %s: consistent point %q: %w", slot, res.ConsistentPoint, err)
	}
	if res.SnapshotName == "" {
		return fmt.Errorf("temporary replication slot %s: the server exported no snapshot", slot)
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connecting to the source database: %w", err)
	}
	defer conn.Release()
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return fmt.Errorf("starting the snapshot transaction: %w", err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if _, err := tx.Exec(ctx, `SET TRANSACTION SNAPSHOT '`+strings.ReplaceAll(res.SnapshotName, "'", "''")+`'`); err != nil {
		return fmt.Errorf("importing snapshot %s of temporary replication slot %s: %w", res.SnapshotName, slot, err)
	}
	return fn(tx, lsn)
}

// explainSnapshotErr names the fix for the failures of taking a snapshot
// through a temporary replication slot that an operator must fix.
func explainSnapshotErr(what string, err error) error {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", what, err)
	}
	var hint string
	switch {
	case pe.Code == "42501":
		hint = "the source role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) to take the snapshot through a temporary replication slot"
	case pe.Code == "53400" || strings.Contains(pe.Message, "replication slots are in use"):
		hint = "every replication slot is in use: the snapshot needs one temporary slot while it is read; free a slot or raise max_replication_slots"
	case pe.Code == "53300" && strings.Contains(pe.Message, "max_wal_senders"):
		hint = "every WAL sender is in use: the snapshot needs one replication connection while it is read; free one or raise max_wal_senders"
	case strings.Contains(pe.Message, "wal_level"):
		hint = "the snapshot is taken through a temporary logical replication slot, which needs wal_level=logical on the source"
	case strings.Contains(pe.Message, "recovery"):
		hint = "the snapshot is taken through a temporary logical replication slot, which needs the primary: point postgres.dsn at it"
	default:
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w (%s)", what, err, hint)
}
