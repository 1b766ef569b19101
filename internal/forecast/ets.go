package forecast

import (
	"math"
	"slices"
)

// season is the length of the cycle the model learns: a week.
const season = 7

// fitWindowDays is how much of a history the full model reads: the last 16
// weeks. Older days describe a customer that is no longer there (a level
// long since changed, a season since reshaped), and reading a fixed window
// keeps a forecast as fast for a customer of ten years as of four months.
const fitWindowDays = 16 * 7

// scaleKind is the scale a model smooths on.
type scaleKind int

const (
	// logScale: x = log(1 + y). Season and trend are multiplicative, a
	// forecast is never negative, and a burst is a bounded error. Right for
	// a customer that consumes most days.
	logScale scaleKind = iota
	// linearScale: x = y / m, m the window's mean day. Season and trend
	// are additive in credits, and the expected day is a plain mean of
	// past days. Right for a customer idle on most days, where the log of
	// a busy day is a huge error that the log scale turns into a season.
	linearScale
)

// etsParams are the smoothing weights of the level (alpha), the trend
// (beta), the season (gamma) and the trend's damping (phi, 0 for no trend).
type etsParams struct {
	alpha, beta, gamma, phi float64
	// noSeason leaves the season out: every weekday alike.
	noSeason bool
	// floor keeps the one-step forecast at 0 or above, and
	// proportionalSeason scales the season with the level at a change of
	// level: they are set for the log and the linear scale respectively.
	floor, proportionalSeason bool
}

// etsGrid lists the weights tried on every customer. A grid rather than a
// numeric optimiser: on 16 weeks of noisy days the loss surface is flat and
// bumpy, an optimiser's answer would change with a day's noise, and the grid
// costs a fixed, small time.
var etsGrid = func() []etsParams {
	var grid []etsParams
	seasons := []struct {
		gamma    float64
		noSeason bool
	}{{0, true}, {0, false}, {0.05, false}, {0.15, false}}
	for _, alpha := range []float64{0.03, 0.08, 0.15, 0.25, 0.4, 0.6} {
		for _, sn := range seasons {
			grid = append(grid, etsParams{alpha: alpha, gamma: sn.gamma, noSeason: sn.noSeason})
			for _, phi := range []float64{0.9, 0.97} {
				for _, beta := range []float64{0.01, 0.05} {
					grid = append(grid, etsParams{alpha: alpha, beta: beta * alpha, gamma: sn.gamma, phi: phi, noSeason: sn.noSeason})
				}
			}
		}
	}
	return grid
}()

const (
	// outlierBound: an error beyond this many running mean absolute errors
	// updates the states only up to the bound (about 2.4 standard
	// deviations of a normal error).
	outlierBound = 3.0
	// shiftRun: this many errors beyond the bound in a row, on the same
	// side, are a change of level.
	shiftRun = 3
	// scaleWeight is how fast the running mean absolute error follows the
	// recent errors (about the last 10 days).
	scaleWeight = 0.1
	// minScale keeps the bound open on a constant series: 2% of the level.
	minScale = 0.02
	// maxTrend bounds the trend: 3% a day, doubling in about three weeks.
	// Faster is a change of level, not a trend, and a trend learnt from
	// noise would compound into absurd forecasts.
	maxTrend = 0.03
)

// etsState is the model's memory after a day: level, trend, the seven
// seasonal offsets (indexed by day number modulo 7), the running mean
// absolute error and the current run of out-of-bound errors.
type etsState struct {
	level, trend float64
	season       [season]float64
	scale        float64
	run          int
	runSum       float64
}

// initDays is how many days the states start from: four weeks, when there
// are, so that each weekday's offset is a mean of four days.
const initDays = 4 * season

// initETS starts the states from the first four weeks of x: the level is
// their mean, each weekday's offset its mean difference from the level, no
// trend, and the scale the mean absolute difference that leaves.
func initETS(x []float64, p etsParams) etsState {
	n := min(len(x), initDays)
	var st etsState
	for _, v := range x[:n] {
		st.level += v
	}
	st.level /= float64(n)
	var counts [season]int
	for i, v := range x[:n] {
		st.season[i%season] += v - st.level
		counts[i%season]++
	}
	for j := range st.season {
		if counts[j] > 0 && !p.noSeason {
			st.season[j] /= float64(counts[j])
		} else {
			st.season[j] = 0
		}
	}
	for i, v := range x[:n] {
		st.scale += math.Abs(v - st.level - st.season[i%season])
	}
	st.scale = max(st.scale/float64(n), minScale)
	return st
}

