// Package metering owns usage events: durable intake, delivery to Stripe
// Billing Meters, local totals and reconciliation with Stripe's summaries.
//
// The usage_events table is an outbox. Intake validates every event against
// Stripe's own limits and commits the accepted ones before answering, so
// accepted means durable. A Worker on every instance claims due rows with
// FOR UPDATE SKIP LOCKED and a lease, sends them outside any transaction under
// the caller's identifier (Stripe dedupes on it, which makes every resend
// safe), and records the outcome. Events of customers without a Stripe
// customer wait as waiting_customer until the link appears.
package metering

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/stripeapi"
)

// Status is where a usage event is in its life.
type Status string

// The statuses of a usage event (openapi.yaml UsageStatus).
const (
	// StatusPending: to be sent to Stripe when due.
	StatusPending Status = "pending"
	// StatusWaitingCustomer: the customer has no Stripe customer yet; the
	// worker releases the event once it has one.
	StatusWaitingCustomer Status = "waiting_customer"
	// StatusDelivered: Stripe accepted it, or already held its identifier.
	StatusDelivered Status = "delivered"
	// StatusDead: Stripe refused it, or attempts ran out; an operator may
	// requeue it.
	StatusDead Status = "dead"
	// StatusHistorical: imported with a timestamp older than Stripe
	// accepts; it counts in tally's totals and is never sent.
	StatusHistorical Status = "historical"
	// StatusShadow: its plan's delivery is shadow; stored and counted,
	// never sent.
	StatusShadow Status = "shadow"
	// StatusLegacyPeriod: timestamped before its plan's live_from for this
	// customer; the legacy system bills it, tally never sends it.
	StatusLegacyPeriod Status = "legacy_period"
	// StatusCancelPending: cancelled after it may have reached Stripe; a
	// meter event adjustment is on its way (cancel.go).
	StatusCancelPending Status = "cancel_pending"
	// StatusCancelled: cancelled, and never sent or cancelled at Stripe.
	StatusCancelled Status = "cancelled"
)

// DeadCode says why a usage event is dead.
type DeadCode string

// Why events are dead-lettered (openapi.yaml UsageDeadCode).
const (
	// DeadStripeRefused: Stripe refused the event (a 4xx other than 429 and
	// a refused key); sending it again as it is would be refused again.
	DeadStripeRefused DeadCode = "stripe_refused"
	// DeadTooOld: the event's timestamp left the window Stripe accepts
	// (DeliveryWindow) before it could be delivered, through a Stripe outage
	// or because its customer never got a Stripe customer.
	DeadTooOld DeadCode = "too_old"
)

// Valid reports whether s is one of the statuses.
func (s Status) Valid() bool {
	switch s {
	case StatusPending, StatusWaitingCustomer, StatusDelivered, StatusDead,
		StatusHistorical, StatusShadow, StatusLegacyPeriod, StatusCancelPending, StatusCancelled:
		return true
	}
	return false
}

// countedStatuses are the statuses of events that count in a customer's
// totals: everything but dead (Stripe does not have them) and cancelled
// ones (cancel_pending included: the caller took it back).
const countedStatuses = `('pending', 'waiting_customer', 'delivered', 'historical', 'shadow', 'legacy_period')`

// Service is the metering capability: intake, reads, requeue and
// reconciliation. Delivery is the Worker's.
type Service struct {
	db      *gorm.DB
	stripe  stripeapi.Client // nil when Stripe is not configured
	catalog catalog.Catalog
	now     func() time.Time
	log     *slog.Logger
	// summaryLimiter paces reconciliation's summary requests.
	summaryLimiter *rate.Limiter
	// turn, when set, waits for a request's turn in the delivery worker's
	// share of the meter rate limit (Worker.Turn).
	turn func(context.Context) error
	// retention is how long delivered events are kept as rows
	// (retention.go); 0 keeps them.
	retention time.Duration
	// refusals is tally_usage_refused_total (refused.go).
	refusals *prometheus.CounterVec
}

// Options are what New needs.
type Options struct {
	DB *gorm.DB
	// Stripe is nil when no Stripe key is configured: intake and reads
	// still work, Reconcile answers unavailable.
	Stripe  stripeapi.Client
	Catalog catalog.Catalog
	// Logger receives what the Service does not answer, such as the dead
	// events Requeue leaves dead; nil discards it.
	Logger *slog.Logger
	// Now is the clock that intake checks timestamps against; nil is
	// time.Now.
	Now func() time.Time
	// UsageRetention is how long delivered events are kept as rows
	// (TALLY_RETENTION_USAGE_EVENTS, see retention.go); 0 keeps them:
	// PurgeDelivered deletes nothing and windows are never moved.
	UsageRetention time.Duration
	// MeterTurn, when set, is waited on before every Stripe request the
	// Service makes (reconciliation's summaries, billing periods), so they
	// count in the shared meter rate limit (Worker.Turn); the Service's
	// own pace (summaryRate) keeps them to a part of it.
	MeterTurn func(context.Context) error
	// Registry receives tally_usage_refused_total; nil keeps it
	// unregistered.
	Registry prometheus.Registerer
}

// New returns the metering Service.
func New(o Options) *Service {
	s := &Service{db: o.DB, stripe: o.Stripe, catalog: o.Catalog, now: o.Now, log: o.Logger,
		summaryLimiter: rate.NewLimiter(paced(summaryRate), 1), retention: max(o.UsageRetention, 0), turn: o.MeterTurn,
		refusals: newRefusals(o.Registry)}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// UsageEvent is one stored usage event and its delivery state.
type UsageEvent struct {
	Identifier string
	CustomerID string
	Meter      string
	Value      int64
	Timestamp  time.Time
	Status     Status
	// Attempts counts the sends Stripe answered (or that timed out); a 429
	// or a released claim does not count.
	Attempts  int
	LastError string
	// DeadCode is set for dead events (empty for ones dead-lettered before
	// it was recorded).
	DeadCode DeadCode
	// MaybeSentAt is the first time a send may have reached Stripe without
	// an answer saying so (a timeout, a network failure or a 5xx); nil when
	// none did.
	MaybeSentAt *time.Time
	// NextAttemptAt is set for pending events only.
	NextAttemptAt *time.Time
	DeliveredAt   *time.Time
	CreatedAt     time.Time
}

// withTimeout is ctx without its cancellation, bounded by d: the work it
// guards (a Stripe call in flight, recording its outcome) must finish even
// when shutdown has begun, or the outcome would be lost.
func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}
