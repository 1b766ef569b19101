package httpapi

// Placeholders until the payments capability lands; that work replaces this file.

import (
	"context"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

func (s *Server) ListStripeEvents(ctx context.Context, r api.ListStripeEventsRequestObject) (api.ListStripeEventsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "ListStripeEvents is not built yet")
}

func (s *Server) ReplayStripeEvent(ctx context.Context, r api.ReplayStripeEventRequestObject) (api.ReplayStripeEventResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "ReplayStripeEvent is not built yet")
}

func (s *Server) CreateCheckoutSession(ctx context.Context, r api.CreateCheckoutSessionRequestObject) (api.CreateCheckoutSessionResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "CreateCheckoutSession is not built yet")
}

func (s *Server) ListCustomerPayments(ctx context.Context, r api.ListCustomerPaymentsRequestObject) (api.ListCustomerPaymentsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "ListCustomerPayments is not built yet")
}

func (s *Server) GetPayment(ctx context.Context, r api.GetPaymentRequestObject) (api.GetPaymentResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "GetPayment is not built yet")
}
