package httpapi

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/payments"
)

// CreateCheckoutSession starts a Stripe Checkout for a catalog item. The
// customer is in the body, so the ownership rule is applied here.
func (s *Server) CreateCheckoutSession(ctx context.Context, r api.CreateCheckoutSessionRequestObject) (api.CreateCheckoutSessionResponseObject, error) {
	if err := authorizeCustomer(ctx, r.Body.CustomerId); err != nil {
		return nil, err
	}
	key := idempotencyKey(ctx, r.Body.CustomerId, "createCheckoutSession", r.Params.IdempotencyKey, r.Body)
	res, replayed, err := s.d.Payments.CreateCheckout(ctx, fromAPICheckout(r.Body), key)
	if err != nil {
		return nil, err
	}
	return api.CreateCheckoutSession201JSONResponse{
		Body:    toAPICheckoutSession(res),
		Headers: api.CreateCheckoutSession201ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// CreateInvoicePayment sells a catalog item on invoice (service key only:
// the gate refuses end-user tokens for this operation).
func (s *Server) CreateInvoicePayment(ctx context.Context, r api.CreateInvoicePaymentRequestObject) (api.CreateInvoicePaymentResponseObject, error) {
	key := string(r.Params.IdempotencyKey)
	ik := idempotencyKey(ctx, r.CustomerId, "createInvoicePayment", &key, r.Body)
	in := payments.InvoicePaymentInput{CustomerID: r.CustomerId, Item: r.Body.Item, DaysUntilDue: r.Body.DaysUntilDue,
		Memo: strOr(r.Body.Memo), PurchaseOrder: strOr(r.Body.PurchaseOrder)}
	if r.Body.Quantity != nil {
		in.Quantity = *r.Body.Quantity
	}
	res, replayed, err := s.d.Payments.CreateInvoicePayment(ctx, in, ik)
	if err != nil {
		return nil, err
	}
	return api.CreateInvoicePayment201JSONResponse{
		Body: api.InvoicePayment{PaymentId: res.PaymentID, Status: api.PaymentStatus(res.Status), Amount: res.Amount,
			Currency: res.Currency, Credits: res.Credits, Invoice: toAPIInvoice(res.Invoice)},
		Headers: api.CreateInvoicePayment201ResponseHeaders{IdempotentReplayed: replayedHeader(replayed)},
	}, nil
}

// DismissStripeEvent records an operator's decision on a parked event.
func (s *Server) DismissStripeEvent(ctx context.Context, r api.DismissStripeEventRequestObject) (api.DismissStripeEventResponseObject, error) {
	caller, _ := principalFrom(ctx)
	e, err := s.d.StripeHook.Dismiss(ctx, r.EventId, caller.name(), r.Body.Reason)
	if err != nil {
		return nil, err
	}
	return api.DismissStripeEvent200JSONResponse(toAPIStripeEvent(e)), nil
}

// SyncStripe catches up with Stripe now, within the request's deadline
// (answerWithin): with Stripe not answering (each attempt waits up to 20
// s, and is retried) the operator would otherwise get no answer at all.
func (s *Server) SyncStripe(ctx context.Context, r api.SyncStripeRequestObject) (api.SyncStripeResponseObject, error) {
	if s.d.StripeSync == nil {
		return nil, errs.E(errs.Unavailable, "syncing with Stripe needs a Stripe key (TALLY_STRIPE_SECRET_KEY)")
	}
	var since time.Time
	if r.Body != nil && r.Body.Since != nil {
		since = *r.Body.Since
	}
	res, err := s.d.StripeSync.Sync(ctx, since)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, errs.Wrap(err, errs.Unavailable, "the sync did not finish within the request's deadline (TALLY_REQUEST_TIMEOUT; Stripe or the database answered too slowly); what it applied is kept: run it again, or run tally sync")
		}
		return nil, err
	}
	return api.SyncStripe200JSONResponse{EventsListed: res.EventsListed, EventsNew: res.EventsNew,
		PaymentsChecked: res.PaymentsChecked, PaymentsChanged: res.PaymentsChanged}, nil
}

