package webhook_test

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/tidemark/tidemark/sinks/webhook"
)

// A receiver checks the signature on the raw body before decoding it.
func ExampleVerify() {
	secret := "shared-secret" // from the receiver's configuration
	http.HandleFunc("POST /tidemark/invalidations", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, "reading body", http.StatusBadRequest)
			return
		}
		err = webhook.Verify(secret, r.Header.Get(webhook.TimestampHeader), string(body),
			r.Header.Get(webhook.DefaultHeader), 5*time.Minute)
		switch {
		case errors.Is(err, webhook.ErrStaleTimestamp):
			http.Error(w, "stale request", http.StatusUnauthorized)
			return
		case err != nil:
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		var p webhook.Payload
		if err := json.Unmarshal(body, &p); err != nil {
			http.Error(w, "bad body", http.StatusBadRequest) // permanent: dead-lettered
			return
		}
		for _, key := range p.Keys {
			_ = key // drop key from the cache; a failure here should answer 503 (retried)
		}
		w.WriteHeader(http.StatusNoContent)
	})
}
