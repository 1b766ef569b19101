// Package stripehook is Stripe's way in: it verifies a webhook delivery's
// signature, stores the event keyed by its id (a redelivery is acknowledged
// without being processed again), decodes the few fields tally needs and
// dispatches to internal/payments. A failed processing is retried by a
// background worker with exponential backoff and parked after a maximum of
// attempts; an event the validation chain refuses is parked at once; one
// that could not ask Stripe (down, rate limited) is retried until it
// answers, outside that budget. An
// event that waits for its payment's success (payments.Waiting) is retried
// outside that budget, applied as soon as the success is processed, and
// parked only a day after Stripe created it. Admins list stored events and
// replay one.
package stripehook

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
)

// Status is where a stored event stands.
type Status string

// The stored event statuses, as the admin API lists them (StripeEventStatus
// in openapi.yaml; docs/guarantees.md, "Nothing lost", says what each
// promises).
const (
	Received  Status = "received"
	Processed Status = "processed"
	Ignored   Status = "ignored"
	Failed    Status = "failed"
	Parked    Status = "parked"
	// Dismissed: an operator decided a parked or failed event needs
	// nothing more (Dismiss). It is not retried; it may be replayed.
	Dismissed Status = "dismissed"
)

// ValidStatus reports whether s names a stored event status.
func ValidStatus(s string) bool {
	switch Status(s) {
	case Received, Processed, Ignored, Failed, Parked, Dismissed:
		return true
	}
	return false
}

// Options configure New.
type Options struct {
	DB       *gorm.DB
	Payments *payments.Service
	// Secrets are the webhook signing secrets; each is accepted.
	Secrets []string
	// Tolerance is the signature timestamp tolerance; 0 means Stripe's 300 s.
	Tolerance time.Duration
	// MaxAttempts is how often processing is tried before the event is
	// parked (config's Stripe.EventMaxAttempts); at least 1.
	MaxAttempts int
	// RetryInterval is the retry worker's poll period and the first backoff
	// (config's Stripe.EventRetryInterval); positive.
	RetryInterval time.Duration
	// Lease is how long a received or claimed event is left to the
	// instance processing it before the retry worker of any instance may
	// take it over (that instance may have died between storing and
	// processing); config's Stripe.EventLease, positive.
	Lease    time.Duration
	Registry prometheus.Registerer
	Logger   *slog.Logger
	Now      func() time.Time
	// Stripe lists missed events (CatchUp) and answers what a thin event
	// is about; nil when no key is configured.
	Stripe stripeapi.Client
	// Usage takes Stripe's meter error reports; nil ignores them.
	Usage UsageRefusals
	// Meters are the Stripe meters usage is sent to, whose error reports
	// a catch-up lists.
	Meters []string
	// Livemode is the mode of tally's Stripe key: a meter error report of
	// the other mode is parked, not applied.
	Livemode bool
}

// UsageRefusals takes Stripe's word, in a meter error report, that usage
// events it took were refused after all (metering's).
type UsageRefusals interface {
	// Refused settles the report's refused events. Errors are retried as
	// any processing error.
	Refused(ctx context.Context, r stripeapi.MeterErrorReport) error
}

// Intake receives, stores, processes and replays Stripe events.
type Intake struct {
	db            *gorm.DB
	payments      *payments.Service
	secrets       []string
	tolerance     time.Duration
	maxAttempts   int
	retryInterval time.Duration
	lease         time.Duration
	logger        *slog.Logger
	now           func() time.Time
	total         *prometheus.CounterVec
	lag           *prometheus.HistogramVec
	stripe        stripeapi.Client
	usage         UsageRefusals
	meters        []string
	livemode      bool
	// retryNow nudges this replica's retry worker to run a round before
	// its next tick (wakeStripeUnreachable).
	retryNow chan struct{}
}

// processTimeout bounds one processing attempt, which continues even if
// Stripe hangs up on the delivery; a lease shorter than it bounds the
// attempt instead, so an attempt never outlives its claim.
const processTimeout = 30 * time.Second

// attemptTimeout is how long one processing attempt may take.
func (h *Intake) attemptTimeout() time.Duration { return min(processTimeout, h.lease) }

// outcomeTimeout bounds the writing of the outcome of an attempt that ran
// out of its time waiting for Stripe (record).
const outcomeTimeout = 10 * time.Second

// maxBackoff caps the wait between two attempts.
const maxBackoff = time.Hour

// waitForSuccess is how long after Stripe created it an event waiting for
// its payment's success (payments.Waiting) keeps waiting before it is
// parked. Stripe delivers a payment's events within minutes of each other
// and retries a failed delivery for days; a success still missing after a
// day needs someone to look.
const waitForSuccess = 24 * time.Hour

// New builds the Intake and registers its metrics on o.Registry (when set).
// MaxAttempts, RetryInterval and Lease come from config, which holds their
// defaults: it panics when one is unset (a programming error).
func New(o Options) *Intake {
	if o.MaxAttempts < 1 || o.RetryInterval <= 0 || o.Lease <= 0 {
		panic(fmt.Sprintf("stripehook.New: MaxAttempts (%d) must be at least 1, RetryInterval (%s) and Lease (%s) positive; take them from config.StripeConfig",
			o.MaxAttempts, o.RetryInterval, o.Lease))
	}
	h := &Intake{db: o.DB, payments: o.Payments, secrets: o.Secrets, tolerance: o.Tolerance, maxAttempts: o.MaxAttempts,
		retryInterval: o.RetryInterval, lease: o.Lease, logger: o.Logger, now: o.Now, stripe: o.Stripe, usage: o.Usage,
		meters: o.Meters, livemode: o.Livemode, retryNow: make(chan struct{}, 1)}
	if h.tolerance == 0 {
		h.tolerance = stripeapi.WebhookTolerance
	}
	if h.logger == nil {
		h.logger = slog.New(slog.DiscardHandler)
	}
	if h.now == nil {
		h.now = time.Now
	}
	h.total = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tally_stripe_events_total", Help: "Stripe event processing outcomes, by event type and resulting status.",
	}, []string{"type", "status"})
	h.lag = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "tally_stripe_event_lag_seconds",
		Help: "From Stripe's creation of an event to tally's processing of it, by event type (processed events only).",
		// Seconds for a live webhook, minutes for a retry, hours to days
		// for an event a catch-up found missed.
		Buckets: []float64{0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600, 3 * 24 * 3600},
	}, []string{"type"})
	if o.Registry != nil {
		o.Registry.MustRegister(h.total, h.lag, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tally_stripe_events_parked", Help: "Stored Stripe events parked for an operator (dismissed ones are not).",
		}, h.parkedCount))
	}
	return h
}

