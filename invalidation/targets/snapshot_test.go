package targets

import (
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// The failures an operator must fix name the fix (messages as Postgres 15
// words them).
func TestExplainSnapshotErr(t *testing.T) {
	for _, c := range []struct {
		err  *pgconn.PgError
		want string
	}{
		{&pgconn.PgError{Severity: "FATAL", Code: "42501", Message: "must be superuser or replication role to start walsender"}, "REPLICATION attribute"},
		{&pgconn.PgError{Severity: "ERROR", Code: "53400", Message: "all replication slots are in use"}, "free a slot or raise max_replication_slots"},
		{&pgconn.PgError{Severity: "FATAL", Code: "53300", Message: "number of requested standby connections exceeds max_wal_senders (currently 2)"}, "raise max_wal_senders"},
		{&pgconn.PgError{Severity: "ERROR", Code: "55000", Message: "logical decoding requires wal_level >= logical"}, "wal_level=logical"},
	} {
		err := explainSnapshotErr("creating a slot", c.err)
		if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.err.Message) || !errors.Is(err, c.err) {
			t.Errorf("%s: %v; want the message, the cause and %q", c.err.Code, err, c.want)
		}
	}
	other := &pgconn.PgError{Code: "XX000", Message: "boom"}
	if err := explainSnapshotErr("x", other); err.Error() != "x: "+other.Error() || !errors.Is(err, other) {
		t.Errorf("other error: %v", err)
	}
}
