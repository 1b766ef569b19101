package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/forecast/synth"
)

// runTally runs the real program with args and no environment, as the
// forecast commands need none.
func runTally(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err = run(context.Background(), append([]string{"tally"}, args...), func(string) string { return "" }, &out, &errOut)
	return out.String(), errOut.String(), err
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// usageCSV is eight weeks of a weekday customer and three days of a new
// one, rows out of order and with idle days left out.
func usageCSV() string {
	var b strings.Builder
	b.WriteString("customer_id,date,consumed\n")
	b.WriteString("newbie,2026-04-24,30\nnewbie,2026-04-22,25\nnewbie,2026-04-23,35\n")
	start := time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC) // a Monday
	for i := range 56 {
		d := start.AddDate(0, 0, i)
		if wd := d.Weekday(); wd == time.Saturday || wd == time.Sunday {
			continue // idle weekends: no row
		}
		b.WriteString("acme," + d.Format(time.DateOnly) + "," + []string{"95", "100", "105", "110", "90"}[i%5] + "\n")
	}
	return b.String()
}

// tally forecast --format json prints, per customer in the file's order,
// the model and one {date, expected, low, high} per day after the
// customer's own last date.
func TestForecastCommandJSON(t *testing.T) {
	t.Parallel()
	path := writeFile(t, "usage.csv", usageCSV())
	stdout, _, err := runTally(t, "forecast", "--input", path, "--horizon", "10", "--format", "json")
	if err != nil {
		t.Fatal(err)
	}
	var out struct {
		Forecasts []struct {
			CustomerID  string `json:"customer_id"`
			Model       string `json:"model"`
			HistoryDays int    `json:"history_days"`
			Daily       []struct {
				Date                string
				Expected, Low, High *float64
			} `json:"daily"`
			Total struct{ Expected, Low, High *float64 } `json:"total"`
		} `json:"forecasts"`
	}
	dec := json.NewDecoder(strings.NewReader(stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&out); err != nil {
		t.Fatalf("%v in\n%s", err, stdout)
	}
	if len(out.Forecasts) != 2 {
		t.Fatalf("%d forecasts", len(out.Forecasts))
	}
	for i, want := range []struct {
		id, firstDay, model string
		history             int
	}{
		{"newbie", "2026-04-25", "short_history", 3},
		{"acme", "2026-04-25", "ets_weekly_", 54}, // through Friday 2026-04-24
	} {
		f := out.Forecasts[i]
		if f.CustomerID != want.id || !strings.HasPrefix(f.Model, want.model) || f.HistoryDays != want.history {
			t.Errorf("forecast %d: %s, model %s, %d days; want %s, %s, %d", i, f.CustomerID, f.Model, f.HistoryDays, want.id, want.model, want.history)
		}
		if len(f.Daily) != 10 {
			t.Fatalf("%s: %d days", f.CustomerID, len(f.Daily))
		}
		day, _ := time.Parse(time.DateOnly, want.firstDay)
		for _, d := range f.Daily {
			if d.Date != day.Format(time.DateOnly) {
				t.Errorf("%s: day %s, want %s", f.CustomerID, d.Date, day.Format(time.DateOnly))
			}
			day = day.AddDate(0, 0, 1)
			if d.Expected == nil || d.Low == nil || d.High == nil || *d.Low < 0 || *d.Low > *d.Expected || *d.Expected > *d.High {
				t.Errorf("%s %s: not 0 <= low <= expected <= high", f.CustomerID, d.Date)
			}
		}
		if f.Total.Expected == nil || *f.Total.Low > *f.Total.Expected || *f.Total.Expected > *f.Total.High {
			t.Errorf("%s: total %+v", f.CustomerID, f.Total)
		}
	}
	// The weekday customer's weekend is forecast idle-ish, its weekdays not.
	acme := out.Forecasts[1].Daily
	if sat, mon := *acme[0].Expected, *acme[2].Expected; sat > 10 || mon < 80 {
		t.Errorf("acme: Saturday %.1f, Monday %.1f", sat, mon)
	}
}

func TestForecastCommandText(t *testing.T) {
	t.Parallel()
	path := writeFile(t, "usage.csv", usageCSV())
	stdout, _, err := runTally(t, "forecast", "--input", path, "--horizon", "3")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"customer newbie: model short_history, 3 days of history (2026-04-22 to 2026-04-24)",
		"customer acme: model ets_weekly_",
		"expected", "low (10%)", "high (90%)",
		"2026-04-25", "2026-04-27",
		"total of 3 days",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("the text does not say %q:\n%s", want, stdout)
		}
	}
}

