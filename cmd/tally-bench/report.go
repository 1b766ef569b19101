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
	statusOK      = "ok"      // every request succeeded (402 aside, where allowed)
	statusErrors  = "errors"  // some requests failed
	statusFailed  = "failed"  // setup failed, no request succeeded, or none was measured
	statusSkipped = "skipped" // the server has no such endpoint yet
)

// Units of a scenario's Rate, where one operation is not the thing counted.
const (
	unitCredited = "credited/s" // payments credited exactly once
	unitEvents   = "events/s"   // usage events accepted
)

// scenarioResult is one row of the report.
type scenarioResult struct {
	Name          string            `json:"name"`
	Kind          string            `json:"kind"` // http or sql
	What          string            `json:"what"`
	Status        string            `json:"status"`
	Failure       string            `json:"failure,omitempty"`
	Requests      int64             `json:"requests"`
	OK            int64             `json:"ok"`
	Insufficient  int64             `json:"insufficient_402"`
	Errors        int64             `json:"errors"`
	ErrorsByKind  map[string]int64  `json:"errors_by_kind,omitempty"`
	ErrorExamples map[string]string `json:"error_examples,omitempty"`
	Answers       map[string]int64  `json:"answers,omitempty"`
	Throughput    float64           `json:"throughput_per_second"`
	P50Ms         float64           `json:"p50_ms"`
	P95Ms         float64           `json:"p95_ms"`
	P99Ms         float64           `json:"p99_ms"`
	// Rate counts what the scenario is about when that is not the
	// operation itself (events accepted, payments credited), in RateUnit.
	Rate            float64 `json:"rate_per_second,omitempty"`
	RateUnit        string  `json:"rate_unit,omitempty"`
	Baseline        string  `json:"baseline,omitempty"`
	ThroughputRatio float64 `json:"throughput_ratio,omitempty"`
	P50Ratio        float64 `json:"p50_ratio,omitempty"`
	// CPU is where the CPU of the measured window went (-cpu).
	CPU *cpuUse `json:"cpu,omitempty"`
}

// cpuPerOp divides the window's CPU by what the scenario counts: its
// rate's unit (events accepted, payments credited) where it has one, else
// its requests.
func (r *scenarioResult) cpuPerOp(duration time.Duration) {
	n := float64(r.Requests)
	if r.RateUnit != "" {
		n = r.Rate * duration.Seconds()
	}
	r.CPU.perOp(n)
}

// cpuUnit names what one CPU figure of sc is per.
func (r scenarioResult) cpuUnit() string {
	switch r.RateUnit {
	case unitEvents:
		return "event"
	case unitCredited:
		return "payment credited"
	}
	return "operation"
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
		CPU:           r.cpu,
		Throughput:    r.throughput(),
		P50Ms:         ms(percentile(r.latencies, 50)),
		P95Ms:         ms(percentile(r.latencies, 95)),
		P99Ms:         ms(percentile(r.latencies, 99)),
	}
	switch {
	case res.Requests == 0:
		// Every worker was inside an operation begun in the warmup when
		// the window closed: a stall longer than the window, not a refusal.
		res.Status = statusFailed
		res.Failure = fmt.Sprintf("no request started inside the %s measured window (the ones begun before it outlasted it)", r.elapsed)
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

// skippedScenario is a scenario the server cannot serve yet; it is no
// failure of the run.
func skippedScenario(name, what, why string) scenarioResult {
	return scenarioResult{Name: name, Kind: "http", What: what, Status: statusSkipped, Failure: why}
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
	// LoadAvg is /proc/loadavg's 1, 5 and 15 minute averages when the run
	// began and when it ended: other work on the machine shows there.
	LoadAvgStart string `json:"load_average_start"`
	LoadAvgEnd   string `json:"load_average_end"`
}

func describeMachine(server string, now time.Time) machine {
	return machine{
		CPUs:         runtime.NumCPU(),
		CPUModel:     cpuModel("/proc/cpuinfo"),
		OS:           runtime.GOOS,
		Arch:         runtime.GOARCH,
		GoVersion:    runtime.Version(),
		Date:         now.UTC().Format(time.RFC3339),
		Server:       server,
		LoadAvgStart: loadAverage("/proc/loadavg"),
	}
}

// loadAverage reads the three load averages of a Linux loadavg file;
// elsewhere it is "unknown".
func loadAverage(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "unknown"
	}
	fields := strings.Fields(string(data))
	if len(fields) < 3 {
		return "unknown"
	}
	return strings.Join(fields[:3], " ")
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
	RandSeed     int64   `json:"rand_seed"`
	Meter        string  `json:"meter"`
	UsageBatch   int     `json:"usage_batch"`
	WebhookType  string  `json:"webhook_type,omitempty"`
	Verify       string  `json:"verify"`
	BaselineNote string  `json:"baseline"`
}

