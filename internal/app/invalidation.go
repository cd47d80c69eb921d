package app

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
	redissink "github.com/tidemark/tidemark/sinks/redis"
	webhooksink "github.com/tidemark/tidemark/sinks/webhook"
)

// Invalidation is the running cache-invalidation consumer and its sinks.
type Invalidation struct {
	Consumer *invalidation.Consumer
	Handler  *invalidation.RuleHandler
	Redis    *redissink.Sink // nil without invalidation.redis
	// DLQ is the Kafka producer for the dead-letter topic (the invalidations
	// topic has its own, topicSink).
	DLQ      *kafkasink.Sink
	Topics   map[string][]string
	DLQTopic string
	// InvalidationsTopic is the compacted topic of invalidations ("" when
	// disabled).
	InvalidationsTopic string
	// Webhook is the webhook sink (nil without invalidation.webhook).
	Webhook *webhooksink.Sink
	// Topic writes InvalidationsTopic and its watermarks (nil when
	// disabled), through its own producer topicSink: Run writes watermarks
	// from a second goroutine, and a sink is never written concurrently.
	Topic     *invalidation.TopicInvalidator
	topicSink *kafkasink.Sink
	log       *zap.Logger
}

// PrepareInvalidation compiles the rules against the captured tables'
// columns (read from Postgres), builds the sinks and the consumer, and
// checks that every subscribed topic's tables have a rule.
func PrepareInvalidation(ctx context.Context, cfg *config.Config, log *zap.Logger) (*Invalidation, error) {
	inv := cfg.Invalidation
	if inv == nil {
		return nil, errors.New("no invalidation section in the config")
	}
	if log == nil {
		log = zap.NewNop()
	}
	engine, err := compileInvalidation(ctx, cfg)
	if err != nil {
		return nil, err
	}
	rc := cfg.RouterConfig("")
	topics := map[string][]string{}
	if len(inv.Streams) > 0 {
		for _, s := range cfg.Pipeline.EntityStreams {
			if slices.Contains(inv.Streams, s.Name) {
				topics[rc.StreamTopic(s)] = s.Tables
			}
		}
	} else {
		for _, t := range engine.Tables() {
			topics[cfg.Kafka.TopicPrefix+"."+t] = []string{t}
		}
	}
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return nil, err
	}
	dlq, err := kafkasink.New(kafkasink.Config{Brokers: cfg.Kafka.Brokers, ClientID: cfg.Kafka.ClientID + "-consumer",
		Partitions: cfg.Kafka.Partitions, ReplicationFactor: cfg.Kafka.ReplicationFactor, TLS: knet.TLS, SASL: knet.SASL},
		log.With(zap.String("component", "consumer-producer")))
	if err != nil {
		return nil, err
	}
	// Dead letters come from the consumer and from the webhook's delivery
	// goroutine: one sink, writes serialised.
	dead := &serialSink{sink: dlq}
	var sinks []invalidation.Invalidator
	var rs *redissink.Sink
	var ws *webhooksink.Sink
	if inv.Redis != nil {
		// TLS and the ACL user as configured; checked now (see newRedisSink).
		use := redissink.UseInvalidate
		if engine.FlushesPatterns() || len(inv.OnGapRedisPatterns) > 0 {
			use |= redissink.UsePattern
		}
		rs, err = newRedisSink(ctx, "invalidation.redis", inv.Redis, inv.Redis.Channel, use, log)
		if err != nil {
			return nil, err
		}
		sinks = append(sinks, redisInvalidator(rs)) // with positions in versioned mode
	}
	dlqTopic := cfg.Kafka.TopicPrefix + ".dlq"
	if w := inv.Webhook; w != nil {
		// on_failure: dlq: a batch the receiver still refuses after its
		// attempts goes to the dead-letter topic, with the exact body that was
		// signed (tidemark dlq replay resends it). hold: never dead-lettered.
		ws, err = webhooksink.New(webhookSinkConfig(w), log, webhooksink.WithDeadLetter(webhookDeadLetter(dead, dlqTopic, inv.Group)))
		if err != nil {
			return nil, fmt.Errorf("invalidation.webhook: %w", err)
		}
		sinks = append(sinks, webhookInvalidator{ws})
	}
	invTopic := ""
	var topicInv *invalidation.TopicInvalidator
	var topicSink *kafkasink.Sink
	if *inv.Topic {
		invTopic = cfg.Kafka.TopicPrefix + ".invalidations"
		topicSink, err = kafkasink.New(kafkasink.Config{Brokers: cfg.Kafka.Brokers, ClientID: cfg.Kafka.ClientID + "-invalidations",
			Partitions: cfg.Kafka.Partitions, ReplicationFactor: cfg.Kafka.ReplicationFactor, TLS: knet.TLS, SASL: knet.SASL},
			log.With(zap.String("component", "invalidations-producer")))
		if err != nil {
			return nil, err
		}
		topicInv = &invalidation.TopicInvalidator{Topic: invTopic, Sink: topicSink, WatermarkInterval: inv.WatermarkInterval,
			Log: log.With(zap.String("component", "invalidation-watermarks"))}
		sinks = append(sinks, topicInv)
	}
	handler := invalidation.NewRuleHandler(engine, sinks...)
	handler.MaxBacklogBytes = inv.MaxBacklogBytes
	handler.Log = log.With(zap.String("component", "invalidation"))
	handler.SetLogger(log.With(zap.String("component", "invalidation")))
	handlers := map[string]invalidation.Handler{}
	var ruleHandler invalidation.Handler = handler
	if topicInv != nil {
		ruleHandler = newWatermarkedHandler(handler, topicInv)
	}
	for _, t := range engine.Tables() {
		handlers[t] = ruleHandler
	}
	for _, t := range inv.IgnoreTables {
		handlers[t] = invalidation.SkipHandler{Reason: invalidation.SkipTableIgnored}
	}
	if inv.Webhook != nil && engine.FlushesPatterns() {
		log.Warn("on_truncate: flush_pattern deletes the rules' key patterns in Redis and writes a flush record to the " +
			"invalidations topic; the webhook carries keys and is not told of truncates (on_truncate: dlq records them)")
	}
	onGap, gapHint := invalidationOnGap(cfg, invTopic, rs, inv.Webhook != nil, log.With(zap.String("component", "invalidation")))
	consumer, err := invalidation.NewConsumer(invalidation.Config{
		Brokers: cfg.Kafka.Brokers, Group: inv.Group, Topics: topics, Handlers: handlers,
		DLQTopic: dlqTopic, DLQ: dead, MaxAttempts: inv.MaxAttempts,
		TLS: knet.TLS, SASL: knet.SASL, ClientID: cfg.Kafka.ClientID + "-invalidation",
		OnGap: onGap, GapHint: gapHint,
	}, log.With(zap.String("component", "invalidation")))
	if err != nil {
		if rs != nil {
			_ = rs.Close()
		}
		return nil, err
	}
	if topicInv != nil {
		// Changes the consumer does not take (backpressure) are in no
		// output: watermarks stop then too.
		topicInv.Paused = consumer.Stats().FetchPaused.Load
	}
	return &Invalidation{Consumer: consumer, Handler: handler, Redis: rs, Webhook: ws, DLQ: dlq, Topics: topics, DLQTopic: dlqTopic,
		InvalidationsTopic: invTopic, Topic: topicInv, topicSink: topicSink, log: log}, nil
}

