package forecast

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/tallybilling/tally/internal/text"
)

// CustomerHistory is one customer's history, as read from the CSV.
type CustomerHistory struct {
	CustomerID string
	History    History
}

// maxCSVErrors is how many bad rows ReadCSV reports before it stops
// reading: enough to see a pattern, not a wall of text for a wrong file.
const maxCSVErrors = 10

// ReadCSV reads daily consumption as CSV rows customer_id,date,consumed:
// dates YYYY-MM-DD, consumed a number not negative (12, 12.5). A first
// row reading customer_id,date,consumed is a header; blank lines are
// skipped. Rows may come in any order; each customer's history runs from
// its first date to its last, a day without a row being 0.
//
// A customer-day given twice is an error, not a sum: the rows are meant
// to be a daily rollup, one per customer and day, and a file with
// repeated rows is far more often two exports concatenated than usage
// split on purpose, which summing would silently double.
//
// Every error names its line; up to 10 are reported together.
// Customers come out in the order of their first row.
func ReadCSV(r io.Reader) ([]CustomerHistory, error) {
	cr := csv.NewReader(r)
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = true
	type rowAt struct {
		total DayTotal
		line  int
	}
	var (
		order []string
		rows  = map[string][]rowAt{}
		seen  = map[string]map[time.Time]int{} // customer, day -> line
		bad   []error
	)
	fail := func(line int, format string, args ...any) {
		bad = append(bad, fmt.Errorf("line %d: %s", line, fmt.Sprintf(format, args...)))
	}
	for first := true; len(bad) < maxCSVErrors; first = false {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			var pe *csv.ParseError
			if errors.As(err, &pe) {
				// The CSV's own syntax (a stray quote): the rest of the file
				// cannot be trusted to be split into the right rows.
				bad = append(bad, fmt.Errorf("line %d: %v", pe.Line, pe.Err))
				break
			}
			return nil, err
		}
		line, _ := cr.FieldPos(0)
		if first && isHeader(rec) {
			continue
		}
		if len(rec) != 3 {
			fail(line, "want 3 fields (customer_id,date,consumed), got %d", len(rec))
			continue
		}
		id, dateText, consumedText := strings.TrimSpace(rec[0]), strings.TrimSpace(rec[1]), strings.TrimSpace(rec[2])
		if id == "" {
			fail(line, "customer_id is empty")
			continue
		}
		if err := text.Check(id); err != nil {
			fail(line, "customer_id %s", err)
			continue
		}
		date, err := time.Parse(time.DateOnly, dateText)
		if err != nil {
			fail(line, "date %q is not a date as YYYY-MM-DD", dateText)
			continue
		}
		consumed, err := parseConsumed(consumedText)
		if err != nil {
			fail(line, "consumed %q %v", consumedText, err)
			continue
		}
		days := seen[id]
		if days == nil {
			days = map[time.Time]int{}
			seen[id] = days
			order = append(order, id)
		}
		if prev, dup := days[date]; dup {
			fail(line, "customer %q has a row for %s already, on line %d (one row per customer and day)", id, dateText, prev)
			continue
		}
		days[date] = line
		rows[id] = append(rows[id], rowAt{DayTotal{Date: date, Consumed: consumed}, line})
	}
	if len(bad) > 0 {
		if len(bad) == maxCSVErrors {
			bad = append(bad, fmt.Errorf("stopped after %d bad rows", maxCSVErrors))
		}
		return nil, errors.Join(bad...)
	}
	out := make([]CustomerHistory, 0, len(order))
	for _, id := range order {
		totals := make([]DayTotal, len(rows[id]))
		for i, r := range rows[id] {
			totals[i] = r.total
		}
		h, err := HistoryFromDays(totals, time.Time{}, time.Time{})
		if err != nil {
			return nil, fmt.Errorf("customer %q (first row on line %d): %w", id, rows[id][0].line, err)
		}
		out = append(out, CustomerHistory{CustomerID: id, History: h})
	}
	return out, nil
}

func isHeader(rec []string) bool {
	want := []string{"customer_id", "date", "consumed"}
	if len(rec) != len(want) {
		return false
	}
	for i, f := range rec {
		if !strings.EqualFold(strings.TrimSpace(f), want[i]) {
			return false
		}
	}
	return true
}

// parseConsumed reads a plain decimal number: digits, at most one point.
// No sign, exponent, NaN or infinity: a rollup never writes them, and a
// file that has them is not the file meant.
func parseConsumed(s string) (float64, error) {
	digits, points := 0, 0
	for _, c := range s {
		switch {
		case c >= '0' && c <= '9':
			digits++
		case c == '.':
			points++
		case c == '-':
			return 0, errors.New("is negative; consumption is never below 0")
		default:
			return 0, errors.New("is not a number such as 12 or 12.5")
		}
	}
	if digits == 0 || points > 1 {
		return 0, errors.New("is not a number such as 12 or 12.5")
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, errors.New("is out of range")
	}
	return v, nil
}
