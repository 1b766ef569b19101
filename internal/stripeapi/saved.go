package stripeapi

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v82"

	"github.com/tallybilling/tally/internal/errs"
)

// Saved cards and off-session charges (automatic top-up): a Checkout
// Session in setup mode saves a card to the Stripe Customer, a SetupIntent
// or a PaymentIntent tells which one, and a PaymentIntent confirmed
// off-session charges it without the buyer.

// ModeSetup is the Checkout mode that saves a card and charges nothing.
const ModeSetup = "setup"

// KindCard: Stripe refused the charge (402 card_error: a decline, or
// authentication_required off-session). The same charge will fail again.
const KindCard Kind = "card"

// SetupSessionInput describes a setup-mode Checkout Session for one tally
// customer's card.
type SetupSessionInput struct {
	// SetupID names the idempotency key ("tally-setup-<id>"); required.
	SetupID          string
	TallyCustomerID  string // required; copied into metadata
	StripeCustomerID string // required: the card is saved to it
	Currency         string // required by Stripe in setup mode without payment_method_types
	SuccessURL       string
	CancelURL        string
	ExpiresAt        time.Time // zero: Stripe's default (24 h)
}

// PaymentMethod is a saved card: only what tally keeps and may show.
type PaymentMethod struct {
	ID       string
	Customer string
	Brand    string
	Last4    string
	ExpMonth int
	ExpYear  int
}

// SetupIntent is a SetupIntent with its payment method.
type SetupIntent struct {
	ID            string
	Status        string
	Customer      string
	PaymentMethod *PaymentMethod
}

// OffSessionInput charges a saved card without the buyer.
type OffSessionInput struct {
	// PaymentID is the tally payment: it names the idempotency key
	// ("tally-offsession-<id>"), so a retry after a crash or a lost answer
	// gets the first PaymentIntent back instead of charging again.
	PaymentID        string
	TallyCustomerID  string
	StripeCustomerID string
	PaymentMethodID  string
	Amount           int64
	Currency         string
	Description      string
}

// PaymentIntentResult is a PaymentIntent as created and confirmed.
type PaymentIntentResult struct {
	ID             string
	Status         string // succeeded, processing, requires_action, ...
	AmountReceived int64
	Currency       string
}

// CardError is what a KindCard *Error carries: Stripe's code
// (card_declined, authentication_required, ...), decline code, and the
// PaymentIntent it created and left unpaid, when it names one.
type CardError struct {
	Code            string
	DeclineCode     string
	Message         string
	PaymentIntentID string
}

// AsCardError returns the card refusal in err's chain, if it is one.
func AsCardError(err error) (CardError, bool) {
	var ce *cardError
	if errors.As(err, &ce) {
		return ce.CardError, true
	}
	return CardError{}, false
}

// cardError sits below a KindCard *Error (as its cause).
type cardError struct{ CardError }

func (c *cardError) Error() string { return "card refused: " + c.Code }

// SavedCardClient is the part of Stripe automatic top-up uses; Client
// embeds it.
type SavedCardClient interface {
	// CreateSetupSession creates a setup-mode Checkout Session (idempotency
	// key "tally-setup-<SetupID>", tally_customer_id in its metadata and its
	// SetupIntent's). Errors: *Error; invalid_request for missing input.
	CreateSetupSession(ctx context.Context, in SetupSessionInput) (CheckoutSession, error)
	// GetSetupIntent retrieves a SetupIntent with its payment method
	// expanded. Errors: *Error; invalid_request when id is empty.
	GetSetupIntent(ctx context.Context, id string) (SetupIntent, error)
	// GetPaymentMethod retrieves a payment method. Errors: as GetSetupIntent.
	GetPaymentMethod(ctx context.Context, id string) (PaymentMethod, error)
	// ChargeOffSession creates and confirms a PaymentIntent off-session on a
	// saved card, with tally_payment_id and tally_customer_id in its
	// metadata. A refusal is an *Error of KindCard (see AsCardError).
	// Errors: *Error; invalid_request for missing input.
	ChargeOffSession(ctx context.Context, in OffSessionInput) (PaymentIntentResult, error)
	// GetPaymentIntent retrieves a PaymentIntent (GET
	// /v1/payment_intents/{id}) with what a confirmation or a failure
	// reads: catching up with an automatic top-up whose webhooks were lost.
	// Errors: *Error; invalid_request when id is empty.
	GetPaymentIntent(ctx context.Context, id string) (PaymentIntent, error)
}

