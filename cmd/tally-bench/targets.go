package main

import (
	"fmt"
	"strings"
)

// The targets of the performance work (issue 11), each at the worker count
// it names. A ratio target compares a scenario with the baseline measured in
// the same run; an absolute one needs a rate on this machine.
const (
	webhookCreditedTarget = 1000   // payments credited a second
	usageEventsTarget     = 50_000 // usage events accepted a second
)

var targets = []target{
	{Scenario: scenarioConsumeMany, Baseline: "sql " + scenarioConsumeMany, Workers: 16, MinRatio: 1.0},
	{Scenario: scenarioConsumeMany, Baseline: "sql " + scenarioConsumeMany, Workers: 64, MinRatio: 1.5, P99AtMostBaseline: true},
	{Scenario: scenarioConsumeHot, Baseline: "sql " + scenarioConsumeHot, Workers: 64, MinRatio: 5},
	{Scenario: scenarioBalance, Baseline: "sql " + scenarioBalance, Workers: 16, MinRatio: 0.5},
	// A hold and its capture together as fast as two raw debits: the same
	// bar as consume-many's, for the long-job path.
	{Scenario: scenarioHoldCapture, Baseline: "sql " + scenarioHoldCapture, Workers: 16, MinRatio: 1.0},
	{Scenario: scenarioWebhookCredited, Workers: 16, MinRate: webhookCreditedTarget, Unit: unitCredited},
	{Scenario: scenarioUsage, Workers: 16, MinRate: usageEventsTarget, Unit: unitEvents},
}

// target is one line of the target table.
type target struct {
	Scenario string
	// Baseline, when set, makes this a ratio target: the scenario's
	// throughput at least MinRatio times the baseline's, and with
	// P99AtMostBaseline its p99 no higher than the baseline's.
	Baseline          string
	MinRatio          float64
	P99AtMostBaseline bool
	// MinRate is an absolute target in Unit (the scenario's Rate).
	MinRate float64
	Unit    string
	Workers int
}

func (t target) String() string {
	if t.Baseline != "" {
		s := fmt.Sprintf("%s vs %s @ %d workers: throughput >= %.1fx", t.Scenario, t.Baseline, t.Workers, t.MinRatio)
		if t.P99AtMostBaseline {
			s += ", p99 <= the baseline's"
		}
		return s
	}
	return fmt.Sprintf("%s @ %d workers: >= %s %s", t.Scenario, t.Workers, thousands(t.MinRate), t.Unit)
}

// Target verdicts.
const (
	verdictPass        = "PASS"
	verdictMiss        = "MISS"
	verdictOtherWorker = "n/a"          // the run used another worker count
	verdictNotMeasured = "not measured" // the scenario or its baseline did not run
)

// targetResult is a target judged against one run.
type targetResult struct {
	Target  string `json:"target"`
	Verdict string `json:"verdict"`
	// Detail gives the measured numbers and, for a miss, by how much.
	Detail string `json:"detail"`
}

// judgeTargets judges every target against the scenarios of a run at
// workers concurrency. Only a scenario that ran clean (status ok) can pass:
// a fast number from a run with errors proves nothing.
func judgeTargets(scenarios []scenarioResult, workers int) []targetResult {
	byName := map[string]scenarioResult{}
	for _, sc := range scenarios {
		byName[sc.Name] = sc
	}
	var out []targetResult
	for _, t := range targets {
		out = append(out, t.judge(byName, workers))
	}
	return out
}

func (t target) judge(byName map[string]scenarioResult, workers int) targetResult {
	r := targetResult{Target: t.String()}
	if workers != t.Workers {
		r.Verdict, r.Detail = verdictOtherWorker, fmt.Sprintf("this run used %d workers", workers)
		return r
	}
	sc, ran := byName[t.Scenario]
	if !ran || sc.Status == statusFailed || sc.Status == statusSkipped {
		r.Verdict, r.Detail = verdictNotMeasured, t.Scenario+" "+notMeasuredReason(sc, ran)
		return r
	}
	var miss []string
	if t.Baseline != "" {
		base, ok := byName[t.Baseline]
		if !ok || base.Status == statusFailed || sc.Baseline != t.Baseline {
			r.Verdict, r.Detail = verdictNotMeasured, t.Baseline+" "+notMeasuredReason(base, ok)
			return r
		}
		r.Detail = fmt.Sprintf("%.2fx (%.1f vs %.1f ops/s)", sc.ThroughputRatio, sc.Throughput, base.Throughput)
		if sc.ThroughputRatio < t.MinRatio {
			miss = append(miss, fmt.Sprintf("throughput at %.0f%% of the %.1fx target", 100*sc.ThroughputRatio/t.MinRatio, t.MinRatio))
		}
		if t.P99AtMostBaseline {
			r.Detail += fmt.Sprintf(", p99 %.2f ms vs %.2f ms", sc.P99Ms, base.P99Ms)
			if sc.P99Ms > base.P99Ms {
				miss = append(miss, fmt.Sprintf("p99 %.2fx the baseline's", sc.P99Ms/base.P99Ms))
			}
		}
	} else {
		r.Detail = fmt.Sprintf("%s %s", thousands(sc.Rate), sc.RateUnit)
		if sc.Rate < t.MinRate {
			miss = append(miss, fmt.Sprintf("at %.0f%% of the target", 100*sc.Rate/t.MinRate))
		}
	}
	if sc.Status != statusOK {
		miss = append(miss, fmt.Sprintf("the scenario had %d errors", sc.Errors))
	}
	r.Verdict = verdictPass
	if len(miss) > 0 {
		r.Verdict = verdictMiss
		r.Detail += ": " + strings.Join(miss, "; ")
	}
	return r
}

func notMeasuredReason(sc scenarioResult, ran bool) string {
	switch {
	case !ran:
		return "was not run"
	case sc.Failure != "":
		return sc.Status + ": " + sc.Failure
	default:
		return sc.Status
	}
}

// thousands formats a rate with thousands separators and one decimal below
// 100, so targets and results read alike: 1,000 and 51,230.
func thousands(v float64) string {
	if v < 100 {
		return fmt.Sprintf("%.1f", v)
	}
	s := fmt.Sprintf("%.0f", v)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