// CheckInvalidation compiles the invalidation rules against the database's
// tables (columns, replica identities), as PrepareInvalidation does, and
// returns every problem with its fix. It starts nothing.
func CheckInvalidation(ctx context.Context, cfg *config.Config) error {
	if cfg.Invalidation == nil {
		return errors.New("no invalidation section in the config")
	}
	_, err := compileInvalidation(ctx, cfg)
	return err
}

// compileInvalidation reads the captured tables (Check) and compiles the
// rules against their columns and replica identities.
func compileInvalidation(ctx context.Context, cfg *config.Config) (*invalidation.Engine, error) {
	infos, _, _, err := Check(ctx, cfg) // capture's own problems are reported by the capture role
	if err != nil {
		return nil, err
	}
	tables := map[string]invalidation.Table{}
	for name, ti := range infos {
		// Full: old images carry every column (REPLICA IDENTITY FULL, on
		// every leaf of a partitioned table; or an identity of all columns).
		full := len(ti.Columns) > 0 && len(ti.IdentityColumns) == len(ti.Columns)
		tables[name] = invalidation.Table{Columns: ti.Columns, Identity: ti.IdentityColumns, Full: full}
	}
	return invalidation.CompileTables(cfg.Invalidation.Rules, tables, cfg.Invalidation.Redis != nil)
}

// Run creates the DLQ topic (waiting for Kafka), then consumes until ctx
// ends. A cancelled ctx is a clean stop.
func (i *Invalidation) Run(ctx context.Context) error {
	if i.Redis != nil {
		defer func() { _ = i.Redis.Close() }()
	}
	topics := []string{i.DLQTopic}
	specs := map[string]kafkasink.TopicSpec{}
	if i.InvalidationsTopic != "" {
		topics = append(topics, i.InvalidationsTopic)
		specs[i.InvalidationsTopic] = kafkasink.TopicSpec{Configs: map[string]string{"cleanup.policy": "compact"}}
	}
	for attempt := 1; ; attempt++ {
		err := i.DLQ.EnsureTopics(ctx, topics, specs)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		if attempt == 1 || attempt%10 == 0 {
			i.log.Warn("kafka not ready for the dead-letter topic; retrying", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
	// The watermarks' own producer learns the topic's partitions (a
	// watermark goes to each), then writes until the consumer stops.
	var watermarks sync.WaitGroup
	wctx, stopWatermarks := context.WithCancel(ctx)
	if i.Topic != nil {
		if err := i.topicSink.EnsureTopics(ctx, []string{i.InvalidationsTopic}, specs); err != nil {
			stopWatermarks()
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("invalidations topic %s: %w", i.InvalidationsTopic, err)
		}
		watermarks.Go(func() { _ = i.Topic.Run(wctx) })
		// Partitions added to the topic later get watermarks too.
		watermarks.Go(func() {
			t := time.NewTicker(time.Minute)
			defer t.Stop()
			for {
				select {
				case <-wctx.Done():
					return
				case <-t.C:
					_ = i.topicSink.EnsureTopics(wctx, []string{i.InvalidationsTopic}, specs)
				}
			}
		})
	}
	err := i.Consumer.Run(ctx)
	stopWatermarks()
	watermarks.Wait()
	closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = errors.Join(err, i.DLQ.Close(closeCtx))
	if i.topicSink != nil {
		err = errors.Join(err, i.topicSink.Close(closeCtx))
	}
	return err
}

// Register adds the consumer's metrics to reg. Call it before Run.
func (i *Invalidation) Register(reg prometheus.Registerer) {
	registerConsumerMetrics(reg, i.Consumer, "invalidation")
	registerRedisMetrics(reg, i.Redis)
	registerSinkMetrics(reg, i.Handler)
	if i.Topic != nil {
		registerWatermarkMetrics(reg, i.Topic)
	}
	if i.Webhook != nil {
		registerWebhookMetrics(reg, i.Webhook)
	}
}
