package main

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercentileIsNearestRank(t *testing.T) {
	t.Parallel()
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	var hundred []time.Duration
	for i := 1; i <= 100; i++ {
		hundred = append(hundred, ms(i))
	}
	cases := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one sample is every percentile", []time.Duration{ms(7)}, 99, ms(7)},
		{"p50 of 1..100", hundred, 50, ms(50)},
		{"p95 of 1..100", hundred, 95, ms(95)},
		{"p99 of 1..100", hundred, 99, ms(99)},
		{"p100 is the maximum", hundred, 100, ms(100)},
		{"p50 of an even count takes the lower middle", []time.Duration{ms(1), ms(2), ms(3), ms(4)}, 50, ms(2)},
		{"p99 of few samples is the maximum", []time.Duration{ms(1), ms(2), ms(3)}, 99, ms(3)},
		{"p95 of 1..10 rounds the rank up", hundred[:10], 95, ms(10)},
	}
	for _, c := range cases {
		if got := percentile(c.sorted, c.p); got != c.want {
			t.Errorf("%s: percentile(p%v) = %v, want %v", c.name, c.p, got, c.want)
		}
	}
}

// drive must count every measured operation exactly once, in the bucket its
// outcome names, merged over all workers, with latencies sorted.
func TestDriveMergesOutcomesOfAllWorkers(t *testing.T) {
	t.Parallel()
	do := func(ctx context.Context, w *worker) outcome {
		switch w.seq % 4 {
		case 0:
			return outcome{expected: true}
		case 1:
			return outcome{errLabel: "HTTP 503 unavailable", errDetail: "not built yet"}
		default:
			return outcome{ok: true, tags: []string{"stored"}}
		}
	}
	r := drive(context.Background(), tickingClock(), 8, 10*time.Millisecond, 50*time.Millisecond, 1, nil, do)

	if r.requests == 0 {
		t.Fatal("no operation was measured")
	}
	if got := r.ok + r.expected + r.errorCount(); got != r.requests {
		t.Errorf("ok %d + expected %d + errors %d = %d, want requests %d", r.ok, r.expected, r.errorCount(), got, r.requests)
	}
	if r.ok == 0 || r.expected == 0 || r.errors["HTTP 503 unavailable"] == 0 {
		t.Errorf("every outcome kind should be counted: ok %d, expected %d, errors %v", r.ok, r.expected, r.errors)
	}
	if r.examples["HTTP 503 unavailable"] != "not built yet" {
		t.Errorf("error example = %q, want the detail of the error", r.examples["HTTP 503 unavailable"])
	}
	if r.tags["stored"] != r.ok {
		t.Errorf("tag count %d, want one per tagged success (%d)", r.tags["stored"], r.ok)
	}
	for i := 1; i < len(r.latencies); i++ {
		if r.latencies[i] < r.latencies[i-1] {
			t.Fatalf("latencies not sorted at %d: %v after %v", i, r.latencies[i], r.latencies[i-1])
		}
	}
}

// Operations that start during the warmup are performed but not recorded;
// those that start in the measured window are, with their own duration.
func TestDriveRecordsOnlyTheMeasuredWindow(t *testing.T) {
	t.Parallel()
	var performed int64 // one worker: no race, and drive waits for it
	r := drive(context.Background(), tickingClock(), 1, 10*time.Millisecond, 50*time.Millisecond, 1, nil, func(ctx context.Context, w *worker) outcome {
		performed++
		return outcome{ok: true}
	})
	// The clock ticks 1 ms per reading and an operation reads it twice
	// (start, end): operations start at 1, 3, 5, ... ms after the start.
	// 5 of them start in the 10 ms warmup and 25 in the 50 ms window.
	if performed != 30 || r.requests != 25 || r.ok != 25 {
		t.Errorf("performed %d, recorded %d (ok %d); want 30 performed, 25 recorded", performed, r.requests, r.ok)
	}
	if len(r.latencies) != 25 || r.latencies[0] != time.Millisecond || r.latencies[24] != time.Millisecond {
		t.Errorf("latencies %v, want 25 of 1ms", r.latencies)
	}
	if r.elapsed != 50*time.Millisecond || r.throughput() != 500 {
		t.Errorf("elapsed %v, throughput %v/s; want 50ms and 500/s", r.elapsed, r.throughput())
	}
}

// tickingClock advances 1 ms at every reading, so tests of drive do not
// depend on how fast the machine is.
func tickingClock() func() time.Time {
	var ticks atomic.Int64
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	return func() time.Time { return base.Add(time.Duration(ticks.Add(1)) * time.Millisecond) }
}

// An operation that can do no more (webhook-credited out of prepared
// payments) ends its worker: the error is counted once per worker, not
// once per turn of a loop that spins until the window closes.
func TestDriveStopsAWorkerWhoseOperationIsSpent(t *testing.T) {
	t.Parallel()
	const workers, each = 4, 3
	do := func(ctx context.Context, w *worker) outcome {
		if w.seq > each {
			return outcome{errLabel: "no pending payment left", errDetail: "raise -payments", stop: true}
		}
		return outcome{ok: true}
	}
	// No warm-up and a window far longer than the work: every operation is
	// measured, and only stopping ends a worker early.
	r := drive(context.Background(), tickingClock(), workers, 0, time.Hour, 1, nil, do)
	if r.ok != workers*each {
		t.Errorf("ok = %d, want %d", r.ok, workers*each)
	}
	if got := r.errors["no pending payment left"]; got != workers {
		t.Errorf("%d errors counted for %d spent workers, want one each", got, workers)
	}
	// Spent in the warm-up: nothing is measured but why each stopped.
	r = drive(context.Background(), tickingClock(), workers, time.Hour, time.Hour, 1, nil, do)
	if r.ok != 0 || r.errors["no pending payment left"] != workers || r.requests != workers {
		t.Errorf("spent in the warm-up: ok %d, errors %v, requests %d; want 0, one each, %d", r.ok, r.errors, r.requests, workers)
	}
}

// A stall that outlasts the whole window (an operation begun in the warmup
// still running when it closes) records nothing; the report says that no
// request started in the window, not that none succeeded.
func TestAScenarioWhoseOperationsOutlastTheWindowSaysSo(t *testing.T) {
	t.Parallel()
	clock := tickingClock()
	r := drive(context.Background(), clock, 2, 10*time.Millisecond, 50*time.Millisecond, 1, nil, func(ctx context.Context, w *worker) outcome {
		for range 100 { // 100 ms of this clock: past the window's end
			clock()
		}
		return outcome{ok: true}
	})
	res := newScenarioResult("sql consume-hot", "sql", "", r)
	if r.requests != 0 || res.Status != statusFailed || !strings.Contains(res.Failure, "no request started inside the 50ms measured window") {
		t.Errorf("requests %d, status %s, failure %q; want 0 and failed because no request started inside the window", r.requests, res.Status, res.Failure)
	}
	refused := newScenarioResult("balance", "http", "", loadResult{requests: 3, errors: map[string]int64{"HTTP 503 unavailable": 3}, elapsed: time.Second})
	if refused.Failure != "no request succeeded" {
		t.Errorf("failure %q, want no request succeeded when every one was refused", refused.Failure)
	}
}
