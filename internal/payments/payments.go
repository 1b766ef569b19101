// Package payments turns a click on "buy" into credits or a fulfilled
// purchase exactly once: the catalog-driven Checkout, the payment state
// machine (one transition table, machine.go), the validation chain and the
// confirmation guard keyed by the PaymentIntent id (confirm.go), refunds and
// subscription status. It learns about Stripe through typed calls that
// internal/stripehook makes after verifying and decoding a webhook; it never
// sees raw events, and stripehook is never imported here.
package payments

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// Status is where a payment stands in the state machine.
type Status string

// The payment states (docs/guarantees.md, "Money only when it arrived";
// machine.go holds the moves between them).
const (
	Pending   Status = "pending"
	Succeeded Status = "succeeded"
	Failed    Status = "failed"
	Refunded  Status = "refunded"
	// Disputed: a chargeback withdrew the funds; its share of the credits
	// was taken back. DisputeLost: the dispute was decided for the
	// cardholder, for good.
	Disputed    Status = "disputed"
	DisputeLost Status = "dispute_lost"
)

// ItemKind is what kind of catalog item a payment buys.
type ItemKind string

// The catalog item kinds.
const (
	KindCreditPack ItemKind = "credit_pack"
	KindProduct    ItemKind = "product"
	KindPlan       ItemKind = "plan"
)

// Method is how a payment is made.
type Method string

// The payment methods. MethodAutoTopUp payments are charged off-session by
// tally; they confirm by their PaymentIntent as Checkout payments do.
const (
	MethodCheckout  Method = "checkout"
	MethodInvoice   Method = "invoice"
	MethodAutoTopUp Method = "auto_top_up"
)

// ConfirmedBy names what confirmed a payment.
type ConfirmedBy string

// What may confirm a payment: its PaymentIntent's success, its Checkout
// Session's completion, its invoice's payment, or a sync that found
// Stripe's word on it without a webhook.
const (
	ByPaymentIntent   ConfirmedBy = "payment_intent"
	ByCheckoutSession ConfirmedBy = "checkout_session"
	ByInvoice         ConfirmedBy = "invoice"
	BySync            ConfirmedBy = "sync"
)

// Invoice is the Stripe invoice of a payment, as Stripe last told it.
type Invoice struct {
	ID        string
	Number    string
	Status    string // draft, open, paid, void, uncollectible
	HostedURL string
	PDF       string
}

// Payment is one purchase of a catalog item, as tally tracks it.
type Payment struct {
	ID         string
	CustomerID string
	Item       string
	ItemKind   ItemKind
	Quantity   int64
	Status     Status
	// Method is how it is paid; ConfirmedBy what confirmed it (empty until
	// then); ConfirmOn the strategy a Checkout payment is confirmed under,
	// fixed when it was created.
	Method      Method
	ConfirmedBy ConfirmedBy
	ConfirmOn   string
	// Invoice is its Stripe invoice, once one is known (Invoice.ID is
	// InvoiceID); PurchaseOrder the buyer's reference on a pay-by-invoice.
	Invoice       *Invoice
	PurchaseOrder string
	// SavePaymentMethod: the buyer asked to keep the card (Checkout with
	// setup_future_usage=off_session); it becomes the customer's default
	// once the payment succeeds.
	SavePaymentMethod bool
	// UnitAmount and Amount (UnitAmount × Quantity, what Stripe must collect)
	// are in minor units of Currency.
	UnitAmount     int64
	Amount         int64
	Currency       string
	AmountReceived *int64
	AmountRefunded int64
	// Credits is what the payment grants once it succeeds (0 but for packs);
	// they stay spendable CreditsExpireAfterMonths calendar months, or
	// CreditsExpireAfter, or (both zero) forever: see CreditsExpiry.
	Credits                  int64
	CreditsExpireAfter       time.Duration
	CreditsExpireAfterMonths int
	Livemode                 bool
	CheckoutSessionID        string
	PaymentIntentID          string
	InvoiceID                string
	SubscriptionID           string
	StripeCustomerID         string
	// CheckoutPaymentStatus is Stripe's Checkout payment_status last seen.
	CheckoutPaymentStatus string
	// Checkout is what the payment's Checkout Session charges, once a
	// session event or a retrieval told it.
	Checkout CheckoutTotals
	// ReceivedCurrency is the currency of AmountReceived (the session's,
	// which differs from Currency when Stripe converted the price).
	ReceivedCurrency string
	FailureReason    string
	CreatedAt        time.Time
	UpdatedAt        time.Time
	SucceededAt      *time.Time
	// Transitions is the history, oldest first; filled by Get only.
	Transitions []Transition

	// CreditsRevoked is the share of Credits that refunds and disputes took
	// back so far: revoked, or recorded as a shortfall.
	CreditsRevoked int64
	// AmountDisputed is what open or lost chargebacks withdrew (minor
	// units); StatusBeforeDispute is what a won dispute returns the payment
	// to (succeeded or refunded).
	AmountDisputed      int64
	StatusBeforeDispute Status
}

