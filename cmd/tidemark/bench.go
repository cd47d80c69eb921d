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
			if o.Binary == "" {
				o.Binary = self
			}
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
	f.IntVar(&o.Repeat, "repeat", 15, "interleaved drain rounds")
	f.IntVar(&o.Rate, "rate", 2000, "live transactions per second")
	f.DurationVar(&o.Duration, "duration", 60*time.Second, "live run length")
	f.IntVar(&o.Workers, "workers", 4, "client connections driving the workload")
	f.IntVar(&o.Partitions, "partitions", 12, "partitions of each table topic (created before each drain round)")
	f.IntVar(&o.HugeRows, "huge-rows", 1000000, "rows of the one-transaction phase (-1 skips it)")
	f.IntVar(&o.Kills, "kills", 0, "crash phase: SIGKILL tidemark run this many times (every 2-4 s) under load; 0 skips it")
	f.IntVar(&o.CrashRate, "crash-rate", 1500, "crash phase: transactions per second")
	f.BoolVar(&o.SkipDrain, "skip-drain", false, "skip the backlog drain")
	f.BoolVar(&o.SkipLive, "skip-live", false, "skip the live latency run")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	f.StringVar(&o.Binary, "binary", "", "the tidemark binary to measure (default: this one), e.g. to compare two builds under one harness")
	return cmd
}

func printBench(cmd *cobra.Command, r *bench.Result) {
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "\nmachine: %s\n", r.Machine)
	if d := r.Drain; d != nil {
		fmt.Fprintf(out, "\nbacklog drain: %d transactions, %d row changes, %d interleaved rounds\n", d.Transactions, d.Changes, len(d.Rounds))
		fmt.Fprintf(out, "  %-44s %12s %12s %12s\n", "", "min", "median", "max")
		row := func(name, unit string, sp bench.Spread, prec int) {
			fmt.Fprintf(out, "  %-44s %12.*f %12.*f %12.*f %s\n", name, prec, sp.Min, prec, sp.Median, prec, sp.Max, unit)
		}
		sp := d.Spread
		row("pg_recvlogical (to /dev/null) wall", "s", sp.RecvlogicalSeconds, 2)
		row("pg_recvlogical rows/s", "", sp.RecvlogicalRowsPerSec, 0)
		row("pg_recvlogical CPU", "µs/row", sp.RecvlogicalCPUMicros, 2)
		row("tidemark (to Kafka, acks=all) wall", "s", sp.TidemarkSeconds, 2)
		row("tidemark rows/s", "", sp.TidemarkRowsPerSec, 0)
		row("paired ratio tidemark/pg_recvlogical", "x", sp.Ratio, 2)
		row("tidemark CPU (user + system)", "µs/row", sp.CPUMicros, 2)
		row("tidemark user CPU", "µs/row", sp.UserMicros, 2)
		row("tidemark system CPU", "µs/row", sp.SysMicros, 2)
		row("tidemark voluntary context switches", "/row", sp.VoluntaryCSPerRow, 3)
		row("tidemark involuntary context switches", "/row", sp.InvoluntaryCSPerRow, 3)
		row("tidemark peak RSS", "MB", sp.RSSMB, 0)
		if d.TidemarkWalsenderMicrosPerRow > 0 {
			row("walsender CPU, serving pg_recvlogical", "µs/row", sp.RecvlogicalWalsenderMicro, 2)
			row("walsender CPU, serving tidemark", "µs/row", sp.TidemarkWalsenderMicros, 2)
		}
		if d.BrokerMicrosPerRow > 0 {
			row("broker (dev-kafka) CPU", "µs/row", sp.BrokerMicros, 2)
		}
		if sp.TidemarkSeconds.Min > 0 {
			fmt.Fprintf(out, "  %-44s %12.2fx\n", "tidemark slowest / fastest round", sp.TidemarkSeconds.Max/sp.TidemarkSeconds.Min)
		}
		if sp.RecvlogicalRowsPerSec.Median > 0 {
			fmt.Fprintf(out, "  %-44s %12.2fx\n", "median rows/s, tidemark / pg_recvlogical", sp.TidemarkRowsPerSec.Median/sp.RecvlogicalRowsPerSec.Median)
		}
		fmt.Fprintf(out, "  %-44s %12v\n", "delivered exact, no duplicates", d.Exact)
	}
	if h := r.Huge; h != nil {
		fmt.Fprintf(out, "\none transaction of %d rows: %.0f rows/s, %.2f µs CPU/row, peak RSS %.0f MB, complete and in order: %v\n",
			h.Rows, h.RowsPerSec, h.CPUMicros, h.MaxRSSMB, h.Complete)
	}
	if c := r.Crash; c != nil {
		fmt.Fprintf(out, "\ncrash: %d SIGKILLs in %.0fs at %d tx/s: %d changes committed, %d records in Kafka, %d distinct positions\n",
			c.Kills, c.Seconds, c.Rate, c.Expected, c.Delivered, c.Distinct)
		fmt.Fprintf(out, "  missing %d, delivered %.4f x the expected changes; slot after the final clean stop %s\n", c.Missing, c.Ratio, c.FinalConfirmed)
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
