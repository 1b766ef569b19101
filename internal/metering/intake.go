package metering

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/text"
)

// Stripe's limits on meter events, checked at intake so that an event we
// accept is one Stripe will take.
const (
	// MaxBatch is the most events one intake request may carry.
	MaxBatch = 1000
	// MaxIdentifierLen is Stripe's limit on an identifier, in characters.
	MaxIdentifierLen = 100
	// MaxAge is how old a timestamp Stripe accepts.
	MaxAge = 35 * 24 * time.Hour
	// DeliveryMargin is how long before a timestamp leaves Stripe's window
	// tally stops sending it: it covers clock differences with Stripe, a
	// request in flight and Stripe's asynchronous processing of the v2
	// stream, so an event is never sent for Stripe to drop unseen.
	DeliveryMargin = time.Hour
	// DeliveryWindow is how old a timestamp intake accepts and the worker
	// still sends; older pending events are dead-lettered too_old.
	DeliveryWindow = MaxAge - DeliveryMargin
	// MaxAhead is how far in the future a timestamp Stripe accepts.
	MaxAhead = 5 * time.Minute
	// MaxValue is the largest value taken: JSON numbers arrive as float64,
	// which holds every whole number only up to 2^53, so a larger one may
	// already have been rounded and would be billed wrong.
	MaxValue = 1<<53 - 1
)

// EventInput is one usage event as a caller reports it.
type EventInput struct {
	CustomerID string
	// Meter is a metered plan's meter event name from the catalog.
	Meter string
	// Value is the JSON number as sent; it must be whole and not negative.
	Value float64
	// Timestamp is when the usage happened; nil means now.
	Timestamp  *time.Time
	Identifier string
}

// event is a validated EventInput.
type event struct {
	Identifier      string    `json:"identifier"`
	CustomerID      string    `json:"customer_id"`
	Meter           string    `json:"meter"`
	StripeEventName string    `json:"stripe_event_name"`
	Value           int64     `json:"value"`
	OccurredAt      time.Time `json:"occurred_at"`
	// TimestampGiven is false when the caller omitted the timestamp (it is
	// then the time of intake).
	TimestampGiven bool `json:"-"`
	// Status is the status the event is stored with when its plan or its
	// age decides it (historical, shadow, legacy_period); "" leaves it to
	// the customer's Stripe link and cut-over (insertEvents).
	Status Status `json:"status"`
	// NextPeriod says the plan's cut-over is each customer's next billing
	// period (usage_cutovers).
	NextPeriod bool `json:"next_period"`
}

// Validate checks one event on its own against the catalog and Stripe's
// limits, with timestamps judged against now. Errors: errs.Invalid naming
// the offending field (customer_id, meter, value, timestamp, identifier).
func (in EventInput) Validate(catalog catalog.Catalog, now time.Time) error {
	_, err := in.normalize(catalog, now, false)
	return err
}

