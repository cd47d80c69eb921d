package config_test

import (
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/pipeline"
)

// clearEnv makes Load independent of the caller's environment.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{config.EnvPostgresDSN, config.EnvPostgresPassword, config.EnvKafkaBrokers} {
		t.Setenv(k, "")
	}
}

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func noEnv(string) string { return "" }

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestLoadGoodConfigAppliesDefaults(t *testing.T) {
	clearEnv(t)
	c, err := config.Load(filepath.Join("testdata", "good.yml"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	listen := "127.0.0.1:9187"
	want := &config.Config{
		Postgres: config.Postgres{
			DSN:               "postgres://tidemark@db.internal:5432/chat?sslmode=require",
			Slot:              "tidemark",
			Publication:       "tidemark",
			ManagePublication: ptr(true), UnknownTables: "skip", Snapshot: "initial",
			Tables:            []string{"public.events", "public.users", "public.room_memberships"},
			StandbyInterval:   10 * time.Second,
			SlotCheckInterval: 10 * time.Second,
			HeartbeatInterval: ptr(time.Minute),
		},
		Kafka: config.Kafka{
			Brokers:           []string{"kafka-1:9092", "kafka-2:9092"},
			TopicPrefix:       "tidemark",
			Partitions:        6,
			ReplicationFactor: 1,
			Compression:       "none",
			BatchBytes:        1 << 20,
			ClientID:          "tidemark",
			Tombstones:        ptr(true),
		},
		Pipeline: config.Pipeline{
			TableTopics:       ptr(true),
			TransactionsTopic: ptr(true),
			Truncate:          "publish",
			Format:            "debezium",
			EntityStreams: []pipeline.EntityStream{
				{Name: "rooms", Key: "room_id", Tables: []string{"public.events", "public.room_memberships"}},
			},
			MaxInFlightMessages: 50000,
			MaxInFlightBytes:    8 << 20,
			MaxBatchMessages:    4000,
		},
		HTTP:     config.HTTP{Listen: &listen},
		Log:      config.Log{Level: "info", Format: "console"},
		Snapshot: config.Snapshot{Incremental: ptr(true), ChunkSize: 2000, ChunkBytes: 8 << 20, SignalInterval: time.Second, NewTables: ptr(true)},
		HA:       config.HA{Enabled: ptr(true), Retry: time.Second, LockTTL: 5 * time.Second},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("Load:\n got %+v\nwant %+v", c, want)
	}
	rc := c.RouterConfig("chat")
	if rc.TopicPrefix != "tidemark" || rc.Database != "chat" || !rc.TableTopics || !rc.TransactionsTopic ||
		!rc.Tombstones || rc.SkipTruncates || rc.TransactionsTopicName() != "tidemark.transaction" ||
		!reflect.DeepEqual(rc.EntityStreams, want.Pipeline.EntityStreams) {
		t.Errorf("RouterConfig = %+v", rc)
	}
}

func TestLoadKeepsExplicitValues(t *testing.T) {
	clearEnv(t)
	c, err := config.Load(filepath.Join("testdata", "explicit.yml"))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"postgres.slot", c.Postgres.Slot, "chat_cdc"},
		{"postgres.publication", c.Postgres.Publication, "chat_pub"},
		{"postgres.manage_publication", *c.Postgres.ManagePublication, false},
		{"postgres.standby_interval", c.Postgres.StandbyInterval, 2 * time.Second},
		{"kafka.topic_prefix", c.Kafka.TopicPrefix, "chat-cdc"},
		{"kafka.partitions", c.Kafka.Partitions, 12},
		{"kafka.replication_factor", c.Kafka.ReplicationFactor, 3},
		{"kafka.compression", c.Kafka.Compression, "zstd"},
		{"kafka.batch_bytes", c.Kafka.BatchBytes, int64(2048)},
		{"kafka.client_id", c.Kafka.ClientID, "chat"},
		{"kafka.topic_configs", c.Kafka.TopicConfigs, map[string]string{"retention.ms": "604800000"}},
		{"pipeline.table_topics", *c.Pipeline.TableTopics, false},
		{"pipeline.transactions_topic", *c.Pipeline.TransactionsTopic, false},
		{"pipeline.max_inflight_messages", c.Pipeline.MaxInFlightMessages, 500},
		{"pipeline.max_inflight_bytes", c.Pipeline.MaxInFlightBytes, int64(2 << 20)},
		{"pipeline.max_batch_messages", c.Pipeline.MaxBatchMessages, 50},
		{"http.listen (empty disables)", *c.HTTP.Listen, ""},
		{"log.level", c.Log.Level, "debug"},
		{"log.format", c.Log.Format, "json"},
	}
	for _, ch := range checks {
		if !reflect.DeepEqual(ch.got, ch.want) {
			t.Errorf("%s = %#v, want %#v", ch.name, ch.got, ch.want)
		}
	}
}

