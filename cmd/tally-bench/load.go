package main

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// outcome is what one operation ended with. Exactly one of ok, expected or
// a non-empty errLabel holds.
type outcome struct {
	ok bool
	// expected is a refusal the scenario allows (402 insufficient_credits
	// on consume): it counts as a request but neither as a success nor as
	// an error.
	expected bool
	// errLabel groups errors in the report ("HTTP 503 unavailable",
	// "transport", "sql"); errDetail is one example message.
	errLabel  string
	errDetail string
	// tags are counted to show what the server did (the stored status of
	// each webhook delivery).
	tags []string
	// stop ends the worker after this outcome: its operation can do no
	// more (webhook-credited has driven every prepared payment), and
	// asking again would only count the same error as fast as the loop
	// turns, on the cores the server under test needs.
	stop bool
}

// worker is one goroutine's private state: no locks on the hot path, merged
// once the run ends.
type worker struct {
	id  int
	seq int64
	rnd *rand.Rand
	// measuring is true while the current operation is one that counts
	// (it started inside the measured window), for operations that keep
	// their own record of what they did.
	measuring bool

	latencies []time.Duration
	ok        int64
	expected  int64
	errors    map[string]int64
	examples  map[string]string
	tags      map[string]int64
}

// op performs one timed operation for w.
type op func(ctx context.Context, w *worker) outcome

// loadResult is the merged measurement of one scenario.
type loadResult struct {
	requests  int64
	ok        int64
	expected  int64
	errors    map[string]int64
	examples  map[string]string
	tags      map[string]int64
	elapsed   time.Duration
	latencies []time.Duration // sorted ascending
	// cpu is what the measured window cost the machine (nil: not probed).
	cpu *cpuUse
}

func (r loadResult) errorCount() int64 {
	var n int64
	for _, c := range r.errors {
		n += c
	}
	return n
}

// throughput is completed operations per second over the measured window.
func (r loadResult) throughput() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.requests) / r.elapsed.Seconds()
}

// drive runs do on concurrency goroutines for warmup and then duration.
// Only operations that start inside the measured window are recorded; one
// that started before the window closes is allowed to finish and counts.
// Each worker gets its own random source from seed, so the same seed picks
// the same customers in the same order per worker. now is the clock
// (time.Now outside tests); it must be safe for concurrent use. With a
// probe, the CPU spent from the first measured operation's start to the
// last one's end is taken too.
func drive(ctx context.Context, now func() time.Time, concurrency int, warmup, duration time.Duration, seed int64, probe *cpuProbe, do op) loadResult {
	start := now()
	measureFrom := start.Add(warmup)
	end := measureFrom.Add(duration)
	var cpuFrom cpuSnapshot
	var measured sync.Once

	workers := make([]*worker, concurrency)
	var wg sync.WaitGroup
	for i := range workers {
		w := &worker{
			id:       i,
			rnd:      rand.New(rand.NewPCG(uint64(seed), uint64(i))),
			errors:   map[string]int64{},
			examples: map[string]string{},
			tags:     map[string]int64{},
		}
		workers[i] = w
		wg.Go(func() {
			for ctx.Err() == nil {
				began := now()
				if !began.Before(end) {
					return
				}
				w.seq++
				w.measuring = !began.Before(measureFrom)
				if w.measuring && probe != nil {
					measured.Do(func() { cpuFrom = probe.snapshot(now()) })
				}
				out := do(ctx, w)
				took := now().Sub(began)
				// A worker spent in the warm-up still says why it stopped.
				if !w.measuring && !out.stop {
					continue
				}
				w.latencies = append(w.latencies, took)
				for _, tag := range out.tags {
					w.tags[tag]++
				}
				switch {
				case out.ok:
					w.ok++
				case out.expected:
					w.expected++
				default:
					w.errors[out.errLabel]++
					if _, ok := w.examples[out.errLabel]; !ok {
						w.examples[out.errLabel] = out.errDetail
					}
				}
				if out.stop {
					return
				}
			}
		})
	}
	wg.Wait()

	r := loadResult{errors: map[string]int64{}, examples: map[string]string{}, tags: map[string]int64{}, elapsed: duration}
	if !cpuFrom.at.IsZero() {
		r.cpu = between(cpuFrom, probe.snapshot(now()))
	}
	for _, w := range workers {
		r.ok += w.ok
		r.expected += w.expected
		r.latencies = append(r.latencies, w.latencies...)
		for tag, n := range w.tags {
			r.tags[tag] += n
		}
		for label, n := range w.errors {
			r.errors[label] += n
			if _, ok := r.examples[label]; !ok {
				r.examples[label] = w.examples[label]
			}
		}
	}
	r.requests = int64(len(r.latencies))
	slices.Sort(r.latencies)
	return r
}

// percentile is the nearest-rank p-th percentile (0 < p <= 100) of sorted
// latencies: the smallest value that at least p% of the samples do not
// exceed. It is 0 for no samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}
