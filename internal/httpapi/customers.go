package httpapi

import (
	"context"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

// UpsertCustomer creates (201) or updates (200) a customer.
func (s *Server) UpsertCustomer(ctx context.Context, r api.UpsertCustomerRequestObject) (api.UpsertCustomerResponseObject, error) {
	c, created, err := s.d.Customers.Upsert(ctx, fromAPIUpsert(r.CustomerId, r.Body))
	if err != nil {
		return nil, err
	}
	// Keep the Stripe Customer in step with what invoices show. The change
	// is saved either way; when Stripe cannot be reached the error says so
	// and the same PUT, retried, pushes it again.
	if b := r.Body; b != nil && (b.Billing != nil || b.Email != nil || b.Name != nil) && c.StripeCustomerID != "" && s.d.Payments != nil {
		if err := s.d.Payments.SyncStripeCustomer(ctx, c.ID); err != nil {
			return nil, err
		}
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
	out := toAPICustomer(c)
	card, err := s.d.Payments.SavedPaymentMethod(ctx, c.ID)
	switch {
	case err == nil:
		out.PaymentMethod = toAPISavedCard(card)
	case !errs.Is(err, errs.NotFound):
		return nil, err
	}
	return api.GetCustomer200JSONResponse(out), nil
}