func (h *Intake) parkedCount() float64 {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var n int64
	if err := h.db.WithContext(ctx).Model(&eventRow{}).Where("status = ?", string(Parked)).Count(&n).Error; err != nil {
		return -1
	}
	return float64(n)
}

// Ack is the answer to a delivery.
type Ack struct {
	// Status is the event's stored status after this delivery.
	Status Status
	// Duplicate is true when the event was already stored.
	Duplicate bool
}

// Receive handles one delivery: it verifies the signature over the raw body,
// stores the event unless its id is already stored, and processes it. The
// delivery is acknowledged once stored, whatever processing did (a failure
// is retried in the background), so Stripe stops redelivering.
//
// Errors: errs.Invalid (signature, timestamp, malformed event; nothing is
// stored), errs.Unavailable (the database is down: Stripe will retry).
func (h *Intake) Receive(ctx context.Context, payload []byte, signature string) (Ack, error) {
	if err := stripeapi.VerifyWebhook(payload, signature, h.secrets, h.tolerance, h.now()); err != nil {
		return Ack{}, err
	}
	ev, err := ParseEvent(payload)
	if err != nil {
		return Ack{}, err
	}
	now := h.now()
	if r, rerr := h.route(ev); rerr == nil && r.inline {
		return h.receiveInline(ctx, ev, payload, now, r)
	}
	stored, status, err := h.store(ctx, ev, payload, sourceWebhook, now)
	if err != nil {
		return Ack{}, err
	}
	if !stored {
		return Ack{Status: status, Duplicate: true}, nil
	}
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.attemptTimeout())
	defer cancel()
	status, _ = h.process(pctx, ev, 0, now)
	return Ack{Status: status}, nil
}

// Where a stored event came from (stripe_events.source).
const (
	sourceWebhook = "webhook"
	sourceSync    = "sync"
)

// store writes ev (its signed body, or its re-encoding from Stripe's event
// list) unless its id is stored already; then it answers stored=false
// and the stored status.
// Errors: errs.Unavailable (the database refused it).
func (h *Intake) store(ctx context.Context, ev Event, payload []byte, source string, now time.Time) (bool, Status, error) {
	row := h.newRow(ev, payload, source, now)
	res := h.db.WithContext(ctx).Clauses(clause.OnConflict{DoNothing: true}).Create(&row)
	if res.Error != nil {
		return false, "", storeError(res.Error)
	}
	if res.RowsAffected == 0 {
		status, err := h.storedStatus(ctx, ev.ID)
		return false, status, err
	}
	return true, Received, nil
}

// newRow is ev's row as a delivery stores it before processing: received,
// under a lease.
func (h *Intake) newRow(ev Event, payload []byte, source string, now time.Time) eventRow {
	var apiVersion *string
	if ev.APIVersion != "" {
		apiVersion = &ev.APIVersion
	}
	var created *time.Time
	if ev.Created > 0 {
		t := time.Unix(ev.Created, 0).UTC()
		created = &t
	}
	// The signed bytes are stored as they came, as text: ParseEvent found
	// them UTF-8 JSON, which holds no NUL byte, so text can keep them.
	next := now.Add(h.lease)
	return eventRow{
		ID: ev.ID, Type: ev.Type, APIVersion: apiVersion, Livemode: ev.Livemode, Payload: string(payload),
		Status: string(Received), NextAttemptAt: &next, ReceivedAt: now, StripeCreated: created, Source: source,
	}
}

// storeError is the answer to a delivery the database refused to store.
func storeError(err error) error {
	if err == nil {
		return nil
	}
	err = db.Translate(err, nil)
	if _, coded := errs.As(err); !coded {
		// The database refused to store it: an outage from Stripe's side,
		// which retries, and visible in our logs.
		err = errs.Wrap(err, errs.Unavailable, "the event could not be stored")
	}
	return err
}

// storedStatus is the status of the stored event id.
func (h *Intake) storedStatus(ctx context.Context, id string) (Status, error) {
	// A copy of a delivery asks this (a fifth of the deliveries under
	// load): a direct statement (db.ScanDirect).
	var status string
	found, err := db.ScanDirect(ctx, h.db, `SELECT status FROM stripe_events WHERE id = $1`, []any{id}, &status)
	if err == nil && !found {
		err = gorm.ErrRecordNotFound // as gorm's Take answered
	}
	if err != nil {
		return "", db.Translate(err, nil)
	}
	return Status(status), nil
}

// errStoredFirst is what an InlineStore's Store answers when a copy of the
// delivery stored the event first: the copy's transaction committed, this
// one rolls back, and the delivery is a duplicate.
var errStoredFirst = errors.New("stripehook: a copy of the delivery stored the event first")

