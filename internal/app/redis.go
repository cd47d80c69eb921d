package app

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/config"
	redissink "github.com/tidemark/tidemark/sinks/redis"
)

// redisCheckTimeout bounds the start check of a Redis sink.
const redisCheckTimeout = 10 * time.Second

// newRedisSink builds the Redis sink configured at path ("invalidation.redis"
// or "targets.redis") from r, over TLS and as the ACL user when configured,
// and checks it at start (redissink.Sink.Check): what waiting cannot fix (a
// rejected certificate, wrong credentials, a command the user may not run)
// fails the start with the address and the cause; a server that is only
// unreachable is warned about, and writes are retried until it answers.
// channel is r.Channel for the invalidation sink ("" for targets).
func newRedisSink(ctx context.Context, path string, r *config.Redis, channel string, use redissink.Use, log *zap.Logger) (*redissink.Sink, error) {
	if log == nil {
		log = zap.NewNop()
	}
	installRedisLogger(log)
	tlsConfig, err := r.TLS.Config()
	if err != nil {
		return nil, fmt.Errorf("%s.tls: %w", path, err)
	}
	if r.TLS.On() && r.TLS.InsecureSkipVerify {
		log.Warn(path+".tls.insecure_skip_verify is set: the Redis server's certificate is not checked, so anyone on the path can pose as it (tests only)",
			zap.String("addr", r.Addr))
	}
	rs, err := redissink.New(redissink.Config{Addr: r.Addr, Username: r.Username, Password: r.Password, DB: r.DB, Channel: channel,
		TLS: tlsConfig, Mode: redissink.Mode(r.Mode), MarkerPrefix: r.MarkerPrefix, MarkerTTL: r.MarkerTTL}, log)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	cctx, cancel := context.WithTimeout(ctx, redisCheckTimeout)
	defer cancel()
	err = rs.Check(cctx, use)
	switch {
	case err == nil:
		return rs, nil
	case redissink.IsPermanent(err):
		_ = rs.Close()
		var ce *redissink.CheckError
		if errors.As(err, &ce) && ce.Cause == redissink.CauseAuth {
			ce.Hint += " (the password is " + path + ".password, or " + config.EnvRedisPassword + ")"
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	case ctx.Err() != nil:
		_ = rs.Close()
		return nil, ctx.Err()
	default:
		log.Warn("redis not usable at start; its writes are retried until it is", zap.String("config", path), zap.Error(err))
		return rs, nil
	}
}