// forecastOne is the state's forecast for day t. On the log scale it is
// never below 0, as no day is there (log(1 + 0) = 0): an idle weekend
// forecast at or below 0 errs by nothing and teaches nothing, where an
// error from a negative forecast would pull the season up and count as
// noise. On the linear scale a forecast below 0 is kept: its errors on
// idle days pull the level back up to the mean day, which a floor at 0
// would hide.
func (st *etsState) forecastOne(p etsParams, t int) float64 {
	f := st.level + p.phi*st.trend + st.season[t%season]
	if p.floor {
		return max(0, f)
	}
	return f
}

// update folds the error e of day t into the state. detectShifts turns
// on the jump to a new level after a run of large errors, and update then
// reports whether it jumped; simulated futures leave it off, their errors
// being drawn independently.
func (st *etsState) update(p etsParams, t int, e float64, detectShifts bool) (shifted bool) {
	bound := outlierBound * st.scale
	clipped := max(-bound, min(bound, e))
	switch {
	case math.Abs(e) <= bound:
		st.run, st.runSum = 0, 0
	case st.run > 0 && (e > 0) == (st.runSum > 0):
		st.run++
		st.runSum += e
	default:
		st.run, st.runSum = 1, e
	}
	if detectShifts && st.run >= shiftRun {
		// A change of level: move to it now rather than by alpha a day.
		before := st.level
		st.level += p.phi*st.trend + st.runSum/float64(st.run)
		st.trend *= p.phi
		if p.proportionalSeason && before > 0 {
			// On the linear scale a weekly cycle is a share of the level:
			// a customer that stops has none left, one that triples has
			// three times the swing. (On the log scale it is so already.)
			k := min(max(st.level, 0)/before, 10)
			for j := range st.season {
				st.season[j] *= k
			}
		}
		st.run, st.runSum = 0, 0
		shifted = true
	} else {
		st.level += p.phi*st.trend + p.alpha*clipped
		st.trend = max(-maxTrend, min(maxTrend, p.phi*st.trend+p.beta*clipped))
		st.season[t%season] += p.gamma * clipped
	}
	st.scale = max((1-scaleWeight)*st.scale+scaleWeight*math.Abs(clipped), minScale)
	return shifted
}

// advance moves the state one day ahead without an observation, as a
// forecast looks further out.
func (st *etsState) advance(p etsParams) {
	st.level += p.phi * st.trend
	st.trend *= p.phi
}

// filterETS runs the model with weights p over x and returns the sum of
// squared one-step errors, the final state and (when errs is not nil) the
// errors appended to errs. The errors of a run that was a change of level
// are appended as NaN: they measured the change, not the noise a future
// day will have. When states is not nil, states[t] receives the state
// after day t.
func filterETS(x []float64, p etsParams, errs []float64, states []etsState) (float64, etsState, []float64) {
	return filterETSUpTo(x, p, errs, states, math.Inf(1))
}

// filterETSUpTo is filterETS that gives up, returning a loss above limit,
// as soon as the loss exceeds limit: a grid search needs no more of a
// candidate already worse than the best.
func filterETSUpTo(x []float64, p etsParams, errs []float64, states []etsState, limit float64) (float64, etsState, []float64) {
	st := initETS(x, p)
	var loss float64
	// The days the states started from are in-sample for the season's
	// start: counting them would favour a season that is only noise.
	scoredFrom := 0
	if len(x) >= initDays+2*season {
		scoredFrom = initDays
	}
	for t, v := range x {
		e := v - st.forecastOne(p, t)
		if t >= scoredFrom {
			if loss += e * e; loss > limit {
				return loss, st, errs
			}
		}
		if errs != nil {
			errs = append(errs, e)
		}
		if st.update(p, t, e, true) && errs != nil {
			for i := len(errs) - shiftRun; i < len(errs); i++ {
				errs[i] = math.NaN()
			}
		}
		if states != nil {
			states[t] = st
		}
	}
	return loss, st, errs
}

