package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Scenario states in the report.
const (
	statusOK     = "ok"     // every request succeeded (402 aside, where allowed)
	statusErrors = "errors" // some requests failed
	statusFailed = "failed" // setup failed or no request succeeded
)

// scenarioResult is one row of the report.
type scenarioResult struct {
	Name            string            `json:"name"`
	Kind            string            `json:"kind"` // http or sql
	What            string            `json:"what"`
	Status          string            `json:"status"`
	Failure         string            `json:"failure,omitempty"`
	Requests        int64             `json:"requests"`
	OK              int64             `json:"ok"`
	Insufficient    int64             `json:"insufficient_402"`
	Errors          int64             `json:"errors"`
	ErrorsByKind    map[string]int64  `json:"errors_by_kind,omitempty"`
	ErrorExamples   map[string]string `json:"error_examples,omitempty"`
	Answers         map[string]int64  `json:"answers,omitempty"`
	Throughput      float64           `json:"throughput_per_second"`
	P50Ms           float64           `json:"p50_ms"`
	P95Ms           float64           `json:"p95_ms"`
	P99Ms           float64           `json:"p99_ms"`
	Baseline        string            `json:"baseline,omitempty"`
	ThroughputRatio float64           `json:"throughput_ratio,omitempty"`
	P50Ratio        float64           `json:"p50_ratio,omitempty"`
}

func newScenarioResult(name, kind, what string, r loadResult) scenarioResult {
	res := scenarioResult{
		Name: name, Kind: kind, What: what,
		Requests:      r.requests,
		OK:            r.ok,
		Insufficient:  r.expected,
		Errors:        r.errorCount(),
		ErrorsByKind:  r.errors,
		ErrorExamples: r.examples,
		Answers:       r.tags,
		Throughput:    r.throughput(),
		P50Ms:         ms(percentile(r.latencies, 50)),
		P95Ms:         ms(percentile(r.latencies, 95)),
		P99Ms:         ms(percentile(r.latencies, 99)),
	}
	switch {
	case res.OK == 0:
		res.Status = statusFailed
		res.Failure = "no request succeeded"
	case res.Errors > 0:
		res.Status = statusErrors
	default:
		res.Status = statusOK
	}
	return res
}

func failedScenario(name, kind, what string, err error) scenarioResult {
	return scenarioResult{Name: name, Kind: kind, What: what, Status: statusFailed, Failure: err.Error()}
}

// compare sets the service-to-baseline ratios: throughput ratio below 1 and
// p50 ratio above 1 mean the service is slower than the bare transaction.
func (r *scenarioResult) compare(base scenarioResult) {
	if r.Status == statusFailed || base.Status == statusFailed || base.Throughput == 0 || base.P50Ms == 0 {
		return
	}
	r.Baseline = base.Name
	r.ThroughputRatio = r.Throughput / base.Throughput
	r.P50Ratio = r.P50Ms / base.P50Ms
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// machine describes where the numbers were taken; they mean little without it.
type machine struct {
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpu_model"`
	OS        string `json:"os"`
	Arch      string `json:"arch"`
	GoVersion string `json:"go_version"`
	Date      string `json:"date"`
	Server    string `json:"server"`
}

func describeMachine(server string, now time.Time) machine {
	return machine{
		CPUs:      runtime.NumCPU(),
		CPUModel:  cpuModel("/proc/cpuinfo"),
		OS:        runtime.GOOS,
		Arch:      runtime.GOARCH,
		GoVersion: runtime.Version(),
		Date:      now.UTC().Format(time.RFC3339),
		Server:    server,
	}
}

// cpuModel reads the first "model name" of a Linux cpuinfo file; elsewhere
// it is "unknown".
func cpuModel(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(name) == "model name" {
			return strings.TrimSpace(value)
		}
	}
	return "unknown"
}

// runSettings is the part of the settings a reader needs to repeat a run.
type runSettings struct {
	RunID        string  `json:"run_id"`
	Concurrency  int     `json:"concurrency"`
	DurationSec  float64 `json:"duration_seconds"`
	WarmupSec    float64 `json:"warmup_seconds"`
	Customers    int     `json:"customers"`
	Seed         int64   `json:"seed"`
	Meter        string  `json:"meter"`
	UsageBatch   int     `json:"usage_batch"`
	WebhookType  string  `json:"webhook_type"`
	BaselineNote string  `json:"baseline"`
}

// verifyReport is what GET /v1/admin/verify answered after the load.
type verifyReport struct {
	Checked  bool   `json:"checked"` // false: no -admin-key, or the call failed
	OK       bool   `json:"ok"`
	Summary  string `json:"summary"`
	Problems []any  `json:"problems,omitempty"`
}

type report struct {
	Machine   machine          `json:"machine"`
	Settings  runSettings      `json:"settings"`
	Scenarios []scenarioResult `json:"scenarios"`
	Verify    verifyReport     `json:"verify"`
}

func (r report) writeJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func (r report) writeText(w io.Writer) error {
	m, s := r.Machine, r.Settings
	var b strings.Builder
	fmt.Fprintf(&b, "tally-bench %s against %s\n", m.Date, m.Server)
	fmt.Fprintf(&b, "machine: %d CPUs, %s, %s/%s, %s (the tool, the server and PostgreSQL share it)\n",
		m.CPUs, m.CPUModel, m.OS, m.Arch, m.GoVersion)
	fmt.Fprintf(&b, "run %s: concurrency %d, %gs measured after %gs warmup per scenario, %d customers, seed %d\n",
		s.RunID, s.Concurrency, s.DurationSec, s.WarmupSec, s.Customers, s.Seed)
	fmt.Fprintf(&b, "baseline: %s\n\n", s.BaselineNote)

	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tstatus\trequests\terrors\treq/s\tp50 ms\tp95 ms\tp99 ms\tthroughput vs sql\tp50 vs sql\t")
	for _, sc := range r.Scenarios {
		thr, p50 := "", ""
		if sc.Baseline != "" {
			thr, p50 = fmt.Sprintf("%.2fx", sc.ThroughputRatio), fmt.Sprintf("%.2fx", sc.P50Ratio)
		}
		if sc.Requests == 0 { // setup failed: nothing was measured
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\t-\t-\t\t\t\n", sc.Name, sc.Status)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.1f\t%.2f\t%.2f\t%.2f\t%s\t%s\t\n",
			sc.Name, sc.Status, sc.Requests, sc.Errors, sc.Throughput, sc.P50Ms, sc.P95Ms, sc.P99Ms, thr, p50)
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	b.WriteString("\n")
	for _, sc := range r.Scenarios {
		fmt.Fprintf(&b, "%s: %s\n", sc.Name, sc.What)
		if sc.Failure != "" {
			fmt.Fprintf(&b, "  FAILED: %s\n", sc.Failure)
		}
		if sc.Insufficient > 0 {
			fmt.Fprintf(&b, "  %d answers were 402 insufficient_credits (not counted as errors)\n", sc.Insufficient)
		}
		for _, label := range slices.Sorted(maps.Keys(sc.ErrorsByKind)) {
			fmt.Fprintf(&b, "  error %s: %d", label, sc.ErrorsByKind[label])
			if ex := sc.ErrorExamples[label]; ex != "" {
				fmt.Fprintf(&b, " (e.g. %s)", ex)
			}
			b.WriteString("\n")
		}
		for _, tag := range slices.Sorted(maps.Keys(sc.Answers)) {
			fmt.Fprintf(&b, "  %s: %d\n", tag, sc.Answers[tag])
		}
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "verify: %s\n", r.Verify.Summary)
	_, err := io.WriteString(w, b.String())
	return err
}
