package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkatest"
)

// startObserved runs the app like env.start, logging Info and above to an
// observer the test reads.
func (e *env) startObserved(cfg *config.Config) (*running, *observer.ObservedLogs) {
	e.t.Helper()
	core, logs := observer.New(zapcore.InfoLevel)
	return e.startWith(cfg, zap.New(core)), logs
}

// waitRecords waits until topic holds n records and returns them.
func (e *env) waitRecords(topic string, n int, within time.Duration) []msg {
	e.t.Helper()
	var ms []msg
	for deadline := time.Now().Add(within); ; time.Sleep(50 * time.Millisecond) {
		if _, err := e.partitionCount(topic); err == nil {
			if ms = e.read(topic); len(ms) >= n {
				return ms
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s holds %d records after %s, want %d", topic, len(ms), within, n)
		}
	}
}

func (e *env) partitionCount(topic string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return kafkatest.PartitionCountVia(ctx, e.transport(), e.brokers(), topic)
}

// warnings returns the Warn entries whose message contains substr.
func warnings(logs *observer.ObservedLogs, substr string) []observer.LoggedEntry {
	return logs.Filter(func(le observer.LoggedEntry) bool {
		return le.Level == zapcore.WarnLevel && strings.Contains(le.Message, substr)
	}).All()
}

func sourceTable(t *testing.T, m msg) string {
	t.Helper()
	return m.Env.Source.Schema + "." + m.Env.Source.Table
}

func afterID(t *testing.T, m msg) int {
	t.Helper()
	var id int
	if err := json.Unmarshal(m.Env.After["id"], &id); err != nil {
		t.Fatalf("%s/%d@%d: id %s: %v", m.Topic, m.Partition, m.Offset, m.Env.After["id"], err)
	}
	return id
}

// TestUnknownAndRenamedTables: a table added to the publication at runtime
// that is not configured never blocks the configured ones: its changes are
// skipped, counted by table in tidemark_skipped_changes_total, and warned
// about once. A configured table renamed while running keeps publishing to
// its configured topic (tracked by OID, also across a reconnect), with one
// warning naming both names. With postgres.unknown_tables: stop, the
// unknown table stops capture with an error naming it.
func TestUnknownAndRenamedTables(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE extra (id int PRIMARY KEY)`)
	cfg := e.config("unk", []string{"public.notes"}, nil)
	r, logs := e.startObserved(cfg)
	reg := prometheus.NewRegistry()
	r.Register(reg)
	topic := "unk.public.notes"
	e.exec(`INSERT INTO notes VALUES (1, 'before')`)
	e.waitRecords(topic, 1, 20*time.Second)

	e.exec(`ALTER PUBLICATION unk_pub ADD TABLE extra`)
	e.exec(`INSERT INTO extra VALUES (1), (2), (3)`)
	e.exec(`INSERT INTO notes VALUES (2, 'after the extra table')`)
	e.exec(`INSERT INTO extra VALUES (4), (5)`)
	e.exec(`INSERT INTO notes VALUES (3, 'still')`)
	ms := e.waitRecords(topic, 3, 20*time.Second)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 20*time.Second)
	if got := r.Stream.Stats().Skipped(); len(got) != 1 || got["public.extra"] != 5 {
		t.Errorf("skipped changes by table = %v, want public.extra: 5", got)
	}
	if n := counterValue(t, reg, "tidemark_skipped_changes_total", "table", "public.extra"); n != 5 {
		t.Errorf("tidemark_skipped_changes_total{table=public.extra} = %v, want 5", n)
	}
	if w := warnings(logs, "not in postgres.tables"); len(w) != 1 || w[0].ContextMap()["table"] != "public.extra" {
		t.Errorf("warnings about the unknown table: %+v, want one naming public.extra", w)
	}
	if _, err := e.partitionCount("unk.public.extra"); err == nil {
		t.Errorf("a topic was created for the unconfigured table")
	}

	// Rename the configured table: its changes keep their topic and name.
	e.exec(`ALTER TABLE notes RENAME TO notes_renamed`)
	e.exec(`INSERT INTO notes_renamed VALUES (4, 'renamed')`)
	ms = e.waitRecords(topic, 4, 20*time.Second)
	// A new session (the walsender terminated) learns the relation again,
	// under its new name only.
	reconnects := r.Stream.Stats().Reconnects.Load()
	e.exec(`SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1`, cfg.Postgres.Slot)
	for deadline := time.Now().Add(20 * time.Second); r.Stream.Stats().Reconnects.Load() == reconnects || !r.Stream.Stats().Connected.Load(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("capture did not reconnect within 20s")
		}
	}
	e.exec(`INSERT INTO notes_renamed VALUES (5, 'renamed, after a reconnect')`)
	ms = e.waitRecords(topic, 5, 20*time.Second)
	ids := map[int]bool{}
	for _, m := range ms {
		ids[afterID(t, m)] = true
		if got := sourceTable(t, m); got != "public.notes" {
			t.Errorf("%s/%d@%d: source table %s, want the configured public.notes", m.Topic, m.Partition, m.Offset, got)
		}
	}
	for id := 1; id <= 5; id++ {
		if !ids[id] {
			t.Errorf("row %d missing from %s", id, topic)
		}
	}
	w := warnings(logs, "renamed")
	if len(w) != 1 || w[0].ContextMap()["configured"] != "public.notes" || w[0].ContextMap()["now"] != "public.notes_renamed" {
		t.Errorf("warnings about the rename: %+v, want one naming public.notes and public.notes_renamed", w)
	}
	if n := r.Stream.Stats().Skipped()["public.notes_renamed"]; n != 0 {
		t.Errorf("%d changes of the renamed table skipped", n)
	}
	// The transactions of skipped changes only publish no BEGIN or END:
	// one END per transaction of notes, each naming only public.notes.
	var ends int
	for _, tr := range e.readTxns("unk.transaction") {
		if tr.Status != "END" {
			continue
		}
		ends++
		if len(tr.DataCollections) != 1 || tr.DataCollections[0].Name != "public.notes" {
			t.Errorf("END %s: data collections %+v, want public.notes only", tr.ID, tr.DataCollections)
		}
	}
	if ends != 5 {
		t.Errorf("%d END records, want 5 (one per transaction of notes; none for those of the skipped table)", ends)
	}
}

// counterValue is the value of the counter name{label=value} in reg.
func counterValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	return metricOf(t, reg, name, label, value)
}

// metricOf is the value of the gauge or counter name{label=value} in reg
// (label "": its first series).
func metricOf(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label == "" {
				return metricValue(m)
			}
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && lp.GetValue() == value {
					return metricValue(m)
				}
			}
		}
	}
	t.Fatalf("no metric %s{%s=%q}", name, label, value)
	return 0
}

// TestUnknownTableStops: with postgres.unknown_tables: stop, a change of a
// table that is not configured stops capture with an error naming it, and
// the slot does not pass it.
func TestUnknownTableStops(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE extra (id int PRIMARY KEY)`)
	cfg := e.config("unkstop", []string{"public.notes"}, func(c *config.Config) { c.Postgres.UnknownTables = "stop" })
	r, _ := e.startObserved(cfg)
	e.exec(`INSERT INTO notes VALUES (1, 'before')`)
	e.waitRecords("unkstop.public.notes", 1, 20*time.Second)
	e.exec(`ALTER PUBLICATION unkstop_pub ADD TABLE extra`)
	before := e.currentLSN()
	e.exec(`INSERT INTO extra VALUES (1)`)
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		t.Fatal("capture kept running after a change of an unconfigured table")
	}
	if r.err == nil || !strings.Contains(r.err.Error(), "table public.extra") || !strings.Contains(r.err.Error(), "not in postgres.tables") {
		t.Fatalf("run ended with %v, want an error naming public.extra", r.err)
	}
	if c := e.slotConfirmed(cfg.Postgres.Slot); c > before {
		t.Errorf("slot confirmed %s, past the refused change (before %s)", c, before)
	}
}

