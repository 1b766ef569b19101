package main

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/pkg/client"
)

// seedRollup writes days of consumption ending yesterday (UTC) into the
// daily rollup, as consume would have over those days: the past cannot be
// consumed through the API, whose consumes are dated now.
func seedRollup(t testing.TB, gdb *gorm.DB, customer string, perDay []int64) {
	t.Helper()
	today := time.Now().UTC().Truncate(24 * time.Hour)
	for i, v := range perDay {
		day := today.AddDate(0, 0, i-len(perDay))
		if v == 0 {
			continue
		}
		if err := gdb.Exec(`INSERT INTO credit_consumption_daily (customer_id, day, consumed) VALUES (?, ?::date, ?)`,
			customer, day.Format(time.DateOnly), v).Error; err != nil {
			t.Fatal(err)
		}
	}
}

func forecastOverHTTP(t testing.TB, c *client.ClientWithResponses, customer string, horizon int) (int, *client.CreditsForecast, []byte) {
	t.Helper()
	r, err := c.GetCreditsForecastWithResponse(context.Background(), customer, &client.GetCreditsForecastParams{HorizonDays: &horizon})
	if err != nil {
		t.Fatal(err)
	}
	return r.StatusCode(), r.JSON200, r.Body
}

// The forecast endpoint on a customer with eight weeks of history (weekday
// work, idle weekends) and on one with three days; the customer's own token
// reads its own forecast only; bad horizons are refused. Consume keeps the
// rollup the forecast reads.
func TestForecastEndpoint(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_FORECAST_CHECK_INTERVAL"] = "50ms"
	s := startServer(t, env)
	gdb := openDB(t, s)
	svc := s.service(t)

	grantOverHTTP(t, svc, "steady", 2000, "g-steady")
	weeks := make([]int64, 56)
	today := time.Now().UTC().Truncate(24 * time.Hour)
	for i := range weeks {
		switch today.AddDate(0, 0, i-len(weeks)).Weekday() {
		case time.Saturday, time.Sunday:
		default:
			weeks[i] = 100 + int64(i%3)*5
		}
	}
	seedRollup(t, gdb, "steady", weeks)
	st, f, body := forecastOverHTTP(t, svc, "steady", 30)
	mustStatus(t, "forecast", st, body, http.StatusOK)
	if f.Model != client.ForecastModelETSWeeklyLog && f.Model != client.ForecastModelETSWeeklyLinear {
		t.Fatalf("model %s for eight weeks of history", f.Model)
	}
	if f.HistoryDays != 56 || f.HorizonDays != 30 || len(f.Daily) != 30 || f.Available != 2000 {
		t.Fatalf("forecast %+v", f)
	}
	if !f.Daily[0].Date.Time.Equal(today) {
		t.Fatalf("the forecast starts %s, want today %s", f.Daily[0].Date, today)
	}
	var weekday, weekend float64
	for _, d := range f.Daily[:7] {
		if d.Low > d.Expected || d.Expected > d.High || d.Low < 0 {
			t.Fatalf("day %+v out of order", d)
		}
		if wd := d.Date.Weekday(); wd == time.Saturday || wd == time.Sunday {
			weekend += d.Expected
		} else {
			weekday += d.Expected
		}
	}
	if weekday/5 < 60 || weekend/2 > 40 {
		t.Fatalf("the weekly cycle is lost: weekday mean %.1f, weekend mean %.1f", weekday/5, weekend/2)
	}
	// 2000 credits at ~500 a week: about four weeks, less at the pessimistic pace.
	if f.RunwayDays.Expected == nil || *f.RunwayDays.Expected < 20 || *f.RunwayDays.Expected > 30 ||
		f.RunwayDays.Pessimistic == nil || *f.RunwayDays.Pessimistic > *f.RunwayDays.Expected || f.DepletesOn.Pessimistic == nil {
		t.Fatalf("runway %+v depletes %+v", f.RunwayDays, f.DepletesOn)
	}
	if f.Suggestion == nil || f.Suggestion.Item == "" || f.Suggestion.Quantity < 1 || f.Suggestion.Reason == "" {
		t.Fatalf("suggestion %+v", f.Suggestion)
	}
	// A short horizon: the runway lies beyond it.
	st, f7, body := forecastOverHTTP(t, svc, "steady", 7)
	mustStatus(t, "forecast 7", st, body, http.StatusOK)
	if len(f7.Daily) != 7 || f7.RunwayDays.Expected != nil || f7.DepletesOn.Expected != nil {
		t.Fatalf("7-day forecast %+v", f7.RunwayDays)
	}

	// Three days of history.
	grantOverHTTP(t, svc, "newbie", 100, "g-newbie")
	seedRollup(t, gdb, "newbie", []int64{25, 35, 30})
	st, fn, body := forecastOverHTTP(t, s.client(t, userToken(t, "newbie", time.Now().Add(time.Hour))), "newbie", 14)
	mustStatus(t, "newbie's own forecast", st, body, http.StatusOK)
	if fn.Model != client.ForecastModelShortHistory || fn.HistoryDays != 3 || len(fn.Daily) != 14 {
		t.Fatalf("newbie: %s, %d days", fn.Model, fn.HistoryDays)
	}
	if e := fn.Daily[0].Expected; e < 20 || e > 40 || fn.Daily[0].High <= e {
		t.Fatalf("newbie's first day %+v", fn.Daily[0])
	}
	if fn.RunwayDays.Pessimistic == nil || *fn.RunwayDays.Pessimistic > 3 || fn.Suggestion == nil {
		t.Fatalf("newbie runway %+v suggestion %+v", fn.RunwayDays, fn.Suggestion)
	}
	// Someone else's token, bad horizons, unknown customer.
	if st, _, _ := forecastOverHTTP(t, s.client(t, userToken(t, "newbie", time.Now().Add(time.Hour))), "steady", 14); st != http.StatusForbidden && st != http.StatusNotFound {
		t.Fatalf("another customer's forecast: %d", st)
	}
	for _, h := range []int{0, 91, -3} {
		if st, _, _ := forecastOverHTTP(t, svc, "steady", h); st != http.StatusBadRequest {
			t.Fatalf("horizon %d: %d", h, st)
		}
	}
	if st, _, _ := forecastOverHTTP(t, svc, "nobody-here", 7); st != http.StatusNotFound {
		t.Fatalf("unknown customer: %d", st)
	}

	// consume keeps today's rollup row.
	for i := range 3 {
		r, err := svc.ConsumeCreditsWithResponse(context.Background(), "newbie", &client.ConsumeCreditsParams{IdempotencyKey: fmt.Sprintf("nb-%d", i)},
			client.ConsumeRequest{Amount: 7, Reason: "work"})
		if err != nil || r.StatusCode() != http.StatusOK {
			t.Fatalf("consume: %v %d", err, r.StatusCode())
		}
	}
	if got := countRows(t, gdb, `SELECT consumed FROM credit_consumption_daily WHERE customer_id = 'newbie' AND day = (now() AT TIME ZONE 'UTC')::date`); got != 21 {
		t.Fatalf("today's rollup %d, want 21", got)
	}

	// The depletion warning: newbie's 79 credits last under 7 days at its
	// pace: warned once; not again while it stays low.
	waitFor(t, "credits.depletion_forecast", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.depletion_forecast' AND customer_id = 'newbie'`) == 1
	})
	r, err := svc.ConsumeCreditsWithResponse(context.Background(), "newbie", &client.ConsumeCreditsParams{IdempotencyKey: "nb-more"},
		client.ConsumeRequest{Amount: 1, Reason: "work"})
	if err != nil || r.StatusCode() != http.StatusOK {
		t.Fatal("consume")
	}
	time.Sleep(300 * time.Millisecond)
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.depletion_forecast' AND customer_id = 'newbie'`); n != 1 {
		t.Fatalf("%d warnings while the runway stays short, want 1", n)
	}
	// Topped up far above: re-armed; down again: warned again.
	grantOverHTTP(t, svc, "newbie", 5000, "g-newbie-2")
	waitFor(t, "the warning to re-arm", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM credit_forecast_state WHERE customer_id = 'newbie' AND NOT warned`) == 1
	})
	r, err = svc.ConsumeCreditsWithResponse(context.Background(), "newbie", &client.ConsumeCreditsParams{IdempotencyKey: "nb-big"},
		client.ConsumeRequest{Amount: 5000, Reason: "work"})
	if err != nil || r.StatusCode() != http.StatusOK {
		t.Fatal("consume")
	}
	waitFor(t, "the second warning", func() bool {
		return countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.depletion_forecast' AND customer_id = 'newbie'`) == 2
	})
	if n := countRows(t, gdb, `SELECT count(*) FROM events WHERE type = 'credits.depletion_forecast' AND customer_id = 'steady'`); n != 0 {
		t.Fatalf("steady, with weeks of credits, was warned %d times", n)
	}
}
