package metering

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
)

// eventRow is a row of usage_events: the columns the service reads (NULL
// text scans as ""). Updates through it name the other columns too; rows
// are inserted in bulk by the intake's statement, never through it.
type eventRow struct {
	Identifier    string
	CustomerID    string
	Meter         string
	Value         int64
	OccurredAt    time.Time
	Status        string
	Attempts      int
	LastError     string
	DeadCode      string
	MaybeSentAt   *time.Time
	NextAttemptAt time.Time
	DeliveredAt   *time.Time
	CreatedAt     time.Time
}

func (eventRow) TableName() string { return "usage_events" }

func (r eventRow) usageEvent() UsageEvent {
	ev := UsageEvent{
		Identifier:  r.Identifier,
		CustomerID:  r.CustomerID,
		Meter:       r.Meter,
		Value:       r.Value,
		Timestamp:   r.OccurredAt,
		Status:      Status(r.Status),
		Attempts:    r.Attempts,
		DeadCode:    DeadCode(r.DeadCode),
		LastError:   r.LastError,
		MaybeSentAt: r.MaybeSentAt,
		DeliveredAt: r.DeliveredAt,
		CreatedAt:   r.CreatedAt,
	}
	if ev.Status == StatusPending {
		next := r.NextAttemptAt
		ev.NextAttemptAt = &next
	}
	return ev
}

// Get returns the usage event with this identifier. Errors: errs.NotFound,
// errs.Unavailable.
func (s *Service) Get(ctx context.Context, identifier string) (UsageEvent, error) {
	var r eventRow
	err := s.db.WithContext(ctx).Where("identifier = ?", identifier).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return UsageEvent{}, errs.E(errs.NotFound, "usage event %q not found", identifier)
	}
	if err != nil {
		return UsageEvent{}, db.Translate(err, nil)
	}
	return r.usageEvent(), nil
}

// TotalsQuery selects a customer's usage: one meter or all (Meter ""), over
// [From, To). A nil To means now; a nil From means 30 days before To. The
// zero time is refused (refuseZeroTime), not read as either.
type TotalsQuery struct {
	CustomerID string
	Meter      string
	From, To   *time.Time
}

// MeterTotal is the usage of one meter: the sum of the values and the
// number of events.
type MeterTotal struct {
	Meter  string
	Total  int64
	Events int64
	// Delivery is the plan's delivery (live or shadow).
	Delivery string
	// LiveFrom is the customer's cut-over on this meter: events before it
	// are never sent. nil when the plan has no live_from, or when it is
	// next_period and the customer's has not been decided yet
	// (LiveFromNextPeriod then says so).
	LiveFrom           *time.Time
	LiveFromNextPeriod bool
}

// Totals is a customer's usage per meter over [From, To).
type Totals struct {
	CustomerID string
	From, To   time.Time
	Meters     []MeterTotal
}

// DefaultTotalsSpan is the window Totals covers when From is not given.
const DefaultTotalsSpan = 30 * 24 * time.Hour