// CheckoutTotals are a Checkout Session's amounts: in Currency (what the
// buyer is charged in) before discounts and taxes (AmountSubtotal), after
// them (AmountTotal, what the PaymentIntent collects) and the tax Stripe Tax
// added (AmountTax). With Adaptive Pricing before 2025-03-31, SourceCurrency
// and SourceAmountSubtotal are the amount before tax in the currency the
// session was created in.
type CheckoutTotals struct {
	Currency             string
	AmountSubtotal       int64
	AmountTotal          int64
	AmountTax            int64
	SourceCurrency       string
	SourceAmountSubtotal int64
}

// Known reports whether the totals were learned from Stripe.
func (t CheckoutTotals) Known() bool { return t.Currency != "" }

// Price is the session's amount before tax in the currency it was created
// in: what the catalog priced.
func (t CheckoutTotals) Price() (amount int64, currency string) {
	if t.SourceCurrency != "" {
		return t.SourceAmountSubtotal, t.SourceCurrency
	}
	return t.AmountSubtotal, t.Currency
}

// Transition is one move of the state machine, applied or refused, with the
// Stripe event that asked for it.
type Transition struct {
	From            Status // empty for the creation
	To              Status
	Applied         bool
	StripeEventID   string
	StripeEventType string
	Reason          string
	// Source is api, webhook, sync or operator ("" for history written
	// before tally recorded it).
	Source    string
	CreatedAt time.Time
}

// Options are what New needs.
type Options struct {
	DB *gorm.DB
	// Stripe is nil when no Stripe key is configured; checkouts then answer
	// unavailable, webhooks still work.
	Stripe  stripeapi.Client
	Catalog catalog.Catalog
	// Config is how Checkout Sessions are created and confirmed.
	Config config.CheckoutConfig
	// Livemode is the mode of our Stripe key; events of the other mode are parked.
	Livemode bool
	// Logger is nil to discard the logs; Now is the clock, nil for time.Now.
	Logger *slog.Logger
	Now    func() time.Time
	// ReservationLease is how long a keyed checkout holds its key without
	// renewing it (it renews every third of it while Stripe is called), so
	// a checkout whose process died frees its key after at most this long;
	// default db.ReservationLease.
	ReservationLease time.Duration

	// RevokeFrom is where refunds and disputes take credits back from:
	// config.RevokeFromBalance or config.RevokeFromPurchaseGrant.
	RevokeFrom string

	// AutoTopUpMaxFailures is how many automatic top-ups may fail in a row
	// before automatic top-up disables itself; 0 means DefaultAutoTopUpMaxFailures.
	AutoTopUpMaxFailures int
}

