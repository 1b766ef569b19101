package forecast

import (
	"math"
	"math/rand/v2"
	"time"
)

// simulatedPaths is how many futures a forecast draws. The 10% and 90%
// quantiles of 300 draws are within about 1.7 points of probability of the
// true ones (one standard error), well inside what the backtest can tell
// apart (500 draws gave the same backtest figures within that), and the
// futures are most of a forecast's time: more would cost the endpoint's
// latency and buy nothing a customer sees.
const simulatedPaths = 300

// simulation holds simulated futures of consumption: y[p*horizon+h] is the
// consumption of day h (0-based) in future p. No futures (paths 0) means
// every day is 0.
type simulation struct {
	horizon, paths int
	y              []float64
	// expected, when set, is each day's expected value in place of the
	// mean of the futures.
	expected []float64
}

func newSimulation(horizon int) simulation {
	return simulation{horizon: horizon, paths: simulatedPaths, y: make([]float64, simulatedPaths*horizon)}
}

func zeroSimulation(horizon int) simulation { return simulation{horizon: horizon} }

// newRand is the seeded generator of a forecast's futures. The seed is a
// constant so that a forecast is a function of its history: the API and
// the CLI answer the same for the same days, and tests can compare.
func newRand() *rand.Rand { return rand.New(rand.NewPCG(0x7a11, 0xf0cc)) }

// fromLog is consumption back from the log scale: exp(x) - 1, never
// negative. Not math.Expm1: its precision near 0 (a billionth of a credit)
// matters to no forecast, and math.Exp is half again as fast, on the path
// every simulated day takes.
func fromLog(x float64) float64 { return max(0, math.Exp(x)-1) }

// toLog is the log scale the models work on: log(1 + y).
func toLog(y float64) float64 { return math.Log1p(y) }

// summarise turns the futures into the forecast of each day from first on
// and of the cumulative consumption through each day: the mean, and the
// 10% and 90% quantiles, ordered Low <= Expected <= High.
func (s simulation) summarise(first time.Time) ([]Day, []Total) {
	daily := make([]Day, s.horizon)
	cumulative := make([]Total, s.horizon)
	lowQ, highQ := (1-IntervalCoverage)/2, (1+IntervalCoverage)/2
	column := make([]float64, s.paths)
	running := make([]float64, s.paths)
	var sumExpected float64
	for h := range s.horizon {
		date := first.AddDate(0, 0, h)
		if s.paths == 0 {
			daily[h] = Day{Date: date}
			cumulative[h] = Total{Date: date}
			continue
		}
		var sum float64
		for p := range s.paths {
			v := s.y[p*s.horizon+h]
			column[p] = v
			running[p] += v
			sum += v
		}
		mean := sum / float64(s.paths)
		if s.expected != nil {
			mean = s.expected[h]
		}
		low, high := quantilePair(column, lowQ, highQ)
		daily[h] = ordered(date, mean, low, high)
		// The expected total is the sum of the expected days.
		sumExpected += daily[h].Expected
		copy(column, running)
		low, high = quantilePair(column, lowQ, highQ)
		t := ordered(date, sumExpected, low, high)
		cumulative[h] = Total(t)
	}
	return daily, cumulative
}

// ordered returns the day with 0 <= low <= expected <= high, moving a
// bound out to the expected value when the distribution is so lopsided that
// its mean lies outside the quantiles.
func ordered(date time.Time, expected, low, high float64) Day {
	expected = max(expected, 0)
	return Day{Date: date, Expected: expected, Low: max(min(low, expected), 0), High: max(high, expected)}
}

// quantilePair returns the quantiles p < q of xs, reordering xs. Each is
// the order statistic nearest to p(n-1): with a thousand draws,
// interpolating between neighbours changes nothing a customer sees and
// costs a scan. The second is selected within the part the first leaves
// below it, which halves the work.
func quantilePair(xs []float64, p, q float64) (float64, float64) {
	last := float64(len(xs) - 1)
	kq := int(math.Round(q * last))
	kp := min(int(math.Round(p*last)), kq)
	selectKth(xs, kq)
	high := xs[kq]
	selectKth(xs[:kq+1], kp)
	return xs[kp], high
}

// selectKth reorders xs so that xs[k] is its k-th smallest value, every
// value before it no larger and every value after it no smaller (Hoare's
// quickselect with a median-of-three pivot).
func selectKth(xs []float64, k int) {
	lo, hi := 0, len(xs)-1
	for hi > lo {
		mid := lo + (hi-lo)/2
		if xs[mid] < xs[lo] {
			xs[mid], xs[lo] = xs[lo], xs[mid]
		}
		if xs[hi] < xs[lo] {
			xs[hi], xs[lo] = xs[lo], xs[hi]
		}
		if xs[hi] < xs[mid] {
			xs[hi], xs[mid] = xs[mid], xs[hi]
		}
		pivot := xs[mid]
		i, j := lo, hi
		for i <= j {
			for xs[i] < pivot {
				i++
			}
			for xs[j] > pivot {
				j--
			}
			if i <= j {
				xs[i], xs[j] = xs[j], xs[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return
		}
	}
}
