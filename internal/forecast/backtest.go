package forecast

import (
	"errors"
	"fmt"
	"math"
	"slices"
)

// The methods a backtest scores, in the order of its results.
const (
	// MethodModel is Predict.
	MethodModel = "model"
	// MethodMean7 is the first baseline: every coming day is the mean of
	// the last 7 days (of all days, when there are fewer).
	MethodMean7 = "mean_last_7_days"
	// MethodSameWeekday is the second baseline: every coming day is the
	// last observed day of the same weekday (the seasonal naive forecast);
	// with fewer than 7 days of history, the mean of the days there are.
	MethodSameWeekday = "same_weekday_last_week"
)

// Methods lists the scored methods in the order of Scores slices.
var Methods = []string{MethodModel, MethodMean7, MethodSameWeekday}

// BacktestOptions chooses the forecast origins of a backtest. The origins
// of a series of n days are the days t = MinHistory, MinHistory+Step, ...
// up to n-Horizon (each forecast made from the first t days and checked
// against the Horizon days after), of which the last Origins are kept.
type BacktestOptions struct {
	Horizon    int
	MinHistory int // default 3: a customer's first forecast, after three days
	Step       int // default 7
	Origins    int // default 12; negative keeps every origin
}

func (o BacktestOptions) withDefaults() BacktestOptions {
	if o.MinHistory == 0 {
		o.MinHistory = 3
	}
	if o.Step == 0 {
		o.Step = 7
	}
	if o.Origins == 0 {
		o.Origins = 12
	}
	return o
}

// Scores are one method's accuracy figures (see Backtest for their
// definitions). Every figure is a mean over scored origins, and over
// series when aggregated.
type Scores struct {
	MASE      float64
	Bias      float64
	Pinball10 float64
	Pinball90 float64
	Coverage  float64
}

func (s *Scores) add(o Scores) {
	s.MASE += o.MASE
	s.Bias += o.Bias
	s.Pinball10 += o.Pinball10
	s.Pinball90 += o.Pinball90
	s.Coverage += o.Coverage
}

func (s *Scores) divide(n float64) {
	s.MASE /= n
	s.Bias /= n
	s.Pinball10 /= n
	s.Pinball90 /= n
	s.Coverage /= n
}

// SeriesResult is the backtest of one series.
type SeriesResult struct {
	ID string
	// Origins is how many forecasts were made, Scored how many of them had
	// a scale and were scored (an all-zero stretch has none).
	Origins, Scored int
	// Scores has one entry per method of Methods; it is meaningless when
	// Scored is 0.
	Scores []Scores
	// Models counts which model Predict used at the origins.
	Models map[string]int
	// TotalCoverage is the share of scored origins at which the model's
	// 80% interval of the total consumption over the horizon held the
	// actual total (the interval a pessimistic runway is read from).
	TotalCoverage float64
}

// Backtest replays the past of one series: at each origin t (see
// BacktestOptions) it forecasts the Horizon days after day t from days 1
// to t only, with the model and with both baselines, and scores each
// against what happened.
//
// The figures of one origin, each divided by the origin's scale:
//
//   - scale: the mean absolute error of the seasonal naive forecast in
//     sample, mean |y[i] - y[i-7]| over days i = 8..t. Fewer than 14 such
//     differences (t < 21) make too unsteady a yardstick, so a younger
//     origin is scaled by the same mean over the whole series instead (all
//     n days, which the forecasts never see). An origin whose scale is 0 is
//     not scored (a series idle all along has nothing to err on).
//   - MASE: the mean over the Horizon days of |actual - expected| / scale.
//   - Bias: the mean over the days of (actual - expected) / scale: above 0
//     the forecast was too low, below too high. MASE rewards forecasting
//     the typical day, which for a customer idle on most days is 0; the
//     expected day is a mean, and a runway needs it unbiased.
//   - Pinball10 and Pinball90: the mean over the days of the pinball loss of
//     the interval's bound at its quantile, / scale. For a bound b at
//     quantile q: q(actual - b) when actual >= b, else (1-q)(b - actual).
//   - Coverage: the share of the days whose actual lies in [Low, High].
//
// A series' figures are the means over its scored origins. The baselines'
// intervals are the 10% and 90% empirical quantiles of their own past
// errors, added to their forecast (and floored at 0): the errors of the
// forecasts each baseline would have made from every earlier day of the
// last 16 weeks, for each of the Horizon days after it that lies in the
// history, all horizons pooled. A history of one day has no past errors;
// its interval is the forecast alone.
func Backtest(id string, h History, opts BacktestOptions) (SeriesResult, error) {
	opts = opts.withDefaults()
	if opts.Horizon < 1 || opts.Horizon > MaxHorizon {
		return SeriesResult{}, fmt.Errorf("%w: %d days (want 1 to %d)", ErrHorizon, opts.Horizon, MaxHorizon)
	}
	if opts.MinHistory < 1 || opts.Step < 1 {
		return SeriesResult{}, errors.New("backtest: the minimum history and the step must be at least 1 day")
	}
	res := SeriesResult{ID: id, Scores: make([]Scores, len(Methods)), Models: map[string]int{}}
	y := h.Daily
	origins := backtestOrigins(len(y), opts)
	res.Origins = len(origins)
	wholeScale := seasonalNaiveMAE(y)
	var totalsCovered int
	for _, t := range origins {
		scale := wholeScale
		if t-season >= 2*season {
			scale = seasonalNaiveMAE(y[:t])
		}
		if scale == 0 {
			continue
		}
		actual := y[t : t+opts.Horizon]
		f, err := Predict(h.Head(t), opts.Horizon)
		if err != nil {
			return SeriesResult{}, err
		}
		res.Models[f.Model]++
		res.Scored++
		for m, days := range [][]Day{f.Daily, baselineMean7(y[:t], opts.Horizon), baselineSameWeekday(y[:t], opts.Horizon)} {
			res.Scores[m].add(scoreDays(days, actual, scale))
		}
		var total float64
		for _, a := range actual {
			total += a
		}
		if last := f.Cumulative[len(f.Cumulative)-1]; total >= last.Low && total <= last.High {
			totalsCovered++
		}
	}
	if res.Scored > 0 {
		for m := range res.Scores {
			res.Scores[m].divide(float64(res.Scored))
		}
		res.TotalCoverage = float64(totalsCovered) / float64(res.Scored)
	}
	return res, nil
}