// normalize validates in. An imported event must carry its timestamp and
// may be older than Stripe accepts: it is then historical.
func (in EventInput) normalize(catalog catalog.Catalog, now time.Time, imported bool) (event, error) {
	n := utf8.RuneCountInString(in.Identifier)
	switch {
	case n < 1 || n > MaxIdentifierLen:
		return event{}, errs.InvalidField("/identifier", fmt.Sprintf("identifier must be 1 to %d characters, got %d", MaxIdentifierLen, n))
	case strings.ContainsFunc(in.Identifier, unicode.IsControl):
		return event{}, errs.InvalidField("/identifier", "identifier must be UTF-8 text without control characters")
	}
	if err := text.Check(in.Identifier); err != nil {
		return event{}, errs.InvalidField("/identifier", "identifier "+err.Error())
	}
	if err := customers.ValidateID(in.CustomerID); err != nil {
		return event{}, errs.InvalidField("/customer_id", "customer_id must be 1 to 255 characters of A-Za-z0-9_.:@-")
	}
	plan, ok := catalog.PlanByMeter(in.Meter)
	if !ok {
		return event{}, errs.InvalidField("/meter", unknownMeter(catalog, in.Meter))
	}
	v := in.Value
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return event{}, errs.InvalidField("/value", "value must be a finite number")
	case v < 0:
		return event{}, errs.InvalidField("/value", fmt.Sprintf("value must not be negative, got %v", v))
	case v != math.Trunc(v):
		return event{}, errs.InvalidField("/value", fmt.Sprintf("value must be a whole number (Stripe meter values are integers), got %v", v))
	case v > MaxValue:
		return event{}, errs.InvalidField("/value", fmt.Sprintf("value must be at most %d, got %.0f", int64(MaxValue), v))
	}
	ts := now
	if imported && in.Timestamp == nil {
		return event{}, errs.InvalidField("/timestamp", "timestamp is required in an import (RFC 3339)")
	}
	if in.Timestamp != nil {
		if err := refuseZeroTime("/timestamp", "timestamp", *in.Timestamp, "omit timestamp to mean now"); err != nil {
			return event{}, err
		}
		ts = *in.Timestamp
	}
	// PostgreSQL keeps microseconds: truncating here makes the stored time
	// and the one compared with it (sameEvent) the same.
	ts = ts.UTC().Truncate(time.Microsecond)
	var status Status
	switch {
	case imported && ts.Before(now.Add(-DeliveryWindow)):
		status = StatusHistorical
	case ts.Before(now.Add(-DeliveryWindow)):
		return event{}, errs.InvalidField("/timestamp", fmt.Sprintf("timestamp %s is more than 35 days old (less the %s tally keeps to deliver it); Stripe refuses it",
			ts.UTC().Format(time.RFC3339), DeliveryMargin))
	case ts.After(now.Add(MaxAhead)):
		return event{}, errs.InvalidField("/timestamp", fmt.Sprintf("timestamp %s is more than 5 minutes in the future; Stripe refuses it", ts.UTC().Format(time.RFC3339)))
	}
	switch {
	case status != "":
	case plan.Shadow():
		status = StatusShadow
	case plan.LiveFrom != nil && ts.Before(*plan.LiveFrom):
		status = StatusLegacyPeriod
	}
	return event{
		Identifier:      in.Identifier,
		CustomerID:      in.CustomerID,
		Meter:           plan.Meter,
		StripeEventName: plan.Meter,
		Value:           int64(v),
		OccurredAt:      ts,
		TimestampGiven:  in.Timestamp != nil,
		Status:          status,
		NextPeriod:      plan.LiveFromNextPeriod && !plan.Shadow(),
	}, nil
}

// refuseZeroTime refuses the zero time 0001-01-01T00:00:00Z where a caller
// gave a time: it is what an unset time looks like once a client has
// serialised it, never a time anyone means, so reading it as "absent" or as
// a real instant would both hide the caller's bug. hint says what to do.
func refuseZeroTime(pointer, name string, t time.Time, hint string) error {
	if !t.IsZero() {
		return nil
	}
	return errs.InvalidField(pointer, fmt.Sprintf("%s 0001-01-01T00:00:00Z is the zero time, an unset time sent by mistake; %s", name, hint))
}

func unknownMeter(catalog catalog.Catalog, meter string) string {
	var known []string
	for _, p := range catalog.Plans {
		known = append(known, p.Meter)
	}
	if len(known) == 0 {
		return fmt.Sprintf("unknown meter %q: the catalog has no metered plans", meter)
	}
	return fmt.Sprintf("unknown meter %q; the catalog's meters are: %s", meter, strings.Join(known, ", "))
}

// ResultStatus is the intake outcome of one event.
type ResultStatus string

// Intake outcomes.
const (
	ResultAccepted  ResultStatus = "accepted"
	ResultDuplicate ResultStatus = "duplicate"
	ResultRejected  ResultStatus = "rejected"
	ResultConflict  ResultStatus = "conflict"
)

// EventResult is the outcome of one event of a batch.
type EventResult struct {
	Identifier string
	Status     ResultStatus
	// Code and Detail say why a rejected event was refused.
	Code   errs.Code
	Detail string
}

// IntakeResult answers a batch: counts and one result per event, in
// request order.
type IntakeResult struct {
	Accepted   int
	Duplicates int
	Rejected   int
	Conflicts  int
	Results    []EventResult
}