// Service is the payments capability.
type Service struct {
	db               *gorm.DB
	stripe           stripeapi.Client
	catalog          catalog.Catalog
	checkout         config.CheckoutConfig
	livemode         bool
	logger           *slog.Logger
	now              func() time.Time
	reservationLease time.Duration
	revokeFrom       string
	topUpMaxFailures int
	waitOver         func(ctx context.Context, key string)
	failedUnrecorded func(ctx context.Context, paymentID string)
}

// New builds the Service. Config and RevokeFrom come from config, which
// holds their defaults: it panics when they do not validate (a zero setting
// in hand-built Options is a programming error).
func New(o Options) *Service {
	err := o.Config.Validate()
	if o.RevokeFrom != config.RevokeFromBalance && o.RevokeFrom != config.RevokeFromPurchaseGrant {
		err = errors.Join(err, fmt.Errorf("TALLY_REVOKE_FROM: %q is not balance or purchase_grant", o.RevokeFrom))
	}
	if err != nil {
		panic(fmt.Errorf("payments.New: %w", err))
	}
	logger := o.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	now := o.Now
	if now == nil {
		now = time.Now
	}
	lease := o.ReservationLease
	if lease <= 0 {
		lease = db.ReservationLease
	}
	maxFailures := o.AutoTopUpMaxFailures
	if maxFailures <= 0 {
		maxFailures = DefaultAutoTopUpMaxFailures
	}
	return &Service{db: o.DB, stripe: o.Stripe, catalog: o.Catalog, checkout: o.Config, livemode: o.Livemode, logger: logger, now: now,
		revokeFrom: o.RevokeFrom, reservationLease: lease, topUpMaxFailures: maxFailures}
}

func (r paymentRow) payment() Payment {
	p := Payment{
		ID: r.ID, CustomerID: r.CustomerID, Method: Method(r.Method), SavePaymentMethod: r.SavePaymentMethod, Item: r.Item, ItemKind: ItemKind(r.ItemKind), Quantity: r.Quantity,
		Status: Status(r.Status), UnitAmount: r.UnitAmount, Amount: r.Amount, Currency: r.Currency,
		AmountReceived: r.AmountReceived, AmountRefunded: r.AmountRefunded, Credits: r.Credits, Livemode: r.Livemode,
		CheckoutSessionID: r.CheckoutSessionID, PaymentIntentID: r.PaymentIntentID,
		InvoiceID: r.InvoiceID, SubscriptionID: r.SubscriptionID, StripeCustomerID: r.StripeCustomerID,
		CheckoutPaymentStatus: r.CheckoutPaymentStatus, FailureReason: r.FailureReason,
		CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt, SucceededAt: r.SucceededAt,
		CreditsRevoked: r.CreditsRevoked, AmountDisputed: r.AmountDisputed, StatusBeforeDispute: Status(r.StatusBeforeDispute),
	}
	if r.CreditsExpireAfterSeconds != nil {
		p.CreditsExpireAfter = time.Duration(*r.CreditsExpireAfterSeconds) * time.Second
	}
	if r.CreditsExpireAfterMonths != nil {
		p.CreditsExpireAfterMonths = *r.CreditsExpireAfterMonths
	}
	if r.CheckoutCurrency != nil && r.CheckoutAmountSubtotal != nil && r.CheckoutAmountTotal != nil {
		p.Checkout = CheckoutTotals{Currency: *r.CheckoutCurrency, AmountSubtotal: *r.CheckoutAmountSubtotal, AmountTotal: *r.CheckoutAmountTotal}
		if r.CheckoutAmountTax != nil {
			p.Checkout.AmountTax = *r.CheckoutAmountTax
		}
		if r.CheckoutSourceCurrency != nil && r.CheckoutSourceAmountSubtotal != nil {
			p.Checkout.SourceCurrency, p.Checkout.SourceAmountSubtotal = *r.CheckoutSourceCurrency, *r.CheckoutSourceAmountSubtotal
		}
	}
	p.ReceivedCurrency = r.ReceivedCurrency
	p.Method, p.ConfirmedBy, p.ConfirmOn, p.PurchaseOrder = Method(r.Method), ConfirmedBy(r.ConfirmedBy), r.ConfirmOn, r.PurchaseOrder
	if p.Method == "" {
		p.Method = MethodCheckout
	}
	if r.InvoiceID != "" {
		p.Invoice = &Invoice{ID: r.InvoiceID, Number: r.InvoiceNumber, Status: r.InvoiceStatus, HostedURL: r.InvoiceHostedURL, PDF: r.InvoicePDF}
	}
	return p
}