// TestLoadExampleConfig keeps the shipped example loadable.
func TestLoadExampleConfig(t *testing.T) {
	clearEnv(t)
	path := filepath.Join("..", "..", "deploy", "tidemark.example.yml")
	if _, err := os.Stat(path); err != nil {
		t.Skipf("no example config: %v", err)
	}
	if _, err := config.Load(path); err != nil {
		t.Errorf("the example config does not load: %v", err)
	}
}

// TestBadConfigs: each testdata/*.bad.yml with the problems it must report
// (prometheus config/config_test.go style). Every expected string must
// appear in the error; when paths is set, the problems are exactly those.
func TestBadConfigs(t *testing.T) {
	cases := []struct {
		file  string
		errs  []string
		paths []string
	}{
		{
			file: "tables.bad.yml",
			errs: []string{
				`postgres.tables[1]: "public.a.b" is not schema.table`,
				`postgres.tables[2]: "public.events" is listed twice`,
				`postgres.tables[3]: "1users" is not schema.table`,
			},
			paths: []string{"postgres.tables[1]", "postgres.tables[2]", "postgres.tables[3]"},
		},
		{
			file: "key_columns.bad.yml",
			errs: []string{
				`postgres.key_columns.public.events: lists no columns`,
				`postgres.key_columns.public.missing: "public.missing" is not in postgres.tables`,
				`postgres.key_columns.public.read_markers[1]: "room id" is not a column name`,
				`postgres.key_columns.public.read_markers[2]: "user_id" is listed twice`,
			},
			paths: []string{"postgres.key_columns.public.events", "postgres.key_columns.public.missing",
				"postgres.key_columns.public.read_markers[1]", "postgres.key_columns.public.read_markers[2]"},
		},
		{
			file:  "unknown_tables.bad.yml",
			errs:  []string{`postgres.unknown_tables: "ignore" is neither skip nor stop`},
			paths: []string{"postgres.unknown_tables"},
		},
		{
			file:  "filter.bad.yml",
			errs:  []string{`invalidation.rules[0].filter: "type = 'm.room.member' AND": at offset 26: expected a column, NOT or '(', found the end`},
			paths: []string{"invalidation.rules[0].filter"},
		},
		{
			file:  "snapshot.bad.yml",
			errs:  []string{`postgres.snapshot: "always" is not one of initial, never, initial_only`},
			paths: []string{"postgres.snapshot"},
		},
		{
			file:  "compression.bad.yml",
			errs:  []string{`kafka.compression: "brotli" is not one of none, gzip, snappy, lz4, zstd`},
			paths: []string{"kafka.compression"},
		},
		{
			file:  "stream_table.bad.yml",
			errs:  []string{`pipeline.entity_streams[0].tables[0]: "public.rooms" is not in postgres.tables`},
			paths: []string{"pipeline.entity_streams[0].tables[0]"},
		},
		{
			file: "columns.bad.yml",
			errs: []string{
				`postgres.columns.public.users.exclude[1]: "name" is in postgres.key_columns: a key column cannot be excluded (mask it instead)`,
				`postgres.columns.public.users.exclude[2]: "bad col" is not a column name`,
				`postgres.columns.public.users.exclude[3]: "password_hash" is listed twice`,
				`postgres.columns.public.users.mask.email: "md5" is not a mask (want sha256)`,
				`postgres.columns.public.users.mask.password_hash: "password_hash" is also excluded`,
				`postgres.columns.public.rooms: "public.rooms" is not in postgres.tables`,
				`postgres.columns.public.users_empty: lists no column to exclude or mask`,
				`postgres.columns: masked columns need a salt: set TIDEMARK_MASK_SALT`,
			},
			paths: []string{"postgres.columns", "postgres.columns.public.rooms", "postgres.columns.public.users.exclude[1]",
				"postgres.columns.public.users.exclude[2]", "postgres.columns.public.users.exclude[3]",
				"postgres.columns.public.users.mask.email", "postgres.columns.public.users.mask.password_hash",
				"postgres.columns.public.users_empty", "postgres.columns.public.users_empty"},
		},
		{
			file: "formats.bad.yml",
			errs: []string{
				`pipeline.format: "columns" is not debezium or rows`,
				`pipeline.formats.public.nope: "public.nope" is not in postgres.tables`,
				`pipeline.formats.public.users: "flat" is not debezium or rows`,
				`pipeline.formats: the rows format is for other databases' readers; Tidemark's consumers read envelopes from public.room_memberships (read by targets): keep those tables in the debezium format`,
			},
			paths: []string{"pipeline.format", "pipeline.formats", "pipeline.formats.public.nope", "pipeline.formats.public.users"},
		},
		{
			file: "records.bad.yml",
			errs: []string{
				`pipeline.truncate: "sometimes" is not publish or skip`,
				`pipeline.transaction_topic: "bad/name" is not a valid Kafka topic name`,
				`pipeline.json_mode: "text" is not one of embed, string`,
				`pipeline.decimal_mode: "precise" is not one of number, string, precise-string, double`,
				`pipeline.time_mode: "nanos" is not one of iso, micros`,
				`pipeline.bigint_mode: "float" is not one of number, string`,
			},
			paths: []string{"pipeline.bigint_mode", "pipeline.decimal_mode", "pipeline.json_mode", "pipeline.time_mode", "pipeline.transaction_topic", "pipeline.truncate"},
		},
		{
			file:  "truncate_skip_targets.bad.yml",
			errs:  []string{`pipeline.truncate: skip drops the truncates the targets consumer needs`},
			paths: []string{"pipeline.truncate"},
		},
		{
			file: "stream_names.bad.yml",
			errs: []string{
				`pipeline.entity_streams[0].key: "room id" is not a column name`,
				`pipeline.entity_streams[1].name: "rooms" is used twice`,
				`pipeline.entity_streams[2].name: "transaction" is the transaction-metadata topic's name`,
				`pipeline.entity_streams[2].tables: required`,
				`pipeline.entity_streams[3].name: "bad/name" is not a valid topic suffix`,
			},
			paths: []string{
				"pipeline.entity_streams[0].key", "pipeline.entity_streams[1].name", "pipeline.entity_streams[2].name",
				"pipeline.entity_streams[2].tables", "pipeline.entity_streams[3].name",
			},
		},
		{
			file: "unknown_field.bad.yml",
			errs: []string{"\n  - yaml: line 6: field brokerz not found in type config.Kafka"},
		},
		{
			file: "type.bad.yml",
			errs: []string{"\n  - yaml: line 6: cannot unmarshal !!str (value hidden) into int"},
		},
		{
			file: "syntax.bad.yml",
			errs: []string{"\n  - yaml: line 1: did not find expected key"},
		},
		{
			file: "missing.bad.yml",
			errs: []string{
				"postgres.dsn: required (or set TIDEMARK_POSTGRES_DSN)",
				"postgres.tables: required",
				"kafka.brokers: required (or set TIDEMARK_KAFKA_BROKERS)",
			},
			paths: []string{"kafka.brokers", "postgres.dsn", "postgres.tables"},
		},
		{
			file:  "dsn_no_database.bad.yml",
			errs:  []string{"postgres.dsn: names no database"},
			paths: []string{"postgres.dsn"},
		},
		{
			file:  "dsn_kv_no_database.bad.yml",
			errs:  []string{"postgres.dsn: names no database (dbname=...)"},
			paths: []string{"postgres.dsn"},
		},
		{
			file:  "dsn_garbage.bad.yml",
			errs:  []string{"postgres.dsn: neither a postgres:// URL nor key=value pairs"},
			paths: []string{"postgres.dsn"},
		},
		{
			file: "identifiers.bad.yml",
			errs: []string{
				`postgres.slot: "Tidemark" is not a valid slot name`,
				`postgres.publication: "my-pub" is not a plain identifier`,
				`kafka.topic_prefix: "tide mark"`,
			},
			paths: []string{"kafka.topic_prefix", "postgres.publication", "postgres.slot"},
		},
		{
			file:  "standby.bad.yml",
			errs:  []string{"postgres.standby_interval: 50ms is outside 100ms..60s"},
			paths: []string{"postgres.standby_interval"},
		},
		{
			file: "slotwatch.bad.yml",
			errs: []string{"postgres.slot_check_interval: 500ms is outside 1s..1h",
				"postgres.heartbeat_interval: 200ms is outside 1s..24h (0s disables heartbeats)"},
			paths: []string{"postgres.heartbeat_interval", "postgres.slot_check_interval"},
		},
		{
			file:  "watermark.bad.yml",
			errs:  []string{"invalidation.watermark_interval: 5ms must be between 10ms and 1m (default 1s"},
			paths: []string{"invalidation.watermark_interval"},
		},
		{
			file:  "brokers.bad.yml",
			errs:  []string{`kafka.brokers[1]: "kafka-2" needs host:port`},
			paths: []string{"kafka.brokers[1]"},
		},
		{
			file:  "webhook_hold.bad.yml",
			errs:  []string{"invalidation.webhook.max_attempts: 3 conflicts with on_failure: hold"},
			paths: []string{"invalidation.webhook.max_attempts"},
		},
		{
			file:  "webhook_on_failure.bad.yml",
			errs:  []string{`invalidation.webhook.on_failure: "drop" is not hold or dlq`},
			paths: []string{"invalidation.webhook.on_failure"},
		},
		{
			file: "limits.bad.yml",
			errs: []string{
				"kafka.partitions: 20000 is outside 1..10000",
				"kafka.replication_factor: -1 must be at least 1",
				"kafka.batch_bytes: 100 is below 1024",
				"pipeline.max_inflight_bytes: 1000 is below 1 MiB",
				"pipeline.max_batch_messages: 200 must be between 1 and max_inflight_messages (100)",
			},
			paths: []string{"kafka.batch_bytes", "kafka.partitions", "kafka.replication_factor",
				"pipeline.max_batch_messages", "pipeline.max_inflight_bytes"},
		},
		{
			file:  "log.bad.yml",
			errs:  []string{`log.level: "trace"`, `log.format: "xml"`},
			paths: []string{"log.format", "log.level"},
		},
		{
			file: "invalidation_streams.bad.yml",
			errs: []string{
				`invalidation.rules[2].table: public.read_markers is carried by none of invalidation.streams [rooms], so the rule can never run; add markers to invalidation.streams, or remove the rule`,
				`invalidation.rules[3].table: public.users is carried by none of invalidation.streams [rooms], so the rule can never run; remove the rule`,
				`invalidation.ignore_tables[1]: "public.users" also has an invalidation rule`,
				`invalidation.ignore_tables[2]: "public.room_memberships" also has an invalidation rule`,
			},
			paths: []string{"invalidation.ignore_tables[1]", "invalidation.ignore_tables[2]", "invalidation.rules[2].table", "invalidation.rules[3].table"},
		},
		{
			file: "invalidation_table_topics.bad.yml",
			errs: []string{
				`invalidation.rules[0].table: public.room_memberships is published only to entity stream(s) rooms (pipeline.table_topics: false)`,
				`set invalidation.streams: [rooms] or pipeline.table_topics: true`,
				`invalidation.ignore_tables[0]: "public.read_markers": ignore_tables applies only with invalidation.streams`,
			},
			paths: []string{"invalidation.ignore_tables[0]", "invalidation.rules[0].table"},
		},
		{
			file: "many.bad.yml",
			errs: []string{"9 problem(s)"},
			paths: []string{
				"kafka.brokers", "kafka.compression", "log.format", "pipeline.entity_streams[0].tables[0]",
				"pipeline.max_batch_messages", "pipeline.max_inflight_messages", "postgres.dsn", "postgres.slot",
				"postgres.tables[1]",
			},
		},
	}
	clearEnv(t)
	covered := map[string]bool{}
	for _, tc := range cases {
		covered[tc.file] = true
		t.Run(tc.file, func(t *testing.T) {
			path := filepath.Join("testdata", tc.file)
			c, err := config.Load(path)
			if err == nil {
				t.Fatalf("Load accepted %s: %+v", tc.file, c)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "invalid config "+path) {
				t.Errorf("error does not name the file: %q", msg)
			}
			for _, want := range tc.errs {
				if !strings.Contains(msg, want) {
					t.Errorf("error lacks %q:\n%s", want, msg)
				}
			}
			if got := problemPaths(t, err); tc.paths != nil && !slices.Equal(got, tc.paths) {
				t.Errorf("problem paths %q, want %q (all problems, sorted):\n%s", got, tc.paths, msg)
			}
		})
	}
	files, err := filepath.Glob(filepath.Join("testdata", "*.bad.yml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !covered[filepath.Base(f)] {
			t.Errorf("%s has no entry in the table", f)
		}
	}
}

