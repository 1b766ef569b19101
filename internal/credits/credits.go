// Package credits is the prepaid wallet: grants of credits (bought or given,
// optionally expiring or scheduled for later, with a priority), consumption
// that never overdraws and draws in the draw order (priority, soonest
// expiry, oldest), holds that reserve credits for a long job until it is
// captured or released, operators' voids and adjustments, the append-only
// ledger of every change, the expiry sweeper, low-balance and expiring-soon
// notices, and the invariant check behind `tally verify`.
//
// Every change to one customer's credits runs under a lock on that
// customer's credit_balances row, so the balance check, the grant draws and
// the ledger's balance_after chain are exact under any concurrency.
package credits

import (
	"fmt"
	"log/slog"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/text"
)

// Limits on inputs (openapi.yaml: ConsumeRequest, GrantRequest, Metadata).
// The amount of one grant, consume or revoke is bounded by
// catalog.MaxCreditsPerMove, which also bounds what a credit pack carries.
const (
	MaxReasonLen      = 255
	MaxMetadataKeys   = 50
	MaxMetadataKeyLen = 40
	MaxMetadataValLen = 500
)

// Source says where a grant's credits came from.
type Source string

// Grant sources.
const (
	// SourcePurchase: bought through a payment (PaymentID names it).
	SourcePurchase Source = "purchase"
	// SourceService: given by a service (promotion, manual adjustment).
	SourceService Source = "service"
	// SourceDisputeWon: credits a dispute took back, returned when it was
	// won (PaymentID names the disputed payment). See Restore.
	SourceDisputeWon Source = "dispute_won"
)

// Ledger entry kinds.
const (
	KindGrant   = "grant"
	KindConsume = "consume"
	KindExpire  = "expire"
	KindRevoke  = "revoke"
	KindAdjust  = "adjust"
	KindVoid    = "void"
)

// GrantInput adds credits to a customer.
type GrantInput struct {
	CustomerID string
	Amount     int64
	Reason     string
	Source     Source
	// PaymentID is required for SourcePurchase and SourceDisputeWon and
	// must be empty otherwise.
	PaymentID string
	// ExpiresAt, when set, must lie in the future; nil means never.
	ExpiresAt *time.Time
	Metadata  map[string]string
	// Priority places the grant in the draw order: lower is spent first
	// (0 to 100; nil for DefaultPriority).
	Priority *int
	// Category is CategoryPaid or CategoryPromotional; "" for the
	// source's default (paid for purchases and their returns, promotional
	// otherwise).
	Category string
	// EffectiveAt, when set and in the future, schedules the grant: its
	// credits are owned (in the balance) but not spendable before then.
	EffectiveAt *time.Time
}

// Grant categories.
const (
	CategoryPaid        = "paid"
	CategoryPromotional = "promotional"
)

// DefaultPriority is a grant's priority unless it says otherwise.
const DefaultPriority = 50

// priority is the grant's priority, DefaultPriority when unset.
func (in GrantInput) priority() int {
	if in.Priority == nil {
		return DefaultPriority
	}
	return *in.Priority
}

// category is the grant's category, its source's default when unset.
func (in GrantInput) category() string {
	switch {
	case in.Category != "":
		return in.Category
	case in.Source == SourcePurchase || in.Source == SourceDisputeWon:
		return CategoryPaid
	default:
		return CategoryPromotional
	}
}

// Validate checks the input without touching the database or the clock
// (Grant also refuses an ExpiresAt that is not in the future).
// Errors: errs.Invalid naming the offending field.
func (in GrantInput) Validate() error {
	if err := validateMove(in.CustomerID, in.Amount, in.Reason, in.Metadata); err != nil {
		return err
	}
	switch in.Source {
	case SourcePurchase, SourceDisputeWon:
		if in.PaymentID == "" {
			return errs.InvalidField("/payment_id", "a purchase or dispute_won grant must name its payment")
		}
	case SourceService:
		if in.PaymentID != "" {
			return errs.InvalidField("/payment_id", "only purchase and dispute_won grants name a payment")
		}
	default:
		return errs.InvalidField("/source", "source must be purchase, service or dispute_won")
	}
	if p := in.priority(); p < 0 || p > 100 {
		return errs.InvalidField("/priority", "priority must be a whole number from 0 to 100")
	}
	if c := in.category(); c != CategoryPaid && c != CategoryPromotional {
		return errs.InvalidField("/category", "category must be paid or promotional")
	}
	if in.EffectiveAt != nil && in.ExpiresAt != nil && !in.EffectiveAt.Before(*in.ExpiresAt) {
		return errs.InvalidField("/effective_at", "effective_at must be before expires_at")
	}
	return nil
}

