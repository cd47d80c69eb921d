// Package kafkanet holds what every Kafka client of Tidemark shares: the
// connection security (TLS, SASL) and the reading of connection errors an
// operator can act on. The capture producer, the consumers, their
// dead-letter and output producers, the embeddable cache follower, topic
// admin, status and audit all build their kafka-go Transport or Dialer
// here, so one setting reaches all of them.
package kafkanet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	kafkago "github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/sasl"
	"github.com/segmentio/kafka-go/sasl/plain"
	"github.com/segmentio/kafka-go/sasl/scram"
)

// Settings are how a client reaches the brokers.
type Settings struct {
	// TLS, when set, encrypts every connection.
	TLS *tls.Config
	// SASL, when set, authenticates every connection.
	SASL sasl.Mechanism
	// DialTimeout bounds a connection, TLS handshake and SASL exchange
	// included. Default 10s.
	DialTimeout time.Duration
}

func (s Settings) dialTimeout() time.Duration {
	if s.DialTimeout > 0 {
		return s.DialTimeout
	}
	return 10 * time.Second
}

// Transport returns a new kafka-go transport with s's security.
// metadataTTL 0 keeps kafka-go's default.
func (s Settings) Transport(clientID string, metadataTTL time.Duration) *kafkago.Transport {
	return &kafkago.Transport{ClientID: clientID, DialTimeout: s.dialTimeout(), MetadataTTL: metadataTTL,
		TLS: s.tlsConfig(), SASL: s.SASL}
}

// Dialer returns a new kafka-go dialer (for Readers and Conns) with s's
// security.
func (s Settings) Dialer(clientID string) *kafkago.Dialer {
	return &kafkago.Dialer{ClientID: clientID, Timeout: s.dialTimeout(), DualStack: true,
		TLS: s.tlsConfig(), SASLMechanism: s.SASL}
}

// tlsConfig is a copy per client: crypto/tls must not share a Config that
// kafka-go may set ServerName on.
func (s Settings) tlsConfig() *tls.Config {
	if s.TLS == nil {
		return nil
	}
	return s.TLS.Clone()
}

// Mechanism names of the SASL mechanisms Tidemark speaks.
const (
	Plain       = "PLAIN"
	ScramSHA256 = "SCRAM-SHA-256"
	ScramSHA512 = "SCRAM-SHA-512"
)

// Mechanism builds the SASL mechanism name for username and password.
func Mechanism(name, username, password string) (sasl.Mechanism, error) {
	switch strings.ToUpper(name) {
	case Plain:
		return plain.Mechanism{Username: username, Password: password}, nil
	case ScramSHA256:
		return scram.Mechanism(scram.SHA256, username, password)
	case ScramSHA512:
		return scram.Mechanism(scram.SHA512, username, password)
	}
	return nil, fmt.Errorf("unknown SASL mechanism %q (want PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)", name)
}

// AccessError is a failure to reach or use the cluster that waiting
// cannot heal: a TLS handshake the client refuses (unknown CA, wrong
// server name) or the broker refuses, a SASL authentication failure, an
// authorization failure (an ACL), or a plaintext client on a TLS listener.
type AccessError struct {
	Broker string // the address dialled, when known
	What   string // "TLS", "SASL", "authorization", ...
	Detail string // what failed, with the fix
	Err    error
}

func (e *AccessError) Error() string {
	var b strings.Builder
	b.WriteString("kafka ")
	b.WriteString(e.What)
	b.WriteString(" failure")
	if e.Broker != "" {
		b.WriteString(" at broker ")
		b.WriteString(e.Broker)
	}
	b.WriteString(": ")
	b.WriteString(e.Detail)
	if e.Err != nil {
		b.WriteString(" (")
		b.WriteString(e.Err.Error())
		b.WriteString(")")
	}
	return b.String()
}

func (e *AccessError) Unwrap() error { return e.Err }

// IsAccess reports whether err is (or wraps) an AccessError, or an error
// Explain would turn into one.
func IsAccess(err error) bool {
	var a *AccessError
	if errors.As(err, &a) {
		return true
	}
	// Not err != Explain(err): comparing two errors of an uncomparable
	// dynamic type panics.
	return errors.As(Explain(err, "", Settings{}), &a)
}