// receiveInline handles a delivery of an event whose processing begins with
// the payment's transaction (route's inline): that transaction stores the
// event too (payments.InlineStore), as processed when it completes the
// event, so that a delivery costs one transaction and one synchronous
// commit instead of three transactions (store, process, record the
// outcome) and two. What a delivery promises stays as it was:
//   - it is acknowledged only once the event is durably stored: by the
//     processing transaction, or, when that one did not store it (it
//     failed, or ended before storing), by store as before, after which
//     the outcome of this processing is recorded as process records it (a
//     failure retried, a refusal parked);
//   - a copy racing the first is a no-op: its insert waits for the first's
//     transaction, then finds the event stored (errStoredFirst) and it
//     answers as a duplicate; should the first roll back, the copy
//     applies it;
//   - an event stored as not done yet (a step of it follows the storing
//     transaction) is stored under a lease, like any delivery, so the retry
//     worker finishes it should this instance die, and its outcome is
//     recorded after the last step, as before.
func (h *Intake) receiveInline(ctx context.Context, ev Event, payload []byte, now time.Time, r routed) (Ack, error) {
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.attemptTimeout())
	defer cancel()
	inline := &payments.InlineStore{Store: func(ctx context.Context, tx *gorm.DB, processed bool) error {
		row := h.newRow(ev, payload, sourceWebhook, now)
		if processed {
			row.Status, row.Attempts, row.NextAttemptAt, row.ProcessedAt = string(Processed), 1, nil, &now
		}
		// Whether an event waits for the PaymentIntent this one confirms
		// is not asked here: this statement's snapshot is taken before the
		// payment's lock, so it misses a refund or dispute that held that
		// lock, found the payment not succeeded yet and recorded its wait
		// meanwhile. The confirmation's statement asks, under the lock
		// (payments.InlineStore.Waiting).
		var inserted bool
		found, err := db.ScanDirect(ctx, tx, `INSERT INTO stripe_events (id, type, api_version, livemode, payload, status, attempts,
				next_attempt_at, received_at, processed_at, stripe_created, source)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
			ON CONFLICT DO NOTHING
			RETURNING true`, []any{
			row.ID, row.Type, row.APIVersion, row.Livemode, row.Payload, row.Status, row.Attempts,
			row.NextAttemptAt, row.ReceivedAt, row.ProcessedAt, row.StripeCreated, row.Source}, &inserted)
		if err == nil && !found {
			return errStoredFirst // nothing inserted: the id is stored
		}
		return storeError(err)
	}, Pending: func(ctx context.Context, tx *gorm.DB) error {
		row := h.newRow(ev, payload, sourceWebhook, now)
		err := tx.WithContext(ctx).Exec(`UPDATE stripe_events SET status = ?, attempts = 0, next_attempt_at = ?, processed_at = NULL
			WHERE id = ?`, row.Status, row.NextAttemptAt, row.ID).Error
		return storeError(err)
	}}
	err := r.apply(pctx, payments.EventRef{ID: ev.ID, Type: ev.Type, Created: ev.Created, Inline: inline})
	stored, processed := inline.Stored()
	switch {
	case errors.Is(err, errStoredFirst):
		status, serr := h.storedStatus(ctx, ev.ID)
		if serr != nil {
			return Ack{}, serr
		}
		return Ack{Status: status, Duplicate: true}, nil
	case stored && processed && err == nil:
		h.processed(ev, h.now())
		// Asked by the confirmation's statement, under the payment's lock
		// (asked in the event's insert, before the lock, it missed a refund
		// that held the lock and recorded its wait meanwhile, left to its
		// next backoff: TestRefundRacingItsSuccessIsWoken); a wait recorded
		// after that statement finds the success itself (record).
		if r.confirms != "" && inline.Waiting() {
			h.wakeWaiting(pctx, r.confirms)
		}
		return Ack{Status: Processed}, nil
	case stored:
		status, _ := h.record(pctx, ev, r, err, 0, now)
		return Ack{Status: status}, nil
	}
	// The processing transaction did not store the event: store it now, as
	// a delivery always was, then record what processing did.
	ok, status, serr := h.store(ctx, ev, payload, sourceWebhook, now)
	if serr != nil {
		return Ack{}, serr
	}
	if !ok {
		return Ack{Status: status, Duplicate: true}, nil
	}
	status, _ = h.record(pctx, ev, r, err, 0, now)
	return Ack{Status: status}, nil
}

// process dispatches ev and records the outcome; attempts is how many
// attempts the stored row had before this one, receivedAt when it was
// stored. It returns the status written (Received when even that failed:
// the lease then hands the event to the retry worker). An event that
// confirmed a payment then wakes the events waiting for it.
func (h *Intake) process(ctx context.Context, ev Event, attempts int, receivedAt time.Time) (Status, error) {
	r, err := h.dispatch(ctx, ev)
	return h.record(ctx, ev, r, err, attempts, receivedAt)
}

