// Package customers owns the customer row every capability hangs off: the
// host product's own user id, contact fields, the per-customer low-balance
// threshold and the lazily created Stripe customer link.
package customers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/mail"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/text"
)

// Customer is one of the host product's users as tally knows it.
type Customer struct {
	ID                  string
	Email               string
	Name                string
	LowBalanceThreshold *int64
	// LowBalanceThresholds are more thresholds, highest first; each fires
	// credits.low_balance once per fall below it.
	LowBalanceThresholds []int64
	Metadata             map[string]string
	StripeCustomerID     string
	// Billing is nil until billing details are given.
	Billing   *Billing
	CreatedAt time.Time
	UpdatedAt time.Time
}

// UpsertInput creates or updates a customer. Nil fields keep their value.
type UpsertInput struct {
	ID                  string
	Email               *string
	Name                *string
	LowBalanceThreshold *int64
	// LowBalanceThresholds replaces the list when not nil (empty clears it).
	LowBalanceThresholds *[]int64
	Metadata             map[string]string
	StripeCustomerID     *string
	// Billing, when given, replaces the stored billing details.
	Billing *Billing
}

// ValidateID reports whether id is a valid customer id (errs.Invalid if not):
// ^[A-Za-z0-9_.:@-]{1,255}$, checked byte by byte. The usage intake checks
// every event's customer, and the regular expression was a tenth of the
// server's CPU there; customers_test.go holds the expression and compares.
func ValidateID(id string) error {
	valid := len(id) >= 1 && len(id) <= 255
	for i := 0; valid && i < len(id); i++ {
		valid = idByte[id[i]]
	}
	if !valid {
		return errs.InvalidField("customer_id", "customer_id must be 1 to 255 characters of A-Za-z0-9_.:@-")
	}
	return nil
}

// idByte marks the bytes a customer id may hold.
var idByte = func() (set [256]bool) {
	for _, r := range []string{"AZ", "az", "09", "__", "..", "::", "@@", "--"} {
		for c := r[0]; c <= r[1]; c++ {
			set[c] = true
		}
	}
	return set
}()

// Validate checks the input without touching the database.
func (in UpsertInput) Validate() error {
	if err := ValidateID(in.ID); err != nil {
		return err
	}
	if in.Email != nil && *in.Email != "" {
		if err := text.Check(*in.Email); err != nil {
			return errs.InvalidField("/email", "email "+err.Error())
		}
		if a, err := mail.ParseAddress(*in.Email); err != nil || a.Address != *in.Email {
			return errs.InvalidField("/email", "email must be a plain address like name@example.com")
		}
	}
	if in.LowBalanceThreshold != nil && *in.LowBalanceThreshold < 0 {
		return errs.InvalidField("/low_balance_threshold", "low_balance_threshold must not be negative")
	}
	if in.LowBalanceThresholds != nil {
		if _, err := normalizeThresholds(*in.LowBalanceThresholds); err != nil {
			return err
		}
	}
	if in.Name != nil {
		if err := text.Check(*in.Name); err != nil {
			return errs.InvalidField("/name", "name "+err.Error())
		}
	}
	if in.Billing != nil {
		if err := in.Billing.validate(); err != nil {
			return err
		}
	}
	for k, v := range in.Metadata {
		if n := utf8.RuneCountInString(k); n == 0 || n > 40 || utf8.RuneCountInString(v) > 500 {
			return errs.InvalidField("/metadata", "metadata keys must be 1 to 40 characters and values at most 500")
		}
		if err := text.Check(k); err != nil {
			return errs.InvalidField("/metadata", "metadata key "+err.Error())
		}
		if err := text.Check(v); err != nil {
			return errs.InvalidField("/metadata", "metadata value of "+strconv.Quote(k)+" "+err.Error())
		}
	}
	return nil
}

// customerRow is a row of customers. Metadata is the jsonb column's text.
type customerRow struct {
	ID                   string
	Email                *string
	Name                 *string
	LowBalanceThreshold  *int64
	LowBalanceThresholds Thresholds
	Metadata             string
	StripeCustomerID     *string
	Billing              *string
	InvoiceAlways        bool
	CreatedAt            time.Time `gorm:"autoCreateTime:false"`
	UpdatedAt            time.Time `gorm:"autoUpdateTime:false"`
}

func (customerRow) TableName() string { return "customers" }

func (r customerRow) customer() (Customer, error) {
	c := Customer{ID: r.ID, LowBalanceThreshold: r.LowBalanceThreshold, LowBalanceThresholds: r.LowBalanceThresholds, CreatedAt: r.CreatedAt, UpdatedAt: r.UpdatedAt}
	if r.Email != nil {
		c.Email = *r.Email
	}
	if r.Name != nil {
		c.Name = *r.Name
	}
	if r.StripeCustomerID != nil {
		c.StripeCustomerID = *r.StripeCustomerID
	}
	if err := json.Unmarshal([]byte(r.Metadata), &c.Metadata); err != nil {
		return Customer{}, fmt.Errorf("customers: metadata of %s: %w", r.ID, err)
	}
	b, err := billingFrom(r.Billing, r.InvoiceAlways)
	if err != nil {
		return Customer{}, err
	}
	c.Billing = b
	return c, nil
}

