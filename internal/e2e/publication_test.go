package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
)

// Publications in the field: partitioned tables, publications that do not
// publish every operation, row filters and column lists. Each makes capture
// miss changes silently unless preflight names it (when the operator owns
// the publication) or Tidemark sets it right (manage_publication: true).

const partitionedSchema = `CREATE TABLE msgs (room text, id int, body text, PRIMARY KEY (room, id)) PARTITION BY LIST (room);
CREATE TABLE msgs_a PARTITION OF msgs FOR VALUES IN ('a');
CREATE TABLE msgs_b PARTITION OF msgs FOR VALUES IN ('b')`

// unmanaged turns manage_publication off.
func unmanaged(c *config.Config) {
	off := false
	c.Postgres.ManagePublication = &off
}

// publicationFlags reads pubviaroot and whether the publication publishes
// all four operations.
func (e *env) publicationFlags(name string) (viaRoot, allOps bool) {
	e.t.Helper()
	if err := e.pool.QueryRow(context.Background(), `SELECT pubviaroot, pubinsert AND pubupdate AND pubdelete AND pubtruncate
		FROM pg_publication WHERE pubname = $1`, name).Scan(&viaRoot, &allOps); err != nil {
		e.t.Fatalf("reading publication %s: %v", name, err)
	}
	return viaRoot, allOps
}

