package app

import "github.com/tidemark/tidemark/internal/config"

// HandoverBytes bounds the row bytes waiting between the replication
// connection and the pipeline (capture.Config.BufferBytes): half the
// in-flight byte budget. The process's heap holds both.
func HandoverBytes(cfg *config.Config) int64 { return max(cfg.Pipeline.MaxInFlightBytes/2, 1<<20) }