// Explain turns an error that waiting cannot heal into an *AccessError
// naming broker, the mechanism and what failed; other errors (a broker
// down, a timeout) come back as they are.
func Explain(err error, broker string, s Settings) error {
	if err == nil {
		return nil
	}
	var a *AccessError
	if errors.As(err, &a) {
		return err
	}
	mech := "none"
	if s.SASL != nil {
		mech = s.SASL.Name()
	}
	var (
		unknownCA  x509.UnknownAuthorityError
		unknownCAP *x509.UnknownAuthorityError
		hostErr    x509.HostnameError
		hostErrP   *x509.HostnameError
		invalid    x509.CertificateInvalidError
		verifyErr  *tls.CertificateVerificationError
		recHdr     tls.RecordHeaderError
		alert      tls.AlertError
		kerr       kafkago.Error
	)
	switch {
	case errors.As(err, &unknownCA), errors.As(err, &unknownCAP):
		return &AccessError{Broker: broker, What: "TLS", Err: err,
			Detail: "the broker's certificate is signed by an authority this client does not trust; set kafka.tls.ca_file to the CA that signed it"}
	case errors.As(err, &hostErr), errors.As(err, &hostErrP):
		return &AccessError{Broker: broker, What: "TLS", Err: err,
			Detail: "the broker's certificate does not carry the name dialled; connect by a name in the certificate or set kafka.tls.server_name"}
	case errors.As(err, &invalid):
		return &AccessError{Broker: broker, What: "TLS", Err: err, Detail: "the broker's certificate is not valid"}
	case errors.As(err, &verifyErr):
		return &AccessError{Broker: broker, What: "TLS", Err: err, Detail: "the broker's certificate failed verification"}
	case errors.As(err, &recHdr):
		return &AccessError{Broker: broker, What: "TLS", Err: err,
			Detail: "the broker did not answer the TLS handshake with TLS; is this a plaintext listener? (turn kafka.tls off or use the TLS port)"}
	case errors.As(err, &alert):
		return &AccessError{Broker: broker, What: "TLS", Err: err,
			Detail: "the broker refused the TLS handshake (does it require a client certificate? set kafka.tls.cert_file and key_file)"}
	case errors.As(err, &kerr):
		switch kerr {
		case kafkago.SASLAuthenticationFailed:
			return &AccessError{Broker: broker, What: "SASL", Err: err,
				Detail: fmt.Sprintf("mechanism %s: the broker rejected the username or password (kafka.sasl.username, the password from kafka.sasl.password_file or TIDEMARK_KAFKA_SASL_PASSWORD)", mech)}
		case kafkago.UnsupportedSASLMechanism:
			return &AccessError{Broker: broker, What: "SASL", Err: err,
				Detail: fmt.Sprintf("the broker does not offer mechanism %s; set kafka.sasl.mechanism to one it enables", mech)}
		case kafkago.IllegalSASLState:
			return &AccessError{Broker: broker, What: "SASL", Err: err,
				Detail: fmt.Sprintf("mechanism %s: the broker broke off the SASL exchange (is SASL enabled on this listener?)", mech)}
		case kafkago.TopicAuthorizationFailed:
			return &AccessError{Broker: broker, What: "authorization", Err: err,
				Detail: "an ACL denies this user a topic operation; grant the user Describe, Read (consumers) or Write and Create (capture) on the topics"}
		case kafkago.GroupAuthorizationFailed:
			return &AccessError{Broker: broker, What: "authorization", Err: err,
				Detail: "an ACL denies this user its consumer group; grant the user Read and Describe on the group"}
		case kafkago.ClusterAuthorizationFailed:
			return &AccessError{Broker: broker, What: "authorization", Err: err,
				Detail: "an ACL denies this user a cluster operation; grant it, or create the topics beforehand"}
		}
	}
	return err
}

// Check connects to each bootstrap broker as every client will (TLS,
// SASL) and reads the cluster's metadata, with topics if given (which
// needs Describe on them). It returns an *AccessError for a failure
// waiting cannot heal, naming the broker; a plain connection error is
// returned as is when no broker could be reached. Check succeeds when one
// broker answered (the others may be down).
func Check(ctx context.Context, brokers []string, s Settings, clientID string, topics ...string) error {
	if len(brokers) == 0 {
		return errors.New("no kafka brokers configured")
	}
	d := s.Dialer(clientID)
	var firstErr error
	for _, b := range brokers {
		err := checkBroker(ctx, d, b, topics)
		if err == nil {
			return nil
		}
		err = Explain(err, b, s)
		var a *AccessError
		if errors.As(err, &a) {
			return err // the same for every broker: report it now
		}
		if firstErr == nil {
			firstErr = fmt.Errorf("kafka broker %s: %w", b, describeNet(err))
		}
		if ctx.Err() != nil {
			break
		}
	}
	return firstErr
}

func checkBroker(ctx context.Context, d *kafkago.Dialer, broker string, topics []string) error {
	cctx, cancel := context.WithTimeout(ctx, d.Timeout+5*time.Second)
	defer cancel()
	conn, err := d.DialContext(cctx, "tcp", broker)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(d.Timeout))
	_, err = conn.ReadPartitions(topics...)
	return err
}

// describeNet adds a hint to the connection errors a misconfigured client
// sees: a TLS client on a plaintext listener, or the reverse, shows as a
// connection closed during the exchange.
func describeNet(err error) error {
	var errno syscall.Errno
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.As(err, &errno) && errno == syscall.ECONNRESET:
		return fmt.Errorf("%w (the broker closed the connection: a plaintext client on a TLS or SASL listener? check kafka.tls and kafka.sasl)", err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w (no answer in time: a TLS client on a plaintext listener, a firewall, or the broker down)", err)
	}
	return err
}