func TestEnvOverrides(t *testing.T) {
	good := readFile(t, "good.yml")
	noSecrets := []byte(`
postgres:
  tables: [public.events]
`)
	kv := []byte(`
postgres:
  dsn: "host=db dbname=chat user=app"
  tables: [public.events]
kafka:
  brokers: ["file:9092"]
`)
	cases := []struct {
		name        string
		file        []byte
		env         map[string]string
		wantDSN     func(t *testing.T, dsn string)
		wantBrokers []string
	}{
		{
			name: "no environment keeps the file",
			file: good,
			wantDSN: func(t *testing.T, dsn string) {
				if dsn != "postgres://tidemark@db.internal:5432/chat?sslmode=require" {
					t.Errorf("dsn = %q", dsn)
				}
			},
			wantBrokers: []string{"kafka-1:9092", "kafka-2:9092"},
		},
		{
			name: "DSN and brokers from the environment fill a file without them",
			file: noSecrets,
			env: map[string]string{
				config.EnvPostgresDSN:  "postgres://envuser@envdb:5432/envchat",
				config.EnvKafkaBrokers: " a:9092, b:9092,,",
			},
			wantDSN: func(t *testing.T, dsn string) {
				if dsn != "postgres://envuser@envdb:5432/envchat" {
					t.Errorf("dsn = %q", dsn)
				}
			},
			wantBrokers: []string{"a:9092", "b:9092"},
		},
		{
			name: "environment overrides the file",
			file: good,
			env: map[string]string{
				config.EnvPostgresDSN:  "postgres://envuser@envdb:5432/envchat",
				config.EnvKafkaBrokers: "c:9092",
			},
			wantDSN: func(t *testing.T, dsn string) {
				if dsn != "postgres://envuser@envdb:5432/envchat" {
					t.Errorf("dsn = %q", dsn)
				}
			},
			wantBrokers: []string{"c:9092"},
		},
		{
			name: "password into a URL DSN",
			file: good,
			env:  map[string]string{config.EnvPostgresPassword: "p@ss w/rd:"},
			wantDSN: func(t *testing.T, dsn string) {
				u, err := url.Parse(dsn)
				if err != nil {
					t.Fatalf("dsn %q: %v", dsn, err)
				}
				pw, ok := u.User.Password()
				if !ok || pw != "p@ss w/rd:" || u.User.Username() != "tidemark" || u.Host != "db.internal:5432" ||
					u.Path != "/chat" || u.Query().Get("sslmode") != "require" {
					t.Errorf("dsn = %q: password %q (%v), want the file's DSN with the password set", dsn, pw, ok)
				}
			},
			wantBrokers: []string{"kafka-1:9092", "kafka-2:9092"},
		},
		{
			name: "password into the environment's DSN",
			file: noSecrets,
			env: map[string]string{
				config.EnvPostgresDSN:      "postgres://envuser@envdb:5432/envchat",
				config.EnvPostgresPassword: "pw",
				config.EnvKafkaBrokers:     "a:9092",
			},
			wantDSN: func(t *testing.T, dsn string) {
				if dsn != "postgres://envuser:pw@envdb:5432/envchat" {
					t.Errorf("dsn = %q", dsn)
				}
			},
			wantBrokers: []string{"a:9092"},
		},
		{
			name: "password into a key=value DSN, quoted",
			file: kv,
			env:  map[string]string{config.EnvPostgresPassword: `it's a \ secret`},
			wantDSN: func(t *testing.T, dsn string) {
				if want := `host=db dbname=chat user=app password='it\'s a \\ secret'`; dsn != want {
					t.Errorf("dsn = %q, want %q", dsn, want)
				}
			},
			wantBrokers: []string{"file:9092"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.Parse("test.yml", tc.file, env(tc.env))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			tc.wantDSN(t, c.Postgres.DSN)
			if !slices.Equal(c.Kafka.Brokers, tc.wantBrokers) {
				t.Errorf("brokers = %q, want %q", c.Kafka.Brokers, tc.wantBrokers)
			}
		})
	}
}

