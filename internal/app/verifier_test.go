package app

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The background verify runs once per interval for the whole fleet: a
// replica that starts, or restarts, within an interval of the last run
// (by any replica) waits for the interval instead of scanning the ledger
// again, and the next one is due an interval after the last.
func TestBackgroundVerifyRunsOncePerIntervalAcrossRestarts(t *testing.T) {
	t.Parallel()
	gdb := dbtest.New(t)
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	start := func() *verifier {
		return newVerifier(gdb, dbtest.Logger(t), clock, 15*time.Minute, prometheus.NewRegistry())
	}
	runs := func(v *verifier) float64 { return testutil.ToFloat64(v.runs.WithLabelValues("ok")) }

	first := start()
	first.verifyOnce(t.Context())
	if got := runs(first); got != 1 {
		t.Fatalf("the first replica ran %v verifies at its start, want 1", got)
	}

	now = now.Add(5 * time.Minute)
	restarted := start()
	restarted.verifyOnce(t.Context())
	first.verifyOnce(t.Context())
	if got := runs(restarted) + runs(first); got != 1 {
		t.Fatalf("%v verifies in all five minutes after the last, want still 1", got)
	}

	now = now.Add(10 * time.Minute)
	restarted.verifyOnce(t.Context())
	first.verifyOnce(t.Context())
	if runs(restarted) != 1 || runs(first) != 1 {
		t.Fatalf("an interval after the last: restarted replica ran %v, first %v; want one run, by the one that asked first",
			runs(restarted), runs(first))
	}
}
