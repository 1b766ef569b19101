package credits

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/forecast"
)

// The consumption forecast of one customer, learned from its daily
// rollup (credit_consumption_daily, which consume maintains), and the
// watcher that warns when the credits are about to run out.

// MaxForecastHorizon is the most days the forecast endpoint covers.
const MaxForecastHorizon = 90

// historyReadDays is how many past days a forecast reads: the model fits
// the last 16 weeks; a few more let a weekday pattern settle.
const historyReadDays = 180

// ForecastResult is a customer's forecast from now.
type ForecastResult struct {
	CustomerID string
	// Balance is the ledger balance; Available what may be spent now.
	Balance, Available int64
	GeneratedAt        time.Time
	// Model and HistoryDays: see forecast.Forecast. The history runs
	// through yesterday (UTC); the forecast starts today.
	Model       string
	HistoryDays int
	HorizonDays int
	Daily       []forecast.Day
	// Runway of Available over the horizon: nil days are beyond it.
	Runway forecast.Runway
	// Suggestion is the pack that covers the pessimistic consumption of the
	// next forecast.SuggestionDays days at the lowest price; nil when
	// Available covers them.
	Suggestion *forecast.Suggestion
}

// Forecast predicts the customer's consumption over the next horizonDays
// days (1 to MaxForecastHorizon), how long its available credits last,
// and which of packs (the catalog's credit packs; those in the first
// pack's currency are compared) to buy, at most maxQuantity units at once.
//
// Errors: errs.Invalid (horizon, customer id), errs.NotFound (unknown
// customer), errs.Unavailable.
func (s *Service) Forecast(ctx context.Context, customerID string, horizonDays int, packs []catalog.CreditPack, maxQuantity int64) (ForecastResult, error) {
	if horizonDays < 1 || horizonDays > MaxForecastHorizon {
		return ForecastResult{}, errs.InvalidField("horizon_days", fmt.Sprintf("horizon_days must be from 1 to %d", MaxForecastHorizon))
	}
	b, err := s.Balance(ctx, customerID)
	if err != nil {
		return ForecastResult{}, err
	}
	now := s.now()
	f, h, err := s.predict(ctx, s.db, customerID, now, max(horizonDays, forecast.SuggestionDays))
	if err != nil {
		return ForecastResult{}, err
	}
	out := ForecastResult{
		CustomerID: customerID, Balance: b.Balance, Available: b.Available, GeneratedAt: now.UTC(),
		Model: f.Model, HistoryDays: h.Len(), HorizonDays: horizonDays,
	}
	head := f.Head(horizonDays)
	out.Daily = head.Daily
	out.Runway = head.Runway(float64(out.Available))
	var same []catalog.CreditPack
	for _, p := range packs {
		if p.Currency == packs[0].Currency {
			same = append(same, p)
		}
	}
	if len(same) > 0 {
		out.Suggestion, err = f.Suggest(float64(out.Available), same, forecast.CheckoutLimits{MaxQuantity: maxQuantity})
		if err != nil {
			return ForecastResult{}, err
		}
	}
	return out, nil
}

// predict reads the customer's rollup through yesterday from gdb (the
// pool, or the caller's transaction) and forecasts horizon days from today.
func (s *Service) predict(ctx context.Context, gdb *gorm.DB, customerID string, now time.Time, horizon int) (forecast.Forecast, forecast.History, error) {
	today := forecast.DateOf(now.UTC())
	var rows []struct {
		Day      time.Time
		Consumed int64
	}
	err := gdb.WithContext(ctx).Raw(`SELECT day, consumed FROM credit_consumption_daily
		WHERE customer_id = ? AND day >= ?::date AND day < ?::date ORDER BY day`,
		customerID, today.AddDate(0, 0, -historyReadDays).Format(time.DateOnly), today.Format(time.DateOnly)).Scan(&rows).Error
	if err != nil {
		return forecast.Forecast{}, forecast.History{}, db.Translate(err, nil)
	}
	var h forecast.History
	if len(rows) == 0 {
		h, err = forecast.NewHistory(today, nil) // no history: forecast from today
	} else {
		days := make([]forecast.DayTotal, len(rows))
		for i, r := range rows {
			days[i] = forecast.DayTotal{Date: r.Day, Consumed: float64(r.Consumed)}
		}
		h, err = forecast.HistoryFromDays(days, time.Time{}, today.AddDate(0, 0, -1))
	}
	if err != nil {
		return forecast.Forecast{}, forecast.History{}, err
	}
	f, err := forecast.Predict(h, horizon)
	return f, h, err
}

// ForecastWatcher sends credits.depletion_forecast when a customer's
// pessimistic runway first drops under WarnDays, and again only after it
// has risen above. It looks, every interval, at the customers whose
// balance changed since it last did.
type ForecastWatcher struct {
	s        *Service
	warnDays int
	interval time.Duration
	logger   *slog.Logger
}

