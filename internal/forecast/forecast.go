// Package forecast predicts a customer's daily credit consumption from its
// own past: the expected consumption of each coming day with an 80%
// interval, how long a balance lasts at that pace (the runway) and which
// credit pack covers the next month at the lowest price.
//
// It is pure computation: no database, no clock, no randomness that is not
// seeded. A caller hands it a History (the daily rollup of one customer, or
// a customer's rows of the offline CSV) and gets a Forecast of the days
// after the history's last day. The same code answers the API, the
// `tally forecast` command and its backtest.
//
// # The model
//
// The full model is exponential smoothing with a damped additive trend and
// an additive weekly season, ETS(A,Ad,A) in Hyndman's taxonomy, fitted to
// the customer's last 16 weeks on two scales:
//
//   - the log scale, x = log(1 + y), where a weekly cycle and a growth are
//     multiplicative, as they are for a customer that consumes most days
//     (twice the customer, twice the weekend dip), and where a forecast
//     brought back with exp(x) - 1 is never negative;
//   - the linear scale, x = y / (the window's mean day), right for a
//     customer idle on most days, where the log of a busy day is a huge
//     error that the log scale would turn into a season.
//
// On each scale the model is made robust. An error larger than three times
// the running mean absolute error moves the states only up to that bound,
// so a burst moves the level by a fraction of what it would otherwise.
// Three such errors in a row on the same side are a change of level, not a
// burst: the level jumps by their mean at once, so the forecast follows a
// customer that tripled or stopped within three days. The trend is
// bounded to 3% a day; faster is a change of level. The smoothing weights
// (level, trend, season or none, damping) come from a small grid, by the
// smallest sum of squared one-step errors on that scale: squared, because
// the expected day is a mean.
//
// Of the two fits, the one whose expected days would have been closer to
// what happened answers: each is replayed out of sample from every day of
// the last 8 weeks, 14 days ahead, and their mean squared errors in
// credits are compared. On the linear scale a change of level scales the
// weekly swing with it (a customer that stops has none left).
//
// The expected day is the day's forecast plus each of the customer's past
// one-step errors, brought back to credits and averaged (Duan's smearing):
// a mean, so that the expected total of a month is the sum of its expected
// days, which a runway needs. The interval comes from 300 simulated
// futures, each replaying the fitted model with one-step errors drawn from
// the customer's past ones (bursts and idle days included) and shifted as
// a whole by one of the level errors the out-of-sample replay made, so a
// month's total is as uncertain as a misjudged level makes it, not only as
// daily noise does. Low and High are the futures' 10% and 90% quantiles
// per day, and the Cumulative bounds those of their running totals.
//
// Fewer than two weeks of history cannot show a weekly cycle: such a
// customer gets the short-history model. Its expected day is the mean of
// its days (with a week or more, halfway between that and the mean of the
// same weekday's days); its interval comes from futures with an uncertain
// typical day and a spread on the log scale that starts from a prior (80%
// of days between a third of and 2.6 times the typical day) and learns
// from the days there are. A customer without consumption in the last 16
// weeks (or without history) is forecast at 0.
package forecast

import (
	"errors"
	"fmt"
	"time"
)

// MaxHorizon is the most days one forecast covers.
const MaxHorizon = 366

// IntervalCoverage is the share of days the interval [Low, High] of a day
// is meant to contain: Low and High are the 10% and 90% quantiles.
const IntervalCoverage = 0.8

// Model names, as a Forecast reports which one answered.
const (
	// ModelETSLog: robust exponential smoothing with a damped trend and a
	// weekly season on the log scale (two weeks of history or more; a
	// customer that consumes on most days).
	ModelETSLog = "ets_weekly_log"
	// ModelETSLinear: the same on the linear scale (a customer idle on
	// many days, whose recent past it forecast better).
	ModelETSLinear = "ets_weekly_linear"
	// ModelShortHistory: fewer than two weeks of history; the typical day
	// so far, with intervals wider than the full model's.
	ModelShortHistory = "short_history"
	// ModelNoConsumption: no day of the history consumed anything (or there
	// is no history); every forecast day is 0.
	ModelNoConsumption = "no_consumption"
)

// Day is the forecast of one calendar day's consumption.
type Day struct {
	Date time.Time // midnight UTC
	// Expected is the mean consumption of the day; Low and High bound an
	// 80% interval (its 10% and 90% quantiles). 0 <= Low <= Expected <=
	// High: where the 90% quantile is below the mean (a customer idle on
	// nine days in ten and busy on the tenth) High is raised to the mean.
	Expected, Low, High float64
}

// Total is the forecast of the consumption from the first forecast day
// through Date, with the same meaning of Expected, Low and High as Day's.
// It is not the sum of the days' bounds: nine quiet days and one busy day
// are likely, ten busy days are not.
type Total struct {
	Date                time.Time
	Expected, Low, High float64
}

// Forecast is what Predict returns for one history.
type Forecast struct {
	// Model is the model that answered: ModelETSLog, ModelETSLinear,
	// ModelShortHistory or ModelNoConsumption.
	Model string
	// HistoryDays is the number of days of history the forecast was made
	// from.
	HistoryDays int
	// Daily has one entry per forecast day, from the day after the
	// history's last day.
	Daily []Day
	// Cumulative[i] is the consumption from Daily[0].Date through
	// Daily[i].Date.
	Cumulative []Total
}

// ErrHorizon is returned (wrapped) by Predict for a horizon outside 1 to
// MaxHorizon days.
var ErrHorizon = errors.New("horizon out of range")

// shortHistoryDays is the least history the full model is fitted to: two
// weeks, so that every weekday was seen twice.
const shortHistoryDays = 14

// Predict forecasts the horizon days after h's last day. It is
// deterministic: the same history and horizon give the same forecast.
// The only error is ErrHorizon.
func Predict(h History, horizon int) (Forecast, error) {
	if horizon < 1 || horizon > MaxHorizon {
		return Forecast{}, fmt.Errorf("%w: %d days (want 1 to %d)", ErrHorizon, horizon, MaxHorizon)
	}
	f := Forecast{HistoryDays: h.Len()}
	var s simulation
	switch {
	case allZero(h.Daily[max(0, h.Len()-fitWindowDays):]):
		// Nothing in the weeks the model would read: a customer that
		// consumed long ago and stopped is forecast as stopped.
		f.Model = ModelNoConsumption
		s = zeroSimulation(horizon)
	case h.Len() < shortHistoryDays:
		f.Model = ModelShortHistory
		s = simulateShortHistory(h.Daily, horizon)
	default:
		var kind scaleKind
		s, kind = simulateETS(h.Daily, horizon)
		f.Model = ModelETSLog
		if kind == linearScale {
			f.Model = ModelETSLinear
		}
	}
	f.Daily, f.Cumulative = s.summarise(h.Last().AddDate(0, 0, 1))
	return f, nil
}

// Head is the forecast of its first n days only (all of them when n is
// larger). The totals run from the first day, so they stay true: an
// endpoint forecasts SuggestionDays or more to suggest a pack, and answers
// the days and the runway of the horizon asked, a runway beyond it being
// none.
func (f Forecast) Head(n int) Forecast {
	n = min(max(n, 0), len(f.Daily))
	f.Daily, f.Cumulative = f.Daily[:n:n], f.Cumulative[:n:n]
	return f
}

func allZero(xs []float64) bool {
	for _, x := range xs {
		if x != 0 {
			return false
		}
	}
	return true
}
