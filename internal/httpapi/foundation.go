package httpapi

import (
	"context"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/events"
)

// UpsertCustomer creates (201) or updates (200) a customer.
func (s *Server) UpsertCustomer(ctx context.Context, r api.UpsertCustomerRequestObject) (api.UpsertCustomerResponseObject, error) {
	c, created, err := s.d.Customers.Upsert(ctx, fromAPIUpsert(r.CustomerId, r.Body))
	if err != nil {
		return nil, err
	}
	if created {
		return api.UpsertCustomer201JSONResponse(toAPICustomer(c)), nil
	}
	return api.UpsertCustomer200JSONResponse(toAPICustomer(c)), nil
}

// GetCustomer reads one customer; the gate has checked an end user owns it.
func (s *Server) GetCustomer(ctx context.Context, r api.GetCustomerRequestObject) (api.GetCustomerResponseObject, error) {
	c, err := s.d.Customers.Get(ctx, r.CustomerId)
	if err != nil {
		return nil, err
	}
	return api.GetCustomer200JSONResponse(toAPICustomer(c)), nil
}

// GetCatalog answers the catalog loaded at start.
func (s *Server) GetCatalog(ctx context.Context, r api.GetCatalogRequestObject) (api.GetCatalogResponseObject, error) {
	return api.GetCatalog200JSONResponse(toAPICatalog(s.d.Config.Catalog)), nil
}

// ListEvents pages through the outbound event feed, oldest first.
func (s *Server) ListEvents(ctx context.Context, r api.ListEventsRequestObject) (api.ListEventsResponseObject, error) {
	var token string
	if r.Params.After != nil {
		token = *r.Params.After
	}
	after, err := events.ParseCursor(token)
	if err != nil {
		return nil, err
	}
	page, err := s.d.Events.List(ctx, after, limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	out := api.EventPage{Data: make([]api.Event, 0, len(page.Events)), NextCursor: page.Next.String()}
	for _, e := range page.Events {
		ev, err := toAPIEvent(e)
		if err != nil {
			return nil, err
		}
		out.Data = append(out.Data, ev)
	}
	return api.ListEvents200JSONResponse(out), nil
}
