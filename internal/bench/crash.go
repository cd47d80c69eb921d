package bench

import (
	"context"
	"fmt"
	kafkago "github.com/segmentio/kafka-go"
	"math/rand/v2"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Crash is the result of the crash phase: `tidemark run` killed with
// SIGKILL every few seconds under a steady workload, restarted each time.
type Crash struct {
	Rate      int     `json:"rate"`
	Kills     int     `json:"kills"`
	Seconds   float64 `json:"seconds"`
	Expected  int64   `json:"expected_changes"`   // row changes the server decoded (a slot of its own)
	Committed int64   `json:"workload_changes"`   // row changes the workload counted as committed
	Delivered int64   `json:"delivered_records"`  // records in the table topics
	Distinct  int64   `json:"distinct_positions"` // of which distinct positions
	Missing   int64   `json:"missing"`            // expected - distinct
	Ratio     float64 `json:"delivered_per_expected"`
	// Confirmed after the final clean stop, and the WAL position the
	// workload had reached (the slot is at or past the last transaction).
	FinalConfirmed string `json:"final_confirmed_lsn"`
}

// crash runs the crash phase: a workload at Options.CrashRate, Tidemark
// SIGKILLed Options.Kills times at random intervals of 2-4 s (restarted at
// once), then a final run that catches up and stops cleanly. It counts
// what Kafka holds against what the workload committed.
func (e *env) crash(ctx context.Context) (*Crash, error) {
	if err := e.publish(ctx, Tables...); err != nil {
		return nil, err
	}
	slot := "bench_crash"
	if err := e.freshSlot(ctx, slot); err != nil {
		return nil, err
	}
	defer func() { _ = e.exec(context.Background(), "SELECT pg_drop_replication_slot($1)", slot) }()
	// A second slot, created with Tidemark's, is the truth: the server
	// counts the row changes it decodes.
	truth := "bench_crash_truth"
	if err := e.freshSlot(ctx, truth); err != nil {
		return nil, err
	}
	defer func() { _ = e.exec(context.Background(), "SELECT pg_drop_replication_slot($1)", truth) }()
	if err := e.restartBroker(); err != nil {
		return nil, err
	}
	prefix := fmt.Sprintf("crash%d", time.Now().Unix()%100000)
	if err := e.createTopics(ctx, prefix); err != nil {
		return nil, err
	}
	path, err := e.writeConfig(slot, prefix, "")
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	start := func() (*exec.Cmd, error) {
		cmd := exec.CommandContext(ctx, e.o.Binary, "run", "--config", path)
		stderr.Reset()
		cmd.Stderr = &stderr
		return cmd, cmd.Start()
	}
	c := &Crash{Rate: e.o.CrashRate, Kills: e.o.Kills}
	// How long the workload runs: the kills at 3 s on average, and a margin.
	d := time.Duration(e.o.Kills)*3*time.Second + 2*time.Second
	tally := &Tally{}
	g := &generator{pool: e.pool, prefix: "k", tally: tally}
	e.printf("crash: %d tx/s for %s, SIGKILL every 2-4 s (%d kills) ...\n", c.Rate, d.Round(time.Second), c.Kills)
	done := make(chan error, 1)
	t0 := time.Now()
	go func() {
		_, err := g.runRate(ctx, c.Rate, e.o.Workers, d)
		done <- err
	}()
	cmd, err := start()
	if err != nil {
		return nil, err
	}
	started := time.Now()
	for i := 0; i < c.Kills; i++ {
		time.Sleep(time.Duration(2000+rand.IntN(2000)) * time.Millisecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
		if cmd, err = start(); err != nil {
			return nil, err
		}
		started = time.Now()
	}
	if err := <-done; err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, err
	}
	c.Seconds = time.Since(t0).Seconds()
	c.Committed = tally.Changes.Load()
	// A commit the workload abandoned at its deadline may still finish on
	// the server: let it land before taking the end.
	time.Sleep(time.Second)
	// The last run catches up (the slot reaches the WAL end), then stops
	// cleanly.
	end, err := e.lsn(ctx, "SELECT pg_current_wal_insert_lsn()::text")
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		conf, err := e.lsn(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '"+slot+"'")
		if err == nil && conf >= end && time.Since(started) > 2*time.Second {
			break
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, fmt.Errorf("the last run did not catch up to %s within 2 minutes:\n%s", end, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("tidemark run (final): %v\n%s", err, stderr.String())
	}
	conf, err := e.lsn(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '"+slot+"'")
	if err != nil {
		return nil, err
	}
	c.FinalConfirmed = conf.String()
	// Inserts, updates and deletes (pgoutput 'I', 'U', 'D') decoded from the
	// truth slot up to where the workload ended.
	if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_logical_slot_get_binary_changes($1, $2::pg_lsn, NULL,
		'proto_version', '1', 'publication_names', 'bench_pub') WHERE get_byte(data, 0) IN (73, 85, 68)`, truth, end.String()).Scan(&c.Expected); err != nil {
		return nil, fmt.Errorf("counting the truth slot's changes: %w", err)
	}
	topics := e.tableTopics(prefix)
	client := e.metadataClient()
	defer client.Transport.(*kafkago.Transport).CloseIdleConnections()
	if c.Delivered, err = e.delivered(ctx, client, topics); err != nil {
		return nil, err
	}
	if c.Distinct, err = e.distinctPositions(ctx, topics); err != nil {
		return nil, err
	}
	c.Missing = c.Expected - c.Distinct
	if c.Expected > 0 {
		c.Ratio = float64(c.Delivered) / float64(c.Expected)
	}
	e.printf("  %d kills in %.0fs: %d changes committed (%d counted by the workload), %d records in Kafka (%d distinct positions): %d missing, %.4f x the expected\n",
		c.Kills, c.Seconds, c.Expected, c.Committed, c.Delivered, c.Distinct, c.Missing, c.Ratio)
	return c, nil
}
