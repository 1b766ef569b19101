package payments

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
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
	expiry      catalog.Expiry
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
	if it.credits*in.Quantity > catalog.MaxCreditsPerMove {
		return item{}, errs.UnprocessableField("/quantity", fmt.Sprintf("%d × %s is %d credits, more than the largest grant (%d); buy at most %d",
			in.Quantity, in.Item, it.credits*in.Quantity, int64(catalog.MaxCreditsPerMove), catalog.MaxCreditsPerMove/it.credits))
	}
	if it.unitAmount*in.Quantity > catalog.MaxChargeMinorUnits {
		return item{}, errs.UnprocessableField("/quantity", fmt.Sprintf("%d × %s costs %d, more than Stripe charges in one payment (%d); buy at most %d",
			in.Quantity, in.Item, it.unitAmount*in.Quantity, catalog.MaxChargeMinorUnits, catalog.MaxChargeMinorUnits/it.unitAmount))
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
// Once the payment is written the work no longer depends on the caller
// staying connected: a client that gives up and retries meets the first
// attempt (in flight, then replayed) rather than a second session.
//
// key, when it has a Key, guards the call with a db.Reservation: a repeat
// with the same key and body replays the first answer (replayed=true), a
// concurrent one is refused while the first waits on Stripe. The
// reservation is renewed while Stripe is called, however long that takes,
// so no retry can take the key over from a live attempt; a failed attempt
// releases it at once, storing nothing, so the retry runs again.
//
// A customer may start at most Checkout.RateLimit checkouts a minute (see
// allowCheckout); a replay does not count, and a refused one spends
// nothing.
//
// Errors: errs.Invalid (naming /item, /quantity, /success_url or
// /cancel_url), errs.IdempotencyKeyInFlight, errs.IdempotencyKeyReused,
// errs.PaymentProviderError, errs.RateLimited (the customer's limit, with
// RetryAfter, or Stripe's), errs.Unavailable (also when no Stripe key is
// configured).
func (s *Service) CreateCheckout(ctx context.Context, in CheckoutInput, key db.IdempotencyKey) (CheckoutResult, bool, error) {
	it, err := s.resolve(&in)
	if err != nil {
		return CheckoutResult{}, false, err
	}
	if s.stripe == nil {
		return CheckoutResult{}, false, errs.E(errs.Unavailable, "checkout is not available: no Stripe key is configured (TALLY_STRIPE_SECRET_KEY)")
	}
	var r *db.Reservation
	if key.Key != "" {
		reserved, err := db.Reserve(ctx, s.db, key, s.reservationLease)
		if err != nil {
			return CheckoutResult{}, false, err
		}
		if reserved.Replayed {
			var a checkoutAnswer
			if err := json.Unmarshal(reserved.Result, &a); err != nil {
				return CheckoutResult{}, false, fmt.Errorf("payments: stored checkout answer: %w", err)
			}
			return CheckoutResult(a), true, nil
		}
		r = &reserved
	}
	res, err := s.limitedCheckout(ctx, in, it, r)
	if err != nil {
		if r != nil {
			// Nothing is stored under the key: the client may retry at
			// once. A failed payment stays on record.
			if rerr := r.Release(context.WithoutCancel(ctx), s.db); rerr != nil {
				s.logger.ErrorContext(ctx, "release idempotency key", "error", rerr)
			}
		}
		return CheckoutResult{}, false, err
	}
	return res, false, nil
}

// limitedCheckout starts the checkout once the customer's rate limit allows it.
func (s *Service) limitedCheckout(ctx context.Context, in CheckoutInput, it item, r *db.Reservation) (CheckoutResult, error) {
	if err := s.allowCheckout(ctx, in.CustomerID); err != nil {
		return CheckoutResult{}, err
	}
	return s.startCheckout(ctx, in, it, r)
}

// startCheckout does the work of CreateCheckout; with r, it holds r while
// Stripe is called and completes it with the answer, in the transaction
// that records the session on the payment.
func (s *Service) startCheckout(ctx context.Context, in CheckoutInput, it item, r *db.Reservation) (CheckoutResult, error) {
	now := s.now()
	paymentID := db.NewID("pay")
	var stripeCustomer string
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
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
		// What Stripe tells later (its ids, amounts, the outcome) starts NULL.
		err = tx.Model(&paymentRow{}).Create(map[string]any{
			"id": paymentID, "customer_id": in.CustomerID, "item": in.Item, "item_kind": string(it.kind),
			"quantity": in.Quantity, "status": string(Pending), "unit_amount": it.unitAmount, "amount": it.unitAmount * in.Quantity,
			"currency": it.currency, "credits": it.credits * in.Quantity, "credits_expire_after_seconds": expireSeconds,
			"credits_expire_after_months": expireMonths, "livemode": s.livemode, "created_at": now, "updated_at": now,
		}).Error
		if err != nil {
			return db.Translate(err, nil)
		}
		return db.Translate(tx.Model(&transitionRow{}).Create(map[string]any{
			"payment_id": paymentID, "from_status": nil, "to_status": string(Pending), "applied": true,
			"reason": "checkout requested", "created_at": now,
		}).Error, nil)
	})
	if err != nil {
		return CheckoutResult{}, err
	}

	// The payment is on record: from here the work runs to its end even if
	// the caller hangs up, and stops only if its reservation is lost.
	work, stop := context.WithCancelCause(context.WithoutCancel(ctx))
	defer stop(nil)
	release := func() {}
	if r != nil {
		release = s.holdReservation(work, *r, stop)
	}
	res, err := s.createSession(work, in, it, paymentID, stripeCustomer, now)
	// Renewals end before the reservation is completed or released.
	release()
	if err != nil {
		if cause := context.Cause(work); cause != nil {
			err = errs.Wrap(err, errs.Unavailable, "the checkout lost its idempotency reservation: %v", cause)
		}
		s.markCreationFailed(work, paymentID, err)
		return CheckoutResult{}, err
	}
	answer, err := json.Marshal(checkoutAnswer(res.CheckoutResult))
	if err != nil {
		return CheckoutResult{}, err
	}
	err = db.InTx(work, s.db, func(tx *gorm.DB) error {
		err := updatePayment(work, tx, paymentID, map[string]any{
			"checkout_session_id": res.CheckoutSessionID, "stripe_customer_id": res.stripeCustomer,
			"payment_intent_id": gorm.Expr("COALESCE(payment_intent_id, ?)", db.NullIfEmpty(res.paymentIntent)), "updated_at": s.now(),
		})
		if err != nil {
			return err
		}
		if r != nil {
			return r.Complete(work, tx, answer)
		}
		return nil
	})
	if err != nil {
		return CheckoutResult{}, err
	}
	return res.CheckoutResult, nil
}

