package stripehook_test

import (
	"context"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/db/dbtest"
	"github.com/tallybilling/tally/internal/stripehook"
)

// An event refused with a long reason full of multi-byte characters (here
// the unknown payment id its metadata names) is parked with the reason cut
// on a character boundary. Cut inside a character, the text was not UTF-8,
// PostgreSQL refused it, the outcome was never recorded and the event was
// processed again and again.
func TestLongReasonsAreStoredCutOnACharacter(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	ctx := context.Background()
	const secret = "whsec_errortext"
	intake := stripehook.New(defaultOptions(t, gdb, secret))
	// Three offsets, so that whatever the reason's prefix, one of them puts
	// the cut inside a three-byte character.
	for i, pad := range []string{"", "a", "ab"} {
		id := "evt_errortext_" + string(rune('a'+i))
		payload := []byte(`{"id":"` + id + `","object":"event","type":"payment_intent.succeeded","livemode":false,"data":{"object":` +
			`{"id":"pi_x","object":"payment_intent","amount":1000,"amount_received":1000,"currency":"usd","status":"succeeded","livemode":false,` +
			`"metadata":{"tally_payment_id":"pay_` + pad + strings.Repeat("€", 900) + `"}}}}`)
		sig := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: time.Now()}).Header
		ack, err := intake.Receive(ctx, payload, sig)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		var stored struct{ Status, LastError string }
		if err := gdb.Raw(`SELECT status, coalesce(last_error, '') AS last_error FROM stripe_events WHERE id = ?`, id).Scan(&stored).Error; err != nil {
			t.Fatal(err)
		}
		status, lastError := stored.Status, stored.LastError
		if ack.Status != stripehook.Parked || status != "parked" {
			t.Fatalf("%s: acknowledged %s, stored %s, want parked", id, ack.Status, status)
		}
		if !utf8.ValidString(lastError) || !strings.HasPrefix(lastError, "refused: metadata names payment pay_") {
			t.Fatalf("%s: last_error %q", id, lastError)
		}
		if len(lastError) > 2000 {
			t.Fatalf("%s: last_error holds %d bytes, more than 2000", id, len(lastError))
		}
	}
}
