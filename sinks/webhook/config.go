package webhook

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"
)

// Defaults for the zero values of Config fields.
const (
	DefaultBatchSize   = 500
	DefaultTimeout     = 5 * time.Second
	DefaultMaxAttempts = 5
	DefaultMaxBackoff  = 5 * time.Second
	DefaultHeader      = "X-Tidemark-Signature"
)

// TimestampHeader carries the request's signing time, in Unix seconds.
const TimestampHeader = "X-Tidemark-Timestamp"

// Config configures the sink. The zero value of each optional field means
// its default. Its String form, and its zap form, show neither the secret
// nor the URL's userinfo and query.
type Config struct {
	// URL is the receiver's endpoint, http or https (required). Userinfo in
	// the URL is sent as HTTP basic authentication. It is never logged or
	// put into errors with its userinfo or query.
	URL string
	// Secret is the HMAC-SHA256 key shared with the receiver (required).
	// Never logged or put into errors.
	Secret string
	// BatchSize is the number of keys per request. Default 500.
	BatchSize int
	// Timeout bounds one try of a request: connecting, sending and reading
	// the response. Default 5s.
	Timeout time.Duration
	// MaxAttempts is the number of tries per batch, the first included,
	// before it is dead-lettered or Invalidate fails. Default 5.
	MaxAttempts int
	// MaxBackoff caps the wait between two tries of a batch (the waits start
	// at 100ms, or MaxBackoff if that is less, and double). Default 5s.
	MaxBackoff time.Duration
	// Header is the name of the signature header. Default
	// "X-Tidemark-Signature".
	Header string
	// OnFailure is what happens to a batch the receiver does not accept.
	// OnFailureDLQ (the default, also for ""): after MaxAttempts tries, or
	// at once for a permanent failure, the batch goes to the dead-letter
	// hook and Invalidate moves on (without a hook, Invalidate returns the
	// error). OnFailureHold: the batch is retried with backoff, without
	// bound and whatever the receiver answers, until it is accepted or ctx
	// ends; Invalidate blocks meanwhile, so its caller holds its offsets.
	// MaxAttempts does not apply to hold and must then be 0. A batch no
	// receiver could take (a key JSON cannot carry) is dead-lettered in
	// either mode.
	OnFailure string
}

// OnFailure values.
const (
	OnFailureDLQ  = "dlq"
	OnFailureHold = "hold"
)

// reservedHeaders are set by the sink or by net/http; the signature header
// may not replace them.
var reservedHeaders = []string{TimestampHeader, "Content-Type", "Content-Length", "Host"}

// Validate reports every problem of c, each by field name. It never shows
// the secret, nor the URL's userinfo.
func (c Config) Validate() error {
	var errs []error
	if c.URL == "" {
		errs = append(errs, errors.New("url: required (an http or https URL)"))
	} else if u, err := url.Parse(c.URL); err != nil {
		// url.Parse's error repeats the whole URL, credentials included.
		errs = append(errs, errors.New("url: not a valid URL (value not shown: it may carry credentials)"))
	} else {
		if u.Scheme != "http" && u.Scheme != "https" {
			errs = append(errs, fmt.Errorf("url: scheme %q is not http or https", u.Scheme))
		} else if u.Host == "" {
			errs = append(errs, errors.New("url: has no host"))
		}
	}
	if c.Secret == "" {
		errs = append(errs, errors.New("secret: required (the HMAC-SHA256 key shared with the receiver)"))
	}
	if c.BatchSize < 0 {
		errs = append(errs, fmt.Errorf("batch_size: %d is negative (0 means the default, %d)", c.BatchSize, DefaultBatchSize))
	}
	if c.Timeout < 0 {
		errs = append(errs, fmt.Errorf("timeout: %v is negative (0 means the default, %v)", c.Timeout, DefaultTimeout))
	}
	if c.MaxAttempts < 0 {
		errs = append(errs, fmt.Errorf("max_attempts: %d is negative (0 means the default, %d)", c.MaxAttempts, DefaultMaxAttempts))
	}
	if c.MaxBackoff < 0 {
		errs = append(errs, fmt.Errorf("max_backoff: %v is negative (0 means the default, %v)", c.MaxBackoff, DefaultMaxBackoff))
	}
	switch c.OnFailure {
	case "", OnFailureDLQ:
	case OnFailureHold:
		if c.MaxAttempts != 0 {
			errs = append(errs, fmt.Errorf("max_attempts: %d conflicts with on_failure: hold, which retries without bound (max_attempts applies to on_failure: dlq only; leave it unset)", c.MaxAttempts))
		}
	default:
		errs = append(errs, fmt.Errorf("on_failure: %q is not %s or %s", c.OnFailure, OnFailureHold, OnFailureDLQ))
	}
	if c.Header != "" {
		if !isToken(c.Header) {
			errs = append(errs, fmt.Errorf("header: %q is not a valid HTTP header name", c.Header))
		} else {
			for _, r := range reservedHeaders {
				if http.CanonicalHeaderKey(c.Header) == r {
					errs = append(errs, fmt.Errorf("header: %q conflicts with the %s header the sink sends", c.Header, r))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// withDefaults returns c with its zero values replaced by the defaults.
func (c Config) withDefaults() Config {
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.MaxBackoff == 0 {
		c.MaxBackoff = DefaultMaxBackoff
	}
	if c.Header == "" {
		c.Header = DefaultHeader
	}
	if c.OnFailure == "" {
		c.OnFailure = OnFailureDLQ
	}
	return c
}

// String describes c with the secret masked and the URL shown without
// userinfo and query.
func (c Config) String() string {
	return fmt.Sprintf("{URL:%s Secret:%s BatchSize:%d Timeout:%v MaxAttempts:%d MaxBackoff:%v Header:%s OnFailure:%s}",
		safeURL(c.URL), mask(c.Secret), c.BatchSize, c.Timeout, c.MaxAttempts, c.MaxBackoff, c.Header, c.OnFailure)
}

// GoString is like String, for the %#v verb.
func (c Config) GoString() string { return "webhook.Config" + c.String() }

// MarshalLogObject lets zap log c (zap.Any, zap.Object) like String does.
func (c Config) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("url", safeURL(c.URL))
	enc.AddString("secret", mask(c.Secret))
	enc.AddInt("batch_size", c.BatchSize)
	enc.AddDuration("timeout", c.Timeout)
	enc.AddInt("max_attempts", c.MaxAttempts)
	enc.AddDuration("max_backoff", c.MaxBackoff)
	enc.AddString("header", c.Header)
	enc.AddString("on_failure", c.OnFailure)
	return nil
}

func mask(secret string) string {
	if secret == "" {
		return ""
	}
	return "xxxxx"
}

// safeURL renders raw as scheme://host/path: userinfo, query and fragment
// may carry credentials and are left out.
func safeURL(raw string) string {
	if raw == "" {
		return ""
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "(invalid URL)"
	}
	s := (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path, RawPath: u.RawPath}).String()
	if u.User != nil {
		s += " (with userinfo)"
	}
	if u.RawQuery != "" {
		s += " (with query)"
	}
	return s
}

// isToken reports whether s is an RFC 9110 token, the syntax of a header
// name.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}
