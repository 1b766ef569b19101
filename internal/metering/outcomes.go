package metering

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
)

// recordTimeout bounds writing one outcome, also during shutdown.
const recordTimeout = 10 * time.Second

// expireEvery is how often (by the worker's clock) a round looks for
// events whose timestamp left Stripe's window, and expireLimit how many it
// dead-letters at once. The look is one range scan of a small partial
// index (usage_events_undelivered_time).
const (
	expireEvery = time.Second
	expireLimit = 500
)

// expireTooOld dead-letters, with DeadTooOld, up to expireLimit pending or
// waiting events whose timestamp left Stripe's window (none that another
// worker holds claimed), at most once every expireEvery.
func (w *Worker) expireTooOld(ctx context.Context) error {
	now := w.now()
	w.mu.Lock()
	if d := now.Sub(w.expiredAt); d >= 0 && d < expireEvery {
		w.mu.Unlock()
		return nil
	}
	w.expiredAt = now
	w.mu.Unlock()
	cut := now.Add(-DeliveryWindow)
	return w.settleRows(ctx, expireLimit, func(tx *gorm.DB) *gorm.DB {
		return tx.Raw(`
			WITH p AS NOT MATERIALIZED (SELECT ?::timestamptz AS now, ?::timestamptz AS cut, ?::text AS too_old_message),
			old AS MATERIALIZED (
				SELECT e.identifier FROM usage_events e, p
				WHERE e.status IN ('pending', 'waiting_customer') AND e.occurred_at <= p.cut
				  AND (e.status = 'waiting_customer' OR e.claimed_by IS NULL OR e.lease_until < p.now)
				ORDER BY e.occurred_at
				LIMIT ?
				FOR UPDATE OF e SKIP LOCKED
			)
			UPDATE usage_events u SET status = 'dead', dead_code = 'too_old', next_attempt_at = p.now,
				last_error = p.too_old_message || COALESCE(u.last_error, '(none)'),
				lease_until = NULL, claimed_by = NULL, updated_at = p.now
			FROM old, p WHERE u.identifier = old.identifier
			RETURNING `+settledColumns,
			now, cut, tooOldMessage, expireLimit)
	})
}

// tooOldMessage starts the last_error of an event dead-lettered too_old.
var tooOldMessage = fmt.Sprintf("too_old: not delivered while Stripe accepted its timestamp "+
	"(35 days, less the %s tally keeps to deliver it); it can no longer be billed through Stripe's meter. Last error: ", DeliveryMargin)

// settle records the outcome of sending evs (one request, begun at sentAt
// on the worker's clock) as err says.
func (w *Worker) settle(ctx context.Context, c *claim, evs []claimedEvent, sentAt time.Time, err error) {
	if err == nil {
		w.delivered(ctx, evs, resultDelivered)
		return
	}
	if stripeapi.IsDuplicate(err) {
		w.delivered(ctx, evs, resultDuplicate)
		return
	}
	if errors.Is(err, errReleased) {
		w.release(ctx, c, evs, w.now().Add(w.pauseLeft()))
		return
	}
	msg := text.Truncate(err.Error(), 1000)
	se, isStripe := stripeapi.AsError(err)
	switch {
	case isStripe && se.Kind == stripeapi.KindRateLimited:
		d := se.RetryAfter
		if d <= 0 {
			d = w.opts.RateLimitPause
		}
		if d > w.opts.MaxRetryAfter {
			w.log.Warn("Stripe's Retry-After is longer than tally waits; pausing for less",
				"retry_after", d.String(), "pause", w.opts.MaxRetryAfter.String())
			d = w.opts.MaxRetryAfter
		}
		until := w.pause(d)
		w.log.Info("Stripe rate limited meter events; pausing", "for", d.String())
		w.m.deliveries.WithLabelValues(resultRateLimited).Add(float64(len(evs)))
		w.releaseWithError(ctx, c, evs, until, msg)
	case isStripe && se.Kind == stripeapi.KindAuth:
		until := w.pause(w.opts.AuthPause)
		w.log.Error("Stripe refused the API key for meter events; pausing delivery", "error", err, "for", w.opts.AuthPause.String())
		w.releaseWithError(ctx, c, evs, until, msg)
	case (isStripe && se.Retryable()) || (!isStripe && !errs.Is(err, errs.Invalid)):
		// Only an expired v2 session, or a session that could not be
		// opened, says for sure that Stripe took nothing; a 5xx or a lost
		// answer may hide events it kept.
		maybeSent := !(isStripe && se.Kind == stripeapi.KindSessionExpired) && !openFailed(err)
		w.retry(ctx, c, evs, msg, maybeSent)
	case openFailed(err):
		// Stripe refused to open a v2 session (the account, the meter
		// events URL or the API version is wrong): the operator's to fix,
		// as a refused key is, and no event's fault.
		until := w.pause(w.opts.AuthPause)
		w.log.Error("Stripe refused to open a meter event session; pausing delivery", "error", err, "for", w.opts.AuthPause.String())
		w.releaseWithError(ctx, c, evs, until, msg)
	default:
		w.dead(ctx, c, evs, sentAt, msg)
	}
}

