package metering_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/metering"
)

// The previous billing period of a monthly subscription is the one Stripe
// billed, also when its anchor day is past the end of a shorter month:
// Stripe bills an anchor of the 31st on the last day of shorter months
// (January 31, February 28, March 31, April 30), so the period before
// [March 31, April 30) is [February 28, March 31), not [March 1, March 31)
// (one calendar month before April 30, or as long as the current one).
func TestReconcilePreviousPeriodAtTheEndOfTheMonth(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	day := func(y int, m time.Month, d int) time.Time { return time.Date(y, m, d, 0, 0, 0, 0, time.UTC) }
	for i, c := range []struct{ start, end, wantFrom time.Time }{
		{day(2026, 3, 31), day(2026, 4, 30), day(2026, 2, 28)},   // anchor 31, after a 30-day month
		{day(2026, 2, 28), day(2026, 3, 31), day(2026, 1, 31)},   // anchor 31, the period after February
		{day(2025, 12, 31), day(2026, 1, 31), day(2025, 11, 30)}, // anchor 31, both months of 31 days
		{day(2024, 3, 29), day(2024, 4, 29), day(2024, 2, 29)},   // anchor 29, a leap February
		{day(2026, 3, 30), day(2026, 4, 30), day(2026, 2, 28)},   // anchor 30
		{day(2026, 3, 15), day(2026, 4, 15), day(2026, 2, 15)},   // an ordinary anchor
	} {
		customer := fmt.Sprintf("eom%d", i)
		e.fake.StartSubscription(link(t, e.db, customer), "price_api", c.start, c.end)
		prev, err := e.svc.ReconcilePeriod(context.Background(), testMeter, customer, metering.PeriodPrevious)
		if err != nil {
			t.Fatal(err)
		}
		if !prev.From.Equal(c.wantFrom) || !prev.To.Equal(c.start) {
			t.Errorf("the period before [%s, %s): [%s, %s), want [%s, %s)", c.start.Format(time.DateOnly), c.end.Format(time.DateOnly),
				prev.From.Format(time.DateOnly), prev.To.Format(time.DateOnly), c.wantFrom.Format(time.DateOnly), c.start.Format(time.DateOnly))
		}
	}
}

// monthsOnAnchor is t moved n calendar months (UTC) as Stripe moves the
// ends of a monthly period anchored on t's day: on that day, or on the
// month's last day when the month is shorter.
func monthsOnAnchor(t time.Time, n int) time.Time {
	t = t.UTC()
	first := time.Date(t.Year(), t.Month()+time.Month(n), 1, t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC)
	return first.AddDate(0, 0, min(t.Day(), first.AddDate(0, 1, -1).Day())-1)
}