// etsFit is the model fitted on one scale to one window of days.
type etsFit struct {
	kind   scaleKind
	unit   float64 // linearScale: the mean day, x = y / unit
	x      []float64
	params etsParams
	final  etsState
	// states[t] is the state after day t of the window.
	states []etsState
	smear  smearing
	// shifted[t] is whether the model jumped to a new level on day t.
	shifted []bool
	// Set by validate.
	validationMSE float64
	validated     int
	levelErrors   []float64
}

// fitETS fits the model on the given scale to window (not empty, not all
// zero): the grid's weights with the smallest sum of squared one-step
// errors, on that scale. Squared, because the expected day is a mean, and
// a mean is what squared error rewards: absolute error rewards the typical
// day, and fits a customer idle on most days with a model that forecasts
// 0. Bursts cost the fit little, as the states never take more of an
// error than outlierBound allows.
func fitETS(kind scaleKind, window []float64) etsFit {
	f := etsFit{kind: kind, x: make([]float64, len(window)), unit: 1}
	if kind == linearScale {
		var sum float64
		for _, y := range window {
			sum += y
		}
		f.unit = sum / float64(len(window))
	}
	for i, y := range window {
		f.x[i] = f.to(y)
	}
	best, bestLoss := etsGrid[0], math.Inf(1)
	for _, p := range etsGrid {
		p.floor, p.proportionalSeason = kind == logScale, kind == linearScale
		if loss, _, _ := filterETSUpTo(f.x, p, nil, nil, bestLoss); loss < bestLoss {
			best, bestLoss = p, loss
		}
	}
	f.params = best
	f.states = make([]etsState, len(f.x))
	var errs []float64
	_, f.final, errs = filterETS(f.x, best, make([]float64, 0, len(f.x)), f.states)
	f.shifted = make([]bool, len(errs))
	for i, e := range errs {
		f.shifted[i] = math.IsNaN(e)
	}
	// The first week's errors measure the start-up guess, not the model.
	residuals := errs[:0]
	for _, e := range errs[season:] {
		if !math.IsNaN(e) {
			residuals = append(residuals, e)
		}
	}
	if len(residuals) == 0 {
		residuals = append(residuals, 0)
	}
	f.smear = newSmearing(kind, f.unit, residuals)
	return f
}

func (f *etsFit) to(y float64) float64 {
	if f.kind == logScale {
		return toLog(y)
	}
	return y / f.unit
}

func (f *etsFit) from(x float64) float64 {
	if f.kind == logScale {
		return fromLog(x)
	}
	return max(0, x*f.unit)
}

// pathMeans writes into out the expected consumption of the len(out) days
// after day t (-1: before the window) of the window, from the state after
// day t: each day's forecast smeared over the past errors.
func (f *etsFit) pathMeans(st etsState, t int, out []float64) {
	for h := range out {
		out[h] = f.smear.mean(st.forecastOne(f.params, t+1+h))
		st.advance(f.params)
	}
}

// validationDays is how many recent origins the two scales are compared
// on, and validationHorizon how far each looks ahead.
const (
	validationDays    = 8 * 7
	validationHorizon = 14
)

// validate replays the fit's own recent past out of sample: from each of
// the window's last validationDays days, the expected consumption of the
// validationHorizon days after it (those within the window), as the fit
// would have forecast them with what it knew that day. It records
//
//   - validationMSE, the mean squared error of those days in credits.
//     Unlike the fit's own loss it is on the scale of the forecast the
//     customer sees and looks more than a day ahead, so the two scales
//     compete on what matters; squared, as the expected day is a mean
//     (absolute error would favour the scale that forecasts the typical
//     day, 0 on a customer idle on most days). validated is 0 when no day
//     was replayed;
//   - levelErrors, per origin with a whole horizon in the window and no
//     change of level in it, the mean error of its days on the model's
//     scale: how far off a level stays for weeks, which one-step errors
//     drawn independently cannot show.
func (f *etsFit) validate(window []float64) {
	path := make([]float64, validationHorizon)
	var sum float64
	f.validated = 0
	f.levelErrors = f.levelErrors[:0]
	for t := max(2*season, len(window)-validationDays-1); t < len(window)-1; t++ {
		f.pathMeans(f.states[t], t, path)
		st := f.states[t]
		var levelSum float64
		days, shifted := 0, false
		for h := range path {
			day := t + 1 + h
			if day >= len(window) {
				break
			}
			d := window[day] - path[h]
			sum += d * d
			levelSum += f.x[day] - st.forecastOne(f.params, day)
			shifted = shifted || f.shifted[day]
			days++
			st.advance(f.params)
		}
		f.validated += days
		if days == validationHorizon && !shifted {
			f.levelErrors = append(f.levelErrors, levelSum/float64(days))
		}
	}
	if f.validated > 0 {
		f.validationMSE = sum / float64(f.validated)
	}
}