// verifyReport is what GET /v1/admin/verify answered after the load.
type verifyReport struct {
	// How is where the check ran: GET /v1/admin/verify, or the project's
	// verify in this process on -db.
	How      string `json:"how"`
	Checked  bool   `json:"checked"` // false: not asked for, or it could not run
	OK       bool   `json:"ok"`
	Summary  string `json:"summary"`
	Problems []any  `json:"problems,omitempty"`
}

type report struct {
	Machine   machine          `json:"machine"`
	Settings  runSettings      `json:"settings"`
	Scenarios []scenarioResult `json:"scenarios"`
	Targets   []targetResult   `json:"targets"`
	Verify    verifyReport     `json:"verify"`
}

// find is the scenario of that name measured so far, or nil.
func (r *report) find(name string) *scenarioResult {
	for i := range r.Scenarios {
		if r.Scenarios[i].Name == name {
			return &r.Scenarios[i]
		}
	}
	return nil
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
	fmt.Fprintf(&b, "load average (1 5 15 min): %s at the start, %s at the end\n", m.LoadAvgStart, m.LoadAvgEnd)
	fmt.Fprintf(&b, "run %s: %d workers, %gs measured after %gs warmup per scenario, %d customers, usage batch %d, rand seed %d\n",
		s.RunID, s.Concurrency, s.DurationSec, s.WarmupSec, s.Customers, s.UsageBatch, s.RandSeed)
	fmt.Fprintf(&b, "baseline: %s\n\n", s.BaselineNote)

	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tstatus\tops\terrors\tops/s\tp50 ms\tp95 ms\tp99 ms\tvs sql (ops/s)\tvs sql (p50)\trate\t")
	for _, sc := range r.Scenarios {
		thr, p50, rate := "", "", ""
		if sc.Baseline != "" {
			thr, p50 = fmt.Sprintf("%.2fx", sc.ThroughputRatio), fmt.Sprintf("%.2fx", sc.P50Ratio)
		}
		if sc.RateUnit != "" {
			rate = thousands(sc.Rate) + " " + sc.RateUnit
		}
		if sc.Requests == 0 { // skipped, or setup failed: nothing was measured
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\t-\t-\t\t\t\t\n", sc.Name, sc.Status)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%.1f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\t\n",
			sc.Name, sc.Status, sc.Requests, sc.Errors, sc.Throughput, sc.P50Ms, sc.P95Ms, sc.P99Ms, thr, p50, rate)
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	b.WriteString("\n")
	for _, sc := range r.Scenarios {
		fmt.Fprintf(&b, "%s: %s\n", sc.Name, sc.What)
		switch {
		case sc.Status == statusSkipped:
			fmt.Fprintf(&b, "  SKIPPED: %s\n", sc.Failure)
		case sc.Failure != "":
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
		if sc.CPU != nil {
			fmt.Fprintf(&b, "  cpu: %s\n", sc.CPU.String(sc.cpuUnit()))
		}
	}

	fmt.Fprintf(&b, "\ntargets (a ratio compares with the baseline of the same run; only a clean scenario can pass):\n")
	for _, t := range r.Targets {
		fmt.Fprintf(&b, "  %-12s %s: %s\n", t.Verdict, t.Target, t.Detail)
	}
	fmt.Fprintf(&b, "\nverify (the invariant check, run after the load, %s): %s\n", r.Verify.How, r.Verify.Summary)
	_, err := io.WriteString(w, b.String())
	return err
}