// CreditsExpiry is how long the credits p grants stay spendable.
func (p Payment) CreditsExpiry() catalog.Expiry {
	return catalog.Expiry{Months: p.CreditsExpireAfterMonths, Duration: p.CreditsExpireAfter}
}

// load reads one payment through gdb; lock takes its row lock (gdb must then
// be a transaction). Errors: errs.NotFound.
func load(ctx context.Context, gdb *gorm.DB, id string, lock bool) (Payment, error) {
	q := loadQuery
	if lock {
		q = loadLockedQuery
	}
	r, err := scanPayment(directRow(ctx, gdb, q, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Payment{}, errs.E(errs.NotFound, "payment %s not found", id)
	}
	if err != nil {
		return Payment{}, db.Translate(err, nil)
	}
	return r.payment(), nil
}

// load's statements, and loadLockedApplied's: direct (db.ScanDirect),
// since every event reads its payment under the lock.
const (
	loadQuery        = `SELECT ` + paymentColumns + ` FROM payments WHERE id = $1`
	loadLockedQuery  = loadQuery + ` FOR UPDATE`
	loadAppliedQuery = `SELECT ` + paymentColumns + `,
			EXISTS (SELECT 1 FROM payment_transitions t WHERE t.payment_id = payments.id AND t.stripe_event_id = $1)
		FROM payments WHERE id = $2 FOR UPDATE`
)

// directRow is a scan of the first row of a direct query (db.ScanDirect):
// sql.ErrNoRows when it returns none, as *sql.Row answers.
func directRow(ctx context.Context, gdb *gorm.DB, query string, args ...any) func(dest ...any) error {
	return func(dest ...any) error {
		found, err := db.ScanDirect(ctx, gdb, query, args, dest...)
		if err == nil && !found {
			return sql.ErrNoRows
		}
		return err
	}
}

// loadLockedApplied is load with the row lock (tx a transaction), and
// whether Stripe event eventID is in the payment's history, in one
// statement. The history is read with that statement's snapshot, taken
// before it waited for the lock: only a caller that knows no transaction
// can have applied the event meanwhile may ask this way (see lockForEvent).
func loadLockedApplied(ctx context.Context, tx *gorm.DB, id, eventID string) (Payment, bool, error) {
	var applied bool
	r, err := scanPayment(directRow(ctx, tx, loadAppliedQuery, eventID, id), &applied)
	if errors.Is(err, sql.ErrNoRows) {
		return Payment{}, false, errs.E(errs.NotFound, "payment %s not found", id)
	}
	if err != nil {
		return Payment{}, false, db.Translate(err, nil)
	}
	return r.payment(), applied, nil
}

// WaitOver reports whether what w waits for has happened since the
// waiting event found it missing: its payment succeeded, or the automatic
// top-up it confirms recorded its PaymentIntent. The intake asks once it
// recorded the wait, because the success may have been applied while the
// waiting event was processed (it waited for the payment's lock behind it)
// and have asked for waiting events before the wait was recorded (see
// stripehook's record). The payment's row is read under a share lock: a
// transaction confirming it holds its lock from before it asked for
// waiting events until its commit, so this read either waits for that
// commit and sees the success, or comes before that transaction asked,
// which then sees the recorded wait. Errors: errs.Unavailable.
func (s *Service) WaitOver(ctx context.Context, w *Waiting) (bool, error) {
	if w == nil || w.PaymentID == "" {
		return false, nil
	}
	var over []bool
	err := s.db.WithContext(ctx).Raw(`SELECT succeeded_at IS NOT NULL OR (method = ? AND payment_intent_id IS NOT NULL)
		FROM payments WHERE id = ? FOR SHARE`, string(MethodAutoTopUp), w.PaymentID).Scan(&over).Error
	if err != nil {
		return false, db.Translate(err, nil)
	}
	return len(over) == 1 && over[0], nil
}

// Confirmed reports whether the payment of PaymentIntent pi has what an
// event waiting for pi waits for (see WaitOver): stripehook asks once it
// recorded that a refund or dispute, which Stripe was not there to say
// whose it is, waits for pi, in case that success came meanwhile.
// Errors: errs.Unavailable.
func (s *Service) Confirmed(ctx context.Context, pi string) (bool, error) {
	if pi == "" {
		return false, nil
	}
	var over []bool
	err := s.db.WithContext(ctx).Raw(`SELECT succeeded_at IS NOT NULL OR method = ?
		FROM payments WHERE payment_intent_id = ?`, string(MethodAutoTopUp), pi).Scan(&over).Error
	if err != nil {
		return false, db.Translate(err, nil)
	}
	return len(over) == 1 && over[0], nil
}

// findID returns the id of the payment whose column equals value, "" if none.
func findID(ctx context.Context, gdb *gorm.DB, column, value string) (string, error) {
	if value == "" {
		return "", nil
	}
	var r paymentRow
	// column is one of a fixed set chosen by this package, never input.
	err := gdb.WithContext(ctx).Select("id").Where(column+" = ?", value).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return "", nil
	}
	if err != nil {
		return "", db.Translate(err, nil)
	}
	return r.ID, nil
}