// TestErrorsNeverShowThePassword: whatever else is wrong, the error text
// carries no form of the password.
func TestErrorsNeverShowThePassword(t *testing.T) {
	const secret = "Zx9-s3cret/pw@"
	escaped := []string{secret, url.QueryEscape(secret), url.PathEscape(secret), url.UserPassword("u", secret).String()}
	cases := []struct {
		name string
		file string
		env  map[string]string
	}{
		{
			name: "URL DSN with password and a bad compression",
			file: "postgres:\n  dsn: \"postgres://app:" + url.PathEscape(secret) + "@db:5432/chat\"\n  tables: [public.events]\n" +
				"kafka:\n  brokers: [\"k:9092\"]\n  compression: brotli\n",
		},
		{
			name: "URL DSN with password and no database",
			file: "postgres:\n  dsn: \"postgres://app:" + url.PathEscape(secret) + "@db:5432/\"\n  tables: [public.events]\n" +
				"kafka:\n  brokers: [\"k:9092\"]\n",
		},
		{
			name: "unparsable URL DSN with password",
			file: "postgres:\n  dsn: \"postgres://app:" + secret + "%zz@db:5432/chat\"\n  tables: [public.events]\n" +
				"kafka:\n  brokers: [\"k:9092\"]\n",
		},
		{
			name: "key=value DSN with password and no database",
			file: "postgres:\n  dsn: \"host=db password='" + secret + "'\"\n  tables: [public.events]\nkafka:\n  brokers: [\"k:9092\"]\n",
		},
		{
			name: "password from the environment and a bad table",
			file: "postgres:\n  dsn: \"postgres://app@db:5432/chat\"\n  tables: [\"not a table\"]\nkafka:\n  brokers: [\"k:9092\"]\n",
			env:  map[string]string{config.EnvPostgresPassword: secret},
		},
		{
			name: "password from the environment into a DSN without database",
			file: "postgres:\n  dsn: \"host=db\"\n  tables: [public.events]\nkafka:\n  brokers: [\"k:9092\"]\n",
			env:  map[string]string{config.EnvPostgresPassword: secret},
		},
		{
			name: "DSN from the environment and an unknown field",
			file: "postgres:\n  tables: [public.events]\n  colour: blue\nkafka:\n  brokers: [\"k:9092\"]\n",
			env:  map[string]string{config.EnvPostgresDSN: "postgres://app:" + url.PathEscape(secret) + "@db:5432/chat"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := config.Parse("test.yml", []byte(tc.file), env(tc.env))
			if err == nil {
				t.Fatal("Parse accepted the file")
			}
			for _, s := range escaped {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error shows the password (%q):\n%s", s, err)
				}
			}
		})
	}
}

