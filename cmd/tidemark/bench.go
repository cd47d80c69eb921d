package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/bench"
)

func benchCmd() *cobra.Command {
	var o bench.Options
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure backlog drain (against pg_recvlogical) and live latency on the canonical workload",
		Long: `bench runs the canonical chat workload (shared/bench: 70% event+event_json,
20% read marker, 10% membership) against a throwaway Postgres (or --pg) and a
Kafka in a separate process (tidemark dev-kafka, or --brokers).

Backlog drain: builds a backlog of --transactions behind a slot, then for
--repeat interleaved rounds times pg_recvlogical draining a copy of the slot to
/dev/null and Tidemark (a separate process) draining another copy until the
broker holds every change; reports rows/s, the paired ratio, Tidemark's CPU
per row and peak RSS, and checks the delivered count is exact with no
duplicate positions.

Live: a steady --rate with synchronous_commit=on for --duration; reports
commit-to-consumer latency (measured) and commit-to-ack latency (Tidemark's
histogram, interpolated within buckets).`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			self, err := os.Executable()
			if err != nil {
				return err
			}
			o.Binary = self
			o.Out = cmd.ErrOrStderr()
			res, err := bench.Run(cmd.Context(), o)
			if res != nil {
				if asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					enc.SetIndent("", "  ")
					_ = enc.Encode(res)
				} else {
					printBench(cmd, res)
				}
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.PG, "pg", "", "Postgres DSN with wal_level=logical (default: a throwaway server)")
	f.StringSliceVar(&o.Brokers, "brokers", nil, "Kafka brokers (default: tidemark dev-kafka in a separate process)")
	f.IntVar(&o.Transactions, "transactions", 100000, "backlog size in transactions")
	f.IntVar(&o.Repeat, "repeat", 3, "interleaved drain rounds")
	f.IntVar(&o.Rate, "rate", 2000, "live transactions per second")
	f.DurationVar(&o.Duration, "duration", 60*time.Second, "live run length")
	f.IntVar(&o.Workers, "workers", 4, "client connections driving the workload")
	f.IntVar(&o.Partitions, "partitions", 6, "partitions per topic")
	f.IntVar(&o.HugeRows, "huge-rows", 1000000, "rows of the one-transaction phase (-1 skips it)")
	f.BoolVar(&o.SkipDrain, "skip-drain", false, "skip the backlog drain")
	f.BoolVar(&o.SkipLive, "skip-live", false, "skip the live latency run")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

func printBench(cmd *cobra.Command, r *bench.Result) {
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "\nmachine: %s\n", r.Machine)
	if d := r.Drain; d != nil {
		fmt.Fprintf(out, "\nbacklog drain: %d transactions, %d row changes, %d rounds (medians)\n", d.Transactions, d.Changes, len(d.Rounds))
		fmt.Fprintf(out, "  %-34s %12.0f rows/s\n", "pg_recvlogical (to /dev/null)", d.RecvlogicalRowsPerSec)
		fmt.Fprintf(out, "  %-34s %12.0f rows/s\n", "tidemark (to Kafka, acks=all)", d.TidemarkRowsPerSec)
		fmt.Fprintf(out, "  %-34s %12.2fx\n", "paired ratio tidemark/pg_recvlogical", d.Ratio)
		fmt.Fprintf(out, "  %-34s %12.2f µs\n", "tidemark CPU per row", d.CPUMicrosPerRow)
		fmt.Fprintf(out, "  %-34s %12.0f MB\n", "tidemark peak RSS", d.PeakRSSMB)
		if d.TidemarkWalsenderMicrosPerRow > 0 {
			fmt.Fprintf(out, "  %-34s %12.2f µs\n", "walsender CPU/row, pg_recvlogical", d.RecvlogicalWalsenderMicrosPerRow)
			fmt.Fprintf(out, "  %-34s %12.2f µs\n", "walsender CPU/row, tidemark", d.TidemarkWalsenderMicrosPerRow)
		}
		if d.BrokerMicrosPerRow > 0 {
			fmt.Fprintf(out, "  %-34s %12.2f µs\n", "broker (dev-kafka) CPU/row", d.BrokerMicrosPerRow)
		}
		fmt.Fprintf(out, "  %-34s %12v\n", "delivered exact, no duplicates", d.Exact)
	}
	if h := r.Huge; h != nil {
		fmt.Fprintf(out, "\none transaction of %d rows: %.0f rows/s, %.2f µs CPU/row, peak RSS %.0f MB, complete and in order: %v\n",
			h.Rows, h.RowsPerSec, h.CPUMicros, h.MaxRSSMB, h.Complete)
	}
	if l := r.Live; l != nil {
		fmt.Fprintf(out, "\nlive: %d tx/s target, %.0fs, %d transactions committed (%d ticks behind)\n", l.Rate, l.Seconds, l.Transactions, l.Behind)
		fmt.Fprintf(out, "  commit -> consumer received: p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d events, %d missing)\n",
			l.ConsumerP50Ms, l.ConsumerP99Ms, l.ConsumerMaxMs, l.Events, l.Missing)
		fmt.Fprintf(out, "  p99 first third %.1f ms, last third %.1f ms\n", l.FirstThirdP99Ms, l.LastThirdP99Ms)
		fmt.Fprintf(out, "  commit -> broker ack (histogram): p50 ~%.1f ms, p99 ~%.1f ms, all within %.0f ms (%d transactions)\n",
			l.AckP50Ms, l.AckP99Ms, l.AckMaxBucketMs, l.AckSampleTransaction)
		if l.RedisDELs > 0 {
			fmt.Fprintf(out, "  commit -> Redis DEL (invalidation consumer): p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d keys)\n",
				l.RedisP50Ms, l.RedisP99Ms, l.RedisMaxMs, l.RedisDELs)
		}
	}
}
