// Package config loads and validates Tidemark's YAML configuration. Every
// problem is reported at once, by field path; secrets can be supplied through
// the environment and never appear in errors.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/tidemark/tidemark/internal/buildinfo"
	"io"
	"maps"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/kafkanet"
	"github.com/tidemark/tidemark/invalidation"
	"github.com/tidemark/tidemark/invalidation/expr"
	"github.com/tidemark/tidemark/pipeline"
)

// Environment variables that override the file.
const (
	EnvPostgresDSN       = "TIDEMARK_POSTGRES_DSN"
	EnvPostgresPassword  = "TIDEMARK_POSTGRES_PASSWORD"
	EnvKafkaBrokers      = "TIDEMARK_KAFKA_BROKERS"
	EnvRedisPassword     = "TIDEMARK_REDIS_PASSWORD"
	EnvWebhookSecret     = "TIDEMARK_WEBHOOK_SECRET"
	EnvAdminToken        = "TIDEMARK_ADMIN_TOKEN"
	EnvKafkaSASLPassword = "TIDEMARK_KAFKA_SASL_PASSWORD"
	// EnvHTTPListen overrides http.listen (e.g. one port per role when
	// several run side by side, as containers of one pod).
	EnvHTTPListen = "TIDEMARK_HTTP_LISTEN"
)

// EnvMaskSalt is the salt of masked columns (postgres.columns.*.mask).
const EnvMaskSalt = "TIDEMARK_MASK_SALT"

// ColumnPolicy is one table's postgres.columns entry.
type ColumnPolicy struct {
	// Exclude lists columns that never leave Tidemark.
	Exclude []string `yaml:"exclude"`
	// Mask maps a column to its hash: sha256 (the only one).
	Mask map[string]string `yaml:"mask"`
}

// Config is the whole file.
type Config struct {
	// MaskSalt is the salt of masked columns, from env TIDEMARK_MASK_SALT
	// only (never in the file, never printed).
	MaskSalt string   `yaml:"-"`
	Postgres Postgres `yaml:"postgres"`
	Kafka    Kafka    `yaml:"kafka"`
	Pipeline Pipeline `yaml:"pipeline"`
	HTTP     HTTP     `yaml:"http"`
	Log      Log      `yaml:"log"`
	// Snapshot configures incremental snapshots (see the README).
	Snapshot Snapshot `yaml:"snapshot"`
	// Invalidation configures the cache-invalidation consumer (optional).
	Invalidation *Invalidation `yaml:"invalidation"`
	// Targets configures the notification-targets consumer (optional).
	Targets *Targets `yaml:"targets"`
	// Integrity configures the integrity consumer (optional).
	Integrity *Integrity `yaml:"integrity"`
	// HA elects one capture process per slot (see the README on high
	// availability).
	HA HA `yaml:"ha"`
}

// HA is leader election for capture.
type HA struct {
	// Enabled takes a session-level advisory lock on the source database,
	// keyed by the slot, before capturing; processes that do not get it
	// stand by. Default true.
	Enabled *bool `yaml:"enabled"`
	// Retry is how often a standby tries the lock and the leader confirms
	// it. Default 1s.
	Retry time.Duration `yaml:"retry"`
	// LockTTL is how long Postgres keeps the lock of a leader that stopped
	// confirming it (its session's idle_session_timeout); the leader stops
	// writing after half of it. Default 5 x retry.
	LockTTL time.Duration `yaml:"lock_ttl"`
}

// Invalidation is the cache-invalidation consumer.
type Invalidation struct {
	// Group is its Kafka consumer group. Default "<topic_prefix>-invalidation".
	Group string `yaml:"group"`
	// Streams, when set, makes it consume these entity streams instead of
	// the rule tables' own topics; every table of those streams then needs
	// a rule.
	Streams []string `yaml:"streams"`
	// Rules map table changes to cache keys (required).
	Rules []invalidation.Rule `yaml:"rules"`
	// IgnoreTables are tables of the consumed entity streams that need no
	// rule: their changes are counted as skipped (reason table_ignored).
	// Only with streams. Default none.
	IgnoreTables []string `yaml:"ignore_tables"`
	// MaxAttempts before a failing change is dead-lettered. Default 5.
	MaxAttempts int `yaml:"max_attempts"`
	// Redis receives DELs.
	Redis *Redis `yaml:"redis"`
	// OnGap is what a retention gap does (the group's committed offset is
	// below a partition's log start, so changes were deleted unread):
	// "fail" (default) stops the consumer with an error naming the
	// partition and how to resume; "flush_prefix" publishes a flush record
	// to <topic_prefix>.invalidations (following caches drop everything),
	// UNLINKs OnGapRedisPatterns in Redis, then continues from the log
	// start.
	OnGap string `yaml:"on_gap"`
	// OnGapRedisPatterns are the Redis key patterns (SCAN MATCH) that
	// on_gap: flush_prefix UNLINKs, e.g. ["room:*", "user:*"]. Default
	// none: Redis keeps its keys (the gap's error log says so).
	OnGapRedisPatterns []string `yaml:"on_gap_redis_patterns"`
	// Webhook receives batched, signed JSON POSTs of invalidated keys.
	Webhook *Webhook `yaml:"webhook"`
	// Topic publishes every invalidation to the compacted topic
	// <topic_prefix>.invalidations (key: cache key, value: position), which
	// caches in any language can follow. Default true.
	Topic *bool `yaml:"topic"`
	// MaxBacklogBytes bounds the keys queued for one lagging sink (key
	// bytes plus 64 per key) while the others go on; at the bound the
	// consumer stops fetching. Default 67108864 (64 MiB).
	MaxBacklogBytes int64 `yaml:"max_backlog_bytes"`
	// WatermarkInterval is how often a watermark record goes to every
	// partition of that topic (caches stop caching when watermarks are
	// older than their staleness bound, 10s by default). Default 1s.
	WatermarkInterval time.Duration `yaml:"watermark_interval"`
}

// Webhook is an HTTP receiver of invalidations.
type Webhook struct {
	// URL to POST to (required).
	URL string `yaml:"url"`
	// Secret is the HMAC-SHA256 key (required; env TIDEMARK_WEBHOOK_SECRET
	// overrides).
	Secret string `yaml:"secret"`
	// BatchSize keys per request. Default 500.
	BatchSize int `yaml:"batch_size"`
	// Timeout per request. Default 5s.
	Timeout time.Duration `yaml:"timeout"`
	// MaxAttempts per batch before it goes to the dead-letter topic, with
	// on_failure: dlq. Default 5; not allowed with hold.
	MaxAttempts int `yaml:"max_attempts"`
	// OnFailure is what happens to a batch the receiver does not accept:
	// "dlq" (default) dead-letters it after max_attempts tries (resend with
	// `tidemark dlq replay --source webhook`); "hold" retries it with
	// backoff without bound, holding the consumer's offsets.
	OnFailure string `yaml:"on_failure"`
	// MaxBackoff caps the wait between two tries of a batch (from 100ms,
	// doubling). Default 5s.
	MaxBackoff time.Duration `yaml:"max_backoff"`
}

