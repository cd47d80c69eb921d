package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tidemark/tidemark/internal/config"
)

// TestKeysOfTablesWithoutPrimaryKey: tables without a primary key are keyed
// by postgres.key_columns, else their replica identity index, else a unique
// index over NOT NULL columns, so that an update of another column is one
// "u" record under the insert's key, in its partition; a table with none of
// these is keyed by its whole row, and `tidemark check` warns about it. A
// primary key that is not the replica identity index: deletes are keyed by
// the identity (which they carry), in the insert's partition, and the
// primary key is absent from their before image, not a false null.
func TestKeysOfTablesWithoutPrimaryKey(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE uniq (a int NOT NULL, b text, UNIQUE (a));
ALTER TABLE uniq REPLICA IDENTITY FULL;
CREATE TABLE cfgkey (a int, b text);
ALTER TABLE cfgkey REPLICA IDENTITY FULL;
CREATE TABLE wholerow (a int, b text);
ALTER TABLE wholerow REPLICA IDENTITY FULL;
CREATE TABLE pkid (id int PRIMARY KEY, code text NOT NULL, body text);
CREATE UNIQUE INDEX pkid_code ON pkid (code);
ALTER TABLE pkid REPLICA IDENTITY USING INDEX pkid_code`)
	tables := []string{"public.uniq", "public.cfgkey", "public.wholerow", "public.pkid"}
	cfg := e.config("keys", tables, func(c *config.Config) {
		c.Postgres.KeyColumns = map[string][]string{"public.cfgkey": {"a"}}
	})
	e.start(cfg)
	e.exec(`INSERT INTO uniq VALUES (1, 'x'); INSERT INTO cfgkey VALUES (1, 'x'); INSERT INTO wholerow VALUES (1, 'x');
INSERT INTO pkid VALUES (7, 'seven', 'x')`)
	e.exec(`UPDATE uniq SET b = 'y'; UPDATE cfgkey SET b = 'y'; UPDATE wholerow SET b = 'y'; DELETE FROM pkid`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)

	ops := func(ms []msg) string {
		var s []string
		for _, m := range ms {
			s = append(s, m.Env.Op)
		}
		return strings.Join(s, "")
	}
	sameKeyAndPartition := func(topic string, ms []msg, wantKey string) {
		t.Helper()
		for _, m := range ms {
			if string(m.Key) != wantKey || m.Partition != ms[0].Partition {
				t.Errorf("%s/%d@%d (%s): key %s, want %s in partition %d", topic, m.Partition, m.Offset, m.Env.Op, m.Key, wantKey, ms[0].Partition)
			}
		}
	}
	for _, tb := range []string{"uniq", "cfgkey"} {
		topic := "keys.public." + tb
		ms := byPosition(e.read(topic))
		if got := ops(ms); got != "cu" {
			t.Errorf("%s: ops %q, want an insert and one update (cu)", topic, got)
		}
		sameKeyAndPartition(topic, ms, `{"a":1}`)
	}
	if got := ops(byPosition(e.read("keys.public.wholerow"))); got != "cdc" {
		t.Errorf("keys.public.wholerow: ops %q, want the update as a delete and an insert (cdc): keyed by the whole row", got)
	}
	ms := byPosition(e.read("keys.public.pkid"))
	if got := ops(ms); got != "cd" {
		t.Fatalf("keys.public.pkid: ops %q, want cd", got)
	}
	sameKeyAndPartition("keys.public.pkid", ms, `{"code":"seven"}`)
	if _, ok := ms[1].Env.Before["id"]; ok {
		t.Errorf("the delete's before image has id %s, but the replica identity does not carry it: it must be absent", ms[1].Env.Before["id"])
	}
	var code string
	if err := json.Unmarshal(ms[1].Env.Before["code"], &code); err != nil || code != "seven" {
		t.Errorf("the delete's before image: code %s (%v), want seven", ms[1].Env.Before["code"], err)
	}

	// tidemark check says how each table is keyed, and warns about the
	// whole-row one (a warning, not a problem: exit 0).
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keys.yml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary(t), "check", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) || err != nil {
		t.Fatalf("check: %v\n%s", err, out)
	}
	for _, want := range []string{
		"key (a) from the unique index uniq_a_key",
		"key (a) from the postgres.key_columns",
		"key (code) from the replica identity index",
		"warning: public.wholerow: keyed by its whole row",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("check output lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(string(out), "warning:") != 1 {
		t.Errorf("check output has other warnings:\n%s", out)
	}
}

// byPosition sorts ms by position.
func byPosition(ms []msg) []msg {
	sort.Slice(ms, func(i, j int) bool { return ms[i].Pos.Less(ms[j].Pos) })
	return ms
}

// TestKeyColumnRenamed: a key column renamed while running never yields
// keyless messages. A table keyed by its replica identity (here its
// primary key) goes on keyed by the identity columns under their new name,
// with one warning; a table keyed by a unique index under REPLICA IDENTITY
// FULL stops capture with an error naming the table and the column, and
// the slot stays before the change.
func TestKeyColumnRenamed(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE rk (id int PRIMARY KEY, body text);
CREATE TABLE rkfull (a int NOT NULL UNIQUE, b text);
ALTER TABLE rkfull REPLICA IDENTITY FULL`)
	cfg := e.config("rk", []string{"public.rk", "public.rkfull"}, nil)
	r, logs := e.startObserved(cfg)
	e.exec(`INSERT INTO rk VALUES (1, 'x'); INSERT INTO rkfull VALUES (1, 'x')`)
	e.waitRecords("rk.public.rk", 1, 20*time.Second)
	e.exec(`ALTER TABLE rk RENAME COLUMN id TO rk_id`)
	e.exec(`INSERT INTO rk VALUES (2, 'y')`)
	ms := byPosition(e.waitRecords("rk.public.rk", 2, 20*time.Second))
	if string(ms[0].Key) != `{"id":1}` || string(ms[1].Key) != `{"rk_id":2}` {
		t.Errorf("keys %s, %s; want {\"id\":1} then {\"rk_id\":2}", ms[0].Key, ms[1].Key)
	}
	if w := warnings(logs, "key column of a table was renamed"); len(w) != 1 {
		t.Errorf("%d warnings about the renamed key column, want 1", len(w))
	}

	e.exec(`ALTER TABLE rkfull RENAME COLUMN a TO a2`)
	before := e.currentLSN()
	e.exec(`INSERT INTO rkfull VALUES (2, 'y')`)
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		t.Fatal("capture kept running after the key column of public.rkfull was renamed")
	}
	if r.err == nil || !strings.Contains(r.err.Error(), "the key column(s) a of table public.rkfull are gone") {
		t.Fatalf("run ended with %v, want an error naming public.rkfull and column a", r.err)
	}
	if c := e.slotConfirmed(cfg.Postgres.Slot); c > before {
		t.Errorf("slot confirmed %s, past the refused change (before %s)", c, before)
	}
	for _, m := range e.read("rk.public.rkfull") {
		if len(m.Key) == 0 || string(m.Key) == "{}" {
			t.Errorf("%s/%d@%d: keyless message", m.Topic, m.Partition, m.Offset)
		}
	}
}
