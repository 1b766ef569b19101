package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/credits"
)

// GetBalance answers the customer's credits now, or the balance at a past
// time when the request names one; the gate has checked an end user owns
// the customer.
func (s *Server) GetBalance(ctx context.Context, r api.GetBalanceRequestObject) (api.GetBalanceResponseObject, error) {
	var out api.GetBalance200JSONResponse
	if r.Params.At != nil {
		b, err := s.d.Credits.BalanceAt(ctx, r.CustomerId, *r.Params.At)
		if err != nil {
			return nil, err
		}
		return out, out.FromBalanceAt(api.BalanceAt{CustomerId: b.CustomerID, At: b.At, Balance: b.Balance})
	}
	b, err := s.d.Credits.Balance(ctx, r.CustomerId)
	if err != nil {
		return nil, err
	}
	return balanceAnswer(toAPIBalance(b)), nil
}

// balanceAnswer is GetBalance's 200 with the balance now. The generated
// union (out.FromBalance) marshals the Balance into a json.RawMessage that
// its answer then copies and compacts again; this encodes it once, to the
// same bytes (TestBalanceAnswerIsTheGeneratedOne), as the generated
// VisitGetBalanceResponse writes them.
type balanceAnswer api.Balance

func (b balanceAnswer) VisitGetBalanceResponse(w http.ResponseWriter) error {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode((*api.Balance)(&b)); err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, err := buf.WriteTo(w)
	return err
}

// CheckCredits says whether the customer could spend an amount now,
// writing nothing.
func (s *Server) CheckCredits(ctx context.Context, r api.CheckCreditsRequestObject) (api.CheckCreditsResponseObject, error) {
	var amount int64
	if r.Body != nil {
		amount = r.Body.Amount
	}
	c, err := s.d.Credits.Check(ctx, r.CustomerId, amount)
	if err != nil {
		return nil, err
	}
	return api.CheckCredits200JSONResponse{Allowed: c.Allowed, Amount: c.Amount, Balance: c.Balance, Available: c.Available}, nil
}

// CreateHold reserves credits for a long job (API keys only).
func (s *Server) CreateHold(ctx context.Context, r api.CreateHoldRequestObject) (api.CreateHoldResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "createHold", &r.Params.IdempotencyKey, r.Body)
	h, replayed, err := s.d.Credits.Hold(ctx, fromAPIHold(r.CustomerId, r.Body), key)
	if err != nil {
		return nil, err
	}
	return api.CreateHold201JSONResponse{
		Body: api.HoldCreated{HoldId: h.HoldID, Amount: h.Amount, Status: api.HoldCreatedStatus(h.Status), ExpiresAt: h.ExpiresAt,
			Balance: h.Balance, Available: h.Available},
		Headers: api.CreateHold201ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// holdRequest is what makes two capture or release requests the same
// request: the hold in the path as well as the body.
type holdRequest struct {
	HoldID string `json:"hold_id"`
	Body   any    `json:"body"`
}

// CaptureHold spends what a job cost from its hold and releases the rest.
func (s *Server) CaptureHold(ctx context.Context, r api.CaptureHoldRequestObject) (api.CaptureHoldResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "captureHold", &r.Params.IdempotencyKey, holdRequest{HoldID: r.HoldId, Body: r.Body})
	in := credits.CaptureInput{CustomerID: r.CustomerId, HoldID: r.HoldId}
	if r.Body != nil {
		in.Amount = r.Body.Amount
	}
	e, replayed, err := s.d.Credits.Capture(ctx, in, key)
	if err != nil {
		return nil, err
	}
	return api.CaptureHold200JSONResponse{
		Body:    toAPIHoldEnded(e),
		Headers: api.CaptureHold200ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// ReleaseHold gives a hold's credits back.
func (s *Server) ReleaseHold(ctx context.Context, r api.ReleaseHoldRequestObject) (api.ReleaseHoldResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "releaseHold", r.Params.IdempotencyKey, holdRequest{HoldID: r.HoldId})
	e, replayed, err := s.d.Credits.Release(ctx, r.CustomerId, r.HoldId, key)
	if err != nil {
		return nil, err
	}
	return api.ReleaseHold200JSONResponse{
		Body:    toAPIHoldEnded(e),
		Headers: api.ReleaseHold200ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// GetHold answers one hold of the customer.
func (s *Server) GetHold(ctx context.Context, r api.GetHoldRequestObject) (api.GetHoldResponseObject, error) {
	h, err := s.d.Credits.GetHold(ctx, r.CustomerId, r.HoldId)
	if err != nil {
		return nil, err
	}
	return api.GetHold200JSONResponse(toAPIHold(h)), nil
}

// ListHolds pages through the customer's holds, newest first.
func (s *Server) ListHolds(ctx context.Context, r api.ListHoldsRequestObject) (api.ListHoldsResponseObject, error) {
	var status, cursor string
	if r.Params.Status != nil {
		status = string(*r.Params.Status)
	}
	if r.Params.Cursor != nil {
		cursor = *r.Params.Cursor
	}
	page, err := s.d.Credits.ListHolds(ctx, r.CustomerId, status, cursor, limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	return api.ListHolds200JSONResponse(toAPIHoldPage(page)), nil
}

// VoidGrant ends a grant given by mistake.
func (s *Server) VoidGrant(ctx context.Context, r api.VoidGrantRequestObject) (api.VoidGrantResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "voidGrant", &r.Params.IdempotencyKey, struct {
		GrantID string `json:"grant_id"`
		Body    any    `json:"body"`
	}{r.GrantId, r.Body})
	in := credits.VoidInput{CustomerID: r.CustomerId, GrantID: r.GrantId}
	if r.Body != nil {
		in.Reason = r.Body.Reason
	}
	v, replayed, err := s.d.Credits.Void(ctx, in, key)
	if err != nil {
		return nil, err
	}
	return api.VoidGrant200JSONResponse{
		Body:    api.VoidResult{GrantId: v.GrantID, Voided: v.Voided, TransactionId: ptrIfSet(v.TransactionID), Balance: v.Balance},
		Headers: api.VoidGrant200ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// AdjustCredits is an operator's correction (the gate requires an admin
// key).
func (s *Server) AdjustCredits(ctx context.Context, r api.AdjustCreditsRequestObject) (api.AdjustCreditsResponseObject, error) {
	key := idempotencyKey(ctx, r.CustomerId, "adjustCredits", &r.Params.IdempotencyKey, r.Body)
	a, replayed, err := s.d.Credits.Adjust(ctx, fromAPIAdjustment(r.CustomerId, r.Body), key)
	if err != nil {
		return nil, err
	}
	return api.AdjustCredits201JSONResponse{
		Body:    api.AdjustmentResult{TransactionId: a.TransactionID, Amount: a.Amount, Balance: a.Balance, GrantId: ptrIfSet(a.GrantID)},
		Headers: api.AdjustCredits201ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
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