// GrantResult is the answer to a grant.
type GrantResult struct {
	TransactionID string
	GrantID       string
	Amount        int64
	// Balance is what the customer owns right after the grant.
	Balance     int64
	ExpiresAt   *time.Time
	Priority    int
	Category    string
	EffectiveAt *time.Time
}

// ConsumeInput spends credits.
type ConsumeInput struct {
	CustomerID string
	Amount     int64
	Reason     string
	Metadata   map[string]string
}

// Validate checks the input without touching the database.
// Errors: errs.Invalid naming the offending field.
func (in ConsumeInput) Validate() error {
	return validateMove(in.CustomerID, in.Amount, in.Reason, in.Metadata)
}

// validateMove checks what every movement of credits carries: the customer,
// a positive amount, a reason and metadata within limits.
func validateMove(customerID string, amount int64, reason string, metadata map[string]string) error {
	if err := customers.ValidateID(customerID); err != nil {
		return err
	}
	if err := validateAmount(amount); err != nil {
		return err
	}
	if err := validateReason(reason); err != nil {
		return err
	}
	return validateMetadata(metadata)
}

// ConsumeResult is the answer to a consume.
type ConsumeResult struct {
	TransactionID string
	Amount        int64
	// Balance is the spendable balance right after the consume.
	Balance int64
}

// Balance is a customer's credits now.
type Balance struct {
	CustomerID string
	// Balance is what the customer owns: the unspent remainder of
	// unexpired grants (scheduled ones included), and what active holds
	// keep.
	Balance int64
	// Held is what active holds keep; Pending what grants not effective yet
	// hold; Available = Balance - Held - Pending is what may be spent or
	// held now.
	Held      int64
	Pending   int64
	Available int64
	// Grants with credits left, soonest expiry first (never-expiring last).
	Grants []GrantSummary
	// NextExpiry is when the soonest-expiring remaining credits expire
	// (nil when none expire), and NextExpiryAmount how many expire then.
	NextExpiry       *time.Time
	NextExpiryAmount *int64
	// LowBalanceThreshold in force for the customer (0: no notice).
	LowBalanceThreshold int64
}

// GrantSummary is one grant with credits left.
type GrantSummary struct {
	ID        string
	Amount    int64
	Remaining int64
	// Held is the part of Remaining that active holds keep.
	Held        int64
	Source      Source
	PaymentID   string
	ExpiresAt   *time.Time
	Priority    int
	Category    string
	EffectiveAt *time.Time
	CreatedAt   time.Time
}

// Draw is how much a consume took from one grant.
type Draw struct {
	GrantID string `json:"grant_id"`
	Amount  int64  `json:"amount"`
}

// LedgerEntry is one change to a customer's credits.
type LedgerEntry struct {
	ID           string
	Kind         string
	Amount       int64
	BalanceAfter int64
	Reason       string
	Metadata     map[string]string
	GrantID      string
	PaymentID    string
	// Draws are the grants a consume or a revoke took from.
	Draws []Draw
	// Shortfall is what a revoke could not take back: the customer had
	// already spent it. It stays a receivable (VerifyReport.Receivables).
	Shortfall int64
	// HoldID names the hold a capture's consume entry spent from.
	HoldID    string
	CreatedAt time.Time
}

// LedgerPage is one page of a customer's ledger, newest first. NextCursor is
// empty on the last page.
type LedgerPage struct {
	Entries    []LedgerEntry
	NextCursor string
}

