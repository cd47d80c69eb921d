package app

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/invalidation/targets"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
	redissink "github.com/tidemark/tidemark/sinks/redis"
)

// Targets is the running notification-targets consumer: the consumer group
// over the membership and user tables' topics, the handler keeping state in
// Postgres, the transaction index and the outputs.
type Targets struct {
	Consumer *invalidation.Consumer
	Handler  *targets.Handler
	Store    *targets.Store
	Ends     *targets.TxnIndex // nil without the transactions topic
	Topics   map[string][]string
	// TargetsTopic and ChangesTopic are "" when targets.topics is false.
	TargetsTopic, ChangesTopic string
	DLQTopic                   string

	out    *targetOutputs
	state  *pgxpool.Pool
	source *pgxpool.Pool
	cfg    *config.Config
	knet   kafkanet.Settings
	log    *zap.Logger
	ratio  prometheus.Gauge
	audits atomic.Uint64
	// unconfirmed counts periodic audits whose differences could not be
	// re-checked within targets.audit_wait (lag): they leave ratio alone.
	unconfirmed atomic.Uint64
	// pruned counts state rows deleted by the prune loop, by table.
	prunedMembers, prunedUsers, prunedRooms atomic.Uint64
	// pruneWatermark is the last watermark the prune loop used (commit
	// LSN; 0 while it cannot prune).
	pruneWatermark atomic.Uint64
}

// targetOutputs are the Kafka producer, the Redis sink and the publisher
// chaining them (Postgres is the Store itself).
type targetOutputs struct {
	producer       *kafkasink.Sink
	redis          *redissink.Sink
	kafka          *targets.KafkaOutput // nil when targets.topics is false
	publish        targets.Publisher
	publishFull    targets.FullPublisher // a large room's full set on the compacted topic (targets.full_set_interval)
	targetsTopic   string
	changesTopic   string
	dlqTopic       string
	maxRecord      int64 // targets.max_record_bytes
	ensureAttempts int
	log            *zap.Logger

	truncated       atomic.Uint64 // notify_targets records published without their list
	redisGaps       atomic.Uint64 // Redis sets replaced whole because they missed an update
	fullSets        atomic.Uint64 // full sets of large rooms published
	truncatedLogged map[string]bool
	truncMu         sync.Mutex
}

// maxTruncatedLogged bounds the rooms whose truncation is logged by name
// (each update of such a room is truncated again; the metric counts all).
const maxTruncatedLogged = 100

// recordSlack is what a record batch adds around its records on the wire;
// topics get max.message.bytes = targets.max_record_bytes + recordSlack.
const recordSlack = 1 << 10

func (o *targetOutputs) onTruncated(room string, users, bytes int) {
	o.truncated.Add(1)
	o.truncMu.Lock()
	defer o.truncMu.Unlock()
	if o.truncatedLogged[room] || len(o.truncatedLogged) >= maxTruncatedLogged {
		return
	}
	o.truncatedLogged[room] = true
	o.log.Warn("room's notification targets too large for one notify_targets record: published without the list (\"truncated\": true); read it from the Postgres tables or Redis, or raise targets.max_record_bytes and the topic's max.message.bytes",
		zap.String("topic", o.targetsTopic), zap.String("room", room), zap.Int("users", users), zap.Int("record_bytes", bytes),
		zap.Int64("max_record_bytes", o.kafka.MaxRecordBytes))
}