// Redis is a Redis server used as an invalidation sink.
type Redis struct {
	// Addr is host:port (required).
	Addr string `yaml:"addr"`
	// Username and Password (env TIDEMARK_REDIS_PASSWORD overrides).
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// DB number. Default 0.
	DB int `yaml:"db"`
	// Channel, when set, also receives a PUBLISH of every invalidated key.
	Channel string `yaml:"channel"`
	// TLS, when enabled, encrypts the connection (managed Redis services
	// need it, often with Username for an ACL user).
	TLS *TLS `yaml:"tls"`
	// RedisVersioning: mode (delete|versioned), marker_prefix, marker_ttl.
	RedisVersioning `yaml:",inline"`
}

// Postgres is the captured database.
type Postgres struct {
	// DSN of the database (required; env TIDEMARK_POSTGRES_DSN overrides,
	// TIDEMARK_POSTGRES_PASSWORD sets its password).
	DSN string `yaml:"dsn"`
	// Slot is the permanent replication slot. Default "tidemark".
	Slot string `yaml:"slot"`
	// Publication is the pgoutput publication. Default "tidemark".
	Publication string `yaml:"publication"`
	// ManagePublication lets Tidemark create the publication and keep its
	// table list equal to Tables. Default true.
	ManagePublication *bool `yaml:"manage_publication"`
	// UnknownTables says what a change of a table that is not in Tables
	// does when it arrives (an extra table of an unmanaged or FOR ALL
	// TABLES publication, a table added to the publication at runtime):
	// "skip" (default) counts it in tidemark_skipped_changes_total{table}
	// and warns once per table; "stop" stops capture with an error naming
	// the table.
	UnknownTables string `yaml:"unknown_tables"`
	// Snapshot says what happens to the rows that exist when Tidemark
	// creates its slot: "initial" (default) publishes them as op "r" read
	// in the slot's exported snapshot before the stream starts; "never"
	// publishes only changes committed after the slot was created;
	// "initial_only" publishes the snapshot and then exits. It applies only
	// when Tidemark creates the slot (see the README on snapshots).
	Snapshot string `yaml:"snapshot"`
	// Tables to capture, "schema.table" (required).
	Tables []string `yaml:"tables"`
	// KeyColumns sets the columns that key a table's messages, by table
	// ("schema.table"), for tables whose primary key, replica identity
	// index or unique index is not the right key (Debezium's
	// message.key.columns). The columns must be sent in deletes (be in the
	// replica identity). Default: see the README on keys.
	KeyColumns map[string][]string `yaml:"key_columns"`
	// Filters publish only the rows of a table that match a condition in
	// the rules' expression language, e.g. {public.events: "type <>
	// 'm.room.redaction'"}; an update that leaves the condition becomes a
	// delete, one that enters it an insert (Postgres' row-filter rules).
	// Applied in Tidemark; dropped changes are counted.
	Filters map[string]string `yaml:"filters"`
	// Columns keeps columns out of the topics, by table: exclude drops a
	// column from every image (never a key column), mask publishes it as a
	// salted SHA-256 (salt from env TIDEMARK_MASK_SALT).
	Columns map[string]ColumnPolicy `yaml:"columns"`
	// StandbyInterval is the longest gap between standby status messages.
	// Default 10s.
	StandbyInterval time.Duration `yaml:"standby_interval"`
	// SlotCheckInterval is how often the slot's WAL retention is read from
	// pg_replication_slots (metrics, warnings before max_slot_wal_keep_size
	// invalidates it). Default 10s.
	SlotCheckInterval time.Duration `yaml:"slot_check_interval"`
	// HeartbeatInterval: how often a non-transactional
	// pg_logical_emit_message('tidemark.heartbeat') is written, so an idle
	// slot keeps confirming and replication lag is measured end to end
	// (tidemark_heartbeat_lag_seconds). Default 1m; 0s disables (needs
	// EXECUTE on pg_logical_emit_message, which PUBLIC has by default).
	HeartbeatInterval *time.Duration `yaml:"heartbeat_interval"`
}

// Snapshot configures incremental snapshots on demand (tidemark snapshot,
// POST /admin/snapshot, the signal table).
type Snapshot struct {
	// Incremental runs the incremental snapshot runner in `tidemark run`
	// (it creates tidemark.incremental_snapshots and
	// tidemark.tidemark_signals and reads the signal table). Default true.
	Incremental *bool `yaml:"incremental"`
	// ChunkSize is the most rows one chunk reads. Default 2000.
	ChunkSize int `yaml:"chunk_size"`
	// ChunkBytes ends a chunk early once its rows hold this many bytes.
	// Default 8 MiB.
	ChunkBytes int64 `yaml:"chunk_bytes"`
	// MaxRowsPerSecond bounds the read rate; 0 (default) is unbounded.
	MaxRowsPerSecond float64 `yaml:"max_rows_per_second"`
	// SignalInterval is how often the signal table is read. Default 1s.
	SignalInterval time.Duration `yaml:"signal_interval"`
	// NewTables: a table added to postgres.tables after the slot was
	// created is snapshotted incrementally on the next start. Default true.
	NewTables *bool `yaml:"new_tables"`
}

// The values of postgres.snapshot.
const (
	SnapshotInitial     = "initial"
	SnapshotNever       = "never"
	SnapshotInitialOnly = "initial_only"
)

// Kafka is the output cluster.
type Kafka struct {
	// Brokers are bootstrap addresses (required; env TIDEMARK_KAFKA_BROKERS,
	// comma-separated, overrides).
	Brokers []string `yaml:"brokers"`
	// TopicPrefix prefixes every topic. Default "tidemark".
	TopicPrefix string `yaml:"topic_prefix"`
	// Partitions of topics Tidemark creates. Default 6.
	Partitions int `yaml:"partitions"`
	// ReplicationFactor of topics Tidemark creates. Default 1.
	ReplicationFactor int `yaml:"replication_factor"`
	// Compression: none, gzip, snappy, lz4, zstd. Default none.
	Compression string `yaml:"compression"`
	// BatchBytes bounds one produce request per partition. Default 1048576.
	BatchBytes int64 `yaml:"batch_bytes"`
	// TopicConfigs apply to topics Tidemark creates (e.g. retention.ms).
	TopicConfigs map[string]string `yaml:"topic_configs"`
	// ClientID. Default "tidemark".
	ClientID string `yaml:"client_id"`
	// TLS encrypts every Kafka connection (managed clusters need it).
	TLS *TLS `yaml:"tls"`
	// SASL authenticates every Kafka connection.
	SASL *SASL `yaml:"sasl"`
	// Tombstones follows each delete on a table topic with a record of the
	// same key and a null value (Debezium's tombstones.on.delete), so log
	// compaction removes deleted keys. Default true.
	Tombstones *bool `yaml:"tombstones"`
}

