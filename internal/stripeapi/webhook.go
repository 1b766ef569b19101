package stripeapi

import (
	"crypto/hmac"
	"encoding/hex"
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
// rolled), then checks that the signed timestamp is within tolerance of now,
// in either direction.
//
// The header is parsed once, here, and the one timestamp it names is both
// the one the HMAC is computed over and the one the tolerance is applied
// to. A header naming more than one timestamp is refused: with two, one
// could be checked for freshness and the other for the signature, which
// lets a captured delivery be replayed behind a fresh t=.
//
// It checks the signature only: unlike stripe-go's ConstructEvent it neither
// decodes the event nor refuses events of another API version, because
// Stripe sends events in the endpoint's API version, which need not be the
// library's, and tally decodes only the few fields it needs.
//
// Errors: errs.Invalid (missing or malformed header, more than one
// timestamp, no matching signature, timestamp outside tolerance, no secret
// configured).
func VerifyWebhook(payload []byte, header string, secrets []string, tolerance time.Duration, now time.Time) error {
	if strings.TrimSpace(header) == "" {
		return errs.E(errs.Invalid, "missing Stripe-Signature header")
	}
	if len(secrets) == 0 {
		return errs.E(errs.Invalid, "no webhook signing secret is configured; set TALLY_STRIPE_WEBHOOK_SECRETS")
	}
	sh, err := parseSignatureHeader(header)
	if err != nil {
		return err
	}
	if !sh.signedBy(payload, secrets) {
		return errs.E(errs.Invalid, "no valid signature in Stripe-Signature for any configured secret")
	}
	if d := now.Sub(sh.timestamp); d > tolerance || d < -tolerance {
		return errs.E(errs.Invalid, "Stripe-Signature timestamp is %s away from now, beyond the %s tolerance", d.Round(time.Second), tolerance)
	}
	return nil
}

// signatureHeader is a parsed Stripe-Signature header:
// "t=1700000000,v1=<hex>,v1=<hex>,v0=<hex>".
type signatureHeader struct {
	timestamp time.Time
	// signatures are the v1 (HMAC-SHA256) signatures; other schemes are
	// ignored, as Stripe documents.
	signatures [][]byte
}

// parseSignatureHeader reads every element of header. Exactly one t= is
// required; v1 values that are not hex are skipped (Stripe may add schemes
// and we must not fail on one we cannot read), but at least one readable
// v1 must remain. Errors: errs.Invalid.
func parseSignatureHeader(header string) (signatureHeader, error) {
	var (
		sh        signatureHeader
		timestamp bool
	)
	for part := range strings.SplitSeq(header, ",") {
		key, value, ok := strings.Cut(part, "=")
		if !ok || strings.Contains(value, "=") {
			return signatureHeader{}, errs.E(errs.Invalid, "malformed Stripe-Signature header: %q is not key=value", part)
		}
		switch key {
		case "t":
			if timestamp {
				return signatureHeader{}, errs.E(errs.Invalid, "malformed Stripe-Signature header: more than one timestamp (t=)")
			}
			n, err := strconv.ParseInt(value, 10, 64)
			if err != nil {
				return signatureHeader{}, errs.E(errs.Invalid, "malformed Stripe-Signature header: the timestamp is not a whole number of seconds")
			}
			sh.timestamp, timestamp = time.Unix(n, 0), true
		case "v1":
			if sig, err := hex.DecodeString(value); err == nil {
				sh.signatures = append(sh.signatures, sig)
			}
		}
	}
	if !timestamp {
		return signatureHeader{}, errs.E(errs.Invalid, "malformed Stripe-Signature header: no timestamp (t=)")
	}
	if len(sh.signatures) == 0 {
		return signatureHeader{}, errs.E(errs.Invalid, "no valid signature in Stripe-Signature: no v1 signature")
	}
	return sh, nil
}

// signedBy reports whether one of the header's v1 signatures is the HMAC,
// under one of secrets, of the header's own timestamp and payload.
func (sh signatureHeader) signedBy(payload []byte, secrets []string) bool {
	for _, secret := range secrets {
		want := webhook.ComputeSignature(sh.timestamp, payload, secret)
		for _, sig := range sh.signatures {
			if hmac.Equal(want, sig) {
				return true
			}
		}
	}
	return false
}
