package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	kafkago "github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/tidemark/tidemark/internal/freeport"
	"github.com/tidemark/tidemark/internal/pgserver"
	"github.com/tidemark/tidemark/internal/redistest"
	"github.com/tidemark/tidemark/pipeline"
)

// Options configure a run. Zero values take the defaults in parentheses.
type Options struct {
	PG           string        // DSN; "" starts a throwaway Postgres
	Brokers      []string      // "" starts `tidemark dev-kafka` as a separate process
	Transactions int           // backlog size (100000)
	Repeat       int           // interleaved drain rounds (15)
	Rate         int           // live transactions per second (2000)
	Duration     time.Duration // live run length (60s)
	Workers      int           // client connections for the workload (4)
	Partitions   int           // partitions of each table topic, created before each round (12)
	HugeRows     int           // rows in the one-transaction phase (1000000; <0 skips)
	Kills        int           // crash phase: SIGKILLs of tidemark run under load (0 skips it)
	CrashRate    int           // crash phase: transactions per second (1500)
	SkipDrain    bool
	SkipLive     bool
	Binary       string // the tidemark binary to run as the measured process
	Out          io.Writer
}

// Round is one interleaved drain round.
type Round struct {
	RecvlogicalSeconds    float64 `json:"pg_recvlogical_seconds"`
	RecvlogicalCPUSeconds float64 `json:"pg_recvlogical_cpu_seconds"`
	TidemarkSeconds       float64 `json:"tidemark_seconds"`
	TidemarkCPUSeconds    float64 `json:"tidemark_cpu_seconds"` // user + system
	TidemarkUserSeconds   float64 `json:"tidemark_user_cpu_seconds"`
	TidemarkSysSeconds    float64 `json:"tidemark_system_cpu_seconds"`
	// Context switches of the Tidemark process (getrusage).
	TidemarkVoluntaryCS   int64   `json:"tidemark_voluntary_context_switches"`
	TidemarkInvoluntaryCS int64   `json:"tidemark_involuntary_context_switches"`
	TidemarkMaxRSSMB      float64 `json:"tidemark_max_rss_mb"`
	Delivered             int64   `json:"delivered"`
	Distinct              int64   `json:"distinct_positions"`
	// CPU seconds of the other processes on this machine (0 when they run
	// elsewhere): the walsender serving each drain, and the broker.
	RecvlogicalWalsenderCPU float64 `json:"pg_recvlogical_walsender_cpu_seconds"`
	TidemarkWalsenderCPU    float64 `json:"tidemark_walsender_cpu_seconds"`
	BrokerCPU               float64 `json:"broker_cpu_seconds"`
}

// Drain is the backlog-drain result.
type Drain struct {
	Transactions          int64   `json:"transactions"`
	Changes               int64   `json:"changes"`
	Rounds                []Round `json:"rounds"`
	RecvlogicalRowsPerSec float64 `json:"pg_recvlogical_rows_per_sec_median"`
	TidemarkRowsPerSec    float64 `json:"tidemark_rows_per_sec_median"`
	Ratio                 float64 `json:"ratio_median"`
	CPUMicrosPerRow       float64 `json:"tidemark_cpu_us_per_row_median"`
	PeakRSSMB             float64 `json:"tidemark_peak_rss_mb"`
	// Medians of the other processes' CPU per row (0 when not measurable).
	RecvlogicalWalsenderMicrosPerRow float64 `json:"pg_recvlogical_walsender_cpu_us_per_row_median"`
	TidemarkWalsenderMicrosPerRow    float64 `json:"tidemark_walsender_cpu_us_per_row_median"`
	BrokerMicrosPerRow               float64 `json:"broker_cpu_us_per_row_median"`
	Exact                            bool    `json:"delivered_exact_no_duplicates"`
	// Spread over the rounds of every figure: min, median, max.
	Spread DrainSpread `json:"spread"`
}

// Spread is the minimum, median and maximum of a figure over the rounds.
type Spread struct {
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	Max    float64 `json:"max"`
}

