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
	// SavePaymentMethod keeps the card for automatic top-up (credit packs
	// only): Checkout with setup_future_usage=off_session.
	SavePaymentMethod bool
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
	// confirmOn is the item's own confirmation strategy, "" for the
	// global one; invoice its own choice of a Checkout invoice, nil for
	// the global one.
	confirmOn string
	invoice   *bool
}

func (s *Service) resolve(in *CheckoutInput) (item, error) {
	it, err := s.resolveItem(in.CustomerID, in.Item, &in.Quantity)
	if err != nil {
		return item{}, err
	}
	if in.SavePaymentMethod && it.kind != KindCreditPack {
		return item{}, errs.InvalidField("/save_payment_method", "only a credit pack checkout saves the card")
	}
	if !s.catalog.RedirectAllowed(in.SuccessURL) {
		return item{}, errs.InvalidField("/success_url", "success_url is not under an allowed redirect prefix")
	}
	if !s.catalog.RedirectAllowed(in.CancelURL) {
		return item{}, errs.InvalidField("/cancel_url", "cancel_url is not under an allowed redirect prefix")
	}
	return it, nil
}

// resolveItem checks a customer id, a catalog item and a quantity (0 means
// 1, and is set so) and resolves the item from the catalog.
func (s *Service) resolveItem(customerID, itemID string, quantity *int64) (item, error) {
	if err := customers.ValidateID(customerID); err != nil {
		return item{}, errs.InvalidField("/customer_id", "customer_id must be 1 to 255 characters of A-Za-z0-9_.:@-")
	}
	var it item
	if p, ok := s.catalog.Pack(itemID); ok {
		it = item{kind: KindCreditPack, name: p.Name, unitAmount: p.Amount, currency: p.Currency, credits: p.Credits, expiry: p.Expiry,
			confirmOn: p.ConfirmOn, invoice: p.Invoice}
	} else if p, ok := s.catalog.Product(itemID); ok {
		it = item{kind: KindProduct, name: p.Name, unitAmount: p.Amount, currency: p.Currency, confirmOn: p.ConfirmOn, invoice: p.Invoice}
	} else if p, ok := s.catalog.Plan(itemID); ok {
		it = item{kind: KindPlan, name: p.Name, stripePrice: p.StripePrice}
	} else {
		return item{}, errs.InvalidField("/item", fmt.Sprintf("%q is not in the catalog", itemID))
	}
	if *quantity == 0 {
		*quantity = 1
	}
	if *quantity < 1 || *quantity > MaxQuantity {
		return item{}, errs.InvalidField("/quantity", fmt.Sprintf("quantity must be between 1 and %d", MaxQuantity))
	}
	if it.kind == KindPlan && *quantity != 1 {
		return item{}, errs.InvalidField("/quantity", "a plan is subscribed to once; quantity must be 1")
	}
	// Both products fit in int64: credits ≤ 1e12 and amounts < 1e8, times at most MaxQuantity.
	if it.credits**quantity > catalog.MaxCreditsPerMove {
		return item{}, errs.UnprocessableField("/quantity", fmt.Sprintf("%d × %s is %d credits, more than the largest grant (%d); buy at most %d",
			*quantity, itemID, it.credits**quantity, int64(catalog.MaxCreditsPerMove), catalog.MaxCreditsPerMove/it.credits))
	}
	if it.unitAmount**quantity > catalog.MaxChargeMinorUnits {
		return item{}, errs.UnprocessableField("/quantity", fmt.Sprintf("%d × %s costs %d, more than Stripe charges in one payment (%d); buy at most %d",
			*quantity, itemID, it.unitAmount**quantity, catalog.MaxChargeMinorUnits, catalog.MaxChargeMinorUnits/it.unitAmount))
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
			s.release(ctx, *r)
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
	var invoiceAlways bool
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if _, err := customers.Ensure(ctx, tx, in.CustomerID, now); err != nil {
			return err
		}
		c, err := customers.Get(ctx, tx, in.CustomerID)
		if err != nil {
			return err
		}
		stripeCustomer = c.StripeCustomerID
		invoiceAlways = c.Billing != nil && c.Billing.InvoiceAlways
		return insertPayment(ctx, tx, newPayment{id: paymentID, customerID: in.CustomerID, item: in.Item, quantity: in.Quantity, it: it,
			method: MethodCheckout, confirmOn: s.confirmOnFor(it), savePaymentMethod: in.SavePaymentMethod,
			livemode: s.livemode, now: now, reason: "checkout requested"})
	})
	if err != nil {
		return CheckoutResult{}, err
	}

	// The payment is on record: from here the work runs to its end even if
	// the caller hangs up, and stops only if its reservation is lost; each
	// of its database steps has a bound of its own (detachedStepTimeout).
	work, stop := context.WithCancelCause(context.WithoutCancel(ctx))
	defer stop(nil)
	release := func() {}
	if r != nil {
		release = s.holdReservation(work, *r, stop)
	}
	res, err := s.createSession(work, in, it, paymentID, stripeCustomer, invoiceAlways, now)
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
	record, cancel := context.WithTimeout(work, detachedStepTimeout)
	defer cancel()
	err = db.InTx(record, s.db, func(tx *gorm.DB) error {
		err := updatePayment(record, tx, paymentID, map[string]any{
			"checkout_session_id": res.CheckoutSessionID, "stripe_customer_id": res.stripeCustomer,
			"payment_intent_id": gorm.Expr("COALESCE(payment_intent_id, ?)", db.NullIfEmpty(res.paymentIntent)), "updated_at": s.now(),
		})
		if err != nil {
			return err
		}
		if r != nil {
			return r.Complete(record, tx, answer)
		}
		return nil
	})
	if err != nil {
		return CheckoutResult{}, err
	}
	return res.CheckoutResult, nil
}