// smearing turns a forecast on a model's scale into the expected
// consumption: the mean of the forecast plus each past error, brought back
// to credits and floored at 0 (Duan's smearing estimate). The mean over
// simulated futures would do too, but grows with the horizon on the log
// scale: exp of a wandering level is on average larger than exp of the
// level. Sorted errors and suffix sums make each mean a binary search.
type smearing struct {
	kind      scaleKind
	unit      float64
	residuals []float64 // sorted
	// suffix[i] is the sum over residuals[i:] of exp(r) (logScale) or r
	// (linearScale).
	suffix []float64
}

func newSmearing(kind scaleKind, unit float64, residuals []float64) smearing {
	r := slices.Clone(residuals)
	slices.Sort(r)
	s := smearing{kind: kind, unit: unit, residuals: r, suffix: make([]float64, len(r)+1)}
	for i := len(r) - 1; i >= 0; i-- {
		v := r[i]
		if kind == logScale {
			v = math.Exp(v)
		}
		s.suffix[i] = s.suffix[i+1] + v
	}
	return s
}

// mean is the expected consumption of a day forecast at mu on the model's
// scale.
func (s smearing) mean(mu float64) float64 {
	n := len(s.residuals)
	// Only errors with mu + r > 0 count: the rest floor at 0.
	i, _ := slices.BinarySearch(s.residuals, -mu)
	for i < n && s.residuals[i] <= -mu {
		i++
	}
	k := float64(n - i)
	if s.kind == logScale {
		// sum of exp(mu + r) - 1
		return max(0, (math.Exp(mu)*s.suffix[i]-k)/float64(n))
	}
	return max(0, s.unit*(mu*k+s.suffix[i])/float64(n))
}

// simulateETS fits the model on both scales to the last fitWindowDays of
// daily (which must not be all zero), keeps the one whose recent forecasts
// would have erred less, and draws the futures of the horizon days after
// the history.
//
// A future replays the fitted model day by day with one-step errors drawn
// from the customer's past ones, and adds to every day of it one level
// error drawn from those of the validation (centred: the expected days
// come from smearing, the futures only give the spread). Without it the
// interval of a month's total would be far too narrow, as independent
// daily errors cancel out and a misjudged level does not.
func simulateETS(daily []float64, horizon int) (simulation, scaleKind) {
	window := daily[max(0, len(daily)-fitWindowDays):]
	fit := fitETS(logScale, window)
	fit.validate(window)
	linear := fitETS(linearScale, window)
	linear.validate(window)
	if fit.validated > 0 && linear.validationMSE < fit.validationMSE {
		fit = linear
	}

	s := newSimulation(horizon)
	// Day numbers count from the window's start: the season is indexed by
	// day number modulo 7, which keeps weekdays apart.
	n := len(window)
	s.expected = make([]float64, horizon)
	fit.pathMeans(fit.final, n-1, s.expected)
	residuals := fit.smear.residuals
	var meanLevel float64
	for _, d := range fit.levelErrors {
		meanLevel += d / float64(len(fit.levelErrors))
	}
	r := newRand()
	for p := range s.paths {
		st := fit.final
		row := s.y[p*horizon : (p+1)*horizon]
		var level float64
		if len(fit.levelErrors) > 0 {
			level = fit.levelErrors[r.IntN(len(fit.levelErrors))] - meanLevel
		}
		for h := range horizon {
			t := n + h
			e := residuals[r.IntN(len(residuals))]
			row[h] = fit.from(st.forecastOne(fit.params, t) + level + e)
			st.update(fit.params, t, e, false)
		}
	}
	return s, fit.kind
}
