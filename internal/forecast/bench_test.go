package forecast

import (
	"slices"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/forecast/synth"
)

// BenchmarkPredictYear measures the forecast of one customer with a year
// of history, over the year-long series of the set in turn, and reports
// the p50 and p99 of a single forecast besides the mean: the endpoint
// answers one customer per request, so its tail is the figure that
// counts. BENCHMARKS.md has the numbers; nothing here asserts a speed.
func BenchmarkPredictYear(b *testing.B) {
	var year []History
	for _, s := range synth.Set() {
		if len(s.Daily) >= 365 {
			h, err := NewHistory(s.Start, s.Daily)
			if err != nil {
				b.Fatal(err)
			}
			year = append(year, h)
		}
	}
	if len(year) == 0 {
		b.Fatal("the series set has no year-long series")
	}
	for _, horizon := range []int{30, 90} {
		b.Run(map[int]string{30: "horizon=30", 90: "horizon=90"}[horizon], func(b *testing.B) {
			took := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				start := time.Now()
				if _, err := Predict(year[i%len(year)], horizon); err != nil {
					b.Fatal(err)
				}
				took = append(took, time.Since(start))
			}
			slices.Sort(took)
			at := func(q float64) float64 {
				return float64(took[int(q*float64(len(took)-1))].Microseconds()) / 1000
			}
			b.ReportMetric(at(0.5), "p50-ms")
			b.ReportMetric(at(0.99), "p99-ms")
		})
	}
}