// Service is the wallet over one database.
type Service struct {
	db     *gorm.DB
	cfg    config.CreditsConfig
	now    func() time.Time
	logger *slog.Logger
	topUp  TopUpFunc
	// batch gathers concurrent consumes into one statement (batch.go).
	batch *consumeBatcher

	consumed prometheus.Counter
}

// Options are what New needs.
type Options struct {
	DB *gorm.DB
	// Config comes from config, which holds its defaults.
	Config config.CreditsConfig
	// Logger is nil to discard the logs; Now is the clock, nil for time.Now.
	Logger *slog.Logger
	Now    func() time.Time
	// Registry receives the wallet's metrics; nil leaves them unregistered.
	Registry prometheus.Registerer
	// TopUp starts an automatic top-up when a change leaves a customer
	// below its threshold (see afterLowering); nil: never.
	TopUp TopUpFunc
}

// New returns the wallet over o.DB and registers its metrics on o.Registry.
// It panics when o.Config does not validate (a zero setting in a
// hand-built CreditsConfig is a programming error) or when the metrics
// clash with ones already registered.
func New(o Options) *Service {
	mustValidate("credits.New", o.Config)
	s := &Service{
		db: o.DB, cfg: o.Config, now: clockOr(o.Now), logger: loggerOr(o.Logger), topUp: o.TopUp,
		consumed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tally_credits_consumed_total",
			Help: "Credits spent by successful consumes and hold captures (replays not counted).",
		}),
	}
	s.batch = &consumeBatcher{s: s}
	if o.Registry != nil {
		o.Registry.MustRegister(s.consumed,
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "tally_credits_batch_deferred_total",
				Help: "Consumes, holds and captures a batch left to the full path (an expiry due, a notice, a top-up, a key to take over, a lock it would wait for).",
			}, func() float64 { return float64(s.batch.deferred.Load()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "tally_credits_batch_fell_back_total",
				Help: "Consumes, holds and captures run one by one through the full path because their batch's statement failed.",
			}, func() float64 { return float64(s.batch.fellBack.Load()) }),
		)
	}
	return s
}

// clockOr is now, or time.Now when nil.
func clockOr(now func() time.Time) func() time.Time {
	if now == nil {
		return time.Now
	}
	return now
}

// loggerOr is l, or a logger that discards when nil.
func loggerOr(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

// mustValidate panics when cfg does not validate, naming the constructor.
func mustValidate(constructor string, cfg config.CreditsConfig) {
	if err := cfg.Validate(); err != nil {
		panic(fmt.Errorf("%s: %w", constructor, err))
	}
}

func validateAmount(n int64) error {
	if n < 1 || n > catalog.MaxCreditsPerMove {
		return errs.InvalidField("/amount", fmt.Sprintf("amount must be a whole number from 1 to %d", int64(catalog.MaxCreditsPerMove)))
	}
	return nil
}

func validateReason(r string) error {
	if err := text.Check(r); err != nil {
		return errs.InvalidField("/reason", "reason "+err.Error())
	}
	if n := utf8.RuneCountInString(r); n < 1 || n > MaxReasonLen {
		return errs.InvalidField("/reason", "reason must be 1 to 255 characters")
	}
	return nil
}

func validateMetadata(m map[string]string) error {
	if len(m) > MaxMetadataKeys {
		return errs.InvalidField("/metadata", "metadata holds at most 50 keys")
	}
	for k, v := range m {
		if err := text.Check(k); err != nil {
			return errs.InvalidField("/metadata", "metadata key "+err.Error())
		}
		if err := text.Check(v); err != nil {
			return errs.InvalidField("/metadata", "metadata value of "+strconv.Quote(k)+" "+err.Error())
		}
		if n := utf8.RuneCountInString(k); n < 1 || n > MaxMetadataKeyLen {
			return errs.InvalidField("/metadata", "metadata keys must be 1 to 40 characters")
		}
		if utf8.RuneCountInString(v) > MaxMetadataValLen {
			return errs.InvalidField("/metadata", "metadata values must be at most 500 characters")
		}
	}
	return nil
}
