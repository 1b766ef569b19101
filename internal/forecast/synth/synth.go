// Package synth generates the series set the forecast backtest is measured
// on: daily credit consumption of made-up customers with the shapes real
// usage has (weekly cycles, trends up and down, bursts, idle and
// intermittent days, sudden changes of level, new customers, different
// noise levels), each drawn from its own seeded generator so the set is the
// same on every machine and every run.
//
// The set is committed as internal/forecast/testdata/series.csv (the input
// of `tally forecast backtest`) with a description of every series in
// testdata/series.md; `go test ./internal/forecast/synth -update` rewrites
// both after a change here, and the package's test fails while they differ
// from what Set generates.
package synth

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// Series is one made-up customer.
type Series struct {
	// ID is "<shape>/<nn>"; the backtest groups by the part before '/'.
	ID          string
	Shape       string
	Description string
	Start       time.Time
	Daily       []float64 // whole credits consumed on each day from Start
}

// Shapes lists the shapes in the order of the set, each with what it is
// and why it is in the set.
var Shapes = []struct{ Name, About string }{
	{"weekly", "a stable level with a weekly cycle (office days, weekend peaks, weekdays only) and noise from 10% to 50%: the common case, where knowing the week matters most"},
	{"flat", "a stable level without a weekly cycle, at several noise levels, down to small counts: where the mean of the last week is already close to the best one can do"},
	{"trend-up", "growth, linear or compounding, steady or starting late, with a weekly cycle: a growing customer whose balance lasts less than its past says"},
	{"trend-down", "decline, slow or towards zero, with a weekly cycle: a customer winding down, whose forecast must not go below zero nor keep the old level"},
	{"bursts", "a weekly pattern with one-day or multi-day bursts of 2 to 30 times the usual day (a batch job, a campaign): the forecast must not take a burst for the new level"},
	{"intermittent", "idle on most days and busy on a few, at random, on weekdays only or in streaks: where the expected day is not a typical day"},
	{"level-shift", "a sudden change of level (up, down, to zero, back from zero, and twice), sometimes in the last weeks: the forecast must follow within days"},
	{"new-customer", "three days of history, then the future to check: a customer's first forecast, from too few days to see a week"},
	{"idle", "no consumption at all: nothing to forecast, and nothing to err on"},
}

// setStart is the first day of the long series, a Monday.
var setStart = time.Date(2026, 1, 5, 0, 0, 0, 0, time.UTC)

// Weekly profiles, Monday first, each with a mean of 1.
var (
	office       = normalise([7]float64{1.05, 1.1, 1.1, 1.05, 0.95, 0.3, 0.25})
	weekendHeavy = normalise([7]float64{0.8, 0.85, 0.85, 0.9, 1.1, 1.4, 1.3})
	weekdayOnly  = normalise([7]float64{1, 1, 1, 1, 1, 0, 0})
	flatWeek     = [7]float64{1, 1, 1, 1, 1, 1, 1}
)

func normalise(w [7]float64) [7]float64 {
	var sum float64
	for _, v := range w {
		sum += v
	}
	for i := range w {
		w[i] *= 7 / sum
	}
	return w
}

// gen draws one series: day i's mean is level(i) * week[weekday] *
// extra(i), the consumption a gamma-distributed multiple of it with the
// given coefficient of variation, counted in whole credits.
type gen struct {
	r     *rand.Rand
	start time.Time
	days  int
	week  [7]float64
	cv    float64
	level func(i int) float64
	extra func(i int) float64 // bursts, idle days; nil for 1
}

func (g gen) draw() []float64 {
	y := make([]float64, g.days)
	for i := range y {
		wd := (int(g.start.AddDate(0, 0, i).Weekday()) + 6) % 7 // Monday = 0
		mu := g.level(i) * g.week[wd]
		if g.extra != nil {
			mu *= g.extra(i)
		}
		y[i] = count(g.r, mu*gammaNoise(g.r, g.cv))
	}
	return y
}

