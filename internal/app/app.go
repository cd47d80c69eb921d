// Package app wires capture, pipeline and the Kafka sink together from a
// config. cmd/tidemark and the integration tests both run Tidemark through
// it, so what is tested is what ships.
package app

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/pipeline"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

// App is one capture-to-Kafka pipeline.
type App struct {
	// Leader is the capture lock this process holds (nil without ha).
	Leader   *Leader
	Cfg      *config.Config
	Log      *zap.Logger
	Stream   *capture.Stream
	Pipeline *pipeline.Pipeline
	Sink     *kafkasink.Sink
	// Watcher reads the slot's WAL retention and writes heartbeats.
	Watcher  *capture.Watcher
	Tables   map[string]capture.TableInfo
	Database string
	Topics   []string
	// CommitToAck observes, per transaction, the seconds from its commit in
	// Postgres to its acknowledgement by Kafka.
	CommitToAck prometheus.Histogram
	// DurabilityWarnings are the topics' replication problems found at
	// start (set by EnsureTopics).
	DurabilityWarnings []string
	// Snapshot is the initial snapshot of the slot Prepare created
	// (postgres.snapshot initial or initial_only), which Run publishes
	// before it streams; nil when there is none to take.
	Snapshot *capture.InitialSnapshot
	// SnapshotRows is the number of rows the initial snapshot published
	// (set by Run).
	SnapshotRows int64
	// Incremental runs incremental snapshots on demand (nil with
	// snapshot.incremental: false).
	Incremental   *capture.Incremental
	keys          map[string][]string
	snapFailAfter int64
}

// Check inspects the database for the config: server settings, tables,
// replica identities (of each partition of a partitioned table), the
// publication when Tidemark does not manage it (postgres.manage_publication
// false: its tables, operations, publish_via_partition_root, row filters and
// column lists) and entity-stream keys. It changes nothing and returns every
// problem.
func Check(ctx context.Context, cfg *config.Config) (map[string]capture.TableInfo, string, []capture.Problem, error) {
	conn, err := pgx.Connect(ctx, cfg.Postgres.DSN)
	if err != nil {
		return nil, "", nil, fmt.Errorf("connecting to postgres: %w", err)
	}
	defer conn.Close(context.Background())
	var db string
	if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
		return nil, "", nil, fmt.Errorf("reading current database: %w", err)
	}
	infos, problems, err := capture.Inspect(ctx, conn, cfg.Postgres.Tables)
	if err != nil {
		return nil, "", nil, err
	}
	keyProblems, err := chooseKeys(ctx, conn, cfg, infos)
	if err != nil {
		return nil, "", nil, err
	}
	problems = append(problems, keyProblems...)
	if !*cfg.Postgres.ManagePublication {
		ps, err := capture.PublicationProblems(ctx, conn, cfg.Postgres.Publication, configuredTables(cfg, infos))
		if err != nil {
			return nil, "", nil, err
		}
		problems = append(problems, ps...)
	}
	problems = append(problems, streamProblems(cfg, infos)...)
	return infos, db, problems, nil
}

// configuredTables returns the tables of infos in the order of
// postgres.tables (those that exist).
func configuredTables(cfg *config.Config, infos map[string]capture.TableInfo) []capture.TableInfo {
	var out []capture.TableInfo
	for _, t := range cfg.Postgres.Tables {
		if ti, ok := infos[t]; ok {
			out = append(out, ti)
		}
	}
	return out
}