// claimed addresses the rows of evs while still pending (and, given a
// claim, still held by it): the events an outcome is recorded for. The
// identifiers go as one JSON array, so the statement is the same whatever
// the batch's size.
func claimed(tx *gorm.DB, c *claim, evs []claimedEvent) *gorm.DB {
	q := tx.Model(&eventRow{}).Where("identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND status = ?",
		identifiersJSON(evs), string(StatusPending))
	if c != nil {
		q = q.Where("claimed_by = ?", c.token)
	}
	return q
}

func identifiersJSON(evs []claimedEvent) string {
	ids := make([]string, len(evs))
	for i, ev := range evs {
		ids[i] = ev.Identifier
	}
	raw, _ := json.Marshal(ids)
	return string(raw)
}

// delivered marks evs delivered. It needs no lease: whichever instance sent
// it, Stripe has the event, and that is the truth to record.
func (w *Worker) delivered(ctx context.Context, evs []claimedEvent, result string) {
	if len(evs) == 0 {
		return
	}
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	now := w.now()
	err := claimed(w.db.WithContext(rctx), nil, evs).Updates(map[string]any{
		"status": string(StatusDelivered), "delivered_at": now, "attempts": gorm.Expr("attempts + 1"),
		"last_error": nil, "lease_until": nil, "claimed_by": nil, "updated_at": now,
	}).Error
	if err != nil {
		// The lease runs out and the event is sent again; Stripe answers
		// that it has the identifier, and it is recorded then.
		w.log.Error("record delivered usage events", "error", err, "count", len(evs))
		return
	}
	w.m.deliveries.WithLabelValues(result).Add(float64(len(evs)))
	for _, ev := range evs {
		w.m.deliveryLag.Observe(max(0, now.Sub(ev.CreatedAt).Seconds()))
	}
	w.clearCancelClaims(ctx, evs, true)
}

// release hands unsent claimed events back, due at retryAt, without
// counting an attempt.
func (w *Worker) release(ctx context.Context, c *claim, evs []claimedEvent, retryAt time.Time) {
	w.releaseWithError(ctx, c, evs, retryAt, "")
}

func (w *Worker) releaseWithError(ctx context.Context, c *claim, evs []claimedEvent, retryAt time.Time, msg string) {
	if len(evs) == 0 {
		return
	}
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	err := claimed(w.db.WithContext(rctx), c, evs).Updates(map[string]any{
		"next_attempt_at": retryAt, "lease_until": nil, "claimed_by": nil,
		"last_error": gorm.Expr("COALESCE(NULLIF(?, ''), last_error)", msg), "updated_at": w.now(),
	}).Error
	if err != nil {
		w.log.Error("release usage events", "error", err, "count", len(evs))
	}
	w.clearCancelClaims(ctx, evs, false)
}

