package app

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	kafkago "github.com/segmentio/kafka-go"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/invalidation/integrity"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
)

// Integrity is the running integrity consumer: the consumer group, the
// checker, its Kafka producer (dead letters, violations) and its pools.
type Integrity struct {
	Consumer *invalidation.Consumer
	Checker  *integrity.Checker
	Metrics  *integrity.Metrics
	// Producer writes dead letters and violations.
	Producer        *kafkasink.Sink
	Topics          map[string][]string
	DLQTopic        string
	ViolationsTopic string // "" when disabled
	// Lock is the group's advisory lock in the state database: one member
	// consumes, a second waits for it (see integrity.GroupLock).
	Lock *integrity.GroupLock
	// Pruned counts resolved violations deleted by the prune loop.
	Pruned    atomic.Uint64
	cfg       *config.Config
	knet      kafkanet.Settings
	checkPool *pgxpool.Pool
	storePool *pgxpool.Pool
	log       *zap.Logger
}

// IntegrityOption adjusts the checker's options (tests, benchmarks).
type IntegrityOption func(*integrity.Options)

// PrepareIntegrity compiles the rules against the tables' real columns
// (information_schema) and replica identities, opens the read-only check
// pool and the store pool, and builds the consumer over the rule tables'
// topics and the transactions topic. It starts nothing.
func PrepareIntegrity(ctx context.Context, cfg *config.Config, log *zap.Logger, opts ...IntegrityOption) (_ *Integrity, err error) {
	in := cfg.Integrity
	if in == nil {
		return nil, errors.New("no integrity section in the config")
	}
	if log == nil {
		log = zap.NewNop()
	}
	log = log.With(zap.String("component", "integrity"))
	pc, err := pgxpool.ParseConfig(cfg.Postgres.DSN)
	if err != nil {
		return nil, errors.New("integrity: postgres.dsn does not parse")
	}
	pc.MaxConns = int32(in.CheckConnections)
	pc.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	pc.ConnConfig.RuntimeParams["application_name"] = "tidemark-integrity-check"
	checkPool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("integrity: connecting to postgres: %w", err)
	}
	defer func() {
		if err != nil {
			checkPool.Close()
		}
	}()
	eng, err := compileIntegrity(ctx, checkPool, in.Rules)
	if err != nil {
		return nil, err
	}
	sc, err := pgxpool.ParseConfig(in.DSN)
	if err != nil {
		return nil, errors.New("integrity: integrity.dsn does not parse")
	}
	sc.MaxConns = 2
	sc.ConnConfig.RuntimeParams["application_name"] = "tidemark-integrity"
	storePool, err := pgxpool.NewWithConfig(ctx, sc)
	if err != nil {
		return nil, fmt.Errorf("integrity: connecting to the violations database: %w", err)
	}
	defer func() {
		if err != nil {
			storePool.Close()
		}
	}()
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return nil, err
	}
	producer, err := kafkasink.New(kafkasink.Config{Brokers: cfg.Kafka.Brokers, ClientID: cfg.Kafka.ClientID + "-integrity",
		Partitions: cfg.Kafka.Partitions, ReplicationFactor: cfg.Kafka.ReplicationFactor, TLS: knet.TLS, SASL: knet.SASL},
		log.With(zap.String("component", "integrity-producer")))
	if err != nil {
		return nil, err
	}
	rc := cfg.RouterConfig("")
	topics := map[string][]string{}
	for _, t := range eng.Tables() {
		topics[cfg.Kafka.TopicPrefix+"."+t] = []string{t}
	}
	handlers := map[string]invalidation.Handler{}
	decode := map[string]func(*kafkago.Message) (*invalidation.Message, error){}
	if *cfg.Pipeline.TransactionsTopic {
		tt := rc.TransactionsTopicName()
		topics[tt] = []string{integrity.TransactionsTable}
		decode[tt] = integrity.Decode
	}
	violationsTopic := ""
	if *in.Topic {
		violationsTopic = cfg.Kafka.TopicPrefix + ".violations"
	}
	o := integrity.Options{Group: in.Group, ViolationsTopic: violationsTopic, Publisher: producer, MaxPending: in.MaxPending,
		MaxOpenTransactions: in.MaxOpenTransactions, MaxTransactionItems: in.MaxTransactionItems, MaxKeys: in.MaxKeys, StaleAfter: in.StaleAfter}
	for _, f := range opts {
		f(&o)
	}
	metrics := integrity.NewMetrics()
	checker := integrity.NewChecker(eng, integrity.NewStore(storePool, in.Schema, in.Group),
		integrity.NewProber(checkPool, in.CheckRate, 100), o, metrics, log)
	for _, tables := range topics {
		for _, t := range tables {
			handlers[t] = checker
		}
	}
	dlqTopic := cfg.Kafka.TopicPrefix + ".dlq"
	consumer, err := invalidation.NewConsumer(invalidation.Config{
		Brokers: cfg.Kafka.Brokers, Group: in.Group, Topics: topics, Handlers: handlers, Decode: decode,
		DLQTopic: dlqTopic, DLQ: producer, MaxAttempts: in.MaxAttempts,
		TLS: knet.TLS, SASL: knet.SASL, ClientID: cfg.Kafka.ClientID + "-integrity",
		GapHint: integrityGapHint(),
	}, log)
	if err != nil {
		return nil, err
	}
	lockConfig := sc.ConnConfig.Copy()
	lockConfig.RuntimeParams["application_name"] = "tidemark-integrity-lock"
	lock := &integrity.GroupLock{Schema: in.Schema, Group: in.Group, Log: log,
		Connect: func(ctx context.Context) (*pgx.Conn, error) { return pgx.ConnectConfig(ctx, lockConfig.Copy()) }}
	return &Integrity{Consumer: consumer, Checker: checker, Metrics: metrics, Producer: producer, Topics: topics,
		DLQTopic: dlqTopic, ViolationsTopic: violationsTopic, Lock: lock, cfg: cfg, knet: knet, checkPool: checkPool, storePool: storePool, log: log}, nil
}