// streamProblems checks that each entity stream's key column exists in its
// tables and is carried by deletes (part of the replica identity).
func streamProblems(cfg *config.Config, infos map[string]capture.TableInfo) []capture.Problem {
	var ps []capture.Problem
	for _, s := range cfg.Pipeline.EntityStreams {
		for _, t := range s.Tables {
			ti, ok := infos[t]
			if !ok {
				continue // reported as missing already
			}
			has := false
			for _, c := range ti.Columns {
				if c == s.Key {
					has = true
				}
			}
			if !has {
				ps = append(ps, capture.Problem{Table: t, What: fmt.Sprintf("entity stream %q keys on column %q, which the table lacks", s.Name, s.Key)})
				continue
			}
			if len(ti.IdentityColumns) > 0 && !ti.HasIdentityColumn(s.Key) {
				ps = append(ps, capture.Problem{Table: t,
					What: fmt.Sprintf("entity stream %q keys on %q, which is not in the replica identity, so deletes could not be routed", s.Name, s.Key),
					Fix:  fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL;", pgx.Identifier{ti.Schema, ti.Table}.Sanitize())})
			}
		}
	}
	return ps
}

// coverNewTables finds the configured tables the slot's topics did not
// cover at the last start (added to postgres.tables since) and queues an
// incremental snapshot of each (snapshot.new_tables), with one line per
// table; a table that cannot be snapshotted that way (no key to chunk by)
// is warned about, naming how to request one.
func coverNewTables(ctx context.Context, conn *pgx.Conn, cfg *config.Config, incr *capture.Incremental, created bool, log *zap.Logger) error {
	if incr == nil || (cfg.Snapshot.NewTables != nil && !*cfg.Snapshot.NewTables) {
		return nil // snapshot.new_tables or snapshot.incremental false
	}
	added, err := capture.NewTables(ctx, conn, cfg.Postgres.Slot, cfg.Postgres.Tables, created)
	if err != nil {
		// Bookkeeping only: the start goes on.
		log.Warn("cannot record which tables the slot's topics cover, so a table added to postgres.tables is not snapshotted automatically this time (a missing CREATE privilege: grant CREATE on the database, or create the tidemark schema for Tidemark's role)",
			zap.Error(err))
		return nil
	}
	if len(added) == 0 {
		return nil
	}
	for _, t := range added {
		ids, err := incr.Enqueue(ctx, capture.SnapshotRequest{Tables: []string{t}, By: "new table"})
		var re *capture.RequestError
		switch {
		case errors.As(err, &re):
			log.Warn("a table added to postgres.tables cannot be snapshotted automatically: only its live changes are published; request a snapshot with a condition (tidemark snapshot --table ... --where ...)",
				zap.String("table", t), zap.String("reason", re.Msg))
			if err := capture.CoverTables(ctx, conn, cfg.Postgres.Slot, []string{t}, "added, not snapshotted: "+re.Msg); err != nil {
				return err
			}
			continue
		case err != nil:
			return fmt.Errorf("queueing the snapshot of %s, added to postgres.tables: %w", t, err)
		}
		log.Info("table added to postgres.tables since the last start: queued an incremental snapshot of it (snapshot.new_tables)",
			zap.String("table", t), zap.Int64s("snapshot", ids))
		if err := capture.CoverTables(ctx, conn, cfg.Postgres.Slot, []string{t}, fmt.Sprintf("incremental snapshot %d", ids[0])); err != nil {
			return err
		}
	}
	return nil
}

// PrepareOption changes what Prepare may do.
type PrepareOption func(*prepareOptions)

type prepareOptions struct {
	acceptGap     bool
	resnapshot    bool
	snapFailAfter int64
	leader        *Leader
}

// WithLeader makes the prepared capture a leader's (see Leader): it must
// hold the lock already. Its Kafka writes stop once the lease runs out,
// Run confirms the lock and ends with ErrLeadershipLost when it cannot,
// and Prepare ends a walsender a previous leader left on the slot.
func WithLeader(l *Leader) PrepareOption { return func(o *prepareOptions) { o.leader = l } }

// Resnapshot is the recovery from a dropped or invalidated slot (`tidemark
// run --resnapshot`): an invalidated slot is dropped, and the missing slot
// is created with an exported snapshot whose rows Run publishes before it
// streams, whatever postgres.snapshot says, so every table is published
// again consistently at the new slot's consistent point (which sorts after
// everything published before). Changes committed in the gap are not
// published as changes, but their result is in the snapshot. A slot that
// exists and is healthy is refused (*ResnapshotError): incremental
// snapshots (tidemark snapshot) re-publish tables while streaming.
func Resnapshot() PrepareOption { return func(o *prepareOptions) { o.resnapshot = true } }

// ResnapshotError refuses --resnapshot on a healthy slot.
type ResnapshotError struct{ Slot string }

func (e *ResnapshotError) Error() string {
	return fmt.Sprintf("--resnapshot: replication slot %q exists and is not invalidated: nothing was lost, so there is nothing to recover; "+
		"to publish tables again while streaming, request an incremental snapshot (tidemark snapshot --table ...)", e.Slot)
}

// SnapshotFailAfter makes Run's initial snapshot fail after n rows, as if
// Tidemark had crashed mid-snapshot (tests).
func SnapshotFailAfter(n int64) PrepareOption { return func(o *prepareOptions) { o.snapFailAfter = n } }

// AcceptGap lets Prepare create a missing replication slot although the
// topic prefix has published before (`tidemark run --accept-gap`): the new
// slot starts at the current WAL position, so the changes committed between
// the last published transaction and now are never captured. Prepare logs
// that at Warn. Without it, Prepare returns a *SlotGapError instead.
func AcceptGap() PrepareOption { return func(o *prepareOptions) { o.acceptGap = true } }

// Prepare checks the database, makes sure the publication and slot exist,
// and builds the parts. It starts nothing. It touches Kafka only when the
// slot is missing: a first start (nothing published under the topic prefix)
// creates it; once the prefix has published, a missing slot means changes
// were lost, and Prepare returns a *SlotGapError (see AcceptGap), retrying
// while Kafka is unreachable.
func Prepare(ctx context.Context, cfg *config.Config, log *zap.Logger, opts ...PrepareOption) (*App, error) {
	if log == nil {
		log = zap.NewNop()
	}
	var o prepareOptions
	for _, opt := range opts {
		opt(&o)
	}
	infos, db, problems, err := Check(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if len(problems) > 0 {
		return nil, &capture.PreflightError{Problems: problems}
	}
	conn, err := pgx.Connect(ctx, cfg.Postgres.DSN)
	if err != nil {
		return nil, fmt.Errorf("connecting to postgres: %w", err)
	}
	defer conn.Close(context.Background())
	if err := capture.EnsurePublication(ctx, conn, cfg.Postgres.Publication, configuredTables(cfg, infos), *cfg.Postgres.ManagePublication); err != nil {
		return nil, err
	}
	extras, err := extraTables(ctx, conn, cfg, infos)
	if err != nil {
		return nil, err
	}
	if len(extras) > 0 {
		log.Warn("the publication publishes tables that are not configured: their changes reach capture, which skips or refuses them as postgres.unknown_tables says; add them to postgres.tables or remove them from the publication",
			zap.String("publication", cfg.Postgres.Publication), zap.Int("count", len(extras)),
			zap.Strings("tables", extras[:min(len(extras), 10)]), zap.String("unknown_tables", cfg.Postgres.UnknownTables))
	}
	rc := cfg.RouterConfig(db)
	topics := rc.Topics(cfg.Postgres.Tables)
	if o.leader != nil {
		takeOverSlot(ctx, conn, cfg.Postgres.Slot, log)
	}
	var accepted *Published
	var snap *capture.InitialSnapshot
	if o.resnapshot {
		s, err := capture.ReadSlot(ctx, conn, cfg.Postgres.Slot)
		if err != nil {
			return nil, err
		}
		switch {
		case s.Exists && s.WALStatus == "lost":
			log.Warn("--resnapshot: dropping the invalidated replication slot, to create it again with a snapshot",
				zap.String("slot", cfg.Postgres.Slot), zap.String("confirmed_flush_lsn", s.ConfirmedFlush))
			if _, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot($1)", cfg.Postgres.Slot); err != nil {
				return nil, fmt.Errorf("--resnapshot: dropping the invalidated replication slot %q: %w", cfg.Postgres.Slot, err)
			}
		case s.Exists:
			return nil, &ResnapshotError{Slot: cfg.Postgres.Slot}
		}
	}
	create := func(ctx context.Context) error {
		if !o.resnapshot && (cfg.Postgres.Snapshot == config.SnapshotNever || accepted != nil) {
			// No snapshot: with postgres.snapshot never, or when the slot
			// is recreated accepting a gap (--accept-gap streams from now,
			// as before; re-publishing the tables is a re-snapshot, which
			// is not built yet).
			return capture.CreateSlot(ctx, conn, cfg.Postgres.Slot)
		}
		// The slot is created with an exported snapshot, which Run reads
		// (and publishes) before it streams.
		var err error
		snap, err = capture.CreateSlotWithSnapshot(ctx, conn, cfg.Postgres.DSN, cfg.Postgres.Slot)
		return err
	}
	created, err := capture.EnsureSlotWith(ctx, conn, cfg.Postgres.Slot, func(ctx context.Context) error {
		p, err := lastPublished(ctx, cfg, topics, rc, log)
		if err != nil || !p.Any {
			return err
		}
		if rec, err := capture.ReadSnapshotRecord(ctx, conn, cfg.Postgres.Slot); err != nil {
			return err
		} else if rec.Exists && rec.State != capture.SnapshotDone {
			// What the prefix holds is this slot's incomplete initial
			// snapshot: its stream never started. Redoing it is what the
			// refusal (SnapshotIncompleteError) told the operator to do.
			log.Warn("replication slot is missing and its initial snapshot had not completed: creating a new slot and taking a new initial snapshot, whose rows sort after the incomplete one's",
				zap.String("slot", cfg.Postgres.Slot), zap.String("incomplete_consistent_point", rec.ConsistentPoint))
			return nil
		}
		if !o.acceptGap && !o.resnapshot {
			return &SlotGapError{Slot: cfg.Postgres.Slot, Prefix: cfg.Kafka.TopicPrefix, Last: p}
		}
		accepted = &p
		return nil
	}, create)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok && snap != nil {
			snap.Close()
		}
	}()
	if !created {
		// A slot created for an initial snapshot that never completed
		// would stream without the rows not yet published.
		if err := capture.CheckSnapshotComplete(ctx, conn, cfg.Postgres.Slot); err != nil {
			return nil, err
		}
	}
	slot, err := capture.ReadSlot(ctx, conn, cfg.Postgres.Slot)
	if err != nil {
		return nil, err
	}
	confirmed, err := pipeline.ParseLSN(slot.ConfirmedFlush)
	if err != nil {
		return nil, fmt.Errorf("replication slot %q: confirmed_flush_lsn: %w", cfg.Postgres.Slot, err)
	}
	switch {
	case created && accepted != nil && o.resnapshot:
		log.Warn("replication slot was missing although the topic prefix had published; created a new one with a snapshot (--resnapshot): every table is published again at its consistent point before the stream starts; the changes committed since the last published transaction are not published one by one, only their result (rows deleted meanwhile stay in a fold of the topics: consumers that keep state rebuild it, e.g. tidemark rebuild targets --all)",
			zap.String("slot", cfg.Postgres.Slot), zap.String("topic_prefix", cfg.Kafka.TopicPrefix),
			zap.String("last_published_lsn", accepted.lsnText()), zap.Stringer("consistent_point", confirmed))
	case created && accepted != nil:
		log.Warn("replication slot was missing although the topic prefix had published; created a new one at the current WAL position, accepting the gap (--accept-gap): changes committed after the last published transaction until the new slot's start are not captured",
			zap.String("slot", cfg.Postgres.Slot), zap.String("topic_prefix", cfg.Kafka.TopicPrefix),
			zap.String("last_published_lsn", accepted.lsnText()), zap.Stringer("slot_start_lsn", confirmed))
	case created:
		log.Info("created replication slot", zap.String("slot", cfg.Postgres.Slot), zap.Stringer("start_lsn", confirmed))
	}
	keys := map[string][]string{}
	for name, ti := range infos {
		keys[name] = ti.KeyColumns()
	}
	var board *capture.ChunkBoard
	var incr *capture.Incremental
	if cfg.Snapshot.Incremental == nil || *cfg.Snapshot.Incremental {
		board = capture.NewChunkBoard(cfg.Postgres.Slot)
	}
	stream, err := capture.New(capture.Config{
		Chunks: board,
		DSN:    cfg.Postgres.DSN, Slot: cfg.Postgres.Slot, Publication: cfg.Postgres.Publication,
		StandbyInterval: cfg.Postgres.StandbyInterval, KeyColumns: keys, ConfirmedLSN: confirmed,
		Tables: cfg.Postgres.Tables, UnknownTables: cfg.Postgres.UnknownTables, Messages: cfg.Pipeline.Messages,
		BufferBytes: HandoverBytes(cfg), MaxRowBytes: int(cfg.Kafka.BatchBytes),
		ReadCoalesce: readCoalesce(log),
	}, log.With(zap.String("component", "capture")))
	if err != nil {
		return nil, err
	}
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return nil, err
	}
	sink, err := kafkasink.New(kafkasink.Config{
		Brokers: cfg.Kafka.Brokers, ClientID: cfg.Kafka.ClientID, Partitions: cfg.Kafka.Partitions,
		ReplicationFactor: cfg.Kafka.ReplicationFactor, TopicConfigs: cfg.Kafka.TopicConfigs,
		Compression: cfg.Kafka.Compression, BatchBytes: cfg.Kafka.BatchBytes, TLS: knet.TLS, SASL: knet.SASL,
	}, log.With(zap.String("component", "kafka")))
	if err != nil {
		return nil, err
	}
	commitToAck := prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "tidemark", Name: "commit_to_ack_seconds",
		Help:    "Seconds from a transaction's commit in Postgres to its acknowledgement by Kafka.",
		Buckets: []float64{.001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .2, .5, 1, 2, 5, 10, 30, 60},
	})
	if o.leader != nil {
		sink.SetFence(o.leader.Fence)
	}
	pipe, err := pipeline.New(pipeline.Config{
		Router:              rc,
		MaxInFlightMessages: cfg.Pipeline.MaxInFlightMessages,
		MaxInFlightBytes:    cfg.Pipeline.MaxInFlightBytes,
		MaxBatchMessages:    cfg.Pipeline.MaxBatchMessages,
	}, stream, sink, pipeline.WithLogger(log.With(zap.String("component", "pipeline"))),
		pipeline.WithAckHook(func(commit, acked time.Time) { commitToAck.Observe(acked.Sub(commit).Seconds()) }))
	if err != nil {
		return nil, err
	}
	if board != nil {
		incr = capture.NewIncremental(capture.IncrementalConfig{
			DSN: cfg.Postgres.DSN, Slot: cfg.Postgres.Slot, Tables: configuredTables(cfg, infos), KeyColumns: keys,
			ChunkSize: cfg.Snapshot.ChunkSize, ChunkBytes: cfg.Snapshot.ChunkBytes, MaxRowsPerSecond: cfg.Snapshot.MaxRowsPerSecond,
			SignalInterval: cfg.Snapshot.SignalInterval, Board: board, Acked: stream.AckedLSN,
		}, log.With(zap.String("component", "incremental-snapshot")))
	}
	if err := coverNewTables(ctx, conn, cfg, incr, created, log); err != nil {
		return nil, err
	}
	if incr != nil {
		if w, err := capture.SyncRepVisibility(ctx, conn); err != nil {
			log.Warn("could not check what incremental snapshots can see of sessions waiting for a synchronous standby", zap.Error(err))
		} else if w != "" {
			log.Warn("incremental snapshots: " + w)
		}
	}
	watcher := capture.NewWatcher(capture.WatcherConfig{
		DSN: cfg.Postgres.DSN, Slot: cfg.Postgres.Slot, Interval: cfg.Postgres.SlotCheckInterval, Heartbeat: *cfg.Postgres.HeartbeatInterval,
	}, log.With(zap.String("component", "slot-watch")))
	ok = true
	return &App{Leader: o.leader, Cfg: cfg, Log: log, Stream: stream, Pipeline: pipe, Sink: sink, Watcher: watcher, Tables: infos, Database: db,
		Topics: topics, CommitToAck: commitToAck, Snapshot: snap, Incremental: incr, keys: keys, snapFailAfter: o.snapFailAfter}, nil
}