// newPayment is a payment about to be written, pending.
type newPayment struct {
	id, customerID, item string
	quantity             int64
	it                   item
	method               Method
	confirmOn            string // "" for payments not confirmed by a PaymentIntent
	purchaseOrder        string
	savePaymentMethod    bool
	livemode             bool
	now                  time.Time
	reason               string
}

// row is p's payments row. What Stripe tells later (its ids, amounts, the
// outcome) starts NULL.
func (p newPayment) row() map[string]any {
	var expireSeconds *int64
	var expireMonths *int
	switch {
	case p.it.kind != KindCreditPack:
	case p.it.expiry.Months > 0:
		expireMonths = &p.it.expiry.Months
	case p.it.expiry.Duration > 0:
		secs := int64((p.it.expiry.Duration + time.Second - 1) / time.Second)
		expireSeconds = &secs
	}
	return map[string]any{
		"id": p.id, "customer_id": p.customerID, "item": p.item, "item_kind": string(p.it.kind),
		"quantity": p.quantity, "status": string(Pending), "unit_amount": p.it.unitAmount, "amount": p.it.unitAmount * p.quantity,
		"currency": p.it.currency, "credits": p.it.credits * p.quantity, "credits_expire_after_seconds": expireSeconds,
		"credits_expire_after_months": expireMonths, "livemode": p.livemode, "created_at": p.now, "updated_at": p.now,
		"method": string(p.method), "confirm_on": db.NullIfEmpty(p.confirmOn), "purchase_order": db.NullIfEmpty(p.purchaseOrder),
		"save_payment_method": p.savePaymentMethod,
	}
}

// insertPayment writes p pending, with the first line of its history, in
// tx.
func insertPayment(ctx context.Context, tx *gorm.DB, p newPayment) error {
	if err := tx.WithContext(ctx).Model(&paymentRow{}).Create(p.row()).Error; err != nil {
		return db.Translate(err, nil)
	}
	return insertFirstTransition(ctx, tx, p)
}

// insertFirstTransition writes the first line of p's history.
func insertFirstTransition(ctx context.Context, tx *gorm.DB, p newPayment) error {
	return db.Translate(tx.WithContext(ctx).Model(&transitionRow{}).Create(map[string]any{
		"payment_id": p.id, "from_status": nil, "to_status": string(Pending), "applied": true,
		"reason": p.reason, "source": SourceAPI, "created_at": p.now,
	}).Error, nil)
}