// PaymentIntent is what tally reads of a retrieved PaymentIntent.
type PaymentIntent struct {
	ID             string
	Status         string
	Amount         int64
	AmountReceived int64
	Currency       string
	Livemode       bool
	Metadata       map[string]string
	// LastError is last_payment_error's message (or code);
	// CancellationReason is set on a canceled one.
	LastError          string
	CancellationReason string
	PaymentMethod      string
}

func (c *client) CreateSetupSession(ctx context.Context, in SetupSessionInput) (CheckoutSession, error) {
	if in.SetupID == "" || in.TallyCustomerID == "" || in.StripeCustomerID == "" || in.SuccessURL == "" || in.Currency == "" {
		return CheckoutSession{}, errs.E(errs.Invalid, "stripeapi: a setup session needs a setup id, both customer ids, a currency and a success URL")
	}
	metadata := map[string]string{MetadataCustomerID: in.TallyCustomerID}
	params := &stripe.CheckoutSessionCreateParams{
		Mode:              stripe.String(ModeSetup),
		Customer:          stripe.String(in.StripeCustomerID),
		Currency:          stripe.String(strings.ToLower(in.Currency)),
		SuccessURL:        stripe.String(in.SuccessURL),
		Metadata:          metadata,
		SetupIntentData:   &stripe.CheckoutSessionCreateSetupIntentDataParams{Metadata: metadata},
		ClientReferenceID: stripe.String(in.SetupID),
	}
	if in.CancelURL != "" {
		params.CancelURL = stripe.String(in.CancelURL)
	}
	if !in.ExpiresAt.IsZero() {
		params.ExpiresAt = stripe.Int64(in.ExpiresAt.Unix())
	}
	params.SetIdempotencyKey("tally-setup-" + in.SetupID)
	ctx, capture := withCapture(ctx)
	s, err := c.api.V1CheckoutSessions.Create(ctx, params)
	if err != nil {
		return CheckoutSession{}, classify("create setup session", err, capture, false)
	}
	return checkoutSession(s), nil
}

func (c *client) GetSetupIntent(ctx context.Context, id string) (SetupIntent, error) {
	if strings.TrimSpace(id) == "" {
		return SetupIntent{}, errs.E(errs.Invalid, "stripeapi: a SetupIntent id is required")
	}
	params := &stripe.SetupIntentRetrieveParams{}
	params.AddExpand("payment_method")
	ctx, capture := withCapture(ctx)
	si, err := c.api.V1SetupIntents.Retrieve(ctx, id, params)
	if err != nil {
		return SetupIntent{}, classify("retrieve setup intent", err, capture, false)
	}
	out := SetupIntent{ID: si.ID, Status: string(si.Status)}
	if si.Customer != nil {
		out.Customer = si.Customer.ID
	}
	if si.PaymentMethod != nil {
		pm := paymentMethod(si.PaymentMethod)
		out.PaymentMethod = &pm
	}
	return out, nil
}

func (c *client) GetPaymentMethod(ctx context.Context, id string) (PaymentMethod, error) {
	if strings.TrimSpace(id) == "" {
		return PaymentMethod{}, errs.E(errs.Invalid, "stripeapi: a payment method id is required")
	}
	ctx, capture := withCapture(ctx)
	pm, err := c.api.V1PaymentMethods.Retrieve(ctx, id, &stripe.PaymentMethodRetrieveParams{})
	if err != nil {
		return PaymentMethod{}, classify("retrieve payment method", err, capture, false)
	}
	return paymentMethod(pm), nil
}

