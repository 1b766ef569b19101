package credits

import (
	"database/sql"
	"time"
)

// The credits tables' rows, as gorm reads and writes them (see the package
// doc of internal/db for the conventions). jsonb columns are their JSON
// text; times are set by the caller from the account's clock.

// balanceRow is a row of credit_balances: one per customer that ever had a
// grant, locked by every change to that customer's credits.
type balanceRow struct {
	CustomerID                 string `gorm:"primaryKey"`
	Balance                    int64
	NextExpiry                 sql.NullTime
	LowBalanceNotified         bool
	DefaultLowBalanceThreshold int64
	Held                       int64
	NextHoldExpiry             sql.NullTime
	UpdatedAt                  time.Time `gorm:"autoUpdateTime:false"`
}

func (balanceRow) TableName() string { return "credit_balances" }

// grantRow is a row of credit_grants.
type grantRow struct {
	ID                 string `gorm:"primaryKey"`
	CustomerID         string
	Amount             int64
	Remaining          int64
	Held               int64
	Revoked            int64
	Source             string
	PaymentID          *string
	Reason             string
	Metadata           string
	ExpiresAt          *time.Time
	ExpiringNotifiedAt *time.Time
	ExpiredAt          *time.Time
	Priority           int
	Category           string
	EffectiveAt        *time.Time
	Voided             int64
	VoidedAt           *time.Time
	CreatedAt          time.Time `gorm:"autoCreateTime:false"`
}

func (grantRow) TableName() string { return "credit_grants" }

// ledgerRow is a row of credit_ledger. Seq is the database's: it orders a
// customer's entries.
type ledgerRow struct {
	Seq            int64  `gorm:"->"`
	ID             string `gorm:"primaryKey"`
	CustomerID     string
	Kind           string
	Amount         int64
	BalanceAfter   int64
	Reason         string
	Metadata       string
	GrantID        *string
	PaymentID      *string
	Draws          *string
	IdempotencyKey *string
	Shortfall      *int64
	HoldID         *string
	CreatedAt      time.Time `gorm:"autoCreateTime:false"`
}

func (ledgerRow) TableName() string { return "credit_ledger" }

// shortfallRow is a row of credit_shortfalls: a revoke's open (or settled)
// receivable.
type shortfallRow struct {
	LedgerEntryID string `gorm:"primaryKey"`
	CustomerID    string
	PaymentID     *string
	Amount        int64
	CreatedAt     time.Time `gorm:"autoCreateTime:false"`
	SettledAt     *time.Time
	SettledReason *string
	// Recovered is what holds open at the revoke paid of it since.
	Recovered int64
}

func (shortfallRow) TableName() string { return "credit_shortfalls" }

// holdRow is a row of credit_holds. Draws is the JSON of []Draw: what the
// hold keeps of each grant, in draw order.
type holdRow struct {
	ID             string `gorm:"primaryKey"`
	CustomerID     string
	Amount         int64
	Status         string
	Reason         string
	Metadata       string
	Draws          string
	Captured       int64
	Released       int64
	TransactionID  *string
	IdempotencyKey *string
	ExpiresAt      time.Time
	CreatedAt      time.Time `gorm:"autoCreateTime:false"`
	EndedAt        *time.Time
	// Claimed is what revokes' shortfalls claim of what the hold gives back
	// (see claims.go).
	Claimed int64
}

func (holdRow) TableName() string { return "credit_holds" }