func newTargetOutputs(cfg *config.Config, store *targets.Store, log *zap.Logger) (*targetOutputs, error) {
	tc := cfg.Targets
	targetsTopic := cfg.Kafka.TopicPrefix + ".notify_targets"
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return nil, err
	}
	producer, err := kafkasink.New(kafkasink.Config{Brokers: cfg.Kafka.Brokers, ClientID: cfg.Kafka.ClientID + "-targets",
		Partitions: cfg.Kafka.Partitions, ReplicationFactor: cfg.Kafka.ReplicationFactor, Compression: cfg.Kafka.Compression,
		TLS: knet.TLS, SASL: knet.SASL,
		TopicBatchBytes: map[string]int64{targetsTopic: tc.MaxRecordBytes}}, log.With(zap.String("component", "targets-producer")))
	if err != nil {
		return nil, err
	}
	o := &targetOutputs{producer: producer, dlqTopic: cfg.Kafka.TopicPrefix + ".dlq", maxRecord: tc.MaxRecordBytes,
		log: log.With(zap.String("component", "targets")), truncatedLogged: map[string]bool{}}
	var pubs []targets.Publisher
	var fulls []targets.FullPublisher
	if *tc.Topics {
		o.targetsTopic = targetsTopic
		o.changesTopic = cfg.Kafka.TopicPrefix + ".notify_target_changes"
		o.kafka = &targets.KafkaOutput{Sink: producer, TargetsTopic: o.targetsTopic, ChangesTopic: o.changesTopic,
			MaxRecordBytes: tc.MaxRecordBytes, Truncated: o.onTruncated}
		pubs = append(pubs, o.kafka.Publish)
		fulls = append(fulls, o.kafka.PrepareFull)
	}
	if r := tc.Redis; r != nil {
		// TLS and the ACL user as configured; checked now (see newRedisSink;
		// bounded by its own timeout, as this has no ctx).
		rs, err := newRedisSink(context.Background(), "targets.redis", &r.Redis, "", redissink.UseVersionedSets, log)
		if err != nil {
			return nil, err
		}
		o.redis = rs
		ro := &targets.RedisOutput{Sets: versionedSets{rs}, KeyTemplate: r.Key, Full: store.ReadFull,
			Gap: func(string) { o.redisGaps.Add(1) }}
		// Not in fulls: the Redis set follows every update (versioned) and
		// is replaced whole only when it misses one (RedisOutput.Publish).
		pubs = append(pubs, ro.Publish)
	}
	o.publish = targets.Publishers(pubs...)
	o.publishFull = targets.FullPublishers(fulls...)
	return o, nil
}

// ensureTopics creates the dead-letter and output topics (the targets
// topic compacted), retrying while Kafka is unreachable.
func (o *targetOutputs) ensureTopics(ctx context.Context, log *zap.Logger) error {
	topics := []string{o.dlqTopic}
	specs := map[string]kafkasink.TopicSpec{}
	if o.targetsTopic != "" {
		topics = append(topics, o.targetsTopic, o.changesTopic)
		specs[o.targetsTopic] = kafkasink.TopicSpec{Configs: map[string]string{"cleanup.policy": "compact",
			"max.message.bytes": strconv.FormatInt(o.maxRecord+recordSlack, 10)}}
	}
	bo := backoff.NewExponentialBackOff()
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0
	err := backoff.Retry(func() error {
		err := o.producer.EnsureTopics(ctx, topics, specs)
		if err != nil && ctx.Err() == nil {
			o.ensureAttempts++
			if o.ensureAttempts == 1 || o.ensureAttempts%10 == 0 {
				log.Warn("kafka not ready for the notification-target topics; retrying", zap.Error(err))
			}
		}
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		return err
	}, backoff.WithContext(bo, ctx))
	if err != nil || o.kafka == nil {
		return err
	}
	o.fitRecordLimit(ctx, log)
	return nil
}

// fitRecordLimit lowers the targets record bound to what the topic accepts
// when it existed before with a smaller max.message.bytes (Tidemark does
// not change configs of existing topics), and says how to raise it.
func (o *targetOutputs) fitRecordLimit(ctx context.Context, log *zap.Logger) {
	m, err := o.producer.MaxMessageBytes(ctx, o.targetsTopic)
	if err != nil {
		log.Warn("cannot read the notify_targets topic's max.message.bytes; assuming targets.max_record_bytes fits", zap.Error(err),
			zap.Int64("max_record_bytes", o.maxRecord))
		return
	}
	if m-recordSlack >= o.maxRecord {
		return
	}
	limit := m - recordSlack
	if limit < 1<<10 {
		limit = 1 << 10
	}
	o.producer.SetTopicBatchBytes(o.targetsTopic, limit)
	o.kafka.MaxRecordBytes = limit
	log.Warn("the notify_targets topic accepts smaller records than targets.max_record_bytes: rooms whose set does not fit are published without their list; to raise it run kafka-configs.sh --alter --entity-type topics --entity-name "+o.targetsTopic+" --add-config max.message.bytes="+strconv.FormatInt(o.maxRecord+recordSlack, 10),
		zap.String("topic", o.targetsTopic), zap.Int64("max_message_bytes", m), zap.Int64("max_record_bytes", o.maxRecord))
}