func TestRedact(t *testing.T) {
	cases := []struct {
		name    string
		dsn     string
		want    string   // exact result when set
		secrets []string // must not appear
	}{
		{"URL with password", "postgres://app:s3cret@db:5432/chat?sslmode=require",
			"postgres://app:xxxxx@db:5432/chat?sslmode=require", []string{"s3cret"}},
		{"postgresql URL with escaped password", "postgresql://app:p%40ss%2Fw@db/chat", "postgresql://app:xxxxx@db/chat",
			[]string{"p%40ss", "p@ss"}},
		{"URL without password unchanged", "postgres://app@db:5432/chat", "postgres://app@db:5432/chat", nil},
		{"URL without user unchanged", "postgres://db:5432/chat", "postgres://db:5432/chat", nil},
		{"URL with password in the query", "postgres://app@db:5432/chat?password=s3cret&sslmode=require", "",
			[]string{"s3cret"}},
		{"unparsable URL with password", "postgres://app:s3cret%zz@db:5432/chat", "", []string{"s3cret"}},
		{"key=value", "host=db user=app password=s3cret dbname=chat", "host=db user=app password=xxxxx dbname=chat",
			[]string{"s3cret"}},
		{"key=value quoted with spaces and escapes", `host=db password='s3 c\'ret' dbname=chat`,
			"host=db password=xxxxx dbname=chat", []string{"s3", "ret"}},
		{"key=value spaced equals", "host=db password = s3cret dbname=chat", "host=db password=xxxxx dbname=chat",
			[]string{"s3cret"}},
		{"key=value without password unchanged", "host=db dbname=chat", "host=db dbname=chat", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := config.Redact(tc.dsn)
			if tc.want != "" && got != tc.want {
				t.Errorf("Redact(%q) = %q, want %q", tc.dsn, got, tc.want)
			}
			for _, s := range tc.secrets {
				if strings.Contains(got, s) {
					t.Errorf("Redact(%q) = %q still shows %q", tc.dsn, got, s)
				}
			}
		})
	}
}

