package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"sync/atomic"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/app"
	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/invalidation/integrity"
	"github.com/tidemark/tidemark/invalidation/targets"
)

// cpuProfile writes a CPU profile to the file named by the environment
// variable env, if set, until stop is called.
func cpuProfile(env string) (stop func(), err error) {
	path := os.Getenv(env)
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", env, err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", env, err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

func runCmd() *cobra.Command {
	var path, role string
	var acceptGap, resnapshot bool
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Capture the configured tables into Kafka until interrupted",
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			log, err := newLogger(cfg.Log.Level, cfg.Log.Format)
			if err != nil {
				return &exitError{2, err}
			}
			defer func() { _ = log.Sync() }()
			stop, err := cpuProfile("TIDEMARK_CPUPROFILE")
			if err != nil {
				return err
			}
			defer stop()
			ctx := cmd.Context()
			runCapture := role == "all" || role == "capture"
			runInvalidation := (role == "all" || role == "invalidation") && cfg.Invalidation != nil
			if role == "invalidation" && cfg.Invalidation == nil {
				return &exitError{2, fmt.Errorf("--role invalidation: the config has no invalidation section")}
			}
			runIntegrity := (role == "all" || role == "integrity") && cfg.Integrity != nil
			if role == "integrity" && cfg.Integrity == nil {
				return &exitError{2, fmt.Errorf("--role integrity: the config has no integrity section")}
			}
			runTargets := (role == "all" || role == "targets") && cfg.Targets != nil
			if role == "targets" && cfg.Targets == nil {
				return &exitError{2, fmt.Errorf("--role targets: the config has no targets section")}
			}
			if role != "all" && role != "capture" && role != "invalidation" && role != "integrity" && role != "targets" {
				return &exitError{2, fmt.Errorf("--role %q: want all, capture, invalidation, integrity or targets", role)}
			}
			// The heap holds the in-flight budget and, with targets, a
			// round of notify_targets records of up to max_record_bytes.
			heapBudget := cfg.Pipeline.MaxInFlightBytes + app.HandoverBytes(cfg)
			if runTargets {
				heapBudget += cfg.Targets.MaxRecordBytes
			}
			tuneGC(heapBudget)
			// Kafka first: a certificate, login or ACL problem is named
			// now rather than retried by every client.
			if err := app.PreflightKafka(ctx, cfg, log); err != nil {
				return &exitError{3, err}
			}
			// Prepare every part before starting any, so a bad part stops the
			// process before anything runs.
			reg := app.NewRegistry()
			var ready []func() error
			var a *app.App
			var inv *app.Invalidation
			var opts []app.PrepareOption
			if acceptGap {
				opts = append(opts, app.AcceptGap())
			}
			if resnapshot {
				opts = append(opts, app.Resnapshot())
			}
			prepareCapture := func(ctx context.Context, opts ...app.PrepareOption) (*app.App, error) {
				a, err := app.Prepare(ctx, cfg, log, opts...)
				if err != nil {
					var pe *capture.PreflightError
					var gap *app.SlotGapError
					var rs *app.ResnapshotError
					if errors.As(err, &rs) {
						return nil, &exitError{2, err}
					}
					if errors.As(err, &pe) || errors.As(err, &gap) {
						return nil, &exitError{3, err}
					}
					return nil, err
				}
				a.Register(reg)
				return a, nil
			}
			// Under ha, capture is prepared once this process holds the
			// capture lock (see the capture goroutine below); until then
			// it stands by, and is ready in that role.
			var leader *app.Leader
			var led atomic.Pointer[app.App]
			if runCapture && *cfg.HA.Enabled {
				leader = &app.Leader{DSN: cfg.Postgres.DSN, Slot: cfg.Postgres.Slot, Retry: cfg.HA.Retry, LockTTL: cfg.HA.LockTTL,
					Log: log.With(zap.String("component", "ha"))}
				defer leader.Close()
				leader.Register(reg)
				ready = append(ready, func() error {
					if a := led.Load(); a != nil {
						return a.Ready()
					}
					if leader.IsLeader() {
						return errors.New("capture leader: starting")
					}
					if leader.IsStandby() {
						return nil // a standby serves its role
					}
					return errors.New("capture: electing a leader")
				})
			} else if runCapture {
				if a, err = prepareCapture(ctx, opts...); err != nil {
					return err
				}
				ready = append(ready, a.Ready)
			}
			if runInvalidation {
				if inv, err = app.PrepareInvalidation(ctx, cfg, log); err != nil {
					return &exitError{3, err}
				}
				inv.Register(reg)
			}
			var integ *app.Integrity
			if runIntegrity {
				if integ, err = app.PrepareIntegrity(ctx, cfg, log); err != nil {
					return &exitError{3, err}
				}
				integ.Register(reg)
			}
			var tg *app.Targets
			if runTargets {
				if tg, err = app.PrepareTargets(ctx, cfg, log); err != nil {
					return &exitError{3, err}
				}
				tg.Register(reg)
			}
			g, gctx := errgroup.WithContext(ctx)
			if tg != nil {
				g.Go(func() error {
					err := tg.Run(gctx)
					if err != nil {
						log.Error("targets consumer stopped", zap.Error(err))
					}
					return err
				})
			}
			if integ != nil {
				g.Go(func() error {
					err := integ.Run(gctx)
					if err != nil {
						log.Error("integrity consumer stopped", zap.Error(err))
					}
					return err
				})
			}
			if a != nil || leader != nil {
				g.Go(func() error {
					a := a
					cctx := gctx
					var held chan error
					if leader != nil {
						if err := leader.Acquire(gctx); err != nil {
							if gctx.Err() != nil {
								return nil // stopped while standing by
							}
							log.Error("capture cannot take part in leader election", zap.Error(err))
							return err
						}
						// The lock is confirmed while capture prepares, runs
						// and drains on a stop (so a clean stop keeps its
						// lease while it writes what it holds); losing it
						// stops capture at once, and the Kafka sink's fence
						// refuses every further produce attempt.
						var cancel context.CancelCauseFunc
						cctx, cancel = context.WithCancelCause(gctx)
						defer cancel(nil)
						hctx, stopHold := context.WithCancel(context.WithoutCancel(gctx))
						held = make(chan error, 1)
						go func() {
							err := leader.Hold(hctx)
							if err != nil {
								cancel(err)
							}
							held <- err
						}()
						defer func() { stopHold(); <-held }()
						var err error
						if a, err = prepareCapture(cctx, append(opts, app.WithLeader(leader))...); err != nil {
							if cause := context.Cause(cctx); errors.Is(cause, app.ErrLeadershipLost) {
								err = cause
							}
							log.Error("capture stopped", zap.Error(err))
							return err
						}
						led.Store(a)
					}
					err := a.Run(cctx)
					if held != nil {
						if cause := context.Cause(cctx); errors.Is(cause, app.ErrLeadershipLost) {
							err = errors.Join(cause, err) // exit non-zero: a supervisor restarts it as a standby
						}
					}
					if err != nil {
						log.Error("capture stopped", zap.Error(err))
					}
					if err == nil && gctx.Err() == nil && cfg.Postgres.Snapshot == config.SnapshotInitialOnly {
						return errSnapshotOnly // stops the other roles and the listener
					}
					return err
				})
			}
			if inv != nil {
				g.Go(func() error {
					err := inv.Run(gctx)
					if err != nil {
						log.Error("invalidation consumer stopped", zap.Error(err))
					}
					return err
				})
			}
			if *cfg.HTTP.Listen != "" {
				deps := adminDeps(cfg, log)
				if a != nil && a.Incremental != nil {
					deps.Snapshot = a.Incremental.Enqueue
				} else if leader != nil {
					deps.Snapshot = func(ctx context.Context, req capture.SnapshotRequest) ([]int64, error) {
						if a := led.Load(); a != nil && a.Incremental != nil {
							return a.Incremental.Enqueue(ctx, req)
						}
						return nil, errors.New("this process is a capture standby: send the request to the leader (GET /leader), or use the signal table")
					}
				}
				var routes []app.Route
				if leader != nil {
					routes = append(routes, app.Route{Path: "/leader", Handler: leader.Handler()})
				}
				admin := app.AdminHandler(deps, log)
				if cfg.HTTP.AdminToken != "" {
					log.Info("admin API enabled", zap.String("listen", *cfg.HTTP.Listen), zap.String("path", "/admin/"))
				} else {
					log.Info("admin API disabled (set http.admin_token or " + config.EnvAdminToken + ")")
				}
				g.Go(func() error {
					err := app.Serve(gctx, *cfg.HTTP.Listen, reg, func() error {
						for _, r := range ready {
							if err := r(); err != nil {
								return err
							}
						}
						return nil
					}, admin, routes...)
					if err != nil {
						return fmt.Errorf("http listener %s: %w", *cfg.HTTP.Listen, err)
					}
					return nil
				})
			} else if cfg.HTTP.AdminToken != "" {
				log.Warn("http.admin_token is set but http.listen is empty: the admin API is not served")
			}
			if err := g.Wait(); !errors.Is(err, errSnapshotOnly) {
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&role, "role", "all", "what to run: all, capture, invalidation, integrity or targets")
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	cmd.Flags().BoolVar(&acceptGap, "accept-gap", false,
		"when the replication slot is missing although the topic prefix has published, create a new one at the current WAL position anyway, knowingly leaving the changes committed in between uncaptured")
	cmd.Flags().BoolVar(&resnapshot, "resnapshot", false,
		"recover from a dropped or invalidated replication slot: drop an invalidated one, create it with an exported snapshot and publish every table again before streaming")
	return cmd
}

// adminDeps builds the admin API's features from the config: violations
// with an integrity section, rebuild and audit with a targets section
// (whatever --role runs: they need only the databases and Kafka).
func adminDeps(cfg *config.Config, log *zap.Logger) app.AdminDeps {
	d := app.AdminDeps{
		Token:  cfg.HTTP.AdminToken,
		Status: func(ctx context.Context) (any, error) { return app.CollectStatus(ctx, cfg) },
	}
	if cfg.Integrity != nil {
		d.Violations = func(ctx context.Context, f integrity.Filter) ([]*integrity.Violation, error) {
			return app.ListViolations(ctx, cfg, f)
		}
	}
	if cfg.Targets != nil {
		d.RebuildTargets = func(ctx context.Context, rooms []string, all bool) (targets.RebuildReport, error) {
			return app.RebuildTargets(ctx, cfg, log, rooms, all)
		}
		d.AuditTargets = func(ctx context.Context, sample int) (targets.AuditReport, error) {
			return app.AuditTargets(ctx, cfg, sample, app.DefaultAuditWait)
		}
	}
	return d
}

func checkCmd() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Validate the config and the database without changing anything",
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(path)
			if err != nil {
				return err
			}
			infos, db, problems, err := app.Check(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "config %s: ok\ndatabase %s (%s)\n", path, db, config.Redact(cfg.Postgres.DSN))
			kr, kerr := app.CheckKafka(cmd.Context(), cfg)
			for _, w := range kr.Warnings {
				fmt.Fprintf(out, "  warning: %s\n", w)
			}
			if kerr != nil {
				return &exitError{3, fmt.Errorf("kafka %s: %w", strings.Join(cfg.Kafka.Brokers, ","), kerr)}
			}
			fmt.Fprintf(out, "kafka %s: reachable (%s)\n", strings.Join(cfg.Kafka.Brokers, ","), kr.Security)
			for _, t := range cfg.Postgres.Tables {
				if ti, ok := infos[t]; ok {
					key := fmt.Sprintf("key %v", ti.KeyColumns())
					if ti.Key != nil {
						key = ti.Key.String()
					}
					fmt.Fprintf(out, "  %-32s replica identity %c, %s\n", t, ti.ReplicaIdentity, key)
					if ti.Key != nil && ti.Key.Warning != "" {
						fmt.Fprintf(out, "  warning: %s: %s\n", t, ti.Key.Warning)
					}
				}
			}
			extra, err := app.ExtraTablesWarning(cmd.Context(), cfg, infos)
			if err != nil {
				return err
			}
			if extra != "" {
				fmt.Fprintf(out, "  warning: %s\n", extra)
			}
			if len(problems) > 0 {
				return &exitError{3, &capture.PreflightError{Problems: problems}}
			}
			if cfg.Integrity != nil {
				if err := app.CheckIntegrity(cmd.Context(), cfg); err != nil {
					return &exitError{3, err}
				}
				fmt.Fprintf(out, "integrity rules: %d checked against the tables\n", len(cfg.Integrity.Rules))
			}
			if cfg.Invalidation != nil {
				if err := app.CheckInvalidation(cmd.Context(), cfg); err != nil {
					return &exitError{3, err}
				}
				fmt.Fprintf(out, "invalidation rules: %d checked against the tables\n", len(cfg.Invalidation.Rules))
			}
			if cfg.Targets != nil {
				if err := app.CheckTargets(cmd.Context(), cfg); err != nil {
					return &exitError{3, err}
				}
				fmt.Fprintln(out, "targets mapping: checked against the tables")
			}
			fmt.Fprintln(out, "no problems found")
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML config file (required)")
	return cmd
}

// tuneGC trades a little memory for much less garbage-collection CPU: the
// heap may grow to 5x its live size (GOGC=400), but a soft memory limit of
// twice the byte budget (in flight and in the capture hand-over, plus a
// notify_targets record with the targets role) plus 32 MiB makes the collector work
// harder before the process grows past it (measured on the canonical drain:
// 62 MB RSS at the same CPU per row as with 3x + 40 MiB, which gave 77 MB).
// GOGC and GOMEMLIMIT in the environment take precedence.
func tuneGC(inflightBytes int64) {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(2*inflightBytes + 32<<20)
	}
}

// errSnapshotOnly ends `tidemark run` once capture published its initial
// snapshot under postgres.snapshot: initial_only (exit 0).
var errSnapshotOnly = errors.New("initial snapshot published (postgres.snapshot: initial_only)")