// compileIntegrity checks rules against the real columns and replica
// identities of their tables.
func compileIntegrity(ctx context.Context, q integrity.Querier, rules []integrity.Rule) (*integrity.Engine, error) {
	schema, err := integrity.LoadSchema(ctx, q, integrity.Tables(rules))
	if err != nil {
		return nil, fmt.Errorf("integrity: %w", err)
	}
	return integrity.Compile("integrity.rules", rules, schema)
}

// CheckIntegrity compiles the integrity rules against the database (as the
// consumer does when it starts) without starting anything.
func CheckIntegrity(ctx context.Context, cfg *config.Config) error {
	if cfg.Integrity == nil {
		return nil
	}
	pc, err := pgxpool.ParseConfig(cfg.Postgres.DSN)
	if err != nil {
		return errors.New("integrity: postgres.dsn does not parse")
	}
	pc.MaxConns = 1
	pc.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return fmt.Errorf("integrity: connecting to postgres: %w", err)
	}
	defer pool.Close()
	_, err = compileIntegrity(ctx, pool, cfg.Integrity.Rules)
	return err
}

// Run takes the group's lock (waiting while another member holds it),
// creates the dead-letter and violations topics and the violations tables,
// loads the checker's state, then consumes and checks deadlines until ctx
// ends. A cancelled ctx is a clean stop.
func (i *Integrity) Run(ctx context.Context) error {
	defer i.checkPool.Close()
	defer i.storePool.Close()
	if err := i.Lock.Acquire(ctx); err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return errors.Join(ignoreCanceled(err), i.Producer.Close(closeCtx))
	}
	lockCtx, stopLock := context.WithCancel(context.Background())
	lockDone := make(chan error, 1)
	runCtx, cancelRun := context.WithCancelCause(ctx)
	defer cancelRun(nil)
	go func() {
		err := i.Lock.Hold(lockCtx)
		if err != nil {
			cancelRun(err)
		}
		lockDone <- err
	}()
	// The lock is released only after the consumer and the checker stopped.
	defer func() { stopLock(); <-lockDone }()
	ctx = runCtx
	topics := []string{i.DLQTopic}
	specs := map[string]kafkasink.TopicSpec{}
	if i.ViolationsTopic != "" {
		topics = append(topics, i.ViolationsTopic)
		specs[i.ViolationsTopic] = kafkasink.TopicSpec{Configs: map[string]string{"cleanup.policy": "compact"}}
	}
	bo := backoff.NewExponentialBackOff()
	bo.MaxInterval = 10 * time.Second
	bo.MaxElapsedTime = 0
	attempt := 0
	err := backoff.Retry(func() error {
		// (The consumer runtime waits for the subscribed topics itself.)
		err := i.Producer.EnsureTopics(ctx, topics, specs)
		if err == nil {
			err = i.Checker.Load(ctx)
		}
		if err == nil {
			err = i.checkSource(ctx)
		}
		if ctx.Err() != nil {
			return backoff.Permanent(ctx.Err())
		}
		if errors.Is(err, integrity.ErrOtherSource) || capture.IsAccessDenied(err) {
			return backoff.Permanent(err)
		}
		if err != nil {
			attempt++
			if attempt == 1 || attempt%10 == 0 {
				i.log.Warn("integrity consumer not ready; retrying", zap.Error(err), zap.Int("attempt", attempt))
			}
		}
		return err
	}, backoff.WithContext(bo, ctx))
	if err != nil {
		if cause := context.Cause(runCtx); errors.Is(cause, integrity.ErrLockLost) {
			err = cause
		}
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return errors.Join(ignoreCanceled(err), i.Producer.Close(closeCtx))
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return i.Consumer.Run(gctx) })
	g.Go(func() error { return i.Checker.Run(gctx) })
	if i.cfg.Integrity.PruneResolvedAfter > 0 {
		g.Go(func() error { i.pruneLoop(gctx, 10*time.Minute); return nil })
	}
	err = g.Wait()
	if cause := context.Cause(runCtx); errors.Is(cause, integrity.ErrLockLost) {
		err = cause
	}
	closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return errors.Join(ignoreCanceled(err), i.Producer.Close(closeCtx))
}