func (o *targetOutputs) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := o.producer.Close(ctx)
	if o.redis != nil {
		err = errors.Join(err, o.redis.Close())
	}
	return err
}

// CheckTargets compares the targets mapping with the database's tables
// (columns, replica identities) and returns every problem, by field path,
// with the fix where there is one.
func CheckTargets(ctx context.Context, cfg *config.Config) error {
	if cfg.Targets == nil {
		return errors.New("no targets section in the config")
	}
	return checkTargetsMapping(ctx, cfg)
}

// checkTargetsMapping compares the mapping with the captured tables.
func checkTargetsMapping(ctx context.Context, cfg *config.Config) error {
	infos, _, _, err := Check(ctx, cfg)
	if err != nil {
		return err
	}
	tables := map[string]targets.TableInfo{}
	for name, ti := range infos {
		tables[name] = targets.TableInfo{Columns: ti.Columns, Identity: ti.IdentityColumns}
	}
	m := cfg.Targets.Mapping()
	if ps := m.Check("targets", tables); len(ps) > 0 {
		return fmt.Errorf("the targets mapping does not fit the database:\n  - %s", strings.Join(ps, "\n  - "))
	}
	return nil
}

// PrepareTargets checks the mapping against the database and builds the
// consumer, its handler and outputs. It starts nothing.
func PrepareTargets(ctx context.Context, cfg *config.Config, log *zap.Logger) (_ *Targets, err error) {
	tc := cfg.Targets
	if tc == nil {
		return nil, errors.New("no targets section in the config")
	}
	if log == nil {
		log = zap.NewNop()
	}
	log = log.With(zap.String("component", "targets"))
	if err := checkTargetsMapping(ctx, cfg); err != nil {
		return nil, err
	}
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return nil, err
	}
	t := &Targets{cfg: cfg, knet: knet, log: log}
	defer func() {
		if err != nil {
			t.closeAll()
		}
	}()
	if t.state, err = targetsStatePool(ctx, tc.Postgres.DSN, "tidemark-targets"); err != nil {
		return nil, fmt.Errorf("targets.postgres.dsn: %w", err)
	}
	if t.source, err = pgxpool.New(ctx, cfg.Postgres.DSN); err != nil {
		return nil, fmt.Errorf("postgres.dsn: %w", err)
	}
	t.Store = newTargetsStore(t.state, cfg)
	if t.out, err = newTargetOutputs(cfg, t.Store, log); err != nil {
		return nil, err
	}
	t.TargetsTopic, t.ChangesTopic, t.DLQTopic = t.out.targetsTopic, t.out.changesTopic, t.out.dlqTopic
	m := tc.Mapping()
	tables := []string{m.Membership.Table, m.Users.Table}
	if *cfg.Pipeline.TransactionsTopic {
		t.Ends = &targets.TxnIndex{Brokers: cfg.Kafka.Brokers, Topic: cfg.RouterConfig("").TransactionsTopicName(), Tables: tables, Log: log,
			Dialer: knet.Dialer(cfg.Kafka.ClientID + "-targets")}
	}
	t.Handler, err = targets.NewHandler(targets.HandlerConfig{Mapping: m, Store: t.Store, Publish: t.out.publish, Ends: t.Ends, Hold: tc.Hold}, log)
	if err != nil {
		return nil, err
	}
	rc := cfg.RouterConfig("")
	t.Topics = map[string][]string{}
	handlers := map[string]invalidation.Handler{}
	for _, tbl := range tables {
		schema, name, _ := strings.Cut(tbl, ".")
		t.Topics[rc.TableTopic(schema, name)] = []string{tbl}
		handlers[tbl] = t.Handler
	}
	t.Consumer, err = invalidation.NewConsumer(invalidation.Config{
		Brokers: cfg.Kafka.Brokers, Group: tc.Group, Topics: t.Topics, Handlers: handlers,
		DLQTopic: t.DLQTopic, DLQ: t.out.producer, MaxAttempts: tc.MaxAttempts,
		TLS: knet.TLS, SASL: knet.SASL, ClientID: cfg.Kafka.ClientID + "-targets",
		GapHint: targetsGapHint(),
	}, log)
	if err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Targets) closeAll() {
	if t.out != nil {
		_ = t.out.close()
	}
	if t.state != nil {
		t.state.Close()
	}
	if t.source != nil {
		t.source.Close()
	}
}