// record records the outcome err of processing the stored event ev (see
// process); r is what route found it to be (r.confirms the key of what it
// confirms, r.names the PaymentIntent it is about), as far as it decoded.
func (h *Intake) record(ctx context.Context, ev Event, r routed, err error, attempts int, receivedAt time.Time) (Status, error) {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) && stripeUnreachable(err) {
		// Stripe did not answer within the attempt's time (a hang: its
		// 20 s timeout and stripe-go's retries outlast the attempt's 30 s
		// or its lease). Written with the attempt's expired context, the
		// outcome was lost: the event stayed claimed, was retried at every
		// lease end rather than at a backoff, uncounted, and unmarked, so
		// Stripe answering again did not bring it forward
		// (TestRefundThatMetStripeSilentIsRecorded). It is recorded on a
		// context of its own. Only then: an attempt cancelled by a shutdown
		// records nothing, as before, and is retried without spending an
		// attempt.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), outcomeTimeout)
		defer cancel()
	}
	confirms := r.confirms
	status, lastErr, waitingFor := Processed, "", ""
	// keepWait: the success the event waited for, if any, stays named;
	// one that never learnt it names r.names instead (see below).
	keepWait, names := false, ""
	// unreachable: failed because Stripe could not be asked (recorded,
	// so that Stripe answering again brings the event forward:
	// wakeStripeUnreachable).
	unreachable := false
	var next *time.Time
	var wait *payments.Waiting
	switch {
	case err == nil:
	case errors.Is(err, errIgnored), errors.Is(err, payments.ErrNotOurs):
		status = Ignored
	case payments.IsRejection(err), errs.Is(err, errs.Invalid):
		status, lastErr = Parked, err.Error()
	case errors.As(err, &wait):
		// Not an operator's problem yet, and not counted against the retry
		// budget: the success it waits for wakes it (wakeWaiting).
		created := receivedAt
		if ev.Created > 0 {
			created = time.Unix(ev.Created, 0)
		}
		deadline := created.Add(waitForSuccess)
		// Parked or not, it still names the success it waits for: should
		// that success come after all, it applies the event (wakeWaiting),
		// which remains Stripe's word that money went back.
		waitingFor = wait.For()
		if !h.now().Before(deadline) {
			status, lastErr = Parked, fmt.Sprintf("gave up after waiting a day (Stripe created the event at %s): %s",
				created.UTC().Format(time.RFC3339), wait.Reason)
		} else {
			status, lastErr = Failed, wait.Reason
			t := h.now().Add(h.backoff(attempts + 1))
			if t.After(deadline) {
				t = deadline
			}
			next = &t
		}
	case stripeUnreachable(err):
		// Stripe could not be asked (an outage, a rate limit): nothing is
		// wrong with the event, and nothing an operator could do would
		// help, so it is retried until Stripe answers, outside the retry
		// budget, at most maxBackoff apart (tally_stripe_events_total
		// counts the failures, which an alert watches).
		status, lastErr = Failed, err.Error()
		t := h.now().Add(h.backoff(attempts + 1))
		next = &t
		// Stripe down says nothing about a wait: a refund that waited
		// for its payment's success and met the outage on a retry still
		// does, and that success wakes it. Recorded without it, the
		// refund waited for its next backoff (up to maxBackoff) after the
		// success, its credits spendable meanwhile.
		//
		// One that met Stripe down before it ever learnt its wait (its
		// PaymentIntent linked to nothing yet, Stripe not answering whose
		// it is) names the PaymentIntent its charge or dispute names: that
		// is the success it would wait for, and its success wakes it (a
		// wake only processes it early; a PaymentIntent that is not ours
		// is never confirmed). Named nothing, a refund delivered during an
		// outage or a 429 storm waited for its backoff, grown by the
		// outage to up to maxBackoff, after its success.
		keepWait, names = true, r.names
		unreachable = true
	default:
		lastErr = err.Error()
		if attempts+1 >= h.maxAttempts {
			status, lastErr = Parked, fmt.Sprintf("gave up after %d attempts: %s", attempts+1, lastErr)
		} else {
			status = Failed
			t := h.now().Add(h.backoff(attempts + 1))
			next = &t
		}
	}
	if status != Processed && status != Ignored {
		h.logger.WarnContext(ctx, "stripe event not processed", "event_id", ev.ID, "type", ev.Type, "status", status, "error", lastErr)
	}
	now := h.now()
	var processedAt *time.Time
	if status == Processed || status == Ignored {
		processedAt = &now
	}
	// One statement records the outcome and says whether an event waits
	// for the PaymentIntent this one confirmed (wakeWaiting has work), so
	// the common case, nothing waiting, costs no second round trip.
	//
	// Its commit does not wait for the WAL flush (synchronous_commit off for
	// this statement's transaction only): losing the outcome in a database
	// crash loses no money and no event. The row then stays as it was
	// stored or claimed, received or failed under a lease, and the retry
	// worker processes it again once the lease ends; the money effects are
	// guarded by the PaymentIntent and the payment's history, so that run
	// changes nothing and records the outcome. The stored event and the
	// processing transaction keep synchronous commits.
	//
	// An outcome never replaces processed, ignored or dismissed, but an
	// operator's replay's does (replayKey). A claim changes only the lease,
	// so two attempts can run at once: a wake takes a waiting event without
	// waiting for the lease of an attempt in flight (wakeWaiting). That
	// attempt may end last, having asked before the success came (or having
	// met Stripe down): its failure, recorded over the wake's processed,
	// retried an applied event and showed it failed. Dismissed is an
	// operator's decision: an attempt in flight when it was taken recorded
	// its failure over it, and the event was retried, later parked, as if
	// never dismissed (TestAttackStaleAttemptNeverUndoesADismissal).
	//
	// Processed does replace ignored and dismissed: the attempt that ends
	// last may be the one that applied the event (a wake that took a refund
	// of an unlinked PaymentIntent and asked Stripe), while one that asked
	// before it heard "not ours" (a 404) and recorded ignored first; ignored
	// then hid money that moved (TestAttackIgnoredNeverHidesAnAppliedRefund).
	// An attempt that answers processed found the event applied, by itself
	// or another.
	//
	// It also says whether the event had met Stripe down before (before,
	// read in the statement's snapshot, so as the row was): one that now
	// went through says Stripe may answer again (wakeStripeUnreachable).
	var outcome []struct{ Wake, WasUnreachable bool }
	replay, _ := ctx.Value(replayKey{}).(bool)
	uerr := h.db.WithContext(ctx).Raw(`UPDATE stripe_events
		SET status = ?, attempts = attempts + 1, last_error = NULLIF(?, ''), next_attempt_at = ?,
		    processed_at = COALESCE(?, processed_at),
		    waiting_for = COALESCE(NULLIF(?, ''), CASE WHEN ?::boolean THEN COALESCE(waiting_for, NULLIF(?, '')) END),
		    stripe_unreachable = ?::boolean
		FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit,
		     (SELECT stripe_unreachable AS was FROM stripe_events WHERE id = ?) AS before
		WHERE id = ? AND (status NOT IN ('processed', 'ignored', 'dismissed') OR ?::boolean
			OR (status IN ('ignored', 'dismissed') AND ?::text = 'processed'))
		RETURNING ?::text <> '' AND EXISTS (SELECT 1 FROM stripe_events w
			WHERE w.status IN ('failed', 'parked') AND w.waiting_for IS NOT NULL AND w.waiting_for = ?::text) AS wake,
			before.was AS was_unreachable`,
		string(status), text.Truncate(lastErr, 2000), next, processedAt, waitingFor, keepWait, names, unreachable,
		ev.ID, ev.ID, replay, string(status), confirms, confirms).Scan(&outcome).Error
	if uerr != nil {
		h.logger.ErrorContext(ctx, "record stripe event outcome", "event_id", ev.ID, "error", uerr)
		return Received, db.Translate(uerr, nil)
	}
	if len(outcome) == 0 {
		// Another attempt completed it meanwhile, or an operator dismissed
		// it: that outcome stands.
		h.logger.InfoContext(ctx, "stripe event outcome not recorded over another attempt's",
			"event_id", ev.ID, "type", ev.Type, "outcome", status, "error", lastErr)
		return h.storedStatus(ctx, ev.ID)
	}
	if status == Processed {
		h.processed(ev, now)
	} else {
		h.total.WithLabelValues(ev.Type, string(status)).Inc()
	}
	if status == Processed && confirms != "" && len(outcome) == 1 && outcome[0].Wake {
		h.wakeWaiting(ctx, confirms)
	}
	if !unreachable && len(outcome) == 1 && outcome[0].WasUnreachable && ctx.Value(wakingKey{}) == nil {
		// An event that met Stripe down went through this time: Stripe
		// probably answers again, and the others that met it down need
		// not wait out their backoff.
		h.wakeStripeUnreachable(ctx)
	}
	if waitingFor != "" && ctx.Value(wakingKey{}) == nil {
		// The success this event waits for may have been applied while it
		// was processed (waiting for the payment's lock behind this event)
		// and have asked for waiting events before this wait was recorded:
		// then neither saw the other, and the event would wait for its
		// next backoff. Asked again now that the wait is recorded (see
		// payments.WaitOver for why one of the two questions sees the
		// other). Not from a wake (wakingKey): a wake that finds the wait
		// not over stops there.
		if over, werr := h.payments.WaitOver(ctx, wait); werr != nil {
			h.logger.WarnContext(ctx, "ask whether a waiting event's success came", "event_id", ev.ID, "error", werr)
		} else if over {
			h.wakeWaiting(ctx, waitingFor)
		}
	}
	if names != "" && ctx.Value(wakingKey{}) == nil {
		// The success may have been applied while this attempt waited for
		// Stripe (a hang lasts up to the attempt's timeout) and found
		// nothing waiting then: asked again now that the name is recorded.
		if over, werr := h.payments.Confirmed(ctx, names); werr != nil {
			h.logger.WarnContext(ctx, "ask whether a PaymentIntent's success came", "event_id", ev.ID, "error", werr)
		} else if over {
			h.wakeWaiting(ctx, names)
		}
	}
	return status, nil
}

