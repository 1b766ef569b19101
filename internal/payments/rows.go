package payments

import (
	"context"
	"database/sql"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// The payments tables' rows, as gorm reads them (see the package doc of
// internal/db for the conventions). A NULL text column the domain reads as
// empty is a string, which gorm leaves "" for NULL; the columns whose NULL
// means something else are pointers. Rows are inserted from a map on the
// model, so a column left out takes its default (NULL, or the database's
// clock) and an empty text is written as NULL where the schema wants one
// (db.NullIfEmpty).

// paymentRow is a row of payments.
type paymentRow struct {
	ID                           string
	CustomerID                   string
	SavePaymentMethod            bool
	Item                         string
	ItemKind                     string
	Quantity                     int64
	Status                       string
	UnitAmount                   int64
	Amount                       int64
	Currency                     string
	AmountReceived               *int64
	AmountRefunded               int64
	Credits                      int64
	CreditsExpireAfterSeconds    *int64
	CreditsExpireAfterMonths     *int
	Livemode                     bool
	CheckoutSessionID            string
	PaymentIntentID              string
	InvoiceID                    string
	SubscriptionID               string
	StripeCustomerID             string
	CheckoutPaymentStatus        string
	CheckoutCurrency             *string
	CheckoutAmountSubtotal       *int64
	CheckoutAmountTotal          *int64
	CheckoutAmountTax            *int64
	CheckoutSourceCurrency       *string
	CheckoutSourceAmountSubtotal *int64
	ReceivedCurrency             string
	FailureReason                string
	CreatedAt                    time.Time `gorm:"autoCreateTime:false"`
	UpdatedAt                    time.Time `gorm:"autoUpdateTime:false"`
	SucceededAt                  *time.Time

	CreditsRevoked      int64
	AmountDisputed      int64
	StatusBeforeDispute string

	Method           string
	ConfirmedBy      string
	ConfirmOn        string
	InvoiceNumber    string
	InvoiceStatus    string
	InvoiceHostedURL string
	InvoicePDF       string `gorm:"column:invoice_pdf"`
	PurchaseOrder    string
}

func (paymentRow) TableName() string { return "payments" }

// paymentColumns are paymentRow's columns in scanPayment's order.
const paymentColumns = `id, customer_id, save_payment_method, item, item_kind, quantity, status, unit_amount, amount, currency, amount_received, amount_refunded, credits, credits_expire_after_seconds, credits_expire_after_months, livemode, checkout_session_id, payment_intent_id, invoice_id, subscription_id, stripe_customer_id, checkout_payment_status, checkout_currency, checkout_amount_subtotal, checkout_amount_total, checkout_amount_tax, checkout_source_currency, checkout_source_amount_subtotal, received_currency, failure_reason, created_at, updated_at, succeeded_at, credits_revoked, amount_disputed, status_before_dispute, method, confirmed_by, confirm_on, invoice_number, invoice_status, invoice_hosted_url, invoice_pdf, purchase_order`

// scanPayment reads a row of paymentColumns: by hand rather than through
// gorm's reflection, which was a sixth of the webhook path's CPU (a payment
// is read under its lock by every event). A text column gorm reads as ""
// when NULL is read through sql.NullString for the same effect.
// extra are the destinations of columns selected after paymentColumns.
func scanPayment(scan func(dest ...any) error, extra ...any) (paymentRow, error) {
	var r paymentRow
	var s [23]sql.NullString
	if err := scan(append([]any{&s[0], &s[1], &r.SavePaymentMethod, &s[2], &s[3], &r.Quantity, &s[4], &r.UnitAmount, &r.Amount, &s[5], &r.AmountReceived, &r.AmountRefunded, &r.Credits, &r.CreditsExpireAfterSeconds, &r.CreditsExpireAfterMonths, &r.Livemode, &s[6], &s[7], &s[8], &s[9], &s[10], &s[11], &r.CheckoutCurrency, &r.CheckoutAmountSubtotal, &r.CheckoutAmountTotal, &r.CheckoutAmountTax, &r.CheckoutSourceCurrency, &r.CheckoutSourceAmountSubtotal, &s[12], &s[13], &r.CreatedAt, &r.UpdatedAt, &r.SucceededAt, &r.CreditsRevoked, &r.AmountDisputed, &s[14], &s[15], &s[16], &s[17], &s[18], &s[19], &s[20], &s[21], &s[22]}, extra...)...); err != nil {
		return paymentRow{}, err
	}
	r.ID = s[0].String
	r.CustomerID = s[1].String
	r.Item = s[2].String
	r.ItemKind = s[3].String
	r.Status = s[4].String
	r.Currency = s[5].String
	r.CheckoutSessionID = s[6].String
	r.PaymentIntentID = s[7].String
	r.InvoiceID = s[8].String
	r.SubscriptionID = s[9].String
	r.StripeCustomerID = s[10].String
	r.CheckoutPaymentStatus = s[11].String
	r.ReceivedCurrency = s[12].String
	r.FailureReason = s[13].String
	r.StatusBeforeDispute = s[14].String
	r.Method = s[15].String
	r.ConfirmedBy = s[16].String
	r.ConfirmOn = s[17].String
	r.InvoiceNumber = s[18].String
	r.InvoiceStatus = s[19].String
	r.InvoiceHostedURL = s[20].String
	r.InvoicePDF = s[21].String
	r.PurchaseOrder = s[22].String
	return r, nil
}

// updatePayment writes columns of payment id (whose row the caller's
// transaction tx has locked). Errors are translated.
func updatePayment(ctx context.Context, tx *gorm.DB, id string, columns map[string]any) error {
	return db.Translate(tx.WithContext(ctx).Model(&paymentRow{}).Where("id = ?", id).Updates(columns).Error, nil)
}

// transitionRow is a row of payment_transitions, a payment's history. Its
// id (an identity) orders the history; the row does not carry it.
type transitionRow struct {
	PaymentID       string
	FromStatus      string
	ToStatus        string
	Applied         bool
	StripeEventID   string
	StripeEventType string
	Reason          string
	Source          string
	CreatedAt       time.Time `gorm:"autoCreateTime:false"`
}

func (transitionRow) TableName() string { return "payment_transitions" }

// confirmationRow is a row of payment_confirmations, the money guard: one
// per confirmed payment, keyed by the PaymentIntent or the invoice that
// confirmed it (exactly one of the two).
type confirmationRow struct {
	PaymentIntentID *string
	InvoiceID       *string
	PaymentID       string
	StripeEventID   string
	CreatedAt       time.Time `gorm:"autoCreateTime:false"`
}

func (confirmationRow) TableName() string { return "payment_confirmations" }

// refundRow is a row of payment_refunds: one per refund increase applied.
// Its id is an identity the row does not carry.
type refundRow struct {
	PaymentID           string
	StripeEventID       string
	AmountRefundedTotal int64
	AmountRefundedDelta int64
	CreditsRevoked      int64
	CreditsShortfall    int64
	CreatedAt           time.Time `gorm:"autoCreateTime:false"`
}

func (refundRow) TableName() string { return "payment_refunds" }

// disputeRow is a row of payment_disputes: a dispute in the furthest stage
// seen.
type disputeRow struct {
	StripeDisputeID     string
	PaymentID           string
	ChargeID            string
	Amount              int64
	Currency            string
	Reason              string
	Status              string
	WithdrawnAt         *time.Time
	ClosedAt            *time.Time
	CreditsRevoked      int64
	CreditsShortfall    int64
	RevokeTransactionID *string
	CreditsRestored     int64
	CreditsExpired      int64
	CreatedAt           time.Time `gorm:"autoCreateTime:false"`
	UpdatedAt           time.Time `gorm:"autoUpdateTime:false"`
}

func (disputeRow) TableName() string { return "payment_disputes" }

// updateDispute writes columns of dispute id (locked by the caller's
// transaction tx). Errors are translated.
func updateDispute(ctx context.Context, tx *gorm.DB, id string, columns map[string]any) error {
	return db.Translate(tx.WithContext(ctx).Model(&disputeRow{}).Where("stripe_dispute_id = ?", id).Updates(columns).Error, nil)
}

// rateLimitRow is a row of checkout_rate_limits: a customer's checkout
// pacing (see allowCheckout).
type rateLimitRow struct {
	CustomerID string
	Tat        time.Time
}

func (rateLimitRow) TableName() string { return "checkout_rate_limits" }
