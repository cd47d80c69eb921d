package main

import (
	"fmt"
	"net"

	"github.com/spf13/cobra"

	"github.com/tidemark/tidemark/internal/kafkatest"
)

func devKafkaCmd() *cobra.Command {
	var (
		addr       string
		dataDir    string
		partitions int
	)
	cmd := &cobra.Command{
		Use:   "dev-kafka",
		Short: "Serve an in-memory Kafka (franz-go's kfake) for local work and benchmarks",
		Long: `dev-kafka serves a single-broker Kafka-protocol server (kfake) until
interrupted. It keeps records in memory unless --data-dir is given. It is for
development and benchmarks, not production.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			host, portS, err := net.SplitHostPort(addr)
			if err != nil || host != "127.0.0.1" {
				return &exitError{2, fmt.Errorf("--listen must be 127.0.0.1:PORT (kfake binds loopback only), got %q", addr)}
			}
			var port int
			if _, err := fmt.Sscanf(portS, "%d", &port); err != nil {
				return &exitError{2, fmt.Errorf("--listen port %q: %v", portS, err)}
			}
			// A CPU profile of the broker, for benchmark analysis.
			stop, err := cpuProfile("TIDEMARK_DEVKAFKA_CPUPROFILE")
			if err != nil {
				return err
			}
			defer stop()
			kc, err := kafkatest.StartOn(port, dataDir, partitions)
			if err != nil {
				return err
			}
			defer kc.Close()
			fmt.Fprintf(cmd.OutOrStdout(), "kafka listening on %s\n", kc.Brokers()[0])
			<-cmd.Context().Done()
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "listen", "127.0.0.1:9092", "address to serve on (loopback)")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "persist records here (default: memory only)")
	cmd.Flags().IntVar(&partitions, "default-partitions", 6, "partitions of auto-created topics")
	return cmd
}