// wakingKey marks the context of a wake (wakeWaiting), whose outcomes do
// not wake again (record).
type wakingKey struct{}

// replayKey marks the context of an operator's replay (Replay), whose
// outcome is recorded even over processed or ignored (record).
type replayKey struct{}

// processed counts ev processed at now, and its lag.
func (h *Intake) processed(ev Event, now time.Time) {
	h.total.WithLabelValues(ev.Type, string(Processed)).Inc()
	if ev.Created > 0 {
		h.lag.WithLabelValues(ev.Type).Observe(max(0, now.Sub(time.Unix(ev.Created, 0)).Seconds()))
	}
}

// WakeWaiting processes now the events waiting for the success keyed key
// (a PaymentIntent, or a pay-by-invoice payment's invoice), as
// wakeWaiting: payments calls it (OnWaitOver) once an automatic top-up
// recorded the PaymentIntent whose success arrived first, and once a sync
// confirmed a payment.
func (h *Intake) WakeWaiting(ctx context.Context, key string) { h.wakeWaiting(ctx, key) }

// WakeWaitingOnPayment wakes, as WakeWaiting, the events waiting for
// anything whose Stripe object names payment paymentID in tally's
// metadata: payments calls it (OnTopUpFailedUnrecorded) once an automatic
// top-up failed without recording the PaymentIntent its success waits
// for, which that success then credits.
func (h *Intake) WakeWaitingOnPayment(ctx context.Context, paymentID string) {
	var keys []string
	err := h.db.WithContext(ctx).Raw(`SELECT DISTINCT waiting_for FROM stripe_events
		WHERE status IN ('failed', 'parked') AND waiting_for IS NOT NULL
			AND payload::jsonb #>> '{data,object,metadata,`+stripeapi.MetadataPaymentID+`}' = ?`, paymentID).Scan(&keys).Error
	if err != nil {
		h.logger.WarnContext(ctx, "find events waiting on a payment", "payment_id", paymentID, "error", err)
		return
	}
	for _, k := range keys {
		h.wakeWaiting(ctx, k)
	}
}