// SASL is the Kafka SASL login shared by every Kafka client.
type SASL struct {
	// Mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required).
	Mechanism string `yaml:"mechanism"`
	// Username (required).
	Username string `yaml:"username"`
	// Password; prefer PasswordFile or env TIDEMARK_KAFKA_SASL_PASSWORD
	// (which overrides both).
	Password string `yaml:"password"`
	// PasswordFile holds the password (trailing newlines are dropped).
	PasswordFile string `yaml:"password_file"`
}

// On reports whether s asks for SASL (any field set).
func (s *SASL) On() bool {
	return s != nil && (s.Mechanism != "" || s.Username != "" || s.Password != "" || s.PasswordFile != "")
}

// String prints s with the password masked, so a config printed with %v
// or %+v never shows it.
func (s SASL) String() string {
	pw := `""`
	if s.Password != "" {
		pw = redacted
	}
	return fmt.Sprintf("{Mechanism:%s Username:%s Password:%s PasswordFile:%s}", s.Mechanism, s.Username, pw, s.PasswordFile)
}

// GoString is String for %#v.
func (s SASL) GoString() string { return "config.SASL" + s.String() }

// Net returns the connection security every Kafka client uses.
func (k *Kafka) Net() (kafkanet.Settings, error) {
	var s kafkanet.Settings
	tc, err := k.TLS.Config()
	if err != nil {
		return s, fmt.Errorf("kafka.tls: %w", err)
	}
	s.TLS = tc
	if k.SASL.On() {
		m, err := kafkanet.Mechanism(k.SASL.Mechanism, k.SASL.Username, k.SASL.Password)
		if err != nil {
			return s, fmt.Errorf("kafka.sasl.mechanism: %w", err)
		}
		s.SASL = m
	}
	return s, nil
}

// Pipeline shapes routing and bounds memory.
type Pipeline struct {
	// TableTopics publishes every table to <prefix>.<schema>.<table>, also
	// when it belongs to an entity stream. Default true.
	TableTopics *bool `yaml:"table_topics"`
	// TransactionsTopic publishes BEGIN/END records to TransactionTopic.
	// Default true.
	TransactionsTopic *bool `yaml:"transactions_topic"`
	// TransactionTopic names that topic. Default "<prefix>.transaction"
	// (Debezium's name; Tidemark before 0.9 wrote "<prefix>.transactions").
	TransactionTopic string `yaml:"transaction_topic"`
	// Format of table topics: debezium (envelopes) or rows (the flattened
	// row with __op, __deleted, __lsn, __ts_ms: Debezium's
	// ExtractNewRecordState, for databases that upsert rows). Default
	// debezium.
	Format string `yaml:"format"`
	// Formats overrides Format per table ("schema.table": debezium|rows).
	Formats map[string]string `yaml:"formats"`
	// JSONMode: embed (default) or string (json/jsonb as JSON strings, as
	// Debezium writes them).
	JSONMode string `yaml:"json_mode"`
	// DecimalMode: number (default: numeric columns declared with at most
	// 15 digits of precision as JSON numbers, other numeric columns as
	// strings), string (always strings) or double (always numbers).
	DecimalMode string `yaml:"decimal_mode"`
	// TimeMode: iso (default) or micros (Debezium's integer microseconds
	// for timestamp, time and interval; days for date).
	TimeMode string `yaml:"time_mode"`
	// BigintMode: number (default: every digit) or string.
	BigintMode string `yaml:"bigint_mode"`
	// Messages publishes logical decoding messages (pg_logical_emit_message,
	// the outbox pattern) to MessageTopic as Debezium's op "m" records.
	// Tidemark's own (prefixes "tidemark.") stay internal. Default false.
	Messages bool `yaml:"messages"`
	// MessageTopic names that topic. Default "<prefix>.message".
	MessageTopic string `yaml:"message_topic"`
	// Truncate: publish (op "t" records, which the targets consumer needs)
	// or skip (counted and warned once; Debezium's default). Default
	// publish.
	Truncate string `yaml:"truncate"`
	// EntityStreams put several tables in one topic keyed by a shared column.
	EntityStreams []pipeline.EntityStream `yaml:"entity_streams"`
	// MaxInFlightMessages bounds unacknowledged messages. Default 50000.
	MaxInFlightMessages int `yaml:"max_inflight_messages"`
	// MaxInFlightBytes bounds their size. Default 8388608 (8 MiB).
	MaxInFlightBytes int64 `yaml:"max_inflight_bytes"`
	// MaxBatchMessages bounds one write to Kafka. Default 4000.
	MaxBatchMessages int `yaml:"max_batch_messages"`
}

// HTTP is the operator listener.
type HTTP struct {
	// Listen address for /healthz, /readyz and /metrics; empty disables.
	// Default "127.0.0.1:9187".
	Listen *string `yaml:"listen"`
	// AdminToken is the bearer token of the admin API under /admin/ on the
	// same listener (env TIDEMARK_ADMIN_TOKEN overrides; at least 16
	// characters). Default "": the admin API is disabled.
	AdminToken string `yaml:"admin_token"`
}

// Log configures zap.
type Log struct {
	// Level: debug, info, warn, error. Default info.
	Level string `yaml:"level"`
	// Format: console or json. Default console.
	Format string `yaml:"format"`
}

// FieldError is one problem, by field path.
type FieldError struct {
	Path string
	Msg  string
}

func (e FieldError) Error() string { return e.Path + ": " + e.Msg }

// Error lists every problem of a file.
type Error struct {
	File     string
	Problems []FieldError
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "invalid config %s (%d problem(s)):", e.File, len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n  - ")
		b.WriteString(p.Error())
	}
	return b.String()
}

// Load reads, decodes (unknown fields are errors), applies the environment
// and defaults, and validates the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	return Parse(path, data, os.Getenv)
}

// Parse is Load on bytes, with getenv for overrides.
func Parse(name string, data []byte, getenv func(string) string) (*Config, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			e := &Error{File: name}
			for _, m := range te.Errors {
				e.Problems = append(e.Problems, FieldError{Path: "yaml", Msg: hideValues(m)})
			}
			return nil, e
		}
		return nil, &Error{File: name, Problems: []FieldError{{Path: "yaml", Msg: hideValues(strings.TrimPrefix(err.Error(), "yaml: "))}}}
	}
	c.ApplyEnv(getenv)
	c.ApplyDefaults()
	probs := c.readSecretFiles(getenv)
	if probs = append(probs, c.Validate()...); len(probs) > 0 {
		return nil, &Error{File: name, Problems: probs}
	}
	return &c, nil
}

// yamlValue matches the values yaml.v3 quotes in type errors
// ("cannot unmarshal !!str `postgres://u:secret@h/db` into ...").
var yamlValue = regexp.MustCompile("(?s)`.*`")

