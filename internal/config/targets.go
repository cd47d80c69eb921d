package config

import (
	"fmt"
	"strings"
	"time"

	"github.com/tidemark/tidemark/invalidation/targets"
	"github.com/tidemark/tidemark/pipeline"
)

// EnvTargetsPostgresDSN overrides targets.postgres.dsn.
const EnvTargetsPostgresDSN = "TIDEMARK_TARGETS_POSTGRES_DSN"

// Targets configures the notification-targets consumer: per room, the users
// to notify (joined, account active), kept from membership and user changes.
type Targets struct {
	// Group is its Kafka consumer group. Default "<topic_prefix>-targets".
	Group string `yaml:"group"`
	// Membership maps the membership table (defaults: the canonical
	// public.room_memberships(room_id, user_id, membership), joined = "join").
	Membership targets.MembershipSource `yaml:"membership"`
	// Users maps the user-activity table (defaults: the canonical
	// public.users(user_id, deactivated)).
	Users targets.UserSource `yaml:"users"`
	// MaxAttempts before a failing change is dead-lettered. Default 5.
	MaxAttempts int `yaml:"max_attempts"`
	// Hold is the longest a room waits for the rest of an incomplete
	// transaction before its targets are published anyway. Default 2s.
	Hold time.Duration `yaml:"hold"`
	// Topics publishes <topic_prefix>.notify_targets (compacted; key room,
	// value the full set and position) and <topic_prefix>.notify_target_changes
	// (one record per added or removed user, with the reason). Default true.
	Topics *bool `yaml:"topics"`
	// MaxRecordBytes bounds one notify_targets record (a room's full set):
	// the topic is created with max.message.bytes to match, so rooms of
	// hundreds of thousands of members fit. A room beyond it (or beyond an
	// existing topic's max.message.bytes) is published without its list
	// ("users": null, "truncated": true, "user_count"), never blocking the
	// consumer. Default 16 MiB.
	MaxRecordBytes int64 `yaml:"max_record_bytes"`
	// FullSetMaxMembers is the most targets a room may have and still
	// carry its full set in every update. A larger room's updates publish
	// only what changed (notify_target_changes records, Redis SADD/SREM),
	// and its notify_targets record is written every FullSetInterval while
	// it changes, at the version it has then. Default 10000.
	FullSetMaxMembers int `yaml:"full_set_max_members"`
	// FullSetInterval is how often a changing large room's full set is
	// published. Default 1m.
	FullSetInterval time.Duration `yaml:"full_set_interval"`
	// Postgres is where the state is kept (tables in Schema).
	Postgres TargetsPostgres `yaml:"postgres"`
	// Redis, when set, keeps one set per room.
	Redis *TargetsRedis `yaml:"redis"`
	// AuditInterval runs an audit of AuditSample rooms this often in the
	// targets role and exports its ratio as a gauge. Default 0 (off).
	AuditInterval time.Duration `yaml:"audit_interval"`
	// AuditSample rooms per periodic audit. Default 100.
	AuditSample int `yaml:"audit_sample"`
	// AuditWait bounds how long a periodic audit waits for the pipeline to
	// pass its snapshot before re-checking differing rooms; past it the
	// audit is unconfirmed (lag) and leaves the ratio gauge alone.
	// Default 1m.
	AuditWait time.Duration `yaml:"audit_wait"`
	// Prune deletes, every PruneInterval, the state rows whose meaning
	// equals having no row (memberships not joined, active users, empty
	// settled rooms) once no older change can reach the consumer again
	// (below the slot's confirmed position and the group's committed
	// positions). Default true, every 10m.
	Prune         *bool         `yaml:"prune"`
	PruneInterval time.Duration `yaml:"prune_interval"`
}

// TargetsPostgres is the database holding the kept state.
type TargetsPostgres struct {
	// DSN of the state database. Default postgres.dsn (env
	// TIDEMARK_TARGETS_POSTGRES_DSN overrides).
	DSN string `yaml:"dsn"`
	// Schema holding the tables (created when missing). It must not hold a
	// captured table. Default "tidemark".
	Schema string `yaml:"schema"`
}

// TargetsRedis is a Redis server keeping a set per room.
type TargetsRedis struct {
	Redis `yaml:",inline"`
	// Key names a room's set; "{room_id}" is replaced. Default
	// "notify_targets:{room_id}".
	Key string `yaml:"key"`
}

// Mapping returns the schema mapping.
func (t *Targets) Mapping() targets.Mapping {
	return targets.Mapping{Membership: t.Membership, Users: t.Users}
}

func (c *Config) applyTargetsEnv(getenv func(string) string) {
	t := c.Targets
	if t == nil {
		return
	}
	if v := getenv(EnvTargetsPostgresDSN); v != "" {
		t.Postgres.DSN = v
	}
	if v := getenv(EnvRedisPassword); v != "" && t.Redis != nil {
		t.Redis.Password = v
	}
}