// wakeWaiting processes now the events waiting for the success keyed pi
// (a refund or dispute that overtook it; the key is a PaymentIntent, or a
// pay-by-invoice payment's invoice: see payments.Waiting.For), rather than
// at their next backoff, and those parked after waiting a day for it: the
// success they waited for is what an operator would have looked for. A
// failure here leaves the failed ones to the retry worker and the parked
// ones to an operator.
//
// It claims batch after batch while a full one lowered how many still wait:
// one batch left the rest of the parked ones parked for good. A batch that
// lowered nothing (the success is not there after all) ends it.
func (h *Intake) wakeWaiting(ctx context.Context, pi string) {
	// A wake's attempts are ordinary ones, even when an operator's replay
	// (of the success, or of a waiting event that found it) runs it: only
	// the replayed event's own outcome may replace processed (record), not
	// those of the events it wakes, which other attempts may have applied
	// meanwhile (TestAttackReplaysWakeIsNoReplay).
	ctx = context.WithValue(context.WithValue(ctx, wakingKey{}, true), replayKey{}, false)
	const where, batch = `status IN ('failed', 'parked') AND waiting_for = ?`, 20
	left := int64(-1)
	for {
		n, err := h.claimAndProcess(ctx, where, []any{pi}, batch)
		if err != nil {
			h.logger.WarnContext(ctx, "wake events waiting for a payment's success", "waiting_for", pi, "error", err)
			return
		}
		if n < batch {
			return
		}
		var still int64
		if err := h.db.WithContext(ctx).Raw(`SELECT count(*) FROM stripe_events WHERE `+where, pi).Scan(&still).Error; err != nil {
			h.logger.WarnContext(ctx, "wake events waiting for a payment's success", "waiting_for", pi, "error", err)
			return
		}
		if still == 0 || (left >= 0 && still >= left) {
			return
		}
		left = still
	}
}

// wakeStripeUnreachable brings forward the retry of every event that
// failed because Stripe could not be asked (an outage, a 429 storm): once
// Stripe answers again, they need not wait out a backoff that the outage
// grew to up to maxBackoff, with the credits a refund among them takes back
// spendable meanwhile. They are due now: this replica's retry worker runs
// a round at once, any other's at its next tick. One claimed by an attempt in
// flight (due again only when its lease ends) is left to that attempt: a
// claim is due again at most a lease after it was made, and one made while
// this UPDATE waited to run (its clock read before) still ends within two
// leases of that clock; an event backed off for less than that comes soon
// anyway.
// Called when a catch-up listed Stripe's events (Syncer.Sync) and when an
// event that had met Stripe down went through (record). Errors are logged:
// the events still come at their backoff.
func (h *Intake) wakeStripeUnreachable(ctx context.Context) {
	now := h.now()
	res := h.db.WithContext(ctx).Exec(`UPDATE stripe_events SET next_attempt_at = ?
		WHERE status = 'failed' AND stripe_unreachable AND next_attempt_at > ?`, now, now.Add(2*h.lease))
	if res.Error != nil {
		h.logger.WarnContext(ctx, "bring forward events that met Stripe down", "error", res.Error)
		return
	}
	if res.RowsAffected > 0 {
		h.logger.InfoContext(ctx, "Stripe answers again: events that met it down are retried now", "events", res.RowsAffected)
		select {
		case h.retryNow <- struct{}{}:
		default: // a round is already asked for
		}
	}
}

// stripeUnreachable reports whether err is a Stripe call that may succeed
// if made again later: no answer, a 5xx, a 429 or a 409.
func stripeUnreachable(err error) bool {
	e, ok := stripeapi.AsError(err)
	return ok && e.Retryable()
}

// backoff is RetryInterval·2^(attempt-1), capped at maxBackoff.
func (h *Intake) backoff(attempt int) time.Duration {
	d := h.retryInterval
	for i := 1; i < attempt && d < maxBackoff; i++ {
		d *= 2
	}
	return min(d, maxBackoff)
}

var errIgnored = errors.New("stripehook: event type not handled")

// routeThin says what applies a thin (v2) event: a meter error report's
// details are fetched from Stripe, which makes the signed envelope only a
// pointer (a forged one names nothing Stripe would confirm), and handed to
// metering. Every other v2 type is ignored.
func (h *Intake) routeThin(ev Event) routed {
	switch ev.Type {
	case stripeapi.EventMeterErrorReport, stripeapi.EventMeterNoMeter:
		if h.usage == nil || h.stripe == nil {
			return routed{}
		}
		return routed{apply: func(ctx context.Context, _ payments.EventRef) error {
			r, err := h.stripe.GetMeterErrorReport(ctx, ev.ID)
			if err != nil {
				return err
			}
			if r.Livemode != h.livemode {
				// Not this key's usage: livemode must match before money
				// moves (parked, as a payment's mismatch is).
				return errs.E(errs.Invalid, "meter error report %s livemode=%t does not match our Stripe key (livemode=%t)",
					r.EventID, r.Livemode, h.livemode)
			}
			return h.usage.Refused(ctx, r)
		}}
	}
	return routed{}
}

// dispatch decodes the object of a handled type and calls payments. It
// returns what route found (for an event that may confirm a payment,
// routed.confirms: process wakes its waiting events once it is processed).
func (h *Intake) dispatch(ctx context.Context, ev Event) (routed, error) {
	r, err := h.route(ev)
	if err != nil {
		return routed{}, err
	}
	if r.apply == nil {
		return r, errIgnored
	}
	return r, r.apply(ctx, payments.EventRef{ID: ev.ID, Type: ev.Type, Created: ev.Created})
}

// routed is what route found an event to be.
type routed struct {
	// apply calls payments with the decoded object; nil for a type tally
	// does not handle.
	apply func(ctx context.Context, ref payments.EventRef) error
	// confirms is the key of the confirmation the event may make: the
	// PaymentIntent, or for invoice.paid the invoice (its waiting events,
	// see payments.Waiting.For, are woken once it is processed).
	confirms string
	// names is the PaymentIntent a refund or dispute names: the success
	// it would wait for, recorded as such when Stripe could not be asked
	// whose it is (record).
	names string
	// inline: the processing begins with the payment's transaction
	// (payments' inEventTx), with nothing written before it, so that
	// transaction may store the event (receiveInline).
	inline bool
}