// holdEarly hands back, unsent and due at their timestamp, the events of
// evs stamped after now, and returns the others. The v2 stream answers
// before Stripe validates: an event Stripe finds more than 5 minutes ahead
// of its own clock is taken with a 200 and then dropped, and tally would
// record it delivered. Sent once its timestamp has come on this clock, it is
// ahead of Stripe's by the clocks' skew alone. (Through v1 Stripe's refusal
// comes in the answer, and dead sends the event again at its timestamp.)
func (w *Worker) holdEarly(ctx context.Context, c *claim, evs []claimedEvent, now time.Time) []claimedEvent {
	var due, early []claimedEvent
	for _, ev := range evs {
		if ev.OccurredAt.After(now) {
			early = append(early, ev)
		} else {
			due = append(due, ev)
		}
	}
	if len(early) == 0 {
		return due
	}
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	err := claimed(w.db.WithContext(rctx), c, early).Updates(map[string]any{
		"next_attempt_at": gorm.Expr("occurred_at"), "lease_until": nil, "claimed_by": nil, "updated_at": now,
	}).Error
	if err != nil {
		w.log.Error("hold usage events until their timestamp", "error", err, "count", len(early))
	}
	w.clearCancelClaims(ctx, early, false)
	return due
}

func (w *Worker) backToWaiting(ctx context.Context, c *claim, evs []claimedEvent) {
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	err := claimed(w.db.WithContext(rctx), c, evs).Updates(map[string]any{
		"status": string(StatusWaitingCustomer), "lease_until": nil, "claimed_by": nil, "updated_at": w.now(),
	}).Error
	if err != nil {
		w.log.Error("return usage events to waiting_customer", "error", err, "count", len(evs))
	}
	w.clearCancelClaims(ctx, evs, false)
}

// settledRow is a usage event as an outcome left it; NULL text scans as "".
type settledRow struct {
	Identifier string
	CustomerID string
	Meter      string
	Value      int64
	OccurredAt time.Time
	Status     string
	Attempts   int
	DeadCode   string
	LastError  string
}

const settledColumns = `u.identifier, u.customer_id, u.meter, u.value, u.occurred_at, u.status, u.attempts,
	u.dead_code, u.last_error`

