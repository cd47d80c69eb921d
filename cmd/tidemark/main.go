// Command tidemark captures Postgres changes into ordered Kafka streams.
// This package is wiring only: flags, logging and the parts from internal/app.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/tidemark/tidemark/capture"
	"github.com/tidemark/tidemark/internal/config"
)

// exitError carries a process exit code.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := &cobra.Command{
		Use:           "tidemark",
		Short:         "Tidemark: Postgres logical replication to ordered Kafka change streams",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(runCmd(), checkCmd(), demoCmd(), devKafkaCmd(), benchCmd())
	root.AddCommand(rebuildCmd(), auditCmd())
	root.AddCommand(violationsCmd(), statusCmd())
	root.AddCommand(dlqCmd(), snapshotCmd(), versionCmd())
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return
	}
	if cmd != nil && cmd.Name() == "run" && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		// run stopped (SIGTERM, ^C) while starting: a clean stop too. Other
		// commands interrupted did not finish, and exit non-zero.
		return
	}
	// A Postgres certificate check that failed says how to fix the DSN.
	fmt.Fprintln(os.Stderr, "tidemark:", capture.ExplainTLS(err))
	var ee *exitError
	if errors.As(err, &ee) {
		os.Exit(ee.code)
	}
	os.Exit(1)
}

// loadConfig loads the file; a bad file is exit code 2.
func loadConfig(path string) (*config.Config, error) {
	if path == "" {
		return nil, &exitError{2, errors.New("--config FILE is required")}
	}
	cfg, err := config.Load(path)
	if err != nil {
		return nil, &exitError{2, err}
	}
	return cfg, nil
}

func newLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, err
	}
	zc := zap.NewProductionConfig()
	if format == "console" {
		zc = zap.NewDevelopmentConfig()
		zc.Development = false
		zc.DisableStacktrace = true
		zc.EncoderConfig.EncodeLevel = zapcore.CapitalLevelEncoder
	}
	zc.Level = zap.NewAtomicLevelAt(lvl)
	zc.OutputPaths = []string{"stderr"}
	return zc.Build()
}