// hideValues removes quoted values from yaml errors: a misplaced DSN must
// not put its password in an error message.
func hideValues(msg string) string { return yamlValue.ReplaceAllString(msg, "(value hidden)") }

// envLookup reads an environment variable through getenv; set means non-empty
// or the literal "none" (which asks for an empty value).
func envLookup(getenv func(string) string, name string) (string, bool) {
	v := getenv(name)
	if v == "none" {
		return "", true
	}
	return v, v != ""
}

// ApplyEnv applies the environment overrides.
func (c *Config) ApplyEnv(getenv func(string) string) {
	if v := getenv(EnvPostgresDSN); v != "" {
		c.Postgres.DSN = v
	}
	if v := getenv(EnvPostgresPassword); v != "" && c.Postgres.DSN != "" {
		c.Postgres.DSN = withPassword(c.Postgres.DSN, v)
	}
	if v := getenv(EnvRedisPassword); v != "" && c.Invalidation != nil && c.Invalidation.Redis != nil {
		c.Invalidation.Redis.Password = v
	}
	if v := getenv(EnvWebhookSecret); v != "" && c.Invalidation != nil && c.Invalidation.Webhook != nil {
		c.Invalidation.Webhook.Secret = v
	}
	if v := getenv(EnvAdminToken); v != "" {
		c.HTTP.AdminToken = v
	}
	c.MaskSalt = getenv(EnvMaskSalt)
	if v, ok := envLookup(getenv, EnvHTTPListen); ok {
		c.HTTP.Listen = &v
	}
	c.applyTargetsEnv(getenv)
	c.applyIntegrityEnv(getenv)
	if v := getenv(EnvKafkaSASLPassword); v != "" {
		if c.Kafka.SASL == nil {
			c.Kafka.SASL = &SASL{}
		}
		c.Kafka.SASL.Password = v
	}
	if v := getenv(EnvKafkaBrokers); v != "" {
		c.Kafka.Brokers = nil
		for _, b := range strings.Split(v, ",") {
			if b = strings.TrimSpace(b); b != "" {
				c.Kafka.Brokers = append(c.Kafka.Brokers, b)
			}
		}
	}
}

// readSecretFiles reads the secrets configured as files (an environment
// override wins over a file).
func (c *Config) readSecretFiles(getenv func(string) string) []FieldError {
	var ps []FieldError
	if s := c.Kafka.SASL; s != nil && s.PasswordFile != "" && getenv(EnvKafkaSASLPassword) == "" {
		data, err := os.ReadFile(s.PasswordFile)
		if err != nil {
			ps = append(ps, FieldError{Path: "kafka.sasl.password_file", Msg: err.Error()})
		} else if s.Password = strings.TrimRight(string(data), "\r\n"); s.Password == "" {
			ps = append(ps, FieldError{Path: "kafka.sasl.password_file", Msg: s.PasswordFile + " is empty"})
		}
	}
	return ps
}

// withPassword sets the password of a URL or keyword/value DSN.
func withPassword(dsn, pw string) string {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return dsn
		}
		name := ""
		if u.User != nil {
			name = u.User.Username()
		}
		u.User = url.UserPassword(name, pw)
		return u.String()
	}
	return dsn + " password='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(pw) + "'"
}

func boolPtr(b bool) *bool { return &b }

// ApplyDefaults fills unset fields.
func (c *Config) ApplyDefaults() {
	p := &c.Postgres
	if p.Slot == "" {
		p.Slot = "tidemark"
	}
	if p.Publication == "" {
		p.Publication = "tidemark"
	}
	if p.ManagePublication == nil {
		p.ManagePublication = boolPtr(true)
	}
	if p.Snapshot == "" {
		p.Snapshot = SnapshotInitial
	}
	if p.UnknownTables == "" {
		p.UnknownTables = "skip"
	}
	if c.Snapshot.Incremental == nil {
		c.Snapshot.Incremental = boolPtr(true)
	}
	if c.Snapshot.ChunkSize == 0 {
		c.Snapshot.ChunkSize = 2000
	}
	if c.Snapshot.ChunkBytes == 0 {
		c.Snapshot.ChunkBytes = 8 << 20
	}
	if c.Snapshot.SignalInterval == 0 {
		c.Snapshot.SignalInterval = time.Second
	}
	if c.Snapshot.NewTables == nil {
		c.Snapshot.NewTables = boolPtr(true)
	}
	if p.StandbyInterval == 0 {
		p.StandbyInterval = 10 * time.Second
	}
	if p.SlotCheckInterval == 0 {
		p.SlotCheckInterval = 10 * time.Second
	}
	if p.HeartbeatInterval == nil {
		d := time.Minute
		p.HeartbeatInterval = &d
	}
	// A copy: the caller's slice (shared by configs built from one list)
	// is left as it was.
	p.Tables = slices.Clone(p.Tables)
	for i, t := range p.Tables {
		p.Tables[i] = pipeline.QualifyTable(t)
	}
	if len(p.KeyColumns) > 0 {
		qualified := make(map[string][]string, len(p.KeyColumns))
		for t, cols := range p.KeyColumns {
			qualified[pipeline.QualifyTable(t)] = cols
		}
		p.KeyColumns = qualified
	}
	if len(p.Filters) > 0 {
		qualified := make(map[string]string, len(p.Filters))
		for t, f := range p.Filters {
			qualified[pipeline.QualifyTable(t)] = f
		}
		p.Filters = qualified
	}
	if len(p.Columns) > 0 {
		qualified := make(map[string]ColumnPolicy, len(p.Columns))
		for t, cp := range p.Columns {
			qualified[pipeline.QualifyTable(t)] = cp
		}
		p.Columns = qualified
	}
	if c.HA.Enabled == nil {
		c.HA.Enabled = boolPtr(true)
	}
	if c.HA.Retry == 0 {
		c.HA.Retry = time.Second
	}
	if c.HA.LockTTL == 0 {
		c.HA.LockTTL = max(5*c.HA.Retry, 2*time.Second)
	}
	k := &c.Kafka
	if k.TopicPrefix == "" {
		k.TopicPrefix = "tidemark"
	}
	if k.Partitions == 0 {
		k.Partitions = 6
	}
	if k.ReplicationFactor == 0 {
		k.ReplicationFactor = 1
	}
	if k.Compression == "" {
		k.Compression = "none"
	}
	if k.BatchBytes == 0 {
		k.BatchBytes = 1 << 20
	}
	if k.ClientID == "" {
		k.ClientID = "tidemark"
	}
	pl := &c.Pipeline
	if pl.TableTopics == nil {
		pl.TableTopics = boolPtr(true)
	}
	if pl.TransactionsTopic == nil {
		pl.TransactionsTopic = boolPtr(true)
	}
	if pl.Truncate == "" {
		pl.Truncate = "publish"
	}
	if pl.Format == "" {
		pl.Format = "debezium"
	}
	if len(pl.Formats) > 0 {
		qualified := make(map[string]string, len(pl.Formats))
		for t, f := range pl.Formats {
			qualified[pipeline.QualifyTable(t)] = f
		}
		pl.Formats = qualified
	}
	if k.Tombstones == nil {
		k.Tombstones = boolPtr(true)
	}
	if pl.MaxInFlightMessages == 0 {
		pl.MaxInFlightMessages = 50000
	}
	if pl.MaxInFlightBytes == 0 {
		pl.MaxInFlightBytes = 8 << 20
	}
	if pl.MaxBatchMessages == 0 {
		// The default may not exceed a smaller max_inflight_messages, which
		// Validate would reject although the user did not set it.
		pl.MaxBatchMessages = 4000
		if pl.MaxInFlightMessages > 0 && pl.MaxInFlightMessages < pl.MaxBatchMessages {
			pl.MaxBatchMessages = pl.MaxInFlightMessages
		}
	}
	for i := range pl.EntityStreams {
		for j, t := range pl.EntityStreams[i].Tables {
			pl.EntityStreams[i].Tables[j] = pipeline.QualifyTable(t)
		}
	}
	if inv := c.Invalidation; inv != nil {
		if inv.Group == "" {
			inv.Group = c.Kafka.TopicPrefix + "-invalidation"
		}
		if inv.OnGap == "" {
			inv.OnGap = OnGapFail
		}
		if inv.MaxAttempts == 0 {
			inv.MaxAttempts = 5
		}
		if inv.Topic == nil {
			inv.Topic = boolPtr(true)
		}
		if inv.MaxBacklogBytes == 0 {
			inv.MaxBacklogBytes = 64 << 20
		}
		if inv.WatermarkInterval == 0 {
			inv.WatermarkInterval = time.Second
		}
		for i, r := range inv.Rules {
			inv.Rules[i].Table = pipeline.QualifyTable(r.Table)
		}
		for i, t := range inv.IgnoreTables {
			inv.IgnoreTables[i] = pipeline.QualifyTable(t)
		}
	}
	c.applyTargetsDefaults()
	c.applyIntegrityDefaults()
	if c.HTTP.Listen == nil {
		s := "127.0.0.1:9187"
		c.HTTP.Listen = &s
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "console"
	}
}