// TestRedactEnvPassword: a DSN built from TIDEMARK_POSTGRES_PASSWORD redacts
// cleanly in both DSN forms.
func TestRedactEnvPassword(t *testing.T) {
	const secret = `it's "hard" \ to guess`
	for _, dsn := range []string{"postgres://app@db:5432/chat", "host=db dbname=chat user=app"} {
		file := "postgres:\n  dsn: \"" + dsn + "\"\n  tables: [public.events]\nkafka:\n  brokers: [\"k:9092\"]\n"
		c, err := config.Parse("test.yml", []byte(file), env(map[string]string{config.EnvPostgresPassword: secret}))
		if err != nil {
			t.Fatalf("Parse: %v", err)
		}
		got := config.Redact(c.Postgres.DSN)
		for _, s := range []string{"hard", "guess", url.PathEscape(secret)} {
			if strings.Contains(got, s) {
				t.Errorf("Redact(%q) = %q shows %q", c.Postgres.DSN, got, s)
			}
		}
		if !strings.Contains(got, "xxxxx") {
			t.Errorf("Redact(%q) = %q: no mask", c.Postgres.DSN, got)
		}
	}
}

func TestParseEmptyFile(t *testing.T) {
	_, err := config.Parse("empty.yml", nil, noEnv)
	var ce *config.Error
	if !errors.As(err, &ce) {
		t.Fatalf("Parse(empty) = %v, want *config.Error listing the required fields", err)
	}
	for _, p := range []string{"postgres.dsn", "postgres.tables", "kafka.brokers"} {
		if !strings.Contains(err.Error(), p+": required") {
			t.Errorf("error lacks %s: %v", p, err)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// problemPaths returns the field paths of err, which must be a
// *config.Error.
func problemPaths(t *testing.T, err error) []string {
	t.Helper()
	var ce *config.Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T), want *config.Error", err, err)
	}
	var paths []string
	for _, p := range ce.Problems {
		paths = append(paths, p.Path)
	}
	return paths
}

// TestDefaultBatchFitsInFlight: lowering max_inflight_messages alone must not
// make the default max_batch_messages invalid.
func TestDefaultBatchFitsInFlight(t *testing.T) {
	cases := []struct {
		inflight, batch string
		wantBatch       int
	}{
		{"100", "", 100},
		{"20000", "", 4000},
		{"", "", 4000},
		{"100", "30", 30},
	}
	for _, tc := range cases {
		file := "postgres:\n  dsn: \"postgres://app@db:5432/chat\"\n  tables: [public.events]\nkafka:\n  brokers: [\"k:9092\"]\npipeline:\n"
		if tc.inflight != "" {
			file += "  max_inflight_messages: " + tc.inflight + "\n"
		}
		if tc.batch != "" {
			file += "  max_batch_messages: " + tc.batch + "\n"
		}
		c, err := config.Parse("test.yml", []byte(file), noEnv)
		if err != nil {
			t.Errorf("inflight=%q batch=%q: %v", tc.inflight, tc.batch, err)
			continue
		}
		if c.Pipeline.MaxBatchMessages != tc.wantBatch {
			t.Errorf("inflight=%q batch=%q: max_batch_messages = %d, want %d", tc.inflight, tc.batch, c.Pipeline.MaxBatchMessages, tc.wantBatch)
		}
	}
}

// heartbeat_interval: 0s disables heartbeats (it is not replaced by the
// default, unlike an absent field).
func TestHeartbeatZeroDisables(t *testing.T) {
	c, err := config.Parse("hb.yml", []byte("postgres:\n  dsn: postgres://u@h/db\n  heartbeat_interval: 0s\n  tables: [public.t]\nkafka:\n  brokers: [\"k:9092\"]\n"),
		func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if c.Postgres.HeartbeatInterval == nil || *c.Postgres.HeartbeatInterval != 0 {
		t.Fatalf("heartbeat_interval 0s became %v", c.Postgres.HeartbeatInterval)
	}
}

// TestHTTPListenEnv: TIDEMARK_HTTP_LISTEN overrides http.listen; "none"
// disables the listener.
func TestHTTPListenEnv(t *testing.T) {
	for env, want := range map[string]string{"0.0.0.0:9190": "0.0.0.0:9190", "none": "", "": "127.0.0.1:9187"} {
		c := &config.Config{}
		c.ApplyEnv(func(k string) string {
			if k == config.EnvHTTPListen {
				return env
			}
			return ""
		})
		c.ApplyDefaults()
		if got := *c.HTTP.Listen; got != want {
			t.Errorf("TIDEMARK_HTTP_LISTEN=%q: http.listen %q, want %q", env, got, want)
		}
	}
}