// backtestOrigins lists the origins of a series of n days.
func backtestOrigins(n int, o BacktestOptions) []int {
	var ts []int
	for t := o.MinHistory; t+o.Horizon <= n; t += o.Step {
		ts = append(ts, t)
	}
	if o.Origins > 0 && len(ts) > o.Origins {
		ts = ts[len(ts)-o.Origins:]
	}
	return ts
}

// Aggregate is the mean of the scores of the series that were scored, per
// method, and how many series that is.
func Aggregate(results []SeriesResult) ([]Scores, int) {
	out := make([]Scores, len(Methods))
	n := 0
	for _, r := range results {
		if r.Scored == 0 {
			continue
		}
		n++
		for m, s := range r.Scores {
			out[m].add(s)
		}
	}
	if n > 0 {
		for m := range out {
			out[m].divide(float64(n))
		}
	}
	return out, n
}

// seasonalNaiveMAE is mean |y[i] - y[i-7]| over the days that have a day a
// week before, 0 when none has.
func seasonalNaiveMAE(y []float64) float64 {
	if len(y) <= season {
		return 0
	}
	var sum float64
	for i := season; i < len(y); i++ {
		sum += math.Abs(y[i] - y[i-season])
	}
	return sum / float64(len(y)-season)
}

// Pinball is the pinball (quantile) loss of the bound b at quantile q for
// the actual value a.
func Pinball(q, b, a float64) float64 {
	if a >= b {
		return q * (a - b)
	}
	return (1 - q) * (b - a)
}

// scoreDays scores one origin's forecast days against the actual values.
func scoreDays(days []Day, actual []float64, scale float64) Scores {
	var s Scores
	lowQ, highQ := (1-IntervalCoverage)/2, (1+IntervalCoverage)/2
	for i, d := range days {
		a := actual[i]
		s.MASE += math.Abs(a - d.Expected)
		s.Bias += a - d.Expected
		s.Pinball10 += Pinball(lowQ, d.Low, a)
		s.Pinball90 += Pinball(highQ, d.High, a)
		if a >= d.Low && a <= d.High {
			s.Coverage++
		}
	}
	n := float64(len(days))
	return Scores{MASE: s.MASE / n / scale, Bias: s.Bias / n / scale, Pinball10: s.Pinball10 / n / scale, Pinball90: s.Pinball90 / n / scale, Coverage: s.Coverage / n}
}

// baselineMean7 is the first baseline's forecast from y: the mean of the
// last 7 days, with its past-error interval.
func baselineMean7(y []float64, horizon int) []Day {
	point := func(s, _ int) float64 { // from the first s days, h days ahead
		k := min(7, s)
		var sum float64
		for _, v := range y[s-k : s] {
			sum += v
		}
		return sum / float64(k)
	}
	return baselineDays(y, horizon, point)
}

// baselineSameWeekday is the second baseline's forecast from y: the last
// day of the same weekday, or the mean of the days when there are fewer
// than 7, with its past-error interval.
func baselineSameWeekday(y []float64, horizon int) []Day {
	point := func(s, h int) float64 {
		if s < season {
			var sum float64
			for _, v := range y[:s] {
				sum += v
			}
			return sum / float64(s)
		}
		// Day s+h-1 (0-based) steps back whole weeks into the history.
		back := ((h + season - 1) / season) * season
		return y[s+h-1-back]
	}
	return baselineDays(y, horizon, point)
}

// baselineDays builds a baseline's forecast days from its point forecast
// point(s, h) (made from the first s days, for day s+h, h >= 1) and the
// empirical quantiles of its errors over the last 16 weeks.
func baselineDays(y []float64, horizon int, point func(s, h int) float64) []Day {
	t := len(y)
	var errs []float64
	for s := max(1, t-fitWindowDays); s < t; s++ {
		for h := 1; h <= horizon && s+h <= t; h++ {
			errs = append(errs, y[s+h-1]-point(s, h))
		}
	}
	var lowErr, highErr float64
	if len(errs) > 0 {
		slices.Sort(errs)
		lowErr = sortedQuantile(errs, (1-IntervalCoverage)/2)
		highErr = sortedQuantile(errs, (1+IntervalCoverage)/2)
	}
	days := make([]Day, horizon)
	for h := 1; h <= horizon; h++ {
		f := point(t, h)
		low, high := max(0, f+lowErr), max(0, f+highErr)
		days[h-1] = Day{Expected: f, Low: low, High: max(high, low)}
	}
	return days
}

// sortedQuantile is the p-quantile of sorted xs (R's type 7).
func sortedQuantile(xs []float64, p float64) float64 {
	pos := p * float64(len(xs)-1)
	k := int(pos)
	if k+1 >= len(xs) {
		return xs[k]
	}
	return xs[k] + (pos-float64(k))*(xs[k+1]-xs[k])
}