// checkPartitionedFlow inserts into both partitions of msgs, updates and
// deletes, and asserts the changes arrive in the partitioned table's topic
// (none under a partition's name), keyed by its primary key, in per-key
// order, and that the slot confirms past them.
func (e *env) checkPartitionedFlow(cfg *config.Config) {
	e.t.Helper()
	e.exec(`INSERT INTO msgs VALUES ('a', 1, 'x'), ('b', 2, 'y')`)
	e.exec(`UPDATE msgs SET body = 'z' WHERE room = 'b'`)
	e.exec(`DELETE FROM msgs WHERE room = 'a'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	topic := cfg.Kafka.TopicPrefix + ".public.msgs"
	ms := e.read(topic)
	byKey := map[string]string{}
	for _, m := range ms {
		byKey[string(m.Key)] += m.Env.Op
		if m.Env.Source.Table != "msgs" || m.Headers["tidemark-table"] != "public.msgs" {
			e.t.Errorf("%s@%d: source.table %q, header tidemark-table %q; want msgs, public.msgs", topic, m.Offset, m.Env.Source.Table, m.Headers["tidemark-table"])
		}
	}
	want := map[string]string{`{"room":"a","id":1}`: "cd", `{"room":"b","id":2}`: "cu"}
	if len(byKey) != len(want) {
		e.t.Errorf("%s: ops by key %v, want %v", topic, byKey, want)
	}
	for k, ops := range want {
		if byKey[k] != ops {
			e.t.Errorf("%s: key %s has ops %q, want %q (all: %v)", topic, k, byKey[k], ops, byKey)
		}
	}
	e.checkKeyOrder(topic, ms, false)
	for _, leaf := range []string{"msgs_a", "msgs_b"} {
		if _, err := e.partitionCount(cfg.Kafka.TopicPrefix + ".public." + leaf); err == nil {
			e.t.Errorf("a topic exists for partition %s: changes went out under its name", leaf)
		}
	}
}

// TestPartitionedTableCaptured: a partitioned table in postgres.tables, with
// a managed publication, is published with publish_via_partition_root, so
// inserts into two partitions (and updates, deletes) arrive in
// <prefix>.public.msgs, keyed by its primary key, and the slot advances.
func TestPartitionedTableCaptured(t *testing.T) {
	e := newEnv(t, "")
	e.exec(partitionedSchema)
	cfg := e.config("part", []string{"public.msgs"}, nil)
	e.start(cfg)
	if viaRoot, allOps := e.publicationFlags(cfg.Postgres.Publication); !viaRoot || !allOps {
		t.Errorf("managed publication: publish_via_partition_root %v, all operations %v; want both", viaRoot, allOps)
	}
	e.checkPartitionedFlow(cfg)
}

// TestPartitionedTableUnmanaged: with manage_publication false, a
// publication of only the partitions does not cover the partitioned table;
// `FOR TABLE msgs` does (pg_publication_tables lists the partitions while
// publish_via_partition_root is off), but with that option off preflight
// refuses it with the ALTER PUBLICATION to run, creating no slot. Once it is
// run, capture starts and the partitions' changes arrive under the root.
func TestPartitionedTableUnmanaged(t *testing.T) {
	e := newEnv(t, "")
	e.exec(partitionedSchema)
	cfg := e.config("upart", []string{"public.msgs"}, unmanaged)

	e.exec(`CREATE PUBLICATION upart_pub FOR TABLE msgs_a, msgs_b WITH (publish_via_partition_root = true)`)
	checkRefused(t, cfg, []capture.Problem{{
		What: `publication "upart_pub" does not cover "public"."msgs": their changes would not be captured`,
		Fix:  `ALTER PUBLICATION "upart_pub" ADD TABLE "public"."msgs";`,
	}})

	e.exec(`DROP PUBLICATION upart_pub; CREATE PUBLICATION upart_pub FOR TABLE msgs`)
	fix := `ALTER PUBLICATION "upart_pub" SET (publish_via_partition_root = true);`
	checkRefused(t, cfg, []capture.Problem{{
		What: `publication "upart_pub" has publish_via_partition_root off: the changes of partitioned table(s) public.msgs would be published under their partitions' names and not reach their topics`,
		Fix:  fix,
	}})
	e.checkNoSlot(cfg.Postgres.Slot)
	// tidemark status says the same, not that the table is missing (the
	// publication lists its partitions).
	rep, err := app.CollectStatus(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	var viaRootProblem bool
	for _, p := range rep.Problems {
		if strings.Contains(p, "lacks configured table") {
			t.Errorf("status: %s", p)
		}
		viaRootProblem = viaRootProblem || strings.Contains(p, "publish_via_partition_root off")
	}
	if !viaRootProblem || len(rep.Publication.Missing) != 0 {
		t.Errorf("status problems %q (missing %v), want the publish_via_partition_root problem", rep.Problems, rep.Publication.Missing)
	}

	e.exec(fix)
	e.start(cfg)
	e.checkPartitionedFlow(cfg)
	if viaRoot, _ := e.publicationFlags(cfg.Postgres.Publication); !viaRoot {
		t.Errorf("publish_via_partition_root is off after the fix")
	}
}

