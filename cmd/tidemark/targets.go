package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/app"
)

// rebuildCmd is `tidemark rebuild targets`.
func rebuildCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rebuild",
		Short: "Recompute derived state from the database",
	}
	var path string
	var rooms []string
	var all, newSource bool
	targets := &cobra.Command{
		Use:   "targets (--room ID ... | --all)",
		Short: "Recompute notification targets from the database, apply and publish the difference (reason \"rebuild\")",
		Long: `Reads the membership and user tables at a snapshot, merges them into the kept
state with the snapshot's position (changes the consumer applies later from
after the snapshot still win), and publishes every difference with reason
"rebuild". Safe while the pipeline runs.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if all == (len(rooms) > 0) {
				return &exitError{2, errors.New("give either --room ID (repeatable) or --all")}
			}
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			if cfg.Targets == nil {
				return &exitError{2, errors.New("the config has no targets section")}
			}
			log, err := newLogger(cfg.Log.Level, cfg.Log.Format)
			if err != nil {
				return &exitError{2, err}
			}
			defer func() { _ = log.Sync() }()
			start := time.Now()
			rep, err := app.RebuildTargetsFrom(cmd.Context(), cfg, log, rooms, all, newSource)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "rebuilt %d room(s) as of LSN %s in %s: %d changed, %d user(s) added, %d removed\n",
				rep.Rooms, rep.LSN, time.Since(start).Round(time.Millisecond), rep.Changed, rep.Added, rep.Removed)
			if rep.Held > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "%d room(s) left to the targets consumer: held for a transaction it has not seen whole (their facts are merged; it settles them)\n", rep.Held)
			}
			return nil
		},
	}
	targets.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	targets.Flags().StringArrayVar(&rooms, "room", nil, "room id to rebuild (repeatable)")
	targets.Flags().BoolVar(&all, "all", false, "rebuild every room and user")
	targets.Flags().BoolVar(&newSource, "new-source", false, "with --all: the source is another cluster (blue/green, a restore): forget the old source's facts and positions first")
	cmd.AddCommand(targets)
	return cmd
}

// auditCmd is `tidemark audit targets`.
func auditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Compare derived state with the database",
	}
	var path, textfile string
	var sample int
	var wait time.Duration
	targets := &cobra.Command{
		Use:   "targets [--sample N]",
		Short: "Compare kept notification targets with the database and report the consistency ratio",
		Long: `Reads the database at a snapshot and compares each sampled room's targets with
the kept state. A room that differs is re-checked once the pipeline has passed
the snapshot's LSN (the slot confirmed it and the targets consumer group
committed past it), counting only users whose facts are no newer than the
snapshot, so lag raises no false alarm. Exit code 4 when a room differs.
When the pipeline does not pass the snapshot within --wait, the differences
are unconfirmed: they count here, but --textfile is not written.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			if cfg.Targets == nil {
				return &exitError{2, errors.New("the config has no targets section")}
			}
			rep, err := app.AuditTargets(cmd.Context(), cfg, sample, wait)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "audited %d room(s) as of LSN %s: %d consistent, ratio %.4f (%d re-checked once the pipeline passed that LSN)\n",
				rep.Rooms, rep.LSN, rep.Consistent, rep.Ratio, rep.Suspected)
			if rep.Unconfirmed {
				fmt.Fprintf(out, "the pipeline did not pass LSN %s (the position of the snapshot it read) within %s: differences are unconfirmed (lag, or inconsistency) and counted as inconsistent here", rep.WaitLSN, wait)
				if textfile != "" {
					fmt.Fprintf(out, "; %s is left unchanged (lag is not inconsistency)", textfile)
				}
				fmt.Fprintln(out)
			}
			for i, m := range rep.Mismatches {
				if i == 20 {
					fmt.Fprintf(out, "  ... and %d more room(s)\n", len(rep.Mismatches)-i)
					break
				}
				fmt.Fprintf(out, "  %s: missing %v, extra %v\n", m.Room, m.Missing, m.Extra)
			}
			if textfile != "" && !rep.Unconfirmed {
				reg := prometheus.NewRegistry()
				g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "notify_targets", Name: "consistency_ratio",
					Help: "Share of audited rooms whose kept targets equal the database.", ConstLabels: prometheus.Labels{"role": "targets"}})
				g.Set(rep.Ratio)
				reg.MustRegister(g)
				if err := prometheus.WriteToTextfile(textfile, reg); err != nil {
					return err
				}
			}
			if len(rep.Mismatches) > 0 {
				return &exitError{4, fmt.Errorf("%d of %d room(s) differ from the database", len(rep.Mismatches), rep.Rooms)}
			}
			return nil
		},
	}
	targets.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	targets.Flags().IntVar(&sample, "sample", 0, "audit this many random rooms (0: all)")
	targets.Flags().DurationVar(&wait, "wait", app.DefaultAuditWait, "longest wait for the pipeline to pass the snapshot before re-checking")
	targets.Flags().StringVar(&textfile, "textfile", "", "also write the tidemark_notify_targets_consistency_ratio gauge to this node_exporter textfile (not when unconfirmed)")
	cmd.AddCommand(targets)
	return cmd
}