// ValidateBatch checks the batch as a whole: 1 to MaxBatch events.
// Errors: errs.Invalid.
func ValidateBatch(evs []EventInput) error {
	if len(evs) < 1 || len(evs) > MaxBatch {
		return errs.InvalidField("/events", fmt.Sprintf("a batch carries 1 to %d events, got %d", MaxBatch, len(evs)))
	}
	return nil
}

// Ingest validates each event on its own and stores the accepted ones in one
// transaction before returning, so an accepted event is durable. Unknown
// customers are created; events of customers without a Stripe customer are
// stored as waiting_customer.
//
// Stripe deduplicates identifiers across the whole account, so tally does
// too, and tells apart what a repeated identifier means. The same event
// again (same identifier, customer, meter, value and timestamp), whether
// already stored or earlier in the same batch, is a duplicate: stored once.
// An identifier already taken by another event is a conflict (code
// errs.IdentifierConflict): nothing of it is stored and the first event
// stands. An event that omits its timestamp matches the stored one whatever
// its time, so a batch sent without timestamps can be retried safely.
//
// With a key (non-empty Scope), the whole batch runs at most once: a repeat
// with the same body returns the first result and replayed=true.
//
// Errors: errs.Invalid for a batch outside 1..MaxBatch (nothing is stored),
// errs.IdempotencyKeyReused (same key, different batch), errs.Unavailable.
// A bad event is never an error: it is a rejected (or conflict) result.
func (s *Service) Ingest(ctx context.Context, evs []EventInput, key db.IdempotencyKey) (IntakeResult, bool, error) {
	if err := ValidateBatch(evs); err != nil {
		return IntakeResult{}, false, err
	}
	now := s.now()
	base := IntakeResult{Results: make([]EventResult, len(evs))}
	var valid []event
	var validAt []int
	for i, in := range evs {
		ev, err := in.normalize(s.catalog, now, false)
		if err != nil {
			e, _ := errs.As(err)
			base.Results[i] = EventResult{Identifier: in.Identifier, Status: ResultRejected, Code: e.Code, Detail: e.Message}
			continue
		}
		valid = append(valid, ev)
		validAt = append(validAt, i)
	}

	// run may be called again when the transaction is retried; it starts
	// from the validated results every time.
	run := func(tx *gorm.DB) (IntakeResult, error) {
		res := IntakeResult{Results: slices.Clone(base.Results)}
		statuses, _, err := s.store(ctx, tx, valid, now)
		if err != nil {
			return IntakeResult{}, err
		}
		for j, ev := range valid {
			r := EventResult{Identifier: ev.Identifier, Status: statuses[j]}
			if r.Status == ResultConflict {
				r.Code = errs.IdentifierConflict
				r.Detail = fmt.Sprintf("identifier %q is already used by another usage event (a different customer, meter, value or timestamp); "+
					"Stripe deduplicates identifiers across the whole account, so this event was not stored: send it under a new identifier", ev.Identifier)
			}
			res.Results[validAt[j]] = r
		}
		for _, r := range res.Results {
			switch r.Status {
			case ResultAccepted:
				res.Accepted++
			case ResultDuplicate:
				res.Duplicates++
			case ResultRejected:
				res.Rejected++
			case ResultConflict:
				res.Conflicts++
			}
		}
		return res, nil
	}

	if key.Scope == "" {
		var res IntakeResult
		err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
			var err error
			res, err = run(tx)
			return err
		})
		return res, false, err
	}
	raw, replayed, err := db.Once(ctx, s.db, key, func(tx *gorm.DB) ([]byte, error) {
		res, err := run(tx)
		if err != nil {
			return nil, err
		}
		return json.Marshal(res)
	})
	if err != nil {
		return IntakeResult{}, false, err
	}
	var res IntakeResult
	if err := json.Unmarshal(raw, &res); err != nil {
		return IntakeResult{}, false, fmt.Errorf("metering: stored intake result: %w", err)
	}
	return res, replayed, nil
}

// sameEvent reports whether ev repeats ref, the event that holds its
// identifier: same customer, meter and value, and the same timestamp unless
// ev omitted it.
func sameEvent(ev, ref event) bool {
	return ev.CustomerID == ref.CustomerID && ev.Meter == ref.Meter && ev.Value == ref.Value &&
		(!ev.TimestampGiven || ev.OccurredAt.Equal(ref.OccurredAt))
}

