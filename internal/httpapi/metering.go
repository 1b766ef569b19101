package httpapi

import (
	"context"
	"net/http"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/metering"
)

// IngestUsageEvents validates each event on its own and commits the accepted
// ones before answering 202; per-event results come back in request order.
func (s *Server) IngestUsageEvents(ctx context.Context, r api.IngestUsageEventsRequestObject) (api.IngestUsageEventsResponseObject, error) {
	key := idempotencyKey(ctx, "", usageIngestOperation, r.Params.IdempotencyKey, r.Body)
	res, replayed, err := s.d.Metering.Ingest(ctx, fromAPIUsageBatch(r.Body), key)
	if err != nil {
		return nil, err
	}
	return api.IngestUsageEvents202JSONResponse{
		Body:    toAPIIntakeResult(res),
		Headers: api.IngestUsageEvents202ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// GetUsageEvent answers one event's delivery status.
func (s *Server) GetUsageEvent(ctx context.Context, r api.GetUsageEventRequestObject) (api.GetUsageEventResponseObject, error) {
	ev, err := s.d.Metering.Get(ctx, r.Identifier)
	if err != nil {
		return nil, err
	}
	return api.GetUsageEvent200JSONResponse(toAPIUsageEvent(ev)), nil
}

// GetCustomerUsage answers a customer's local totals per meter; the gate has
// checked an end user owns the customer.
func (s *Server) GetCustomerUsage(ctx context.Context, r api.GetCustomerUsageRequestObject) (api.GetCustomerUsageResponseObject, error) {
	q := metering.TotalsQuery{CustomerID: r.CustomerId, From: r.Params.From, To: r.Params.To}
	if r.Params.Meter != nil {
		q.Meter = *r.Params.Meter
	}
	t, err := s.d.Metering.Totals(ctx, q)
	if err != nil {
		return nil, unprocessable(err)
	}
	return api.GetCustomerUsage200JSONResponse(toAPIUsageTotals(t)), nil
}

// ListUsageEvents pages through usage events by status, for operators
// looking at dead letters.
func (s *Server) ListUsageEvents(ctx context.Context, r api.ListUsageEventsRequestObject) (api.ListUsageEventsResponseObject, error) {
	q := metering.ListQuery{Limit: limitOr(r.Params.Limit)}
	if r.Params.Status != nil {
		q.Status = metering.Status(*r.Params.Status)
	}
	if r.Params.Cursor != nil {
		q.Cursor = string(*r.Params.Cursor)
	}
	page, err := s.d.Metering.List(ctx, q)
	if err != nil {
		return nil, err
	}
	return api.ListUsageEvents200JSONResponse(toAPIUsageEventPage(page)), nil
}

// RequeueUsageEvents sends dead events again: some by identifier, or all,
// saying per identifier why one was not.
func (s *Server) RequeueUsageEvents(ctx context.Context, r api.RequeueUsageEventsRequestObject) (api.RequeueUsageEventsResponseObject, error) {
	var in metering.RequeueInput
	if r.Body != nil {
		if r.Body.Identifiers != nil {
			in.Identifiers = *r.Body.Identifiers
		}
		if r.Body.AllDead != nil {
			in.AllDead = *r.Body.AllDead
		}
		if r.Body.Force != nil {
			in.Force = *r.Body.Force
		}
	}
	res, err := s.d.Metering.Requeue(ctx, in)
	if err != nil {
		return nil, err
	}
	return api.RequeueUsageEvents200JSONResponse(toAPIRequeueResult(res)), nil
}

// CreateReconciliation compares delivered usage with Stripe's summaries.
func (s *Server) CreateReconciliation(ctx context.Context, r api.CreateReconciliationRequestObject) (api.CreateReconciliationResponseObject, error) {
	b := r.Body
	var rec metering.Reconciliation
	var err error
	switch {
	case b.CustomerId != nil && b.Period != nil && b.From == nil && b.To == nil:
		rec, err = s.d.Metering.ReconcilePeriod(ctx, b.Meter, *b.CustomerId, string(*b.Period))
	case b.CustomerId == nil && b.Period == nil && b.From != nil && b.To != nil:
		rec, err = s.d.Metering.Reconcile(ctx, b.Meter, *b.From, *b.To)
	default:
		return nil, unprocessable(errs.E(errs.Invalid, "give either from and to, or customer_id and period"))
	}
	if err != nil {
		return nil, unprocessable(err)
	}
	return api.CreateReconciliation200JSONResponse(ToAPIReconciliation(rec)), nil
}

// unprocessable answers 422 for the invalid_request of a request that met
// the contract but asks for something that cannot be answered (the zero
// time as a bound, from after to, an unknown meter); other errors pass.
func unprocessable(err error) error {
	if e, ok := errs.As(err); ok && e.Code == errs.Invalid {
		return &problemStatus{err: e, status: http.StatusUnprocessableEntity}
	}
	return err
}
