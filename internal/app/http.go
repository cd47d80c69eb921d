package app

import (
	"context"
	"errors"
	"fmt"
	"github.com/tidemark/tidemark/internal/buildinfo"
	"github.com/tidemark/tidemark/pipeline"
	"math"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tidemark/tidemark/capture"
)

// NewRegistry returns a Prometheus registry with the Go and process
// collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	bi := buildinfo.Get()
	build := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "tidemark", Name: "build_info",
		Help:        "Which build is running (always 1): version, VCS revision and Go version.",
		ConstLabels: prometheus.Labels{"version": bi.Version, "revision": bi.Revision, "go_version": bi.GoVersion}})
	build.Set(1)
	reg.MustRegister(build)
	return reg
}

// Register adds the capture pipeline's metrics to reg. Values are read from
// the parts' atomic stats at scrape time, so the hot path pays nothing per
// message.
func (a *App) Register(reg prometheus.Registerer) {
	reg.MustRegister(a.CommitToAck)
	ps := a.Pipeline.Stats()
	cs := a.Stream.Stats()
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tidemark", Name: name, Help: help}, f))
	}
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tidemark", Name: name, Help: help}, f))
	}
	counter("changes_total", "Row changes received from Postgres.", func() float64 { return float64(ps.Changes.Load()) })
	counter("transactions_total", "Transactions received from Postgres.", func() float64 { return float64(ps.Transactions.Load()) })
	counter("messages_published_total", "Messages acknowledged by Kafka.", func() float64 { return float64(ps.Published.Load()) })
	counter("truncates_skipped_total", "Truncates not published (pipeline.truncate: skip).", func() float64 { return float64(ps.SkippedTruncates.Load()) })
	counter("sink_batches_total", "Successful writes to Kafka.", func() float64 { return float64(ps.Batches.Load()) })
	counter("sink_retries_total", "Failed Kafka write attempts (retried).", func() float64 { return float64(a.Sink.Retries()) })
	counter("kafka_metadata_refreshes_total", "Times the Kafka producer re-read the cluster metadata after a failed write (moved leaders, lost brokers).", func() float64 { return float64(a.Sink.MetadataRefreshes()) })
	counter("replication_reconnects_total", "Replication connection re-establishments.", func() float64 { return float64(cs.Reconnects.Load()) })
	reg.MustRegister(skippedCollector{cs})
	reg.MustRegister(filteredCollector{ps})
	reg.MustRegister(tableCollector{st: ps, tables: a.Cfg.Postgres.Tables})
	counter("logical_messages_published_total", "Logical decoding messages published (pipeline.messages).", func() float64 { return float64(ps.Messages.Load()) })
	if a.Incremental != nil {
		is := a.Incremental.Stats()
		reg.MustRegister(snapshotCollector{is})
		gauge("snapshot_running", "Incremental snapshots running or queued.", func() float64 { return float64(is.Running.Load()) })
		counter("snapshot_retries_total", "Incremental snapshot chunks read again (a transaction the chunk's snapshot missed) and database failures retried.",
			func() float64 { return float64(is.Retries.Load()) })
	}
	gauge("inflight_messages", "Messages accepted but not yet durable in Kafka.", func() float64 { return float64(ps.InFlight.Load()) })
	gauge("inflight_bytes", "Bytes of those messages.", func() float64 { return float64(ps.InFlightSize.Load()) })
	gauge("received_lsn", "End LSN of the last transaction received.", func() float64 { return float64(cs.ReceivedLSN.Load()) })
	gauge("confirmed_lsn", "LSN last confirmed to Postgres (flush).", func() float64 { return float64(cs.ConfirmedLSN.Load()) })
	gauge("server_wal_end_lsn", "Server WAL end from the last keepalive.", func() float64 { return float64(cs.ServerWALEnd.Load()) })
	gauge("lag_bytes", "WAL bytes between the server's end and the confirmed LSN.", func() float64 {
		end, conf := cs.ServerWALEnd.Load(), cs.ConfirmedLSN.Load()
		if end > conf {
			return float64(end - conf)
		}
		return 0
	})
	ws := a.Watcher.Stats()
	slot := func(f func(h *capture.SlotHealth) float64) func() float64 {
		return func() float64 {
			if h := a.Watcher.Last(); h != nil {
				return f(h)
			}
			return math.NaN()
		}
	}
	gauge("slot_retained_wal_bytes", "WAL the server keeps for the slot (current LSN - restart_lsn), read every postgres.slot_check_interval.",
		slot(func(h *capture.SlotHealth) float64 { return float64(h.RetainedBytes) }))
	gauge("slot_lag_bytes", "WAL not yet confirmed by the slot (current LSN - confirmed_flush_lsn).",
		slot(func(h *capture.SlotHealth) float64 { return float64(h.LagBytes) }))
	gauge("slot_safe_wal_size_bytes", "WAL that can still be written before max_slot_wal_keep_size endangers the slot (negative once unreserved); NaN when unlimited or lost.",
		slot(func(h *capture.SlotHealth) float64 {
			if h.SafeWALSize == nil {
				return math.NaN()
			}
			return float64(*h.SafeWALSize)
		}))
	gauge("slot_checked_timestamp_seconds", "Unix time of the last successful slot check (the slot metrics are that old).",
		slot(func(h *capture.SlotHealth) float64 { return float64(h.CheckedAt.UnixNano()) / 1e9 }))
	reg.MustRegister(walStatusCollector{a.Watcher})
	gauge("slot_active", "1 while the slot has an active walsender.", slot(func(h *capture.SlotHealth) float64 {
		if h.Active {
			return 1
		}
		return 0
	}))
	counter("slot_check_errors_total", "Failed slot checks (retried on the next interval).", func() float64 { return float64(ws.CheckErrors.Load()) })
	counter("heartbeats_written_total", "Heartbeat messages written (pg_logical_emit_message).", func() float64 { return float64(ws.Heartbeats.Load()) })
	counter("heartbeat_errors_total", "Heartbeat writes that failed.", func() float64 { return float64(ws.HeartbeatErrors.Load()) })
	counter("heartbeats_received_total", "Heartbeat messages received through the replication stream.", func() float64 { return float64(cs.HeartbeatsSeen.Load()) })
	gauge("heartbeat_lag_seconds", "Seconds from the last received heartbeat's write to its receipt (replication lag, also when idle).", func() float64 {
		if cs.HeartbeatsSeen.Load() == 0 {
			return math.NaN()
		}
		return float64(cs.HeartbeatLag.Load()) / 1e9
	})
	gauge("replication_connected", "1 while the replication connection is streaming.", func() float64 {
		if cs.Connected.Load() {
			return 1
		}
		return 0
	})
}