// Run creates the state tables and topics, queues rooms an earlier run left
// dirty, then runs the consumer, the settler, the transaction index and the
// periodic audit until ctx ends. A cancelled ctx is a clean stop.
func (t *Targets) Run(ctx context.Context) error {
	defer t.closeAll()
	if err := t.setup(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return t.Consumer.Run(gctx) })
	g.Go(func() error { return t.Handler.Run(gctx) })
	if t.Ends != nil {
		g.Go(func() error { return t.Ends.Run(gctx) })
	}
	if t.cfg.Targets.AuditInterval > 0 {
		g.Go(func() error { t.auditLoop(gctx); return nil })
	}
	if *t.cfg.Targets.Prune {
		g.Go(func() error { t.pruneLoop(gctx); return nil })
	}
	g.Go(func() error { t.fullSetLoop(gctx); return nil })
	return g.Wait()
}

func (t *Targets) setup(ctx context.Context) error {
	bo := backoff.NewExponentialBackOff()
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0
	err := backoff.Retry(func() error {
		err := t.Store.Setup(ctx)
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		return err
	}, backoff.WithContext(bo, ctx))
	if err != nil {
		return err
	}
	if err := t.checkSource(ctx); err != nil {
		return err
	}
	if err := t.out.ensureTopics(ctx, t.log); err != nil {
		return err
	}
	waiting, err := t.Store.Waiting(ctx)
	if err != nil {
		return err
	}
	dirty, err := t.Store.DirtyRooms(ctx, 1_000_000)
	if err != nil {
		return err
	}
	if len(dirty) > 0 || len(waiting) > 0 {
		// Rooms waiting for incomplete transactions go on waiting for their
		// END records: the index re-reads the transactions topic from
		// before the oldest of them.
		t.Handler.Recover(dirty, waiting)
		var oldest time.Time
		for _, w := range waiting {
			if !w.FirstRecord.IsZero() && (oldest.IsZero() || w.FirstRecord.Before(oldest)) {
				oldest = w.FirstRecord
			}
		}
		if t.Ends != nil {
			t.Ends.From = oldest
		}
		t.log.Info("rooms left dirty by an earlier run queued for settling", zap.Int("rooms", len(dirty)),
			zap.Int("incomplete_transactions", len(waiting)), zap.Time("oldest_record", oldest))
	}
	return nil
}

// checkSource refuses a state built from another cluster (or from history
// the source no longer has): see targets.Store.CheckSource. Reaching the
// source is retried; a mismatch is terminal.
func (t *Targets) checkSource(ctx context.Context) error {
	bo := backoff.NewExponentialBackOff()
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0
	attempt := 0
	return backoff.Retry(func() error {
		id, err := capture.IdentifySource(ctx, &t.source.Config().ConnConfig.Config)
		var changed bool
		if err == nil {
			changed, err = t.Store.CheckSource(ctx, id, t.cfg.Postgres.Slot)
		}
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		if errors.Is(err, targets.ErrOtherSource) || capture.IsAccessDenied(err) {
			return backoff.Permanent(err)
		}
		if err != nil {
			attempt++
			if attempt == 1 || attempt%10 == 0 {
				t.log.Warn("identifying the source database failed; retrying", zap.Error(err), zap.Int("attempt", attempt))
			}
			return err
		}
		if changed {
			t.log.Warn("the source database's timeline or slot changed since the state was built (a promoted standby?); its positions continue, so the state is kept",
				zap.Stringer("source", id), zap.String("slot", t.cfg.Postgres.Slot))
		}
		return nil
	}, backoff.WithContext(bo, ctx))
}

