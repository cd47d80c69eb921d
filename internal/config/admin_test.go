package config_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/tidemark/tidemark/internal/config"
)

const adminBase = `postgres:
  dsn: "postgres://tidemark@db:5432/chat"
  tables: [public.events]
kafka:
  brokers: ["k:9092"]
`

// TestAdminToken: http.admin_token from the file, overridden by
// TIDEMARK_ADMIN_TOKEN; a short one is a field error that never shows it.
func TestAdminToken(t *testing.T) {
	const fileToken, envToken = "file-token-0123456789", "env-token-abcdefghijkl"
	cases := []struct {
		name string
		file string
		env  map[string]string
		want string
	}{
		{name: "none: the admin API is off", file: adminBase, want: ""},
		{name: "from the file", file: adminBase + "http:\n  admin_token: " + fileToken + "\n", want: fileToken},
		{name: "from the environment", file: adminBase, env: map[string]string{config.EnvAdminToken: envToken}, want: envToken},
		{
			name: "the environment overrides the file",
			file: adminBase + "http:\n  admin_token: " + fileToken + "\n",
			env:  map[string]string{config.EnvAdminToken: envToken},
			want: envToken,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.Parse("test.yml", []byte(tc.file), env(tc.env))
			if err != nil {
				t.Fatal(err)
			}
			if c.HTTP.AdminToken != tc.want {
				t.Errorf("admin token %q, want %q", c.HTTP.AdminToken, tc.want)
			}
		})
	}
}

func TestAdminTokenErrorsNeverShowIt(t *testing.T) {
	const short = "Sh0rt-t0ken" // 11 characters
	cases := []struct {
		name string
		file string
		env  map[string]string
		path string // the field error expected, "" for none about the token
	}{
		{name: "too short in the file", file: adminBase + "http:\n  admin_token: " + short + "\n", path: "http.admin_token"},
		{name: "too short from the environment", file: adminBase, env: map[string]string{config.EnvAdminToken: short}, path: "http.admin_token"},
		{
			name: "a good token from the environment and another problem",
			file: adminBase + "log:\n  level: loud\n",
			env:  map[string]string{config.EnvAdminToken: short + "-and-long-enough"},
		},
		{
			name: "the token where a list belongs",
			file: adminBase + "http:\n  admin_token: [" + short + "]\n",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := config.Parse("test.yml", []byte(tc.file), env(tc.env))
			if err == nil {
				t.Fatal("Parse accepted the file")
			}
			var ce *config.Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %T: %v", err, err)
			}
			found := false
			for _, p := range ce.Problems {
				found = found || p.Path == tc.path
			}
			if tc.path != "" && !found {
				t.Errorf("no %s problem in:\n%v", tc.path, err)
			}
			for _, out := range []string{err.Error(), fmt.Sprint(err), fmt.Sprintf("%+v", ce.Problems), fmt.Sprintf("%#v", ce.Problems)} {
				if strings.Contains(out, short) {
					t.Errorf("the error shows the token:\n%s", out)
				}
			}
		})
	}
	if _, err := config.Parse("test.yml", []byte(adminBase+"http:\n  admin_token: \"0123456789abcdef\"\n"), noEnv); err != nil {
		t.Errorf("a 16-character token is refused: %v", err)
	}
}

// TestAdminTokenNotPrinted: printing the config (%v, %+v, %#v) masks the
// token.
func TestAdminTokenNotPrinted(t *testing.T) {
	const token = "printed-token-0123456789"
	c, err := config.Parse("test.yml", []byte(adminBase), env(map[string]string{config.EnvAdminToken: token}))
	if err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", *c), fmt.Sprintf("%v", c.HTTP), fmt.Sprint(&c.HTTP)} {
		if strings.Contains(out, token) {
			t.Errorf("printed config shows the token:\n%s", out)
		}
		if !strings.Contains(out, "AdminToken:xxxxx") {
			t.Errorf("printed config does not show the masked token:\n%s", out)
		}
	}
}