// checkSource refuses a state built from another cluster (see
// integrity.Store.CheckSource).
func (i *Integrity) checkSource(ctx context.Context) error {
	id, err := capture.IdentifySource(ctx, &i.checkPool.Config().ConnConfig.Config)
	if err != nil {
		return err
	}
	changed, err := i.Checker.Store().CheckSource(ctx, id, i.cfg.Postgres.Slot)
	if changed {
		i.log.Warn("the source database's timeline or slot changed since the integrity state was built (a promoted standby?); its positions continue, so the state is kept",
			zap.Stringer("source", id), zap.String("slot", i.cfg.Postgres.Slot))
	}
	return err
}

// pruneLoop deletes, every interval, violations resolved more than
// integrity.prune_resolved_after ago below the replay floor (see
// invalidation.ReplayFloor). A round that cannot compute the floor, or
// fails, prunes nothing and warns once per streak.
func (i *Integrity) pruneLoop(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var topics []string
	for tp, tables := range i.Topics {
		if len(tables) == 1 && tables[0] == integrity.TransactionsTable {
			continue // END records; facts come from the table topics
		}
		topics = append(topics, tp)
	}
	transport := i.knet.Transport(i.cfg.Kafka.ClientID+"-integrity-prune", 0)
	lastProblem := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		w, why, err := invalidation.ReplayFloor(ctx, i.checkPool, i.cfg.Postgres.Slot, i.cfg.Kafka.Brokers, transport, i.cfg.Integrity.Group, topics)
		var n int64
		if err == nil && why == "" {
			n, err = i.Checker.Store().PruneResolved(ctx, w, time.Now().Add(-i.cfg.Integrity.PruneResolvedAfter))
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
				i.log.Warn("resolved violations not pruned this round; retried every 10m", zap.String("why", problem))
			}
			lastProblem = problem
			continue
		}
		lastProblem = ""
		i.Pruned.Add(uint64(n))
	}
}

// Register adds the consumer's and the checker's metrics to reg.
func (i *Integrity) Register(reg prometheus.Registerer) {
	i.Metrics.Register(reg)
	registerConsumerMetrics(reg, i.Consumer, "integrity")
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: "integrity",
		Name: "violations_pruned_total", Help: "Resolved violations deleted after integrity.prune_resolved_after (below the replay floor)."},
		func() float64 { return float64(i.Pruned.Load()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Subsystem: "integrity",
		Name: "waiting_for_lock", Help: "1 while this member waits for its group's lock (another integrity member runs)."},
		func() float64 {
			if i.Lock.Waiting() {
				return 1
			}
			return 0
		}))
}
