package sandbox

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// Saved cards and off-session payments: a card is saved by a Checkout
// Session in setup mode, or in payment mode with
// payment_intent_data[setup_future_usage]; it is then a payment_method
// attached to the customer (payment_method.attached), which a
// PaymentIntent created with off_session=true and confirm=true charges
// without the buyer: it succeeds, or fails with the card's decline (402
// card_error, the PaymentIntent in the error, payment_intent.payment_failed),
// authentication_required for a card that always asks for it.

// newPaymentMethod creates the payment_method of a test card (a.mu held),
// attached to customer when one is given.
func (a *Account) newPaymentMethod(tc TestCard, customer, email string) *object {
	pm := paymentMethod(tc)
	o := a.create("payment_method", newID("pm"), map[string]any{
		"type": "card", "card": pm["card"], "customer": nullable(customer),
		"billing_details": map[string]any{"email": nullable(email)}, "metadata": map[string]any{},
	})
	o.private["card"] = tc.Number
	return o
}

// paymentMethodFor is the payment method a session's buyer paid with
// (a.mu held), and whether the session saved it to its customer: a
// customer is created when the session has none, as Checkout does.
func (a *Account) paymentMethodFor(cs *object, tc TestCard) (*object, bool) {
	if cs.private["setup_future_usage"] == nil && str(cs.data, "mode") != "setup" {
		return a.newPaymentMethod(tc, "", sessionEmail(cs)), false
	}
	customer := str(cs.data, "customer")
	if customer == "" {
		c := a.createCustomer(url.Values{"email": {sessionEmail(cs)}})
		a.emit("customer.created", c, requestRef{})
		customer = c.id
		cs.data["customer"] = customer
		a.put(cs)
	}
	return a.newPaymentMethod(tc, customer, sessionEmail(cs)), true
}

// completeSetup saves the card of a setup-mode session: setup_intent.created,
// payment_method.attached, setup_intent.succeeded, checkout.session.completed;
// a declined card sends setup_intent.setup_failed and leaves the session open.
func (a *Account) completeSetup(cs *object, tc TestCard) PayResult {
	si := a.get("setup_intent", str(cs.data, "setup_intent"))
	if si == nil {
		si = a.create("setup_intent", newID("seti"), map[string]any{
			"status": "requires_payment_method", "usage": "off_session", "customer": cs.data["customer"],
			"payment_method": nil, "last_setup_error": nil, "metadata": metadataCopy(sub(cs.private, "setup_intent_metadata")),
		})
		cs.data["setup_intent"] = si.id
		a.put(cs)
		a.emit("setup_intent.created", si, requestRef{})
	}
	if tc.Outcome == CardDeclined {
		si.data["last_setup_error"] = map[string]any{"type": "card_error", "code": "card_declined", "decline_code": tc.DeclineCode, "message": tc.Message}
		a.put(si)
		a.emit("setup_intent.setup_failed", si, requestRef{})
		return PayResult{Outcome: CardDeclined, Message: tc.Message}
	}
	pm, _ := a.paymentMethodFor(cs, tc)
	si.data["status"] = "succeeded"
	si.data["customer"] = pm.data["customer"]
	si.data["payment_method"] = pm.id
	si.data["last_setup_error"] = nil
	a.put(si)
	cs.data["status"] = "complete"
	a.put(cs)
	a.emit("payment_method.attached", pm, requestRef{})
	a.emit("setup_intent.succeeded", si, requestRef{})
	a.emit("checkout.session.completed", cs, requestRef{})
	return PayResult{Outcome: CardSucceeds, RedirectURL: successURL(cs)}
}

