package config

import (
	"fmt"
	"strings"
)

// Invalidation.OnGap values.
const (
	OnGapFail        = "fail"
	OnGapFlushPrefix = "flush_prefix"
)

// validateOnGap checks invalidation.on_gap and its Redis patterns.
func validateOnGap(inv *Invalidation, add func(path, format string, args ...any)) {
	switch inv.OnGap {
	case OnGapFail, OnGapFlushPrefix:
	default:
		add("invalidation.on_gap", "%q is neither %s nor %s", inv.OnGap, OnGapFail, OnGapFlushPrefix)
	}
	if inv.OnGap == OnGapFlushPrefix && len(inv.OnGapRedisPatterns) == 0 && (inv.Topic == nil || !*inv.Topic) {
		add("invalidation.on_gap", "%s would flush nothing: it publishes to the invalidations topic (topic: false here) and UNLINKs on_gap_redis_patterns (none)", OnGapFlushPrefix)
	}
	if len(inv.OnGapRedisPatterns) == 0 {
		return
	}
	if inv.OnGap != OnGapFlushPrefix {
		add("invalidation.on_gap_redis_patterns", "only used with on_gap: %s (on_gap is %q)", OnGapFlushPrefix, inv.OnGap)
	}
	if inv.Redis == nil {
		add("invalidation.on_gap_redis_patterns", "needs invalidation.redis")
	}
	for i, p := range inv.OnGapRedisPatterns {
		if strings.TrimSpace(strings.ReplaceAll(p, "*", "")) == "" {
			add(fmt.Sprintf("invalidation.on_gap_redis_patterns[%d]", i), "%q would UNLINK every key of the database: name a prefix, e.g. \"room:*\"", p)
		}
	}
}
