package payments

import (
	"context"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// Saved cards: a customer's default payment method is the card Stripe last
// confirmed for it, by a setup-mode Checkout tally created
// (CreatePaymentMethodSetup) or by a credit pack checkout that asked to save
// the card. Only brand, last four digits and expiry are kept besides
// Stripe's ids; automatic top-up charges it off-session.

// SavedCard is a customer's default payment method, as it may be shown.
type SavedCard struct {
	Brand    string
	Last4    string
	ExpMonth int
	ExpYear  int
	// PaymentMethodID and StripeCustomerID are Stripe's ids, for charging.
	PaymentMethodID  string
	StripeCustomerID string
	UpdatedAt        time.Time
}

// Expired reports whether the card's expiry month has ended at now.
func (c SavedCard) Expired(now time.Time) bool {
	end := time.Date(c.ExpYear, time.Month(c.ExpMonth), 1, 0, 0, 0, 0, time.UTC).AddDate(0, 1, 0)
	return !now.Before(end)
}

// savedCardRow is a row of customer_payment_methods.
type savedCardRow struct {
	CustomerID            string
	StripePaymentMethodID string
	StripeCustomerID      string
	Brand                 string
	Last4                 string
	ExpMonth              int
	ExpYear               int
	StripeEventCreated    int64
	UpdatedAt             time.Time `gorm:"autoUpdateTime:false"`
}

func (savedCardRow) TableName() string { return "customer_payment_methods" }

// setupRow is a row of payment_method_setups: a setup-mode Checkout Session
// tally created.
type setupRow struct {
	CheckoutSessionID string
	CustomerID        string
	CreatedAt         time.Time `gorm:"autoCreateTime:false"`
	CompletedAt       *time.Time
}

func (setupRow) TableName() string { return "payment_method_setups" }

// SavedPaymentMethod returns the customer's default payment method.
// Errors: errs.NotFound (none saved), errs.Unavailable.
func (s *Service) SavedPaymentMethod(ctx context.Context, customerID string) (SavedCard, error) {
	return savedPaymentMethod(ctx, s.db, customerID)
}

// savedPaymentMethod is SavedPaymentMethod read through gdb (the pool, or
// the caller's transaction).
func savedPaymentMethod(ctx context.Context, gdb *gorm.DB, customerID string) (SavedCard, error) {
	var r savedCardRow
	err := gdb.WithContext(ctx).Where("customer_id = ?", customerID).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return SavedCard{}, errs.E(errs.NotFound, "customer %s has no saved payment method", customerID)
	}
	if err != nil {
		return SavedCard{}, db.Translate(err, nil)
	}
	return SavedCard{Brand: r.Brand, Last4: r.Last4, ExpMonth: r.ExpMonth, ExpYear: r.ExpYear,
		PaymentMethodID: r.StripePaymentMethodID, StripeCustomerID: r.StripeCustomerID, UpdatedAt: r.UpdatedAt}, nil
}

// SetupInput asks for a setup-mode Checkout that saves a card.
type SetupInput struct {
	CustomerID string
	SuccessURL string
	CancelURL  string
}

// SetupResult is what the buyer's browser needs.
type SetupResult struct {
	CheckoutSessionID string
	URL               string
	ExpiresAt         time.Time
}