// createPaymentIntent is POST /v1/payment_intents; with confirm=true it is
// confirmed at once (see confirmPaymentIntent).
func (a *Account) createPaymentIntent(form url.Values, req requestRef) (*object, error) {
	amount, err := strconv.ParseInt(form.Get("amount"), 10, 64)
	if err != nil || amount < 1 {
		return nil, invalid("amount", "Invalid positive integer: %q", form.Get("amount"))
	}
	currency := strings.ToLower(form.Get("currency"))
	if currency == "" {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "currency", Message: "Missing required param: currency."}
	}
	customer := form.Get("customer")
	if customer != "" && a.get("customer", customer) == nil {
		return nil, missing("customer", customer)
	}
	pmID := form.Get("payment_method")
	if pmID != "" {
		pm := a.get("payment_method", pmID)
		if pm == nil {
			return nil, missing("payment_method", pmID)
		}
		if str(pm.data, "customer") != customer {
			return nil, invalid("payment_method", "The payment method %s does not belong to customer %s.", pmID, customer)
		}
	}
	status := "requires_payment_method"
	if pmID != "" {
		status = "requires_confirmation"
	}
	id := newID("pi")
	pi := a.create("payment_intent", id, map[string]any{
		"amount": amount, "amount_received": 0, "amount_capturable": 0, "currency": currency, "status": status,
		"customer": nullable(customer), "metadata": stringMap(bracketMap(form, "metadata")), "latest_charge": nil,
		"payment_method": nullable(pmID), "last_payment_error": nil, "next_action": nil, "cancellation_reason": nil,
		"canceled_at": nil, "capture_method": "automatic_async", "confirmation_method": "automatic",
		"payment_method_types": []any{"card"}, "client_secret": id + "_secret_" + strings.TrimPrefix(newID("s"), "s_"),
		"description": nullable(form.Get("description")), "setup_future_usage": nullable(form.Get("setup_future_usage")),
	})
	a.emit("payment_intent.created", pi, req)
	if form.Get("confirm") == "true" {
		return a.confirmPaymentIntent(pi, form.Get("off_session") == "true", req)
	}
	return pi, nil
}

// confirmPaymentIntent charges pi's payment method. Off-session, a card
// that always asks for authentication fails with authentication_required;
// on-session it waits for an authentication the API cannot give
// (requires_action). A decline answers 402 with the PaymentIntent in the error.
func (a *Account) confirmPaymentIntent(pi *object, offSession bool, req requestRef) (*object, error) {
	if s := str(pi.data, "status"); s != "requires_confirmation" && s != "requires_payment_method" {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "payment_intent_unexpected_state",
			Message: fmt.Sprintf("This PaymentIntent's status is %s, so it cannot be confirmed.", s)}
	}
	pm := a.get("payment_method", str(pi.data, "payment_method"))
	if pm == nil {
		return nil, invalid("payment_method", "You cannot confirm this PaymentIntent because it's missing a payment method.")
	}
	tc, _ := LookupCard(str(pm.private, "card"))
	fail := func(code, declineCode, message string, ch *object) (*object, error) {
		pi.data["status"] = "requires_payment_method"
		perr := map[string]any{"type": "card_error", "code": code, "decline_code": declineCode, "message": message, "payment_method": clone(pm.data)}
		if ch != nil {
			pi.data["latest_charge"] = ch.id
			perr["charge"] = ch.id
		}
		pi.data["last_payment_error"] = perr
		a.put(pi)
		if ch != nil {
			a.emit("charge.failed", ch, req)
		}
		a.emit("payment_intent.payment_failed", pi, req)
		return nil, &Error{Status: http.StatusPaymentRequired, Type: "card_error", Code: code, DeclineCode: declineCode, Message: message, PaymentIntent: clone(pi.data)}
	}
	switch {
	case tc.Outcome == CardDeclined || tc.Outcome == CardSavesThenDeclines:
		return fail("card_declined", tc.DeclineCode, tc.Message, a.newCharge(pi, tc, false, ""))
	case tc.Outcome == CardAuthenticate && offSession:
		return fail("authentication_required", "authentication_required", "Your card was declined. This transaction requires authentication.", nil)
	case tc.Outcome == CardAuthenticate || (tc.Outcome == CardAuthenticateOnce && !offSession):
		pi.data["status"] = "requires_action"
		pi.data["next_action"] = map[string]any{"type": "use_stripe_sdk"}
		a.put(pi)
		a.emit("payment_intent.requires_action", pi, req)
		return pi, nil
	}
	ch := a.newCharge(pi, tc, true, "")
	ch.data["payment_method"] = pm.id
	a.put(ch)
	pi.data["status"] = "succeeded"
	pi.data["amount_received"] = num(pi.data, "amount")
	pi.data["latest_charge"] = ch.id
	pi.data["last_payment_error"] = nil
	a.put(pi)
	a.emit("charge.succeeded", ch, req)
	a.emit("payment_intent.succeeded", pi, req)
	if tc.Outcome == CardDisputed {
		a.openDispute(ch, "fraudulent")
	}
	return pi, nil
}

// customerPaymentMethods is GET /v1/customers/{id}/payment_methods.
func (a *Account) customerPaymentMethods(customer string) (map[string]any, error) {
	if a.get("customer", customer) == nil {
		return nil, missing("customer", customer)
	}
	data := []any{}
	pms := a.list("payment_method")
	for i := len(pms) - 1; i >= 0; i-- {
		if str(pms[i].data, "customer") == customer {
			data = append(data, clone(pms[i].data))
		}
	}
	return map[string]any{"object": "list", "data": data, "has_more": false, "url": "/v1/customers/" + customer + "/payment_methods"}, nil
}