// TestPublicationExtraTablesReported: preflight reports the tables an
// unmanaged publication publishes beyond postgres.tables (their changes
// reach capture, to be skipped or refused): `tidemark check` warns naming
// them (exit 0: a warning, not a problem), `tidemark run` logs it once at
// Warn. Partitions of a configured partitioned table are not extra, also
// while pg_publication_tables lists them. A managed publication is kept to
// the configured tables: nothing to report.
func TestPublicationExtraTablesReported(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text); CREATE TABLE extra (id int PRIMARY KEY); CREATE TABLE extra2 (id int PRIMARY KEY)`)
	e.exec(partitionedSchema)
	e.exec(`CREATE PUBLICATION xt_pub FOR TABLE notes, msgs, extra, extra2 WITH (publish_via_partition_root = true)`)
	cfg := e.config("xt", []string{"public.notes", "public.msgs"}, unmanaged)
	out, err := exec.Command(binary(t), "check", "--config", writeUnmanagedConfig(t, cfg)).CombinedOutput()
	if err != nil {
		t.Fatalf("tidemark check: %v\n%s", err, out)
	}
	want := `warning: publication "xt_pub" also publishes 2 table(s) that are not in postgres.tables: public.extra, public.extra2; their changes are skipped`
	if !strings.Contains(string(out), want) {
		t.Errorf("tidemark check output lacks %q:\n%s", want, out)
	}

	ctx := context.Background()
	e.exec(`ALTER PUBLICATION xt_pub SET (publish_via_partition_root = false)`)
	infos, _, _, err := app.Check(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	stop := *cfg
	stop.Postgres.UnknownTables = "stop"
	w, err := app.ExtraTablesWarning(ctx, &stop, infos)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(w, "2 table(s) that are not in postgres.tables: public.extra, public.extra2; the first change of one stops capture") {
		t.Errorf("with the partitions listed and unknown_tables stop: %q", w)
	}
	e.exec(`ALTER PUBLICATION xt_pub SET (publish_via_partition_root = true)`)

	_, logs := e.startObserved(cfg)
	if ws := warnings(logs, "publishes tables that are not configured"); len(ws) != 1 || fmt.Sprint(ws[0].ContextMap()["tables"]) != "[public.extra public.extra2]" {
		t.Errorf("tidemark run's warnings about the extra tables: %+v, want one naming public.extra and public.extra2", ws)
	}

	e.exec(`CREATE PUBLICATION xtm_pub FOR TABLE notes, extra`)
	_, logs = e.startObserved(e.config("xtm", []string{"public.notes"}, nil))
	if ws := warnings(logs, "publishes tables that are not configured"); len(ws) != 0 {
		t.Errorf("a managed publication was reported with extra tables: %+v", ws)
	}
}