// EnsureTopics creates missing topics, retrying while Kafka is unreachable.
// The transactions topic has one partition, so BEGIN/END records keep commit
// order.
func (a *App) EnsureTopics(ctx context.Context) error {
	specs := map[string]kafkasink.TopicSpec{
		a.Cfg.RouterConfig(a.Database).TransactionsTopicName(): {Partitions: 1},
	}
	bo := backoff.NewExponentialBackOff()
	bo.MaxInterval = 10 * time.Second
	bo.MaxElapsedTime = 0
	attempt := 0
	err := backoff.Retry(func() error {
		err := a.Sink.EnsureTopics(ctx, a.Topics, specs)
		if kafkanet.IsAccess(err) {
			return backoff.Permanent(err)
		}
		if err != nil && ctx.Err() == nil {
			attempt++
			if attempt == 1 || attempt%10 == 0 {
				a.Log.Warn("kafka not ready; retrying", zap.Error(err), zap.Int("attempt", attempt))
			}
		}
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		return err
	}, backoff.WithContext(bo, ctx))
	if err != nil {
		return err
	}
	a.warnDurability(ctx)
	return nil
}

// warnDurability warns once, at start, about each topic Tidemark writes
// that the brokers keep with too little redundancy for acks=all to mean
// much (see kafkasink.Sink.DurabilityWarnings).
func (a *App) warnDurability(ctx context.Context) {
	txn := a.Cfg.RouterConfig(a.Database).TransactionsTopicName()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	warnings, err := a.Sink.DurabilityWarnings(dctx, a.Topics, map[string]bool{txn: true})
	if err != nil {
		a.Log.Warn("could not read the topics' replication settings", zap.Error(err))
	}
	for _, w := range warnings {
		a.Log.Warn("kafka durability: " + w)
	}
	a.DurabilityWarnings = warnings
}

