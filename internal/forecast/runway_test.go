package forecast

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/catalog"
)

// steady is a forecast of days days from first, each expected at exp with
// the cumulative high growing by high a day.
func steady(days int, exp, high float64) Forecast {
	first := date("2026-04-01")
	f := Forecast{Model: ModelETSLog}
	for i := range days {
		d := first.AddDate(0, 0, i)
		f.Daily = append(f.Daily, Day{Date: d, Expected: exp, Low: 0, High: high})
		f.Cumulative = append(f.Cumulative, Total{Date: d, Expected: exp * float64(i+1), High: high * float64(i+1)})
	}
	return f
}

func TestRunway(t *testing.T) {
	t.Parallel()
	f := steady(10, 5, 8) // expected totals 5, 10, 15...; pessimistic 8, 16, 24...
	for _, c := range []struct {
		available         float64
		expected, pessim  int // -1: beyond the forecast
		expectedOn, pesOn string
	}{
		{10, 2, 1, "2026-04-03", "2026-04-02"}, // 10 covers two days exactly; the third exceeds
		{9.99, 1, 1, "2026-04-02", "2026-04-02"},
		{4, 0, 0, "2026-04-01", "2026-04-01"},
		{0, 0, 0, "2026-04-01", "2026-04-01"},
		{-3, 0, 0, "2026-04-01", "2026-04-01"},
		{60, -1, 7, "", "2026-04-08"},
		{1000, -1, -1, "", ""},
	} {
		r := f.Runway(c.available)
		check := func(what string, days *int, on *time.Time, want int, wantOn string) {
			if want < 0 {
				if days != nil || on != nil {
					t.Errorf("available %v: %s runway %v, want none within the forecast", c.available, what, *days)
				}
				return
			}
			if days == nil || *days != want || on == nil || on.Format(time.DateOnly) != wantOn {
				t.Errorf("available %v: %s runway %v on %v, want %d on %s", c.available, what, days, on, want, wantOn)
			}
		}
		check("expected", r.ExpectedDays, r.ExpectedDepletesOn, c.expected, c.expectedOn)
		check("pessimistic", r.PessimisticDays, r.PessimisticDepletesOn, c.pessim, c.pesOn)
	}
}

// The runway of a real forecast reads the cumulative bounds: for a
// customer idle on most days, the pessimistic runway is far longer than
// the sum of the days' high bounds would make it.
func TestRunwayOfIntermittentCustomerReadsTheTotal(t *testing.T) {
	t.Parallel()
	daily := make([]float64, 16*7)
	for i := range daily {
		if i%5 == 0 {
			daily[i] = 100 // 20 a day on average, 100 on the busy days
		}
	}
	f, err := Predict(history(t, daily), 60)
	if err != nil {
		t.Fatal(err)
	}
	r := f.Runway(400)
	var sumHigh float64
	naive := 0
	for _, d := range f.Daily {
		if sumHigh += d.High; sumHigh > 400 {
			break
		}
		naive++
	}
	if r.PessimisticDays == nil || *r.PessimisticDays <= naive || *r.PessimisticDays > *r.ExpectedDays {
		t.Errorf("pessimistic runway %v, expected %v; the sum of daily highs would say %d", r.PessimisticDays, r.ExpectedDays, naive)
	}
}

// A forecast cut to the horizon asked has no runway beyond it, though the
// longer forecast it was cut from has.
func TestRunwayWithinHead(t *testing.T) {
	t.Parallel()
	f := steady(30, 5, 8)
	if r := f.Runway(60); r.PessimisticDays == nil || *r.PessimisticDays != 7 {
		t.Fatalf("30 days: %v", r.PessimisticDays)
	}
	week := f.Head(7)
	if len(week.Daily) != 7 || len(week.Cumulative) != 7 || week.Model != f.Model {
		t.Fatalf("Head(7): %d days, %d totals, model %s", len(week.Daily), len(week.Cumulative), week.Model)
	}
	if r := week.Runway(60); r.PessimisticDays != nil || r.ExpectedDays != nil {
		t.Errorf("7 days: runway %v, %v; want none within the horizon", r.PessimisticDays, r.ExpectedDays)
	}
	if r := week.Runway(50); r.PessimisticDays == nil || *r.PessimisticDays != 6 {
		t.Errorf("7 days, 50 available: %v, want 6", r.PessimisticDays)
	}
	if got := f.Head(99); len(got.Daily) != 30 {
		t.Errorf("Head(99) of 30 days: %d", len(got.Daily))
	}
}

func TestNeed(t *testing.T) {
	t.Parallel()
	f := steady(30, 5, 8)
	if n, err := f.Need(100, 30); err != nil || n != 240-100 {
		t.Errorf("need %v, %v; want 140", n, err)
	}
	if n, _ := f.Need(500, 30); n != 0 {
		t.Errorf("need %v with enough available", n)
	}
	if _, err := steady(7, 5, 8).Need(0, 30); !errors.Is(err, ErrForecastTooShort) {
		t.Errorf("a week's forecast asked about 30 days: %v", err)
	}
}

