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