// route decodes the object of a handled type and says what applies it.
// Errors: errs.Invalid (the object does not decode).
func (h *Intake) route(ev Event) (routed, error) {
	if ev.Thin {
		return h.routeThin(ev), nil
	}
	switch ev.Type {
	case "payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled":
		var o paymentIntentObject
		if err := decodeObject(ev, &o, func() string { return o.ID }); err != nil {
			return routed{}, err
		}
		pi := o.domain()
		if ev.Type == "payment_intent.succeeded" {
			return routed{confirms: o.ID, inline: true, apply: func(ctx context.Context, ref payments.EventRef) error {
				return h.payments.PaymentIntentSucceeded(ctx, ref, pi)
			}}, nil
		}
		return routed{apply: func(ctx context.Context, ref payments.EventRef) error {
			return h.payments.PaymentIntentFailed(ctx, ref, pi)
		}}, nil
	case "checkout.session.completed", "checkout.session.async_payment_succeeded",
		"checkout.session.async_payment_failed", "checkout.session.expired":
		var o checkoutSessionObject
		if err := decodeObject(ev, &o, func() string { return o.ID }); err != nil {
			return routed{}, err
		}
		cs := o.domain()
		switch ev.Type {
		case "checkout.session.completed":
			// A setup session saves a card outside the payment's
			// transaction; a payment or subscription session links its
			// payment first.
			return routed{confirms: string(o.PaymentIntent), inline: o.Mode == "payment", apply: func(ctx context.Context, ref payments.EventRef) error {
				return h.payments.CheckoutSessionCompleted(ctx, ref, cs)
			}}, nil
		case "checkout.session.async_payment_succeeded":
			return routed{confirms: string(o.PaymentIntent), apply: func(ctx context.Context, ref payments.EventRef) error {
				return h.payments.CheckoutSessionAsyncSucceeded(ctx, ref, cs)
			}}, nil
		}
		return routed{apply: func(ctx context.Context, ref payments.EventRef) error {
			return h.payments.CheckoutSessionFailed(ctx, ref, cs)
		}}, nil
	case "charge.refunded":
		var o chargeObject
		if err := decodeObject(ev, &o, func() string { return o.ID }); err != nil {
			return routed{}, err
		}
		return routed{names: string(o.PaymentIntent), apply: func(ctx context.Context, ref payments.EventRef) error {
			return h.payments.ChargeRefunded(ctx, ref, o.domain())
		}}, nil
	case "charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed",
		"charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated":
		var o disputeObject
		if err := decodeObject(ev, &o, func() string { return o.ID }); err != nil {
			return routed{}, err
		}
		return routed{names: string(o.PaymentIntent), apply: func(ctx context.Context, ref payments.EventRef) error {
			return h.payments.DisputeChanged(ctx, ref, o.domain())
		}}, nil
	case "invoice.finalized", "invoice.paid", "invoice.voided", "invoice.marked_uncollectible":
		var o invoiceObject
		if err := decodeObject(ev, &o, func() string { return o.ID }); err != nil {
			return routed{}, err
		}
		// invoice.paid confirms a pay-by-invoice payment, keyed by its
		// invoice: a refund or dispute that overtook it waits for that key.
		confirms := ""
		if ev.Type == "invoice.paid" {
			confirms = o.ID
		}
		return routed{confirms: confirms, apply: func(ctx context.Context, ref payments.EventRef) error {
			return h.payments.InvoiceChanged(ctx, ref, o.domain())
		}}, nil
	case "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted":
		var o subscriptionObject
		if err := decodeObject(ev, &o, func() string { return o.ID }); err != nil {
			return routed{}, err
		}
		return routed{apply: func(ctx context.Context, ref payments.EventRef) error {
			return h.payments.SubscriptionChanged(ctx, ref, o.domain())
		}}, nil
	}
	return routed{}, nil
}

// Stored is an event as the admin API shows it.
type Stored struct {
	ID            string
	Type          string
	APIVersion    string
	Livemode      bool
	Status        Status
	Attempts      int
	LastError     string
	ReceivedAt    time.Time
	ProcessedAt   *time.Time
	NextAttemptAt *time.Time
	// Created is Stripe's creation time of the event (nil for events
	// stored before tally recorded it); Source is webhook or sync.
	Created *time.Time
	Source  string
	// Dismissed*: who dismissed it, why and when (Status Dismissed).
	DismissedBy     string
	DismissedReason string
	DismissedAt     *time.Time
}

// eventRow is a row of stripe_events. Payload, the signed body as
// received, is read only where it is processed (Omit it elsewhere).
type eventRow struct {
	ID              string `gorm:"primaryKey"`
	Type            string
	APIVersion      *string
	Livemode        bool
	Payload         string
	Status          string
	Attempts        int
	LastError       *string
	NextAttemptAt   *time.Time
	ReceivedAt      time.Time
	ProcessedAt     *time.Time
	WaitingFor      *string
	StripeCreated   *time.Time
	Source          string
	DismissedBy     *string
	DismissedReason *string
	DismissedAt     *time.Time
}

func (eventRow) TableName() string { return "stripe_events" }

func (r eventRow) stored() Stored {
	s := Stored{ID: r.ID, Type: r.Type, Livemode: r.Livemode, Status: Status(r.Status), Attempts: r.Attempts,
		ReceivedAt: r.ReceivedAt, ProcessedAt: r.ProcessedAt}
	if r.APIVersion != nil {
		s.APIVersion = *r.APIVersion
	}
	if r.LastError != nil {
		s.LastError = *r.LastError
	}
	if r.Status == string(Failed) || r.Status == string(Received) {
		s.NextAttemptAt = r.NextAttemptAt
	}
	s.Created, s.Source, s.DismissedAt = r.StripeCreated, r.Source, r.DismissedAt
	if r.DismissedBy != nil {
		s.DismissedBy = *r.DismissedBy
	}
	if r.DismissedReason != nil {
		s.DismissedReason = *r.DismissedReason
	}
	return s
}

// errEventNotStored is Get's and Replay's answer for an unknown id.
func errEventNotStored(id string) error {
	return errs.E(errs.NotFound, "Stripe event %s not stored", id)
}

// Get returns one stored event. Errors: errs.NotFound, errs.Unavailable.
func (h *Intake) Get(ctx context.Context, id string) (Stored, error) {
	var r eventRow
	err := h.db.WithContext(ctx).Omit("payload").Where("id = ?", id).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return Stored{}, errEventNotStored(id)
	}
	if err != nil {
		return Stored{}, db.Translate(err, nil)
	}
	return r.stored(), nil
}