func spreadOf(xs []float64) Spread {
	if len(xs) == 0 {
		return Spread{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return Spread{Min: s[0], Median: median(s), Max: s[len(s)-1]}
}

// DrainSpread holds the spread of each drain figure (per row: divided by
// the backlog's row changes).
type DrainSpread struct {
	RecvlogicalRowsPerSec     Spread `json:"pg_recvlogical_rows_per_sec"`
	RecvlogicalSeconds        Spread `json:"pg_recvlogical_seconds"`
	RecvlogicalCPUMicros      Spread `json:"pg_recvlogical_cpu_us_per_row"`
	TidemarkRowsPerSec        Spread `json:"tidemark_rows_per_sec"`
	TidemarkSeconds           Spread `json:"tidemark_seconds"`
	Ratio                     Spread `json:"ratio"`
	CPUMicros                 Spread `json:"tidemark_cpu_us_per_row"`
	UserMicros                Spread `json:"tidemark_user_us_per_row"`
	SysMicros                 Spread `json:"tidemark_system_us_per_row"`
	VoluntaryCSPerRow         Spread `json:"tidemark_voluntary_cs_per_row"`
	InvoluntaryCSPerRow       Spread `json:"tidemark_involuntary_cs_per_row"`
	RSSMB                     Spread `json:"tidemark_max_rss_mb"`
	RecvlogicalWalsenderMicro Spread `json:"pg_recvlogical_walsender_us_per_row"`
	TidemarkWalsenderMicros   Spread `json:"tidemark_walsender_us_per_row"`
	BrokerMicros              Spread `json:"broker_us_per_row"`
}

// Live is the live-latency result.
type Live struct {
	Rate                 int     `json:"rate"`
	Seconds              float64 `json:"seconds"`
	Transactions         int64   `json:"transactions"`
	Behind               int64   `json:"ticks_behind"`
	Events               int     `json:"events_measured"`
	Missing              int     `json:"events_missing"`
	ConsumerP50Ms        float64 `json:"commit_to_consumer_p50_ms"`
	ConsumerP99Ms        float64 `json:"commit_to_consumer_p99_ms"`
	ConsumerMaxMs        float64 `json:"commit_to_consumer_max_ms"`
	FirstThirdP99Ms      float64 `json:"first_third_p99_ms"`
	LastThirdP99Ms       float64 `json:"last_third_p99_ms"`
	AckP50Ms             float64 `json:"commit_to_ack_p50_ms"`
	AckP99Ms             float64 `json:"commit_to_ack_p99_ms"`
	AckMaxBucketMs       float64 `json:"commit_to_ack_max_bucket_ms"`
	AckSampleTransaction int64   `json:"commit_to_ack_transactions"`
	RedisDELs            int     `json:"redis_dels_measured,omitempty"`
	RedisP50Ms           float64 `json:"commit_to_redis_del_p50_ms,omitempty"`
	RedisP99Ms           float64 `json:"commit_to_redis_del_p99_ms,omitempty"`
	RedisMaxMs           float64 `json:"commit_to_redis_del_max_ms,omitempty"`
}

// Huge is the one-huge-transaction result.
type Huge struct {
	Rows       int64   `json:"rows"`
	Seconds    float64 `json:"seconds"`
	RowsPerSec float64 `json:"rows_per_sec"`
	CPUMicros  float64 `json:"cpu_us_per_row"`
	MaxRSSMB   float64 `json:"max_rss_mb"`
	Delivered  int64   `json:"delivered"`
	Complete   bool    `json:"complete_and_in_order"`
}

// Result is everything a run measured.
type Result struct {
	Machine string `json:"machine"`
	Drain   *Drain `json:"drain,omitempty"`
	Huge    *Huge  `json:"huge_transaction,omitempty"`
	Live    *Live  `json:"live,omitempty"`
	Crash   *Crash `json:"crash,omitempty"`
}

type env struct {
	o          Options
	stopBroker func()
	brokerPid  int // the dev-kafka process (0 with --brokers)
	dsn        string
	pool       *pgxpool.Pool
	brokers    []string
	tmp        string
	cleanup    []func()
}

func (e *env) close() {
	for i := len(e.cleanup) - 1; i >= 0; i-- {
		e.cleanup[i]()
	}
	if e.stopBroker != nil {
		e.stopBroker()
	}
}

func (e *env) printf(format string, args ...any) { fmt.Fprintf(e.o.Out, format, args...) }

// Run executes the benchmark.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Transactions <= 0 {
		o.Transactions = 100000
	}
	if o.Repeat <= 0 {
		o.Repeat = 15
	}
	if o.Rate <= 0 {
		o.Rate = 2000
	}
	if o.Duration <= 0 {
		o.Duration = 60 * time.Second
	}
	if o.Workers <= 0 {
		o.Workers = 4
	}
	if o.CrashRate <= 0 {
		o.CrashRate = 1500
	}
	if o.Partitions <= 0 {
		o.Partitions = 12
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	e := &env{o: o}
	defer e.close()
	var err error
	if e.tmp, err = os.MkdirTemp("", "tidemark-bench-"); err != nil {
		return nil, err
	}
	e.cleanup = append(e.cleanup, func() { _ = os.RemoveAll(e.tmp) })
	if err := e.startServers(ctx); err != nil {
		return nil, err
	}
	res := &Result{Machine: machine()}
	if !o.SkipDrain {
		if res.Drain, err = e.drain(ctx); err != nil {
			return res, fmt.Errorf("backlog drain: %w", err)
		}
	}
	if o.HugeRows >= 0 {
		if o.HugeRows == 0 {
			o.HugeRows = 1000000
			e.o.HugeRows = o.HugeRows
		}
		if res.Huge, err = e.huge(ctx); err != nil {
			return res, fmt.Errorf("huge transaction: %w", err)
		}
	}
	if !o.SkipLive {
		if res.Live, err = e.live(ctx); err != nil {
			return res, fmt.Errorf("live latency: %w", err)
		}
	}
	if o.Kills > 0 {
		if res.Crash, err = e.crash(ctx); err != nil {
			return res, fmt.Errorf("crash: %w", err)
		}
	}
	return res, nil
}

func machine() string {
	s := fmt.Sprintf("%s/%s, %d CPUs", runtime.GOOS, runtime.GOARCH, runtime.NumCPU())
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				s += ", " + strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			s += fmt.Sprintf(", %.0f GiB", float64(kb)/(1<<20))
		}
	}
	return s
}

func (e *env) startServers(ctx context.Context) error {
	e.dsn = e.o.PG
	if e.dsn == "" {
		e.printf("starting a throwaway Postgres ...\n")
		srv, err := pgserver.Start(ctx, pgserver.Options{ExtraConfig: map[string]string{
			"max_wal_size": "4GB", "logical_decoding_work_mem": "256MB"}})
		if err != nil {
			return fmt.Errorf("starting Postgres (or pass --pg): %w", err)
		}
		e.cleanup = append(e.cleanup, func() { _ = srv.Stop() })
		if e.dsn, err = srv.CreateDatabase(ctx, "bench"); err != nil {
			return err
		}
	}
	pcfg, err := pgxpool.ParseConfig(e.dsn)
	if err != nil {
		return fmt.Errorf("parsing --pg: %w", err)
	}
	pcfg.MaxConns = int32(e.o.Workers + 2)
	if e.pool, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		return err
	}
	e.cleanup = append(e.cleanup, e.pool.Close)
	if _, err := e.pool.Exec(ctx, Schema); err != nil {
		return fmt.Errorf("creating the canonical schema: %w", err)
	}
	if _, err := e.pool.Exec(ctx, Seed); err != nil {
		return fmt.Errorf("seeding: %w", err)
	}
	e.brokers = e.o.Brokers
	if len(e.brokers) == 0 {
		if err := e.restartBroker(); err != nil {
			return err
		}
		e.printf("started dev-kafka (separate process) on %s\n", e.brokers[0])
	}
	return nil
}