// TestPartitionIdentityRefused: Postgres checks the replica identity of the
// partition a row is in; REPLICA IDENTITY FULL on the partitioned table does
// not reach its partitions, so publishing it would make the application's
// UPDATE fail on every partition. Preflight names each partition with its
// fix and creates nothing; the application's UPDATE keeps working; after
// the fixes capture starts and the update arrives.
func TestPartitionIdentityRefused(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE logs (room text, line text) PARTITION BY LIST (room);
CREATE TABLE logs_a PARTITION OF logs FOR VALUES IN ('a');
CREATE TABLE logs_b PARTITION OF logs FOR VALUES IN ('b');
ALTER TABLE logs REPLICA IDENTITY FULL;
INSERT INTO logs VALUES ('a', 'one')`)
	cfg := e.config("pident", []string{"public.logs"}, nil)
	what := " has no replica identity (no primary key); publishing it would make the application's UPDATE and DELETE on it fail, so Tidemark refuses to capture it"
	want := []capture.Problem{
		{Table: "public.logs_a", What: "partition of public.logs" + what, Fix: `ALTER TABLE "public"."logs_a" REPLICA IDENTITY FULL;`},
		{Table: "public.logs_b", What: "partition of public.logs" + what, Fix: `ALTER TABLE "public"."logs_b" REPLICA IDENTITY FULL;`},
	}
	checkRefused(t, cfg, want)
	checkUntouched(t, e.pool, cfg)
	e.exec(`UPDATE logs SET line = 'two' WHERE room = 'a'`)

	for _, p := range want {
		e.exec(p.Fix)
	}
	e.start(cfg)
	e.exec(`UPDATE logs SET line = 'three' WHERE room = 'a'`)
	e.waitSlot(cfg.Postgres.Slot, e.currentLSN(), 30*time.Second)
	// Without a primary key the whole row is the key: an update is the old
	// row's delete and the new row's create (different keys, so maybe in
	// different Kafka partitions).
	got := map[string]string{}
	for _, m := range e.read("pident.public.logs") {
		switch m.Env.Op {
		case "d":
			got["d"] += string(m.Env.Before["line"])
		case "c":
			got["c"] += string(m.Env.After["line"])
		default:
			got[m.Env.Op] += "?"
		}
	}
	if len(got) != 2 || got["d"] != `"two"` || got["c"] != `"three"` {
		t.Errorf("logs: %v, want the update as the delete of line two and the create of line three", got)
	}
}

func ops(ms []msg) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Env.Op + " " + string(m.Key)
	}
	return out
}

// checkNoSlot asserts that the slot does not exist.
func (e *env) checkNoSlot(slot string) {
	e.t.Helper()
	var n int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	if n != 0 {
		e.t.Errorf("replication slot %s exists", slot)
	}
}

// writeUnmanagedConfig writes cfg as writeConfig does, with
// manage_publication: false.
func writeUnmanagedConfig(t *testing.T, cfg *config.Config) string {
	t.Helper()
	path := writeConfig(t, cfg)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "postgres:\n", "postgres:\n  manage_publication: false\n", 1)
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestPublicationOperationsRefused: a publication that publishes only
// inserts would drop every update, delete and truncate silently.
// `tidemark check` exits 3 naming the publication, the missing operations
// and the ALTER PUBLICATION to run; after it, check passes. With
// manage_publication: true Tidemark sets the operations itself, and an
// update arrives.
func TestPublicationOperationsRefused(t *testing.T) {
	e := newEnv(t, "")
	e.exec(`CREATE TABLE notes (id int PRIMARY KEY, body text);
CREATE PUBLICATION ops_pub FOR TABLE notes WITH (publish = 'insert')`)
	cfg := e.config("ops", []string{"public.notes"}, unmanaged)
	want := capture.Problem{
		What: `publication "ops_pub" does not publish update, delete, truncate: those changes would not be captured`,
		Fix:  `ALTER PUBLICATION "ops_pub" SET (publish = 'insert, update, delete, truncate');`,
	}
	checkRefused(t, cfg, []capture.Problem{want})
	e.checkNoSlot(cfg.Postgres.Slot)

	path := writeUnmanagedConfig(t, cfg)
	out, err := exec.Command(binary(t), "check", "--config", path).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("tidemark check: %v (want exit 3)\n%s", err, out)
	}
	if !strings.Contains(string(out), want.String()) {
		t.Errorf("tidemark check output lacks %q:\n%s", want.String(), out)
	}
	e.exec(`ALTER PUBLICATION ops_pub SET (publish = 'insert, update, delete')`)
	out, err = exec.Command(binary(t), "check", "--config", path).CombinedOutput()
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("tidemark check, only truncate missing: %v (want exit 3)\n%s", err, out)
	}
	if !strings.Contains(string(out), `publication "ops_pub" does not publish truncate: `) {
		t.Errorf("tidemark check, only truncate missing:\n%s", out)
	}

	e.exec(want.Fix)
	if out, err := exec.Command(binary(t), "check", "--config", path).CombinedOutput(); err != nil {
		t.Errorf("tidemark check after the fix: %v\n%s", err, out)
	}

	// Managed: Tidemark sets publish (and publish_via_partition_root).
	e.exec(`ALTER PUBLICATION ops_pub SET (publish = 'insert')`)
	managed := e.config("ops", []string{"public.notes"}, nil)
	e.start(managed)
	if viaRoot, allOps := e.publicationFlags("ops_pub"); !viaRoot || !allOps {
		t.Errorf("managed publication: publish_via_partition_root %v, all operations %v; want both", viaRoot, allOps)
	}
	e.exec(`INSERT INTO notes VALUES (1, 'a'); UPDATE notes SET body = 'b' WHERE id = 1; DELETE FROM notes WHERE id = 1`)
	e.waitSlot(managed.Postgres.Slot, e.currentLSN(), 30*time.Second)
	if got := strings.Join(ops(e.read("ops.public.notes")), ","); got != `c {"id":1},u {"id":1},d {"id":1}` {
		t.Errorf("notes: %s, want c, u, d of id 1", got)
	}
}

// TestPublicationFiltersRefused (Postgres 15 and later): a row filter or a
// column list on a captured table drops changes silently. Preflight names
// the table, the filter or columns, and the statements that remove them;
// they work. A managed publication has them removed by Tidemark.
func TestPublicationFiltersRefused(t *testing.T) {
	e := newEnv(t, "")
	var version int
	if err := e.pool.QueryRow(context.Background(), "SELECT current_setting('server_version_num')::int").Scan(&version); err != nil {
		t.Fatal(err)
	}
	if version < 150000 {
		t.Skipf("Postgres %d has no row filters or column lists", version)
	}
	e.exec(`CREATE TABLE f (id int PRIMARY KEY, v text); CREATE TABLE g (id int PRIMARY KEY, a text, secret text);
CREATE PUBLICATION filt_pub FOR TABLE f WHERE (id > 5), g (id, a)`)
	cfg := e.config("filt", []string{"public.f", "public.g"}, unmanaged)
	want := []capture.Problem{
		{Table: "public.f", What: `publication "filt_pub" publishes only the rows WHERE (id > 5): the other changes would silently not be captured`,
			Fix: `BEGIN; ALTER PUBLICATION "filt_pub" DROP TABLE "public"."f"; ALTER PUBLICATION "filt_pub" ADD TABLE "public"."f"; COMMIT;`},
		{Table: "public.g", What: `publication "filt_pub" publishes only the columns id, a: the other changes would silently not be captured`,
			Fix: `BEGIN; ALTER PUBLICATION "filt_pub" DROP TABLE "public"."g"; ALTER PUBLICATION "filt_pub" ADD TABLE "public"."g"; COMMIT;`},
	}
	checkRefused(t, cfg, want)
	e.checkNoSlot(cfg.Postgres.Slot)
	for _, p := range want {
		e.exec(p.Fix)
	}
	if _, _, ps, err := app.Check(context.Background(), cfg); err != nil || len(ps) != 0 {
		t.Fatalf("Check after the fixes: %v %v", ps, err)
	}

	// Managed: Tidemark removes them.
	e.exec(`ALTER PUBLICATION filt_pub SET TABLE f WHERE (id > 5), g (id, a)`)
	managed := e.config("filt", []string{"public.f", "public.g"}, nil)
	if _, err := app.Prepare(context.Background(), managed, nil); err != nil {
		t.Fatalf("Prepare (managed): %v", err)
	}
	var filtered int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
		WHERE p.pubname = 'filt_pub' AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL)`).Scan(&filtered); err != nil {
		t.Fatal(err)
	}
	if filtered != 0 {
		t.Errorf("managed publication keeps %d row filters or column lists", filtered)
	}
	if _, _, ps, err := app.Check(context.Background(), cfg); err != nil || len(ps) != 0 {
		t.Errorf("Check (unmanaged) after Tidemark managed it: %v %v", ps, err)
	}
}