var constraints = map[string]errs.Code{
	"customers_stripe_customer_id_key": errs.Conflict,
	"customers_id_format":              errs.Invalid,
}

// upsertSQL creates the customer or merges the fields given into it: a nil
// field keeps its value, and the metadata is replaced only when given (the
// last parameter says whether it was). xmax = 0 tells an inserted row from
// an updated one.
const upsertSQL = `
INSERT INTO customers (id, email, name, low_balance_threshold, low_balance_thresholds, metadata, stripe_customer_id, billing, invoice_always, created_at, updated_at)
VALUES (?, ?, ?, ?, ?::bigint[], COALESCE(?::jsonb, '{}'), ?, ?::jsonb, COALESCE(?, false), ?, ?)
ON CONFLICT (id) DO UPDATE SET
	billing = COALESCE(EXCLUDED.billing, customers.billing),
	invoice_always = CASE WHEN ?::boolean IS NULL THEN customers.invoice_always ELSE EXCLUDED.invoice_always END,
	email = COALESCE(EXCLUDED.email, customers.email),
	name = COALESCE(EXCLUDED.name, customers.name),
	low_balance_threshold = COALESCE(EXCLUDED.low_balance_threshold, customers.low_balance_threshold),
	low_balance_thresholds = COALESCE(EXCLUDED.low_balance_thresholds, customers.low_balance_thresholds),
	metadata = CASE WHEN ? THEN EXCLUDED.metadata ELSE customers.metadata END,
	stripe_customer_id = COALESCE(EXCLUDED.stripe_customer_id, customers.stripe_customer_id),
	updated_at = EXCLUDED.updated_at
RETURNING id, email, name, low_balance_threshold, low_balance_thresholds, metadata, stripe_customer_id, billing, invoice_always, created_at, updated_at, (xmax = 0) AS created`

// Service reads and writes customers.
type Service struct {
	db  *gorm.DB
	now func() time.Time
}

// Options are what New needs.
type Options struct {
	DB *gorm.DB
	// Now is the clock that stamps created_at and updated_at; nil is time.Now.
	Now func() time.Time
}

// New returns the customers Service.
func New(o Options) *Service {
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Service{db: o.DB, now: o.Now}
}

// Upsert creates the customer or updates the fields given, appending
// customer.created or customer.updated in the same transaction. It returns
// errs.Invalid for bad input and errs.Conflict when the Stripe customer id is
// taken by another customer or would replace a different existing link.
func (s *Service) Upsert(ctx context.Context, in UpsertInput) (c Customer, created bool, err error) {
	if err := in.Validate(); err != nil {
		return Customer{}, false, err
	}
	var meta *string
	if in.Metadata != nil {
		b, _ := json.Marshal(in.Metadata)
		m := string(b)
		meta = &m
	}
	err = db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		if in.StripeCustomerID != nil {
			var existing customerRow
			err := tx.Clauses(clause.Locking{Strength: "UPDATE"}).Where("id = ?", in.ID).Take(&existing).Error
			switch {
			case errors.Is(err, gorm.ErrRecordNotFound): // a new customer links freely
			case err != nil:
				return err
			case existing.StripeCustomerID != nil && *existing.StripeCustomerID != *in.StripeCustomerID:
				return errs.E(errs.Conflict, "customer %s is already linked to Stripe customer %s", in.ID, *existing.StripeCustomerID)
			}
		}
		now := s.now()
		var r struct {
			Row     customerRow `gorm:"embedded"`
			Created bool
		}
		var billing *string
		var invoiceAlways *bool
		if in.Billing != nil {
			doc := in.Billing.doc()
			billing, invoiceAlways = &doc, &in.Billing.InvoiceAlways
		}
		var thresholds *string
		if in.LowBalanceThresholds != nil {
			t, _ := normalizeThresholds(*in.LowBalanceThresholds) // validated
			lit := t.String()
			thresholds = &lit
		}
		err := tx.Raw(upsertSQL, in.ID, in.Email, in.Name, in.LowBalanceThreshold, thresholds, meta, in.StripeCustomerID, billing, invoiceAlways,
			now, now, invoiceAlways, meta != nil).Scan(&r).Error
		if err != nil {
			return db.Translate(err, constraints)
		}
		if c, err = r.Row.customer(); err != nil {
			return err
		}
		created = r.Created
		if created {
			return events.Append(ctx, tx, c.ID, events.CustomerCreated{Customer: eventData(c)})
		}
		return events.Append(ctx, tx, c.ID, events.CustomerUpdated{Customer: eventData(c)})
	})
	return c, created, err
}