// Totals sums a customer's usage per meter, by the events' own timestamps,
// over events that count toward the bill: delivered, pending and
// waiting_customer ones, and the daily totals of delivered events purged
// since (retention.go). Dead events are left out, since Stripe does not
// have them; they are counted again once requeued. A meter asked for by name
// is always in the answer, with zeros when nothing was reported. Ends of
// the window before the usage retention's horizon are moved to UTC day
// boundaries; From and To of the answer are the window it covers.
//
// Errors: errs.NotFound for an unknown customer, errs.Invalid when From is
// not before To or either is the zero time, errs.Unavailable.
func (s *Service) Totals(ctx context.Context, q TotalsQuery) (Totals, error) {
	if err := customers.ValidateID(q.CustomerID); err != nil {
		return Totals{}, err
	}
	to := s.now()
	if q.To != nil {
		if err := refuseZeroTime("to", "to", *q.To, "omit to to mean now"); err != nil {
			return Totals{}, err
		}
		to = *q.To
	}
	from := to.Add(-DefaultTotalsSpan)
	if q.From != nil {
		if err := refuseZeroTime("from", "from", *q.From, "omit from to mean 30 days before to"); err != nil {
			return Totals{}, err
		}
		from = *q.From
	}
	if !from.Before(to) {
		return Totals{}, errs.InvalidField("from", "from must be before to")
	}
	if _, err := customers.Get(ctx, s.db, q.CustomerID); err != nil {
		return Totals{}, err
	}
	from, to = s.window(from, to, s.now())
	var rows []struct {
		Meter  string
		Total  string
		Events int64
	}
	// One statement, so one snapshot: a purge moving rows into daily
	// totals meanwhile is seen either before or after, never half. Sums
	// are numeric: bigint values can add up past the bigint range.
	err := s.db.WithContext(ctx).Raw(`
		WITH p AS NOT MATERIALIZED (
			SELECT ?::text AS customer, ?::text AS meter, ?::timestamptz AS from_t, ?::timestamptz AS to_t)
		SELECT meter, COALESCE(sum(total), 0)::text AS total, COALESCE(sum(events), 0)::bigint AS events
		FROM (
			SELECT e.meter, e.value::numeric AS total, 1 AS events FROM usage_events e, p
			WHERE e.customer_id = p.customer AND (p.meter = '' OR e.meter = p.meter)
			  AND e.occurred_at >= p.from_t AND e.occurred_at < p.to_t
			  AND e.status IN `+countedStatuses+`
			UNION ALL
			SELECT d.meter, d.total::numeric, d.events FROM usage_daily_totals d, p
			WHERE d.customer_id = p.customer AND (p.meter = '' OR d.meter = p.meter) AND d.day >= p.from_t AND d.day < p.to_t
		) u
		GROUP BY meter
		ORDER BY meter`, q.CustomerID, q.Meter, from, to).Scan(&rows).Error
	if err != nil {
		return Totals{}, db.Translate(err, nil)
	}
	out := Totals{CustomerID: q.CustomerID, From: from.UTC(), To: to.UTC(), Meters: []MeterTotal{}}
	for _, r := range rows {
		total, err := int64Total(r.Total, "the usage of meter "+r.Meter)
		if err != nil {
			return Totals{}, err
		}
		out.Meters = append(out.Meters, MeterTotal{Meter: r.Meter, Total: total, Events: r.Events})
	}
	if q.Meter != "" && len(out.Meters) == 0 {
		out.Meters = append(out.Meters, MeterTotal{Meter: q.Meter})
	}
	if err := s.annotateLiveFrom(ctx, q.CustomerID, out.Meters); err != nil {
		return Totals{}, err
	}
	return out, nil
}

// ListQuery selects a page of usage events: one status or all (Status ""),
// in the order they were accepted.
type ListQuery struct {
	Status Status
	Cursor string
	Limit  int
}

// Page is a page of usage events; Next is "" on the last page.
type Page struct {
	Events []UsageEvent
	Next   string
}

type listCursor struct {
	CreatedAt  time.Time `json:"c"`
	Identifier string    `json:"i"`
}

// List pages through usage events, oldest first (the dead-letter queue for
// operators). Errors: errs.Invalid (bad status, limit or cursor),
// errs.Unavailable.
func (s *Service) List(ctx context.Context, q ListQuery) (Page, error) {
	if q.Status != "" && !q.Status.Valid() {
		return Page{}, errs.InvalidField("status", fmt.Sprintf("unknown status %q", q.Status))
	}
	if err := db.CheckPageSize(q.Limit); err != nil {
		return Page{}, err
	}
	var after listCursor
	if q.Cursor != "" {
		raw, err := base64.RawURLEncoding.DecodeString(q.Cursor)
		if err != nil || json.Unmarshal(raw, &after) != nil || after.Identifier == "" {
			return Page{}, errs.InvalidField("cursor", "malformed cursor; pass back a next_cursor returned by this list")
		}
	}
	list := s.db.WithContext(ctx)
	if q.Status != "" {
		list = list.Where("status = ?", string(q.Status))
	}
	if after.Identifier != "" {
		list = list.Where("(created_at, identifier) > (?, ?)", after.CreatedAt, after.Identifier)
	}
	var rows []eventRow
	err := list.Order("created_at, identifier").Limit(q.Limit + 1).Find(&rows).Error
	if err != nil {
		return Page{}, db.Translate(err, nil)
	}
	page := Page{Events: make([]UsageEvent, 0, min(len(rows), q.Limit))}
	for i, r := range rows {
		if i == q.Limit {
			last := rows[i-1]
			raw, _ := json.Marshal(listCursor{CreatedAt: last.CreatedAt, Identifier: last.Identifier})
			page.Next = base64.RawURLEncoding.EncodeToString(raw)
			break
		}
		page.Events = append(page.Events, r.usageEvent())
	}
	return page, nil
}
