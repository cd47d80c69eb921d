package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/pipeline"
)

func snapshotCmd() *cobra.Command {
	var path, where string
	var tables []string
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Request an incremental snapshot of tables while `tidemark run` streams (through the signal table)",
		Long: `Request an incremental snapshot: the running capture reads the tables in
primary-key chunks between watermarks and publishes their rows (op "r",
source.snapshot "incremental") interleaved with the live stream; a live
change of a key always wins over its snapshot row.

The request is a row in the signal table tidemark.tidemark_signals; this
command waits up to --wait for the running capture to accept or refuse it
and prints the answer. Progress: tidemark status.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			if len(tables) == 0 {
				return &exitError{2, fmt.Errorf("--table: name at least one table (one of %s)", strings.Join(cfg.Postgres.Tables, ", "))}
			}
			for i, t := range tables {
				tables[i] = pipeline.QualifyTable(t)
				if !slices.Contains(cfg.Postgres.Tables, tables[i]) {
					return &exitError{2, fmt.Errorf("--table %s: not in postgres.tables (%s): only captured tables can be snapshotted", t, strings.Join(cfg.Postgres.Tables, ", "))}
				}
			}
			ctx := cmd.Context()
			conn, err := pgx.Connect(ctx, cfg.Postgres.DSN)
			if err != nil {
				return fmt.Errorf("connecting to postgres: %w", capture.ExplainTLS(err))
			}
			defer conn.Close(context.Background())
			id, err := capture.InsertSignal(ctx, conn, cfg.Postgres.Slot, capture.SnapshotRequest{Tables: tables, Where: where})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			deadline := time.Now().Add(wait)
			for {
				res, err := capture.SignalResult(ctx, conn, id)
				if err != nil {
					return fmt.Errorf("reading signal %s: %w", id, err)
				}
				if strings.HasPrefix(res, "refused") {
					return &exitError{1, fmt.Errorf("signal %s: %s", id, res)}
				}
				if res != "" {
					fmt.Fprintf(out, "signal %s: %s (tidemark status shows progress)\n", id, res)
					return nil
				}
				if !time.Now().Before(deadline) {
					fmt.Fprintf(out, "signal %s queued in %s; no running capture answered it within %s (is `tidemark run` running with snapshot.incremental true?); it is taken up when one does\n",
						id, capture.SignalTable, wait)
					return nil
				}
				select {
				case <-time.After(200 * time.Millisecond):
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	cmd.Flags().StringArrayVar(&tables, "table", nil, "table to snapshot, schema.table (repeatable)")
	cmd.Flags().StringVar(&where, "where", "", "SQL condition limiting the rows (e.g. \"room_id = '!r:example.org'\")")
	cmd.Flags().DurationVar(&wait, "wait", 30*time.Second, "how long to wait for the running capture to accept the request")
	return cmd
}