// store inserts, inside tx, the first copy of every identifier of evs that
// is not stored yet, and returns each event's outcome in order: accepted
// (this copy was stored), duplicate (the same event holds the identifier)
// or conflict (another event holds it).
//
// The insert comes first and finds by itself what it cannot store: the
// identifiers already taken (ON CONFLICT DO NOTHING) and the events of
// customers tally does not know yet (it joins customers). Only those are
// read back, so the usual batch (known customers, fresh identifiers) is one
// statement. Of the events read back, the ones whose identifier is stored
// are duplicates or conflicts; the rest are of new customers, who are
// created (so a customer is created for no event whose identifier is
// taken) before those events are inserted again. Should a concurrent batch
// store one of those identifiers in between, that event ends a duplicate or
// a conflict, and its customer exists anyway (as it would have after any
// request naming it).
func (s *Service) store(ctx context.Context, tx *gorm.DB, evs []event, now time.Time) ([]ResultStatus, map[Status]int64, error) {
	out := make([]ResultStatus, len(evs))
	if len(evs) == 0 {
		return out, nil, nil
	}
	tx = tx.WithContext(ctx)
	first := make(map[string]event, len(evs))
	fresh := make([]event, 0, len(evs))
	for _, ev := range evs {
		if _, ok := first[ev.Identifier]; !ok {
			first[ev.Identifier] = ev
			fresh = append(fresh, ev)
		}
	}
	missed, counts, err := insertEvents(tx, fresh, now)
	if err != nil {
		return nil, nil, err
	}
	stored := map[string]event{}
	if len(missed) > 0 {
		if stored, err = storedEvents(tx, slices.Collect(maps.Keys(missed))); err != nil {
			return nil, nil, err
		}
		var again []event
		var create []string
		for _, ev := range fresh {
			if _, taken := stored[ev.Identifier]; missed[ev.Identifier] && !taken {
				again = append(again, ev)
				create = append(create, ev.CustomerID)
			}
		}
		if _, err := customers.EnsureMany(ctx, tx, create, now); err != nil {
			return nil, nil, err
		}
		missedAgain, more, err := insertEvents(tx, again, now)
		if err != nil {
			return nil, nil, err
		}
		for st, n := range more {
			counts[st] += n
		}
		for _, ev := range again {
			if !missedAgain[ev.Identifier] {
				delete(missed, ev.Identifier)
			}
		}
		if len(missedAgain) > 0 {
			// Stored by a concurrent batch meanwhile: ON CONFLICT waited
			// for it, so its rows are visible to a new statement.
			taken, err := storedEvents(tx, slices.Collect(maps.Keys(missedAgain)))
			if err != nil {
				return nil, nil, err
			}
			maps.Copy(stored, taken)
		}
	}
	accepted := make(map[string]bool, len(first))
	for i, ev := range evs {
		ref, isStored := stored[ev.Identifier]
		isInserted := !missed[ev.Identifier]
		if !isStored && !isInserted {
			// Neither inserted nor found: nothing above leaves an event so
			// unless the database changed under the statements; failing
			// rolls the batch back rather than answering it wrongly.
			return nil, nil, fmt.Errorf("metering: usage event %q was neither stored nor found", ev.Identifier)
		}
		if isInserted && !accepted[ev.Identifier] {
			accepted[ev.Identifier] = true
			out[i] = ResultAccepted
			continue
		}
		if isInserted {
			ref = first[ev.Identifier]
		}
		out[i] = ResultConflict
		if sameEvent(ev, ref) {
			out[i] = ResultDuplicate
		}
	}
	return out, counts, nil
}

// storedEvents reads the stored events holding identifiers.
func storedEvents(tx *gorm.DB, identifiers []string) (map[string]event, error) {
	var rows []struct {
		Identifier string
		CustomerID string
		Meter      string
		Value      int64
		OccurredAt time.Time
	}
	err := tx.Raw(`
		SELECT identifier, customer_id, meter, value, occurred_at FROM usage_events
		WHERE identifier = ANY(?::text[])`, db.Array(identifiers)).Scan(&rows).Error
	if err != nil {
		return nil, db.Translate(err, nil)
	}
	out := make(map[string]event, len(rows))
	for _, r := range rows {
		out[r.Identifier] = event{Identifier: r.Identifier, CustomerID: r.CustomerID, Meter: r.Meter, Value: r.Value, OccurredAt: r.OccurredAt}
	}
	return out, nil
}

