package config

import (
	"fmt"
	"time"

	"github.com/tidemark/tidemark/invalidation/integrity"
	"github.com/tidemark/tidemark/pipeline"
)

// EnvIntegrityDSN overrides integrity.dsn.
const EnvIntegrityDSN = "TIDEMARK_INTEGRITY_DSN"

// Integrity configures the integrity consumer: declarative rules that flag
// writes missing their related rows, orphaned rows and columns moving
// backwards.
type Integrity struct {
	// Group is its Kafka consumer group (run one member). Default
	// "<topic_prefix>-integrity".
	Group string `yaml:"group"`
	// Rules to check. Default: the canonical chat schema's rules
	// (integrity.DefaultRules: events need event_json in the same
	// transaction; read_markers.event_id exists in events within 30s;
	// read_markers.stream_ordering is monotonic per (user_id, room_id)).
	Rules []integrity.Rule `yaml:"rules"`
	// DSN of the database holding the violations and the consumer's state
	// (tables in Schema, created when missing). Default postgres.dsn (env
	// TIDEMARK_INTEGRITY_DSN overrides).
	DSN string `yaml:"dsn"`
	// Schema of the violations and state tables. Default "tidemark".
	Schema string `yaml:"schema"`
	// Topic publishes violations to <topic_prefix>.violations (compacted;
	// key: rule and row key). Default true.
	Topic *bool `yaml:"topic"`
	// MaxAttempts before a failing change is dead-lettered. Default 5.
	MaxAttempts int `yaml:"max_attempts"`
	// CheckRate bounds database checks (rows per second, read-only pool of
	// CheckConnections). Default 500.
	CheckRate float64 `yaml:"check_rate"`
	// CheckConnections is the read-only pool's size. Default 2.
	CheckConnections int `yaml:"check_connections"`
	// MaxPending bounds the windowed expectations held. Default 100000.
	MaxPending int `yaml:"max_pending"`
	// MaxOpenTransactions bounds transactions awaiting their END record or
	// changes. Default 50000.
	MaxOpenTransactions int `yaml:"max_open_transactions"`
	// MaxTransactionItems bounds what one transaction holds for its
	// same-transaction rules; a larger one is not decided (counted in
	// tidemark_integrity_dropped_total). Default 10000.
	MaxTransactionItems int `yaml:"max_transaction_items"`
	// MaxKeys bounds monotonic keys in memory (the rest stay in the state
	// table) and related keys remembered per windowed rule. Default 100000.
	MaxKeys int `yaml:"max_keys"`
	// StaleAfter drops a transaction still incomplete when the transactions
	// topic is this far past its commit. Default 10m.
	StaleAfter time.Duration `yaml:"stale_after"`
	// PruneResolvedAfter deletes resolved violations this long after their
	// resolution, once a replay can no longer find them again (below the
	// slot's confirmed position and the group's committed positions);
	// checked every 10m. Default 168h (7 days); negative keeps them.
	PruneResolvedAfter time.Duration `yaml:"prune_resolved_after"`
}

func (c *Config) applyIntegrityEnv(getenv func(string) string) {
	if v := getenv(EnvIntegrityDSN); v != "" && c.Integrity != nil {
		c.Integrity.DSN = v
	}
}

func (c *Config) applyIntegrityDefaults() {
	in := c.Integrity
	if in == nil {
		return
	}
	if in.Group == "" {
		in.Group = c.Kafka.TopicPrefix + "-integrity"
	}
	if len(in.Rules) == 0 {
		in.Rules = integrity.DefaultRules()
	}
	integrity.ApplyDefaults(in.Rules)
	if in.DSN == "" {
		in.DSN = c.Postgres.DSN
	}
	if in.Schema == "" {
		in.Schema = "tidemark"
	}
	if in.Topic == nil {
		in.Topic = boolPtr(true)
	}
	if in.MaxAttempts == 0 {
		in.MaxAttempts = 5
	}
	if in.CheckRate == 0 {
		in.CheckRate = 500
	}
	if in.CheckConnections == 0 {
		in.CheckConnections = 2
	}
	if in.MaxPending == 0 {
		in.MaxPending = 100000
	}
	if in.MaxOpenTransactions == 0 {
		in.MaxOpenTransactions = 50000
	}
	if in.MaxTransactionItems == 0 {
		in.MaxTransactionItems = 10000
	}
	if in.MaxKeys == 0 {
		in.MaxKeys = 100000
	}
	if in.StaleAfter == 0 {
		in.StaleAfter = 10 * time.Minute
	}
	if in.PruneResolvedAfter == 0 {
		in.PruneResolvedAfter = 7 * 24 * time.Hour
	}
}