// Set generates the whole series set. It is deterministic: every series
// has its own generator seeded from its id.
func Set() []Series {
	var set []Series
	add := func(shape, about string, start time.Time, days int, week [7]float64, cv float64,
		level func(r *rand.Rand) func(int) float64, extra func(r *rand.Rand) func(int) float64) {
		n := 1
		for _, s := range set {
			if s.Shape == shape {
				n++
			}
		}
		id := fmt.Sprintf("%s/%02d", shape, n)
		r := rand.New(rand.NewPCG(seedOf(id), 2026))
		g := gen{r: r, start: start, days: days, week: week, cv: cv, level: level(r)}
		if extra != nil {
			g.extra = extra(r)
		}
		set = append(set, Series{ID: id, Shape: shape, Description: about, Start: start, Daily: g.draw()})
	}
	const long, year, short = 168, 365, 120

	// weekly
	add("weekly", "office days at 200 a day, 10% noise, a year of history", setStart, year, office, 0.1, constant(200), nil)
	add("weekly", "office days at 40 a day, 30% noise", setStart, long, office, 0.3, constant(40), nil)
	add("weekly", "weekend peaks at 1000 a day, 20% noise", setStart, long, weekendHeavy, 0.2, constant(1000), nil)
	add("weekly", "weekdays only at 80 a day, idle weekends, 25% noise", setStart, long, weekdayOnly, 0.25, constant(80), nil)
	add("weekly", "office days at 15 a day, 50% noise", setStart, short, office, 0.5, constant(15), nil)
	add("weekly", "weekend peaks at 5 a day: small counts, 10% noise on top", setStart, long, weekendHeavy, 0.1, constant(5), nil)

	// flat
	add("flat", "100 a day, 10% noise", setStart, long, flatWeek, 0.1, constant(100), nil)
	add("flat", "30 a day, 35% noise", setStart, long, flatWeek, 0.35, constant(30), nil)
	add("flat", "8 a day, counting noise only", setStart, long, flatWeek, 0, constant(8), nil)
	add("flat", "500 a day, 60% noise", setStart, short, flatWeek, 0.6, constant(500), nil)

	// trend-up
	add("trend-up", "office days, linear growth from 50 to 150 a day over 24 weeks, 20% noise", setStart, long, office, 0.2, linear(50, 150, long), nil)
	add("trend-up", "weekend peaks, compounding 1% a day from 20 (x5 over 24 weeks), 15% noise", setStart, long, weekendHeavy, 0.15, compounding(20, 0.01), nil)
	add("trend-up", "office days, flat at 100 for 15 weeks then growing 2% a day, 15% noise", setStart, long, office, 0.15, lateGrowth(100, 105, 0.02), nil)
	add("trend-up", "no weekly cycle, compounding 0.4% a day from 300 over a year, 25% noise", setStart, year, flatWeek, 0.25, compounding(300, 0.004), nil)
	add("trend-up", "weekdays only, linear growth from 10 to 40 a day, 30% noise", setStart, short, weekdayOnly, 0.3, linear(10, 40, short), nil)

	// trend-down
	add("trend-down", "office days, linear decline from 200 to 60 a day, 15% noise", setStart, long, office, 0.15, linear(200, 60, long), nil)
	add("trend-down", "weekend peaks, shrinking 2% a day from 150 (churning to almost nothing), 20% noise", setStart, long, weekendHeavy, 0.2, compounding(150, -0.02), nil)
	add("trend-down", "no weekly cycle, slow decline from 80 to 60 a day, 10% noise", setStart, long, flatWeek, 0.1, linear(80, 60, long), nil)
	add("trend-down", "weekdays only, declining from 60 to 20 a day over 12 weeks then flat, 25% noise", setStart, long, weekdayOnly, 0.25, declineThenFlat(60, 20, 84), nil)
	add("trend-down", "office days, linear decline to zero over 20 weeks, then idle, 20% noise", setStart, long, office, 0.2, linearToZero(120, 140), nil)

	// bursts
	add("bursts", "office days at 100, a burst of 3 to 10 times on 4% of days, 15% noise", setStart, long, office, 0.15, constant(100), bursts(0.04, 3, 10, 1))
	add("bursts", "no weekly cycle at 50, a burst of 2 to 5 times on 8% of days, 20% noise", setStart, long, flatWeek, 0.2, constant(50), bursts(0.08, 2, 5, 1))
	add("bursts", "office days at 300, campaigns of 3 days at 4 to 8 times on 2% of days, 10% noise, a year", setStart, year, office, 0.1, constant(300), bursts(0.02, 4, 8, 3))
	add("bursts", "weekdays only at 30, a burst of 5 to 15 times on 5% of days, 25% noise", setStart, long, weekdayOnly, 0.25, constant(30), bursts(0.05, 5, 15, 1))
	add("bursts", "weekend peaks at 200, a rare burst of 20 to 30 times on 1% of days, 15% noise", setStart, long, weekendHeavy, 0.15, constant(200), bursts(0.01, 20, 30, 1))

	// intermittent
	add("intermittent", "busy on 30% of days at random, 50 a busy day, 80% noise", setStart, long, flatWeek, 0.8, constant(50), idle(0.3))
	add("intermittent", "busy on 15% of days at random, 200 a busy day, 50% noise", setStart, long, flatWeek, 0.5, constant(200), idle(0.15))
	add("intermittent", "busy on half the days at random, 10 a busy day, 60% noise", setStart, long, flatWeek, 0.6, constant(10), idle(0.5))
	add("intermittent", "weekdays only, busy on 40% of them, 100 a busy day, 40% noise", setStart, long, weekdayOnly, 0.4, constant(100), idle(0.4))
	add("intermittent", "busy streaks of about 5 days between idle streaks of about 10, 80 a busy day, 30% noise", setStart, long, office, 0.3, constant(80), streaks(5, 10))
	add("intermittent", "busy on 8% of days at random, 500 a busy day, 50% noise, a year", setStart, year, flatWeek, 0.5, constant(500), idle(0.08))

	// level-shift
	add("level-shift", "office days at 50, tripling on day 100, 15% noise", setStart, long, office, 0.15, steps(50, 100, 150), nil)
	add("level-shift", "weekend peaks at 400, down to 120 on day 120, 15% noise", setStart, long, weekendHeavy, 0.15, steps(400, 120, 120), nil)
	add("level-shift", "office days at 100, doubling on day 60 and halving on day 130, 20% noise", setStart, long, office, 0.2, steps(100, 60, 200, 130, 100), nil)
	add("level-shift", "office days at 80, stopping (idle) from day 140, 20% noise", setStart, long, office, 0.2, steps(80, 140, 0), nil)
	add("level-shift", "no weekly cycle at 60, jumping to 180 on day 150 of 168 (late in the history), 20% noise", setStart, long, flatWeek, 0.2, steps(60, 150, 180), nil)
	add("level-shift", "weekdays only at 40, idle from day 50 to day 90, then back at 70, 25% noise", setStart, long, weekdayOnly, 0.25, steps(40, 50, 0, 90, 70), nil)

	// new-customer: 3 days to learn from, then 30 to check; starting on
	// every weekday in turn, so the three days fall on different parts of
	// the week.
	const newDays = 3 + 30
	newStart := func(i int) time.Time { return time.Date(2026, 6, 1+i, 0, 0, 0, 0, time.UTC) }
	add("new-customer", "office days at 120, 20% noise, starting on a Monday", newStart(0), newDays, office, 0.2, constant(120), nil)
	add("new-customer", "office days at 30, 40% noise, starting on a Thursday", newStart(3), newDays, office, 0.4, constant(30), nil)
	add("new-customer", "weekend peaks at 500, 15% noise, starting on a Saturday", newStart(5), newDays, weekendHeavy, 0.15, constant(500), nil)
	add("new-customer", "no weekly cycle at 70, 20% noise, starting on a Tuesday", newStart(1), newDays, flatWeek, 0.2, constant(70), nil)
	add("new-customer", "weekdays only at 25, 30% noise, starting on a Wednesday", newStart(2), newDays, weekdayOnly, 0.3, constant(25), nil)
	add("new-customer", "busy on 40% of days, 60 a busy day, starting on a Friday", newStart(4), newDays, flatWeek, 0.5, constant(60), idle(0.4))
	add("new-customer", "onboarding: office days growing from 20 to 100 a day over the month, starting on a Monday", newStart(7), newDays, office, 0.2, linear(20, 100, newDays), nil)
	add("new-customer", "small counts, about 4 a day, starting on a Sunday", newStart(6), newDays, flatWeek, 0, constant(4), nil)
	add("new-customer", "weekend peaks at 60, 30% noise, starting on a Wednesday", newStart(9), newDays, weekendHeavy, 0.3, constant(60), nil)
	add("new-customer", "office days at 250, 10% noise, starting on a Friday", newStart(11), newDays, office, 0.1, constant(250), nil)

	// idle
	add("idle", "nothing consumed in 24 weeks", setStart, long, flatWeek, 0, constant(0), nil)
	return set
}

