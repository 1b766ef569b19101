package metering

import (
	"context"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
)

// Retention. Delivered usage events are kept as rows for the usage
// retention (TALLY_RETENTION_USAGE_EVENTS), counted by their timestamp.
// Older ones are purged, their values first added to usage_daily_totals per
// customer, meter and UTC day in the same statement. Totals and
// Reconcile read rows and daily totals together, so their answers do not
// change when rows go: before the detail horizon (the UTC midnight
// starting the day the retention reaches back to) usage is known per day
// only, so a window end falling before it is moved to a day boundary,
// the start earlier and the end later, and the answer says which window it
// covers. That rule depends only on the clock and the setting, never on
// whether a purge ran. Pending, waiting and dead events are never purged.

// detailHorizon is the instant before which usage is known per UTC day
// only; zero without a retention.
func (s *Service) detailHorizon(now time.Time) time.Time {
	if s.retention <= 0 {
		return time.Time{}
	}
	return now.Add(-s.retention).UTC().Truncate(24 * time.Hour)
}

// purgeHorizon is the instant before which delivered events are purged: a
// day before the detail horizon, so that an instance whose clock runs up
// to a day ahead never purges a day another still reads row by row.
func (s *Service) purgeHorizon(now time.Time) time.Time {
	return s.detailHorizon(now).Add(-24 * time.Hour)
}

// window moves the ends of [from, to) that fall before the detail horizon
// to UTC day boundaries: from to the start of its day, to to the start of
// the next day unless it is one already.
func (s *Service) window(from, to, now time.Time) (time.Time, time.Time) {
	h := s.detailHorizon(now)
	if from.Before(h) {
		from = from.UTC().Truncate(24 * time.Hour)
	}
	if to.Before(h) {
		if day := to.UTC().Truncate(24 * time.Hour); day.Equal(to) {
			to = day
		} else {
			to = day.Add(24 * time.Hour)
		}
	}
	return from, to
}

// PurgeDelivered purges, in one short statement, at most size delivered
// events whose timestamp is older than the purge horizon (and that were
// accepted before it, which the index on creation time finds fast), adding
// their values to the daily totals first. It returns how many rows it
// deleted; db.PurgeInBatches repeats it. Rows another instance is purging
// are skipped, so every instance may run it at once, and a row counts in
// its daily total exactly once. Without a retention it deletes nothing.
// The locking SELECT is a MATERIALIZED CTE, run once: rescanned inside the
// statement, SKIP LOCKED would pass over the rows already deleted and take
// more than size.
// Errors: errs.Unavailable.
func (s *Service) PurgeDelivered(ctx context.Context, size int) (int64, error) {
	if s.retention <= 0 {
		return 0, nil
	}
	before := s.purgeHorizon(s.now())
	var n int64
	err := s.db.WithContext(ctx).Raw(`
		WITH picked AS MATERIALIZED (
			SELECT identifier FROM usage_events
			WHERE status = 'delivered' AND created_at < ? AND occurred_at < ?
			ORDER BY status, created_at
			LIMIT ?
			FOR UPDATE SKIP LOCKED
		), gone AS (
			DELETE FROM usage_events u USING picked
			WHERE u.identifier = picked.identifier AND u.status = 'delivered'
			RETURNING u.customer_id, u.meter, u.occurred_at, u.value
		), added AS (
			INSERT INTO usage_daily_totals AS d (customer_id, meter, day, total, events)
			SELECT customer_id, meter, date_trunc('day', occurred_at, 'UTC'), sum(value)::bigint, count(*)
			FROM gone
			GROUP BY 1, 2, 3
			ORDER BY 1, 2, 3
			ON CONFLICT (customer_id, meter, day)
			DO UPDATE SET total = d.total + excluded.total, events = d.events + excluded.events
		)
		SELECT count(*) FROM gone`, before, before, size).Scan(&n).Error
	return n, db.Translate(err, nil)
}

// PurgeRefusalReports deletes at most size records of meter error reports
// applied before olderThan (usage_refusal_reports, see Refused) and returns
// how many it deleted; db.PurgeInBatches repeats it. Callers keep
// olderThan as far back as the stored Stripe events (a report is applied
// again only when its stored event is processed again, by a replay or a
// retry), which is at least 35 days. Errors: errs.Unavailable.
func PurgeRefusalReports(ctx context.Context, gdb *gorm.DB, olderThan time.Time, size int) (int64, error) {
	res := gdb.WithContext(ctx).Exec(`
		DELETE FROM usage_refusal_reports r USING (
			SELECT stripe_event_id FROM usage_refusal_reports WHERE applied_at < ? ORDER BY applied_at LIMIT ?) picked
		WHERE r.stripe_event_id = picked.stripe_event_id`, olderThan, size)
	return res.RowsAffected, db.Translate(res.Error, nil)
}
