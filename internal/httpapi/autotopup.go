package httpapi

import (
	"context"

	"github.com/tallybilling/tally/api"
)

// CreatePaymentMethodSetup starts a setup-mode Checkout that saves a card.
func (s *Server) CreatePaymentMethodSetup(ctx context.Context, r api.CreatePaymentMethodSetupRequestObject) (api.CreatePaymentMethodSetupResponseObject, error) {
	res, err := s.d.Payments.CreatePaymentMethodSetup(ctx, fromAPISetup(r.CustomerId, r.Body))
	if err != nil {
		return nil, err
	}
	return api.CreatePaymentMethodSetup201JSONResponse(toAPISetup(res)), nil
}

// PutAutoTopUp saves a customer's automatic top-up settings (service keys only).
func (s *Server) PutAutoTopUp(ctx context.Context, r api.PutAutoTopUpRequestObject) (api.PutAutoTopUpResponseObject, error) {
	a, err := s.d.Payments.PutAutoTopUp(ctx, fromAPIAutoTopUp(r.CustomerId, r.Body))
	if err != nil {
		return nil, err
	}
	return api.PutAutoTopUp200JSONResponse(toAPIAutoTopUp(a)), nil
}

// GetAutoTopUp reads a customer's automatic top-up settings and status.
func (s *Server) GetAutoTopUp(ctx context.Context, r api.GetAutoTopUpRequestObject) (api.GetAutoTopUpResponseObject, error) {
	a, err := s.d.Payments.GetAutoTopUp(ctx, r.CustomerId)
	if err != nil {
		return nil, err
	}
	return api.GetAutoTopUp200JSONResponse(toAPIAutoTopUp(a)), nil
}