// Run ensures topics, then runs capture and the pipeline until ctx ends or
// one fails, then closes the sink (waiting up to 30s for in-flight writes).
// A cancelled ctx is a clean stop and returns nil.
func (a *App) Run(ctx context.Context) error {
	if err := a.EnsureTopics(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	if a.Snapshot == nil && a.Cfg.Postgres.Snapshot == config.SnapshotInitialOnly {
		a.Log.Info("the replication slot existed already, so there is no initial snapshot to publish; stopping (postgres.snapshot: initial_only)",
			zap.String("slot", a.Cfg.Postgres.Slot))
		closeCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return a.Sink.Close(closeCtx)
	}
	if a.Snapshot != nil {
		if err := a.runSnapshot(ctx); err != nil {
			closeCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if ctx.Err() != nil {
				err = nil
			}
			return errors.Join(err, a.Sink.Close(closeCtx))
		}
		if a.Cfg.Postgres.Snapshot == config.SnapshotInitialOnly {
			a.Log.Info("initial snapshot published; stopping (postgres.snapshot: initial_only)", zap.Int64("rows", a.SnapshotRows))
			closeCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			return a.Sink.Close(closeCtx)
		}
	}
	a.Log.Info("capturing", zap.String("slot", a.Cfg.Postgres.Slot), zap.Strings("tables", a.Cfg.Postgres.Tables),
		zap.Strings("brokers", a.Cfg.Kafka.Brokers))
	g, gctx := errgroup.WithContext(ctx)
	// On a stop the pipeline drains first (it writes what it holds and
	// acknowledges it); the stream stops after it, confirming to Postgres
	// what is then durable, so a restart does not replay it.
	sctx, stopStream := context.WithCancel(context.WithoutCancel(gctx))
	defer stopStream()
	g.Go(func() error {
		err := a.Stream.Run(sctx)
		if errors.Is(err, context.Canceled) && gctx.Err() == nil {
			return nil // stopped by the pipeline's end, which reports
		}
		return err
	})
	g.Go(func() error {
		defer stopStream()
		return a.Pipeline.Run(gctx)
	})
	g.Go(func() error { return a.Watcher.Run(gctx) })
	if a.Incremental != nil {
		g.Go(func() error { return ignoreCanceled(a.Incremental.Run(gctx)) })
	}
	err := g.Wait()
	closeCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = errors.Join(ignoreCanceled(err), a.Sink.Close(closeCtx))
	a.Log.Info("stopped", zap.Stringer("confirmed_lsn", pipeline.LSN(a.Stream.Stats().ConfirmedLSN.Load())))
	return err
}

// readCoalesce is capture's ReadCoalesce: the default, unless the
// TIDEMARK_READ_COALESCE environment variable (a Go duration; 0 or a
// negative one turns it off) says otherwise, for measurements.
func readCoalesce(log *zap.Logger) time.Duration {
	v := os.Getenv("TIDEMARK_READ_COALESCE")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		log.Warn("TIDEMARK_READ_COALESCE is not a duration (e.g. 0, 500us, 2ms); using the default", zap.String("value", v))
		return 0
	}
	if d <= 0 {
		return -1
	}
	return d
}

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// runSnapshot publishes the initial snapshot through a pipeline of its own
// (the same router, sink and in-flight bounds as the stream's), waits until
// every record is durable, records the snapshot as complete, then ends the
// snapshot transaction and the exported snapshot. The stream starts only
// after it, so the slot is not confirmed past its consistent point before
// the snapshot is durable.
func (a *App) runSnapshot(ctx context.Context) error {
	defer a.Snapshot.Close()
	src := capture.NewSnapshotSource(a.Snapshot, capture.SnapshotSourceConfig{
		Tables: configuredTables(a.Cfg, a.Tables), KeyColumns: a.keys, BatchBytes: int(HandoverBytes(a.Cfg) / 8),
		FailAfter: a.snapFailAfter,
	}, a.Log.With(zap.String("component", "snapshot")))
	defer src.Close()
	pipe, err := pipeline.New(pipeline.Config{
		Router:              a.Cfg.RouterConfig(a.Database),
		MaxInFlightMessages: a.Cfg.Pipeline.MaxInFlightMessages,
		MaxInFlightBytes:    a.Cfg.Pipeline.MaxInFlightBytes,
		MaxBatchMessages:    a.Cfg.Pipeline.MaxBatchMessages,
	}, src, a.Sink, pipeline.WithLogger(a.Log.With(zap.String("component", "snapshot-pipeline"))))
	if err != nil {
		return err
	}
	start := time.Now()
	a.Log.Info("initial snapshot: publishing the existing rows", zap.String("slot", a.Snapshot.Slot),
		zap.Stringer("consistent_point", a.Snapshot.ConsistentPoint))
	err = pipe.Run(ctx)
	if !errors.Is(err, capture.ErrSnapshotDone) {
		if err == nil {
			err = ctx.Err()
		}
		return fmt.Errorf("initial snapshot of slot %q: %w", a.Snapshot.Slot, err)
	}
	a.SnapshotRows = src.Rows
	if err := a.Snapshot.Complete(ctx, src.Rows); err != nil {
		return err
	}
	a.Log.Info("initial snapshot published", zap.Int64("rows", src.Rows), zap.Any("tables", src.PerTable),
		zap.Duration("took", time.Since(start)))
	return nil
}

// takeOverSlot ends the walsender that still serves the slot for a
// previous leader: this process holds the capture lock, so that leader
// lost it (paused or cut off) and its connection would otherwise keep the
// slot busy until wal_sender_timeout. Failure (no privilege) is a warning:
// the stream retries until the slot is free.
func takeOverSlot(ctx context.Context, conn *pgx.Conn, slot string, log *zap.Logger) {
	var pid *int32
	if err := conn.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active`, slot).Scan(&pid); err != nil || pid == nil {
		return
	}
	var ok bool
	if err := conn.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, *pid).Scan(&ok); err != nil || !ok {
		log.Warn("the replication slot is still in use by a previous leader's connection and it could not be ended; waiting for the server to time it out (wal_sender_timeout)",
			zap.String("slot", slot), zap.Int32("pid", *pid), zap.Error(err))
		return
	}
	log.Info("ended the previous leader's replication connection", zap.String("slot", slot), zap.Int32("pid", *pid))
}
