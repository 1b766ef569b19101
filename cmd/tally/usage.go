package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/httpapi"
	"github.com/tallybilling/tally/internal/metering"
)

// usageCmd is `tally usage import|compare`: moving usage history from a
// legacy system, straight against the database (no HTTP body limit).
func usageCmd(ctx context.Context, args []string, env environment) error {
	if len(args) == 0 {
		fmt.Fprintln(env.stderr, "usage: tally usage import FILE|- [--format csv|ndjson] [--dry-run] [--json]\n       tally usage compare --legacy totals.csv --meter M --from T --to T [--json]")
		return errors.New("usage: a subcommand is required (import or compare)")
	}
	switch args[0] {
	case "import":
		return usageImport(ctx, args[1:], env)
	case "compare":
		return usageCompare(ctx, args[1:], env)
	}
	return fmt.Errorf("usage: unknown subcommand %q (import or compare)", args[0])
}

func usageImport(ctx context.Context, args []string, env environment) error {
	fs := newFlags("usage import", "Import usage history from FILE (or - for stdin): CSV with the header\n"+metering.ImportCSVHeader+
		", or NDJSON. Rows older than Stripe accepts are stored as historical\n(counted, never sent); newer ones are queued for Stripe. Importing a file again changes nothing;\nan interrupted import resumes by running it again. Exits 2 when any row was rejected or conflicted.", env)
	format := fs.String("format", "", "csv or ndjson (default: from the file name's extension, else csv)")
	dry := fs.Bool("dry-run", false, "check and classify every row, store nothing")
	asJSON := fs.Bool("json", false, "print the summary as JSON (the body of POST /v1/admin/usage-imports)")
	// Flags may follow the file name.
	var file string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") || (len(args) > 0 && args[0] == "-") {
		file, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if file == "" && fs.NArg() == 1 {
		file = fs.Arg(0)
	} else if fs.NArg() > 0 || file == "" {
		fs.Usage()
		return errors.New("usage import: one FILE (or -) is required")
	}
	f := ImportFormatFor(*format, file)
	if f == "" {
		return fmt.Errorf("usage import: --format %q is not csv or ndjson", *format)
	}
	var in io.Reader = env.stdin
	var size int64 = -1
	if file != "-" {
		fh, err := os.Open(file)
		if err != nil {
			return err
		}
		defer fh.Close()
		if st, err := fh.Stat(); err == nil && st.Mode().IsRegular() {
			size = st.Size()
		}
		in = fh
	}
	if in == nil {
		return errors.New("usage import: no standard input")
	}
	cfg, logger, gdb, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer db.Close(gdb)
	svc := metering.New(metering.Options{DB: gdb, Catalog: cfg.Catalog, Logger: logger, UsageRetention: cfg.Retention.UsageEvents})
	bar := newProgressBar(env.stderr, size)
	start := time.Now()
	sum, err := svc.Import(ctx, in, metering.ImportOptions{Format: f, DryRun: *dry, Progress: bar.update})
	bar.done()
	if err != nil {
		return fmt.Errorf("usage import stopped after %d rows (%d accepted; run it again to resume): %w", sum.Read, sum.Accepted, err)
	}
	if *asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(httpapi.ToImportSummary(sum)); err != nil {
			return err
		}
	} else {
		elapsed := time.Since(start)
		verb := "imported"
		if *dry {
			verb = "checked (dry run, nothing stored)"
		}
		fmt.Fprintf(env.stdout, "%s %d rows in %s (%.0f rows/s): %d accepted (%d historical, %d queued for Stripe), %d duplicates, %d conflicts, %d rejected\n",
			verb, sum.Read, elapsed.Round(time.Millisecond), float64(sum.Read)/max(elapsed.Seconds(), 1e-9),
			sum.Accepted, sum.Historical, sum.Queued, sum.Duplicates, sum.Conflicts, sum.Rejected)
		for _, e := range sum.Errors {
			fmt.Fprintf(env.stdout, "line %d: %s: %s\n", e.Line, e.Code, e.Detail)
		}
	}
	if sum.Rejected+sum.Conflicts > 0 {
		return exitError{code: 2, err: fmt.Errorf("%d rows rejected, %d conflicting", sum.Rejected, sum.Conflicts)}
	}
	return nil
}

// ImportFormatFor is the format flag, or the file's extension's.
func ImportFormatFor(flag, file string) metering.ImportFormat {
	switch strings.ToLower(flag) {
	case "csv":
		return metering.ImportCSV
	case "ndjson", "jsonl":
		return metering.ImportNDJSON
	case "":
		if strings.HasSuffix(file, ".ndjson") || strings.HasSuffix(file, ".jsonl") {
			return metering.ImportNDJSON
		}
		return metering.ImportCSV
	}
	return ""
}

