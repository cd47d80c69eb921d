package app

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	kafkago "github.com/segmentio/kafka-go"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
)

// StatusReport is what `tidemark status` and GET /admin/status show: the
// slot's WAL retention, the publication against the config, and each
// configured consumer group's lag. Every section is filled independently; a
// section that cannot be read carries its error, and Problems lists
// everything an operator must act on.
type StatusReport struct {
	Database    string              `json:"database"`
	Slot        *capture.SlotHealth `json:"slot,omitempty"`
	Publication *PublicationStatus  `json:"publication,omitempty"`
	Groups      []GroupStatus       `json:"consumer_groups"`
	// Snapshots are the incremental snapshots queued or running, and the
	// last few that ended.
	Snapshots []capture.IncrementalSnapshot `json:"snapshots"`
	Problems  []string                      `json:"problems"`
	CheckedAt time.Time                     `json:"checked_at"`
}

// PublicationStatus compares the publication's tables with postgres.tables.
type PublicationStatus struct {
	Name    string   `json:"name"`
	Exists  bool     `json:"exists"`
	Tables  []string `json:"tables"`
	Missing []string `json:"missing,omitempty"` // configured, not published
	Extra   []string `json:"extra,omitempty"`   // published, not configured
}

// GroupStatus is one consumer group's committed progress.
type GroupStatus struct {
	Role  string `json:"role"`
	Group string `json:"group"`
	// Lag is the sum over its committed partitions of end offset minus
	// committed offset.
	Lag        int64            `json:"lag_messages"`
	Partitions int              `json:"partitions_committed"`
	Topics     map[string]int64 `json:"lag_by_topic,omitempty"`
	Error      string           `json:"error,omitempty"`
}

// CollectStatus gathers the report. It fails only when the config cannot
// be used at all; unreachable parts are reported in the sections.
func CollectStatus(ctx context.Context, cfg *config.Config) (*StatusReport, error) {
	r := &StatusReport{Database: config.Redact(cfg.Postgres.DSN), Groups: []GroupStatus{}, Snapshots: []capture.IncrementalSnapshot{}, Problems: []string{}, CheckedAt: time.Now()}
	pgCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if conn, err := pgx.Connect(pgCtx, cfg.Postgres.DSN); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: cannot connect: %v", err))
	} else {
		defer conn.Close(context.Background())
		r.postgres(pgCtx, conn, cfg)
	}
	kctx, kcancel := context.WithTimeout(ctx, 15*time.Second)
	defer kcancel()
	r.kafka(kctx, cfg)
	return r, nil
}

func (r *StatusReport) postgres(ctx context.Context, conn *pgx.Conn, cfg *config.Config) {
	var walLevel string
	if err := conn.QueryRow(ctx, "SHOW wal_level").Scan(&walLevel); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: reading wal_level: %v", err))
		return
	}
	if walLevel != "logical" {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: wal_level is %s, logical replication needs logical (postgresql.conf, then restart)", walLevel))
	}
	h, err := capture.ReadSlotHealth(ctx, conn, cfg.Postgres.Slot)
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: %v", err))
		return
	}
	r.Slot = &h
	r.Problems = append(r.Problems, h.Problems()...)
	if snaps, err := capture.ReadIncrementalSnapshots(ctx, conn, cfg.Postgres.Slot, 5); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: %v", err))
	} else {
		r.Snapshots = snaps
		for _, s := range snaps {
			if s.State == capture.IncrementalFailed && s.CompletedAt != nil && time.Since(*s.CompletedAt) < 24*time.Hour {
				r.Problems = append(r.Problems, fmt.Sprintf("incremental snapshot %d of %s failed: %s", s.ID, s.Table, s.Error))
			}
		}
	}
	if h.Exists && !h.Active {
		r.Problems = append(r.Problems, fmt.Sprintf("replication slot %q has no active consumer: is `tidemark run` (capture) running?", h.Slot))
	}
	p := &PublicationStatus{Name: cfg.Postgres.Publication, Tables: []string{}}
	r.Publication = p
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", p.Name).Scan(&p.Exists); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: reading publication %q: %v", p.Name, err))
		return
	}
	if !p.Exists {
		r.Problems = append(r.Problems, fmt.Sprintf("publication %q does not exist (tidemark run creates it when postgres.manage_publication is true)", p.Name))
		return
	}
	rows, err := conn.Query(ctx, "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1", p.Name)
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: reading publication %q: %v", p.Name, err))
		return
	}
	if p.Tables, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: reading publication %q: %v", p.Name, err))
		return
	}
	published := map[string]bool{}
	for _, t := range p.Tables {
		published[t] = true
	}
	// pg_publication_tables lists the partitions of a partitioned table
	// (unless the publication publishes via the root), and an unmanaged
	// publication may lack operations or carry filters: the preflight's
	// judgement of the publication says all of that precisely.
	infos, _, err := capture.Inspect(ctx, conn, cfg.Postgres.Tables)
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: inspecting the tables: %v", err))
		return
	}
	partitionOf := map[string]bool{}
	for _, ti := range infos {
		if ti.Partitioned {
			partitionOf[ti.Qualified()] = true
		}
	}
	configured := map[string]bool{}
	for _, t := range cfg.Postgres.Tables {
		configured[t] = true
		if !published[t] && !partitionOf[t] {
			p.Missing = append(p.Missing, t)
		}
	}
	for _, t := range p.Tables {
		if !configured[t] {
			p.Extra = append(p.Extra, t)
		}
	}
	if len(p.Missing) > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("publication %q lacks configured table(s) %v: their changes are not captured", p.Name, p.Missing))
	}
	pps, err := capture.PublicationProblems(ctx, conn, p.Name, configuredTables(cfg, infos))
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("postgres: checking publication %q: %v", p.Name, err))
		return
	}
	for _, pp := range pps {
		if s := pp.String(); !strings.Contains(s, "does not cover") { // the missing tables, said above
			r.Problems = append(r.Problems, "publication: "+s)
		}
	}
}

