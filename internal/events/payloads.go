package events

import "time"

// The payloads below are the wire contract of the feed's `data` and of the
// push body's: hosts read these field names, so a name never changes and a
// field is only ever added. openapi.yaml describes each one (Event's oneOf,
// keyed by type), and a test in httpapi fails when a payload and its schema
// differ. Money is in minor units of the currency beside it, credits are
// integers, times are UTC.
//
// A field that can be absent says so in its json tag (omitempty); every
// other field is always present, if need be as its zero value or null.

// Payload is the data of one type of event. Only this package's payload
// types implement it, so a caller of Append cannot send a type with another
// shape than the contract's, nor a type the contract does not list.
type Payload interface {
	// Type is the event type, e.g. "payment.succeeded". Hosts switch on it;
	// it never changes.
	Type() string
	payload()
}

// Payloads returns one zero value of every payload type: the event types
// tally emits, each exactly once.
func Payloads() []Payload {
	return []Payload{
		CustomerCreated{}, CustomerUpdated{},
		PaymentSucceeded{}, PaymentFailed{}, PaymentRefunded{},
		PaymentDisputed{}, PaymentDisputeWon{}, PaymentDisputeLost{},
		SubscriptionUpdated{},
		CreditsGranted{}, CreditsLowBalance{}, CreditsExpiring{}, CreditsExpired{}, CreditsRevoked{},
		CreditsHeld{}, CreditsCaptured{}, CreditsReleased{}, CreditsHoldExpired{}, CreditsVoided{}, CreditsAdjusted{},
		CreditsAutoTopUpFailed{}, CreditsAutoTopUpDisabled{}, CreditsDepletionForecast{},
		UsageDead{},
		StripeEventDismissed{},
	}
}

// Customer is the customer as customer.created and customer.updated carry
// it after the change.
type Customer struct {
	ID                  string `json:"id"`
	Email               string `json:"email,omitempty"`
	Name                string `json:"name,omitempty"`
	LowBalanceThreshold *int64 `json:"low_balance_threshold,omitempty"`
	// LowBalanceThresholds: more thresholds, highest first.
	LowBalanceThresholds []int64           `json:"low_balance_thresholds,omitempty"`
	Metadata             map[string]string `json:"metadata"`
	StripeCustomerID     string            `json:"stripe_customer_id,omitempty"`
}

// CustomerCreated is customer.created: a customer was created, by the API
// or on first use (a checkout, a grant, a usage event).
type CustomerCreated struct{ Customer }

// CustomerUpdated is customer.updated: a customer's fields or its Stripe
// customer changed.
type CustomerUpdated struct{ Customer }

// PaymentSucceeded is payment.succeeded: Stripe confirmed the money of a
// credit pack or product purchase, or a plan's subscription started.
//
// A plan's subscription moves no money through tally (Stripe bills the
// usage), so for it Amount, AmountTax, Price and Credits are 0, Currency and
// PriceCurrency are empty, and PaymentIntentID is absent.
type PaymentSucceeded struct {
	PaymentID string `json:"payment_id"`
	Item      string `json:"item"`
	// ItemKind is credit_pack, product or plan.
	ItemKind string `json:"item_kind"`
	Quantity int64  `json:"quantity"`
	// Amount is what Stripe collected, tax included, in Currency (the
	// buyer's when Stripe converted the price).
	Amount    int64  `json:"amount"`
	Currency  string `json:"currency"`
	AmountTax int64  `json:"amount_tax"`
	// Price is the catalog price before tax, in PriceCurrency.
	Price           int64  `json:"price"`
	PriceCurrency   string `json:"price_currency"`
	Credits         int64  `json:"credits"`
	PaymentIntentID string `json:"payment_intent_id,omitempty"`
	// InvoiceID is the invoice that confirmed a pay-by-invoice payment.
	InvoiceID string `json:"invoice_id,omitempty"`
	// Method is how it was paid; ConfirmedBy what confirmed it.
	Method      string `json:"method,omitempty"`
	ConfirmedBy string `json:"confirmed_by,omitempty"`
	// StripeEventID is empty when a sync with Stripe confirmed it.
	StripeEventID string `json:"stripe_event_id"`
}

// PaymentFailed is payment.failed: a payment moved to failed (declined,
// canceled, its Checkout Session expired).
type PaymentFailed struct {
	PaymentID     string `json:"payment_id"`
	Item          string `json:"item"`
	Reason        string `json:"reason"`
	StripeEventID string `json:"stripe_event_id"`
}