var (
	topicRe = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
)

// Validate returns every problem, by field path. It never includes secrets.
func (c *Config) Validate() []FieldError {
	var ps []FieldError
	add := func(path, format string, args ...any) {
		ps = append(ps, FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	p := c.Postgres
	if p.DSN == "" {
		add("postgres.dsn", "required (or set %s)", EnvPostgresDSN)
	} else if err := checkDSN(p.DSN); err != nil {
		add("postgres.dsn", "%v", err)
	}
	if !pipeline.IsIdentifier(p.Slot) || strings.ToLower(p.Slot) != p.Slot {
		add("postgres.slot", "%q is not a valid slot name (lower-case letters, digits, underscores)", p.Slot)
	}
	if !pipeline.IsIdentifier(p.Publication) {
		add("postgres.publication", "%q is not a plain identifier", p.Publication)
	}
	if len(p.Tables) == 0 {
		add("postgres.tables", "required: list the tables to capture, e.g. [public.events]")
	}
	seen := map[string]bool{}
	for i, t := range p.Tables {
		path := fmt.Sprintf("postgres.tables[%d]", i)
		if !pipeline.IsQualifiedTable(t) {
			add(path, "%q is not schema.table", t)
		}
		if seen[t] {
			add(path, "%q is listed twice", t)
		}
		seen[t] = true
	}
	keyTables := make([]string, 0, len(p.KeyColumns))
	for t := range p.KeyColumns {
		keyTables = append(keyTables, t)
	}
	sort.Strings(keyTables)
	for _, t := range keyTables {
		path := "postgres.key_columns." + t
		if !seen[t] {
			add(path, "%q is not in postgres.tables", t)
		}
		cols := p.KeyColumns[t]
		if len(cols) == 0 {
			add(path, "lists no columns")
		}
		dup := map[string]bool{}
		for i, c := range cols {
			if !pipeline.IsIdentifier(c) {
				add(fmt.Sprintf("%s[%d]", path, i), "%q is not a column name", c)
			}
			if dup[c] {
				add(fmt.Sprintf("%s[%d]", path, i), "%q is listed twice", c)
			}
			dup[c] = true
		}
	}
	c.validateColumns(seen, add)
	if c.HA.Retry < 10*time.Millisecond || c.HA.Retry > time.Minute {
		add("ha.retry", "%s is outside 10ms..1m", c.HA.Retry)
	}
	if c.HA.LockTTL < 3*c.HA.Retry {
		add("ha.lock_ttl", "%s must be at least 3 x ha.retry (%s): the leader confirms its lock every retry and may write for half the TTL after a confirmation", c.HA.LockTTL, c.HA.Retry)
	}
	filterTables := slices.Sorted(maps.Keys(p.Filters))
	for _, t := range filterTables {
		path := "postgres.filters." + t
		if !seen[t] {
			add(path, "%q is not in postgres.tables", t)
		}
		if strings.TrimSpace(p.Filters[t]) == "" {
			add(path, "is empty")
		} else if _, err := expr.Parse(p.Filters[t]); err != nil {
			add(path, "%q: %v", p.Filters[t], err)
		}
	}
	switch p.Snapshot {
	case "", SnapshotInitial, SnapshotNever, SnapshotInitialOnly:
	default:
		add("postgres.snapshot", "%q is not one of initial, never, initial_only", p.Snapshot)
	}
	if n := c.Snapshot.ChunkSize; n < 0 || n > 1000000 {
		add("snapshot.chunk_size", "%d is outside 1..1000000", n)
	}
	if n := c.Snapshot.ChunkBytes; n < 0 || (n > 0 && n < 64<<10) || n > 1<<30 {
		add("snapshot.chunk_bytes", "%d is outside 64 KiB..1 GiB", n)
	}
	if c.Snapshot.MaxRowsPerSecond < 0 {
		add("snapshot.max_rows_per_second", "%v is negative (0 means unbounded)", c.Snapshot.MaxRowsPerSecond)
	}
	if d := c.Snapshot.SignalInterval; d < 0 || (d > 0 && d < 10*time.Millisecond) || d > time.Hour {
		add("snapshot.signal_interval", "%s is outside 10ms..1h", d)
	}
	if p.UnknownTables != "" && p.UnknownTables != "skip" && p.UnknownTables != "stop" {
		add("postgres.unknown_tables", "%q is neither skip nor stop", p.UnknownTables)
	}
	if p.StandbyInterval < 100*time.Millisecond || p.StandbyInterval > 60*time.Second {
		add("postgres.standby_interval", "%s is outside 100ms..60s (Postgres' wal_sender_timeout defaults to 60s)", p.StandbyInterval)
	}
	if p.SlotCheckInterval < time.Second || p.SlotCheckInterval > time.Hour {
		add("postgres.slot_check_interval", "%s is outside 1s..1h", p.SlotCheckInterval)
	}
	if h := p.HeartbeatInterval; h != nil && *h != 0 && (*h < time.Second || *h > 24*time.Hour) {
		add("postgres.heartbeat_interval", "%s is outside 1s..24h (0s disables heartbeats)", *h)
	}
	k := c.Kafka
	if len(k.Brokers) == 0 {
		add("kafka.brokers", "required (or set %s)", EnvKafkaBrokers)
	}
	for i, b := range k.Brokers {
		if !strings.Contains(b, ":") {
			add(fmt.Sprintf("kafka.brokers[%d]", i), "%q needs host:port", b)
		}
	}
	if !topicRe.MatchString(k.TopicPrefix) {
		add("kafka.topic_prefix", "%q may only hold letters, digits, '.', '_' and '-'", k.TopicPrefix)
	}
	if k.Partitions < 1 || k.Partitions > 10000 {
		add("kafka.partitions", "%d is outside 1..10000", k.Partitions)
	}
	if k.ReplicationFactor < 1 {
		add("kafka.replication_factor", "%d must be at least 1", k.ReplicationFactor)
	}
	switch k.Compression {
	case "none", "gzip", "snappy", "lz4", "zstd":
	default:
		add("kafka.compression", "%q is not one of none, gzip, snappy, lz4, zstd", k.Compression)
	}
	if k.BatchBytes < 1024 {
		add("kafka.batch_bytes", "%d is below 1024", k.BatchBytes)
	}
	validateTLS("kafka.tls", k.TLS, add)
	if sa := k.SASL; sa.On() {
		if sa.Mechanism == "" {
			add("kafka.sasl.mechanism", "required with kafka.sasl (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
		} else if _, err := kafkanet.Mechanism(sa.Mechanism, "u", "p"); err != nil {
			add("kafka.sasl.mechanism", "%v", err)
		}
		if sa.Username == "" {
			add("kafka.sasl.username", "required with kafka.sasl")
		}
		if sa.Password == "" && sa.PasswordFile == "" {
			add("kafka.sasl.password", "required with kafka.sasl: set password_file or %s", EnvKafkaSASLPassword)
		}
	}
	pl := c.Pipeline
	if pl.MaxInFlightMessages < 1 {
		add("pipeline.max_inflight_messages", "%d must be positive", pl.MaxInFlightMessages)
	}
	if pl.MaxInFlightBytes < 1<<20 {
		add("pipeline.max_inflight_bytes", "%d is below 1 MiB", pl.MaxInFlightBytes)
	}
	if pl.MaxBatchMessages < 1 || pl.MaxBatchMessages > pl.MaxInFlightMessages {
		add("pipeline.max_batch_messages", "%d must be between 1 and max_inflight_messages (%d)", pl.MaxBatchMessages, pl.MaxInFlightMessages)
	}
	if pl.TransactionTopic != "" && (!topicRe.MatchString(pl.TransactionTopic) || len(pl.TransactionTopic) > 249) {
		add("pipeline.transaction_topic", "%q is not a valid Kafka topic name", pl.TransactionTopic)
	}
	if pl.MessageTopic != "" && (!topicRe.MatchString(pl.MessageTopic) || len(pl.MessageTopic) > 249) {
		add("pipeline.message_topic", "%q is not a valid Kafka topic name", pl.MessageTopic)
	}
	switch pl.Truncate {
	case "publish":
	case "skip":
		if c.Targets != nil {
			add("pipeline.truncate", "skip drops the truncates the targets consumer needs (a truncated memberships table must empty its rooms); use publish, and configure readers that reject op \"t\" to drop it (see the README)")
		}
	default:
		add("pipeline.truncate", "%q is not publish or skip", pl.Truncate)
	}
	c.validateFormats(seen, add)
	modes := []struct {
		name string
		vm   pipeline.ValueModes
	}{
		{"json_mode", pipeline.ValueModes{JSON: pl.JSONMode}}, {"decimal_mode", pipeline.ValueModes{Decimal: pl.DecimalMode}},
		{"time_mode", pipeline.ValueModes{Time: pl.TimeMode}}, {"bigint_mode", pipeline.ValueModes{Bigint: pl.BigintMode}},
	}
	for _, m := range modes {
		if err := m.vm.Validate(); err != nil {
			add("pipeline."+m.name, "%s", strings.TrimPrefix(err.Error(), m.name+": "))
		}
	}
	names := map[string]bool{}
	for i, s := range pl.EntityStreams {
		path := fmt.Sprintf("pipeline.entity_streams[%d]", i)
		if !topicRe.MatchString(s.Name) {
			add(path+".name", "%q is not a valid topic suffix", s.Name)
		}
		if names[s.Name] {
			add(path+".name", "%q is used twice", s.Name)
		}
		names[s.Name] = true
		if c.Kafka.TopicPrefix+"."+s.Name == c.RouterConfig("").TransactionsTopicName() {
			add(path+".name", "%q is the transaction-metadata topic's name (pipeline.transaction_topic)", s.Name)
		}
		if !pipeline.IsIdentifier(s.Key) {
			add(path+".key", "%q is not a column name", s.Key)
		}
		if len(s.Tables) == 0 {
			add(path+".tables", "required: at least one table")
		}
		for j, t := range s.Tables {
			if !seen[t] {
				add(fmt.Sprintf("%s.tables[%d]", path, j), "%q is not in postgres.tables", t)
			}
		}
	}
	if inv := c.Invalidation; inv != nil {
		if len(inv.Rules) == 0 {
			add("invalidation.rules", "required: at least one rule")
		}
		for i, r := range inv.Rules {
			if !seen[r.Table] {
				add(fmt.Sprintf("invalidation.rules[%d].table", i), "%q is not in postgres.tables", r.Table)
			}
			if strings.TrimSpace(r.Filter) != "" {
				if _, err := expr.Parse(r.Filter); err != nil {
					add(fmt.Sprintf("invalidation.rules[%d].filter", i), "%q: %v", r.Filter, err)
				}
			}
		}
		for i, st := range inv.Streams {
			if !names[st] {
				add(fmt.Sprintf("invalidation.streams[%d]", i), "%q is not a pipeline.entity_streams name", st)
			}
		}
		c.validateInvalidationTopics(seen, add)
		if inv.MaxAttempts < 1 {
			add("invalidation.max_attempts", "%d must be at least 1", inv.MaxAttempts)
		}
		if inv.MaxBacklogBytes < 1<<20 {
			add("invalidation.max_backlog_bytes", "%d is below 1 MiB (1048576); the default is 64 MiB", inv.MaxBacklogBytes)
		}
		if inv.WatermarkInterval < 10*time.Millisecond || inv.WatermarkInterval > time.Minute {
			add("invalidation.watermark_interval", "%s must be between 10ms and 1m (default 1s; caches following the topic stop caching after 10s without one)", inv.WatermarkInterval)
		}
		if inv.Redis == nil && inv.Webhook == nil && (inv.Topic == nil || !*inv.Topic) {
			add("invalidation", "configures no sink: set redis, webhook or topic: true")
		}
		validateOnGap(inv, add)
		if w := inv.Webhook; w != nil {
			if !strings.HasPrefix(w.URL, "http://") && !strings.HasPrefix(w.URL, "https://") {
				add("invalidation.webhook.url", "must be an http:// or https:// URL")
			}
			if w.Secret == "" {
				add("invalidation.webhook.secret", "required (or set %s)", EnvWebhookSecret)
			}
			if w.BatchSize < 0 || w.MaxAttempts < 0 || w.Timeout < 0 {
				add("invalidation.webhook", "batch_size, max_attempts and timeout must not be negative")
			}
			if w.MaxBackoff < 0 {
				add("invalidation.webhook.max_backoff", "%v must not be negative (0 means the default, 5s)", w.MaxBackoff)
			}
			switch w.OnFailure {
			case "", "dlq":
			case "hold":
				if w.MaxAttempts != 0 {
					add("invalidation.webhook.max_attempts", "%d conflicts with on_failure: hold, which retries without bound; remove max_attempts (it applies to on_failure: dlq)", w.MaxAttempts)
				}
			default:
				add("invalidation.webhook.on_failure", "%q is not hold or dlq", w.OnFailure)
			}
		}
		if inv.Redis != nil && !strings.Contains(inv.Redis.Addr, ":") {
			add("invalidation.redis.addr", "%q needs host:port", inv.Redis.Addr)
		}
		if inv.Redis != nil {
			validateTLS("invalidation.redis.tls", inv.Redis.TLS, add)
			validateRedisMode("invalidation.redis", inv.Redis, inv.Rules, add)
		}
	}
	ps = append(ps, c.validateTargets(seen)...)
	ps = append(ps, c.validateIntegrity(seen)...)
	if t := c.HTTP.AdminToken; t != "" && len([]rune(t)) < 16 {
		add("http.admin_token", "too short: use at least 16 characters (or set %s)", EnvAdminToken)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		add("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "console", "json":
	default:
		add("log.format", "%q is not console or json", c.Log.Format)
	}
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Path < ps[j].Path })
	return ps
}

// checkDSN validates the DSN's shape without echoing it (it may hold a
// password).
func checkDSN(dsn string) error {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return errors.New("not a valid postgres:// URL")
		}
		if strings.TrimPrefix(u.Path, "/") == "" {
			return errors.New("names no database (postgres://user@host:5432/DBNAME)")
		}
		return nil
	}
	if !strings.Contains(dsn, "=") {
		return errors.New("neither a postgres:// URL nor key=value pairs")
	}
	if !strings.Contains(dsn, "dbname=") {
		return errors.New("names no database (dbname=...)")
	}
	return nil
}

