package config

import (
	"fmt"
	"strings"
	"time"

	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/sinks/redis/redisfill"
)

// RedisVersioning is how the invalidation sink writes to Redis
// (invalidation.redis only; see sinks/redis and sinks/redis/redisfill).
type RedisVersioning struct {
	// Mode is "delete" (default: DEL each key) or "versioned" (DEL each key
	// and leave a marker holding the change's position, which readers
	// filling with the redisfill protocol respect: no value read before a
	// change is stored after its invalidation).
	Mode string `yaml:"mode"`
	// MarkerPrefix begins the marker keys of versioned mode; no cache key
	// may begin with it. Default "tidemark:marker:".
	MarkerPrefix string `yaml:"marker_prefix"`
	// MarkerTTL is how long a marker lives in versioned mode (memory only:
	// an expired marker refuses a fill, never lets a stale one in).
	// Default 1m.
	MarkerTTL time.Duration `yaml:"marker_ttl"`
}

// validateRedisMode reports the problems of the versioning fields of r at
// path; rules are the invalidation rules whose keys the markers must not
// collide with.
func validateRedisMode(path string, r *Redis, rules []invalidation.Rule, add func(path, format string, args ...any)) {
	v := r.RedisVersioning
	switch v.Mode {
	case "", "delete":
		// Their defaults may be listed (as the example does); another value
		// would be a setting that silently does nothing.
		if (v.MarkerPrefix != "" && v.MarkerPrefix != redisfill.DefaultMarkerPrefix) || (v.MarkerTTL != 0 && v.MarkerTTL != time.Minute) {
			add(path+".mode", "marker_prefix and marker_ttl are only used with mode: versioned (set it, or remove them)")
		}
		return
	case "versioned":
	default:
		add(path+".mode", "%q is not delete or versioned", v.Mode)
		return
	}
	if err := redisfill.ValidatePrefix(v.MarkerPrefix); err != nil {
		add(path+".marker_prefix", "%v", err)
	}
	if v.MarkerTTL < 0 || (v.MarkerTTL > 0 && v.MarkerTTL < time.Millisecond) {
		add(path+".marker_ttl", "%s must be at least 1ms (0 means the default, 1m)", v.MarkerTTL)
	}
	prefix := v.MarkerPrefix
	if prefix == "" {
		prefix = redisfill.DefaultMarkerPrefix
	}
	for i, rule := range rules {
		for j, k := range rule.Keys {
			lit, _, _ := strings.Cut(k, "{")
			if strings.HasPrefix(lit, prefix) {
				add(fmt.Sprintf("%s.marker_prefix", path), "%q begins the keys of invalidation.rules[%d].keys[%d] (%q): markers would collide with cache keys; choose another prefix",
					prefix, i, j, k)
			}
		}
	}
}

// rejectRedisMode reports versioning fields set where they do nothing
// (targets.redis).
func rejectRedisMode(path string, r *Redis, add func(path, format string, args ...any)) {
	if r.RedisVersioning != (RedisVersioning{}) {
		add(path+".mode", "mode, marker_prefix and marker_ttl apply to invalidation.redis only: remove them here")
	}
}