// confirmOnFor is the confirmation strategy a new Checkout payment of it is
// created under: the item's own, or TALLY_CONFIRM_ON.
func (s *Service) confirmOnFor(it item) string {
	if it.confirmOn != "" {
		return it.confirmOn
	}
	return s.checkout.ConfirmOn
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
func (s *Service) createSession(ctx context.Context, in CheckoutInput, it item, paymentID, stripeCustomer string, invoiceAlways bool, now time.Time) (createdSession, error) {
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
		// Every one-time payment may have one, credit packs included: the
		// item's choice, else the global one; a customer that always wants
		// one gets one.
		sin.InvoiceCreation = s.checkout.InvoiceCreation
		if it.invoice != nil {
			sin.InvoiceCreation = *it.invoice
		}
		sin.InvoiceCreation = sin.InvoiceCreation || invoiceAlways
		sin.SaveCard = in.SavePaymentMethod
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

// detachedStepTimeout bounds each database step of the work a checkout
// or an invoice payment runs on once its payment is on record, detached
// from its caller (startCheckout, startInvoicePayment): recording Stripe's
// answer under the Idempotency-Key, renewing or releasing the key, marking
// the payment failed. The request's deadline (TALLY_REQUEST_TIMEOUT) no
// longer reaches that work, and a database that stops answering without
// closing anything would otherwise hold it, and its caller, for as long
// as it says nothing: past the server's write timeout, so that the caller
// never got an answer. Stripe's calls keep their own bounds (stripeapi).
const detachedStepTimeout = 10 * time.Second

// detachedStep runs fn, one database step of the detached work, under
// detachedStepTimeout.
func (s *Service) detachedStep(ctx context.Context, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, detachedStepTimeout)
	defer cancel()
	return fn(ctx)
}

// release gives back r, the Idempotency-Key a checkout or an invoice
// payment that failed reserved, so that a retry runs at once; it runs
// even when the caller is gone, under detachedStepTimeout. Should it fail,
// the key's lease ends the reservation.
func (s *Service) release(ctx context.Context, r db.Reservation) {
	err := s.detachedStep(context.WithoutCancel(ctx), func(ctx context.Context) error { return r.Release(ctx, s.db) })
	if err != nil {
		s.logger.ErrorContext(ctx, "release idempotency key", "error", err)
	}
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
			// Bounded, as every detached step is, but never shorter than
			// the lease: a renewal slowed by a busy machine still holds the
			// key, and only one that outlasts the lease may have lost it
			// (a third of the lease failed renewals under load).
			rctx, cancel := context.WithTimeout(ctx, min(detachedStepTimeout, r.Lease))
			err := r.Renew(rctx, s.db)
			cancel()
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
	var c customers.Customer
	err := s.detachedStep(ctx, func(ctx context.Context) (err error) {
		c, err = customers.Get(ctx, s.db, customerID)
		return err
	})
	if err != nil {
		return "", err
	}
	sc, err := s.stripe.CreateCustomer(ctx, stripeCustomerInput(c))
	if err != nil {
		return "", err
	}
	err = s.detachedStep(ctx, func(ctx context.Context) error {
		return db.InTx(ctx, s.db, func(tx *gorm.DB) error {
			return customers.LinkStripe(ctx, tx, customerID, sc.ID, s.now())
		})
	})
	if errs.Is(err, errs.Conflict) {
		var c customers.Customer
		gerr := s.detachedStep(ctx, func(ctx context.Context) (err error) {
			c, err = customers.Get(ctx, s.db, customerID)
			return err
		})
		if gerr == nil && c.StripeCustomerID != "" {
			return c.StripeCustomerID, nil
		}
	}
	if err != nil {
		return "", err
	}
	return sc.ID, nil
}

// stripeCustomerInput is what the Stripe Customer of c holds: the billing
// details when given, else the customer's own name and email.
func stripeCustomerInput(c customers.Customer) stripeapi.CustomerInput {
	in := stripeapi.CustomerInput{TallyCustomerID: c.ID, Email: c.Email, Name: c.Name}
	if b := c.Billing; b != nil {
		if b.Name != "" {
			in.Name = b.Name
		}
		if b.Email != "" {
			in.Email = b.Email
		}
		if a := b.Address; a != nil {
			in.Address = &stripeapi.Address{Line1: a.Line1, Line2: a.Line2, City: a.City, State: a.State, PostalCode: a.PostalCode, Country: a.Country}
		}
		if t := b.TaxID; t != nil {
			in.TaxID = &stripeapi.TaxID{Type: t.Type, Value: t.Value}
		}
	}
	return in
}

// SyncStripeCustomer keeps the Stripe Customer of customerID in step with
// its billing details (name, email, address) after they changed; a
// customer not linked to Stripe yet gets them when its Stripe Customer is
// created. The tax id is sent at creation only (Stripe keeps tax ids as
// objects of their own). Without a Stripe key there is nothing to keep in
// step. Errors: errs.NotFound, Stripe's *Error.
func (s *Service) SyncStripeCustomer(ctx context.Context, customerID string) error {
	c, err := customers.Get(ctx, s.db, customerID)
	if err != nil {
		return err
	}
	if c.StripeCustomerID == "" || s.stripe == nil {
		return nil
	}
	return s.stripe.UpdateCustomer(ctx, c.StripeCustomerID, stripeCustomerInput(c))
}

// markCreationFailed records that Stripe never gave the payment a session.
// A session Stripe did create despite the error (a lost answer) can still
// succeed later: failed → succeeded is allowed.
func (s *Service) markCreationFailed(ctx context.Context, paymentID string, cause error) {
	s.markFailed(ctx, paymentID, creationFailed, cause)
}
