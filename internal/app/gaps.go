package app

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/pipeline"
	kafkasink "github.com/tidemark/tidemark/sinks/kafka"
	redissink "github.com/tidemark/tidemark/sinks/redis"
)

// What each consumer does about a retention gap (invalidation.Gap): the
// invalidation consumer follows invalidation.on_gap; targets and
// integrity stop, saying what to repair before resetting the group.

// invalidationOnGap returns the invalidation consumer's OnGap (nil for
// on_gap: fail) and the repair advice of its GapError.
func invalidationOnGap(cfg *config.Config, invTopic string, rs *redissink.Sink, webhook bool, log *zap.Logger) (func(context.Context, invalidation.Gap) error, string) {
	inv := cfg.Invalidation
	if inv.OnGap != config.OnGapFlushPrefix {
		return nil, "the caches may hold values the lost changes should have invalidated: set invalidation.on_gap: flush_prefix to have them flushed and continue, or flush them yourself and resume as below"
	}
	patterns := inv.OnGapRedisPatterns
	return func(ctx context.Context, g invalidation.Gap) error {
		reason := "retention gap: " + g.String()
		if invTopic != "" {
			if err := writeFlushRecord(ctx, cfg, invTopic, reason, log); err != nil {
				return err
			}
		}
		var unlinked int
		if rs != nil && len(patterns) > 0 {
			n, err := rs.InvalidatePattern(ctx, patterns)
			if err != nil {
				return fmt.Errorf("flushing invalidation.on_gap_redis_patterns: %w", err)
			}
			unlinked = n
		}
		var notFlushed []string
		if rs != nil && len(patterns) == 0 {
			notFlushed = append(notFlushed, "redis (set invalidation.on_gap_redis_patterns)")
		}
		if webhook {
			notFlushed = append(notFlushed, "webhook (receivers get no flush)")
		}
		fields := []zap.Field{zap.String("group", g.Group), zap.String("topic", g.Topic), zap.Int("partition", g.Partition),
			zap.String("invalidations_topic", invTopic), zap.Int("redis_keys_unlinked", unlinked)}
		if len(notFlushed) > 0 {
			log.Error("retention gap: caches flushed except these, which may still serve values the lost changes should have invalidated; continuing from the log start",
				append(fields, zap.String("not_flushed", strings.Join(notFlushed, ", ")))...)
		} else {
			log.Warn("retention gap: caches flushed; continuing from the log start", fields...)
		}
		return nil
	}, ""
}

// writeFlushRecord publishes a flush control record to every partition of
// topic with a producer of its own: the consumer's producer is written
// from the consumer goroutine only, and OnGap runs beside it.
func writeFlushRecord(ctx context.Context, cfg *config.Config, topic, reason string, log *zap.Logger) error {
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return err
	}
	p, err := kafkasink.New(kafkasink.Config{Brokers: cfg.Kafka.Brokers, ClientID: cfg.Kafka.ClientID + "-invalidation-flush",
		Partitions: cfg.Kafka.Partitions, ReplicationFactor: cfg.Kafka.ReplicationFactor, TLS: knet.TLS, SASL: knet.SASL},
		log.With(zap.String("component", "invalidation-flush")))
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = p.Close(cctx)
	}()
	// EnsureTopics reads the partition count (a broadcast goes to each).
	if err := p.EnsureTopics(ctx, []string{topic}, map[string]kafkasink.TopicSpec{topic: {Configs: map[string]string{"cleanup.policy": "compact"}}}); err != nil {
		return fmt.Errorf("reading the partitions of %s: %w", topic, err)
	}
	if err := p.Write(ctx, []pipeline.Message{invalidation.FlushRecord(topic, reason, time.Now())}); err != nil {
		return fmt.Errorf("publishing a flush record to %s: %w", topic, err)
	}
	return nil
}

// targetsGapHint is what to repair after a gap in the targets group.
func targetsGapHint() string {
	return "the kept notification targets miss the lost membership and user changes: resume as below, then, once the group has caught up, run `tidemark rebuild targets --all --config FILE` (recomputes every room from the database; safe while the consumer runs)"
}

// integrityGapHint is what a gap in the integrity group means.
func integrityGapHint() string {
	return "the lost changes were never checked: violations among them are not reported"
}
