package stripeapi

import (
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v82/webhook"

	"github.com/tallybilling/tally/internal/errs"
)

// WebhookTolerance is Stripe's own tolerance between a signature's timestamp
// and our clock; older (or further future) deliveries are refused as replays.
const WebhookTolerance = 300 * time.Second

// VerifyWebhook checks a webhook delivery's Stripe-Signature header against
// every secret in secrets (several may be configured while a secret is
// rolled) with stripe-go's webhook package, then checks that the signed
// timestamp is within tolerance of now, in either direction.
//
// It checks the signature only: unlike stripe-go's ConstructEvent it neither
// decodes the event nor refuses events of another API version, because
// Stripe sends events in the endpoint's API version, which need not be the
// library's, and tally decodes only the few fields it needs.
//
// Errors: errs.Invalid (missing or malformed header, no matching signature,
// timestamp outside tolerance, no secret configured).
func VerifyWebhook(payload []byte, header string, secrets []string, tolerance time.Duration, now time.Time) error {
	if strings.TrimSpace(header) == "" {
		return errs.E(errs.Invalid, "missing Stripe-Signature header")
	}
	if len(secrets) == 0 {
		return errs.E(errs.Invalid, "no webhook signing secret is configured; set TALLY_STRIPE_WEBHOOK_SECRETS")
	}
	var verified bool
	for _, secret := range secrets {
		err := webhook.ValidatePayloadIgnoringTolerance(payload, header, secret)
		if err == nil {
			verified = true
			break
		}
		if errors.Is(err, webhook.ErrNotSigned) || errors.Is(err, webhook.ErrInvalidHeader) {
			return errs.E(errs.Invalid, "malformed Stripe-Signature header")
		}
	}
	if !verified {
		return errs.E(errs.Invalid, "no valid signature in Stripe-Signature for any configured secret")
	}
	ts, ok := signatureTimestamp(header)
	if !ok {
		return errs.E(errs.Invalid, "malformed Stripe-Signature header: no timestamp")
	}
	if d := now.Sub(ts); d > tolerance || d < -tolerance {
		return errs.E(errs.Invalid, "Stripe-Signature timestamp is %s away from now, beyond the %s tolerance", d.Round(time.Second), tolerance)
	}
	return nil
}

// signatureTimestamp reads t= from a header that stripe-go already accepted.
func signatureTimestamp(header string) (time.Time, bool) {
	for part := range strings.SplitSeq(header, ",") {
		if v, ok := strings.CutPrefix(part, "t="); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return time.Time{}, false
			}
			return time.Unix(n, 0), true
		}
	}
	return time.Time{}, false
}