// restartBroker (re)starts `tidemark dev-kafka` in its own process, so each
// measured round starts from an empty broker. It does nothing with --brokers.
func (e *env) restartBroker() error {
	if len(e.o.Brokers) > 0 {
		return nil
	}
	if e.stopBroker != nil {
		e.stopBroker()
	}
	port, err := freeport.Get()
	if err != nil {
		return err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(e.o.Binary, "dev-kafka", "--listen", addr)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting dev-kafka: %w", err)
	}
	e.stopBroker = func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() }
	e.brokerPid = cmd.Process.Pid
	e.brokers = []string{addr}
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("dev-kafka did not listen on %s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *env) exec(ctx context.Context, sql string, args ...any) error {
	_, err := e.pool.Exec(ctx, sql, args...)
	return err
}

// metadataClient is a Kafka client with a transport of its own whose
// metadata is fresh (kafka-go caches it for 6 s by default, which would
// hide the topics Tidemark creates and delay the count). Close its idle
// connections when done (Transport.CloseIdleConnections).
func (e *env) metadataClient() *kafkago.Client {
	return &kafkago.Client{Addr: kafkago.TCP(e.brokers...), Timeout: 10 * time.Second,
		Transport: &kafkago.Transport{MetadataTTL: 20 * time.Millisecond}}
}

func (e *env) lsn(ctx context.Context, sql string) (pipeline.LSN, error) {
	var s string
	if err := e.pool.QueryRow(ctx, sql).Scan(&s); err != nil {
		return 0, err
	}
	return pipeline.ParseLSN(s)
}

// publish (re)creates bench_pub over tables.
func (e *env) publish(ctx context.Context, tables ...string) error {
	_ = e.exec(ctx, "DROP PUBLICATION IF EXISTS bench_pub")
	return e.exec(ctx, "CREATE PUBLICATION bench_pub FOR TABLE "+strings.Join(tables, ", "))
}