func (c *Config) applyTargetsDefaults() {
	t := c.Targets
	if t == nil {
		return
	}
	if t.Group == "" {
		t.Group = c.Kafka.TopicPrefix + "-targets"
	}
	m := t.Mapping()
	m.ApplyDefaults()
	t.Membership, t.Users = m.Membership, m.Users
	if t.MaxAttempts == 0 {
		t.MaxAttempts = 5
	}
	if t.Hold == 0 {
		t.Hold = 2 * time.Second
	}
	if t.Topics == nil {
		t.Topics = boolPtr(true)
	}
	if t.Postgres.DSN == "" {
		t.Postgres.DSN = c.Postgres.DSN
	}
	if t.Postgres.Schema == "" {
		t.Postgres.Schema = "tidemark"
	}
	if t.Redis != nil && t.Redis.Key == "" {
		t.Redis.Key = "notify_targets:{room_id}"
	}
	if t.AuditSample == 0 {
		t.AuditSample = 100
	}
	if t.AuditWait == 0 {
		t.AuditWait = time.Minute
	}
	if t.MaxRecordBytes == 0 {
		t.MaxRecordBytes = 16 << 20
	}
	if t.FullSetMaxMembers == 0 {
		t.FullSetMaxMembers = targets.DefaultFullSetMax
	}
	if t.FullSetInterval == 0 {
		t.FullSetInterval = time.Minute
	}
	if t.Prune == nil {
		on := true
		t.Prune = &on
	}
	if t.PruneInterval == 0 {
		t.PruneInterval = 10 * time.Minute
	}
}

// validateTargets reports the targets section's problems; captured is the
// set of postgres.tables.
func (c *Config) validateTargets(captured map[string]bool) []FieldError {
	t := c.Targets
	if t == nil {
		return nil
	}
	var ps []FieldError
	add := func(path, format string, args ...any) {
		ps = append(ps, FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	m := t.Mapping()
	for _, p := range m.Validate("targets") {
		path, msg, _ := strings.Cut(p, ": ")
		add(path, "%s", msg)
	}
	if !captured[t.Membership.Table] {
		add("targets.membership.table", "%q is not in postgres.tables", t.Membership.Table)
	}
	if !captured[t.Users.Table] {
		add("targets.users.table", "%q is not in postgres.tables", t.Users.Table)
	}
	if c.Pipeline.TableTopics != nil && !*c.Pipeline.TableTopics {
		add("targets", "reads the tables' own topics: set pipeline.table_topics: true")
	}
	if t.FullSetMaxMembers < 1 {
		add("targets.full_set_max_members", "%d must be at least 1", t.FullSetMaxMembers)
	}
	if t.FullSetInterval < time.Second {
		add("targets.full_set_interval", "%s is below 1s", t.FullSetInterval)
	}
	if t.MaxRecordBytes < 64<<10 || t.MaxRecordBytes > 64<<20 {
		add("targets.max_record_bytes", "%d is outside 65536..67108864 (one produce request carries a batch per partition; Kafka's socket.request.max.bytes is 100 MiB)", t.MaxRecordBytes)
	}
	if t.MaxAttempts < 1 {
		add("targets.max_attempts", "%d must be at least 1", t.MaxAttempts)
	}
	if t.Hold < 10*time.Millisecond || t.Hold > time.Minute {
		add("targets.hold", "%s is outside 10ms..1m", t.Hold)
	}
	if t.Postgres.DSN == "" {
		add("targets.postgres.dsn", "required (defaults to postgres.dsn)")
	} else if err := checkDSN(t.Postgres.DSN); err != nil {
		add("targets.postgres.dsn", "%v", err)
	}
	if !pipeline.IsIdentifier(t.Postgres.Schema) {
		add("targets.postgres.schema", "%q is not a plain identifier", t.Postgres.Schema)
	}
	for tbl := range captured {
		if strings.HasPrefix(tbl, t.Postgres.Schema+".") {
			add("targets.postgres.schema", "%q holds the captured table %s: keep the state out of captured schemas", t.Postgres.Schema, tbl)
		}
	}
	if r := t.Redis; r != nil {
		if !strings.Contains(r.Addr, ":") {
			add("targets.redis.addr", "%q needs host:port", r.Addr)
		}
		if !strings.Contains(r.Key, "{room_id}") {
			add("targets.redis.key", "%q does not contain {room_id}", r.Key)
		}
		validateTLS("targets.redis.tls", r.TLS, add)
		rejectRedisMode("targets.redis", &r.Redis, add)
	}
	if t.AuditInterval < 0 {
		add("targets.audit_interval", "%s must not be negative", t.AuditInterval)
	}
	if t.AuditSample < 0 {
		add("targets.audit_sample", "%d must not be negative", t.AuditSample)
	}
	if t.PruneInterval < 0 {
		add("targets.prune_interval", "%s must not be negative", t.PruneInterval)
	}
	if t.AuditWait < 0 {
		add("targets.audit_wait", "%s must not be negative", t.AuditWait)
	}
	return ps
}