var packs = []catalog.CreditPack{
	{ID: "starter", Amount: 1000, Currency: "usd", Credits: 1000},
	{ID: "pro", Amount: 5000, Currency: "usd", Credits: 6000},
	{ID: "bulk", Amount: 40000, Currency: "usd", Credits: 50000},
}

func TestSuggest(t *testing.T) {
	t.Parallel()
	limits := CheckoutLimits{MaxQuantity: 100}
	for _, c := range []struct {
		name                 string
		high, available      float64 // pessimistic consumption a day, credits available
		item                 string
		quantity             int64
		covers               bool
		reasonHas            string
		noSuggestionExpected bool
	}{
		// 30 days at 140 = 4200, 0 available: 5 starters cost 5000 for 5000
		// credits, one pro 5000 for 6000: same price, more credits wins.
		{name: "tie on price", high: 140, item: "pro", quantity: 1, covers: true, reasonHas: "4200 more are needed"},
		// 30 days at 30 = 900: one starter (1000) beats one pro (5000).
		{name: "small need", high: 30, item: "starter", quantity: 1, covers: true},
		// 4200 - 3500 = 700: one starter.
		{name: "available counts", high: 140, available: 3500, item: "starter", quantity: 1, covers: true, reasonHas: "3500 are available, so 700 more"},
		// 30 days at 1500 = 45000: 8 pro = 40000 for 48000, one bulk 40000 for 50000.
		{name: "bulk", high: 1500, item: "bulk", quantity: 1, covers: true},
		// 30 days at 2 = 60 under 100 available: nothing to buy.
		{name: "enough", high: 2, available: 100, noSuggestionExpected: true},
		// 30 days at 200,000 = 6,000,000: 100 bulk (5,000,000) is the most
		// one checkout buys.
		{name: "beyond one checkout", high: 200000, item: "bulk", quantity: 100, covers: false, reasonHas: "No pack covers that in one checkout"},
	} {
		f := steady(90, c.high/2, c.high)
		s, err := f.Suggest(c.available, packs, limits)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if c.noSuggestionExpected {
			if s != nil {
				t.Errorf("%s: suggested %+v", c.name, s)
			}
			continue
		}
		if s == nil || s.Item != c.item || s.Quantity != c.quantity || s.Covers != c.covers {
			t.Errorf("%s: %+v, want %d × %s (covers %v)", c.name, s, c.quantity, c.item, c.covers)
			continue
		}
		byID := map[string]catalog.CreditPack{}
		for _, p := range packs {
			byID[p.ID] = p
		}
		if p := byID[s.Item]; s.Amount != p.Amount*s.Quantity || s.Credits != p.Credits*s.Quantity || s.Currency != "usd" {
			t.Errorf("%s: amount %d, credits %d for %d × %s", c.name, s.Amount, s.Credits, s.Quantity, s.Item)
		}
		// What it covers: the pessimistic runway of the balance after buying.
		wantDays := f.Runway(c.available + float64(s.Credits)).PessimisticDays
		if (wantDays == nil) != (s.CoversDays == nil) || (wantDays != nil && *wantDays != *s.CoversDays) {
			t.Errorf("%s: covers %v days, want %v", c.name, s.CoversDays, wantDays)
		}
		if s.Covers && (s.CoversDays == nil || *s.CoversDays < SuggestionDays) {
			t.Errorf("%s: a covering suggestion lasts only %v days", c.name, s.CoversDays)
		}
		if !strings.Contains(s.Reason, c.reasonHas) || !strings.Contains(s.Reason, s.Item) {
			t.Errorf("%s: reason %q, want it to name the pack and say %q", c.name, s.Reason, c.reasonHas)
		}
	}
}

func TestSuggestRefuses(t *testing.T) {
	t.Parallel()
	mixed := append([]catalog.CreditPack{{ID: "eur", Amount: 900, Currency: "eur", Credits: 1000}}, packs...)
	if _, err := steady(30, 10, 20).Suggest(0, mixed, CheckoutLimits{}); !errors.Is(err, ErrMixedCurrencies) {
		t.Errorf("mixed currencies: %v", err)
	}
	if _, err := steady(14, 10, 20).Suggest(0, packs, CheckoutLimits{}); !errors.Is(err, ErrForecastTooShort) {
		t.Errorf("two weeks forecast: %v", err)
	}
	if s, err := steady(30, 10, 20).Suggest(0, nil, CheckoutLimits{}); s != nil || err != nil {
		t.Errorf("no packs: %+v, %v", s, err)
	}
	// A pack dearer than one charge allows is never suggested.
	dear := []catalog.CreditPack{{ID: "dear", Amount: catalog.MaxChargeMinorUnits + 1, Currency: "usd", Credits: 10}}
	if s, err := steady(30, 10, 20).Suggest(0, dear, CheckoutLimits{}); s != nil || err != nil {
		t.Errorf("unbuyable pack: %+v, %v", s, err)
	}
}