// Get returns the payment with its transition history, oldest first.
// Errors: errs.NotFound, errs.Unavailable.
func (s *Service) Get(ctx context.Context, id string) (Payment, error) {
	p, err := load(ctx, s.db, id, false)
	if err != nil {
		return Payment{}, err
	}
	var trs []transitionRow
	if err := s.db.WithContext(ctx).Where("payment_id = ?", id).Order("id").Find(&trs).Error; err != nil {
		return Payment{}, db.Translate(err, nil)
	}
	p.Transitions = make([]Transition, 0, len(trs))
	for _, t := range trs {
		p.Transitions = append(p.Transitions, Transition{
			From: Status(t.FromStatus), To: Status(t.ToStatus), Applied: t.Applied,
			StripeEventID: t.StripeEventID, StripeEventType: t.StripeEventType,
			Reason: t.Reason, Source: t.Source, CreatedAt: t.CreatedAt,
		})
	}
	return p, nil
}

// Page is one page of a customer's payments, newest first. NextCursor is
// empty on the last page.
type Page struct {
	Payments   []Payment
	NextCursor string
}

// List returns a customer's payments, newest first, limit (1..500) at a
// time after cursor (a NextCursor of an earlier page, or "").
// Errors: errs.NotFound (unknown customer), errs.Invalid (bad cursor or limit).
func (s *Service) List(ctx context.Context, customerID, cursor string, limit int) (Page, error) {
	if err := db.CheckPageSize(limit); err != nil {
		return Page{}, err
	}
	var after string
	if cursor != "" {
		raw, err := base64.RawURLEncoding.DecodeString(cursor)
		if err != nil || len(raw) == 0 {
			return Page{}, errs.InvalidField("cursor", "malformed cursor; pass back a next_cursor returned by this list")
		}
		after = string(raw)
	}
	if _, err := customers.Get(ctx, s.db, customerID); err != nil {
		return Page{}, err
	}
	// Ids are time-ordered (UUIDv7), so id order is creation order.
	q := s.db.WithContext(ctx).Where("customer_id = ?", customerID)
	if after != "" {
		q = q.Where("id < ?", after)
	}
	var rows []paymentRow
	if err := q.Order("id DESC").Limit(limit + 1).Find(&rows).Error; err != nil {
		return Page{}, db.Translate(err, nil)
	}
	page := Page{Payments: make([]Payment, 0, min(len(rows), limit))}
	for i, r := range rows {
		if i == limit {
			page.NextCursor = base64.RawURLEncoding.EncodeToString([]byte(rows[i-1].ID))
			break
		}
		page.Payments = append(page.Payments, r.payment())
	}
	return page, nil
}

