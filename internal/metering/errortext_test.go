package metering_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/tallybilling/tally/internal/metering"
)

// Stripe's refusal of an event, long and full of multi-byte characters, is
// stored cut on a character boundary and the event dead-lettered. Cut
// inside a character, PostgreSQL refused the text, the outcome was never
// recorded and the event was sent again and again.
func TestLongStripeErrorsAreStoredCutOnACharacter(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	link(t, e.db, "jo")
	e.fake.SetFault(func(r *http.Request) (int, string, bool) {
		body := make([]byte, 4096)
		n, _ := r.Body.Read(body)
		form, _ := url.ParseQuery(string(body[:n]))
		// Three offsets, so that whatever the error's prefix, one of them
		// puts the cut inside a three-byte character.
		pad := strings.TrimPrefix(form.Get("identifier"), "long")
		return http.StatusBadRequest, `{"error":{"type":"invalid_request_error","message":"` + pad + strings.Repeat("€", 500) + `"}}`, true
	})
	ingest(t, e.svc, ev("jo", "long", 1), ev("jo", "longa", 1), ev("jo", "longab", 1))
	startWorker(t, metering.NewWorker(e.workerOptions(t, fastConfig())))
	waitFor(t, "three dead letters", 15*time.Second, func() bool { return countRows(t, e.db, `status = 'dead'`) == 3 })
	for _, id := range []string{"long", "longa", "longab"} {
		got, err := e.svc.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if got.Attempts != 1 || !utf8.ValidString(got.LastError) || !strings.Contains(got.LastError, "€€€") || len(got.LastError) > 1000 {
			t.Errorf("%s: %d attempts, last_error of %d bytes %q", id, got.Attempts, len(got.LastError), got.LastError)
		}
	}
}