// GetPayment reads one payment with its transitions; an end user only its own.
func (s *Server) GetPayment(ctx context.Context, r api.GetPaymentRequestObject) (api.GetPaymentResponseObject, error) {
	p, err := s.d.Payments.Get(ctx, r.PaymentId)
	if err != nil {
		return nil, err
	}
	if err := authorizeCustomer(ctx, p.CustomerID); err != nil {
		return nil, err
	}
	return api.GetPayment200JSONResponse(toAPIPayment(forCaller(ctx, p))), nil
}

// forCaller is p as the caller may read it: an end user does not see the
// payment provider's internals (payments.Payment.ForCustomer).
func forCaller(ctx context.Context, p payments.Payment) payments.Payment {
	if caller, _ := principalFrom(ctx); caller.isUser() {
		return p.ForCustomer()
	}
	return p
}

// ListCustomerPayments lists a customer's payments, newest first.
func (s *Server) ListCustomerPayments(ctx context.Context, r api.ListCustomerPaymentsRequestObject) (api.ListCustomerPaymentsResponseObject, error) {
	page, err := s.d.Payments.List(ctx, r.CustomerId, strOr(r.Params.Cursor), limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	out := api.PaymentPage{Data: make([]api.Payment, 0, len(page.Payments)), NextCursor: ptrIfSet(page.NextCursor)}
	for _, p := range page.Payments {
		out.Data = append(out.Data, toAPIPayment(forCaller(ctx, p)))
	}
	return api.ListCustomerPayments200JSONResponse(out), nil
}

// ListStripeEvents lists stored Stripe events for operators.
func (s *Server) ListStripeEvents(ctx context.Context, r api.ListStripeEventsRequestObject) (api.ListStripeEventsResponseObject, error) {
	var status string
	if r.Params.Status != nil {
		status = string(*r.Params.Status)
	}
	page, err := s.d.StripeHook.List(ctx, status, strOr(r.Params.Cursor), limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	out := api.StripeEventPage{Data: make([]api.StripeEvent, 0, len(page.Events)), NextCursor: ptrIfSet(page.NextCursor)}
	for _, e := range page.Events {
		out.Data = append(out.Data, toAPIStripeEvent(e))
	}
	return api.ListStripeEvents200JSONResponse(out), nil
}

// ReplayStripeEvent processes a stored event again.
func (s *Server) ReplayStripeEvent(ctx context.Context, r api.ReplayStripeEventRequestObject) (api.ReplayStripeEventResponseObject, error) {
	e, err := s.d.StripeHook.Replay(ctx, r.EventId)
	if err != nil {
		return nil, err
	}
	return api.ReplayStripeEvent200JSONResponse(toAPIStripeEvent(e)), nil
}

// webhookAck is the body of a 200 to Stripe (schema WebhookAck).
type webhookAck struct {
	Received  bool   `json:"received"`
	Status    string `json:"status,omitempty"`
	Duplicate bool   `json:"duplicate,omitempty"`
}

// stripeWebhook is POST /webhooks/stripe: the raw body, capped, goes to
// stripehook, which needs it byte for byte to check the signature.
func (s *Server) stripeWebhook(c echo.Context) error {
	if s.d.StripeHook == nil {
		return errs.E(errs.Unavailable, "Stripe webhooks are not configured")
	}
	limit := s.d.Config.Stripe.WebhookMaxBodyBytes
	req := c.Request()
	if req.ContentLength > limit {
		return errs.E(errs.PayloadTooLarge, "the request body is larger than %d bytes", limit)
	}
	body, err := io.ReadAll(http.MaxBytesReader(c.Response(), req.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return errs.Wrap(err, errs.Invalid, "the request body could not be read")
	}
	ack, err := s.d.StripeHook.Receive(req.Context(), body, req.Header.Get("Stripe-Signature"))
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, webhookAck{Received: true, Status: string(ack.Status), Duplicate: ack.Duplicate})
}

func strOr(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}
