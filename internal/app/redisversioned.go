package app

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tidemark/tidemark/invalidation"
	redissink "github.com/tidemark/tidemark/sinks/redis"
)

// redisInvalidator is rs as the invalidation consumer's sink: in versioned
// mode it also receives each key's position (invalidation.
// PositionedInvalidator), which its markers carry; in delete mode it is rs.
func redisInvalidator(rs *redissink.Sink) invalidation.Invalidator {
	if rs.Mode() == redissink.ModeVersioned {
		return positionedRedis{rs}
	}
	return rs
}

// positionedRedis passes positions to the Redis sink (which cannot import
// the invalidation package and so declares its own KeyAt).
type positionedRedis struct{ *redissink.Sink }

var _ invalidation.PositionedInvalidator = positionedRedis{}

func (p positionedRedis) InvalidateAt(ctx context.Context, keys []invalidation.KeyAt) error {
	at := make([]redissink.KeyAt, len(keys))
	for i, k := range keys {
		at[i] = redissink.KeyAt{Key: k.Key, Pos: k.Pos}
	}
	return p.Sink.InvalidateAt(ctx, at)
}

// registerRedisMetrics adds tidemark_redis_markers_kept_total when rs is in
// versioned mode: invalidations that found a marker at least as new as
// their own change (redelivered changes; their DEL still ran).
func registerRedisMetrics(reg prometheus.Registerer, rs *redissink.Sink) {
	if rs == nil || rs.Mode() != redissink.ModeVersioned {
		return
	}
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Subsystem: "redis", Name: "markers_kept_total",
		Help: "Versioned invalidations that kept a marker at least as new as their change (redeliveries)."},
		func() float64 { return float64(rs.MarkersKept()) }))
}
