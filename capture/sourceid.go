package capture

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tidemark/tidemark/pipeline"
)

// SourceIdentity names the database cluster changes come from: positions
// (commit LSNs) of two clusters are unrelated, so state kept by position
// must know which cluster it was built from.
type SourceIdentity struct {
	// SystemID is the cluster's system_identifier (pg_controldata); a
	// restore from a base backup keeps it, a new cluster does not.
	SystemID string
	// Timeline is the current timeline (a promotion or point-in-time
	// recovery starts a new one).
	Timeline int32
	// WALPos is the cluster's current WAL write position.
	WALPos pipeline.LSN
}

// IdentifySource asks the server of cfg (a normal connection's config; a
// replication connection is derived from a copy) for its identity, with
// IDENTIFY_SYSTEM, which needs the REPLICATION attribute capture already
// needs.
func IdentifySource(ctx context.Context, cfg *pgconn.Config) (SourceIdentity, error) {
	rcfg := cfg.Copy()
	if rcfg.RuntimeParams == nil {
		rcfg.RuntimeParams = map[string]string{}
	}
	rcfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, rcfg)
	if err != nil {
		return SourceIdentity{}, fmt.Errorf("identifying the source database (replication connection): %w", ExplainTLS(err))
	}
	defer conn.Close(context.Background())
	r, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return SourceIdentity{}, fmt.Errorf("identifying the source database (IDENTIFY_SYSTEM): %w", err)
	}
	return SourceIdentity{SystemID: r.SystemID, Timeline: r.Timeline, WALPos: pipeline.LSN(r.XLogPos)}, nil
}

// String is "system <id>, timeline <n>".
func (s SourceIdentity) String() string {
	return "system " + s.SystemID + ", timeline " + strconv.Itoa(int(s.Timeline))
}

// IsAccessDenied reports whether err is the server refusing the role (no
// REPLICATION attribute, no pg_hba entry, a wrong password): waiting does
// not heal it.
func IsAccessDenied(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code {
		case "42501", "28000", "28P01":
			return true
		}
	}
	return false
}
