package webhook

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestSign(t *testing.T) {
	// echo -n '1767225600.{"keys":["k"]}' | openssl dgst -sha256 -hmac 'key'
	got := Sign("key", "1767225600", []byte(`{"keys":["k"]}`))
	const want = "sha256=c43731cffdfbfd3d4434490c4fdb7ea450b7450a15962838b2d139f2f2c00ace"
	if got != want {
		t.Fatalf("Sign() = %q, want %q", got, want)
	}
}

func TestVerify(t *testing.T) {
	const body = `{"keys":["room:!r1:members"],"sent_at":"2026-01-01T00:00:00Z"}`
	now := strconv.FormatInt(time.Now().Unix(), 10)
	sig := Sign(testSecret, now, []byte(body))
	ago := func(d time.Duration) string { return strconv.FormatInt(time.Now().Add(-d).Unix(), 10) }
	for _, tc := range []struct {
		name                  string
		secret, ts, body, sig string
		maxSkew               time.Duration
		want                  error
	}{
		{name: "valid", secret: testSecret, ts: now, body: body, sig: sig},
		{name: "valid, uppercase hex", secret: testSecret, ts: now, body: body, sig: "sha256=" + strings.ToUpper(sig[7:])},
		{name: "tampered body", secret: testSecret, ts: now, body: strings.Replace(body, "r1", "r2", 1), sig: sig, want: ErrInvalidSignature},
		{name: "body with a trailing newline", secret: testSecret, ts: now, body: body + "\n", sig: sig, want: ErrInvalidSignature},
		{name: "wrong secret", secret: "other-secret", ts: now, body: body, sig: sig, want: ErrInvalidSignature},
		{name: "empty secret", secret: "", ts: now, body: body, sig: Sign("", now, []byte(body)), want: ErrInvalidSignature},
		{name: "tampered timestamp", secret: testSecret, ts: ago(time.Second), body: body, sig: sig, want: ErrInvalidSignature},
		{name: "no prefix", secret: testSecret, ts: now, body: body, sig: sig[7:], want: ErrInvalidSignature},
		{name: "other algorithm", secret: testSecret, ts: now, body: body, sig: "sha1=" + sig[7:], want: ErrInvalidSignature},
		{name: "not hex", secret: testSecret, ts: now, body: body, sig: "sha256=zz" + sig[9:], want: ErrInvalidSignature},
		{name: "truncated", secret: testSecret, ts: now, body: body, sig: sig[:len(sig)-2], want: ErrInvalidSignature},
		{name: "missing", secret: testSecret, ts: now, body: body, sig: "", want: ErrInvalidSignature},
		{name: "timestamp not a number", secret: testSecret, ts: "yesterday", body: body, sig: Sign(testSecret, "yesterday", []byte(body)), want: ErrInvalidSignature},
		{name: "stale", secret: testSecret, ts: ago(10 * time.Minute), body: body, sig: Sign(testSecret, ago(10*time.Minute), []byte(body)), maxSkew: 5 * time.Minute, want: ErrStaleTimestamp},
		{name: "stale under the default skew", secret: testSecret, ts: ago(6 * time.Minute), body: body, sig: Sign(testSecret, ago(6*time.Minute), []byte(body)), want: ErrStaleTimestamp},
		{name: "within the default skew", secret: testSecret, ts: ago(4 * time.Minute), body: body, sig: Sign(testSecret, ago(4*time.Minute), []byte(body))},
		{name: "from the future", secret: testSecret, ts: ago(-time.Hour), body: body, sig: Sign(testSecret, ago(-time.Hour), []byte(body)), maxSkew: time.Minute, want: ErrStaleTimestamp},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Verify(tc.secret, tc.ts, tc.body, tc.sig, tc.maxSkew)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Verify() = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Verify() = %v, want %v", err, tc.want)
			}
			assertNoSecret(t, "Verify() error", err.Error())
		})
	}
}
