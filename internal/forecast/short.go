package forecast

import "math"

const (
	// priorSpread is the spread of a day around the typical day, on the log
	// scale, that a customer is assumed to have before its days show its
	// own: a standard deviation of 0.75 puts 80% of days between about a
	// third and 2.6 times the typical day, which a weekday/weekend cycle
	// and ordinary noise fill.
	priorSpread = 0.75
	// priorWeight is how many days that prior counts for.
	priorWeight = 3.0
)

// simulateShortHistory draws the futures of a customer with fewer days
// than the full model needs. Each future has one typical day, uncertain as
// a mean of len(daily) days is, and days spread around it on the log
// scale. The expected day is the plain mean of the days: with so few, the
// log scale's correction from typical to mean day would rest on the prior
// more than on the customer, and overshoot.
func simulateShortHistory(daily []float64, horizon int) simulation {
	n := float64(len(daily))
	var mean, plain float64
	for _, y := range daily {
		mean += toLog(y)
		plain += y
	}
	mean /= n
	plain /= n
	var ss float64
	for _, y := range daily {
		d := toLog(y) - mean
		ss += d * d
	}
	spread := math.Sqrt((ss + priorWeight*priorSpread*priorSpread) / (n - 1 + priorWeight))
	levelSpread := spread / math.Sqrt(n)

	s := newSimulation(horizon)
	s.expected = make([]float64, horizon)
	for h := range s.expected {
		s.expected[h] = plain
	}
	if len(daily) >= season {
		// A week seen once is half signal, half noise: each weekday's
		// expected day is halfway between the mean day and the mean of
		// that weekday's days.
		var sums, counts [season]float64
		for i, y := range daily {
			sums[i%season] += y
			counts[i%season]++
		}
		for h := range s.expected {
			j := (len(daily) + h) % season
			s.expected[h] = (plain + sums[j]/counts[j]) / 2
		}
	}
	r := newRand()
	for p := range s.paths {
		level := mean + levelSpread*r.NormFloat64()
		row := s.y[p*horizon : (p+1)*horizon]
		for h := range row {
			row[h] = fromLog(level + spread*r.NormFloat64())
		}
	}
	return s
}
