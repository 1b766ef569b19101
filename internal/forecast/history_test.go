package forecast

import (
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

func date(s string) time.Time {
	d, err := time.Parse(time.DateOnly, s)
	if err != nil {
		panic(err)
	}
	return d
}

// Sparse daily totals, as the rollup stores them, become one value per
// day with the missing days at 0, from the first day through the last or
// through the day asked.
func TestHistoryFromDaysFillsMissingDays(t *testing.T) {
	t.Parallel()
	days := []DayTotal{
		{Date: date("2026-03-05"), Consumed: 4},
		{Date: date("2026-03-02"), Consumed: 1},
		{Date: time.Date(2026, 3, 3, 23, 30, 0, 0, time.FixedZone("UTC-5", -5*3600)), Consumed: 2.5},
	}
	h, err := HistoryFromDays(days, time.Time{}, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if !h.Start.Equal(date("2026-03-02")) || !reflect.DeepEqual(h.Daily, []float64{1, 2.5, 0, 4}) {
		t.Fatalf("got %s %v", h.Start, h.Daily)
	}
	if !h.Last().Equal(date("2026-03-05")) {
		t.Errorf("last day %s", h.Last())
	}

	// Idle days up to yesterday, and a customer created before its first
	// consumption.
	h, err = HistoryFromDays(days, date("2026-02-28"), date("2026-03-07"))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(h.Daily, []float64{0, 0, 1, 2.5, 0, 4, 0, 0}) {
		t.Fatalf("got %v", h.Daily)
	}

	// No totals at all, over a span: all idle.
	h, err = HistoryFromDays(nil, date("2026-03-01"), date("2026-03-03"))
	if err != nil || !reflect.DeepEqual(h.Daily, []float64{0, 0, 0}) {
		t.Fatalf("got %v, %v", h.Daily, err)
	}
}

func TestHistoryFromDaysRefuses(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name          string
		days          []DayTotal
		from, through time.Time
		want          string
	}{
		{"duplicate day", []DayTotal{{date("2026-03-02"), 1}, {date("2026-03-02"), 2}}, time.Time{}, time.Time{}, "same day"},
		{"negative", []DayTotal{{date("2026-03-02"), -1}}, time.Time{}, time.Time{}, "negative"},
		{"not a number", []DayTotal{{date("2026-03-02"), math.NaN()}}, time.Time{}, time.Time{}, "finite"},
		{"outside the span", []DayTotal{{date("2026-03-09"), 1}}, date("2026-03-01"), date("2026-03-08"), "outside"},
		{"ends before it starts", nil, date("2026-03-08"), date("2026-03-01"), "before it starts"},
		{"ten years and more", []DayTotal{{date("2016-01-01"), 1}, {date("2026-03-02"), 1}}, time.Time{}, time.Time{}, "more than 3660"},
		{"a mistyped year", []DayTotal{{date("0205-01-01"), 1}, {date("2026-03-02"), 1}}, time.Time{}, time.Time{}, "more than 3660"},
	} {
		_, err := HistoryFromDays(c.days, c.from, c.through)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error about %q", c.name, err, c.want)
		}
		if c.name == "duplicate day" && !errors.Is(err, ErrDuplicateDay) {
			t.Errorf("duplicate day: %v is not ErrDuplicateDay", err)
		}
	}
}

func TestNewHistoryChecksValues(t *testing.T) {
	t.Parallel()
	if _, err := NewHistory(date("2026-03-02"), []float64{1, math.Inf(1)}); err == nil || !strings.Contains(err.Error(), "2026-03-03") {
		t.Errorf("infinite day: %v, want an error naming 2026-03-03", err)
	}
	if _, err := NewHistory(date("2026-03-02"), make([]float64, MaxHistoryDays+1)); err == nil {
		t.Error("a history longer than MaxHistoryDays was accepted")
	}
	h, err := NewHistory(time.Date(2026, 3, 2, 15, 4, 0, 0, time.UTC), []float64{1, 2, 3})
	if err != nil || !h.Start.Equal(date("2026-03-02")) {
		t.Fatalf("%v %v", h.Start, err)
	}
	if got := h.Head(2); !reflect.DeepEqual(got.Daily, []float64{1, 2}) || !got.Start.Equal(h.Start) {
		t.Errorf("Head(2) = %v", got)
	}
}