// kafka reads each configured consumer group's committed offsets and the
// end offsets of those partitions.
func (r *StatusReport) kafka(ctx context.Context, cfg *config.Config) {
	var groups []GroupStatus
	if cfg.Invalidation != nil {
		groups = append(groups, GroupStatus{Role: "invalidation", Group: cfg.Invalidation.Group})
	}
	if cfg.Targets != nil {
		groups = append(groups, GroupStatus{Role: "targets", Group: cfg.Targets.Group})
	}
	if cfg.Integrity != nil {
		groups = append(groups, GroupStatus{Role: "integrity", Group: cfg.Integrity.Group})
	}
	knet, err := cfg.Kafka.Net()
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
		return
	}
	transport := knet.Transport(cfg.Kafka.ClientID+"-status", 0)
	defer transport.CloseIdleConnections()
	client := &kafkago.Client{Addr: kafkago.TCP(cfg.Kafka.Brokers...), Timeout: 10 * time.Second, Transport: transport}
	for _, g := range groups {
		if err := groupLag(ctx, client, &g); err != nil {
			g.Error = err.Error()
			r.Problems = append(r.Problems, fmt.Sprintf("consumer group %s (%s): %v", g.Group, g.Role, err))
		} else if g.Partitions == 0 {
			r.Problems = append(r.Problems, fmt.Sprintf("consumer group %s (%s) has committed no offsets: has `tidemark run --role %s` ever run?", g.Group, g.Role, g.Role))
		}
		r.Groups = append(r.Groups, g)
	}
}

func groupLag(ctx context.Context, client *kafkago.Client, g *GroupStatus) error {
	resp, err := client.OffsetFetch(ctx, &kafkago.OffsetFetchRequest{GroupID: g.Group})
	if err != nil {
		return fmt.Errorf("fetching committed offsets: %w", err)
	}
	if errors.Is(resp.Error, kafkago.GroupIdNotFound) {
		return nil // never committed: reported by the caller
	}
	if resp.Error != nil {
		return fmt.Errorf("fetching committed offsets: %w", resp.Error)
	}
	committed := map[string]map[int]int64{}
	req := map[string][]kafkago.OffsetRequest{}
	for topic, parts := range resp.Topics {
		for _, p := range parts {
			if p.Error != nil {
				return fmt.Errorf("committed offset of %s[%d]: %w", topic, p.Partition, p.Error)
			}
			if p.CommittedOffset < 0 {
				continue
			}
			if committed[topic] == nil {
				committed[topic] = map[int]int64{}
			}
			committed[topic][p.Partition] = p.CommittedOffset
			req[topic] = append(req[topic], kafkago.LastOffsetOf(p.Partition))
		}
	}
	if len(req) == 0 {
		return nil
	}
	ends, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: req})
	if err != nil {
		return fmt.Errorf("listing end offsets: %w", err)
	}
	g.Topics = map[string]int64{}
	topics := make([]string, 0, len(committed))
	for t := range committed {
		topics = append(topics, t)
	}
	sort.Strings(topics)
	for _, topic := range topics {
		for _, po := range ends.Topics[topic] {
			if po.Error != nil {
				return fmt.Errorf("end offset of %s[%d]: %w", topic, po.Partition, po.Error)
			}
			c, ok := committed[topic][po.Partition]
			if !ok {
				continue
			}
			lag := po.LastOffset - c
			if lag < 0 {
				lag = 0
			}
			g.Partitions++
			g.Lag += lag
			g.Topics[topic] += lag
		}
	}
	return nil
}