// ErrNotOurs says a Stripe object names no payment or customer of tally's
// (another integration on the same Stripe account): the event is ignored.
var ErrNotOurs = errors.New("payments: the Stripe object does not belong to tally")

// Rejection is the validation chain's refusal: the event must not move money
// and needs an operator (stripehook parks it). It is never retried by itself.
type Rejection struct {
	Reason string
}

func (r *Rejection) Error() string { return "refused: " + r.Reason }

func reject(format string, args ...any) error {
	return &Rejection{Reason: fmt.Sprintf(format, args...)}
}

// Waiting says an event cannot apply yet because it is about a payment whose
// success has not arrived (Stripe does not order its events: a refund or a
// dispute may overtake the payment_intent.succeeded, or the invoice.paid,
// it follows). It is not an operator's problem: stripehook retries it,
// outside its retry budget, applies it as soon as the success it waits for
// (For) is processed, and parks it only a day after Stripe created it.
type Waiting struct {
	PaymentIntentID string
	// InvoiceID, when set, is the invoice of the pay-by-invoice payment
	// waited on: its invoice.paid is the success (see For).
	InvoiceID string
	// PaymentID is the payment waited on (WaitOver reads it).
	PaymentID string
	Reason    string
}

func (w *Waiting) Error() string { return w.Reason }

// For is the key of the confirmation the event waits for, as the event
// that confirms names it (stripehook's waiting_for): the invoice of a
// pay-by-invoice payment, else the PaymentIntent.
func (w *Waiting) For() string {
	if w.InvoiceID != "" {
		return w.InvoiceID
	}
	return w.PaymentIntentID
}

func waiting(paymentID, paymentIntentID, format string, args ...any) error {
	return &Waiting{PaymentIntentID: paymentIntentID, PaymentID: paymentID, Reason: fmt.Sprintf(format, args...)}
}

// waitingForSuccess is a refund's or dispute's Waiting on payment p, not
// succeeded yet, whose PaymentIntent is pi: a pay-by-invoice payment
// succeeds by its invoice (invoice.paid, which names no PaymentIntent),
// any other by pi. what says what waits.
func waitingForSuccess(p Payment, pi, what string) error {
	if p.Method == MethodInvoice && p.InvoiceID != "" {
		return &Waiting{PaymentIntentID: pi, InvoiceID: p.InvoiceID, PaymentID: p.ID,
			Reason: fmt.Sprintf("%s of payment %s, which is %s: waiting for invoice %s to be paid", what, p.ID, p.Status, p.InvoiceID)}
	}
	return waiting(p.ID, pi, "%s of payment %s, which is %s: waiting for the success of PaymentIntent %s", what, p.ID, p.Status, pi)
}

// successKey is what an event waiting for p's success waits on
// (Waiting.For): a pay-by-invoice payment's invoice, else its
// PaymentIntent; "" when p has neither.
func successKey(p Payment) string {
	if p.Method == MethodInvoice && p.InvoiceID != "" {
		return p.InvoiceID
	}
	return p.PaymentIntentID
}

// IsRejection reports whether err is the validation chain's refusal.
func IsRejection(err error) bool {
	var r *Rejection
	return errors.As(err, &r)
}