func (t *Targets) auditLoop(ctx context.Context) {
	tick := time.NewTicker(t.cfg.Targets.AuditInterval)
	defer tick.Stop()
	a := t.auditor()
	a.Wait = t.cfg.Targets.AuditWait
	lagging := false // in a streak of unconfirmed audits (warned once)
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		rep, err := a.Audit(ctx, t.cfg.Targets.AuditSample)
		if err != nil {
			if ctx.Err() == nil {
				t.log.Warn("periodic notification-target audit failed", zap.Error(err))
			}
			continue
		}
		t.audits.Add(1)
		if rep.Unconfirmed {
			// Lag, not inconsistency: the lag metrics page on it.
			t.unconfirmed.Add(1)
			if !lagging {
				t.log.Warn("periodic notification-target audit unconfirmed: the pipeline did not pass the audit's snapshot within targets.audit_wait; the consistency gauge keeps its last value (page on lag with tidemark_slot_lag_bytes and tidemark_consumer_lag_messages)",
					zap.Duration("wait", a.Wait), zap.Stringer("lsn", rep.WaitLSN), zap.Int("suspected", rep.Suspected))
			}
			lagging = true
			continue
		}
		lagging = false
		if t.ratio != nil {
			t.ratio.Set(rep.Ratio)
		}
		if len(rep.Mismatches) > 0 {
			t.log.Warn("notification targets differ from the database", zap.Float64("ratio", rep.Ratio),
				zap.Int("rooms", rep.Rooms), zap.Int("mismatched", len(rep.Mismatches)), zap.String("first_room", rep.Mismatches[0].Room))
		}
	}
}

// pruneLoop deletes, every targets.prune_interval, the state rows no
// older change can reach again (targets.Store.Prune). A round that cannot
// compute its watermark (no slot yet, a partition the group has not
// committed on) prunes nothing and says why once per streak; a failing
// round is warned once per streak and tried at the next interval.
func (t *Targets) pruneLoop(ctx context.Context) {
	tick := time.NewTicker(t.cfg.Targets.PruneInterval)
	defer tick.Stop()
	topics := make([]string, 0, len(t.Topics))
	for tp := range t.Topics {
		topics = append(topics, tp)
	}
	transport := t.knet.Transport(t.cfg.Kafka.ClientID+"-targets-prune", 0)
	lastProblem := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		w, why, err := targets.PruneWatermark(ctx, t.source, t.cfg.Postgres.Slot, t.cfg.Kafka.Brokers, transport, t.cfg.Targets.Group, topics)
		var rep targets.PruneReport
		if err == nil && why == "" {
			rep, err = t.Store.Prune(ctx, w)
		}
		if ctx.Err() != nil {
			return
		}
		problem := why
		if err != nil {
			problem = err.Error()
		}
		if problem != "" {
			if problem != lastProblem {
				t.log.Warn("notification-target state not pruned this round; retried every targets.prune_interval", zap.String("why", problem),
					zap.Duration("interval", t.cfg.Targets.PruneInterval))
			}
			lastProblem = problem
			t.pruneWatermark.Store(0)
			continue
		}
		if lastProblem != "" {
			t.log.Info("notification-target state pruned again", zap.Stringer("below", w))
		}
		lastProblem = ""
		t.pruneWatermark.Store(uint64(w.CommitLSN))
		t.prunedMembers.Add(uint64(rep.Memberships))
		t.prunedUsers.Add(uint64(rep.Users))
		t.prunedRooms.Add(uint64(rep.Rooms))
	}
}