// seedOf derives a series' seed from its id (FNV-1a), so adding a series
// changes no other series.
func seedOf(id string) uint64 {
	h := uint64(14695981039346656037)
	for i := range len(id) {
		h ^= uint64(id[i])
		h *= 1099511628211
	}
	return h
}

// Level functions: each takes the series' generator (for random choices)
// and returns the level of day i.

func constant(v float64) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 { return func(int) float64 { return v } }
}

func linear(from, to float64, days int) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 {
		return func(i int) float64 { return from + (to-from)*float64(i)/float64(days-1) }
	}
}

func compounding(from, rate float64) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 {
		return func(i int) float64 { return from * math.Pow(1+rate, float64(i)) }
	}
}

func lateGrowth(v float64, from int, rate float64) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 {
		return func(i int) float64 { return v * math.Pow(1+rate, float64(max(0, i-from))) }
	}
}

func declineThenFlat(from, to float64, days int) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 {
		return func(i int) float64 { return from + (to-from)*math.Min(1, float64(i)/float64(days)) }
	}
}

func linearToZero(from float64, days int) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 {
		return func(i int) float64 { return from * math.Max(0, 1-float64(i)/float64(days)) }
	}
}

// steps is a level that starts at v and changes to v2 on day d1, v3 on day
// d2 and so on: steps(v, d1, v2, d2, v3...).
func steps(v float64, changes ...float64) func(*rand.Rand) func(int) float64 {
	return func(*rand.Rand) func(int) float64 {
		return func(i int) float64 {
			level := v
			for k := 0; k+1 < len(changes); k += 2 {
				if float64(i) >= changes[k] {
					level = changes[k+1]
				}
			}
			return level
		}
	}
}