var (
	kvPasswordRe    = regexp.MustCompile(`password\s*=\s*('([^'\\]|\\.)*'|\S+)`)
	queryPasswordRe = regexp.MustCompile(`(^|&)password=[^&]*`)
	// userinfoRe matches "scheme://user:" and everything up to the last "@",
	// for URLs too malformed to parse.
	userinfoRe = regexp.MustCompile(`^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:).*@`)
)

// Redact returns dsn with any password replaced by "xxxxx", for display.
// URLs are masked in their user info and in a "password" query parameter
// (libpq accepts both); a URL that does not parse is masked by pattern.
func Redact(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
		u.RawQuery = queryPasswordRe.ReplaceAllString(u.RawQuery, "${1}password=xxxxx")
		return u.String()
	} else if err != nil && strings.Contains(dsn, "://") {
		dsn = userinfoRe.ReplaceAllString(dsn, "${1}xxxxx@")
	}
	return kvPasswordRe.ReplaceAllString(dsn, "password=xxxxx")
}

// validateColumns checks postgres.columns: known tables, column names, a
// column excluded or masked once, sha256 as the only mask, the salt set
// when anything is masked, and no key_columns excluded.
func (c *Config) validateColumns(seen map[string]bool, add func(path, format string, args ...any)) {
	p := c.Postgres
	tables := slices.Sorted(maps.Keys(p.Columns))
	masked := false
	for _, t := range tables {
		path := "postgres.columns." + t
		cp := p.Columns[t]
		if !seen[t] {
			add(path, "%q is not in postgres.tables", t)
		}
		if len(cp.Exclude) == 0 && len(cp.Mask) == 0 {
			add(path, "lists no column to exclude or mask")
		}
		used := map[string]bool{}
		for i, col := range cp.Exclude {
			at := fmt.Sprintf("%s.exclude[%d]", path, i)
			switch {
			case !pipeline.IsIdentifier(col):
				add(at, "%q is not a column name", col)
			case used[col]:
				add(at, "%q is listed twice", col)
			case slices.Contains(p.KeyColumns[t], col):
				add(at, "%q is in postgres.key_columns: a key column cannot be excluded (mask it instead)", col)
			}
			used[col] = true
		}
		cols := slices.Sorted(maps.Keys(cp.Mask))
		for _, col := range cols {
			at := path + ".mask." + col
			switch {
			case !pipeline.IsIdentifier(col):
				add(at, "%q is not a column name", col)
			case used[col]:
				add(at, "%q is also excluded", col)
			case cp.Mask[col] != "sha256":
				add(at, "%q is not a mask (want sha256)", cp.Mask[col])
			}
			masked = true
		}
	}
	if masked && c.MaskSalt == "" {
		add("postgres.columns", "masked columns need a salt: set %s (at least 16 characters, kept secret)", EnvMaskSalt)
	} else if masked && len(c.MaskSalt) < 16 {
		add("postgres.columns", "%s is shorter than 16 characters", EnvMaskSalt)
	}
}

