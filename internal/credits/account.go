package credits

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
)

// account is a customer's credit_balances row, locked by the current
// transaction. Every change to a customer's credits goes through one, which
// is what makes the no-overdraft check and the ledger chain exact.
type account struct {
	customerID string
	// balance is the ledger sum; after lockAccount it is also the spendable
	// balance, because lockAccount expires whatever is due first.
	balance    int64
	nextExpiry sql.NullTime
	// held is the part of balance that active holds keep (not spendable);
	// nextHoldExpiry a lower bound of their soonest expires_at.
	held           int64
	nextHoldExpiry sql.NullTime
	notified       bool
	// threshold is the low-balance threshold in force (0: none).
	threshold int64
	// defaultThreshold is the configured default when the caller has one
	// (Service methods), nil inside other packages' transactions.
	defaultThreshold *int64
	// now is the time of every change made under this lock: read from the
	// clock once the lock is held, and never earlier than the row's last
	// change, so that a customer's ledger times follow its sequence even
	// when a writer waited for the lock or runs on a replica whose clock
	// lags. Expiry decisions use it too.
	now time.Time
	// pending is the part of balance in grants not effective yet (scheduled
	// credits), read with the lock; balance - held - pending is what may be
	// spent now (spendable), which thresholds and the top-up compare.
	pending int64
	// topUpBelow is the customer's automatic top-up threshold when a top-up
	// may start now (enabled and active, a usable saved card, none in
	// flight, the month's limit not reached), else 0; topUp starts one.
	// See afterLowering.
	topUpBelow int64
	topUp      TopUpFunc
	// thresholds are the customer's further low-balance thresholds, and
	// startAvailable what was spendable when the lock was taken (or at the
	// last afterLowering): afterLowering fires credits.low_balance for each
	// one the change crossed downwards.
	thresholds     customers.Thresholds
	startAvailable int64
}

// TopUpFunc starts a customer's automatic top-up inside the transaction tx
// of a change that left available credits below the customer's threshold
// (payments.Service.StartAutoTopUp). It must itself re-check, under a lock,
// that one may start: the account's view of the settings is a hint read
// without one.
type TopUpFunc func(ctx context.Context, tx *gorm.DB, customerID string, available int64, now time.Time) error

// spendable is what the locked account may spend or hold now, from the
// numbers the lock read: balance less what holds keep and what is not
// effective yet. It equals available (which asks the grants) while the
// account is current; it costs no statement.
func (a *account) spendable() int64 {
	return a.balance - a.held - a.pending
}

// lockAccount locks customerID's balance row (found=false when it has none:
// the customer never had a grant), reads "now" from clock (see account.now),
// releases every hold past its expires_at, and expires the remainder of
// every grant whose expiry instant has passed, so that a credit is never
// spendable after it expires, nor kept by a hold after the hold expires,
// even when the sweeper has not run yet. While nothing is due this costs
// no query beyond the lock: the row's expiry bounds say so.
//
// Lock order, everywhere in this package: the balance row first, then the
// customer's grants. The sweeper keeps it too, so no two writers deadlock.
func lockAccount(ctx context.Context, tx *gorm.DB, customerID string, clock func() time.Time, defaultThreshold *int64) (*account, bool, error) {
	return lockAccountAt(ctx, tx, customerID, clock, defaultThreshold, true)
}