// fullSetLoop publishes the full sets of large rooms that changed, each at
// most every targets.full_set_interval (their updates carry only their
// changes). A failing round is warned once per streak and retried.
func (t *Targets) fullSetLoop(ctx context.Context) {
	every := min(t.cfg.Targets.FullSetInterval, 5*time.Second)
	tick := time.NewTicker(every)
	defer tick.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var err error
		for ctx.Err() == nil {
			var rooms []string
			if rooms, err = t.Store.FullSetsDue(ctx, t.cfg.Targets.FullSetInterval, 100); err != nil || len(rooms) == 0 {
				break
			}
			var n int
			n, err = t.Store.PublishFullSets(ctx, rooms, t.out.publishFull)
			t.out.fullSets.Add(uint64(n))
			if err != nil || len(rooms) < 100 {
				break
			}
		}
		if ctx.Err() != nil {
			return
		}
		switch {
		case err != nil && !failing:
			failing = true
			t.log.Warn("publishing the full sets of large rooms failed; retrying", zap.Error(err), zap.Duration("every", every))
		case err == nil && failing:
			failing = false
			t.log.Info("publishing the full sets of large rooms recovered")
		}
	}
}

func (t *Targets) auditor() *targets.Auditor {
	topics := make([]string, 0, len(t.Topics))
	for tp := range t.Topics {
		topics = append(topics, tp)
	}
	return &targets.Auditor{Mapping: t.cfg.Targets.Mapping(), Source: t.source, Store: t.Store,
		Passed: targets.PipelinePassed(t.source, t.cfg.Postgres.Slot, t.cfg.Kafka.Brokers, t.knet.Transport(t.cfg.Kafka.ClientID+"-audit", 0), t.cfg.Targets.Group, topics)}
}

// Register adds the consumer's and handler's metrics to reg (label
// role="targets"). Call it before Run.
func (t *Targets) Register(reg prometheus.Registerer) {
	registerConsumerMetrics(reg, t.Consumer, "targets")
	hs := t.Handler.Stats()
	labels := prometheus.Labels{"role": "targets"}
	counter := func(sub, name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: sub, Name: name, Help: help, ConstLabels: labels}, f))
	}
	gauge := func(sub, name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: sub, Name: name, Help: help, ConstLabels: labels}, f))
	}
	reg.MustRegister(prunedCounter{t: t, desc: prometheus.NewDesc("tidemark_notify_targets_pruned_total",
		"State rows deleted because no older change can reach the consumer again, by table.", []string{"table"}, labels)})
	gauge("notify_targets", "prune_watermark_lsn", "Commit LSN below which the last prune round deleted state (0 while it cannot prune).",
		func() float64 { return float64(t.pruneWatermark.Load()) })
	counter("notify_targets", "added_total", "Users added to a room's notification targets.", func() float64 { return float64(hs.Added.Load()) })
	counter("notify_targets", "removed_total", "Users removed from a room's notification targets.", func() float64 { return float64(hs.Removed.Load()) })
	counter("notify_targets", "rooms_settled_total", "Room settlements that changed targets.", func() float64 { return float64(hs.RoomsSettled.Load()) })
	counter("notify_targets", "held_expired_total", "Transactions settled after the hold without being known complete.", func() float64 { return float64(hs.HeldExpired.Load()) })
	counter("notify_targets", "settle_errors_total", "Failed settlements (retried).", func() float64 { return float64(hs.SettleErrors.Load()) })
	counter("notify_targets", "malformed_transaction_records_total", "Records of the transactions topic skipped as not valid BEGIN or END records (their transactions are settled after targets.hold).",
		func() float64 {
			if t.Ends == nil {
				return 0
			}
			return float64(t.Ends.Malformed())
		})
	gauge("notify_targets", "pending_rooms", "Rooms waiting for their transactions to complete.", func() float64 { return float64(hs.PendingRooms.Load()) })
	t.ratio = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "notify_targets", Name: "consistency_ratio",
		Help: "Share of audited rooms whose kept targets equal the database (periodic audit; 1 before the first).", ConstLabels: labels})
	t.ratio.Set(1)
	reg.MustRegister(t.ratio)
	counter("notify_targets", "truncated_records_total", "notify_targets records published without their list (the set exceeded targets.max_record_bytes or the topic's max.message.bytes).",
		func() float64 {
			if t.out == nil {
				return 0
			}
			return float64(t.out.truncated.Load())
		})
	counter("notify_targets", "full_sets_total", "Full sets of large rooms (more than targets.full_set_max_members) published on their schedule (targets.full_set_interval).",
		func() float64 {
			if t.out == nil {
				return 0
			}
			return float64(t.out.fullSets.Load())
		})
	counter("notify_targets", "redis_gaps_total", "Redis sets replaced whole from the state because they lacked an earlier update (Redis lost data, or the set predates versions).",
		func() float64 {
			if t.out == nil {
				return 0
			}
			return float64(t.out.redisGaps.Load())
		})
	counter("notify_targets", "audits_total", "Periodic audits completed (targets.audit_interval).", func() float64 { return float64(t.audits.Load()) })
	counter("notify_targets", "audit_unconfirmed_total", "Periodic audits whose differing rooms could not be re-checked because the pipeline did not pass the snapshot within targets.audit_wait (lag); they leave the consistency ratio unchanged.",
		func() float64 { return float64(t.unconfirmed.Load()) })
}