// validateIntegrity checks the integrity section's shape; captured holds
// postgres.tables. The rules' columns are checked against the database when
// the consumer starts (and by tidemark check).
func (c *Config) validateIntegrity(captured map[string]bool) []FieldError {
	in := c.Integrity
	if in == nil {
		return nil
	}
	var ps []FieldError
	add := func(path, format string, args ...any) {
		ps = append(ps, FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	for _, p := range integrity.Validate("integrity.rules", in.Rules) {
		add(p.Path, "%s", p.Msg)
	}
	inStream := map[string]string{}
	for _, s := range c.Pipeline.EntityStreams {
		for _, t := range s.Tables {
			inStream[t] = s.Name
		}
	}
	sameTx := false
	for i, r := range in.Rules {
		tables := map[string]string{fmt.Sprintf("integrity.rules[%d].table", i): r.Table}
		if r.Expect != nil {
			tables[fmt.Sprintf("integrity.rules[%d].expect.table", i)] = r.Expect.Table
			if r.Within == integrity.SameTransaction {
				sameTx = true
			}
		}
		if r.Forbid != nil {
			tables[fmt.Sprintf("integrity.rules[%d].forbid.table", i)] = r.Forbid.Table
		}
		for path, t := range tables {
			if !captured[t] {
				add(path, "%q is not in postgres.tables (the integrity consumer reads its changes)", t)
			} else if s, ok := inStream[t]; ok && c.Pipeline.TableTopics != nil && !*c.Pipeline.TableTopics {
				add(path, "%q is published only to entity stream %q: the integrity consumer reads table topics (set pipeline.table_topics: true)", t, s)
			}
		}
	}
	if sameTx && c.Pipeline.TransactionsTopic != nil && !*c.Pipeline.TransactionsTopic {
		add("integrity.rules", "same_transaction rules need the transaction-metadata topic: set pipeline.transactions_topic: true")
	}
	if in.DSN == "" {
		add("integrity.dsn", "required (defaults to postgres.dsn)")
	} else if err := checkDSN(in.DSN); err != nil {
		add("integrity.dsn", "%v", err)
	}
	if !pipeline.IsIdentifier(in.Schema) {
		add("integrity.schema", "%q is not a plain identifier", in.Schema)
	}
	for _, t := range c.Postgres.Tables {
		if len(t) > len(in.Schema) && t[:len(in.Schema)+1] == in.Schema+"." {
			add("integrity.schema", "%q holds the captured table %s: keep violations out of captured schemas", in.Schema, t)
		}
	}
	if in.MaxAttempts < 1 {
		add("integrity.max_attempts", "%d must be at least 1", in.MaxAttempts)
	}
	if in.CheckRate <= 0 {
		add("integrity.check_rate", "%v must be positive", in.CheckRate)
	}
	if in.CheckConnections < 1 {
		add("integrity.check_connections", "%d must be at least 1", in.CheckConnections)
	}
	for path, v := range map[string]int{"integrity.max_pending": in.MaxPending, "integrity.max_open_transactions": in.MaxOpenTransactions,
		"integrity.max_keys": in.MaxKeys, "integrity.max_transaction_items": in.MaxTransactionItems} {
		if v < 1 {
			add(path, "%d must be at least 1", v)
		}
	}
	if in.StaleAfter < time.Second {
		add("integrity.stale_after", "%s is below 1s", in.StaleAfter)
	}
	return ps
}