// freshSlot (re)creates a pgoutput slot at the current WAL position.
func (e *env) freshSlot(ctx context.Context, slot string) error {
	_ = e.exec(ctx, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
	return e.exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
}

func (e *env) drain(ctx context.Context) (*Drain, error) {
	if err := e.publish(ctx, Tables...); err != nil {
		return nil, err
	}
	if err := e.freshSlot(ctx, "bench_base"); err != nil {
		return nil, err
	}
	e.cleanup = append(e.cleanup, func() {
		_, _ = e.pool.Exec(context.Background(), "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'bench_%'")
	})
	e.printf("building a backlog of %d transactions ...\n", e.o.Transactions)
	tally := &Tally{}
	g := &generator{pool: e.pool, prefix: "d", tally: tally}
	start := time.Now()
	err := g.runCount(ctx, e.o.Transactions, e.o.Workers, func(done int64) {
		e.printf("\r  %d/%d transactions", done, e.o.Transactions)
	})
	e.printf("\r  %d transactions, %d row changes in %.1fs\n", tally.Transactions.Load(), tally.Changes.Load(), time.Since(start).Seconds())
	if err != nil {
		return nil, err
	}
	end, err := e.lsn(ctx, "SELECT pg_current_wal_insert_lsn()::text")
	if err != nil {
		return nil, err
	}
	for {
		flushed, err := e.lsn(ctx, "SELECT pg_current_wal_flush_lsn()::text")
		if err != nil {
			return nil, err
		}
		if flushed >= end {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	d := &Drain{Transactions: tally.Transactions.Load(), Changes: tally.Changes.Load(), Exact: true}
	recv, err := findTool("pg_recvlogical")
	if err != nil {
		return nil, err
	}
	for i := 1; i <= e.o.Repeat; i++ {
		var r Round
		// pg_recvlogical on its own copy of the backlog.
		slot := fmt.Sprintf("bench_rl_%d", i)
		if err := e.exec(ctx, "SELECT pg_copy_logical_replication_slot('bench_base', $1)", slot); err != nil {
			return nil, err
		}
		ws := e.sampleWalsender(ctx, slot)
		t0 := time.Now()
		rl := exec.CommandContext(ctx, recv, "-d", e.dsn, "-S", slot, "--start", "-E", end.String(),
			"-o", "proto_version=1", "-o", "publication_names=bench_pub", "-f", "/dev/null", "--no-loop")
		out, err := rl.CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("pg_recvlogical: %v: %s", err, out)
		}
		r.RecvlogicalSeconds = time.Since(t0).Seconds()
		if ru, ok := rl.ProcessState.SysUsage().(*syscall.Rusage); ok {
			r.RecvlogicalCPUSeconds = time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
		}
		r.RecvlogicalWalsenderCPU = ws.Stop().Seconds()
		_ = e.exec(ctx, "SELECT pg_drop_replication_slot($1)", slot)

		// Tidemark on another copy, to a Kafka in another process.
		slot = fmt.Sprintf("bench_tm_%d", i)
		if err := e.exec(ctx, "SELECT pg_copy_logical_replication_slot('bench_base', $1)", slot); err != nil {
			return nil, err
		}
		prefix := fmt.Sprintf("bench%d_%d", time.Now().Unix()%100000, i)
		if err := e.restartBroker(); err != nil {
			return nil, err
		}
		if err := e.createTopics(ctx, prefix); err != nil {
			return nil, err
		}
		ws = e.sampleWalsender(ctx, slot)
		var brokerCPU0 time.Duration
		if e.brokerPid != 0 {
			brokerCPU0, _ = procCPU(e.brokerPid)
		}
		if err := e.tidemarkDrain(ctx, &r, slot, prefix, d.Changes, func() {
			r.TidemarkWalsenderCPU = ws.Stop().Seconds()
			if c, ok := procCPU(e.brokerPid); ok && e.brokerPid != 0 {
				r.BrokerCPU = (c - brokerCPU0).Seconds()
			}
		}); err != nil {
			ws.Stop()
			return nil, err
		}
		_ = e.exec(ctx, "SELECT pg_drop_replication_slot($1)", slot)
		if r.Delivered != d.Changes || r.Distinct != d.Changes {
			d.Exact = false
		}
		d.Rounds = append(d.Rounds, r)
		us := func(sec float64) float64 { return sec * 1e6 / float64(d.Changes) }
		e.printf("  round %2d: pg_recvlogical %.2fs %.0f rows/s | tidemark %.2fs %.0f rows/s (%.2fx), CPU %.2f µs/row (user %.2f, sys %.2f), %.2f cs/row, %.0f MB | delivered %d/%d distinct %d\n",
			i, r.RecvlogicalSeconds, float64(d.Changes)/r.RecvlogicalSeconds, r.TidemarkSeconds, float64(d.Changes)/r.TidemarkSeconds,
			r.RecvlogicalSeconds/r.TidemarkSeconds, us(r.TidemarkCPUSeconds), us(r.TidemarkUserSeconds), us(r.TidemarkSysSeconds),
			float64(r.TidemarkVoluntaryCS+r.TidemarkInvoluntaryCS)/float64(d.Changes), r.TidemarkMaxRSSMB,
			r.Delivered, d.Changes, r.Distinct)
		e.printf("            CPU µs/row: pg_recvlogical %.2f, walsender %.2f (pg_recvlogical) / %.2f (tidemark), broker %.2f\n",
			us(r.RecvlogicalCPUSeconds), us(r.RecvlogicalWalsenderCPU), us(r.TidemarkWalsenderCPU), us(r.BrokerCPU))
	}
	var rl, tm, ratio, cpu, wrl, wtm, bk []float64
	for _, r := range d.Rounds {
		wrl = append(wrl, r.RecvlogicalWalsenderCPU*1e6/float64(d.Changes))
		wtm = append(wtm, r.TidemarkWalsenderCPU*1e6/float64(d.Changes))
		bk = append(bk, r.BrokerCPU*1e6/float64(d.Changes))
		rl = append(rl, float64(d.Changes)/r.RecvlogicalSeconds)
		tm = append(tm, float64(d.Changes)/r.TidemarkSeconds)
		ratio = append(ratio, r.RecvlogicalSeconds/r.TidemarkSeconds)
		cpu = append(cpu, r.TidemarkCPUSeconds*1e6/float64(d.Changes))
		d.PeakRSSMB = math.Max(d.PeakRSSMB, r.TidemarkMaxRSSMB)
	}
	d.RecvlogicalRowsPerSec, d.TidemarkRowsPerSec, d.Ratio, d.CPUMicrosPerRow = median(rl), median(tm), median(ratio), median(cpu)
	d.RecvlogicalWalsenderMicrosPerRow, d.TidemarkWalsenderMicrosPerRow, d.BrokerMicrosPerRow = median(wrl), median(wtm), median(bk)
	per := func(f func(r Round) float64) Spread {
		xs := make([]float64, len(d.Rounds))
		for i, r := range d.Rounds {
			xs[i] = f(r)
		}
		return spreadOf(xs)
	}
	n := float64(d.Changes)
	d.Spread = DrainSpread{
		RecvlogicalRowsPerSec:     spreadOf(rl),
		RecvlogicalSeconds:        per(func(r Round) float64 { return r.RecvlogicalSeconds }),
		RecvlogicalCPUMicros:      per(func(r Round) float64 { return r.RecvlogicalCPUSeconds * 1e6 / n }),
		TidemarkRowsPerSec:        spreadOf(tm),
		TidemarkSeconds:           per(func(r Round) float64 { return r.TidemarkSeconds }),
		Ratio:                     spreadOf(ratio),
		CPUMicros:                 spreadOf(cpu),
		UserMicros:                per(func(r Round) float64 { return r.TidemarkUserSeconds * 1e6 / n }),
		SysMicros:                 per(func(r Round) float64 { return r.TidemarkSysSeconds * 1e6 / n }),
		VoluntaryCSPerRow:         per(func(r Round) float64 { return float64(r.TidemarkVoluntaryCS) / n }),
		InvoluntaryCSPerRow:       per(func(r Round) float64 { return float64(r.TidemarkInvoluntaryCS) / n }),
		RSSMB:                     per(func(r Round) float64 { return r.TidemarkMaxRSSMB }),
		RecvlogicalWalsenderMicro: spreadOf(wrl),
		TidemarkWalsenderMicros:   spreadOf(wtm),
		BrokerMicros:              spreadOf(bk),
	}
	return d, nil
}

// createTopics creates the round's table topics with Options.Partitions
// partitions each and its transactions topic with one, as an operator would
// before the first start (Tidemark's default config leaves existing topics
// as they are).
func (e *env) createTopics(ctx context.Context, prefix string) error {
	client := &kafkago.Client{Addr: kafkago.TCP(e.brokers...), Timeout: 10 * time.Second}
	req := &kafkago.CreateTopicsRequest{}
	for _, t := range e.tableTopics(prefix) {
		req.Topics = append(req.Topics, kafkago.TopicConfig{Topic: t, NumPartitions: e.o.Partitions, ReplicationFactor: 1})
	}
	req.Topics = append(req.Topics, kafkago.TopicConfig{Topic: prefix + ".transaction", NumPartitions: 1, ReplicationFactor: 1})
	resp, err := client.CreateTopics(ctx, req)
	if err != nil {
		return fmt.Errorf("creating the round's topics: %w", err)
	}
	for t, err := range resp.Errors {
		if err != nil {
			return fmt.Errorf("creating topic %s: %w", t, err)
		}
	}
	return nil
}

func findTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	sort.Strings(matches)
	if len(matches) > 0 {
		return matches[len(matches)-1], nil
	}
	return "", fmt.Errorf("%s not found (install postgresql-client)", name)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (e *env) writeConfig(slot, prefix, httpAddr string, extra ...string) (string, error) {
	var b strings.Builder
	// snapshot: never: the benchmark measures the stream (its rounds
	// create their slots themselves, or count only live changes).
	fmt.Fprintf(&b, "postgres:\n  dsn: %q\n  slot: %s\n  publication: bench_pub\n  manage_publication: false\n  snapshot: never\n  tables: [%s]\n",
		e.dsn, slot, strings.Join(Tables, ", "))
	fmt.Fprintf(&b, "kafka:\n  brokers: [%s]\n  topic_prefix: %s\n  partitions: %d\n", quoteAll(e.brokers), prefix, e.o.Partitions)
	fmt.Fprintf(&b, "http:\n  listen: %q\nlog:\n  level: warn\n", httpAddr)
	for _, x := range extra {
		b.WriteString(x)
	}
	path := filepath.Join(e.tmp, prefix+".yml")
	return path, os.WriteFile(path, []byte(b.String()), 0o600)
}

func quoteAll(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

func (e *env) tableTopics(prefix string) []string {
	out := make([]string, len(Tables))
	for i, t := range Tables {
		out[i] = prefix + "." + t
	}
	return out
}

// delivered sums the end offsets of topics (0 for topics not yet created).
func (e *env) delivered(ctx context.Context, client *kafkago.Client, topics []string) (int64, error) {
	meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: topics})
	if err != nil {
		return 0, err
	}
	req := map[string][]kafkago.OffsetRequest{}
	for _, t := range meta.Topics {
		if t.Error != nil {
			continue
		}
		for _, p := range t.Partitions {
			req[t.Name] = append(req[t.Name], kafkago.LastOffsetOf(p.ID))
		}
	}
	if len(req) == 0 {
		return 0, nil
	}
	resp, err := client.ListOffsets(ctx, &kafkago.ListOffsetsRequest{Topics: req})
	if err != nil {
		return 0, err
	}
	var n int64
	for _, ps := range resp.Topics {
		for _, p := range ps {
			if p.Error == nil {
				n += p.LastOffset
			}
		}
	}
	return n, nil
}

func (e *env) tidemarkDrain(ctx context.Context, r *Round, slot, prefix string, want int64, delivered func()) error {
	path, err := e.writeConfig(slot, prefix, "")
	if err != nil {
		return err
	}
	topics := e.tableTopics(prefix)
	if err := e.runUntilDelivered(ctx, r, path, topics, want, delivered); err != nil {
		return err
	}
	if r.Distinct, err = e.distinctPositions(ctx, topics); err != nil {
		return err
	}
	client := &kafkago.Client{Addr: kafkago.TCP(e.brokers...), Timeout: 10 * time.Second}
	_, _ = client.DeleteTopics(ctx, &kafkago.DeleteTopicsRequest{Topics: append(topics, prefix+".transaction")})
	return nil
}

// runUntilDelivered runs `tidemark run --config path` as a separate process
// until topics hold want messages, then stops it and records its wall time,
// CPU time, peak RSS and the final delivered count.
func (e *env) runUntilDelivered(ctx context.Context, r *Round, path string, topics []string, want int64, delivered func()) error {
	client := e.metadataClient()
	defer client.Transport.(*kafkago.Transport).CloseIdleConnections()
	cmd := exec.CommandContext(ctx, e.o.Binary, "run", "--config", path)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if os.Getenv("TIDEMARK_BENCH_DEBUG") != "" {
		// The run's whole stderr (e.g. GODEBUG=gctrace=1), kept after the run.
		f, err := os.Create(filepath.Join(os.TempDir(), "tidemark-bench-"+strings.TrimSuffix(filepath.Base(path), ".yml")+".log"))
		if err != nil {
			return err
		}
		defer f.Close()
		cmd.Stderr = io.MultiWriter(&stderr, f)
		e.printf("  (stderr of this round: %s)\n", f.Name())
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Minute)
	var n int64
	var first time.Duration
	defer func() {
		if os.Getenv("TIDEMARK_BENCH_DEBUG") != "" {
			e.printf("  (first message after %s, all after %.2fs)\n", first, r.TidemarkSeconds)
		}
	}()
	for {
		var err error
		n, err = e.delivered(ctx, client, topics)
		if n > 0 && first == 0 {
			first = time.Since(t0)
		}
		if err == nil && n >= want {
			r.TidemarkSeconds = time.Since(t0).Seconds()
			if delivered != nil {
				delivered()
			}
			break
		}
		select {
		case err := <-exited:
			return fmt.Errorf("tidemark exited early: %v\n%s", err, stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return fmt.Errorf("tidemark did not deliver %d changes within 10 minutes (%d so far)", want, n)
		}
	}
	// Let in-flight acknowledgements land, then stop it cleanly.
	time.Sleep(200 * time.Millisecond)
	peak, peakOK := procPeakRSS(cmd.Process.Pid)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := <-exited; err != nil {
		return fmt.Errorf("tidemark run: %v\n%s", err, stderr.String())
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.TidemarkCPUSeconds = time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
		r.TidemarkUserSeconds = time.Duration(ru.Utime.Nano()).Seconds()
		r.TidemarkSysSeconds = time.Duration(ru.Stime.Nano()).Seconds()
		r.TidemarkVoluntaryCS, r.TidemarkInvoluntaryCS = ru.Nvcsw, ru.Nivcsw
		r.TidemarkMaxRSSMB = float64(ru.Maxrss) / 1024
	}
	if peakOK {
		r.TidemarkMaxRSSMB = peak // see procPeakRSS
	}
	var err error
	r.Delivered, err = e.delivered(ctx, client, topics)
	return err
}

// distinctPositions counts distinct (commit LSN, seq) header pairs.
func (e *env) distinctPositions(ctx context.Context, topics []string) (int64, error) {
	seen := map[[2]uint64]struct{}{}
	for _, t := range topics {
		conn, err := kafkago.DialContext(ctx, "tcp", e.brokers[0])
		if err != nil {
			return 0, err
		}
		parts, err := conn.ReadPartitions(t)
		conn.Close()
		if err != nil {
			return 0, err
		}
		for _, p := range parts {
			if err := e.scanPartition(ctx, t, p.ID, func(m kafkago.Message) {
				var lsn, seq uint64
				for _, h := range m.Headers {
					switch h.Key {
					case "tidemark-lsn":
						lsn, _ = strconv.ParseUint(string(h.Value), 10, 64)
					case "tidemark-seq":
						seq, _ = strconv.ParseUint(string(h.Value), 10, 64)
					}
				}
				seen[[2]uint64{lsn, seq}] = struct{}{}
			}); err != nil {
				return 0, err
			}
		}
	}
	return int64(len(seen)), nil
}

func (e *env) scanPartition(ctx context.Context, topic string, part int, fn func(kafkago.Message)) error {
	conn, err := kafkago.DialLeader(ctx, "tcp", e.brokers[0], topic, part)
	if err != nil {
		return err
	}
	defer conn.Close()
	last, err := conn.ReadLastOffset()
	if err != nil {
		return err
	}
	if _, err := conn.Seek(0, kafkago.SeekAbsolute); err != nil {
		return err
	}
	for off := int64(0); off < last; {
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		batch := conn.ReadBatch(1, 16<<20)
		for {
			m, err := batch.ReadMessage()
			if err != nil {
				break
			}
			fn(m)
			off = m.Offset + 1
		}
		if err := batch.Close(); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

func (e *env) live(ctx context.Context) (*Live, error) {
	if err := e.publish(ctx, Tables...); err != nil {
		return nil, err
	}
	slot := "bench_live"
	if err := e.freshSlot(ctx, slot); err != nil {
		return nil, err
	}
	port, err := freeport.Get()
	if err != nil {
		return nil, err
	}
	httpAddr := fmt.Sprintf("127.0.0.1:%d", port)
	prefix := fmt.Sprintf("live%d", time.Now().Unix()%100000)
	// Cache invalidation (when redis-server is installed): the same process
	// runs the invalidation consumer with a rule keyed by event id, and the
	// Redis sink PUBLISHes each key after its DEL, which the bench receives.
	var extra []string
	var rsub *redis.PubSub
	if rs, err := redistest.Start(ctx); err == nil {
		defer func() { _ = rs.Stop() }()
		extra = append(extra, fmt.Sprintf("invalidation:\n  topic: false\n  redis: {addr: %q, channel: bench-inv}\n  rules:\n    - table: public.events\n      keys: [\"event:{event_id}\"]\n      ops: [c]\n", rs.Addr()))
		rsub = rs.Client().Subscribe(ctx, "bench-inv")
		defer rsub.Close()
		if _, err := rsub.Receive(ctx); err != nil {
			return nil, fmt.Errorf("subscribing to the invalidation channel: %w", err)
		}
	} else {
		e.printf("  (no redis-server: skipping commit-to-Redis-DEL latency: %v)\n", err)
	}
	path, err := e.writeConfig(slot, prefix, httpAddr, extra...)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, e.o.Binary, "run", "--config", path)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() }()

	// Wait for the topics, then follow the events topic from its end.
	topic := prefix + ".public.events"
	client := &kafkago.Client{Addr: kafkago.TCP(e.brokers...), Timeout: 5 * time.Second}
	var parts []int
	deadline := time.Now().Add(30 * time.Second)
	for len(parts) == 0 {
		if meta, err := client.Metadata(ctx, &kafkago.MetadataRequest{Topics: []string{topic}}); err == nil && len(meta.Topics) == 1 && meta.Topics[0].Error == nil {
			for _, p := range meta.Topics[0].Partitions {
				parts = append(parts, p.ID)
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("tidemark did not create %s: %s", topic, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	committed := sync.Map{}
	type recv struct {
		id string
		at time.Time
	}
	received := make(chan recv, 1<<16)
	rctx, stopReaders := context.WithCancel(ctx)
	defer stopReaders()
	var rwg sync.WaitGroup
	// One client fetching every partition in one long-polling session (a
	// reader per partition would load the broker with fetches and skew the
	// latencies it measures), from the end of each.
	offsets := map[int32]kgo.Offset{}
	for _, p := range parts {
		offsets[int32(p)] = kgo.NewOffset().AtEnd()
	}
	kc, err := kgo.NewClient(kgo.SeedBrokers(e.brokers...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: offsets}),
		kgo.FetchMaxWait(time.Second), kgo.FetchMinBytes(1))
	if err != nil {
		return nil, fmt.Errorf("live consumer: %w", err)
	}
	rwg.Add(1)
	go func() {
		defer rwg.Done()
		defer kc.Close()
		var env struct {
			After struct {
				EventID string `json:"event_id"`
			} `json:"after"`
		}
		for rctx.Err() == nil {
			fs := kc.PollFetches(rctx)
			at := time.Now()
			fs.EachRecord(func(r *kgo.Record) {
				if json.Unmarshal(r.Value, &env) == nil {
					received <- recv{env.After.EventID, at}
				}
			})
		}
	}()
	var lat []struct {
		at time.Time
		d  time.Duration
	}
	var lwg sync.WaitGroup
	lwg.Add(1)
	var pending = map[string]time.Time{}
	go func() {
		defer lwg.Done()
		for r := range received {
			if c, ok := committed.Load(r.id); ok {
				lat = append(lat, struct {
					at time.Time
					d  time.Duration
				}{r.at, r.at.Sub(c.(time.Time))})
			} else {
				pending[r.id] = r.at
			}
		}
	}()
	type delRecv struct {
		key string
		at  time.Time
	}
	// Every PUBLISH is recorded as it arrives (go-redis drops messages when
	// its channel is not drained for a minute).
	var dels []delRecv
	var dwg sync.WaitGroup
	if rsub != nil {
		dwg.Add(1)
		go func() {
			defer dwg.Done()
			for m := range rsub.Channel() {
				dels = append(dels, delRecv{m.Payload, time.Now()})
			}
		}()
	}
	time.Sleep(time.Second) // readers positioned at the end

	// The workload commits with synchronous_commit=on.
	pcfg, err := pgxpool.ParseConfig(e.dsn)
	if err != nil {
		return nil, err
	}
	pcfg.MaxConns = int32(e.o.Workers)
	pcfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, "SET synchronous_commit = on")
		return err
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	tally := &Tally{}
	var events int
	var emu sync.Mutex
	g := &generator{pool: pool, prefix: "l", tally: tally, onEvent: func(id string, at time.Time) {
		committed.Store(id, at)
		emu.Lock()
		events++
		emu.Unlock()
	}}
	// The earlier phases wrote GBs of WAL; without a checkpoint now, the one
	// they trigger lands in the middle of the live run and its fsyncs stall
	// the synchronous commits being measured (seen: p99 4 ms in the first
	// third, 190 ms in the last).
	if err := e.exec(ctx, "CHECKPOINT"); err != nil {
		e.printf("live: CHECKPOINT before the run failed (%v); a checkpoint may disturb the latencies\n", err)
	}
	e.printf("live: %d tx/s with synchronous_commit=on for %s ...\n", e.o.Rate, e.o.Duration)
	start := time.Now()
	behind, err := g.runRate(ctx, e.o.Rate, e.o.Workers, e.o.Duration)
	elapsed := time.Since(start)
	if err != nil {
		return nil, err
	}
	time.Sleep(2 * time.Second) // stragglers
	stopReaders()
	rwg.Wait()
	close(received)
	lwg.Wait()
	var delLat []float64
	if rsub != nil {
		_ = rsub.Close()
		dwg.Wait()
		for _, d := range dels {
			id := strings.TrimPrefix(d.key, "event:")
			if c, ok := committed.Load(id); ok {
				delLat = append(delLat, math.Max(0, float64(d.at.Sub(c.(time.Time)))/1e6))
			}
		}
		sort.Float64s(delLat)
	}
	// Events received before their commit was recorded (the consumer beat
	// the client's own bookkeeping): the latency is at most the gap.
	for id, at := range pending {
		if c, ok := committed.Load(id); ok {
			d := at.Sub(c.(time.Time))
			if d < 0 {
				d = 0
			}
			lat = append(lat, struct {
				at time.Time
				d  time.Duration
			}{at, d})
		}
	}
	l := &Live{Rate: e.o.Rate, Seconds: elapsed.Seconds(), Transactions: tally.Transactions.Load(), Behind: behind, Events: len(lat), Missing: events - len(lat)}
	sort.Slice(lat, func(i, j int) bool { return lat[i].at.Before(lat[j].at) })
	ds := func(xs []struct {
		at time.Time
		d  time.Duration
	}) []float64 {
		out := make([]float64, len(xs))
		for i, x := range xs {
			out[i] = float64(x.d) / 1e6
		}
		sort.Float64s(out)
		return out
	}
	all := ds(lat)
	if len(all) > 0 {
		l.ConsumerP50Ms, l.ConsumerP99Ms, l.ConsumerMaxMs = quantile(all, .5), quantile(all, .99), all[len(all)-1]
		third := len(lat) / 3
		l.FirstThirdP99Ms = quantile(ds(lat[:third]), .99)
		l.LastThirdP99Ms = quantile(ds(lat[len(lat)-third:]), .99)
	}
	if len(delLat) > 0 {
		l.RedisDELs = len(delLat)
		l.RedisP50Ms, l.RedisP99Ms, l.RedisMaxMs = quantile(delLat, .5), quantile(delLat, .99), delLat[len(delLat)-1]
	}
	if err := scrapeAck(ctx, httpAddr, l); err != nil {
		e.printf("  (could not read commit-to-ack histogram: %v)\n", err)
	}
	return l, nil
}

func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// scrapeAck reads tidemark_commit_to_ack_seconds from the child's /metrics
// and estimates p50/p99 by linear interpolation inside histogram buckets.
func scrapeAck(ctx context.Context, addr string, l *Live) error {
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	type bucket struct{ le, count float64 }
	var bs []bucket
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, `tidemark_commit_to_ack_seconds_bucket{le="`) {
			continue
		}
		rest := strings.TrimPrefix(line, `tidemark_commit_to_ack_seconds_bucket{le="`)
		i := strings.Index(rest, `"}`)
		if i < 0 {
			continue
		}
		le, err1 := strconv.ParseFloat(rest[:i], 64)
		c, err2 := strconv.ParseFloat(strings.TrimSpace(rest[i+2:]), 64)
		if err1 == nil && err2 == nil {
			bs = append(bs, bucket{le, c})
		}
	}
	if len(bs) == 0 {
		return errors.New("histogram not found")
	}
	total := bs[len(bs)-1].count
	l.AckSampleTransaction = int64(total)
	q := func(p float64) float64 {
		target := p * total
		prevLe, prevC := 0.0, 0.0
		for _, b := range bs {
			if b.count >= target {
				if math.IsInf(b.le, 1) {
					return prevLe * 1000
				}
				if b.count == prevC {
					return b.le * 1000
				}
				return (prevLe + (b.le-prevLe)*(target-prevC)/(b.count-prevC)) * 1000
			}
			prevLe, prevC = b.le, b.count
		}
		return prevLe * 1000
	}
	l.AckP50Ms, l.AckP99Ms = q(.5), q(.99)
	for _, b := range bs {
		if b.count >= total && !math.IsInf(b.le, 1) {
			l.AckMaxBucketMs = b.le * 1000
			break
		}
	}
	return nil
}

// huge commits one transaction of HugeRows rows and times Tidemark (a
// separate process) publishing all of it, recording its peak RSS: the
// transaction must stream through the bounded pipeline, not be held whole.
func (e *env) huge(ctx context.Context) (*Huge, error) {
	n := e.o.HugeRows
	if err := e.exec(ctx, `DROP TABLE IF EXISTS bench_huge; CREATE TABLE bench_huge (id bigint PRIMARY KEY, room_id text NOT NULL, body text NOT NULL)`); err != nil {
		return nil, err
	}
	if err := e.publish(ctx, "public.bench_huge"); err != nil {
		return nil, err
	}
	slot := "bench_huge"
	if err := e.freshSlot(ctx, slot); err != nil {
		return nil, err
	}
	e.printf("huge transaction: committing %d rows in one transaction ...\n", n)
	if err := e.exec(ctx, `INSERT INTO bench_huge SELECT g, '!r' || (g % 500) || ':bench.test', 'a message body of ordinary length for a chat room, number ' || g FROM generate_series(1, $1) g`, n); err != nil {
		return nil, err
	}
	if err := e.restartBroker(); err != nil {
		return nil, err
	}
	prefix := fmt.Sprintf("huge%d", time.Now().Unix()%100000)
	var b strings.Builder
	fmt.Fprintf(&b, "postgres:\n  dsn: %q\n  slot: %s\n  publication: bench_pub\n  manage_publication: false\n  tables: [public.bench_huge]\n", e.dsn, slot)
	fmt.Fprintf(&b, "kafka:\n  brokers: [%s]\n  topic_prefix: %s\n  partitions: %d\n", quoteAll(e.brokers), prefix, e.o.Partitions)
	fmt.Fprintf(&b, "http:\n  listen: \"\"\nlog:\n  level: warn\n")
	path := filepath.Join(e.tmp, prefix+".yml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return nil, err
	}
	var r Round
	topics := []string{prefix + ".public.bench_huge"}
	if err := e.runUntilDelivered(ctx, &r, path, topics, int64(n), nil); err != nil {
		return nil, err
	}
	_ = e.exec(ctx, "SELECT pg_drop_replication_slot($1)", slot)
	h := &Huge{Rows: int64(n), Seconds: r.TidemarkSeconds, RowsPerSec: float64(n) / r.TidemarkSeconds,
		CPUMicros: r.TidemarkCPUSeconds * 1e6 / float64(n), MaxRSSMB: r.TidemarkMaxRSSMB, Delivered: r.Delivered}
	// Complete and in order: every seq 0..n-1 of the transaction, each
	// partition's positions increasing.
	seen := make([]bool, n)
	complete := true
	client := &kafkago.Client{Addr: kafkago.TCP(e.brokers...), Timeout: 10 * time.Second}
	conn, err := kafkago.DialContext(ctx, "tcp", e.brokers[0])
	if err != nil {
		return nil, err
	}
	parts, err := conn.ReadPartitions(topics[0])
	conn.Close()
	if err != nil {
		return nil, err
	}
	for _, p := range parts {
		last := int64(-1)
		if err := e.scanPartition(ctx, topics[0], p.ID, func(m kafkago.Message) {
			for _, hd := range m.Headers {
				if hd.Key == "tidemark-seq" {
					seq, _ := strconv.ParseInt(string(hd.Value), 10, 64)
					if seq <= last || seq >= int64(n) {
						complete = false
					} else {
						seen[seq] = true
					}
					last = seq
				}
			}
		}); err != nil {
			return nil, err
		}
	}
	for _, ok := range seen {
		complete = complete && ok
	}
	h.Complete = complete && r.Delivered == int64(n)
	_, _ = client.DeleteTopics(ctx, &kafkago.DeleteTopicsRequest{Topics: append(topics, prefix+".transaction")})
	e.printf("  %d rows in %.1fs (%.0f rows/s), %.2f µs CPU/row, peak RSS %.0f MB, complete and in order: %v\n",
		n, h.Seconds, h.RowsPerSec, h.CPUMicros, h.MaxRSSMB, h.Complete)
	return h, nil
}
