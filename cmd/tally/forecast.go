package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tallybilling/tally/internal/forecast"
)

// forecastCmd is `tally forecast`: the consumption forecast of every
// customer of a CSV file, or with `backtest` first, the model's accuracy
// on the file's past against two baselines. It needs no database.
func forecastCmd(ctx context.Context, args []string, env environment) error {
	if len(args) > 0 && args[0] == "backtest" {
		return forecastBacktestCmd(ctx, args[1:], env)
	}
	fs := newFlags("forecast", "Forecast each customer's daily consumption for the N days after its last date, from CSV rows\ncustomer_id,date,consumed (dates YYYY-MM-DD, a missing day is 0). No database needed.\n'tally forecast backtest --help' shows the backtest.", env)
	input := fs.String("input", "", "the CSV file (/dev/stdin to read a pipe) (required)")
	horizon := fs.Int("horizon", 30, fmt.Sprintf("days to forecast, 1 to %d", forecast.MaxHorizon))
	format := fs.String("format", "text", "text or json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := checkForecastFlags(fs.Args(), *input, *horizon, *format); err != nil {
		fs.Usage()
		return fmt.Errorf("forecast: %w", err)
	}
	customers, err := readForecastInput(*input)
	if err != nil {
		return fmt.Errorf("forecast: %w", err)
	}
	out := forecastOutput{Forecasts: make([]customerForecast, 0, len(customers))}
	for _, c := range customers {
		f, err := forecast.Predict(c.History, *horizon)
		if err != nil {
			return fmt.Errorf("forecast: customer %q: %w", c.CustomerID, err)
		}
		out.Forecasts = append(out.Forecasts, toCustomerForecast(c, f))
	}
	if *format == "json" {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	return printForecasts(env.stdout, customers, out)
}

func checkForecastFlags(extra []string, input string, horizon int, format string) error {
	var problems []string
	if len(extra) > 0 {
		problems = append(problems, fmt.Sprintf("unexpected arguments %q", extra))
	}
	if input == "" {
		problems = append(problems, "--input is required")
	}
	if horizon < 1 || horizon > forecast.MaxHorizon {
		problems = append(problems, fmt.Sprintf("--horizon %d is not between 1 and %d", horizon, forecast.MaxHorizon))
	}
	if format != "text" && format != "json" {
		problems = append(problems, fmt.Sprintf("--format %q is not text or json", format))
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

func readForecastInput(path string) ([]forecast.CustomerHistory, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	customers, err := forecast.ReadCSV(f)
	if err != nil {
		return nil, fmt.Errorf("%s:\n%w", path, err)
	}
	return customers, nil
}

// forecastOutput is what `tally forecast --format json` prints.
type forecastOutput struct {
	Forecasts []customerForecast `json:"forecasts"`
}

type customerForecast struct {
	CustomerID  string        `json:"customer_id"`
	Model       string        `json:"model"`
	HistoryDays int           `json:"history_days"`
	Daily       []forecastDay `json:"daily"`
	// Total is the consumption over the whole horizon: its expected value
	// and 80% interval (not the sum of the days' bounds).
	Total forecastBand `json:"total"`
}

type forecastDay struct {
	Date string `json:"date"`
	forecastBand
}

type forecastBand struct {
	Expected credits2 `json:"expected"`
	Low      credits2 `json:"low"`
	High     credits2 `json:"high"`
}

// credits2 is a number of credits printed with at most two decimals: a
// forecast is not more precise than that, and a reader wants 12.5, not
// 12.499999999.
type credits2 float64

func (c credits2) MarshalJSON() ([]byte, error) {
	return strconv.AppendFloat(nil, math.Round(float64(c)*100)/100, 'f', -1, 64), nil
}

func (c credits2) String() string { return strconv.FormatFloat(float64(c), 'f', 2, 64) }

func toCustomerForecast(c forecast.CustomerHistory, f forecast.Forecast) customerForecast {
	out := customerForecast{CustomerID: c.CustomerID, Model: f.Model, HistoryDays: f.HistoryDays, Daily: make([]forecastDay, len(f.Daily))}
	for i, d := range f.Daily {
		out.Daily[i] = forecastDay{Date: d.Date.Format(time.DateOnly), forecastBand: forecastBand{credits2(d.Expected), credits2(d.Low), credits2(d.High)}}
	}
	last := f.Cumulative[len(f.Cumulative)-1]
	out.Total = forecastBand{credits2(last.Expected), credits2(last.Low), credits2(last.High)}
	return out
}

func printForecasts(w io.Writer, customers []forecast.CustomerHistory, out forecastOutput) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	for i, f := range out.Forecasts {
		if i > 0 {
			fmt.Fprintln(tw)
		}
		h := customers[i].History
		fmt.Fprintf(tw, "customer %s: model %s, %d days of history (%s to %s)\n", f.CustomerID, f.Model, f.HistoryDays,
			h.Start.Format(time.DateOnly), h.Last().Format(time.DateOnly))
		fmt.Fprintln(tw, "date\texpected\tlow (10%)\thigh (90%)\t")
		for _, d := range f.Daily {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", d.Date, d.Expected, d.Low, d.High)
		}
		fmt.Fprintf(tw, "total of %d days\t%s\t%s\t%s\t\n", len(f.Daily), f.Total.Expected, f.Total.Low, f.Total.High)
	}
	return tw.Flush()
}

func forecastBacktestCmd(_ context.Context, args []string, env environment) error {
	fs := newFlags("forecast backtest", "Replay each customer's past: forecast from rolling origins and score the model and two baselines\n(the mean of the last 7 days; the same weekday last week) by MASE, pinball loss at 10% and 90%\nand the coverage of the 80% interval. README.md and BENCHMARKS.md define each figure.", env)
	input := fs.String("input", "", "the CSV file (/dev/stdin to read a pipe) (required)")
	horizon := fs.Int("horizon", 14, fmt.Sprintf("days forecast from each origin, 1 to %d", forecast.MaxHorizon))
	format := fs.String("format", "text", "text or json")
	minHistory := fs.Int("min-history", 3, "the first origin is after this many days of a customer's history")
	step := fs.Int("step", 7, "days between origins")
	origins := fs.Int("origins", 12, "keep the last this many origins of each customer (0 for all)")
	groupSep := fs.String("group-sep", "", "also report per group: the part of the customer id before this separator (the series set uses /)")
	perCustomer := fs.Bool("per-customer", false, "also report every customer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	err := checkForecastFlags(fs.Args(), *input, *horizon, *format)
	if err == nil && (*minHistory < 1 || *step < 1 || *origins < 0) {
		err = errors.New("--min-history and --step must be at least 1, --origins at least 0")
	}
	if err != nil {
		fs.Usage()
		return fmt.Errorf("forecast backtest: %w", err)
	}
	customers, err := readForecastInput(*input)
	if err != nil {
		return fmt.Errorf("forecast backtest: %w", err)
	}
	opts := forecast.BacktestOptions{Horizon: *horizon, MinHistory: *minHistory, Step: *step, Origins: *origins}
	if *origins == 0 {
		opts.Origins = -1
	}
	results := make([]forecast.SeriesResult, 0, len(customers))
	for _, c := range customers {
		r, err := forecast.Backtest(c.CustomerID, c.History, opts)
		if err != nil {
			return fmt.Errorf("forecast backtest: customer %q: %w", c.CustomerID, err)
		}
		results = append(results, r)
	}
	rep := buildBacktestReport(results, *horizon, *groupSep, *perCustomer)
	if *format == "json" {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return printBacktestReport(env.stdout, rep)
}

// backtestReport is what `tally forecast backtest --format json` prints.
type backtestReport struct {
	Horizon   int             `json:"horizon_days"`
	Customers int             `json:"customers"`
	Origins   int             `json:"origins"`
	Overall   backtestGroup   `json:"overall"`
	Groups    []backtestGroup `json:"groups,omitempty"`
	PerCust   []backtestGroup `json:"per_customer,omitempty"`
	Targets   backtestTargets `json:"targets"`
}

type backtestGroup struct {
	Name string `json:"name"`
	// Series is how many customers were scored (an idle one is not).
	Series  int              `json:"series"`
	Origins int              `json:"origins"`
	Methods []backtestScores `json:"methods"`
	// MASERatio is the model's MASE over the better baseline's.
	MASERatio float64 `json:"mase_ratio"`
	// TotalCoverage is the share of origins whose actual total over the
	// horizon lay in the model's 80% interval of the total.
	TotalCoverage float64        `json:"total_coverage"`
	Models        map[string]int `json:"models"`
}

type backtestScores struct {
	Method    string  `json:"method"`
	MASE      float64 `json:"mase"`
	Bias      float64 `json:"bias"`
	Pinball10 float64 `json:"pinball_10"`
	Pinball90 float64 `json:"pinball_90"`
	Coverage  float64 `json:"coverage_80"`
}

type backtestTargets struct {
	MASERatioMax float64 `json:"mase_ratio_max"`
	CoverageMin  float64 `json:"coverage_min"`
	CoverageMax  float64 `json:"coverage_max"`
	Met          bool    `json:"met"`
}

// The targets the model is held to over a varied set of series.
const (
	targetMASERatio   = 0.9
	targetCoverageMin = 0.7
	targetCoverageMax = 0.9
)

func buildBacktestReport(results []forecast.SeriesResult, horizon int, groupSep string, perCustomer bool) backtestReport {
	rep := backtestReport{Horizon: horizon, Customers: len(results), Overall: summariseGroup("all", results)}
	rep.Origins = rep.Overall.Origins
	if groupSep != "" {
		var names []string
		byName := map[string][]forecast.SeriesResult{}
		for _, r := range results {
			name, _, _ := strings.Cut(r.ID, groupSep)
			if _, ok := byName[name]; !ok {
				names = append(names, name)
			}
			byName[name] = append(byName[name], r)
		}
		for _, name := range names {
			rep.Groups = append(rep.Groups, summariseGroup(name, byName[name]))
		}
	}
	if perCustomer {
		for _, r := range results {
			rep.PerCust = append(rep.PerCust, summariseGroup(r.ID, []forecast.SeriesResult{r}))
		}
	}
	cov := rep.Overall.Methods[0].Coverage
	rep.Targets = backtestTargets{MASERatioMax: targetMASERatio, CoverageMin: targetCoverageMin, CoverageMax: targetCoverageMax,
		Met: rep.Overall.Series > 0 && rep.Overall.MASERatio <= targetMASERatio && cov >= targetCoverageMin && cov <= targetCoverageMax}
	return rep
}

func summariseGroup(name string, results []forecast.SeriesResult) backtestGroup {
	scores, n := forecast.Aggregate(results)
	g := backtestGroup{Name: name, Series: n, Models: map[string]int{}}
	var totalCov float64
	for _, r := range results {
		g.Origins += r.Scored
		for m, k := range r.Models {
			g.Models[m] += k
		}
		if r.Scored > 0 {
			totalCov += r.TotalCoverage
		}
	}
	if n > 0 {
		g.TotalCoverage = totalCov / float64(n)
	}
	for i, m := range forecast.Methods {
		s := scores[i]
		g.Methods = append(g.Methods, backtestScores{Method: m, MASE: s.MASE, Bias: s.Bias, Pinball10: s.Pinball10, Pinball90: s.Pinball90, Coverage: s.Coverage})
	}
	if better := min(scores[1].MASE, scores[2].MASE); better > 0 {
		g.MASERatio = scores[0].MASE / better
	}
	return g
}

func printBacktestReport(w io.Writer, rep backtestReport) error {
	fmt.Fprintf(w, "backtest: %d customers, %d scored, %d origins, horizon %d days\n\n", rep.Customers, rep.Overall.Series, rep.Origins, rep.Horizon)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "group\tseries\tmethod\tMASE\tbias\tpinball 10%\tpinball 90%\tcoverage 80%\tvs better baseline\ttotal coverage")
	printGroup := func(g backtestGroup) {
		if g.Series == 0 {
			fmt.Fprintf(tw, "%s\t0\tnot scored: no origin with a scale (idle all along)\n", g.Name)
			return
		}
		for i, m := range g.Methods {
			name, series, ratio, total := "", "", "", ""
			if i == 0 {
				name, series = g.Name, strconv.Itoa(g.Series)
				ratio = fmt.Sprintf("%.2f", g.MASERatio)
				total = fmt.Sprintf("%.1f%%", 100*g.TotalCoverage)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%.3f\t%+.3f\t%.3f\t%.3f\t%.1f%%\t%s\t%s\n", name, series, m.Method, m.MASE, m.Bias, m.Pinball10, m.Pinball90, 100*m.Coverage, ratio, total)
		}
	}
	printGroup(rep.Overall)
	for _, g := range rep.Groups {
		printGroup(g)
	}
	for _, g := range rep.PerCust {
		printGroup(g)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	models := make([]string, 0, len(rep.Overall.Models))
	for m, k := range rep.Overall.Models {
		models = append(models, fmt.Sprintf("%s %d", m, k))
	}
	slices.Sort(models)
	fmt.Fprintf(w, "\nmodels used at the origins: %s\n", strings.Join(models, ", "))
	verdict := "MISSED"
	if rep.Targets.Met {
		verdict = "met"
	}
	fmt.Fprintf(w, "targets (MASE at most %.2f of the better baseline, coverage %.0f%% to %.0f%%): %s (%.2f, %.1f%%)\n",
		rep.Targets.MASERatioMax, 100*rep.Targets.CoverageMin, 100*rep.Targets.CoverageMax, verdict,
		rep.Overall.MASERatio, 100*rep.Overall.Methods[0].Coverage)
	return nil
}
