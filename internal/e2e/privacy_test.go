package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/invalidation"
)

// TestExcludedAndMaskedColumns (issue 17, acceptance 3): an excluded
// column appears in no record, key, header or log line, a masked one only
// as its salted hash, in the initial snapshot, the stream (insert, update,
// delete) and an incremental snapshot alike, and in the dead letters of a
// consumer that fails on every change; every log line at debug level is
// searched.
func TestExcludedAndMaskedColumns(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE accounts (id int PRIMARY KEY, email text NOT NULL, password_hash text NOT NULL, name text)`)
	e.exec(`INSERT INTO accounts SELECT g, 'user' || g || '@example.org', 'HASHSECRET' || g, 'n' || g FROM generate_series(1, 50) g`)
	const salt = "a salt of 16+ chars"
	rd := redistest.ForTest(t)
	cfg := e.config("priv", []string{"public.accounts"}, func(c *config.Config) {
		c.Postgres.Snapshot = config.SnapshotInitial
		c.Postgres.Columns = map[string]config.ColumnPolicy{"public.accounts": {Exclude: []string{"password_hash"}, Mask: map[string]string{"email": "sha256"}}}
		c.MaskSalt = salt
		c.Snapshot.SignalInterval = 50 * time.Millisecond
		// A rule keyed by the excluded column: no record carries it, so
		// every change of accounts is dead-lettered, whole.
		c.Invalidation = &config.Invalidation{Redis: &config.Redis{Addr: rd.Addr()}, MaxAttempts: 1,
			Rules: []invalidation.Rule{{Table: "public.accounts", Keys: []string{"acct:{password_hash}"}, Ops: []string{"c", "r"}}}}
	})
	var logs bytes.Buffer
	enc := zapcore.NewJSONEncoder(zap.NewDevelopmentEncoderConfig())
	log := zap.New(zapcore.NewCore(enc, zapcore.AddSync(&logs), zapcore.DebugLevel))
	r := e.startWith(cfg, log)
	e.startInvalidation(cfg)
	e.exec(`INSERT INTO accounts VALUES (100, 'new@example.org', 'HASHSECRETnew', 'x')`)
	e.exec(`UPDATE accounts SET name = 'y', password_hash = 'HASHSECRETchanged' WHERE id = 100`)
	e.exec(`DELETE FROM accounts WHERE id = 1`)
	ids, err := r.Incremental.Enqueue(t.Context(), capture.SnapshotRequest{Tables: []string{"public.accounts"}})
	if err != nil {
		t.Fatal(err)
	}
	e.waitIncrementalDone(ids[0], 60*time.Second, nil)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	recs := e.readRaw("priv.public.accounts")
	ms := e.read("priv.public.accounts")
	ops := map[string]int{}
	for _, m := range ms {
		ops[m.Env.Op+"/"+m.Env.Source.Snapshot]++
	}
	if ops["r/incremental"] != 50 || ops["c/false"] != 1 || ops["u/false"] != 1 || ops["d/false"] != 1 || ops["r/true"]+ops["r/first"]+ops["r/last"] != 50 {
		t.Errorf("premise: records by op/snapshot %v", ops)
	}
	hash := func(s string) string { h := sha256.Sum256([]byte(salt + "\x00" + s)); return hex.EncodeToString(h[:]) }
	for _, rec := range recs {
		all := string(rec.Key) + string(rec.Value)
		for k, v := range rec.Headers {
			all += k + v
		}
		if strings.Contains(all, "HASHSECRET") || strings.Contains(all, "password_hash") || strings.Contains(all, "@example.org") {
			t.Fatalf("%s/%d@%d leaks: key %s value %s", rec.Topic, rec.Partition, rec.Offset, rec.Key, rec.Value)
		}
	}
	for _, m := range ms {
		if m.Env.After != nil && m.Env.Op != "d" {
			id := string(m.Env.After["id"])
			want := `"` + hash("user"+id+"@example.org") + `"`
			if id == "100" {
				want = `"` + hash("new@example.org") + `"`
			}
			if got := string(m.Env.After["email"]); got != want {
				t.Errorf("id %s (%s %s): email %s, want %s", id, m.Env.Op, m.Env.Source.Snapshot, got, want)
			}
		}
	}
	// Dead letters carry the records as they are in the topic.
	var dead []kafkatest.Record
	waitUntil(t, 30*time.Second, "dead letters of accounts", func() bool {
		d, err := kafkatest.ReadAll(t.Context(), e.kafka.Brokers(), "priv.dlq")
		dead = d
		return err == nil && len(d) >= 50
	})
	for _, rec := range dead {
		all := string(rec.Key) + string(rec.Value)
		for k, v := range rec.Headers {
			all += k + v
		}
		if strings.Contains(all, "HASHSECRET") || strings.Contains(all, "@example.org") {
			t.Fatalf("a dead letter leaks: %s", rec.Value)
		}
	}
	if logs.Len() == 0 {
		t.Fatal("premise: nothing was logged")
	}
	if s := logs.String(); strings.Contains(s, "HASHSECRET") || strings.Contains(s, "@example.org") || strings.Contains(s, salt) {
		t.Errorf("the log leaks an excluded or masked value or the salt")
	}
}
