package stripeapi_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

func TestVerifyWebhook(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	// An event in an API version stripe-go would refuse in ConstructEvent.
	payload := []byte(`{"id":"evt_1","object":"event","api_version":"2017-01-01","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1"}}}`)
	secrets := []string{"whsec_old", "whsec_new"}
	signed := func(secret string, at time.Time) string {
		return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: at}).Header
	}
	for _, c := range []struct {
		name    string
		payload []byte
		header  string
		ok      bool
		detail  string
	}{
		{"first secret", payload, signed("whsec_old", now), true, ""},
		{"second secret (rotation)", payload, signed("whsec_new", now), true, ""},
		{"at the tolerance edge", payload, signed("whsec_new", now.Add(-300*time.Second)), true, ""},
		{"clock skew ahead within tolerance", payload, signed("whsec_new", now.Add(299*time.Second)), true, ""},
		{"one of several signatures", payload, signed("whsec_new", now) + ",v1=" + strings.Repeat("ab", 32), true, ""},
		{"stale", payload, signed("whsec_new", now.Add(-301*time.Second)), false, "tolerance"},
		{"from the future", payload, signed("whsec_new", now.Add(301*time.Second)), false, "tolerance"},
		{"unknown secret", payload, signed("whsec_other", now), false, "no valid signature"},
		{"body changed", append([]byte(" "), payload...), signed("whsec_new", now), false, "no valid signature"},
		{"missing header", payload, "", false, "missing"},
		{"malformed header", payload, "t=1,v1", false, "malformed"},
		{"no v1 signature", payload, "t=1800000000,v0=abc", false, "signature"},
	} {
		err := stripeapi.VerifyWebhook(c.payload, c.header, secrets, stripeapi.WebhookTolerance, now)
		if c.ok {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		if !errs.Is(err, errs.Invalid) || !strings.Contains(err.Error(), c.detail) {
			t.Errorf("%s: got %v, want invalid_request mentioning %q", c.name, err, c.detail)
		}
	}
	if err := stripeapi.VerifyWebhook(payload, signed("whsec_new", now), nil, stripeapi.WebhookTolerance, now); !errs.Is(err, errs.Invalid) {
		t.Errorf("no secrets configured: %v", err)
	}
}
