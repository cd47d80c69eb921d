package main

import (
	"crypto/rand"
	"encoding/hex"

	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/tidemark/tidemark/internal/freeport"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/demo"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
)

func demoCmd() *cobra.Command {
	var (
		pgDSN    string
		brokers  []string
		duration time.Duration
		rate     int
		verbose  bool
	)
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run Tidemark end to end on a throwaway Postgres and an in-process Kafka",
		Long: `demo starts a throwaway Postgres with wal_level=logical (or uses --pg) and an
in-process Kafka (or uses --brokers), creates a small chat schema, captures it
while a mixed workload runs, then prints a summary and envelopes read back
from Kafka.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDemo(cmd.Context(), cmd.OutOrStdout(), pgDSN, brokers, duration, rate, verbose)
		},
	}
	cmd.Flags().StringVar(&pgDSN, "pg", "", "DSN of a Postgres with wal_level=logical to use instead of a throwaway server (a schema is created in it)")
	cmd.Flags().StringSliceVar(&brokers, "brokers", nil, "Kafka brokers to use instead of the in-process one")
	cmd.Flags().DurationVar(&duration, "duration", 20*time.Second, "how long the workload runs")
	cmd.Flags().IntVar(&rate, "rate", 200, "workload transactions per second")
	cmd.Flags().BoolVar(&verbose, "verbose", false, "log at info level")
	return cmd
}

func runDemo(ctx context.Context, out io.Writer, pgDSN string, brokers []string, duration time.Duration, rate int, verbose bool) error {
	level := "warn"
	if verbose {
		level = "info"
	}
	log, err := newLogger(level, "console")
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()

	if pgDSN == "" {
		fmt.Fprintln(out, "starting a throwaway Postgres (wal_level=logical) ...")
		srv, err := pgserver.Start(ctx, pgserver.Options{})
		if err != nil {
			return fmt.Errorf("starting throwaway Postgres (or pass --pg DSN): %w", err)
		}
		defer func() { _ = srv.Stop() }()
		if pgDSN, err = srv.CreateDatabase(ctx, "chat"); err != nil {
			return err
		}
	}
	if len(brokers) == 0 {
		kc, err := kafkatest.Start("")
		if err != nil {
			return err
		}
		defer kc.Close()
		brokers = kc.Brokers()
		fmt.Fprintf(out, "started in-process Kafka (kfake) on %s\n", brokers[0])
	}

	pool, err := pgxpool.New(ctx, pgDSN)
	if err != nil {
		return fmt.Errorf("connecting to postgres: %w", err)
	}
	defer pool.Close()
	if err := demo.Setup(ctx, pool); err != nil {
		return err
	}

	prefix := fmt.Sprintf("demo%d", time.Now().Unix()%100000)
	cfg := &config.Config{
		// snapshot: never: the demo leaves nothing behind in a database it
		// was given (an initial snapshot records itself in tidemark.snapshots).
		Postgres: config.Postgres{DSN: pgDSN, Slot: prefix + "_slot", Publication: prefix + "_pub", Tables: demo.Tables,
			Snapshot: config.SnapshotNever},
		Kafka: config.Kafka{Brokers: brokers, TopicPrefix: prefix, Partitions: 3},
		Pipeline: config.Pipeline{EntityStreams: []pipeline.EntityStream{{
			Name: "rooms", Key: "room_id", Tables: []string{"public.room_memberships", "public.events", "public.event_json"}}}},
	}
	noHTTP := ""
	cfg.HTTP.Listen = &noHTTP
	cfg.ApplyDefaults()
	if probs := cfg.Validate(); len(probs) > 0 {
		return fmt.Errorf("demo config: %v", probs)
	}
	a, err := app.Prepare(ctx, cfg, log)
	if err != nil {
		return err
	}
	// The demo leaves nothing behind in a database it was given.
	defer dropDemoObjects(pool, cfg)

	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	runErr := make(chan error, 1)
	go func() { runErr <- a.Run(runCtx) }()

	// The operator console and metrics, on a free local port, with an admin
	// token made for this run.
	if port, err := freeport.Get(); err == nil {
		listen := fmt.Sprintf("127.0.0.1:%d", port)
		tok := make([]byte, 16)
		_, _ = rand.Read(tok)
		cfg.HTTP.AdminToken = hex.EncodeToString(tok)
		reg := app.NewRegistry()
		a.Register(reg)
		admin := app.AdminHandler(adminDeps(cfg, log), log)
		go func() { _ = app.Serve(runCtx, listen, reg, a.Ready, admin) }()
		fmt.Fprintf(out, "operator console: http://%s/#token=%s (metrics at /metrics)\n", listen, cfg.HTTP.AdminToken)
	}

	// Cache invalidation: a throwaway Redis (when redis-server is installed)
	// whose keys the invalidation consumer deletes as memberships change.
	var invRun *demoInvalidation
	if rs, err := redistest.Start(ctx); err != nil {
		fmt.Fprintf(out, "no redis-server (%v): skipping the cache-invalidation part\n", err)
	} else {
		defer func() { _ = rs.Stop() }()
		invRun, err = startDemoInvalidation(ctx, cfg, rs, log)
		if err != nil {
			return err
		}
		defer invRun.stop()
		fmt.Fprintf(out, "started a throwaway Redis on %s; the invalidation consumer deletes room:<room>:members and user:<user>:rooms on membership changes\n", rs.Addr())
	}

	if err := demo.Seed(ctx, pool); err != nil {
		return err
	}
	fmt.Fprintf(out, "capturing %s into topics %s.* for %s at %d tx/s\n", strings.Join(cfg.Postgres.Tables, ", "), prefix, duration, rate)

	var counts demo.Counts
	wctx, stopWork := context.WithTimeout(ctx, duration)
	defer stopWork()
	g, gctx := errgroup.WithContext(wctx)
	g.Go(func() error { return demo.Workload(gctx, pool, rate, uint64(time.Now().UnixNano()), &counts) })
	g.Go(func() error { progress(gctx, out, a, &counts); return nil })
	werr := g.Wait()
	fmt.Fprintln(out)
	if werr != nil {
		return werr
	}
	if ctx.Err() != nil {
		return nil
	}

	// Wait until everything committed is confirmed.
	var target string
	if err := pool.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&target); err != nil {
		return err
	}
	tlsn, _ := pipeline.ParseLSN(target)
	deadline := time.Now().Add(30 * time.Second)
	for pipeline.LSN(a.Stream.Stats().ConfirmedLSN.Load()) < tlsn && time.Now().Before(deadline) {
		select {
		case err := <-runErr:
			return fmt.Errorf("pipeline stopped: %w", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	caughtUp := pipeline.LSN(a.Stream.Stats().ConfirmedLSN.Load()) >= tlsn
	if invRun != nil {
		if err := invRun.show(ctx, out, pool); err != nil {
			return err
		}
	}
	stopRun()
	if err := <-runErr; err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	return summary(ctx, out, a, &counts, brokers, caughtUp)
}

func progress(ctx context.Context, out io.Writer, a *app.App, counts *demo.Counts) {
	tty := false
	if f, ok := out.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	interval := 2 * time.Second
	if tty {
		interval = 250 * time.Millisecond
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	start := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ps, cs := a.Pipeline.Stats(), a.Stream.Stats()
		lag := int64(cs.ServerWALEnd.Load()) - int64(cs.ConfirmedLSN.Load())
		if lag < 0 {
			lag = 0
		}
		line := fmt.Sprintf("%5.1fs  committed %6d tx | captured %7d changes | published %7d msgs | in flight %5d | confirmed %s | lag %d B",
			time.Since(start).Seconds(), counts.Transactions.Load(), ps.Changes.Load(), ps.Published.Load(), ps.InFlight.Load(),
			pipeline.LSN(cs.ConfirmedLSN.Load()), lag)
		if tty {
			fmt.Fprintf(out, "\r\033[K%s", line)
		} else {
			fmt.Fprintln(out, line)
		}
	}
}

func summary(ctx context.Context, out io.Writer, a *app.App, counts *demo.Counts, brokers []string, caughtUp bool) error {
	ps := a.Pipeline.Stats()
	fmt.Fprintf(out, "\nsummary\n  workload: %d transactions (%d messages, %d read markers, %d membership changes)\n",
		counts.Transactions.Load(), counts.Messages.Load(), counts.Reads.Load(), counts.Members.Load())
	fmt.Fprintf(out, "  captured: %d transactions, %d row changes; published %d messages; confirmed LSN %s (caught up: %v)\n",
		ps.Transactions.Load(), ps.Changes.Load(), ps.Published.Load(), pipeline.LSN(a.Stream.Stats().ConfirmedLSN.Load()), caughtUp)
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	topics := append([]string(nil), a.Topics...)
	sort.Strings(topics)
	samples := map[string]kafkatest.Record{}
	fmt.Fprintln(out, "  topics read back from Kafka:")
	for _, t := range topics {
		recs, err := kafkatest.ReadAll(rctx, brokers, t)
		if err != nil {
			return fmt.Errorf("reading back %s: %w", t, err)
		}
		fmt.Fprintf(out, "    %-40s %7d messages\n", t, len(recs))
		for _, r := range recs {
			op := r.Headers["tidemark-op"]
			k := t + "/" + op + r.Headers["tidemark-status"]
			if _, ok := samples[k]; !ok {
				samples[k] = r
			}
		}
	}
	show := []string{
		a.Cfg.Kafka.TopicPrefix + ".public.room_memberships/u",
		a.Cfg.Kafka.TopicPrefix + ".rooms/c",
		a.Cfg.RouterConfig("").TransactionsTopicName() + "/END",
	}
	for _, k := range show {
		r, ok := samples[k]
		if !ok {
			continue
		}
		if !json.Valid(r.Value) {
			return fmt.Errorf("envelope in %s does not parse", r.Topic)
		}
		// Indented as written (field order and every digit of ts_ns kept).
		var b bytes.Buffer
		_ = json.Indent(&b, r.Value, "    ", "  ")
		fmt.Fprintf(out, "\n  %s  partition %d offset %d key %s\n    %s\n", r.Topic, r.Partition, r.Offset, r.Key, b.String())
	}
	if !caughtUp {
		return errors.New("the pipeline did not catch up within 30s after the workload stopped")
	}
	return nil
}

func dropDemoObjects(pool *pgxpool.Pool, cfg *config.Config) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := 0; i < 50; i++ {
		_, err := pool.Exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", cfg.Postgres.Slot)
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	_, _ = pool.Exec(ctx, "DROP PUBLICATION IF EXISTS "+cfg.Postgres.Publication)
}

type demoInvalidation struct {
	inv    *app.Invalidation
	rs     *redistest.Server
	cancel context.CancelFunc
	done   chan error
}

func startDemoInvalidation(ctx context.Context, cfg *config.Config, rs *redistest.Server, log *zap.Logger) (*demoInvalidation, error) {
	cfg.Invalidation = &config.Invalidation{
		Redis: &config.Redis{Addr: rs.Addr()},
		Rules: []invalidation.Rule{
			{Table: "public.room_memberships", Keys: []string{"room:{room_id}:members", "user:{user_id}:rooms"}},
			{Table: "public.read_markers", Keys: []string{"unread:{user_id}:{room_id}"}},
		},
	}
	cfg.ApplyDefaults()
	inv, err := app.PrepareInvalidation(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	ictx, cancel := context.WithCancel(ctx)
	d := &demoInvalidation{inv: inv, rs: rs, cancel: cancel, done: make(chan error, 1)}
	go func() { d.done <- inv.Run(ictx) }()
	return d, nil
}

func (d *demoInvalidation) stop() {
	d.cancel()
	<-d.done
}

// show caches a room's member list in Redis, makes a user leave that room,
// and reports how long the cached list survived.
func (d *demoInvalidation) show(ctx context.Context, out io.Writer, pool *pgxpool.Pool) error {
	rc := d.rs.Client()
	room, user := demo.RoomID(1), demo.UserID(1)
	key := "room:" + room + ":members"
	if err := rc.Set(ctx, key, "cached member list", 0).Err(); err != nil {
		return err
	}
	start := time.Now()
	// synchronous_commit=on: the throwaway server runs with it off, where
	// WAL reaches the walsender only at the WAL writer's next flush (200 ms).
	if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = on`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO room_memberships(room_id, user_id, membership) VALUES ($1, $2, 'leave')
			ON CONFLICT (room_id, user_id) DO UPDATE SET membership = 'leave'`, room, user)
		return err
	}); err != nil {
		return err
	}
	start = time.Now() // from the commit's acknowledgement
	for {
		n, err := rc.Exists(ctx, key).Result()
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		if time.Since(start) > 10*time.Second {
			return fmt.Errorf("the cached %s was not invalidated within 10s", key)
		}
		time.Sleep(time.Millisecond)
	}
	st := d.inv.Consumer.Stats()
	fmt.Fprintf(out, "\ncache invalidation: %s left %s; Redis key %s was deleted %.1f ms after the commit\n",
		user, room, key, float64(time.Since(start).Microseconds())/1000)
	fmt.Fprintf(out, "  the invalidation consumer applied %d changes (%d dead-lettered) and invalidated %d keys in Redis and in %s\n",
		st.Messages.Load(), st.DLQ.Load(), d.inv.Handler.Invalidated.Load(), d.inv.InvalidationsTopic)
	return nil
}