// createdSession is a Checkout Session Stripe created for a payment, with
// what the payment learns from it.
type createdSession struct {
	CheckoutResult
	stripeCustomer string
	paymentIntent  string
}

// createSession links the Stripe customer when needed and creates the
// payment's Checkout Session.
func (s *Service) createSession(ctx context.Context, in CheckoutInput, it item, paymentID, stripeCustomer string, now time.Time) (createdSession, error) {
	if stripeCustomer == "" {
		var err error
		stripeCustomer, err = s.linkStripeCustomer(ctx, in.CustomerID)
		if err != nil {
			return createdSession{}, err
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
		Metadata:          map[string]string{stripeapi.MetadataItem: in.Item},
		ClientReferenceID: paymentID,
	}
	switch it.kind {
	case KindPlan:
		sin.Mode = stripeapi.ModeSubscription
		sin.LineItem = stripeapi.LineItem{StripePrice: it.stripePrice}
	default:
		sin.LineItem = stripeapi.LineItem{Name: it.name, UnitAmount: it.unitAmount, Currency: it.currency, Quantity: in.Quantity}
		// Every one-time payment, credit packs included
		// (TALLY_CHECKOUT_INVOICE_CREATION in the README).
		sin.InvoiceCreation = s.checkout.InvoiceCreation
	}
	cs, err := s.stripe.CreateCheckoutSession(ctx, sin)
	if err != nil {
		return createdSession{}, err
	}
	res := createdSession{
		CheckoutResult: CheckoutResult{PaymentID: paymentID, CheckoutSessionID: cs.ID, URL: cs.URL, ExpiresAt: cs.ExpiresAt},
		stripeCustomer: stripeCustomer,
		paymentIntent:  cs.PaymentIntentID,
	}
	if res.ExpiresAt.IsZero() {
		res.ExpiresAt = sin.ExpiresAt
	}
	return res, nil
}

// holdReservation renews r every third of its lease until the returned
// function is called (which waits for the renewer to stop). When a renewal
// finds the reservation no longer held, or two renewals in a row fail so
// that the lease is about to lapse, it calls lost: the work must stop
// before another request can take the key over and start a second session.
func (s *Service) holdReservation(ctx context.Context, r db.Reservation, lost context.CancelCauseFunc) (release func()) {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(r.Lease / 3)
		defer t.Stop()
		failures := 0
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			err := r.Renew(ctx, s.db)
			switch {
			case err == nil:
				failures = 0
				continue
			case errs.Is(err, errs.Conflict):
				lost(fmt.Errorf("payments: checkout reservation lost: %w", err))
				return
			}
			failures++
			s.logger.WarnContext(ctx, "renew checkout reservation", "error", err, "failures", failures)
			if failures >= 2 {
				lost(fmt.Errorf("payments: checkout reservation could not be renewed: %w", err))
				return
			}
		}
	}()
	return func() {
		close(done)
		<-stopped
	}
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
	reason := creationFailed + ": " + text.Truncate(cause.Error(), 1000)
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		p, err := load(ctx, tx, paymentID, true)
		if err != nil {
			return err
		}
		ok, err := transition(ctx, tx, p, Failed, EventRef{}, reason)
		if err != nil || !ok {
			return err
		}
		return updatePayment(ctx, tx, paymentID, map[string]any{"status": string(Failed), "failure_reason": reason, "updated_at": s.now()})
	})
	if err != nil {
		s.logger.ErrorContext(ctx, "mark payment failed after a Stripe error", "payment_id", paymentID, "error", err)
	}
}