// Ready reports why the capture pipeline is not ready, or nil.
func (a *App) Ready() error {
	if !a.Stream.Stats().Connected.Load() {
		return errors.New("replication not connected")
	}
	if !a.Sink.Healthy() {
		return errors.New("kafka writes failing")
	}
	if h := a.Watcher.Last(); h != nil && h.WALStatus == "lost" {
		return fmt.Errorf("replication slot %q is invalidated (wal_status lost)", h.Slot)
	}
	return nil
}

// Route is one more path of the listener.
type Route struct {
	Path    string
	Handler http.Handler
}

// Serve serves /healthz, /readyz (ready returns nil), /metrics (reg) and
// the admin API under /admin/ (admin, see AdminHandler; nil answers every
// /admin/ request that the API is disabled) on addr until ctx ends, which
// also cancels requests in progress.
func Serve(ctx context.Context, addr string, reg *prometheus.Registry, ready func() error, admin http.Handler, routes ...Route) error {
	mux := http.NewServeMux()
	for _, r := range routes {
		mux.Handle(r.Path, r.Handler)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if admin == nil {
		admin = AdminHandler(AdminDeps{}, nil)
	}
	mux.Handle("/admin/", admin)
	mux.Handle("/", ConsoleHandler())
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// skippedCollector exports tidemark_skipped_changes_total{table}: changes of
// tables that are not configured, skipped (postgres.unknown_tables: skip).
type skippedCollector struct{ st *capture.Stats }

var skippedDesc = prometheus.NewDesc("tidemark_skipped_changes_total",
	"Changes of published tables that are not in postgres.tables, skipped (postgres.unknown_tables: skip).", []string{"table"}, nil)

func (c skippedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- skippedDesc }

func (c skippedCollector) Collect(ch chan<- prometheus.Metric) {
	for table, n := range c.st.Skipped() {
		ch <- prometheus.MustNewConstMetric(skippedDesc, prometheus.CounterValue, float64(n), table)
	}
}

// walStatusCollector exports tidemark_slot_wal_status{status}: 1 for the
// slot's pg_replication_slots.wal_status, 0 for the others (an enum as a
// label, so alerts select by name); "unknown" before the first check.
type walStatusCollector struct{ w *capture.Watcher }

var walStatusDesc = prometheus.NewDesc("tidemark_slot_wal_status",
	"The slot's pg_replication_slots.wal_status (1 for the current one): reserved, extended, unreserved, lost; unknown before the first check or without a slot.", []string{"status"}, nil)

func (c walStatusCollector) Describe(ch chan<- *prometheus.Desc) { ch <- walStatusDesc }

func (c walStatusCollector) Collect(ch chan<- prometheus.Metric) {
	cur := "unknown"
	if h := c.w.Last(); h != nil {
		switch h.WALStatus {
		case "reserved", "extended", "unreserved", "lost":
			cur = h.WALStatus
		}
	}
	for _, s := range []string{"reserved", "extended", "unreserved", "lost", "unknown"} {
		v := 0.0
		if s == cur {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(walStatusDesc, prometheus.GaugeValue, v, s)
	}
}

// tableCollector exports tidemark_table_changes_total{table,op}: row
// changes published per captured table, every configured table from the
// start.
type tableCollector struct {
	st     *pipeline.Stats
	tables []string
}

var tableChangesDesc = prometheus.NewDesc("tidemark_table_changes_total",
	"Row changes published, per captured table and op (c insert, u update, d delete, r snapshot read, t truncate).", []string{"table", "op"}, nil)

func (c tableCollector) Describe(ch chan<- *prometheus.Desc) { ch <- tableChangesDesc }

func (c tableCollector) Collect(ch chan<- prometheus.Metric) {
	got := c.st.Tables()
	seen := map[string]bool{}
	emit := func(table string, tc *pipeline.TableCounts) {
		seen[table] = true
		for _, v := range []struct {
			op string
			n  uint64
		}{{"c", tc.Create.Load()}, {"u", tc.Update.Load()}, {"d", tc.Delete.Load()}, {"r", tc.Read.Load()}, {"t", tc.Truncate.Load()}} {
			ch <- prometheus.MustNewConstMetric(tableChangesDesc, prometheus.CounterValue, float64(v.n), table, v.op)
		}
	}
	for _, t := range c.tables {
		tc := got[t]
		if tc == nil {
			tc = &pipeline.TableCounts{}
		}
		emit(t, tc)
	}
	for t, tc := range got {
		if !seen[t] {
			emit(t, tc)
		}
	}
}

// filteredCollector exports the changes postgres.filters dropped.
type filteredCollector struct{ st *pipeline.Stats }

var filteredDesc = prometheus.NewDesc("tidemark_filtered_changes_total",
	"Changes not published because their rows do not match the table's postgres.filters condition.", []string{"table"}, nil)

func (c filteredCollector) Describe(ch chan<- *prometheus.Desc) { ch <- filteredDesc }

func (c filteredCollector) Collect(ch chan<- prometheus.Metric) {
	for table, n := range c.st.Filtered() {
		ch <- prometheus.MustNewConstMetric(filteredDesc, prometheus.CounterValue, float64(n), table)
	}
}

// snapshotCollector exports the incremental snapshots' per-table counters.
type snapshotCollector struct{ st *capture.IncrementalStats }

var (
	snapshotRowsDesc = prometheus.NewDesc("tidemark_snapshot_rows_total",
		"Incremental snapshot rows published (durable in Kafka).", []string{"table"}, nil)
	snapshotDroppedDesc = prometheus.NewDesc("tidemark_snapshot_rows_dropped_total",
		"Incremental snapshot rows left out because a live change of their key came between the chunk's watermarks (the live change is published instead).", []string{"table"}, nil)
	snapshotChunksDesc = prometheus.NewDesc("tidemark_snapshot_chunks_total",
		"Incremental snapshot chunks published (durable in Kafka).", []string{"table"}, nil)
)

func (c snapshotCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- snapshotRowsDesc
	ch <- snapshotDroppedDesc
	ch <- snapshotChunksDesc
}

func (c snapshotCollector) Collect(ch chan<- prometheus.Metric) {
	for table, t := range c.st.Tables() {
		ch <- prometheus.MustNewConstMetric(snapshotRowsDesc, prometheus.CounterValue, float64(t.Rows.Load()), table)
		ch <- prometheus.MustNewConstMetric(snapshotDroppedDesc, prometheus.CounterValue, float64(t.Dropped.Load()), table)
		ch <- prometheus.MustNewConstMetric(snapshotChunksDesc, prometheus.CounterValue, float64(t.Chunks.Load()), table)
	}
}
