package forecast

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// MaxHistoryDays is the longest history a customer may have: ten years of
// days. A longer span is almost always a mistyped date (0205 for 2025), and
// would only cost memory: the model reads the last weeks.
const MaxHistoryDays = 3660

// History is one customer's consumption per calendar day, from Start, one
// value per consecutive day. A day without consumption is 0.
type History struct {
	// Start is the first day, as midnight UTC of its calendar date.
	Start time.Time
	// Daily[i] is what was consumed on Start + i days: finite, not negative.
	Daily []float64
}

// DayTotal is what a customer consumed on one calendar day: a row of the
// daily rollup or of the offline CSV.
type DayTotal struct {
	// Date is the calendar day of this time in its own location; the clock
	// time is ignored.
	Date     time.Time
	Consumed float64
}

// ErrDuplicateDay is returned (wrapped) by HistoryFromDays when two totals
// name the same day.
var ErrDuplicateDay = errors.New("two totals for the same day")

// DateOf returns the calendar day of t (in t's own location) as midnight UTC,
// the form every date of this package takes.
func DateOf(t time.Time) time.Time {
	y, m, d := t.Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

// NewHistory checks daily (every value finite and not negative, at most
// MaxHistoryDays of them) and returns it as the history starting on the
// calendar day of start. The slice is kept, not copied.
func NewHistory(start time.Time, daily []float64) (History, error) {
	if len(daily) > MaxHistoryDays {
		return History{}, fmt.Errorf("history of %d days is longer than %d days", len(daily), MaxHistoryDays)
	}
	start = DateOf(start)
	for i, v := range daily {
		if err := checkConsumed(v); err != nil {
			return History{}, fmt.Errorf("%s: %w", start.AddDate(0, 0, i).Format(time.DateOnly), err)
		}
	}
	return History{Start: start, Daily: daily}, nil
}

// HistoryFromDays builds a history from sparse daily totals (in any order),
// every missing day being 0, as the daily rollup stores only the days a
// customer consumed. It runs from `from` through `through`; a zero `from`
// means the earliest total's day, a zero `through` the latest one's, so a
// caller extends a history with idle days up to yesterday by passing it as
// through. A total outside that span, two totals on one day
// (ErrDuplicateDay) or a negative or non-finite total is an error.
func HistoryFromDays(days []DayTotal, from, through time.Time) (History, error) {
	if len(days) == 0 && (from.IsZero() || through.IsZero()) {
		return History{}, nil
	}
	first, last := time.Time{}, time.Time{}
	for _, d := range days {
		day := DateOf(d.Date)
		if first.IsZero() || day.Before(first) {
			first = day
		}
		if last.IsZero() || day.After(last) {
			last = day
		}
	}
	if !from.IsZero() {
		first = DateOf(from)
	}
	if !through.IsZero() {
		last = DateOf(through)
	}
	if last.Before(first) {
		return History{}, fmt.Errorf("history ends (%s) before it starts (%s)", last.Format(time.DateOnly), first.Format(time.DateOnly))
	}
	n := daysBetween(first, last) + 1
	if n > MaxHistoryDays {
		return History{}, fmt.Errorf("history from %s to %s spans %d days, more than %d",
			first.Format(time.DateOnly), last.Format(time.DateOnly), n, MaxHistoryDays)
	}
	daily := make([]float64, n)
	seen := make([]bool, n)
	for _, d := range days {
		day := DateOf(d.Date)
		i := daysBetween(first, day)
		if i < 0 || i >= n {
			return History{}, fmt.Errorf("%s is outside the history from %s to %s",
				day.Format(time.DateOnly), first.Format(time.DateOnly), last.Format(time.DateOnly))
		}
		if err := checkConsumed(d.Consumed); err != nil {
			return History{}, fmt.Errorf("%s: %w", day.Format(time.DateOnly), err)
		}
		if seen[i] {
			return History{}, fmt.Errorf("%s: %w", day.Format(time.DateOnly), ErrDuplicateDay)
		}
		seen[i] = true
		daily[i] = d.Consumed
	}
	return History{Start: first, Daily: daily}, nil
}

// Len is the number of days in the history.
func (h History) Len() int { return len(h.Daily) }

// Last is the history's last day (the day before Start when it is empty).
func (h History) Last() time.Time { return h.Start.AddDate(0, 0, len(h.Daily)-1) }

// Head returns the history's first n days (all of them when n is larger):
// the history as it was known at the end of day n, which is how the
// backtest replays the past.
func (h History) Head(n int) History {
	n = min(max(n, 0), len(h.Daily))
	return History{Start: h.Start, Daily: h.Daily[:n:n]}
}

func checkConsumed(v float64) error {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return errors.New("consumption is not a finite number")
	}
	if v < 0 {
		return fmt.Errorf("consumption %v is negative", v)
	}
	return nil
}

// daysBetween counts calendar days from a to b, both midnight UTC. Unix
// seconds, unlike a Duration, do not saturate at 292 years.
func daysBetween(a, b time.Time) int {
	return int((b.Unix() - a.Unix()) / 86400)
}