// appendDead appends a usage.dead event for each dead row of rows, in
// the transaction that dead-lettered it.
func appendDead(ctx context.Context, tx *gorm.DB, rows []settledRow) error {
	for _, r := range rows {
		if r.Status != string(StatusDead) {
			continue
		}
		err := events.Append(ctx, tx, r.CustomerID, events.UsageDead{
			Identifier: r.Identifier, Meter: r.Meter, Value: r.Value, Timestamp: r.OccurredAt.UTC(),
			Attempts: r.Attempts, Code: r.DeadCode, LastError: r.LastError,
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// retry counts a failed attempt and schedules the next after a jittered
// backoff capped at BackoffMax, and never later than the end of Stripe's
// window for the event's timestamp; an event already past that end is
// dead-lettered too_old instead. maybeSent records that Stripe may have
// kept the event (see UsageEvent.MaybeSentAt).
func (w *Worker) retry(ctx context.Context, c *claim, evs []claimedEvent, msg string, maybeSent bool) {
	now := w.now()
	cut := now.Add(-DeliveryWindow)
	_ = w.settleRows(ctx, len(evs), func(tx *gorm.DB) *gorm.DB {
		// attempts on the right-hand side is the value before this update;
		// the exponent is bounded so power() never overflows.
		return tx.Raw(`
			WITH p AS NOT MATERIALIZED (
				SELECT ?::timestamptz AS now, ?::timestamptz AS cut, ?::text AS too_old_message, ?::text AS msg,
				       ?::boolean AS maybe_sent, ?::float8 AS window_secs, ?::float8 AS backoff_max, ?::float8 AS backoff_base)
			UPDATE usage_events u SET attempts = u.attempts + 1,
				status = CASE WHEN u.occurred_at <= p.cut THEN 'dead' ELSE 'pending' END,
				dead_code = CASE WHEN u.occurred_at <= p.cut THEN 'too_old' END,
				last_error = CASE WHEN u.occurred_at <= p.cut THEN p.too_old_message ELSE '' END || p.msg,
				maybe_sent_at = CASE WHEN p.maybe_sent THEN COALESCE(u.maybe_sent_at, p.now) ELSE u.maybe_sent_at END,
				next_attempt_at = CASE WHEN u.occurred_at <= p.cut THEN p.now
					ELSE least(u.occurred_at + make_interval(secs => p.window_secs),
						p.now + make_interval(secs => random() * least(p.backoff_max, p.backoff_base * power(2, least(u.attempts, 40))))) END,
				lease_until = NULL, claimed_by = NULL, updated_at = p.now
			FROM p
			WHERE u.identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND u.claimed_by = ? AND u.status = 'pending'
			RETURNING `+settledColumns,
			now, cut, tooOldMessage, msg, maybeSent, DeliveryWindow.Seconds(), w.cfg.BackoffMax.Seconds(), w.cfg.BackoffBase.Seconds(),
			identifiersJSON(evs), c.token)
	})
	w.clearCancelClaims(ctx, evs, false)
}

// dead dead-letters events Stripe refused for good. An event whose
// timestamp was still ahead of this clock when it was sent (sentAt) is
// not dead-lettered but tried again at its timestamp: Stripe judges "at
// most 5 minutes in the future" by its own clock, and with this one ahead
// of Stripe's, an event intake took as inside the 5 minutes can be refused
// as outside them. By its timestamp, Stripe's clock is behind it by the
// skew alone. An event refused for another reason waits at most those 5
// minutes before the same refusal dead-letters it.
func (w *Worker) dead(ctx context.Context, c *claim, evs []claimedEvent, sentAt time.Time, msg string) {
	now := w.now()
	_ = w.settleRows(ctx, len(evs), func(tx *gorm.DB) *gorm.DB {
		// Ahead as of the send, not of the answer: a timestamp that passed
		// while Stripe answered was still ahead when Stripe judged it.
		return tx.Raw(`
			WITH p AS NOT MATERIALIZED (SELECT ?::timestamptz AS now, ?::timestamptz AS sent, ?::text AS msg)
			UPDATE usage_events u SET attempts = u.attempts + 1,
				status = CASE WHEN u.occurred_at > p.sent THEN 'pending' ELSE 'dead' END,
				dead_code = CASE WHEN u.occurred_at > p.sent THEN NULL ELSE 'stripe_refused' END,
				next_attempt_at = greatest(u.occurred_at, p.now), last_error = p.msg,
				lease_until = NULL, claimed_by = NULL, updated_at = p.now
			FROM p
			WHERE u.identifier IN (SELECT jsonb_array_elements_text(?::jsonb)) AND u.claimed_by = ? AND u.status = 'pending'
			RETURNING `+settledColumns,
			now, sentAt, msg, identifiersJSON(evs), c.token)
	})
	w.clearCancelClaims(ctx, evs, false)
}

// settleRows runs update (at most n rows) in a transaction and appends
// usage.dead for every row it dead-lettered, in that same transaction.
// A failure is logged (and returned): the claim's lease runs out and the
// events are tried again.
func (w *Worker) settleRows(ctx context.Context, n int, update func(tx *gorm.DB) *gorm.DB) error {
	rctx, cancel := withTimeout(ctx, recordTimeout)
	defer cancel()
	var rows []settledRow
	err := db.InTx(rctx, w.db, func(tx *gorm.DB) error {
		rows = nil
		if err := update(tx).Scan(&rows).Error; err != nil {
			return err
		}
		return appendDead(rctx, tx, rows)
	})
	if err != nil {
		if ctx.Err() == nil {
			w.log.Error("record usage delivery failure", "error", err, "count", n)
		}
		return db.Translate(err, nil)
	}
	for _, r := range rows {
		if r.Status == string(StatusDead) {
			w.m.deliveries.WithLabelValues(resultDead).Inc()
			w.log.Warn("usage event dead-lettered", "identifier", r.Identifier, "customer_id", r.CustomerID,
				"code", r.DeadCode, "attempts", r.Attempts, "error", r.LastError)
		} else {
			w.m.deliveries.WithLabelValues(resultRetry).Inc()
		}
	}
	return nil
}
