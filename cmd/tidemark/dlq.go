package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/app"
)

// dlqCmd is `tidemark dlq replay`.
func dlqCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dlq",
		Short: "Work with the dead-letter topic (<topic_prefix>.dlq)",
	}
	var path, source, since string
	var dryRun bool
	replay := &cobra.Command{
		Use:   "replay --source webhook [--since 1h|RFC3339] [--dry-run]",
		Short: "Resend dead-lettered webhook batches to invalidation.webhook, signed again",
		Long: `Reads <topic_prefix>.dlq from its start up to its end at the start of the
command and resends every batch the webhook sink dead-lettered (header
tidemark-dlq-source: webhook), in order, to invalidation.webhook.url: the body
unchanged (its id, keys, positions and sent_at), signed with the configured
secret and a fresh timestamp. Each batch id is sent once per run. A batch the
receiver refuses for good (4xx) is counted and the replay goes on; a receiver
still down after max_attempts tries stops it. Running it again resends the
same batches: receivers dedupe on the payload's id, and invalidating a key
twice is harmless. Exit 1 when a batch was refused or the replay stopped.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if source != app.DLQSourceWebhook {
				return &exitError{2, fmt.Errorf("--source %q: only %q batches can be replayed", source, app.DLQSourceWebhook)}
			}
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			if cfg.Invalidation == nil || cfg.Invalidation.Webhook == nil {
				return &exitError{2, errors.New("the config has no invalidation.webhook to resend to")}
			}
			opts := app.ReplayOptions{DryRun: dryRun}
			if since != "" {
				if opts.Since, err = app.ParseSince(since, time.Now()); err != nil {
					return &exitError{2, fmt.Errorf("--since %w", err)}
				}
			}
			log, err := newLogger(cfg.Log.Level, cfg.Log.Format)
			if err != nil {
				return &exitError{2, err}
			}
			defer func() { _ = log.Sync() }()
			errOut := cmd.ErrOrStderr()
			opts.OnFailed = func(partition int, offset int64, err error) {
				fmt.Fprintf(errOut, "refused: the batch at partition %d offset %d: %v\n", partition, offset, err)
			}
			start := time.Now()
			rep, err := app.ReplayWebhookDLQ(cmd.Context(), cfg, opts, log)
			verb := "resent"
			if dryRun {
				verb = "would resend"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: read %d record(s) in %s; webhook batches: %s %d, refused %d, duplicate ids %d, before --since %d; other sources left alone: %d\n",
				rep.Topic, rep.Read, time.Since(start).Round(time.Millisecond), verb, rep.Resent, rep.Failed, rep.Duplicates, rep.BeforeSince, rep.OtherSource)
			if err != nil {
				return err
			}
			if rep.Stopped != nil {
				return fmt.Errorf("stopped: the receiver did not accept the batch at %v; the batches after it were not sent (run the replay again once it accepts)", rep.Stopped)
			}
			if rep.Failed > 0 {
				return fmt.Errorf("the receiver refused %d batch(es) (listed above)", rep.Failed)
			}
			return nil
		},
	}
	replay.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	replay.Flags().StringVar(&source, "source", "", `which dead letters to resend (required; "webhook")`)
	replay.Flags().StringVar(&since, "since", "", "only batches dead-lettered since this time (RFC 3339) or duration ago (e.g. 1h)")
	replay.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be resent, send nothing")
	cmd.AddCommand(replay)
	return cmd
}
