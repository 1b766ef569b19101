package main

import (
	"bytes"
	"strings"
	"testing"
)

// scenarios as a run reports them, with the given numbers.
func measured(sql, svc scenarioResult) []scenarioResult {
	svc.compare(sql)
	return []scenarioResult{sql, svc}
}

func ok(name string, throughput, p99 float64) scenarioResult {
	return scenarioResult{Name: name, Status: statusOK, Requests: 100, OK: 100, Throughput: throughput, P50Ms: 1, P99Ms: p99}
}

func verdictOf(t *testing.T, results []targetResult, prefix string) targetResult {
	t.Helper()
	for _, r := range results {
		if strings.HasPrefix(r.Target, prefix) {
			return r
		}
	}
	t.Fatalf("no target starting %q in %+v", prefix, results)
	return targetResult{}
}

func TestTargetsJudgeRatiosAndRatesFromGivenNumbers(t *testing.T) {
	t.Parallel()
	var at16 []scenarioResult
	at16 = append(at16, measured(ok("sql consume-many", 1000, 10), ok("consume-many", 1100, 30))...)
	at16 = append(at16, measured(ok("sql balance", 10000, 1), ok("balance", 4000, 5))...)
	credited := ok("webhook-credited", 1200, 50)
	credited.Rate, credited.RateUnit = 1200, unitCredited
	usage := ok("usage", 30, 500)
	usage.Rate, usage.RateUnit = 30000, unitEvents
	at16 = append(at16, credited, usage)
	got := judgeTargets(at16, 16)
	if len(got) != len(targets) {
		t.Fatalf("%d results, want one per target", len(got))
	}

	cases := []struct{ prefix, verdict, detail string }{
		{"consume-many vs sql consume-many @ 16", verdictPass, "1.10x (1100.0 vs 1000.0 ops/s)"},
		{"consume-many vs sql consume-many @ 64", verdictOtherWorker, "this run used 16 workers"},
		{"consume-hot vs sql consume-hot @ 64", verdictOtherWorker, "this run used 16 workers"},
		{"balance vs sql balance @ 16", verdictMiss, "0.40x (4000.0 vs 10000.0 ops/s): throughput at 80% of the 0.5x target"},
		{"webhook-credited @ 16", verdictPass, "1,200 credited/s"},
		{"usage @ 16", verdictMiss, "30,000 events/s: at 60% of the target"},
	}
	for _, c := range cases {
		r := verdictOf(t, got, c.prefix)
		if r.Verdict != c.verdict || r.Detail != c.detail {
			t.Errorf("%s: %s %q, want %s %q", c.prefix, r.Verdict, r.Detail, c.verdict, c.detail)
		}
	}
	if r := verdictOf(t, got, "usage"); r.Target != "usage @ 16 workers: >= 50,000 events/s" {
		t.Errorf("target named %q", r.Target)
	}
}

// At 64 workers consume-many must also keep its p99 at or under the
// baseline's, and consume-hot beat its baseline five times.
func TestTargetsAt64WorkersCheckTheTailToo(t *testing.T) {
	t.Parallel()
	var run []scenarioResult
	run = append(run, measured(ok("sql consume-many", 1000, 40), ok("consume-many", 1600, 50))...)
	run = append(run, measured(ok("sql consume-hot", 500, 90), ok("consume-hot", 2600, 20))...)
	got := judgeTargets(run, 64)
	many := verdictOf(t, got, "consume-many vs sql consume-many @ 64")
	if many.Verdict != verdictMiss || many.Detail != "1.60x (1600.0 vs 1000.0 ops/s), p99 50.00 ms vs 40.00 ms: p99 1.25x the baseline's" {
		t.Errorf("consume-many @ 64: %s %q", many.Verdict, many.Detail)
	}
	if hot := verdictOf(t, got, "consume-hot"); hot.Verdict != verdictPass || hot.Detail != "5.20x (2600.0 vs 500.0 ops/s)" {
		t.Errorf("consume-hot @ 64: %s %q", hot.Verdict, hot.Detail)
	}
	for _, prefix := range []string{"balance", "webhook-credited", "usage", "consume-many vs sql consume-many @ 16"} {
		if r := verdictOf(t, got, prefix); r.Verdict != verdictOtherWorker {
			t.Errorf("%s at 64 workers: %s", prefix, r.Verdict)
		}
	}
}