// Page is one page of stored events, newest first; NextCursor is empty on
// the last page.
type Page struct {
	Events     []Stored
	NextCursor string
}

// List returns stored events, newest first, optionally only those in one
// status. Errors: errs.Invalid (status, cursor, limit), errs.Unavailable.
func (h *Intake) List(ctx context.Context, status, cursor string, limit int) (Page, error) {
	if status != "" && !ValidStatus(status) {
		return Page{}, errs.InvalidField("status", "status must be received, processed, ignored, failed, parked or dismissed")
	}
	if err := db.CheckPageSize(limit); err != nil {
		return Page{}, err
	}
	var afterAt time.Time
	var afterID string
	if cursor != "" {
		raw, err := base64.RawURLEncoding.DecodeString(cursor)
		nanos, id, ok := strings.Cut(string(raw), "|")
		n, perr := strconv.ParseInt(nanos, 10, 64)
		if err != nil || !ok || perr != nil || id == "" {
			return Page{}, errs.InvalidField("cursor", "malformed cursor; pass back a next_cursor returned by this list")
		}
		afterAt, afterID = time.Unix(0, n).UTC(), id
	}
	q := h.db.WithContext(ctx).Omit("payload")
	if status != "" {
		q = q.Where("status = ?", status)
	}
	if afterID != "" {
		q = q.Where("(received_at, id) < (?, ?)", afterAt, afterID)
	}
	var rows []eventRow
	err := q.Order("received_at DESC, id DESC").Limit(limit + 1).Find(&rows).Error
	if err != nil {
		return Page{}, db.Translate(err, nil)
	}
	page := Page{Events: make([]Stored, 0, min(len(rows), limit))}
	for i, r := range rows {
		if i == limit {
			last := rows[i-1]
			page.NextCursor = base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(last.ReceivedAt.UnixNano(), 10) + "|" + last.ID))
			break
		}
		page.Events = append(page.Events, r.stored())
	}
	return page, nil
}

// Replay processes a stored event again from its stored payload, whatever
// its status (an operator fixed what parked it, or wants a processed one
// re-run). It is idempotent: the money effect is guarded by the PaymentIntent
// id, so a replay never credits twice, and an event already in a payment's
// history changes it no further. It returns the event afterwards.
// Errors: errs.NotFound, errs.Unavailable.
func (h *Intake) Replay(ctx context.Context, id string) (Stored, error) {
	var r eventRow
	err := h.db.WithContext(ctx).Where("id = ?", id).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return Stored{}, errEventNotStored(id)
	}
	if err != nil {
		return Stored{}, db.Translate(err, nil)
	}
	ev, err := ParseEvent([]byte(r.Payload))
	if err != nil {
		return Stored{}, fmt.Errorf("stripehook: stored event %s no longer parses: %w", id, err)
	}
	// An operator's replay gets a full set of attempts of its own.
	if _, err := h.process(context.WithValue(ctx, replayKey{}, true), ev, 0, r.ReceivedAt); err != nil {
		return Stored{}, err
	}
	return h.Get(ctx, id)
}

// RetryDue claims up to batch events whose retry is due (failed ones, and
// received ones whose instance never finished them), with FOR UPDATE SKIP
// LOCKED and a lease so replicas never take the same event, and processes
// them. It returns how many it processed.
func (h *Intake) RetryDue(ctx context.Context, batch int) (int, error) {
	return h.claimAndProcess(ctx, `status IN ('received', 'failed') AND next_attempt_at <= ?`, []any{h.now()}, batch)
}

// claimAndProcess claims up to batch stored events matching where (SQL over
// stripe_events, with args), oldest due first, under a lease and FOR UPDATE
// SKIP LOCKED so that no two instances take the same one, and processes
// them. It returns how many it claimed.
func (h *Intake) claimAndProcess(ctx context.Context, where string, args []any, batch int) (int, error) {
	var rows []eventRow
	// A claim (SKIP LOCKED, under a lease), so it stays SQL. where is one
	// of this package's fixed conditions, never input.
	err := h.db.WithContext(ctx).Raw(`UPDATE stripe_events SET next_attempt_at = ?
		WHERE id IN (SELECT id FROM stripe_events WHERE `+where+`
			ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED)
		RETURNING id, attempts, received_at, payload`, append(append([]any{h.now().Add(h.lease)}, args...), batch)...).Scan(&rows).Error
	if err != nil {
		return 0, db.Translate(err, nil)
	}
	for _, r := range rows {
		ev, err := ParseEvent([]byte(r.Payload))
		if err != nil {
			h.logger.ErrorContext(ctx, "stored stripe event no longer parses", "event_id", r.ID, "error", err)
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, h.attemptTimeout())
		_, _ = h.process(pctx, ev, r.Attempts, r.ReceivedAt)
		cancel()
	}
	return len(rows), nil
}

// Worker retries due events on every replica; claims never overlap.
type Worker struct {
	intake *Intake
}

// NewWorker returns the retry worker of h.
func NewWorker(h *Intake) *Worker { return &Worker{intake: h} }

// Name names the worker in logs.
func (w *Worker) Name() string { return "stripe-event-retry" }

// Run retries due events every RetryInterval, and when events that met
// Stripe down are brought forward, until ctx ends.
func (w *Worker) Run(ctx context.Context) error {
	t := time.NewTicker(w.intake.retryInterval)
	defer t.Stop()
	for {
		for {
			n, err := w.intake.RetryDue(ctx, 20)
			if err != nil {
				if ctx.Err() == nil {
					w.intake.logger.WarnContext(ctx, "stripe event retry round failed", "error", err)
				}
				break
			}
			if n < 20 {
				break
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		case <-w.intake.retryNow:
		}
	}
}
