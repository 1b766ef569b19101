package forecast

import (
	"errors"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/forecast/synth"
)

// monday is the first day of the test histories, a Monday.
var monday = time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)

func history(t *testing.T, daily []float64) History {
	t.Helper()
	h, err := NewHistory(monday, daily)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func predict(t *testing.T, daily []float64, horizon int) Forecast {
	t.Helper()
	f, err := Predict(history(t, daily), horizon)
	if err != nil {
		t.Fatal(err)
	}
	checkForecast(t, f, history(t, daily), horizon)
	return f
}

// checkForecast asserts what every forecast promises: one day per horizon
// day from the day after the history, bounds never negative and ordered,
// totals that add up and never shrink.
func checkForecast(t *testing.T, f Forecast, h History, horizon int) {
	t.Helper()
	if len(f.Daily) != horizon || len(f.Cumulative) != horizon {
		t.Fatalf("%d days and %d totals, want %d", len(f.Daily), len(f.Cumulative), horizon)
	}
	if f.HistoryDays != h.Len() {
		t.Errorf("HistoryDays %d, want %d", f.HistoryDays, h.Len())
	}
	var sum float64
	for i, d := range f.Daily {
		if want := h.Last().AddDate(0, 0, i+1); !d.Date.Equal(want) || !f.Cumulative[i].Date.Equal(want) {
			t.Fatalf("day %d is %s, want %s", i, d.Date, want)
		}
		for _, b := range []Day{d, Day(f.Cumulative[i])} {
			if math.IsNaN(b.Expected) || math.IsInf(b.High, 0) || b.Low < 0 || b.Low > b.Expected || b.Expected > b.High {
				t.Fatalf("%s: not 0 <= low <= expected <= high: %+v", d.Date.Format(time.DateOnly), b)
			}
		}
		sum += d.Expected
		if c := f.Cumulative[i]; math.Abs(c.Expected-sum) > 1e-9*max(1, sum) {
			t.Fatalf("day %d: expected total %v, the days sum to %v", i, c.Expected, sum)
		}
		if i > 0 {
			prev, c := f.Cumulative[i-1], f.Cumulative[i]
			if c.Low < prev.Low || c.High < prev.High {
				t.Fatalf("day %d: the total's bounds shrink: %+v after %+v", i, c, prev)
			}
		}
	}
}

// noisy returns n days of level * week[weekday] times lognormal noise.
func noisy(seed uint64, n int, level float64, week [7]float64, noise float64) []float64 {
	r := rand.New(rand.NewPCG(seed, 1))
	y := make([]float64, n)
	for i := range y {
		y[i] = math.Round(level * week[i%7] * math.Exp(noise*r.NormFloat64()-noise*noise/2))
	}
	return y
}

var (
	flat   = [7]float64{1, 1, 1, 1, 1, 1, 1}
	office = [7]float64{1.2, 1.2, 1.2, 1.2, 1.2, 0.5, 0.5}
)

func mean(xs []float64) float64 {
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// Every series of the committed set, from several origins and horizons,
// gives a forecast that keeps the promises of checkForecast.
func TestPredictKeepsItsPromisesOnEveryShape(t *testing.T) {
	t.Parallel()
	for _, s := range synth.Set() {
		h, err := NewHistory(s.Start, s.Daily)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []int{1, 3, 13, 14, 15, 30, 60, len(s.Daily)} {
			if n > h.Len() {
				continue
			}
			for _, horizon := range []int{1, 30, 90} {
				f, err := Predict(h.Head(n), horizon)
				if err != nil {
					t.Fatal(err)
				}
				t.Run("", func(t *testing.T) { checkForecast(t, f, h.Head(n), horizon) })
				if t.Failed() {
					t.Fatalf("series %s from %d days, horizon %d", s.ID, n, horizon)
				}
			}
		}
	}
}

// A steady customer is forecast at its level with a narrow interval.
func TestPredictConstantSeries(t *testing.T) {
	t.Parallel()
	daily := make([]float64, 8*7)
	for i := range daily {
		daily[i] = 100
	}
	f := predict(t, daily, 30)
	if f.Model != ModelETSLog && f.Model != ModelETSLinear {
		t.Errorf("model %s, want a full model for 8 weeks", f.Model)
	}
	for _, d := range f.Daily {
		if math.Abs(d.Expected-100) > 2 || d.Low < 90 || d.High > 110 {
			t.Fatalf("%s: %+v, want about 100 within [90, 110]", d.Date.Format(time.DateOnly), d)
		}
	}
}

// The weekly cycle is learnt: weekends forecast low, weekdays high, in
// about the true proportion.
func TestPredictRecoversWeeklyPattern(t *testing.T) {
	t.Parallel()
	daily := noisy(1, 12*7, 100, office, 0.1)
	f := predict(t, daily, 14)
	var weekday, weekend []float64
	for _, d := range f.Daily {
		if wd := d.Date.Weekday(); wd == time.Saturday || wd == time.Sunday {
			weekend = append(weekend, d.Expected)
		} else {
			weekday = append(weekday, d.Expected)
		}
	}
	if r := mean(weekend) / mean(weekday); r < 0.5/1.2*0.85 || r > 0.5/1.2*1.15 {
		t.Errorf("weekend/weekday %.2f, want about %.2f (forecast %+v)", r, 0.5/1.2, f.Daily)
	}
	if m := mean(weekday); math.Abs(m-120) > 12 {
		t.Errorf("weekday mean %.1f, want about 120", m)
	}
}

// Growth continues in the forecast: a customer that doubled over 12 weeks
// is not forecast at its average.
func TestPredictFollowsTrend(t *testing.T) {
	t.Parallel()
	daily := noisy(2, 12*7, 1, flat, 0.05)
	for i := range daily {
		daily[i] = math.Round(daily[i] * (50 + 50*float64(i)/float64(len(daily)-1)))
	}
	f := predict(t, daily, 7)
	if m := mean(expecteds(f)[:7]); m < 98 {
		t.Errorf("next week's mean %.1f, want at least the last level of 100", m)
	}
}

// A sudden change of level is followed within days, not weeks.
func TestPredictFollowsLevelShift(t *testing.T) {
	t.Parallel()
	daily := append(noisy(3, 8*7, 100, flat, 0.1), noisy(4, 5, 300, flat, 0.1)...)
	f := predict(t, daily, 7)
	if m := mean(expecteds(f)); m < 250 || m > 350 {
		t.Errorf("after 5 days at 300, the forecast is %.0f a day", m)
	}
}

// A one-day burst is not taken for the new level: the typical day (the
// interval's low side) stays at the usual level, and the expected day
// rises only by the burst's share of the weeks learnt from, the chance of
// another one, far from the burst itself.
func TestPredictIgnoresBurst(t *testing.T) {
	t.Parallel()
	daily := noisy(5, 8*7, 100, flat, 0.1)
	daily[len(daily)-3] = 2000
	f := predict(t, daily, 7)
	share := 1900.0 / float64(len(daily)-7) // the burst's excess over the errors learnt from
	for _, d := range f.Daily {
		if d.Expected < 90 || d.Expected > 100+1.5*share || d.Low < 75 || d.High > 300 {
			t.Fatalf("%s: %+v after one burst of 20 times the usual day of 100", d.Date.Format(time.DateOnly), d)
		}
	}
}

// A customer busy on 30% of days at 50 is expected at its mean, 15 a day
// (not at its typical day, 0), with idle days inside the interval.
func TestPredictIntermittent(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(6, 1))
	daily := make([]float64, 16*7)
	for i := range daily {
		if r.Float64() < 0.3 {
			daily[i] = math.Round(50 * math.Exp(0.3*r.NormFloat64()))
		}
	}
	f := predict(t, daily, 28)
	if m := mean(expecteds(f)); m < 15*0.75 || m > 15*1.25 {
		t.Errorf("expected %.1f a day, want about 15", m)
	}
	total := f.Cumulative[27]
	if total.Low > 28*15*0.8 || total.High < 28*15*1.2 {
		t.Errorf("4 weeks' total %+v does not hold 420 comfortably", total)
	}
	for _, d := range f.Daily {
		if d.Low != 0 {
			t.Fatalf("%s: low %.1f, but 70%% of days are idle", d.Date.Format(time.DateOnly), d.Low)
		}
	}
}

// A customer that stops is forecast to stay stopped: under a tenth of
// its former 80 a day after two idle weeks. (Not 0: the expected day still
// averages in its old day-to-day noise, floored at 0, an error on the
// side of a shorter runway.)
func TestPredictStoppedCustomer(t *testing.T) {
	t.Parallel()
	daily := append(noisy(7, 8*7, 80, office, 0.1), make([]float64, 14)...)
	f := predict(t, daily, 14)
	if m := mean(expecteds(f)); m > 8 {
		t.Errorf("after two idle weeks, %.1f a day expected", m)
	}
}

// Three days of history: the short-history model, the mean of the days,
// and an interval wider than the full model's.
func TestPredictShortHistory(t *testing.T) {
	t.Parallel()
	f := predict(t, []float64{90, 110, 100}, 30)
	if f.Model != ModelShortHistory {
		t.Errorf("model %s, want %s", f.Model, ModelShortHistory)
	}
	for _, d := range f.Daily {
		if d.Expected != 100 {
			t.Fatalf("%s: expected %v, want the mean 100", d.Date.Format(time.DateOnly), d.Expected)
		}
		if d.Low > 60 || d.High < 160 {
			t.Fatalf("%s: [%v, %v] is not wide for three days", d.Date.Format(time.DateOnly), d.Low, d.High)
		}
	}
}

// A customer that never consumed, or has no history, is forecast at 0.
func TestPredictNoConsumption(t *testing.T) {
	t.Parallel()
	for _, daily := range [][]float64{nil, {0}, make([]float64, 200)} {
		f := predict(t, daily, 10)
		if f.Model != ModelNoConsumption {
			t.Errorf("%d days: model %s", len(daily), f.Model)
		}
		for _, d := range f.Daily {
			if d.Expected != 0 || d.High != 0 {
				t.Fatalf("%d days: %+v", len(daily), d)
			}
		}
	}
}

// The same history gives the same forecast, so the API and the CLI agree.
func TestPredictIsDeterministic(t *testing.T) {
	t.Parallel()
	daily := noisy(8, 10*7, 40, office, 0.3)
	a, b := predict(t, daily, 30), predict(t, daily, 30)
	if !reflect.DeepEqual(a, b) {
		t.Error("two forecasts of one history differ")
	}
}

func TestPredictRefusesHorizon(t *testing.T) {
	t.Parallel()
	for _, h := range []int{0, -1, MaxHorizon + 1} {
		if _, err := Predict(History{Start: monday}, h); !errors.Is(err, ErrHorizon) {
			t.Errorf("horizon %d: %v, want ErrHorizon", h, err)
		}
	}
}

func expecteds(f Forecast) []float64 {
	out := make([]float64, len(f.Daily))
	for i, d := range f.Daily {
		out[i] = d.Expected
	}
	return out
}