// CreatePaymentMethodSetup starts a Checkout Session in setup mode for the
// customer (created on first use, with its Stripe Customer, as a checkout
// does). When Stripe confirms it (checkout.session.completed), the card
// becomes the customer's default payment method.
//
// Errors: errs.Invalid (/success_url, /cancel_url, customer id),
// errs.PaymentProviderError, errs.RateLimited, errs.Unavailable (also
// without a Stripe key).
func (s *Service) CreatePaymentMethodSetup(ctx context.Context, in SetupInput) (SetupResult, error) {
	if err := customers.ValidateID(in.CustomerID); err != nil {
		return SetupResult{}, err
	}
	if !s.catalog.RedirectAllowed(in.SuccessURL) {
		return SetupResult{}, errs.InvalidField("/success_url", "success_url is not under an allowed redirect prefix")
	}
	if !s.catalog.RedirectAllowed(in.CancelURL) {
		return SetupResult{}, errs.InvalidField("/cancel_url", "cancel_url is not under an allowed redirect prefix")
	}
	if s.stripe == nil {
		return SetupResult{}, errs.E(errs.Unavailable, "saving a card is not available: no Stripe key is configured (TALLY_STRIPE_SECRET_KEY)")
	}
	if err := s.allowCheckout(ctx, in.CustomerID); err != nil {
		return SetupResult{}, err
	}
	now := s.now()
	var stripeCustomer string
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if _, err := customers.Ensure(ctx, tx, in.CustomerID, now); err != nil {
			return err
		}
		c, err := customers.Get(ctx, tx, in.CustomerID)
		stripeCustomer = c.StripeCustomerID
		return err
	})
	if err != nil {
		return SetupResult{}, err
	}
	if stripeCustomer == "" {
		if stripeCustomer, err = s.linkStripeCustomer(ctx, in.CustomerID); err != nil {
			return SetupResult{}, err
		}
	}
	cs, err := s.stripe.CreateSetupSession(ctx, stripeapi.SetupSessionInput{
		SetupID: db.NewID("setup"), TallyCustomerID: in.CustomerID, StripeCustomerID: stripeCustomer,
		Currency: s.setupCurrency(), SuccessURL: in.SuccessURL, CancelURL: in.CancelURL, ExpiresAt: now.Add(s.checkout.ExpiresAfter),
	})
	if err != nil {
		return SetupResult{}, err
	}
	// Recorded after Stripe answered: a session whose record is lost (a
	// crash here) saves nothing, and the user starts over.
	err = db.Translate(s.db.WithContext(ctx).Create(&setupRow{CheckoutSessionID: cs.ID, CustomerID: in.CustomerID, CreatedAt: now}).Error, nil)
	if err != nil {
		return SetupResult{}, err
	}
	res := SetupResult{CheckoutSessionID: cs.ID, URL: cs.URL, ExpiresAt: cs.ExpiresAt}
	if res.ExpiresAt.IsZero() {
		res.ExpiresAt = now.Add(s.checkout.ExpiresAfter)
	}
	return res, nil
}

// setupCurrency is the currency a setup session names: the catalog's
// first credit pack's, the money automatic top-up will charge in.
func (s *Service) setupCurrency() string {
	if len(s.catalog.CreditPacks) > 0 {
		return s.catalog.CreditPacks[0].Currency
	}
	return "usd"
}

// SetupSessionCompleted handles checkout.session.completed of a setup-mode
// session: when tally created it, the SetupIntent's card (retrieved from
// Stripe) becomes the customer's default payment method.
// Errors: ErrNotOurs (a session tally did not create), *Rejection
// (livemode, a card of another Stripe customer), errs.Unavailable, a Stripe
// error (retried).
func (s *Service) SetupSessionCompleted(ctx context.Context, ev EventRef, cs CheckoutSession) error {
	var setup setupRow
	err := s.db.WithContext(ctx).Where("checkout_session_id = ?", cs.ID).Take(&setup).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return ErrNotOurs
	}
	if err != nil {
		return db.Translate(err, nil)
	}
	if cs.Livemode != s.livemode {
		return reject("event livemode=%t does not match our Stripe key (livemode=%t)", cs.Livemode, s.livemode)
	}
	if cs.SetupIntent == "" {
		return reject("setup Checkout Session %s names no SetupIntent", cs.ID)
	}
	if s.stripe == nil {
		return errs.E(errs.Unavailable, "setup Checkout Session %s cannot be checked: no Stripe key is configured", cs.ID)
	}
	si, err := s.stripe.GetSetupIntent(ctx, cs.SetupIntent)
	if err != nil {
		return fmt.Errorf("payments: retrieve SetupIntent %s of Checkout Session %s: %w", cs.SetupIntent, cs.ID, err)
	}
	if si.Status != "succeeded" || si.PaymentMethod == nil {
		return reject("SetupIntent %s of Checkout Session %s is %s, without a saved card", si.ID, cs.ID, si.Status)
	}
	return db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if err := s.saveCard(ctx, tx, setup.CustomerID, *si.PaymentMethod, ev); err != nil {
			return err
		}
		return db.Translate(tx.WithContext(ctx).Model(&setupRow{}).Where("checkout_session_id = ? AND completed_at IS NULL", cs.ID).
			Update("completed_at", s.now()).Error, nil)
	})
}

