package app

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/tidemark/tidemark/internal/config"
	"github.com/tidemark/tidemark/internal/kafkanet"
)

// KafkaReport is what CheckKafka found.
type KafkaReport struct {
	// Security describes the connection: "plaintext", "TLS", "TLS,
	// SASL SCRAM-SHA-256", ...
	Security string
	// Warnings about the security settings themselves.
	Warnings []string
}

// CheckKafka connects to the bootstrap brokers as every Kafka client of
// Tidemark will (TLS, SASL) and reads the cluster's metadata. A failure
// waiting cannot heal (a certificate not trusted or not naming the broker,
// a rejected SASL login, an ACL) comes back as a *kafkanet.AccessError
// naming the broker and the cause; a cluster that cannot be reached comes
// back as a plain error (callers that run may wait for it).
func CheckKafka(ctx context.Context, cfg *config.Config) (KafkaReport, error) {
	var r KafkaReport
	knet, err := cfg.Kafka.Net()
	if err != nil {
		return r, err
	}
	r.Security = "plaintext"
	if knet.TLS != nil {
		r.Security = "TLS"
		if knet.TLS.InsecureSkipVerify {
			r.Security += " (certificate not verified)"
			r.Warnings = append(r.Warnings, "kafka.tls.insecure_skip_verify is on: the brokers' certificates are not checked, so anyone on the path can pose as a broker")
		}
	}
	if knet.SASL != nil {
		r.Security += ", SASL " + knet.SASL.Name()
		if knet.TLS == nil {
			r.Warnings = append(r.Warnings, fmt.Sprintf("kafka.sasl without kafka.tls: the records travel unencrypted%s",
				map[bool]string{true: ", and PLAIN sends the password in clear", false: ""}[knet.SASL.Name() == kafkanet.Plain]))
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	return r, kafkanet.Check(cctx, cfg.Kafka.Brokers, knet, cfg.Kafka.ClientID)
}

// PreflightKafka is CheckKafka at the start of `tidemark run`: it logs the
// security warnings, returns an access failure (which ends the run), and
// only warns when the cluster cannot be reached yet (each role waits for
// it, with backoff and warnings).
func PreflightKafka(ctx context.Context, cfg *config.Config, log *zap.Logger) error {
	r, err := CheckKafka(ctx, cfg)
	for _, w := range r.Warnings {
		log.Warn(w)
	}
	var access *kafkanet.AccessError
	switch {
	case err == nil:
		log.Info("kafka reachable", zap.Strings("brokers", cfg.Kafka.Brokers), zap.String("security", r.Security))
		return nil
	case errors.As(err, &access):
		return err
	case ctx.Err() != nil:
		return ctx.Err()
	}
	log.Warn("kafka not reachable yet; every role waits for it", zap.Strings("brokers", cfg.Kafka.Brokers), zap.Error(err))
	return nil
}