// insertEvents inserts evs (one per identifier), skipping identifiers
// already stored and events of customers that do not exist, inside tx. It
// returns the identifiers it did not insert, and how many it inserted with
// each status. Events are written in identifier order, so that two
// concurrent batches take their locks in the same order and cannot
// deadlock. Counts and the few identifiers left out come back instead of a
// row per event: reading back every row inserted was a sixth of an
// import's own CPU.
func insertEvents(tx *gorm.DB, evs []event, now time.Time) (map[string]bool, map[Status]int64, error) {
	missed, counts := map[string]bool{}, map[Status]int64{}
	if len(evs) == 0 {
		return missed, counts, nil
	}
	n := len(evs)
	ids, custs, meters, names, statuses := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	values, at, nextPeriod := make([]int64, n), make([]time.Time, n), make([]bool, n)
	for i, ev := range evs {
		ids[i], custs[i], meters[i], names[i], statuses[i] = ev.Identifier, ev.CustomerID, ev.Meter, ev.StripeEventName, string(ev.Status)
		values[i], at[i], nextPeriod[i] = ev.Value, ev.OccurredAt, ev.NextPeriod
	}
	var rows []struct {
		Status     *string
		N          int64
		Identifier *string
	}
	err := tx.Raw(`
		WITH r AS MATERIALIZED (
			SELECT * FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::bigint[], ?::timestamptz[], ?::text[], ?::boolean[])
				AS r(identifier, customer_id, meter, stripe_event_name, value, occurred_at, status, next_period)
		), ins AS (
			INSERT INTO usage_events (identifier, customer_id, meter, stripe_event_name, value, occurred_at,
				status, next_attempt_at, created_at, updated_at)
			SELECT r.identifier, r.customer_id, r.meter, r.stripe_event_name, r.value, r.occurred_at,
				`+statusCase+`, ?, ?, ?
			FROM r
			JOIN customers c ON c.id = r.customer_id
			LEFT JOIN usage_cutovers cut ON r.next_period AND cut.customer_id = r.customer_id AND cut.meter = r.meter
			ORDER BY r.identifier COLLATE "C"
			ON CONFLICT (identifier) DO NOTHING
			RETURNING identifier, status
		)
		SELECT status, count(*) AS n, NULL AS identifier FROM ins GROUP BY status
		UNION ALL
		SELECT NULL, 0, r.identifier FROM r WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.identifier = r.identifier)`,
		db.Array(ids), db.Array(custs), db.Array(meters), db.Array(names), db.Array(values), db.Array(at), db.Array(statuses), db.Array(nextPeriod),
		now, now, now).
		Scan(&rows).Error
	if err != nil {
		return nil, nil, db.Translate(err, constraints)
	}
	var inserted int64
	for _, r := range rows {
		switch {
		case r.Identifier != nil:
			missed[*r.Identifier] = true
		case r.Status != nil:
			counts[Status(*r.Status)] += r.N
			inserted += r.N
		}
	}
	if inserted+int64(len(missed)) != int64(n) {
		return nil, nil, fmt.Errorf("metering: the insert of %d usage events answered %d inserted and %d not", n, inserted, len(missed))
	}
	return missed, counts, nil
}

// statusCase is the status an event r of customer c is stored with (cut
// being its usage_cutovers row, if any): the one normalize decided, else
// legacy_period before the customer's cut-over, else by the Stripe link.
const statusCase = `CASE WHEN r.status <> '' THEN r.status
			WHEN cut.live_from IS NOT NULL AND r.occurred_at < cut.live_from THEN 'legacy_period'
			WHEN c.stripe_customer_id IS NULL THEN 'waiting_customer' ELSE 'pending' END`

var constraints = map[string]errs.Code{
	"usage_events_value_nonnegative": errs.Invalid,
	"usage_events_identifier_length": errs.Invalid,
}
