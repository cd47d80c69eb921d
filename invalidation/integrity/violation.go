package integrity

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"time"

	"github.com/tidemark/tidemark/pipeline"
)

// Kinds of violation.
const (
	// KindMissing: a row lacks its expected related row.
	KindMissing = "missing"
	// KindOrphaned: the related row was deleted while the row remains.
	KindOrphaned = "orphaned"
	// KindForbidden: a row has a related row a forbid rule forbids
	// (confirmed in the database).
	KindForbidden = "forbidden"
	// KindRegressed: a monotonic column moved backwards.
	KindRegressed = "regressed"
)

// Statuses of a violation.
const (
	StatusOpen     = "open"
	StatusResolved = "resolved"
)

// Violation is one flagged write. Its ID is derived from the rule, the row
// key and the position of the change that was flagged, so evaluating the
// same change again (a replay) yields the same ID.
type Violation struct {
	ID       string `json:"id"`
	Rule     string `json:"rule"`
	Kind     string `json:"kind"`
	Severity string `json:"severity"`
	// Table and RowKey name the flagged row (RowKey is the change's message
	// key: its primary-key columns as a JSON object).
	Table  string          `json:"table"`
	RowKey json.RawMessage `json:"row_key"`
	// Position of the flagged change ("commitLSN:seq") and its transaction.
	Position      string    `json:"position"`
	CommitLSN     string    `json:"commit_lsn"` // X/Y
	Seq           uint32    `json:"seq"`
	TransactionID string    `json:"transaction_id"`
	CommittedAt   time.Time `json:"committed_at"`
	DetectedAt    time.Time `json:"detected_at"`
	// Related names what is missing (or was deleted): the related table and
	// the values of its match columns.
	Related string            `json:"related_table,omitempty"`
	Match   map[string]string `json:"match,omitempty"`
	// MatchKey indexes open violations for resolution.
	MatchKey string `json:"match_key"`
	Detail   string `json:"detail"`
	Status   string `json:"status"`
	// ResolvedAt and ResolvedBy (the position of the change that resolved
	// it) are set once the missing row appeared.
	ResolvedAt *time.Time `json:"resolved_at,omitempty"`
	ResolvedBy string     `json:"resolved_by,omitempty"`
}

// ViolationID is the deterministic id of a violation.
func ViolationID(rule string, rowKey []byte, pos pipeline.Position) string {
	h := sha256.New()
	h.Write([]byte(rule))
	h.Write([]byte{0})
	h.Write(rowKey)
	h.Write([]byte{0})
	h.Write([]byte(pos.String()))
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// topicKey is the violations topic's record key: rule and row key.
func (v *Violation) topicKey() []byte {
	b, _ := json.Marshal(struct {
		Rule string          `json:"rule"`
		Row  json.RawMessage `json:"row"`
	}{v.Rule, v.RowKey})
	return b
}