// Extra multipliers.

// bursts multiplies a day by a factor from lo to hi with probability p,
// for length days in a row.
func bursts(p, lo, hi float64, length int) func(*rand.Rand) func(int) float64 {
	return func(r *rand.Rand) func(int) float64 {
		left, factor := 0, 1.0
		return func(int) float64 {
			if left == 0 && r.Float64() < p {
				left, factor = length, lo+(hi-lo)*r.Float64()
			}
			if left > 0 {
				left--
				return factor
			}
			return 1
		}
	}
}

// idle makes a day busy (1) with probability p, else idle (0).
func idle(p float64) func(*rand.Rand) func(int) float64 {
	return func(r *rand.Rand) func(int) float64 {
		return func(int) float64 {
			if r.Float64() < p {
				return 1
			}
			return 0
		}
	}
}

// streaks alternates busy and idle streaks of geometric lengths with the
// given means.
func streaks(busyMean, idleMean float64) func(*rand.Rand) func(int) float64 {
	return func(r *rand.Rand) func(int) float64 {
		busy := true
		return func(int) float64 {
			v := 0.0
			if busy {
				v = 1
			}
			mean := idleMean
			if busy {
				mean = busyMean
			}
			if r.Float64() < 1/mean {
				busy = !busy
			}
			return v
		}
	}
}

