package httpapi

// Placeholders until the metering capability lands; that work replaces this file.

import (
	"context"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

func (s *Server) CreateReconciliation(ctx context.Context, r api.CreateReconciliationRequestObject) (api.CreateReconciliationResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "CreateReconciliation is not built yet")
}

func (s *Server) ListUsageEvents(ctx context.Context, r api.ListUsageEventsRequestObject) (api.ListUsageEventsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "ListUsageEvents is not built yet")
}

func (s *Server) RequeueUsageEvents(ctx context.Context, r api.RequeueUsageEventsRequestObject) (api.RequeueUsageEventsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "RequeueUsageEvents is not built yet")
}

func (s *Server) GetCustomerUsage(ctx context.Context, r api.GetCustomerUsageRequestObject) (api.GetCustomerUsageResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "GetCustomerUsage is not built yet")
}

func (s *Server) IngestUsageEvents(ctx context.Context, r api.IngestUsageEventsRequestObject) (api.IngestUsageEventsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "IngestUsageEvents is not built yet")
}

func (s *Server) GetUsageEvent(ctx context.Context, r api.GetUsageEventRequestObject) (api.GetUsageEventResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "GetUsageEvent is not built yet")
}
