package httpapi

// Placeholders until the credits capability lands; that work replaces this file.

import (
	"context"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

func (s *Server) VerifyInvariants(ctx context.Context, r api.VerifyInvariantsRequestObject) (api.VerifyInvariantsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "VerifyInvariants is not built yet")
}

func (s *Server) GetBalance(ctx context.Context, r api.GetBalanceRequestObject) (api.GetBalanceResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "GetBalance is not built yet")
}

func (s *Server) ConsumeCredits(ctx context.Context, r api.ConsumeCreditsRequestObject) (api.ConsumeCreditsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "ConsumeCredits is not built yet")
}

func (s *Server) GrantCredits(ctx context.Context, r api.GrantCreditsRequestObject) (api.GrantCreditsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "GrantCredits is not built yet")
}

func (s *Server) ListCreditTransactions(ctx context.Context, r api.ListCreditTransactionsRequestObject) (api.ListCreditTransactionsResponseObject, error) {
	return nil, errs.E(errs.Unavailable, "ListCreditTransactions is not built yet")
}
