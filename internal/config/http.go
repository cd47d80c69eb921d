package config

import "fmt"

// redacted stands in for a secret in printed output.
const redacted = "xxxxx"

// String prints h with the admin token masked, so a config printed with
// %v or %+v (a log line, a test failure) never shows it.
func (h HTTP) String() string {
	listen := "<nil>"
	if h.Listen != nil {
		listen = fmt.Sprintf("%q", *h.Listen)
	}
	token := `""`
	if h.AdminToken != "" {
		token = redacted
	}
	return fmt.Sprintf("{Listen:%s AdminToken:%s}", listen, token)
}

// GoString is String for %#v.
func (h HTTP) GoString() string { return "config.HTTP" + h.String() }
