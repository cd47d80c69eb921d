package main

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/app"
)

func statusCmd() *cobra.Command {
	var path string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the slot's WAL retention, the publication and consumer-group lag; exit 3 when something needs attention",
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			r, err := app.CollectStatus(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(r); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "database     %s\n", r.Database)
				if s := r.Slot; s != nil {
					if !s.Exists {
						fmt.Fprintf(out, "slot         %s: does not exist\n", s.Slot)
					} else {
						active := "inactive"
						if s.Active {
							active = fmt.Sprintf("active (pid %d)", s.ActivePID)
						}
						safe := "unknown"
						switch {
						case s.SafeWALSize != nil:
							safe = fmt.Sprintf("%d bytes", *s.SafeWALSize)
						case s.MaxSlotWALKeepSize < 0 && s.WALStatus != "":
							safe = "unlimited (max_slot_wal_keep_size -1)"
						}
						fmt.Fprintf(out, "slot         %s: %s, wal_status %s, confirmed %s, lag %d bytes, retained %d bytes, safe_wal_size %s\n",
							s.Slot, active, s.WALStatus, s.ConfirmedFlush, s.LagBytes, s.RetainedBytes, safe)
					}
				}
				if p := r.Publication; p != nil && !p.Exists {
					fmt.Fprintf(out, "publication  %s: does not exist\n", p.Name)
				} else if p != nil {
					fmt.Fprintf(out, "publication  %s: %d table(s) %s", p.Name, len(p.Tables), strings.Join(p.Tables, ", "))
					if len(p.Missing) > 0 {
						fmt.Fprintf(out, "; missing %s", strings.Join(p.Missing, ", "))
					}
					if len(p.Extra) > 0 {
						fmt.Fprintf(out, "; not configured %s", strings.Join(p.Extra, ", "))
					}
					fmt.Fprintln(out)
				}
				for _, g := range r.Groups {
					if g.Error != "" {
						fmt.Fprintf(out, "group        %s (%s): %s\n", g.Group, g.Role, g.Error)
						continue
					}
					fmt.Fprintf(out, "group        %s (%s): lag %d message(s) over %d committed partition(s)", g.Group, g.Role, g.Lag, g.Partitions)
					topics := make([]string, 0, len(g.Topics))
					for t := range g.Topics {
						topics = append(topics, t)
					}
					sort.Strings(topics)
					for _, t := range topics {
						fmt.Fprintf(out, "; %s %d", t, g.Topics[t])
					}
					fmt.Fprintln(out)
				}
				for _, s := range r.Snapshots {
					fmt.Fprintf(out, "snapshot     %d %s", s.ID, s.Table)
					if s.Where != "" {
						fmt.Fprintf(out, " where %s", s.Where)
					}
					fmt.Fprintf(out, ": %s, %d row(s) in %d chunk(s)", s.State, s.Rows, s.Chunks)
					if s.Dropped > 0 {
						fmt.Fprintf(out, " (%d left to live changes)", s.Dropped)
					}
					if s.Percent != nil {
						fmt.Fprintf(out, ", %.1f%%", *s.Percent)
					}
					if s.Rate > 0 {
						fmt.Fprintf(out, ", %.0f rows/s", s.Rate)
					}
					if s.ETA != "" {
						fmt.Fprintf(out, ", ETA %s", s.ETA)
					}
					if s.Error != "" {
						fmt.Fprintf(out, ": %s", s.Error)
					}
					fmt.Fprintln(out)
				}
				if len(r.Problems) == 0 {
					fmt.Fprintln(out, "no problems found")
				} else {
					fmt.Fprintf(out, "%d problem(s):\n", len(r.Problems))
					for _, p := range r.Problems {
						fmt.Fprintf(out, "  - %s\n", p)
					}
				}
			}
			if len(r.Problems) > 0 {
				return &exitError{3, fmt.Errorf("%d problem(s) need attention", len(r.Problems))}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}
