package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/invalidation/integrity"
)

func violationsCmd() *cobra.Command {
	var path, rule, since, status string
	var limit int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "violations",
		Short: "List integrity violations (newest first)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			if cfg.Integrity == nil {
				return &exitError{2, errors.New("the config has no integrity section")}
			}
			f := integrity.Filter{Rule: rule, Limit: limit}
			switch status {
			case "all":
			case integrity.StatusOpen, integrity.StatusResolved:
				f.Status = status
			default:
				return &exitError{2, fmt.Errorf("--status %q: want open, resolved or all", status)}
			}
			if since != "" {
				if f.Since, err = app.ParseSince(since, time.Now()); err != nil {
					return &exitError{2, fmt.Errorf("--since %w", err)}
				}
			}
			conn, err := pgx.Connect(cmd.Context(), cfg.Integrity.DSN)
			if err != nil {
				return &exitError{3, fmt.Errorf("connecting to the violations database: %w", err)}
			}
			defer conn.Close(cmd.Context())
			vs, err := integrity.List(cmd.Context(), conn, cfg.Integrity.Schema, f)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				for _, v := range vs {
					if err := enc.Encode(v); err != nil {
						return err
					}
				}
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "DETECTED\tRULE\tKIND\tSEVERITY\tSTATUS\tTABLE\tROW\tPOSITION\tDETAIL")
			for _, v := range vs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.DetectedAt.UTC().Format(time.RFC3339), v.Rule, v.Kind, v.Severity,
					v.Status, v.Table, v.RowKey, v.Position, v.Detail)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintf(out, "%d violation(s)\n", len(vs))
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	cmd.Flags().StringVar(&rule, "rule", "", "only this rule")
	cmd.Flags().StringVar(&since, "since", "", "only violations detected since this time (RFC 3339) or duration ago (e.g. 1h)")
	cmd.Flags().StringVar(&status, "status", "all", "open, resolved or all")
	cmd.Flags().IntVar(&limit, "limit", 1000, "at most this many (0: no limit)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "one JSON object per line")
	return cmd
}