// RowsTables are the captured tables whose table topics use the rows
// format (pipeline.format, pipeline.formats).
func (c *Config) RowsTables() map[string]bool {
	out := map[string]bool{}
	for _, t := range c.Postgres.Tables {
		f := c.Pipeline.Format
		if o, ok := c.Pipeline.Formats[t]; ok {
			f = o
		}
		if f == "rows" {
			out[t] = true
		}
	}
	return out
}

// validateFormats checks pipeline.format and pipeline.formats, and that
// no Tidemark consumer reads a rows-format table topic (they read
// envelopes).
func (c *Config) validateFormats(seen map[string]bool, add func(path, format string, args ...any)) {
	pl := c.Pipeline
	if pl.Format != "" && pl.Format != "debezium" && pl.Format != "rows" {
		add("pipeline.format", "%q is not debezium or rows", pl.Format)
	}
	tables := slices.Sorted(maps.Keys(pl.Formats))
	for _, t := range tables {
		if !seen[t] {
			add("pipeline.formats."+t, "%q is not in postgres.tables", t)
		}
		if f := pl.Formats[t]; f != "debezium" && f != "rows" {
			add("pipeline.formats."+t, "%q is not debezium or rows", f)
		}
	}
	rows := c.RowsTables()
	if len(rows) == 0 {
		return
	}
	readers := map[string][]string{} // table -> the consumers that read its table topic
	if inv := c.Invalidation; inv != nil && len(inv.Streams) == 0 {
		for _, r := range inv.Rules {
			readers[pipeline.QualifyTable(r.Table)] = append(readers[pipeline.QualifyTable(r.Table)], "invalidation")
		}
	}
	if tg := c.Targets; tg != nil {
		m := tg.Mapping()
		m.ApplyDefaults()
		for _, t := range []string{m.Membership.Table, m.Users.Table} {
			readers[t] = append(readers[t], "targets")
		}
	}
	if ig := c.Integrity; ig != nil {
		for _, r := range ig.Rules {
			ts := []string{r.Table}
			if r.Expect != nil {
				ts = append(ts, r.Expect.Table)
			}
			if r.Forbid != nil {
				ts = append(ts, r.Forbid.Table)
			}
			for _, t := range ts {
				readers[pipeline.QualifyTable(t)] = append(readers[pipeline.QualifyTable(t)], "integrity")
			}
		}
	}
	var bad []string
	for t := range rows {
		if rs := readers[t]; len(rs) > 0 {
			bad = append(bad, fmt.Sprintf("%s (read by %s)", t, strings.Join(slices.Compact(rs), ", ")))
		}
	}
	sort.Strings(bad)
	if len(bad) > 0 {
		add("pipeline.formats", "the rows format is for other databases' readers; Tidemark's consumers read envelopes from %s: keep those tables in the debezium format", strings.Join(bad, ", "))
	}
}