// minStateConns is the smallest state pool the targets role runs with.
const minStateConns = 4

// targetsStatePool connects to the state database, naming the sessions
// (application_name, unless the DSN sets one) so that operators can tell
// them apart in pg_stat_activity.
func targetsStatePool(ctx context.Context, dsn, name string) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("does not parse")
	}
	if pc.ConnConfig.RuntimeParams["application_name"] == "" {
		pc.ConnConfig.RuntimeParams["application_name"] = name
	}
	// A publisher holds a room's lease on one connection while it may read
	// a full set on another (a Redis gap), and the full-set schedule does
	// the same beside it: below 4 connections (pool_max_conns) the two
	// could each hold one and wait for the other forever.
	pc.MaxConns = max(pc.MaxConns, minStateConns)
	return pgxpool.NewWithConfig(ctx, pc)
}

// newTargetsStore is the state store as configured.
func newTargetsStore(pool *pgxpool.Pool, cfg *config.Config) *targets.Store {
	s := targets.NewStore(pool, cfg.Targets.Postgres.Schema)
	s.FullSetMax = cfg.Targets.FullSetMaxMembers
	return s
}

// versionedSets adapts the Redis sink to targets.VersionedSets.
type versionedSets struct{ s *redissink.Sink }

func (v versionedSets) ApplySets(ctx context.Context, ups []targets.SetUpdate) ([]targets.SetResult, error) {
	rups := make([]redissink.SetUpdate, len(ups))
	for i, u := range ups {
		rups[i] = redissink.SetUpdate{Key: u.Key, Version: u.Version, Full: u.Full, Add: u.Add, Remove: u.Remove}
	}
	res, err := v.s.ApplySets(ctx, rups)
	if err != nil {
		return nil, err
	}
	out := make([]targets.SetResult, len(res))
	for i, r := range res {
		switch r {
		case redissink.SetApplied:
			out[i] = targets.SetApplied
		case redissink.SetSkipped:
			out[i] = targets.SetSkipped
		default:
			out[i] = targets.SetGap
		}
	}
	return out, nil
}

func (v versionedSets) ReplaceSetVersioned(ctx context.Context, key string, version uint64, next func() ([]string, error)) (bool, error) {
	return v.s.ReplaceSetVersioned(ctx, key, version, next)
}

// openTargets opens the source and state pools and the store for the
// rebuild and audit commands.
func openTargets(ctx context.Context, cfg *config.Config) (source, state *pgxpool.Pool, store *targets.Store, err error) {
	if cfg.Targets == nil {
		return nil, nil, nil, errors.New("no targets section in the config")
	}
	if err := checkTargetsMapping(ctx, cfg); err != nil {
		return nil, nil, nil, err
	}
	if source, err = pgxpool.New(ctx, cfg.Postgres.DSN); err != nil {
		return nil, nil, nil, fmt.Errorf("postgres.dsn: %w", err)
	}
	if state, err = targetsStatePool(ctx, cfg.Targets.Postgres.DSN, "tidemark-targets-admin"); err != nil {
		source.Close()
		return nil, nil, nil, fmt.Errorf("targets.postgres.dsn: %w", err)
	}
	store = newTargetsStore(state, cfg)
	if err := store.Setup(ctx); err != nil {
		source.Close()
		state.Close()
		return nil, nil, nil, err
	}
	return source, state, store, nil
}

