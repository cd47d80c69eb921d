package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// DefaultMaxSkew is the clock skew Verify allows when given 0.
const DefaultMaxSkew = 5 * time.Minute

// signaturePrefix names the algorithm in the signature header's value.
const signaturePrefix = "sha256="

var (
	// ErrInvalidSignature is returned (wrapped) by Verify when the
	// signature, or the timestamp it covers, is missing, malformed or does
	// not match the body and the secret.
	ErrInvalidSignature = errors.New("webhook: invalid signature")
	// ErrStaleTimestamp is returned (wrapped) by Verify for a correctly
	// signed request whose timestamp is further from now than the allowed
	// skew: a replay, or clocks that disagree.
	ErrStaleTimestamp = errors.New("webhook: timestamp outside the allowed clock skew")
)

// Sign returns the signature header value of a request: "sha256=" followed
// by the lowercase hex HMAC-SHA256, keyed by secret, of timestamp + "." +
// body. timestamp is the TimestampHeader value (decimal Unix seconds).
func Sign(secret, timestamp string, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(timestamp))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return signaturePrefix + hex.EncodeToString(mac.Sum(nil))
}

// Verify checks a received request for receivers: timestamp is the
// TimestampHeader value, body the raw request body (before any decoding)
// and signature the signature header value. It returns nil if signature is
// Sign(secret, timestamp, body) and timestamp is within maxSkew of the
// local clock (either way); maxSkew <= 0 means DefaultMaxSkew. The
// signature is compared in constant time. Errors wrap ErrInvalidSignature
// or ErrStaleTimestamp and never contain the secret.
//
// To rotate the secret, accept either key for a while: verify with the new
// secret and, on ErrInvalidSignature, with the old one.
func Verify(secret, timestamp, body, signature string, maxSkew time.Duration) error {
	if secret == "" {
		return fmt.Errorf("%w: verifying needs a non-empty secret", ErrInvalidSignature)
	}
	ts, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return fmt.Errorf("%w: timestamp is not decimal Unix seconds", ErrInvalidSignature)
	}
	hexSig, ok := strings.CutPrefix(signature, signaturePrefix)
	if !ok {
		return fmt.Errorf("%w: signature does not start with %q", ErrInvalidSignature, signaturePrefix)
	}
	got, err := hex.DecodeString(hexSig)
	if err != nil || len(got) != sha256.Size {
		return fmt.Errorf("%w: signature is not %d hex-encoded bytes", ErrInvalidSignature, sha256.Size)
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(timestamp))
	mac.Write([]byte{'.'})
	mac.Write([]byte(body))
	if !hmac.Equal(got, mac.Sum(nil)) {
		return fmt.Errorf("%w: signature does not match the body (wrong secret, or the body or timestamp was altered)", ErrInvalidSignature)
	}
	if maxSkew <= 0 {
		maxSkew = DefaultMaxSkew
	}
	skew := time.Since(time.Unix(ts, 0))
	if skew > maxSkew || skew < -maxSkew {
		return fmt.Errorf("%w: signed at %s, %v from now (allowed: %v)",
			ErrStaleTimestamp, time.Unix(ts, 0).UTC().Format(time.RFC3339), skew.Round(time.Second), maxSkew)
	}
	return nil
}
