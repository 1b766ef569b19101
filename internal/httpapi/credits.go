package httpapi

import (
	"context"

	"github.com/tallybilling/tally/api"
)

// GetBalance answers the customer's spendable credits; the gate has checked
// an end user owns the customer.
func (s *Server) GetBalance(ctx context.Context, r api.GetBalanceRequestObject) (api.GetBalanceResponseObject, error) {
	b, err := s.d.Credits.Balance(ctx, r.CustomerId)
	if err != nil {
		return nil, err
	}
	return api.GetBalance200JSONResponse(toAPIBalance(b)), nil
}

// ConsumeCredits spends credits (API keys only: the spec gives end users no
// access). Insufficient credits come back as the error handler's 402.
func (s *Server) ConsumeCredits(ctx context.Context, r api.ConsumeCreditsRequestObject) (api.ConsumeCreditsResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "consumeCredits", &r.Params.IdempotencyKey, r.Body)
	res, replayed, err := s.d.Credits.Consume(ctx, fromAPIConsume(r.CustomerId, r.Body), key)
	if err != nil {
		return nil, err
	}
	return api.ConsumeCredits200JSONResponse{
		Body:    api.ConsumeResult{TransactionId: res.TransactionID, Amount: res.Amount, Balance: res.Balance},
		Headers: api.ConsumeCredits200ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// GrantCredits gives a customer credits (service source), creating the
// customer if needed.
func (s *Server) GrantCredits(ctx context.Context, r api.GrantCreditsRequestObject) (api.GrantCreditsResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "grantCredits", &r.Params.IdempotencyKey, r.Body)
	res, replayed, err := s.d.Credits.Grant(ctx, fromAPIGrant(r.CustomerId, r.Body), key)
	if err != nil {
		return nil, err
	}
	return api.GrantCredits201JSONResponse{
		Body:    toAPIGrantResult(res),
		Headers: api.GrantCredits201ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// ListCreditTransactions pages through the customer's ledger, newest first.
func (s *Server) ListCreditTransactions(ctx context.Context, r api.ListCreditTransactionsRequestObject) (api.ListCreditTransactionsResponseObject, error) {
	var cursor string
	if r.Params.Cursor != nil {
		cursor = *r.Params.Cursor
	}
	page, err := s.d.Credits.Ledger(ctx, r.CustomerId, cursor, limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	return api.ListCreditTransactions200JSONResponse(toAPILedgerPage(page)), nil
}

// VerifyInvariants runs the same report as `tally verify` (admin only: the
// gate enforces x-tally-admin). Problems are a 200 with ok=false.
func (s *Server) VerifyInvariants(ctx context.Context, r api.VerifyInvariantsRequestObject) (api.VerifyInvariantsResponseObject, error) {
	rep, err := s.d.Verify(ctx)
	if err != nil {
		return nil, err
	}
	return api.VerifyInvariants200JSONResponse(ToAPIVerifyReport(rep)), nil
}
