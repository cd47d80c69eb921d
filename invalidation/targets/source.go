package targets

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/pipeline"
)

// ErrOtherSource is returned by CheckSource when the state was built from
// another cluster, or from a history the source no longer has.
var ErrOtherSource = errors.New("the notification-target state is from another source")

// ResetHint says how to start over on a new source.
const ResetHint = "if the switch is intended, run `tidemark rebuild targets --all --new-source` (it forgets the old source's facts and positions, " +
	"keeps what was published, and rebuilds from the new source), reset the targets group's offsets to the topics' latest " +
	"(kafka-consumer-groups --reset-offsets --to-latest --group <targets.group> --all-topics --execute), then start the role"

// CheckSource compares the source the state was built from with src. On
// first use it records src (and slot). It refuses, with ErrOtherSource:
//   - another system_identifier (a different cluster: its positions are
//     unrelated, so every new change would lose to a stored one), or
//   - a WAL position below the newest position stored (a restore to an
//     earlier point: the same history cannot be assumed).
//
// Another timeline with a WAL position at or past the stored positions (a
// promoted standby) is accepted and recorded.
func (s *Store) CheckSource(ctx context.Context, src capture.SourceIdentity, slot string) (changed bool, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var sys, sl *string
		var tl *int64
		if err := tx.QueryRow(ctx, fmt.Sprintf(`SELECT
  (SELECT text_value FROM %[1]s WHERE key = 'source_system_identifier'),
  (SELECT value FROM %[1]s WHERE key = 'source_timeline'),
  (SELECT text_value FROM %[1]s WHERE key = 'source_slot')`, s.t.meta)).Scan(&sys, &tl, &sl); err != nil {
			return err
		}
		var newest int64
		if err := tx.QueryRow(ctx, fmt.Sprintf(`SELECT coalesce(max(lsn), 0) FROM %s`, s.t.rooms)).Scan(&newest); err != nil {
			return err
		}
		if sys != nil && *sys != src.SystemID {
			return fmt.Errorf("%w: schema %s was built from database system %s (slot %s), but postgres.dsn is now system %s; "+
				"positions of two clusters are unrelated, so every new change would be taken as older than the stored ones and dropped; %s",
				ErrOtherSource, s.schema, *sys, deref(sl), src.SystemID, ResetHint)
		}
		if pipeline.LSN(newest) > src.WALPos {
			return fmt.Errorf("%w: schema %s holds positions up to %s, beyond the source's current WAL position %s (%s): "+
				"the source was restored to an earlier point or is another cluster, and changes at positions the state already passed "+
				"would be dropped; %s", ErrOtherSource, s.schema, pipeline.LSN(newest), src.WALPos, src, ResetHint)
		}
		if sys != nil && tl != nil && *tl == int64(src.Timeline) && deref(sl) == slot {
			return nil
		}
		changed = sys != nil
		_, err := tx.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (key, value, text_value) VALUES
  ('source_system_identifier', 0, $1), ('source_timeline', $2, NULL), ('source_slot', 0, $3)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, text_value = excluded.text_value`, s.t.meta), src.SystemID, int64(src.Timeline), slot)
		return err
	})
	return changed, err
}

// ForgetSource deletes the facts and resets the positions kept from the old
// source (memberships, users, the rooms' and kept targets' positions), so a
// rebuild from a new source starts from nothing but what was published;
// room versions are kept (consumers skip versions they have seen). The new
// source is recorded by the next CheckSource.
func (s *Store) ForgetSource(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, fmt.Sprintf(`TRUNCATE %[1]s, %[2]s;
UPDATE %[3]s SET lsn = 0, seq = 0, dirty = false, full_settle = true, touched = NULL;
UPDATE %[4]s SET lsn = 0, seq = 0;
DELETE FROM %[5]s WHERE key LIKE 'source\_%%'`, s.t.members, s.t.users, s.t.rooms, s.t.targets, s.t.meta))
		return err
	})
}

func deref(p *string) string {
	if p == nil {
		return "?"
	}
	return *p
}