// PaymentRefunded is payment.refunded: Stripe refunded more of a payment,
// and the credits that paid for were taken back.
type PaymentRefunded struct {
	PaymentID string `json:"payment_id"`
	// AmountRefunded is the refunded total so far; AmountRefundedDelta what
	// this refund added.
	AmountRefunded      int64  `json:"amount_refunded"`
	AmountRefundedDelta int64  `json:"amount_refunded_delta"`
	Currency            string `json:"currency"`
	CreditsRevoked      int64  `json:"credits_revoked"`
	// CreditsShortfall is what could not be taken back (already spent).
	CreditsShortfall int64  `json:"credits_shortfall"`
	StripeEventID    string `json:"stripe_event_id"`
}

// PaymentDisputed is payment.disputed: a chargeback withdrew funds, and the
// disputed share of the credits was taken back.
type PaymentDisputed struct {
	PaymentID        string `json:"payment_id"`
	DisputeID        string `json:"dispute_id"`
	AmountDisputed   int64  `json:"amount_disputed"`
	Currency         string `json:"currency"`
	Reason           string `json:"reason"`
	CreditsRevoked   int64  `json:"credits_revoked"`
	CreditsShortfall int64  `json:"credits_shortfall"`
	StripeEventID    string `json:"stripe_event_id"`
}

// PaymentDisputeWon is payment.dispute_won: a dispute closed won; the
// payment is back in Status and the credits taken came back.
type PaymentDisputeWon struct {
	PaymentID string `json:"payment_id"`
	DisputeID string `json:"dispute_id"`
	// Status is the payment's status now.
	Status          string `json:"status"`
	CreditsRestored int64  `json:"credits_restored"`
	// CreditsExpired is what did not come back because its grant expired
	// meanwhile; ShortfallSettled the shortfall no longer owed.
	CreditsExpired   int64 `json:"credits_expired"`
	ShortfallSettled int64 `json:"shortfall_settled"`
	// CreditsRevokedForRefunds is what refunds delivered while the dispute
	// was open still took back out of what the win returned, and
	// CreditsShortfallForRefunds what of that the balance could not cover.
	CreditsRevokedForRefunds   int64  `json:"credits_revoked_for_refunds"`
	CreditsShortfallForRefunds int64  `json:"credits_shortfall_for_refunds"`
	StripeEventID              string `json:"stripe_event_id"`
}

// PaymentDisputeLost is payment.dispute_lost: a dispute closed lost; the
// payment ends dispute_lost.
type PaymentDisputeLost struct {
	PaymentID      string `json:"payment_id"`
	DisputeID      string `json:"dispute_id"`
	AmountDisputed int64  `json:"amount_disputed"`
	Currency       string `json:"currency"`
	StripeEventID  string `json:"stripe_event_id"`
}

// SubscriptionUpdated is subscription.updated: a customer's Stripe
// subscription was created or changed status.
type SubscriptionUpdated struct {
	SubscriptionID string `json:"subscription_id"`
	// Status is Stripe's subscription status (active, past_due, canceled...).
	Status string `json:"status"`
	// Plan is the catalog plan, empty when the subscription does not say.
	Plan          string `json:"plan"`
	StripeEventID string `json:"stripe_event_id"`
}

// CreditsGranted is credits.granted: credits were added (a purchase, a
// grant through the API, a won dispute's return).
type CreditsGranted struct {
	CustomerID    string `json:"customer_id"`
	GrantID       string `json:"grant_id"`
	TransactionID string `json:"transaction_id"`
	Amount        int64  `json:"amount"`
	// Balance is the customer's balance after the grant.
	Balance int64 `json:"balance"`
	// Source is purchase, service or dispute_won.
	Source string `json:"source"`
	Reason string `json:"reason"`
	// ExpiresAt is null for credits that never expire.
	ExpiresAt *time.Time `json:"expires_at"`
	PaymentID string     `json:"payment_id,omitempty"`
	// Priority and Category place the grant in the draw order; EffectiveAt,
	// when present, is when a scheduled grant becomes spendable.
	Priority    int        `json:"priority"`
	Category    string     `json:"category"`
	EffectiveAt *time.Time `json:"effective_at,omitempty"`
}