func lockAccountAt(ctx context.Context, tx *gorm.DB, customerID string, clock func() time.Time, defaultThreshold *int64, expire bool) (*account, bool, error) {
	a := &account{customerID: customerID, defaultThreshold: defaultThreshold}
	// A hint for the top-up decision only; a.now is read once the lock is held.
	clockNow := clock()
	// The money lock: the balance row, joined to the customer for its
	// threshold, locked for the rest of tx.
	var locked struct {
		Balance        int64
		NextExpiry     sql.NullTime
		Held           int64
		NextHoldExpiry sql.NullTime
		Notified       bool
		Threshold      int64
		UpdatedAt      time.Time
		Pending        int64
		NextEffective  sql.NullTime
		Fresh          bool
		TopUpBelow     int64
		Thresholds     customers.Thresholds
	}
	// The automatic top-up settings and the saved card (tables of
	// internal/payments) are read in the same statement, so that deciding
	// whether a change must start a top-up costs no round trip of its own.
	// A direct statement (db.ScanDirect): every change of a balance takes
	// this lock, and gorm wrote its text out again at each call.
	scan := func() (bool, error) {
		return db.ScanDirect(ctx, tx, lockAccountQuery, []any{defaultThreshold, clockNow, clockNow, clockNow, customerID},
			&locked.Balance, &locked.NextExpiry, &locked.Held, &locked.NextHoldExpiry, &locked.Notified, &locked.Threshold,
			&locked.UpdatedAt, &locked.Thresholds, &locked.Pending, &locked.NextEffective, &locked.Fresh, &locked.TopUpBelow)
	}
	// rescan reads it all again at clockNow with the row held: it does not
	// wait, and its snapshot has every change of the customer's credits
	// before this one.
	rescan := func() error {
		found, err := scan()
		if err == nil && !found {
			err = fmt.Errorf("credits: balance row of %s vanished under its lock", customerID)
		}
		return err
	}
	found, err := scan()
	if err != nil {
		return nil, false, err
	}
	if !found {
		return nil, false, nil
	}
	if !locked.Fresh {
		// The lock was waited for: the locked row is its latest version,
		// but what the statement read besides it (pending, the soonest
		// scheduled grant, the thresholds, the automatic top-up settings)
		// is from the snapshot taken before the wait. The transaction
		// waited for may have changed those too: a scheduled grant, or a
		// top-up's confirmation, which grants its credits and clears the
		// payment in flight in one transaction (a consume that waited for
		// it started no top-up, however little it left).
		clockNow = clock()
		if err := rescan(); err != nil {
			return nil, false, err
		}
	}
	lastChange := locked.UpdatedAt
	// Every change saves its time as updated_at, so the row holds the time
	// of the customer's latest ledger entry.
	a.now = clock()
	if lastChange.After(a.now) {
		a.now = lastChange
	}
	// What the statement read at clockNow may differ at a.now, when the
	// change is made (later: a wait for the lock, or a row last changed by
	// a replica whose clock is ahead of this one's), in two ways, both
	// rare: a scheduled grant became effective in between (spendable at
	// a.now, where the draws take from it, so not pending in what the
	// thresholds and the top-up compare), or the month turned (the
	// top-up's monthly limit and the card's expiry are the month's, and
	// StartAutoTopUp and the batch count in a.now's). Then it is read
	// again at a.now.
	if !sameUTCMonth(a.now, clockNow) || (locked.NextEffective.Valid && !locked.NextEffective.Time.After(a.now)) {
		clockNow = a.now
		if err := rescan(); err != nil {
			return nil, false, err
		}
	}
	a.balance, a.nextExpiry, a.notified, a.threshold = locked.Balance, locked.NextExpiry, locked.Notified, locked.Threshold
	a.held, a.nextHoldExpiry, a.pending = locked.Held, locked.NextHoldExpiry, locked.Pending
	a.topUpBelow = locked.TopUpBelow
	a.thresholds = locked.Thresholds
	a.startAvailable = a.spendable()
	if !expire {
		return a, true, nil
	}
	if a.holdsDue() {
		// Releasing settles what it gives back, expiries included.
		if _, _, err := a.releaseOverdueHolds(ctx, tx); err != nil {
			return nil, false, err
		}
	} else if a.expiryDue() {
		if _, err := a.expireDue(ctx, tx, false); err != nil {
			return nil, false, err
		}
	}
	return a, true, nil
}

// sameUTCMonth reports whether a and b fall in the same calendar month, UTC.
func sameUTCMonth(a, b time.Time) bool {
	ay, am, _ := a.UTC().Date()
	by, bm, _ := b.UTC().Date()
	return ay == by && am == bm
}