// Only a clean scenario can pass; one that did not run, failed or was
// skipped is not measured.
func TestTargetsNeedACleanMeasuredScenario(t *testing.T) {
	t.Parallel()
	withErrors := ok("consume-many", 5000, 1)
	withErrors.Status, withErrors.Errors = statusErrors, 3
	credited := scenarioResult{Name: "webhook-credited", Status: statusFailed, Failure: "setup: no catalog"}
	got := judgeTargets(append(measured(ok("sql consume-many", 1000, 10), withErrors), credited), 16)

	if r := verdictOf(t, got, "consume-many vs sql consume-many @ 16"); r.Verdict != verdictMiss || !strings.HasSuffix(r.Detail, ": the scenario had 3 errors") {
		t.Errorf("a fast run with errors: %s %q, want a miss naming the errors", r.Verdict, r.Detail)
	}
	if r := verdictOf(t, got, "webhook-credited"); r.Verdict != verdictNotMeasured || r.Detail != "webhook-credited failed: setup: no catalog" {
		t.Errorf("failed scenario: %s %q", r.Verdict, r.Detail)
	}
	if r := verdictOf(t, got, "balance"); r.Verdict != verdictNotMeasured || r.Detail != "balance was not run" {
		t.Errorf("scenario not run: %s %q", r.Verdict, r.Detail)
	}
	// A service scenario whose baseline failed has no ratio to judge.
	baseFailed := scenarioResult{Name: "sql consume-many", Status: statusFailed, Failure: "sql"}
	got = judgeTargets(measured(baseFailed, ok("consume-many", 1, 1)), 16)
	if r := verdictOf(t, got, "consume-many vs sql consume-many @ 16"); r.Verdict != verdictNotMeasured {
		t.Errorf("baseline failed: %s %q", r.Verdict, r.Detail)
	}
}

// The text report prints one line per target with its verdict, and says
// where the invariant check ran and what it found.
func TestTextReportPrintsTargetsAndVerify(t *testing.T) {
	t.Parallel()
	rep := report{
		Scenarios: measured(ok("sql consume-many", 1000, 10), ok("consume-many", 900, 20)),
		Verify:    verifyReport{How: "GET /v1/admin/verify", Checked: true, OK: true, Summary: "ok (3 customers, 0 payments checked)"},
	}
	rep.Scenarios = append(rep.Scenarios, skippedScenario("hold-capture", "holds", "the server has no holds endpoint"))
	rep.Targets = judgeTargets(rep.Scenarios, 16)
	var out bytes.Buffer
	if err := rep.writeText(&out); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, want := range []string{
		"MISS         consume-many vs sql consume-many @ 16 workers: throughput >= 1.0x: 0.90x (900.0 vs 1000.0 ops/s): throughput at 90% of the 1.0x target\n",
		"n/a          consume-hot vs sql consume-hot @ 64 workers: throughput >= 5.0x: this run used 16 workers\n",
		"not measured webhook-credited @ 16 workers: >= 1,000 credited/s: webhook-credited was not run\n",
		"  SKIPPED: the server has no holds endpoint\n",
		"verify (the invariant check, run after the load, GET /v1/admin/verify): ok (3 customers, 0 payments checked)\n",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
}

func TestThousands(t *testing.T) {
	t.Parallel()
	for v, want := range map[float64]string{0: "0.0", 12.34: "12.3", 100: "100", 1000: "1,000", 51234.4: "51,234", 1234567: "1,234,567"} {
		if got := thousands(v); got != want {
			t.Errorf("thousands(%v) = %q, want %q", v, got, want)
		}
	}
}