// gammaNoise is a gamma-distributed factor with mean 1 and coefficient of
// variation cv (exactly 1 for cv 0).
func gammaNoise(r *rand.Rand, cv float64) float64 {
	if cv <= 0 {
		return 1
	}
	shape := 1 / (cv * cv)
	return gamma(r, shape) / shape
}

// gamma draws from the gamma distribution of the given shape and scale 1
// (mean shape), by Marsaglia and Tsang's method.
func gamma(r *rand.Rand, shape float64) float64 {
	if shape < 1 {
		// Gamma(a) = Gamma(a+1) * U^(1/a).
		return gamma(r, shape+1) * math.Pow(r.Float64(), 1/shape)
	}
	d := shape - 1.0/3
	c := 1 / math.Sqrt(9*d)
	for {
		x := r.NormFloat64()
		v := 1 + c*x
		if v <= 0 {
			continue
		}
		v = v * v * v
		if math.Log(r.Float64()) < 0.5*x*x+d-d*v+d*math.Log(v) {
			return d * v
		}
	}
}

// count is the whole number of credits consumed on a day whose mean is mu:
// a Poisson count for small means (so small customers have counting
// noise), the rounded mean for large ones.
func count(r *rand.Rand, mu float64) float64 {
	if mu <= 0 {
		return 0
	}
	if mu > 30 {
		return math.Round(mu)
	}
	limit, k, p := math.Exp(-mu), 0.0, r.Float64()
	for p > limit {
		k++
		p *= r.Float64()
	}
	return k
}

// WriteCSV writes the set as the forecast CLI reads it: a header, then
// customer_id,date,consumed, one row per series and day.
func WriteCSV(w io.Writer, set []Series) error {
	var b strings.Builder
	b.WriteString("customer_id,date,consumed\n")
	for _, s := range set {
		for i, v := range s.Daily {
			b.WriteString(s.ID)
			b.WriteByte(',')
			b.WriteString(s.Start.AddDate(0, 0, i).Format(time.DateOnly))
			b.WriteByte(',')
			b.WriteString(strconv.FormatFloat(v, 'f', -1, 64))
			b.WriteByte('\n')
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteIndex writes the description of the set in Markdown: the shapes and
// why they are there, then every series.
func WriteIndex(w io.Writer, set []Series) error {
	var b strings.Builder
	b.WriteString("# The forecast series set\n\n")
	b.WriteString("Generated by `internal/forecast/synth` (`go test ./internal/forecast/synth -update`);\n")
	b.WriteString("do not edit. `series.csv` holds the days, as `tally forecast` reads them.\n")
	b.WriteString("Every day's mean is level x weekday x (burst or idle factor); the day's\n")
	b.WriteString("consumption is a gamma-distributed multiple of it (the noise, as a\n")
	b.WriteString("coefficient of variation), counted in whole credits (a Poisson count\n")
	b.WriteString("below 30 a day). Long series start on Monday 2026-01-05.\n\n")
	b.WriteString("## Shapes\n\n")
	for _, sh := range Shapes {
		fmt.Fprintf(&b, "- **%s**: %s.\n", sh.Name, sh.About)
	}
	b.WriteString("\n## Series\n\n| id | days | from | what |\n|---|---:|---|---|\n")
	for _, s := range set {
		fmt.Fprintf(&b, "| %s | %d | %s | %s |\n", s.ID, len(s.Daily), s.Start.Format(time.DateOnly), s.Description)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
