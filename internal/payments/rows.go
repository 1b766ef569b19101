package payments

import (
	"context"
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