// NewForecastWatcher returns the watcher over s's wallet; cfg's
// ForecastWarnDays and ForecastInterval say when and how often.
func NewForecastWatcher(s *Service) *ForecastWatcher {
	return &ForecastWatcher{s: s, warnDays: s.cfg.ForecastWarnDays, interval: s.cfg.ForecastInterval, logger: s.logger}
}

// Name identifies the worker in logs.
func (w *ForecastWatcher) Name() string { return "credits-forecast-watcher" }

// Run checks every interval until ctx ends and returns ctx's error.
func (w *ForecastWatcher) Run(ctx context.Context) error {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		if _, err := w.CheckOnce(ctx); err != nil && ctx.Err() == nil {
			w.logger.Error("depletion forecast round failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// forecastStateRow is a row of credit_forecast_state.
type forecastStateRow struct {
	CustomerID string
	Warned     bool
	CheckedAt  time.Time
}

func (forecastStateRow) TableName() string { return "credit_forecast_state" }

// watchAvailableSQL is what a customer may spend now. remaining > 0 says
// what remaining > held implies (held is never negative) in the words of
// the grants' partial indexes: without it the planner cannot use them, and
// each customer's check scanned every grant of every customer.
const watchAvailableSQL = `SELECT COALESCE(sum(remaining - held), 0)::bigint FROM credit_grants
	WHERE customer_id = ? AND remaining > 0 AND remaining > held AND (expires_at IS NULL OR expires_at > ?)
	  AND (effective_at IS NULL OR effective_at <= ?)`

// watchBatch is how many customers one round of the watcher reads.
const watchBatch = 500

// CheckOnce forecasts every customer whose balance changed since its last
// check (in rounds of watchBatch, at most 20 rounds) and returns how many
// warnings it sent.
func (w *ForecastWatcher) CheckOnce(ctx context.Context) (int, error) {
	sent := 0
	for range 20 {
		n, more, err := w.checkRound(ctx)
		sent += n
		if err != nil || !more {
			return sent, err
		}
	}
	return sent, nil
}

func (w *ForecastWatcher) checkRound(ctx context.Context) (sent int, more bool, err error) {
	var ids []string
	err = w.s.db.WithContext(ctx).Raw(`SELECT b.customer_id FROM credit_balances b
		LEFT JOIN credit_forecast_state f ON f.customer_id = b.customer_id
		WHERE f.checked_at IS NULL OR b.updated_at > f.checked_at
		ORDER BY b.updated_at LIMIT ?`, watchBatch).Scan(&ids).Error
	if err != nil {
		return 0, false, db.Translate(err, nil)
	}
	for _, id := range ids {
		warned, err := w.check(ctx, id)
		if err != nil {
			return sent, false, fmt.Errorf("credits: depletion forecast of %s: %w", id, err)
		}
		if warned {
			sent++
		}
	}
	return sent, len(ids) == watchBatch, nil
}

func (w *ForecastWatcher) check(ctx context.Context, customerID string) (bool, error) {
	sent := false
	err := db.InTx(ctx, w.s.db, func(tx *gorm.DB) error {
		sent = false
		// The state row's lock orders two watchers (replicas) on one customer.
		now := w.s.now()
		err := tx.WithContext(ctx).Clauses(clause.OnConflict{DoNothing: true}).
			Create(&forecastStateRow{CustomerID: customerID, CheckedAt: time.Unix(0, 0).UTC()}).Error
		if err != nil {
			return err
		}
		var st forecastStateRow
		if err := tx.WithContext(ctx).Clauses(clause.Locking{Strength: "UPDATE"}).Where("customer_id = ?", customerID).Take(&st).Error; err != nil {
			return err
		}
		// What may be spent now (as Balance's available): the unheld
		// remainder of effective, unexpired grants.
		var available int64
		if err := tx.WithContext(ctx).Raw(watchAvailableSQL, customerID, now, now).Scan(&available).Error; err != nil {
			return err
		}
		// Read in tx: asked of the pool while tx keeps a connection, it
		// waited for a second one, and with the jobs that keep one for
		// their advisory lock (db.TryExclusive) the smallest pool had none
		// left (TestForecastWatcherBesideTheLockKeepers).
		f, _, err := w.s.predict(ctx, tx, customerID, now, w.warnDays)
		if err != nil {
			return err
		}
		r := f.Runway(float64(available))
		below := r.PessimisticDays != nil && *r.PessimisticDays < w.warnDays
		if below && !st.Warned {
			if err := events.Append(ctx, tx, customerID, events.CreditsDepletionForecast{
				CustomerID: customerID, Available: available, RunwayDays: *r.PessimisticDays,
				DepletesOn: r.PessimisticDepletesOn.Format(time.DateOnly), WarnDays: w.warnDays,
			}); err != nil {
				return err
			}
			sent = true
		}
		return tx.WithContext(ctx).Model(&forecastStateRow{}).Where("customer_id = ?", customerID).
			Updates(map[string]any{"warned": below, "checked_at": now}).Error
	})
	return sent, db.Translate(err, nil)
}