// CreditsLowBalance is credits.low_balance: what is available fell below a
// threshold of the customer (once per fall; re-armed when it is back above).
type CreditsLowBalance struct {
	CustomerID string `json:"customer_id"`
	Balance    int64  `json:"balance"`
	// Available is what the threshold compared: balance less held and
	// pending credits.
	Available int64 `json:"available"`
	Threshold int64 `json:"threshold"`
}

// CreditsExpiring is credits.expiring: a grant with credits left expires
// within TALLY_CREDITS_EXPIRING_NOTICE (once per grant).
type CreditsExpiring struct {
	CustomerID string    `json:"customer_id"`
	GrantID    string    `json:"grant_id"`
	Remaining  int64     `json:"remaining"`
	ExpiresAt  time.Time `json:"expires_at"`
	// NoticeSeconds is the notice horizon this is (one of
	// TALLY_CREDITS_EXPIRING_NOTICE's), in seconds.
	NoticeSeconds int64 `json:"notice_seconds"`
}

// CreditsExpired is credits.expired: what was left of a grant expired.
type CreditsExpired struct {
	CustomerID    string    `json:"customer_id"`
	GrantID       string    `json:"grant_id"`
	TransactionID string    `json:"transaction_id"`
	Amount        int64     `json:"amount"`
	Balance       int64     `json:"balance"`
	ExpiresAt     time.Time `json:"expires_at"`
}

// CreditsRevoked is credits.revoked: a refund or a dispute took credits
// back.
type CreditsRevoked struct {
	CustomerID    string `json:"customer_id"`
	PaymentID     string `json:"payment_id"`
	TransactionID string `json:"transaction_id"`
	// Amount is what was taken; Shortfall what was owed but already spent.
	Amount    int64 `json:"amount"`
	Shortfall int64 `json:"shortfall"`
	// Draws are the grants Amount came from; empty when nothing was taken.
	Draws   []Draw `json:"draws"`
	Balance int64  `json:"balance"`
	Reason  string `json:"reason"`
	// GrantID is the payment's purchase grant, absent when it has none.
	GrantID string `json:"grant_id,omitempty"`
	// RecoversTransactionID is set on a revoke that pays an earlier revoke's
	// shortfall with credits a hold kept then and gave back now (HoldID).
	RecoversTransactionID string `json:"recovers_transaction_id,omitempty"`
	HoldID                string `json:"hold_id,omitempty"`
}

// Draw is what a revoke took from one grant.
type Draw struct {
	GrantID string `json:"grant_id"`
	Amount  int64  `json:"amount"`
}

// CreditsHeld is credits.held: a hold reserved credits for a long job.
// Balance is unchanged (the customer still owns them); Available fell.
type CreditsHeld struct {
	CustomerID string    `json:"customer_id"`
	HoldID     string    `json:"hold_id"`
	Amount     int64     `json:"amount"`
	Reason     string    `json:"reason"`
	ExpiresAt  time.Time `json:"expires_at"`
	Balance    int64     `json:"balance"`
	Available  int64     `json:"available"`
}

// CreditsCaptured is credits.captured: a hold ended by spending Captured of
// its credits (TransactionID is the consume entry, absent when it captured
// none) and releasing the rest.
type CreditsCaptured struct {
	CustomerID    string `json:"customer_id"`
	HoldID        string `json:"hold_id"`
	Captured      int64  `json:"captured"`
	Released      int64  `json:"released"`
	TransactionID string `json:"transaction_id,omitempty"`
	Balance       int64  `json:"balance"`
	Available     int64  `json:"available"`
}

// CreditsReleased is credits.released: a hold ended by releasing all its
// credits on request.
type CreditsReleased struct {
	CustomerID string `json:"customer_id"`
	HoldID     string `json:"hold_id"`
	Released   int64  `json:"released"`
	Balance    int64  `json:"balance"`
	Available  int64  `json:"available"`
}

// CreditsHoldExpired is credits.hold_expired: a hold passed its expires_at
// without a capture or release, and its credits were released.
type CreditsHoldExpired struct {
	CustomerID string    `json:"customer_id"`
	HoldID     string    `json:"hold_id"`
	Released   int64     `json:"released"`
	ExpiresAt  time.Time `json:"expires_at"`
	Balance    int64     `json:"balance"`
}