// progressBar draws the import's progress on a terminal, at most ten times
// a second; elsewhere (a pipe, a log file) it draws nothing.
type progressBar struct {
	w    io.Writer
	on   bool
	size int64
	last time.Time
	t0   time.Time
}

func newProgressBar(w io.Writer, size int64) *progressBar {
	b := &progressBar{w: w, size: size, t0: time.Now()}
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			b.on = true
		}
	}
	return b
}

func (b *progressBar) update(bytesRead, rows int64) {
	if !b.on || time.Since(b.last) < 100*time.Millisecond {
		return
	}
	b.last = time.Now()
	rate := float64(rows) / max(time.Since(b.t0).Seconds(), 1e-9)
	if b.size > 0 {
		frac := min(float64(bytesRead)/float64(b.size), 1)
		const width = 30
		n := int(frac * width)
		fmt.Fprintf(b.w, "\r[%s%s] %3.0f%%  %d rows  %.0f rows/s ", strings.Repeat("#", n), strings.Repeat(".", width-n), frac*100, rows, rate)
		return
	}
	fmt.Fprintf(b.w, "\r%d rows  %.0f rows/s ", rows, rate)
}

func (b *progressBar) done() {
	if b.on && !b.last.IsZero() {
		fmt.Fprintln(b.w)
	}
}

func usageCompare(ctx context.Context, args []string, env environment) error {
	fs := newFlags("usage compare", "Compare tally's totals on a meter with a legacy system's, per customer. --legacy is a CSV with\nthe header customer_id,total. Exits 2 when any customer differs.", env)
	legacyFile := fs.String("legacy", "", "the legacy totals, CSV customer_id,total (required)")
	meter := fs.String("meter", "", "the meter event name (required)")
	fromFlag := fs.String("from", "", "window start, RFC 3339 (required)")
	toFlag := fs.String("to", "", "window end, RFC 3339 (required)")
	asJSON := fs.Bool("json", false, "print the comparison as JSON (the body of POST /v1/admin/usage-comparisons)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *legacyFile == "" || *meter == "" || *fromFlag == "" || *toFlag == "" {
		fs.Usage()
		return errors.New("usage compare: --legacy, --meter, --from and --to are required")
	}
	from, err := time.Parse(time.RFC3339, *fromFlag)
	if err != nil {
		return fmt.Errorf("usage compare: --from: %w", err)
	}
	to, err := time.Parse(time.RFC3339, *toFlag)
	if err != nil {
		return fmt.Errorf("usage compare: --to: %w", err)
	}
	legacy, err := readLegacyTotals(*legacyFile)
	if err != nil {
		return err
	}
	cfg, logger, gdb, err := connect(ctx, env)
	if err != nil {
		return err
	}
	defer db.Close(gdb)
	svc := metering.New(metering.Options{DB: gdb, Catalog: cfg.Catalog, Logger: logger, UsageRetention: cfg.Retention.UsageEvents})
	cmp, err := svc.Compare(ctx, *meter, from, to, legacy)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(httpapi.ToAPIComparison(cmp)); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(env.stdout, "meter %s, %s to %s: %d customers compared, %d differ\n", cmp.Meter,
			cmp.From.Format(time.RFC3339), cmp.To.Format(time.RFC3339), cmp.Compared, len(cmp.Mismatches))
		if len(cmp.Mismatches) > 0 {
			tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "CUSTOMER\tTALLY\tLEGACY\tDIFFERENCE")
			for _, m := range cmp.Mismatches {
				fmt.Fprintf(tw, "%s\t%d\t%d\t%+d\n", m.CustomerID, m.TallyTotal, m.LegacyTotal, m.Difference)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
	}
	if n := len(cmp.Mismatches); n > 0 {
		return exitError{code: 2, err: fmt.Errorf("%d of %d customers differ from the legacy totals", n, cmp.Compared)}
	}
	return nil
}

// readLegacyTotals reads a CSV customer_id,total (header first).
func readLegacyTotals(path string) ([]metering.LegacyTotal, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := csv.NewReader(f)
	r.FieldsPerRecord = 2
	header, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("usage compare: %s: %w", path, err)
	}
	if strings.TrimSpace(header[0]) != "customer_id" || strings.TrimSpace(header[1]) != "total" {
		return nil, fmt.Errorf("usage compare: %s: the header must be customer_id,total", path)
	}
	var out []metering.LegacyTotal
	for line := 2; ; line++ {
		rec, err := r.Read()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("usage compare: %s: %w", path, err)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(rec[1]), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("usage compare: %s line %d: total %q is not a whole number", path, line, rec[1])
		}
		out = append(out, metering.LegacyTotal{CustomerID: strings.TrimSpace(rec[0]), Total: n})
		if len(out) > metering.MaxLegacyTotals {
			return nil, fmt.Errorf("usage compare: %s: more than %d customers", path, metering.MaxLegacyTotals)
		}
	}
}
