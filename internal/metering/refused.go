package metering

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
)

// Usage Stripe refused after taking it. Stripe validates meter events
// after it has answered (every event of the v2 stream, and some errors,
// such as an unknown customer, on the v1 API too): an event it then
// refuses is dropped and never billed, while tally, told 200, holds it as
// delivered. Stripe reports such refusals in meter error reports, thin v2
// events that stripehook receives, verifies and fetches, and hands here.

// Refused settles the meter error report r. Each event it names that
// tally holds as delivered becomes dead with dead_code stripe_refused,
// Stripe's message and the report's id in last_error, and a usage.dead
// event: Stripe did not bill it, so once its cause is mended it may be
// requeued (POST /v1/admin/usage-events/requeue), and the resend is not
// counted twice. An event in any other state is left as it is (one not
// delivered yet is still sent, and Stripe refuses or reports it again),
// except one a send holds right now: Stripe may have answered it and the
// worker be about to record it delivered, so the report fails
// (errs.Unavailable) and is retried once that send is recorded.
//
// Stripe names only a few refused events per error code and counts the
// rest: those stay delivered in tally. Every refusal the report counts is
// added to tally_usage_refused_total{code}, and the report is logged with
// its window, in which `tally reconcile` finds the events Stripe did not
// count. A report is applied once (usage_refusal_reports): processed
// again, by a replay or a retry, it changes nothing and counts nothing.
// Errors: errs.Unavailable (also while a named event is being sent).
func (s *Service) Refused(ctx context.Context, r stripeapi.MeterErrorReport) error {
	type named struct {
		Identifier string `json:"identifier"`
		Message    string `json:"message"`
	}
	var samples []named
	for _, t := range r.Types {
		for _, e := range t.Samples {
			samples = append(samples, named{Identifier: e.Identifier, Message: text.Truncate(
				fmt.Sprintf("Stripe refused it after taking it (meter error report %s, %s): %s", r.EventID, t.Code, e.Message), 2000)})
		}
	}
	if samples == nil {
		samples = []named{}
	}
	raw, err := json.Marshal(samples)
	if err != nil {
		return err
	}
	now := s.now()
	var rows []settledRow
	var first bool
	err = db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		rows, first = nil, false
		// Applied once: a report processed again (a replay, a retry after
		// an unrecorded outcome) would dead-letter again an event requeued
		// since and counted by Stripe, and count its refusals twice.
		res := tx.Exec(`INSERT INTO usage_refusal_reports (stripe_event_id, applied_at) VALUES (?, ?) ON CONFLICT DO NOTHING`,
			r.EventID, now)
		if res.Error != nil {
			return res.Error
		}
		if first = res.RowsAffected == 1; !first || len(samples) == 0 {
			return nil
		}
		err := tx.Raw(`
			UPDATE usage_events u SET status = 'dead', dead_code = ?, last_error = x.message,
				delivered_at = NULL, lease_until = NULL, claimed_by = NULL, updated_at = ?
			FROM jsonb_to_recordset(?::jsonb) AS x(identifier text, message text)
			WHERE u.identifier = x.identifier AND u.status = 'delivered'
			RETURNING `+settledColumns,
			string(DeadStripeRefused), now, string(raw)).Scan(&rows).Error
		if err != nil {
			return err
		}
		// One a send holds (Stripe answered, perhaps, and the worker has
		// yet to record it delivered) would be recorded delivered after
		// this report passed it by, and stay so, billed by no one: the
		// report is retried once the send is recorded.
		var sending []string
		err = tx.Raw(`SELECT u.identifier FROM usage_events u
			WHERE u.identifier IN (SELECT x.identifier FROM jsonb_to_recordset(?::jsonb) AS x(identifier text, message text))
			  AND u.status = 'pending' AND u.claimed_by IS NOT NULL AND u.lease_until > ?`, string(raw), now).Scan(&sending).Error
		if err != nil {
			return err
		}
		if len(sending) > 0 {
			return errs.E(errs.Unavailable, "meter error report %s names %d usage event(s) being sent right now (%s); it is applied once their send is recorded",
				r.EventID, len(sending), strings.Join(sending[:min(len(sending), 5)], ", "))
		}
		return appendDead(ctx, tx, rows)
	})
	if err != nil {
		return db.Translate(err, nil)
	}
	if !first {
		s.log.InfoContext(ctx, "meter error report applied before; nothing changes", "stripe_event_id", r.EventID)
		return nil
	}
	for _, t := range r.Types {
		if t.Count > 0 { // a counter's Add panics below zero
			s.refusals.WithLabelValues(t.Code).Add(float64(t.Count))
		}
	}
	for _, row := range rows {
		s.log.WarnContext(ctx, "usage event refused by Stripe after it took it: dead-lettered", "identifier", row.Identifier,
			"customer_id", row.CustomerID, "meter", row.Meter, "stripe_event_id", r.EventID, "error", row.LastError)
	}
	s.log.WarnContext(ctx, "Stripe refused usage events after taking them (meter error report); reconcile the window to find those it did not name",
		"stripe_event_id", r.EventID, "stripe_meter", r.Meter, "summary", r.Summary, "refused", r.ErrorCount, "named", len(samples),
		"dead_lettered", len(rows), "validation_start", r.ValidationStart.UTC(), "validation_end", r.ValidationEnd.UTC())
	return nil
}

// newRefusals is tally_usage_refused_total, registered on reg (nil: kept
// unregistered); several Services on one registry share it.
func newRefusals(reg prometheus.Registerer) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tally_usage_refused_total",
		Help: "Usage events Stripe refused after taking them, as its meter error reports count them, by Stripe's error code; the ones a report names are dead-lettered stripe_refused, the rest show in a reconciliation.",
	}, []string{"code"})
	if reg != nil {
		c = register(reg, c)
	}
	// Each code Stripe documents starts at 0, so that the alert's
	// increase() sees a process's first refusal of it too.
	for _, code := range []string{"archived_meter", "meter_event_customer_not_found", "meter_event_dimension_count_too_high",
		"meter_event_invalid_value", "meter_event_no_customer_defined", "missing_dimension_payload_keys", "no_meter",
		"timestamp_in_future", "timestamp_too_far_in_past"} {
		c.WithLabelValues(code)
	}
	return c
}