// saveCardOfPayment makes the card that paid p (a succeeded credit pack
// checkout that asked to save it) the customer's default.
func (s *Service) saveCardOfPayment(ctx context.Context, ev EventRef, paymentID string, pi PaymentIntent) error {
	if pi.PaymentMethod == "" {
		return nil
	}
	p, err := load(ctx, s.db, paymentID, false)
	if err != nil {
		return err
	}
	if !p.SavePaymentMethod || p.Method != MethodCheckout || p.PaymentIntentID != pi.ID || (p.Status != Succeeded && p.Status != Refunded) {
		return nil
	}
	if s.stripe == nil {
		return errs.E(errs.Unavailable, "the card of payment %s cannot be retrieved: no Stripe key is configured", p.ID)
	}
	pm, err := s.stripe.GetPaymentMethod(ctx, pi.PaymentMethod)
	if err != nil {
		return fmt.Errorf("payments: retrieve payment method %s of payment %s: %w", pi.PaymentMethod, p.ID, err)
	}
	return db.InTx(ctx, s.db, func(tx *gorm.DB) error { return s.saveCard(ctx, tx, p.CustomerID, pm, ev) })
}

// saveCard stores pm as customerID's default payment method, unless a card
// confirmed by a later Stripe event is already the default (events arrive
// in any order, and a redelivery must not bring an old card back).
// The card must be attached to the customer's own Stripe Customer.
func (s *Service) saveCard(ctx context.Context, tx *gorm.DB, customerID string, pm stripeapi.PaymentMethod, ev EventRef) error {
	c, err := customers.Get(ctx, tx, customerID)
	if err != nil {
		return err
	}
	if pm.Customer == "" || pm.Customer != c.StripeCustomerID {
		return reject("payment method %s is attached to Stripe customer %q, not to %s's (%q)", pm.ID, pm.Customer, customerID, c.StripeCustomerID)
	}
	if pm.Brand == "" || pm.Last4 == "" || pm.ExpMonth < 1 || pm.ExpMonth > 12 || pm.ExpYear < 2000 {
		return reject("payment method %s is not a card tally can charge (brand %q, expiry %d/%d)", pm.ID, pm.Brand, pm.ExpMonth, pm.ExpYear)
	}
	row := savedCardRow{CustomerID: customerID, StripePaymentMethodID: pm.ID, StripeCustomerID: pm.Customer,
		Brand: pm.Brand, Last4: pm.Last4, ExpMonth: pm.ExpMonth, ExpYear: pm.ExpYear, StripeEventCreated: ev.Created, UpdatedAt: s.now()}
	return db.Translate(tx.WithContext(ctx).Clauses(clause.OnConflict{
		Columns: []clause.Column{{Name: "customer_id"}},
		DoUpdates: clause.AssignmentColumns([]string{"stripe_payment_method_id", "stripe_customer_id", "brand", "last4",
			"exp_month", "exp_year", "stripe_event_created", "updated_at"}),
		Where: clause.Where{Exprs: []clause.Expression{clause.Expr{SQL: "customer_payment_methods.stripe_event_created <= excluded.stripe_event_created"}}},
	}).Create(&row).Error, nil)
}