// RebuildTargets recomputes the targets of rooms (or all of them) from the
// database, applies the difference to the kept state and publishes it with
// reason "rebuild". Safe while the targets consumer runs.
func RebuildTargets(ctx context.Context, cfg *config.Config, log *zap.Logger, rooms []string, all bool) (targets.RebuildReport, error) {
	return RebuildTargetsFrom(ctx, cfg, log, rooms, all, false)
}

// RebuildTargetsFrom is RebuildTargets; with newSource (only with all) it
// first forgets the facts and positions kept from another source
// (targets.Store.ForgetSource) and records postgres.dsn's cluster as the
// source. Without it, a state from another source is refused.
func RebuildTargetsFrom(ctx context.Context, cfg *config.Config, log *zap.Logger, rooms []string, all, newSource bool) (targets.RebuildReport, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if newSource && !all {
		return targets.RebuildReport{}, errors.New("--new-source rebuilds every room: use it with --all")
	}
	source, state, store, err := openTargets(ctx, cfg)
	if err != nil {
		return targets.RebuildReport{}, err
	}
	defer source.Close()
	defer state.Close()
	id, err := capture.IdentifySource(ctx, &source.Config().ConnConfig.Config)
	if err != nil {
		return targets.RebuildReport{}, err
	}
	if newSource {
		if err := store.ForgetSource(ctx); err != nil {
			return targets.RebuildReport{}, fmt.Errorf("forgetting the old source's state: %w", err)
		}
		log.Warn("notification-target facts and positions of the old source forgotten; rebuilding from the new one", zap.Stringer("source", id))
	}
	if _, err := store.CheckSource(ctx, id, cfg.Postgres.Slot); err != nil {
		return targets.RebuildReport{}, err
	}
	out, err := newTargetOutputs(cfg, store, log)
	if err != nil {
		return targets.RebuildReport{}, err
	}
	defer func() { _ = out.close() }()
	if err := out.ensureTopics(ctx, log); err != nil {
		return targets.RebuildReport{}, err
	}
	b := &targets.Rebuilder{Mapping: cfg.Targets.Mapping(), Source: source, Store: store, Publish: out.publish, Log: log}
	return b.Rebuild(ctx, rooms, all)
}

// AuditTargets compares sample rooms (all when sample <= 0) of the kept
// state with the database; mismatches are re-checked once the pipeline has
// passed the LSN the database was read at (waiting up to wait).
func AuditTargets(ctx context.Context, cfg *config.Config, sample int, wait time.Duration) (targets.AuditReport, error) {
	source, state, store, err := openTargets(ctx, cfg)
	if err != nil {
		return targets.AuditReport{}, err
	}
	defer source.Close()
	defer state.Close()
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return targets.AuditReport{}, err
	}
	m := cfg.Targets.Mapping()
	rc := cfg.RouterConfig("")
	var topics []string
	for _, tbl := range []string{m.Membership.Table, m.Users.Table} {
		schema, name, _ := strings.Cut(tbl, ".")
		topics = append(topics, rc.TableTopic(schema, name))
	}
	a := &targets.Auditor{Mapping: m, Source: source, Store: store, Wait: wait,
		Passed: targets.PipelinePassed(source, cfg.Postgres.Slot, cfg.Kafka.Brokers, knet.Transport(cfg.Kafka.ClientID+"-audit", 0), cfg.Targets.Group, topics)}
	return a.Audit(ctx, sample)
}

// prunedCounter exports the prune loop's counts, one series per table.
type prunedCounter struct {
	t    *Targets
	desc *prometheus.Desc
}

func (p prunedCounter) Describe(ch chan<- *prometheus.Desc) { ch <- p.desc }

func (p prunedCounter) Collect(ch chan<- prometheus.Metric) {
	for table, v := range map[string]*atomic.Uint64{"notify_memberships": &p.t.prunedMembers, "notify_users": &p.t.prunedUsers, "notify_rooms": &p.t.prunedRooms} {
		ch <- prometheus.MustNewConstMetric(p.desc, prometheus.CounterValue, float64(v.Load()), table)
	}
}