// lockAccountQuery is lockAccountAt's statement: the balance row, locked,
// with what deciding on a low-balance notice and an automatic top-up needs.
const lockAccountQuery = `
		SELECT b.balance, b.next_expiry, b.held, b.next_hold_expiry, b.low_balance_notified AS notified,
		       COALESCE(c.low_balance_threshold, $1::bigint, b.default_low_balance_threshold) AS threshold, b.updated_at,
		       c.low_balance_thresholds AS thresholds,
		       COALESCE((SELECT sum(g.remaining)::bigint FROM credit_grants g
		                 WHERE g.customer_id = b.customer_id AND g.effective_at IS NOT NULL AND g.remaining > 0
		                   AND g.effective_at > $2::timestamptz), 0) AS pending,
		       (SELECT min(g.effective_at) FROM credit_grants g
		        WHERE g.customer_id = b.customer_id AND g.effective_at IS NOT NULL AND g.remaining > 0
		          AND g.effective_at > $2::timestamptz) AS next_effective,
		       -- Whether the row read from this statement's snapshot is the
		       -- one locked: when the lock was waited for, the locked row is
		       -- the latest version, but the reads above are from the
		       -- snapshot taken before the wait.
		       COALESCE((SELECT s.balance = b.balance AND s.held = b.held AND s.updated_at = b.updated_at
		                 FROM credit_balances s WHERE s.customer_id = b.customer_id), false) AS fresh,
		       COALESCE((SELECT t.threshold FROM auto_top_up_settings t
		                 JOIN customer_payment_methods m ON m.customer_id = t.customer_id
		                 WHERE t.customer_id = b.customer_id AND t.enabled AND t.status = 'active' AND t.in_flight_payment_id IS NULL
		                   AND make_date(m.exp_year, m.exp_month, 1) + interval '1 month' > ($3::timestamptz AT TIME ZONE 'UTC')
		                   AND (t.monthly_limit IS NULL OR t.month_count < t.monthly_limit
		                        OR t.month_start IS DISTINCT FROM date_trunc('month', $4::timestamptz AT TIME ZONE 'UTC')::date)), 0) AS top_up_below
		FROM credit_balances b JOIN customers c ON c.id = b.customer_id
		WHERE b.customer_id = $5
		FOR UPDATE OF b`

// holdsDue reports whether an active hold may be past its expires_at.
func (a *account) holdsDue() bool {
	return a.nextHoldExpiry.Valid && !a.nextHoldExpiry.Time.After(a.now)
}

// expiryDue reports whether a grant's unheld credits may be past expiry.
func (a *account) expiryDue() bool {
	return a.nextExpiry.Valid && !a.nextExpiry.Time.After(a.now)
}

// ensureAccount creates customerID's balance row if missing (the customer
// must exist) and locks it.
func ensureAccount(ctx context.Context, tx *gorm.DB, customerID string, clock func() time.Time, defaultThreshold *int64) (*account, error) {
	// A new row's updated_at is the epoch: it must not hold a later time
	// than the first change made under its lock.
	err := tx.WithContext(ctx).Clauses(clause.OnConflict{DoNothing: true}).
		Create(&balanceRow{CustomerID: customerID, UpdatedAt: time.Unix(0, 0).UTC()}).Error
	if err != nil {
		return nil, err
	}
	a, found, err := lockAccount(ctx, tx, customerID, clock, defaultThreshold)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, fmt.Errorf("credits: balance row of %s vanished after insert", customerID)
	}
	return a, nil
}

// save writes the account's balance, expiry bound and notice flag back,
// with a.now as the time of the change.
func (a *account) save(ctx context.Context, tx *gorm.DB) error {
	return tx.WithContext(ctx).Model(&balanceRow{}).Where("customer_id = ?", a.customerID).Updates(map[string]any{
		"balance":              a.balance,
		"next_expiry":          a.nextExpiry,
		"low_balance_notified": a.notified,
		"held":                 a.held,
		"next_hold_expiry":     a.nextHoldExpiry,
		// Only a caller with configuration (a Service) refreshes the default.
		"default_low_balance_threshold": gorm.Expr("COALESCE(?::bigint, default_low_balance_threshold)", a.defaultThreshold),
		"updated_at":                    a.now,
	}).Error
}