// Get returns the customer, or errs.NotFound.
func (s *Service) Get(ctx context.Context, id string) (Customer, error) {
	return Get(ctx, s.db, id)
}

// Get reads the customer through gdb (which may be a transaction), or
// returns errs.NotFound.
func Get(ctx context.Context, gdb *gorm.DB, id string) (Customer, error) {
	return getBy(ctx, gdb, "id", id, "customer %s not found")
}

// GetByStripeCustomer reads, through gdb, the customer linked to the
// Stripe customer stripeCustomerID, or returns errs.NotFound.
func GetByStripeCustomer(ctx context.Context, gdb *gorm.DB, stripeCustomerID string) (Customer, error) {
	return getBy(ctx, gdb, "stripe_customer_id", stripeCustomerID, "no customer is linked to Stripe customer %s")
}

// getBy reads the customer whose unique column holds value; none is
// errs.NotFound with notFound, a format of value.
func getBy(ctx context.Context, gdb *gorm.DB, column, value, notFound string) (Customer, error) {
	var r customerRow
	// column is one of Get's and GetByStripeCustomer's, never input.
	err := gdb.WithContext(ctx).Where(column+" = ?", value).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return Customer{}, errs.E(errs.NotFound, notFound, value)
	}
	if err != nil {
		return Customer{}, db.Translate(err, nil)
	}
	return r.customer()
}

// Ensure creates the customer inside the caller's transaction tx if it does
// not exist yet (appending customer.created), for the operations that create
// customers on first use: checkouts, grants and usage events. It returns
// errs.Invalid for a malformed id.
func Ensure(ctx context.Context, tx *gorm.DB, id string, now time.Time) (created bool, err error) {
	ids, err := EnsureMany(ctx, tx, []string{id}, now)
	return len(ids) == 1, err
}

// EnsureMany is Ensure for each of ids, in two statements whatever their
// number (one when none is new): a batch of usage, or an import, may name
// thousands of customers new to tally, and one round trip each made the
// first import of a legacy system's usage wait on them. The rows are
// inserted in id order, so two batches naming the same new customers wait
// for each other rather than deadlock. It returns the ids it created,
// sorted. One invalid id fails it whole (errs.Invalid), before anything is
// written.
func EnsureMany(ctx context.Context, tx *gorm.DB, ids []string, now time.Time) ([]string, error) {
	for _, id := range ids {
		if err := ValidateID(id); err != nil {
			return nil, err
		}
	}
	var created []string
	err := tx.WithContext(ctx).Raw(`INSERT INTO customers (id, metadata, created_at, updated_at)
		SELECT id, '{}'::jsonb, ?::timestamptz, ?::timestamptz FROM (SELECT DISTINCT unnest(?::text[]) AS id) n
		ORDER BY id COLLATE "C"
		ON CONFLICT (id) DO NOTHING
		RETURNING id`, now, now, db.Array(ids)).Scan(&created).Error
	if err != nil {
		return nil, db.Translate(err, constraints)
	}
	slices.Sort(created)
	evs := make([]events.Entry, len(created))
	for i, id := range created {
		c := Customer{ID: id, Metadata: map[string]string{}, CreatedAt: now, UpdatedAt: now}
		evs[i] = events.Entry{CustomerID: id, Data: events.CustomerCreated{Customer: eventData(c)}}
	}
	return created, events.AppendMany(ctx, tx, evs)
}

// LinkStripe records the Stripe customer created for id, inside the caller's
// transaction tx. Linking the same id again is a no-op; a different existing
// link, or a Stripe id owned by another customer, is errs.Conflict; an unknown
// customer is errs.NotFound.
func LinkStripe(ctx context.Context, tx *gorm.DB, id, stripeCustomerID string, now time.Time) error {
	res := tx.WithContext(ctx).Model(&customerRow{}).Where("id = ? AND stripe_customer_id IS NULL", id).
		Updates(map[string]any{"stripe_customer_id": stripeCustomerID, "updated_at": now})
	if res.Error != nil {
		return db.Translate(res.Error, constraints)
	}
	if res.RowsAffected == 1 {
		c, err := Get(ctx, tx, id)
		if err != nil {
			return err
		}
		return events.Append(ctx, tx, id, events.CustomerUpdated{Customer: eventData(c)})
	}
	c, err := Get(ctx, tx, id)
	if err != nil {
		return err
	}
	if c.StripeCustomerID != stripeCustomerID {
		return errs.E(errs.Conflict, "customer %s is already linked to Stripe customer %s", id, c.StripeCustomerID)
	}
	return nil
}

// eventData is the customer as customer.* events carry it.
func eventData(c Customer) events.Customer {
	return events.Customer{
		ID: c.ID, Email: c.Email, Name: c.Name, LowBalanceThreshold: c.LowBalanceThreshold,
		LowBalanceThresholds: c.LowBalanceThresholds,
		Metadata:             c.Metadata, StripeCustomerID: c.StripeCustomerID,
	}
}
