package payments

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// MaxQuantity is the most units of a pack or product one checkout buys.
const MaxQuantity = 100

// CheckoutInput asks for a Checkout Session for one catalog item. Amounts
// and credits come from the catalog only.
type CheckoutInput struct {
	CustomerID string
	Item       string
	// Quantity 0 means 1. Plans are always bought once.
	Quantity   int64
	SuccessURL string
	CancelURL  string
}

// CheckoutResult is what the buyer's browser needs.
type CheckoutResult struct {
	PaymentID         string
	CheckoutSessionID string
	URL               string
	ExpiresAt         time.Time
}

// checkoutAnswer is a CheckoutResult as stored for idempotent replay.
type checkoutAnswer struct {
	PaymentID         string    `json:"payment_id"`
	CheckoutSessionID string    `json:"checkout_session_id"`
	URL               string    `json:"url"`
	ExpiresAt         time.Time `json:"expires_at"`
}

// item is a catalog entry resolved for a payment.
type item struct {
	kind        ItemKind
	name        string
	unitAmount  int64
	currency    string
	credits     int64
	expiry      config.Expiry
	stripePrice string
}

func (s *Service) resolve(in *CheckoutInput) (item, error) {
	if err := customers.ValidateID(in.CustomerID); err != nil {
		return item{}, errs.InvalidField("/customer_id", "customer_id must be 1 to 255 characters of A-Za-z0-9_.:@-")
	}
	var it item
	if p, ok := s.catalog.Pack(in.Item); ok {
		it = item{kind: KindCreditPack, name: p.Name, unitAmount: p.Amount, currency: p.Currency, credits: p.Credits, expiry: p.Expiry}
	} else if p, ok := s.catalog.Product(in.Item); ok {
		it = item{kind: KindProduct, name: p.Name, unitAmount: p.Amount, currency: p.Currency}
	} else if p, ok := s.catalog.Plan(in.Item); ok {
		it = item{kind: KindPlan, name: p.Name, stripePrice: p.StripePrice}
	} else {
		return item{}, errs.InvalidField("/item", fmt.Sprintf("%q is not in the catalog", in.Item))
	}
	if in.Quantity == 0 {
		in.Quantity = 1
	}
	if in.Quantity < 1 || in.Quantity > MaxQuantity {
		return item{}, errs.InvalidField("/quantity", fmt.Sprintf("quantity must be between 1 and %d", MaxQuantity))
	}
	if it.kind == KindPlan && in.Quantity != 1 {
		return item{}, errs.InvalidField("/quantity", "a plan is subscribed to once; quantity must be 1")
	}
	// Both products fit in int64: credits ≤ 1e12 and amounts < 1e8, times at most MaxQuantity.
	if it.credits*in.Quantity > config.MaxCredits {
		return item{}, errs.UnprocessableField("/quantity", fmt.Sprintf("%d × %s is %d credits, more than the largest grant (%d); buy at most %d",
			in.Quantity, in.Item, it.credits*in.Quantity, int64(config.MaxCredits), config.MaxCredits/it.credits))
	}
	if it.unitAmount*in.Quantity > config.MaxAmount {
		return item{}, errs.UnprocessableField("/quantity", fmt.Sprintf("%d × %s costs %d, more than Stripe charges in one payment (%d); buy at most %d",
			in.Quantity, in.Item, it.unitAmount*in.Quantity, config.MaxAmount, config.MaxAmount/it.unitAmount))
	}
	if !s.catalog.RedirectAllowed(in.SuccessURL) {
		return item{}, errs.InvalidField("/success_url", "success_url is not under an allowed redirect prefix")
	}
	if !s.catalog.RedirectAllowed(in.CancelURL) {
		return item{}, errs.InvalidField("/cancel_url", "cancel_url is not under an allowed redirect prefix")
	}
	return it, nil
}

