package webhook

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestConfigValidate(t *testing.T) {
	withCreds := "https://u:" + testPassword + "@hooks.example.com/inv?token=" + testToken
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string // substrings of the error; none = valid
	}{
		{name: "minimal", cfg: Config{URL: "https://hooks.example.com/inv", Secret: testSecret}},
		{name: "http with port", cfg: Config{URL: "http://127.0.0.1:8080/", Secret: testSecret}},
		{name: "userinfo and query", cfg: Config{URL: withCreds, Secret: testSecret}},
		{
			name: "full",
			cfg: Config{URL: "https://h/x", Secret: testSecret, BatchSize: 10, Timeout: time.Second,
				MaxAttempts: 3, MaxBackoff: time.Second, Header: "X-Hub-Signature-256"},
		},
		{name: "hold", cfg: Config{URL: "https://h/x", Secret: testSecret, OnFailure: OnFailureHold}},
		{name: "dlq", cfg: Config{URL: "https://h/x", Secret: testSecret, OnFailure: OnFailureDLQ, MaxAttempts: 2}},
		{
			name: "hold with max_attempts", cfg: Config{URL: "https://h/x", Secret: testSecret, OnFailure: OnFailureHold, MaxAttempts: 3},
			want: []string{"max_attempts: 3 conflicts with on_failure: hold"},
		},
		{name: "on_failure", cfg: Config{URL: "https://h/x", Secret: testSecret, OnFailure: "drop"}, want: []string{`on_failure: "drop" is not hold or dlq`}},
		{name: "nothing", cfg: Config{}, want: []string{"url: required", "secret: required"}},
		{name: "no secret", cfg: Config{URL: withCreds}, want: []string{"secret: required"}},
		{name: "unparsable URL", cfg: Config{URL: "https://u:" + testPassword + "@h:port/?token=" + testToken, Secret: testSecret}, want: []string{"url: not a valid URL"}},
		{name: "scheme", cfg: Config{URL: "ftp://u:" + testPassword + "@h/", Secret: testSecret}, want: []string{`url: scheme "ftp" is not http or https`}},
		{name: "no scheme", cfg: Config{URL: "hooks.example.com/inv", Secret: testSecret}, want: []string{`url: scheme "" is not http or https`}},
		{name: "no host", cfg: Config{URL: "https:///inv", Secret: testSecret}, want: []string{"url: has no host"}},
		{name: "bad header", cfg: Config{URL: "https://h", Secret: testSecret, Header: "X Sig"}, want: []string{`header: "X Sig" is not a valid HTTP header name`}},
		{name: "header conflict", cfg: Config{URL: "https://h", Secret: testSecret, Header: "x-tidemark-timestamp"}, want: []string{"conflicts with the X-Tidemark-Timestamp header"}},
		{name: "header content type", cfg: Config{URL: "https://h", Secret: testSecret, Header: "Content-Type"}, want: []string{"conflicts with the Content-Type header"}},
		{
			name: "every bad field",
			cfg:  Config{URL: "mailto:x", BatchSize: -1, Timeout: -time.Second, MaxAttempts: -2, MaxBackoff: -time.Millisecond, Header: "a:b"},
			want: []string{"url: scheme", "secret: required", "batch_size: -1", "timeout: -1s", "max_attempts: -2", "max_backoff: -1ms", "header:"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				if _, err := New(tc.cfg, nil); err != nil {
					t.Fatalf("New() = %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q, want it to contain %q", err, w)
				}
			}
			assertNoSecret(t, "Validate() error", err.Error())
			if _, nerr := New(tc.cfg, nil); nerr == nil || !strings.Contains(nerr.Error(), tc.want[0]) {
				t.Errorf("New() = %v, want the validation error", nerr)
			}
		})
	}
}

func TestConfigDefaults(t *testing.T) {
	got := Config{URL: "https://h", Secret: "s"}.withDefaults()
	want := Config{URL: "https://h", Secret: "s", BatchSize: 500, Timeout: 5 * time.Second, MaxAttempts: 5,
		MaxBackoff: 5 * time.Second, Header: "X-Tidemark-Signature", OnFailure: OnFailureDLQ}
	if got != want {
		t.Errorf("withDefaults() = %+v, want %+v", got, want)
	}
}

func TestConfigHidesSecrets(t *testing.T) {
	cfg := Config{URL: "https://u:" + testPassword + "@hooks.example.com/inv?token=" + testToken, Secret: testSecret}
	core, logs := observer.New(zapcore.InfoLevel)
	zap.New(core).Info("config", zap.Object("webhook", cfg), zap.Any("any", cfg))
	for _, s := range []string{cfg.String(), fmt.Sprint(cfg), fmt.Sprintf("%+v", cfg), fmt.Sprintf("%#v", cfg), fmt.Sprint(logs.All()[0].ContextMap())} {
		assertNoSecret(t, "config", s)
		if !strings.Contains(s, "https://hooks.example.com/inv") {
			t.Errorf("%q does not show the URL's host and path", s)
		}
	}
}