// Bad input is an error naming the file and the line, printed nothing, and
// exits 1; bad flags say which.
func TestForecastCommandRefusesBadInput(t *testing.T) {
	t.Parallel()
	bad := writeFile(t, "bad.csv", "customer_id,date,consumed\nada,2026-03-02,1\nada,2026-03-32,1\nada,2026-03-04,-2\n")
	stdout, _, err := runTally(t, "forecast", "--input", bad)
	if err == nil || stdout != "" {
		t.Fatalf("bad rows: err %v, stdout %q", err, stdout)
	}
	for _, want := range []string{bad, "line 3: date \"2026-03-32\"", "line 4: consumed \"-2\" is negative"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
	if exitCode(err) != 1 {
		t.Errorf("exit code %d", exitCode(err))
	}
	good := writeFile(t, "good.csv", usageCSV())
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"forecast"}, "--input is required"},
		{[]string{"forecast", "--input", good, "--horizon", "0"}, "--horizon 0 is not between 1 and 366"},
		{[]string{"forecast", "--input", good, "--format", "xml"}, "--format \"xml\" is not text or json"},
		{[]string{"forecast", "--input", good, "extra"}, "unexpected arguments"},
		{[]string{"forecast", "--input", filepath.Join(t.TempDir(), "missing.csv")}, "no such file"},
		{[]string{"forecast", "backtest", "--input", good, "--step", "0"}, "--step must be at least 1"},
		{[]string{"forecast", "backtest", "--input", good, "--horizon", "400"}, "--horizon 400"},
	} {
		if _, _, err := runTally(t, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want %q", c.args, err, c.want)
		}
	}
}

// tally forecast backtest prints, for the model and both baselines, MASE,
// bias, pinball losses and coverage, overall and per group of ids.
func TestForecastBacktestCommand(t *testing.T) {
	t.Parallel()
	var picked []synth.Series
	for _, s := range synth.Set() {
		switch s.ID {
		case "weekly/02", "intermittent/01", "new-customer/01", "idle/01":
			picked = append(picked, s)
		}
	}
	var csv bytes.Buffer
	if err := synth.WriteCSV(&csv, picked); err != nil {
		t.Fatal(err)
	}
	path := writeFile(t, "set.csv", csv.String())

	stdout, _, err := runTally(t, "forecast", "backtest", "--input", path, "--horizon", "14", "--format", "json", "--group-sep", "/")
	if err != nil {
		t.Fatal(err)
	}
	var rep backtestReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Horizon != 14 || rep.Customers != 4 || rep.Overall.Series != 3 || rep.Origins == 0 {
		t.Errorf("horizon %d, %d customers, %d scored, %d origins", rep.Horizon, rep.Customers, rep.Overall.Series, rep.Origins)
	}
	var groups []string
	for _, g := range rep.Groups {
		groups = append(groups, g.Name)
	}
	if strings.Join(groups, ",") != "weekly,intermittent,new-customer,idle" {
		t.Errorf("groups %v", groups)
	}
	for _, g := range append([]backtestGroup{rep.Overall}, rep.Groups[:3]...) {
		if len(g.Methods) != 3 || g.Methods[0].Method != "model" || g.Methods[1].Method != "mean_last_7_days" || g.Methods[2].Method != "same_weekday_last_week" {
			t.Fatalf("%s: methods %+v", g.Name, g.Methods)
		}
		for _, m := range g.Methods {
			if m.MASE <= 0 || m.Pinball10 <= 0 || m.Pinball90 <= 0 || m.Coverage <= 0 || m.Coverage > 1 {
				t.Errorf("%s %s: %+v", g.Name, m.Method, m)
			}
		}
		if want := g.Methods[0].MASE / min(g.Methods[1].MASE, g.Methods[2].MASE); g.MASERatio != want {
			t.Errorf("%s: ratio %v, want %v", g.Name, g.MASERatio, want)
		}
	}
	if rep.Groups[3].Series != 0 {
		t.Errorf("the idle customer was scored")
	}
	if rep.Targets.MASERatioMax != 0.9 || rep.Targets.CoverageMin != 0.7 || rep.Targets.CoverageMax != 0.9 {
		t.Errorf("targets %+v", rep.Targets)
	}

	text, _, err := runTally(t, "forecast", "backtest", "--input", path, "--horizon", "7", "--group-sep", "/")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"backtest: 4 customers, 3 scored", "horizon 7 days", "MASE", "pinball 10%", "coverage 80%", "same_weekday_last_week", "targets (MASE at most 0.90",
		"idle          0       not scored"} {
		if !strings.Contains(text, want) {
			t.Errorf("the text does not say %q:\n%s", want, text)
		}
	}
}