// RouterConfig derives the pipeline's routing from the file.
func (c *Config) RouterConfig(database string) pipeline.RouterConfig {
	return pipeline.RouterConfig{
		TopicPrefix:       c.Kafka.TopicPrefix,
		Database:          database,
		EntityStreams:     c.Pipeline.EntityStreams,
		TableTopics:       *c.Pipeline.TableTopics,
		TransactionsTopic: *c.Pipeline.TransactionsTopic,
		TransactionTopic:  c.Pipeline.TransactionTopic,
		Tombstones:        c.Kafka.Tombstones == nil || *c.Kafka.Tombstones,
		SkipTruncates:     c.Pipeline.Truncate == "skip",
		Version:           buildinfo.Version(),
		Columns:           c.columnPolicies(),
		RowsTables:        c.RowsTables(),
		Messages:          c.Pipeline.Messages,
		Filters:           c.rowFilters(),
		MessageTopic:      c.Pipeline.MessageTopic,
		Modes: pipeline.ValueModes{JSON: c.Pipeline.JSONMode, Decimal: c.Pipeline.DecimalMode,
			Time: c.Pipeline.TimeMode, Bigint: c.Pipeline.BigintMode},
	}
}

// exprRowFilter is a postgres.filters condition.
type exprRowFilter struct{ e *expr.Expr }

func (f exprRowFilter) Match(rel *pipeline.Relation, t pipeline.Tuple) (match, known bool) {
	o := f.e.Eval(func(col string) (string, bool, bool) {
		i := rel.ColumnIndex(col)
		if i < 0 || i >= len(t) || t[i].Absent || t[i].Unchanged {
			return "", false, false
		}
		v, ok := pipeline.DatumText(&t[i])
		return v, !ok, true
	})
	switch {
	case o.Definitely():
		return true, true
	case !o.Possibly():
		return false, true
	}
	return false, false
}

func (c *Config) rowFilters() map[string]pipeline.RowFilter {
	if len(c.Postgres.Filters) == 0 {
		return nil
	}
	out := make(map[string]pipeline.RowFilter, len(c.Postgres.Filters))
	for t, s := range c.Postgres.Filters {
		if e, err := expr.Parse(s); err == nil {
			out[t] = exprRowFilter{e}
		}
	}
	return out
}

func (c *Config) columnPolicies() map[string]pipeline.ColumnPolicy {
	if len(c.Postgres.Columns) == 0 {
		return nil
	}
	out := make(map[string]pipeline.ColumnPolicy, len(c.Postgres.Columns))
	for t, cp := range c.Postgres.Columns {
		pc := pipeline.ColumnPolicy{Exclude: cp.Exclude, Salt: c.MaskSalt}
		for col := range cp.Mask {
			pc.Mask = append(pc.Mask, col)
		}
		sort.Strings(pc.Mask)
		out[t] = pc
	}
	return out
}

// validateInvalidationTopics refuses dead rules (a rule on a table that no
// topic the consumer subscribes to carries: it could never run) and
// misplaced invalidation.ignore_tables.
func (c *Config) validateInvalidationTopics(seen map[string]bool, add func(path, format string, args ...any)) {
	inv := c.Invalidation
	streamsOf := map[string][]string{} // table -> entity streams carrying it
	consumed := map[string]bool{}      // tables of invalidation.streams
	for _, s := range c.Pipeline.EntityStreams {
		for _, t := range s.Tables {
			streamsOf[t] = append(streamsOf[t], s.Name)
			for _, name := range inv.Streams {
				consumed[t] = consumed[t] || name == s.Name
			}
		}
	}
	ruled := map[string]bool{}
	for i, r := range inv.Rules {
		ruled[r.Table] = true
		at := fmt.Sprintf("invalidation.rules[%d]", i)
		switch {
		case !seen[r.Table]:
			// reported as not in postgres.tables
		case len(inv.Streams) > 0 && !consumed[r.Table]:
			fix := "remove the rule"
			if len(streamsOf[r.Table]) > 0 {
				fix = fmt.Sprintf("add %s to invalidation.streams, or remove the rule", strings.Join(streamsOf[r.Table], " or "))
			}
			add(at+".table", "%s is carried by none of invalidation.streams %v, so the rule can never run; %s", r.Table, inv.Streams, fix)
		case len(inv.Streams) == 0 && c.Pipeline.TableTopics != nil && !*c.Pipeline.TableTopics && len(streamsOf[r.Table]) > 0:
			add(at+".table", "%s is published only to entity stream(s) %s (pipeline.table_topics: false), and the consumer, without invalidation.streams, reads table topics: the rule can never run; set invalidation.streams: [%s] or pipeline.table_topics: true",
				r.Table, strings.Join(streamsOf[r.Table], ", "), strings.Join(streamsOf[r.Table], ", "))
		}
	}
	for i, t := range inv.IgnoreTables {
		at := fmt.Sprintf("invalidation.ignore_tables[%d]", i)
		switch {
		case len(inv.Streams) == 0:
			add(at, "%q: ignore_tables applies only with invalidation.streams (without them the consumer reads only the rules' tables)", t)
		case ruled[t]:
			add(at, "%q also has an invalidation rule: keep one of the two", t)
		case !consumed[t]:
			add(at, "%q is carried by none of invalidation.streams %v", t, inv.Streams)
		}
	}
}