// paymentMethod keeps what tally may store of a card.
func paymentMethod(pm *stripe.PaymentMethod) PaymentMethod {
	out := PaymentMethod{ID: pm.ID}
	if pm.Customer != nil {
		out.Customer = pm.Customer.ID
	}
	if c := pm.Card; c != nil {
		out.Brand, out.Last4, out.ExpMonth, out.ExpYear = string(c.Brand), c.Last4, int(c.ExpMonth), int(c.ExpYear)
	}
	return out
}

func (c *client) ChargeOffSession(ctx context.Context, in OffSessionInput) (PaymentIntentResult, error) {
	if in.PaymentID == "" || in.TallyCustomerID == "" || in.StripeCustomerID == "" || in.PaymentMethodID == "" || in.Amount < 1 || in.Currency == "" {
		return PaymentIntentResult{}, errs.E(errs.Invalid, "stripeapi: an off-session charge needs a payment, both customers, a payment method, a positive amount and a currency")
	}
	params := &stripe.PaymentIntentCreateParams{
		Amount:        stripe.Int64(in.Amount),
		Currency:      stripe.String(strings.ToLower(in.Currency)),
		Customer:      stripe.String(in.StripeCustomerID),
		PaymentMethod: stripe.String(in.PaymentMethodID),
		Confirm:       stripe.Bool(true),
		OffSession:    stripe.Bool(true),
		Metadata:      map[string]string{MetadataPaymentID: in.PaymentID, MetadataCustomerID: in.TallyCustomerID},
	}
	if in.Description != "" {
		params.Description = stripe.String(in.Description)
	}
	params.SetIdempotencyKey("tally-offsession-" + in.PaymentID)
	ctx, capture := withCapture(ctx)
	pi, err := c.api.V1PaymentIntents.Create(ctx, params)
	if err != nil {
		var se *stripe.Error
		if errors.As(err, &se) && se.Type == stripe.ErrorTypeCard {
			ce := &cardError{CardError{Code: string(se.Code), DeclineCode: string(se.DeclineCode), Message: se.Msg}}
			if se.PaymentIntent != nil {
				ce.PaymentIntentID = se.PaymentIntent.ID
			}
			snap := capture.snapshot()
			if se.HTTPStatusCode != 0 {
				snap.status = se.HTTPStatusCode
			}
			e := newError(KindCard, "charge off-session", snap, string(se.Code), se.Msg, ce)
			if e.RequestID == "" {
				e.RequestID = se.RequestID
			}
			return PaymentIntentResult{}, e
		}
		return PaymentIntentResult{}, classify("charge off-session", err, capture, false)
	}
	return PaymentIntentResult{ID: pi.ID, Status: string(pi.Status), AmountReceived: pi.AmountReceived, Currency: string(pi.Currency)}, nil
}

func (c *client) GetPaymentIntent(ctx context.Context, id string) (PaymentIntent, error) {
	if strings.TrimSpace(id) == "" {
		return PaymentIntent{}, errs.E(errs.Invalid, "stripeapi: a PaymentIntent id is required")
	}
	ctx, capture := withCapture(ctx)
	pi, err := c.api.V1PaymentIntents.Retrieve(ctx, id, &stripe.PaymentIntentRetrieveParams{})
	if err != nil {
		return PaymentIntent{}, classify("retrieve payment intent", err, capture, false)
	}
	out := PaymentIntent{
		ID: pi.ID, Status: string(pi.Status), Amount: pi.Amount, AmountReceived: pi.AmountReceived,
		Currency: string(pi.Currency), Livemode: pi.Livemode, Metadata: pi.Metadata,
		CancellationReason: string(pi.CancellationReason),
	}
	if e := pi.LastPaymentError; e != nil {
		out.LastError = e.Msg
		if out.LastError == "" {
			out.LastError = string(e.Code)
		}
	}
	if pi.PaymentMethod != nil {
		out.PaymentMethod = pi.PaymentMethod.ID
	}
	return out, nil
}
