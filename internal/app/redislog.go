package app

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// redisLogEvery bounds go-redis's own log lines: each distinct message
// format is logged at most once per interval, with the number of repeats
// held back.
const redisLogEvery = time.Minute

// redisLogger routes go-redis's internal log lines (a connection pool that
// cannot dial, a dropped connection) through zap at warn level, at most once
// per format per redisLogEvery. By default go-redis prints every attempt to
// stderr, so a Redis outage wrote one identical line per retry; the sinks'
// own warnings and metrics carry the outage.
type redisLogger struct {
	log atomic.Pointer[zap.Logger]
	now func() time.Time

	mu   sync.Mutex
	seen map[string]*redisLogEntry
}

type redisLogEntry struct {
	last     time.Time
	withheld int
}

func (l *redisLogger) Printf(_ context.Context, format string, v ...any) {
	now := l.now()
	l.mu.Lock()
	e := l.seen[format]
	if e == nil {
		e = &redisLogEntry{}
		l.seen[format] = e
	} else if now.Sub(e.last) < redisLogEvery {
		e.withheld++
		l.mu.Unlock()
		return
	}
	withheld := e.withheld
	e.last, e.withheld = now, 0
	l.mu.Unlock()
	l.log.Load().Warn("redis client: "+fmt.Sprintf(format, v...), zap.Int("similar_lines_withheld", withheld))
}

var (
	redisLogOnce sync.Once
	redisLog     = &redisLogger{now: time.Now, seen: map[string]*redisLogEntry{}}
)

// installRedisLogger installs the go-redis logger once per process; the
// logger it writes to is the latest one given (go-redis's is global, a
// process may build several sinks).
func installRedisLogger(log *zap.Logger) {
	redisLog.log.Store(log.With(zap.String("component", "redis-client")))
	redisLogOnce.Do(func() { goredis.SetLogger(redisLog) })
}
