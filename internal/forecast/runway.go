package forecast

import (
	"errors"
	"fmt"
	"time"
)

// Runway is how long an available balance lasts at the forecast's pace.
// A day counts when the balance covers the whole of it; the balance runs
// out on the first forecast day whose cumulative consumption exceeds it.
type Runway struct {
	// ExpectedDays and PessimisticDays count the forecast days covered in
	// full, from the first: at the expected pace (Cumulative's Expected)
	// and at the pessimistic one (Cumulative's High, the 90% bound of the
	// consumption so far). nil means the balance outlasts the forecast.
	ExpectedDays, PessimisticDays *int
	// ExpectedDepletesOn and PessimisticDepletesOn are the days the
	// balance runs out (midnight UTC); nil with the days.
	ExpectedDepletesOn, PessimisticDepletesOn *time.Time
}

// Runway is how long available credits last at the forecast's pace. A
// balance of 0 or less is spent already: 0 days, out on the first day.
//
// The pessimistic pace is the 90% bound of the cumulative consumption,
// not the sum of the days' 90% bounds: ten days at their 90% bound are far
// less likely than one in ten, and for a customer idle on most days that
// sum would be many times what it ever consumes.
func (f Forecast) Runway(available float64) Runway {
	var r Runway
	r.ExpectedDays, r.ExpectedDepletesOn = f.runOut(available, func(t Total) float64 { return t.Expected })
	r.PessimisticDays, r.PessimisticDepletesOn = f.runOut(available, func(t Total) float64 { return t.High })
	return r
}

func (f Forecast) runOut(available float64, pace func(Total) float64) (*int, *time.Time) {
	for i, t := range f.Cumulative {
		if available <= 0 || pace(t) > available {
			days, on := i, t.Date
			return &days, &on
		}
	}
	return nil, nil
}

// SuggestionDays is how many days a suggested purchase covers, at the
// pessimistic pace: a month.
const SuggestionDays = 30

// ErrForecastTooShort is returned by Need and Suggest when the forecast
// covers fewer days than asked about.
var ErrForecastTooShort = errors.New("the forecast is shorter than the days asked about")

// Need is the credits missing to cover the first days of the forecast at
// the pessimistic pace: the 90% bound of their cumulative consumption
// minus available, 0 when available covers it.
func (f Forecast) Need(available float64, days int) (float64, error) {
	if days < 1 || days > len(f.Cumulative) {
		return 0, fmt.Errorf("%w: %d days asked, %d forecast", ErrForecastTooShort, days, len(f.Cumulative))
	}
	return max(0, f.Cumulative[days-1].High-available), nil
}