// CreateCheckout writes a pending payment for a catalog item, then creates
// its Stripe Checkout Session (idempotency key tally-checkout-<payment id>,
// our ids in the metadata of the session and of its PaymentIntent or
// Subscription), creating the customer and its Stripe Customer on first use.
//
// The payment is committed before Stripe is called, so a session that
// Stripe creates always names a payment we know. When Stripe fails, the
// payment is marked failed with the reason, and the error is returned.
//
// key, when it has a Key, guards the call with db.Reserve / Complete: a
// repeat with the same key and body replays the first answer
// (replayed=true), a concurrent one is refused while the first waits on
// Stripe.
//
// Errors: errs.Invalid (naming /item, /quantity, /success_url or
// /cancel_url), errs.IdempotencyKeyInFlight, errs.IdempotencyKeyReused,
// errs.PaymentProviderError, errs.RateLimited, errs.Unavailable (also when
// no Stripe key is configured).
func (s *Service) CreateCheckout(ctx context.Context, in CheckoutInput, key db.IdempotencyKey) (res CheckoutResult, replayed bool, err error) {
	it, err := s.resolve(&in)
	if err != nil {
		return CheckoutResult{}, false, err
	}
	if s.stripe == nil {
		return CheckoutResult{}, false, errs.E(errs.Unavailable, "checkout is not available: no Stripe key is configured (TALLY_STRIPE_SECRET_KEY)")
	}
	guarded := key.Key != ""
	if guarded {
		stored, again, err := db.Reserve(ctx, s.db, key)
		if err != nil {
			return CheckoutResult{}, false, err
		}
		if again {
			var a checkoutAnswer
			if err := json.Unmarshal(stored, &a); err != nil {
				return CheckoutResult{}, false, fmt.Errorf("payments: stored checkout answer: %w", err)
			}
			return CheckoutResult(a), true, nil
		}
		defer func() {
			if err != nil {
				// Let the client retry with the same key; the failed payment stays for the record.
				if rerr := db.Release(context.WithoutCancel(ctx), s.db, key); rerr != nil {
					s.logger.ErrorContext(ctx, "release idempotency key", "error", rerr)
				}
			}
		}()
	}

	now := s.now()
	paymentID := db.NewID("pay")
	var stripeCustomer string
	err = db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if _, err := customers.Ensure(ctx, tx, in.CustomerID, now); err != nil {
			return err
		}
		c, err := customers.Get(ctx, tx, in.CustomerID)
		if err != nil {
			return err
		}
		stripeCustomer = c.StripeCustomerID
		var expireSeconds *int64
		var expireMonths *int
		switch {
		case it.kind != KindCreditPack:
		case it.expiry.Months > 0:
			expireMonths = &it.expiry.Months
		case it.expiry.Duration > 0:
			secs := int64((it.expiry.Duration + time.Second - 1) / time.Second)
			expireSeconds = &secs
		}
		err = tx.Exec(`INSERT INTO payments (id, customer_id, item, item_kind, quantity, status, unit_amount, amount,
				currency, credits, credits_expire_after_seconds, credits_expire_after_months, livemode, created_at, updated_at)
			VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			paymentID, in.CustomerID, in.Item, string(it.kind), in.Quantity, it.unitAmount, it.unitAmount*in.Quantity,
			it.currency, it.credits*in.Quantity, expireSeconds, expireMonths, s.livemode, now, now).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		return db.Translate(tx.Exec(`INSERT INTO payment_transitions (payment_id, from_status, to_status, applied, reason, created_at)
			VALUES (?, NULL, 'pending', true, 'checkout requested', ?)`, paymentID, now).Error, nil)
	})
	if err != nil {
		return CheckoutResult{}, false, err
	}

	if stripeCustomer == "" {
		stripeCustomer, err = s.linkStripeCustomer(ctx, in.CustomerID)
		if err != nil {
			s.markCreationFailed(ctx, paymentID, err)
			return CheckoutResult{}, false, err
		}
	}

	sin := stripeapi.CheckoutSessionInput{
		PaymentID:         paymentID,
		TallyCustomerID:   in.CustomerID,
		StripeCustomerID:  stripeCustomer,
		Mode:              stripeapi.ModePayment,
		SuccessURL:        in.SuccessURL,
		CancelURL:         in.CancelURL,
		ExpiresAt:         now.Add(s.checkout.ExpiresAfter),
		Metadata:          map[string]string{"tally_item": in.Item},
		ClientReferenceID: paymentID,
	}
	switch it.kind {
	case KindPlan:
		sin.Mode = stripeapi.ModeSubscription
		sin.LineItem = stripeapi.LineItem{StripePrice: it.stripePrice}
	default:
		sin.LineItem = stripeapi.LineItem{Name: it.name, UnitAmount: it.unitAmount, Currency: it.currency, Quantity: in.Quantity}
		// Every one-time payment, credit packs included (design/PRODUCT.md).
		sin.InvoiceCreation = s.checkout.InvoiceCreation
	}
	if s.checkout.ExpiresAfter <= 0 {
		sin.ExpiresAt = time.Time{}
	}
	cs, err := s.stripe.CreateCheckoutSession(ctx, sin)
	if err != nil {
		s.markCreationFailed(ctx, paymentID, err)
		return CheckoutResult{}, false, err
	}
	res = CheckoutResult{PaymentID: paymentID, CheckoutSessionID: cs.ID, URL: cs.URL, ExpiresAt: cs.ExpiresAt}
	if res.ExpiresAt.IsZero() {
		res.ExpiresAt = sin.ExpiresAt
	}
	answer, err := json.Marshal(checkoutAnswer(res))
	if err != nil {
		return CheckoutResult{}, false, err
	}
	err = db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		err := tx.Exec(`UPDATE payments SET checkout_session_id = ?, stripe_customer_id = ?,
				payment_intent_id = COALESCE(payment_intent_id, NULLIF(?, '')), updated_at = ?
			WHERE id = ?`, cs.ID, stripeCustomer, cs.PaymentIntentID, s.now(), paymentID).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		if guarded {
			return db.Complete(ctx, tx, key, answer)
		}
		return nil
	})
	if err != nil {
		return CheckoutResult{}, false, err
	}
	return res, false, nil
}

// linkStripeCustomer creates the customer's Stripe Customer (idempotent at
// Stripe by our id) and records it; when another request linked one first,
// that one wins.
func (s *Service) linkStripeCustomer(ctx context.Context, customerID string) (string, error) {
	sc, err := s.stripe.CreateCustomer(ctx, stripeapi.CustomerInput{TallyCustomerID: customerID})
	if err != nil {
		return "", err
	}
	err = db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		return customers.LinkStripe(ctx, tx, customerID, sc.ID, s.now())
	})
	if errs.Is(err, errs.Conflict) {
		c, gerr := customers.Get(ctx, s.db, customerID)
		if gerr == nil && c.StripeCustomerID != "" {
			return c.StripeCustomerID, nil
		}
	}
	if err != nil {
		return "", err
	}
	return sc.ID, nil
}

// markCreationFailed records that Stripe never gave the payment a session.
// A session Stripe did create despite the error (a lost answer) can still
// succeed later: failed → succeeded is allowed.
func (s *Service) markCreationFailed(ctx context.Context, paymentID string, cause error) {
	ctx = context.WithoutCancel(ctx)
	reason := "checkout session creation failed: " + cause.Error()
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		p, err := load(ctx, tx, paymentID, true)
		if err != nil {
			return err
		}
		ok, err := transition(ctx, tx, p, Failed, EventRef{}, reason)
		if err != nil || !ok {
			return err
		}
		return tx.Exec(`UPDATE payments SET status = 'failed', failure_reason = ?, updated_at = ? WHERE id = ?`,
			reason, s.now(), paymentID).Error
	})
	if err != nil {
		s.logger.ErrorContext(ctx, "mark payment failed after a Stripe error", "payment_id", paymentID, "error", err)
	}
}