// CreditsVoided is credits.voided: an operator voided a grant (or credits
// a hold kept of a voided grant came back and went with it). Amount is
// what was taken now; TransactionID its void entry, absent when 0.
type CreditsVoided struct {
	CustomerID    string `json:"customer_id"`
	GrantID       string `json:"grant_id"`
	Amount        int64  `json:"amount"`
	TransactionID string `json:"transaction_id,omitempty"`
	Balance       int64  `json:"balance"`
	Reason        string `json:"reason"`
}

// CreditsAdjusted is credits.adjusted: an operator's adjustment, positive
// (a new grant, GrantID) or negative (drawn like a consume, Draws).
type CreditsAdjusted struct {
	CustomerID    string `json:"customer_id"`
	TransactionID string `json:"transaction_id"`
	// Amount is signed: positive added credits, negative removed them.
	Amount  int64  `json:"amount"`
	Balance int64  `json:"balance"`
	Reason  string `json:"reason"`
	GrantID string `json:"grant_id,omitempty"`
}

// UsageDead is usage.dead: a usage event was dead-lettered and will not be
// sent to Stripe unless an operator requeues it.
type UsageDead struct {
	Identifier string    `json:"identifier"`
	Meter      string    `json:"meter"`
	Value      int64     `json:"value"`
	Timestamp  time.Time `json:"timestamp"`
	Attempts   int       `json:"attempts"`
	// Code is stripe_refused or too_old.
	Code      string `json:"code"`
	LastError string `json:"last_error"`
}

// StripeEventDismissed is stripe_event.dismissed: an operator decided that
// a parked or failed Stripe event needs nothing more. It names no customer.
type StripeEventDismissed struct {
	StripeEventID   string `json:"stripe_event_id"`
	StripeEventType string `json:"stripe_event_type"`
	DismissedBy     string `json:"dismissed_by"`
	Reason          string `json:"reason"`
}

func (StripeEventDismissed) Type() string { return "stripe_event.dismissed" }
func (StripeEventDismissed) payload()     {}

func (CustomerCreated) Type() string     { return "customer.created" }
func (CustomerUpdated) Type() string     { return "customer.updated" }
func (PaymentSucceeded) Type() string    { return "payment.succeeded" }
func (PaymentFailed) Type() string       { return "payment.failed" }
func (PaymentRefunded) Type() string     { return "payment.refunded" }
func (PaymentDisputed) Type() string     { return "payment.disputed" }
func (PaymentDisputeWon) Type() string   { return "payment.dispute_won" }
func (PaymentDisputeLost) Type() string  { return "payment.dispute_lost" }
func (SubscriptionUpdated) Type() string { return "subscription.updated" }
func (CreditsGranted) Type() string      { return "credits.granted" }
func (CreditsLowBalance) Type() string   { return "credits.low_balance" }
func (CreditsExpiring) Type() string     { return "credits.expiring" }
func (CreditsExpired) Type() string      { return "credits.expired" }
func (CreditsRevoked) Type() string      { return "credits.revoked" }
func (CreditsHeld) Type() string         { return "credits.held" }
func (CreditsCaptured) Type() string     { return "credits.captured" }
func (CreditsReleased) Type() string     { return "credits.released" }
func (CreditsHoldExpired) Type() string  { return "credits.hold_expired" }
func (CreditsVoided) Type() string       { return "credits.voided" }
func (CreditsAdjusted) Type() string     { return "credits.adjusted" }
func (UsageDead) Type() string           { return "usage.dead" }

func (CustomerCreated) payload()     {}
func (CustomerUpdated) payload()     {}
func (PaymentSucceeded) payload()    {}
func (PaymentFailed) payload()       {}
func (PaymentRefunded) payload()     {}
func (PaymentDisputed) payload()     {}
func (PaymentDisputeWon) payload()   {}
func (PaymentDisputeLost) payload()  {}
func (SubscriptionUpdated) payload() {}
func (CreditsGranted) payload()      {}
func (CreditsLowBalance) payload()   {}
func (CreditsExpiring) payload()     {}
func (CreditsExpired) payload()      {}
func (CreditsRevoked) payload()      {}
func (CreditsHeld) payload()         {}
func (CreditsCaptured) payload()     {}
func (CreditsReleased) payload()     {}
func (CreditsHoldExpired) payload()  {}
func (CreditsVoided) payload()       {}
func (CreditsAdjusted) payload()     {}
func (UsageDead) payload()           {}
