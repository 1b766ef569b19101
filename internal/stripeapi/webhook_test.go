package stripeapi_test

import (
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

func TestVerifyWebhook(t *testing.T) {
	t.Parallel()
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
		// A signature captured an hour ago, replayed behind a fresh t=: the
		// HMAC covers the old timestamp, so the fresh one must not count.
		{"replay behind a second t=", payload, fmt.Sprintf("t=%d,", now.Unix()) + signed("whsec_new", now.Add(-time.Hour)), false, "more than one timestamp"},
		{"replay before a second t=", payload, signed("whsec_new", now.Add(-time.Hour)) + fmt.Sprintf(",t=%d", now.Unix()), false, "more than one timestamp"},
		{"the same t= twice", payload, fmt.Sprintf("t=%d,", now.Unix()) + signed("whsec_new", now), false, "more than one timestamp"},
		{"no timestamp", payload, strings.TrimPrefix(signed("whsec_new", now), fmt.Sprintf("t=%d,", now.Unix())), false, "no timestamp"},
		{"timestamp not a number", payload, "t=1e9,v1=" + strings.Repeat("ab", 32), false, "malformed"},
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

// FuzzVerifyWebhook: whatever the header, an accepted delivery names exactly
// one timestamp, that timestamp is within tolerance, and the HMAC of that
// timestamp and the payload is among its v1 signatures. The seeds include
// the replay of a captured signature behind (or before) a fresh t=.
func FuzzVerifyWebhook(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	payload := []byte(`{"id":"evt_1","object":"event","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1"}}}`)
	const secret = "whsec_fuzz"
	fresh := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: now}).Header
	old := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: now.Add(-time.Hour)}).Header
	for _, h := range []string{
		fresh,
		old,
		fmt.Sprintf("t=%d,", now.Unix()) + old,
		old + fmt.Sprintf(",t=%d", now.Unix()),
		fmt.Sprintf("t=%d,", now.Unix()) + fresh,
		fresh + ",v1=" + strings.Repeat("ab", 32),
		fresh + ",v0=" + strings.Repeat("cd", 32),
		"t=,v1=",
		"t=1800000000",
		"v1=" + strings.Repeat("ab", 32),
		"t=1800000000,v1=zz",
		"t=1800000000,,v1=ab",
		"t=-1,v1=ab",
		"t=9223372036854775807,v1=ab",
		"t=1800000000=1,v1=ab",
		"",
	} {
		f.Add(h, payload)
	}
	f.Fuzz(func(t *testing.T, header string, body []byte) {
		err := stripeapi.VerifyWebhook(body, header, []string{secret}, stripeapi.WebhookTolerance, now)
		if err != nil {
			if !errs.Is(err, errs.Invalid) {
				t.Fatalf("error without invalid_request: %v", err)
			}
			return
		}
		var stamps []string
		var sigs []string
		for part := range strings.SplitSeq(header, ",") {
			if v, ok := strings.CutPrefix(part, "t="); ok {
				stamps = append(stamps, v)
			}
			if v, ok := strings.CutPrefix(part, "v1="); ok {
				sigs = append(sigs, v)
			}
		}
		if len(stamps) != 1 {
			t.Fatalf("accepted %q, which names %d timestamps", header, len(stamps))
		}
		var ts int64
		if _, err := fmt.Sscan(stamps[0], &ts); err != nil {
			t.Fatalf("accepted %q with an unreadable timestamp", header)
		}
		if d := now.Sub(time.Unix(ts, 0)); d > stripeapi.WebhookTolerance || d < -stripeapi.WebhookTolerance {
			t.Fatalf("accepted %q, signed %s away from now", header, d)
		}
		want := hex.EncodeToString(webhook.ComputeSignature(time.Unix(ts, 0), body, secret))
		found := false
		for _, s := range sigs {
			found = found || strings.EqualFold(s, want)
		}
		if !found {
			t.Fatalf("accepted %q without the HMAC of its own timestamp", header)
		}
	})
}