// lowBalance updates the notice flag for what the account now has
// available (spendable: held and pending credits do not count) and reports whether credits.low_balance must fire: once per fall below the
// threshold, re-armed when the balance is back at or above it. Grants pass
// mayFire=false: a balance that rises did not fall below anything.
func (a *account) lowBalance(mayFire bool) bool {
	below := a.threshold > 0 && a.spendable() < a.threshold
	switch {
	case below && !a.notified && mayFire:
		a.notified = true
		return true
	case !below:
		a.notified = false
	}
	return false
}

// afterLowering runs once for every change that lowered the customer's
// balance or what is available of it (consume, a hold, a capture, expiry,
// revoke, void, negative adjustment, voids on release), inside that
// change's transaction, after the change is written and with a holding the
// new numbers. It is the one place for what follows a fall, and compares
// what is available (spendable), not the balance:
//
//   - credits.low_balance for the customer's threshold when fire (the
//     decision a.lowBalance took for this change) says so;
//   - credits.low_balance for each further threshold (low_balance_thresholds)
//     this change crossed downwards: from at or above it to below it. Every
//     change runs under the lock, so a fall is seen once, and a rise back
//     re-arms it;
//   - an automatic top-up, started in this same transaction, when what is
//     available is now below the customer's top-up threshold and one may
//     start (a.topUp re-checks under its own lock).
//
// It costs no statement while what is available stays at or above every
// threshold, or when no top-up may start: lockAccount read what it needs
// with the lock.
func (a *account) afterLowering(ctx context.Context, tx *gorm.DB, fire bool) error {
	avail := a.spendable()
	if fire {
		if err := events.Append(ctx, tx, a.customerID, events.CreditsLowBalance{
			CustomerID: a.customerID, Balance: a.balance, Available: avail, Threshold: a.threshold,
		}); err != nil {
			return err
		}
	}
	for _, t := range a.thresholds {
		if t != a.threshold && a.startAvailable >= t && avail < t {
			if err := events.Append(ctx, tx, a.customerID, events.CreditsLowBalance{
				CustomerID: a.customerID, Balance: a.balance, Available: avail, Threshold: t,
			}); err != nil {
				return err
			}
		}
	}
	a.startAvailable = avail
	if a.topUp == nil || a.topUpBelow <= 0 || avail >= a.topUpBelow {
		return nil
	}
	a.topUpBelow = 0 // at most once per transaction
	return a.topUp(ctx, tx, a.customerID, avail, a.now)
}

// expireDue writes an expire entry for the unheld remainder of each of the
// account's grants whose expiry instant is at or before a.now (what active
// holds keep of such a grant stays until they end: see releaseHeld),
// recomputes the expiry bound, fires credits.low_balance if that crossed
// the threshold, and saves the account. With skipLocked (the sweeper)
// grants another transaction holds are left for later.
func (a *account) expireDue(ctx context.Context, tx *gorm.DB, skipLocked bool) (int, error) {
	now := a.now
	lock := clause.Locking{Strength: "UPDATE"}
	if skipLocked {
		lock.Options = "SKIP LOCKED"
	}
	type due struct {
		ID        string
		Remaining int64
		Held      int64
		ExpiresAt time.Time
	}
	var grants []due
	err := tx.WithContext(ctx).Model(&grantRow{}).Clauses(lock).
		Where("customer_id = ? AND remaining > 0 AND remaining > held AND expires_at <= ?", a.customerID, now).
		Order("expires_at, created_at, id").Find(&grants).Error
	if err != nil {
		return 0, err
	}
	for _, g := range grants {
		gone := g.Remaining - g.Held
		if err := tx.WithContext(ctx).Model(&grantRow{}).Where("id = ?", g.ID).
			Updates(map[string]any{"remaining": g.Held, "expired_at": now}).Error; err != nil {
			return 0, err
		}
		a.balance -= gone
		txID := db.NewID("ctx")
		if err := insertEntry(ctx, tx, entryRow{
			ID: txID, CustomerID: a.customerID, Kind: KindExpire, Amount: -gone, BalanceAfter: a.balance,
			Reason: "expired", GrantID: &g.ID, CreatedAt: now,
		}); err != nil {
			return 0, err
		}
		if err := events.Append(ctx, tx, a.customerID, events.CreditsExpired{
			CustomerID: a.customerID, GrantID: g.ID, TransactionID: txID,
			Amount: gone, Balance: a.balance, ExpiresAt: g.ExpiresAt.UTC(),
		}); err != nil {
			return 0, err
		}
	}
	// Held credits of an expired grant are not counted: releaseHeld lowers
	// the bound again when a hold gives them back.
	err = tx.WithContext(ctx).Raw(`SELECT min(expires_at) FROM credit_grants
		WHERE customer_id = ? AND remaining > 0 AND remaining > held AND expires_at IS NOT NULL`, a.customerID).Scan(&a.nextExpiry).Error
	if err != nil {
		return 0, err
	}
	fire := a.lowBalance(true)
	if err := a.save(ctx, tx); err != nil {
		return 0, err
	}
	if len(grants) > 0 {
		if err := a.afterLowering(ctx, tx, fire); err != nil {
			return 0, err
		}
	}
	return len(grants), nil
}

// entryRow is a credit_ledger row to insert.
type entryRow struct {
	ID             string
	CustomerID     string
	Kind           string
	Amount         int64
	BalanceAfter   int64
	Reason         string
	Metadata       map[string]string
	GrantID        *string
	PaymentID      *string
	IdempotencyKey *string
	// HoldID names the hold a capture's consume entry spent from.
	HoldID *string
	// Draws are the grants a revoke took from; Shortfall what it could not.
	Draws     []Draw
	Shortfall int64
	CreatedAt time.Time
}

func insertEntry(ctx context.Context, tx *gorm.DB, e entryRow) error {
	meta, err := metadataJSON(e.Metadata)
	if err != nil {
		return err
	}
	draws, err := drawsJSON(e.Draws)
	if err != nil {
		return err
	}
	var shortfall *int64
	if e.Shortfall > 0 {
		shortfall = &e.Shortfall
	}
	return tx.WithContext(ctx).Create(&ledgerRow{
		ID: e.ID, CustomerID: e.CustomerID, Kind: e.Kind, Amount: e.Amount, BalanceAfter: e.BalanceAfter,
		Reason: e.Reason, Metadata: meta, GrantID: e.GrantID, PaymentID: e.PaymentID, Draws: draws,
		IdempotencyKey: e.IdempotencyKey, Shortfall: shortfall, HoldID: e.HoldID, CreatedAt: e.CreatedAt,
	}).Error
}

func metadataJSON(m map[string]string) (string, error) {
	if len(m) == 0 {
		return "{}", nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return "", fmt.Errorf("credits: metadata: %w", err)
	}
	return string(b), nil
}

// insufficient is the insufficient_credits error: the customer owns
// balance credits, of which available may be spent or held now.
func insufficient(balance, available, amount int64) error {
	e := errs.E(errs.InsufficientCredits, "insufficient credits: %d available (balance %d), %d requested", available, balance, amount)
	e.Extra = map[string]any{"balance": balance, "available": available}
	return e
}

// available is what the locked account may spend or hold now: the unheld
// remainder of its effective, unexpired grants. (The balance row does not
// know which grants are not effective yet, so this asks the grants; only
// answers that report it and refusals call it.)
func (a *account) available(ctx context.Context, tx *gorm.DB) (int64, error) {
	var n int64
	err := tx.WithContext(ctx).Raw(`SELECT COALESCE(sum(remaining - held), 0)::bigint FROM credit_grants
		WHERE customer_id = ? AND remaining > 0 AND remaining > held AND (expires_at IS NULL OR expires_at > ?)
		  AND (effective_at IS NULL OR effective_at <= ?)`, a.customerID, a.now, a.now).Scan(&n).Error
	return n, err
}

// refuse is insufficient for the locked account, with what it has
// available. Errors: the insufficient_credits error, or the query's.
func (a *account) refuse(ctx context.Context, tx *gorm.DB, amount int64) error {
	avail, err := a.available(ctx, tx)
	if err != nil {
		return err
	}
	return insufficient(a.balance, avail, amount)
}
