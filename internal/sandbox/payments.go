package sandbox

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Error is an error as Stripe answers it: an HTTP status and the error
// object's fields.
type Error struct {
	Status      int
	Type        string // invalid_request_error, card_error, idempotency_error, api_error
	Code        string
	DeclineCode string
	Param       string
	Message     string
	// PaymentIntent is the PaymentIntent a card_error is about, as Stripe
	// puts it in the error of a declined confirmation.
	PaymentIntent map[string]any
}

func (e *Error) Error() string { return e.Message }

func invalid(param, format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Param: param, Message: fmt.Sprintf(format, args...)}
}

func missing(typ, id string) *Error {
	return &Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "resource_missing", Param: "id",
		Message: fmt.Sprintf("No such %s: '%s'", typ, id)}
}

// TestCard is one of Stripe's test card numbers and what paying with it does.
type TestCard struct {
	Number string
	Brand  string
	// Outcome is CardSucceeds, CardDeclined, CardAuthenticate or CardDisputed.
	Outcome     string
	DeclineCode string
	Message     string
	Description string
}

// Card outcomes.
const (
	CardSucceeds     = "succeeds"
	CardDeclined     = "declined"
	CardAuthenticate = "authenticate" // 3D Secure: an approve or fail step
	CardDisputed     = "disputed"     // succeeds, then the cardholder disputes it
	// CardAuthenticateOnce asks for authentication on-session; once saved,
	// off-session payments succeed without it.
	CardAuthenticateOnce = "authenticate_once"
	// CardSavesThenDeclines is saved (setup mode) but declined when charged.
	CardSavesThenDeclines = "saves_then_declines"
)

// TestCards are the card numbers the hosted checkout page takes, as in
// Stripe's test mode.
var TestCards = []TestCard{
	{Number: "4242424242424242", Brand: "visa", Outcome: CardSucceeds, Description: "succeeds"},
	{Number: "5555555555554444", Brand: "mastercard", Outcome: CardSucceeds, Description: "succeeds (Mastercard)"},
	{Number: "4000000000000002", Brand: "visa", Outcome: CardDeclined, DeclineCode: "generic_decline", Message: "Your card was declined.", Description: "declined"},
	{Number: "4000000000009995", Brand: "visa", Outcome: CardDeclined, DeclineCode: "insufficient_funds", Message: "Your card has insufficient funds.", Description: "declined: insufficient funds"},
	{Number: "4000002760003184", Brand: "visa", Outcome: CardAuthenticate, Description: "asks for authentication (approve or fail)"},
	{Number: "4000000000000259", Brand: "visa", Outcome: CardDisputed, Description: "succeeds, then a dispute opens"},
	{Number: "4000002500003155", Brand: "visa", Outcome: CardAuthenticateOnce, Description: "asks for authentication once; saved, pays off-session"},
	{Number: "4000000000000341", Brand: "visa", Outcome: CardSavesThenDeclines, DeclineCode: "generic_decline", Message: "Your card was declined.", Description: "can be saved, declined when charged"},
}

// LookupCard finds a test card by number (spaces and dashes ignored).
func LookupCard(number string) (TestCard, bool) {
	n := strings.NewReplacer(" ", "", "-", "").Replace(number)
	for _, c := range TestCards {
		if c.Number == n {
			return c, true
		}
	}
	return TestCard{}, false
}

// lineItem is what a Checkout Session sells, kept privately as Stripe
// keeps it (GET .../line_items shows it).
type lineItem struct {
	Name       string `json:"name"`
	Price      string `json:"price,omitempty"`
	UnitAmount int64  `json:"unit_amount"`
	Currency   string `json:"currency"`
	Quantity   int64  `json:"quantity"`
}

// CreateCustomer creates a customer from Stripe's form parameters.
func (a *Account) createCustomer(form url.Values) *object {
	c := a.create("customer", newID("cus"), map[string]any{
		"email":            nullable(form.Get("email")),
		"name":             nullable(form.Get("name")),
		"description":      nullable(form.Get("description")),
		"metadata":         stringMap(bracketMap(form, "metadata")),
		"invoice_settings": map[string]any{"default_payment_method": nil},
		"address":          formAddress(form),
		"tax_exempt":       "none",
	})
	// tax_id_data creates the customer's tax ids with it; the sandbox keeps
	// them on the customer (Stripe lists them under tax_ids).
	var ids []any
	for i := 0; ; i++ {
		typ := form.Get(fmt.Sprintf("tax_id_data[%d][type]", i))
		if typ == "" {
			break
		}
		ids = append(ids, map[string]any{"object": "tax_id", "type": typ, "value": form.Get(fmt.Sprintf("tax_id_data[%d][value]", i))})
	}
	c.data["tax_ids"] = map[string]any{"object": "list", "data": ids, "has_more": false}
	return c
}

// addressFields are the fields of a Stripe address hash.
var addressFields = []string{"line1", "line2", "city", "state", "postal_code", "country"}

// formAddress is the address[...] parameters as Stripe stores them, nil
// when none is given.
func formAddress(form url.Values) any {
	addr := map[string]any{}
	given := false
	for _, k := range addressFields {
		_, ok := form["address["+k+"]"]
		given = given || ok
		addr[k] = nullable(form.Get("address[" + k + "]"))
	}
	if !given {
		return nil
	}
	return addr
}

// updateCustomer applies Stripe's form parameters to customer id.
func (a *Account) updateCustomer(id string, form url.Values) (*object, error) {
	o := a.get("customer", id)
	if o == nil {
		return nil, missing("customer", id)
	}
	for _, k := range []string{"email", "name", "description"} {
		if _, ok := form[k]; ok {
			o.data[k] = nullable(form.Get(k))
		}
	}
	if addr := formAddress(form); addr != nil {
		o.data["address"] = addr
	}
	meta := sub(o.data, "metadata")
	if meta == nil {
		meta = map[string]any{}
	}
	for k, v := range bracketMap(form, "metadata") {
		if v == "" {
			delete(meta, k)
		} else {
			meta[k] = v
		}
	}
	o.data["metadata"] = meta
	if v, ok := form["invoice_settings[default_payment_method]"]; ok {
		pm := a.get("payment_method", v[0])
		if v[0] != "" && (pm == nil || str(pm.data, "customer") != id) {
			return nil, invalid("invoice_settings[default_payment_method]", "No such PaymentMethod of customer %s: '%s'", id, v[0])
		}
		o.data["invoice_settings"] = map[string]any{"default_payment_method": nullable(v[0])}
	}
	a.put(o)
	return o, nil
}

func (a *Account) createCheckoutSession(form url.Values) (*object, error) {
	mode := form.Get("mode")
	switch mode {
	case "":
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "mode", Message: "Missing required param: mode."}
	case "payment", "subscription", "setup":
	default:
		return nil, invalid("mode", "Invalid mode: %s (the sandbox knows payment, subscription and setup).", mode)
	}
	if form.Get("success_url") == "" {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_missing", Param: "success_url", Message: "Missing required param: success_url."}
	}
	now := a.now()
	expiresAt := now.Add(24 * time.Hour).Unix()
	if v := form.Get("expires_at"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "parameter_invalid_integer", Param: "expires_at", Message: "Invalid integer: " + v}
		}
		expiresAt = n
	}
	var items []lineItem
	for i := 0; ; i++ {
		p := fmt.Sprintf("line_items[%d]", i)
		price, unit := form.Get(p+"[price]"), form.Get(p+"[price_data][unit_amount]")
		if price == "" && unit == "" {
			break
		}
		li := lineItem{Price: price, Quantity: 1, Currency: strings.ToLower(form.Get(p + "[price_data][currency]")), Name: form.Get(p + "[price_data][product_data][name]")}
		if q := form.Get(p + "[quantity]"); q != "" {
			n, err := strconv.ParseInt(q, 10, 64)
			if err != nil || n < 1 {
				return nil, invalid(p+"[quantity]", "Invalid quantity: %s", q)
			}
			li.Quantity = n
		}
		if unit != "" {
			n, err := strconv.ParseInt(unit, 10, 64)
			if err != nil || n < 0 {
				return nil, invalid(p+"[price_data][unit_amount]", "Invalid integer: %s", unit)
			}
			li.UnitAmount = n
		}
		if price != "" {
			// A Stripe Price the sandbox does not hold: a metered price,
			// charged nothing up front.
			li.Name, li.Currency = price, "usd"
		}
		items = append(items, li)
	}
	var currency any
	var subtotal any
	if len(items) > 0 {
		total := int64(0)
		for _, li := range items {
			total += li.UnitAmount * li.Quantity
		}
		currency, subtotal = items[0].Currency, total
	}
	id := newID("cs_test")
	o := a.create("checkout.session", id, map[string]any{
		"url":                  strings.TrimSuffix(a.opts.PublicURL, "/") + "/sandbox/checkout/" + id,
		"expires_at":           expiresAt,
		"mode":                 mode,
		"status":               "open",
		"payment_status":       "unpaid",
		"payment_intent":       nil,
		"subscription":         nil,
		"invoice":              nil,
		"customer":             nullable(form.Get("customer")),
		"customer_email":       nullable(form.Get("customer_email")),
		"customer_details":     nil,
		"client_reference_id":  nullable(form.Get("client_reference_id")),
		"success_url":          form.Get("success_url"),
		"cancel_url":           nullable(form.Get("cancel_url")),
		"metadata":             stringMap(bracketMap(form, "metadata")),
		"currency":             currency,
		"amount_subtotal":      subtotal,
		"amount_total":         subtotal,
		"total_details":        map[string]any{"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
		"currency_conversion":  nil,
		"payment_method_types": []any{"card"},
		"invoice_creation":     map[string]any{"enabled": form.Get("invoice_creation[enabled]") == "true"},
	})
	o.private["line_items"] = items
	o.private["payment_intent_metadata"] = stringMap(bracketMap(form, "payment_intent_data[metadata]"))
	o.private["subscription_metadata"] = stringMap(bracketMap(form, "subscription_data[metadata]"))
	o.private["setup_intent_metadata"] = stringMap(bracketMap(form, "setup_intent_data[metadata]"))
	if v := form.Get("payment_intent_data[setup_future_usage]"); v != "" {
		if v != "off_session" && v != "on_session" {
			return nil, invalid("payment_intent_data[setup_future_usage]", "Invalid setup_future_usage: %s", v)
		}
		o.private["setup_future_usage"] = v
	}
	if mode == "setup" {
		o.data["payment_status"] = "no_payment_required"
		o.data["setup_intent"] = nil
		o.data["currency"] = nullable(strings.ToLower(form.Get("currency")))
	}
	return o, nil
}

// lineItems reads a session's private line items (as written, or as loaded).
func lineItems(o *object) []lineItem {
	switch v := o.private["line_items"].(type) {
	case []lineItem:
		return v
	case []any:
		var out []lineItem
		for _, x := range v {
			m, _ := x.(map[string]any)
			out = append(out, lineItem{Name: str(m, "name"), Price: str(m, "price"), UnitAmount: num(m, "unit_amount"),
				Currency: str(m, "currency"), Quantity: num(m, "quantity")})
		}
		return out
	}
	return nil
}

// CheckoutView is what the hosted checkout page shows of a session.
type CheckoutView struct {
	ID, Mode, Status, PaymentStatus string
	Currency                        string
	AmountTotal                     int64
	Items                           []lineItem
	Email                           string
	SuccessURL, CancelURL           string
	ExpiresAt                       time.Time
	// AwaitingAuthentication is set while a card asks for 3D Secure.
	AwaitingAuthentication bool
	// LastError is the last decline, shown on the page.
	LastError string
}

// Checkout returns what the hosted page shows of session id.
// Errors: *Error (no such session).
func (a *Account) Checkout(ctx context.Context, id string) (CheckoutView, error) {
	if err := a.lockRead(ctx); err != nil {
		return CheckoutView{}, err
	}
	defer a.mu.Unlock()
	o := a.get("checkout.session", id)
	if o == nil {
		return CheckoutView{}, missing("checkout.session", id)
	}
	v := CheckoutView{ID: id, Mode: str(o.data, "mode"), Status: str(o.data, "status"), PaymentStatus: str(o.data, "payment_status"),
		Currency: str(o.data, "currency"), AmountTotal: num(o.data, "amount_total"), Items: lineItems(o),
		Email: str(o.data, "customer_email"), SuccessURL: successURL(o), CancelURL: str(o.data, "cancel_url"),
		ExpiresAt: time.Unix(num(o.data, "expires_at"), 0)}
	if d := sub(o.data, "customer_details"); d != nil && str(d, "email") != "" {
		v.Email = str(d, "email")
	}
	if pi := a.get("payment_intent", str(o.data, "payment_intent")); pi != nil {
		v.AwaitingAuthentication = str(pi.data, "status") == "requires_action"
		if e := sub(pi.data, "last_payment_error"); e != nil && str(pi.data, "status") == "requires_payment_method" {
			v.LastError = str(e, "message")
		}
	}
	return v, nil
}

// PayResult is what a payment attempt on the hosted page came to.
type PayResult struct {
	// Outcome is CardSucceeds, CardDeclined or CardAuthenticate.
	Outcome string
	Message string
	// RedirectURL is the session's success_url (with {CHECKOUT_SESSION_ID}
	// replaced) once paid.
	RedirectURL string
}

// Pay is the buyer submitting the hosted checkout page of session id with
// a test card: Stripe's events follow in Stripe's order (see the package's
// README section). A declined card leaves the session open for another try.
// Errors: *Error (no such session, not open, expired, not a test card).
func (a *Account) Pay(ctx context.Context, id, card, email string) (PayResult, error) {
	var res PayResult
	err := a.do(ctx, func() error {
		cs, err := a.openSession(id)
		if err != nil {
			return err
		}
		tc, ok := LookupCard(card)
		if !ok {
			return &Error{Status: http.StatusPaymentRequired, Type: "card_error", Code: "incorrect_number",
				Message: "Your card number is not one of the sandbox's test cards (use 4242 4242 4242 4242)."}
		}
		if email != "" {
			cs.data["customer_details"] = map[string]any{"email": email}
			a.put(cs)
		}
		switch str(cs.data, "mode") {
		case "subscription":
			res = a.completeSubscription(cs, tc)
			return nil
		case "setup":
			res = a.completeSetup(cs, tc)
			return nil
		}
		pi := a.paymentIntentFor(cs)
		switch tc.Outcome {
		case CardDeclined, CardSavesThenDeclines:
			a.decline(cs, pi, tc)
			res = PayResult{Outcome: CardDeclined, Message: tc.Message}
		case CardAuthenticate, CardAuthenticateOnce:
			pi.data["status"] = "requires_action"
			pi.data["next_action"] = map[string]any{"type": "use_stripe_sdk"}
			pi.data["last_payment_error"] = nil
			pi.private["card"] = tc.Number
			a.put(pi)
			a.emit("payment_intent.requires_action", pi, requestRef{})
			res = PayResult{Outcome: CardAuthenticate}
		default:
			res = a.succeed(cs, pi, tc)
		}
		return nil
	})
	return res, err
}

// Authenticate is the buyer's answer to the 3D Secure step of session id:
// approved, the payment succeeds; failed, the PaymentIntent fails with
// payment_intent_authentication_failure and the session stays open.
// Errors: *Error (no such session, nothing to authenticate).
func (a *Account) Authenticate(ctx context.Context, id string, approve bool) (PayResult, error) {
	var res PayResult
	err := a.do(ctx, func() error {
		cs, err := a.openSession(id)
		if err != nil {
			return err
		}
		pi := a.get("payment_intent", str(cs.data, "payment_intent"))
		if pi == nil || str(pi.data, "status") != "requires_action" {
			return invalid("", "Checkout Session %s has no payment waiting for authentication.", id)
		}
		tc, _ := LookupCard(str(pi.private, "card"))
		if approve {
			res = a.succeed(cs, pi, tc)
			return nil
		}
		msg := "We are unable to authenticate your payment method. Please choose a different payment method and try again."
		pi.data["status"] = "requires_payment_method"
		pi.data["next_action"] = nil
		pi.data["last_payment_error"] = map[string]any{"type": "invalid_request_error", "code": "payment_intent_authentication_failure",
			"message": msg, "payment_method": paymentMethod(tc)}
		a.put(pi)
		a.emit("payment_intent.payment_failed", pi, requestRef{})
		res = PayResult{Outcome: CardDeclined, Message: msg}
		return nil
	})
	return res, err
}

// openSession is session id if it can still be paid (a.mu held); a session
// past its expires_at expires now.
func (a *Account) openSession(id string) (*object, error) {
	cs := a.get("checkout.session", id)
	if cs == nil {
		return nil, missing("checkout.session", id)
	}
	if str(cs.data, "status") == "open" && !a.now().Before(time.Unix(num(cs.data, "expires_at"), 0)) {
		a.expire(cs)
	}
	if s := str(cs.data, "status"); s != "open" {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "checkout_session_" + s,
			Message: fmt.Sprintf("This Checkout Session is %s and can no longer be paid.", s)}
	}
	return cs, nil
}

// paymentIntentFor returns the session's PaymentIntent, created (with
// payment_intent.created) at the first attempt to pay, as Stripe does.
func (a *Account) paymentIntentFor(cs *object) *object {
	if pi := a.get("payment_intent", str(cs.data, "payment_intent")); pi != nil {
		return pi
	}
	meta := metadataCopy(sub(cs.private, "payment_intent_metadata"))
	id := newID("pi")
	pi := a.create("payment_intent", id, map[string]any{
		"amount":               num(cs.data, "amount_total"),
		"amount_received":      0,
		"amount_capturable":    0,
		"currency":             cs.data["currency"],
		"status":               "requires_payment_method",
		"customer":             cs.data["customer"],
		"metadata":             meta,
		"latest_charge":        nil,
		"payment_method":       nil,
		"last_payment_error":   nil,
		"next_action":          nil,
		"cancellation_reason":  nil,
		"canceled_at":          nil,
		"capture_method":       "automatic_async",
		"confirmation_method":  "automatic",
		"payment_method_types": []any{"card"},
		"client_secret":        id + "_secret_" + strings.TrimPrefix(newID("s"), "s_"),
		"description":          nil,
		"setup_future_usage":   nil,
	})
	cs.data["payment_intent"] = id
	a.put(cs)
	a.emit("payment_intent.created", pi, requestRef{})
	return pi
}

func paymentMethod(tc TestCard) map[string]any {
	last4 := ""
	if len(tc.Number) >= 4 {
		last4 = tc.Number[len(tc.Number)-4:]
	}
	return map[string]any{"type": "card", "card": map[string]any{"brand": tc.Brand, "last4": last4, "exp_month": 12, "exp_year": time.Now().Year() + 3}}
}

// newCharge creates the charge of one attempt at pi with card tc.
func (a *Account) newCharge(pi *object, tc TestCard, succeeded bool, email string) *object {
	pm := paymentMethod(tc)
	ch := a.create("charge", newID("ch"), map[string]any{
		"amount":                 num(pi.data, "amount"),
		"amount_captured":        0,
		"amount_refunded":        0,
		"captured":               false,
		"paid":                   false,
		"refunded":               false,
		"disputed":               false,
		"status":                 "failed",
		"currency":               pi.data["currency"],
		"customer":               pi.data["customer"],
		"payment_intent":         pi.id,
		"metadata":               metadataCopy(sub(pi.data, "metadata")),
		"payment_method_details": pm,
		"billing_details":        map[string]any{"email": nullable(email)},
		"receipt_email":          nullable(email),
		"refunds":                map[string]any{"object": "list", "data": []any{}, "has_more": false, "total_count": 0},
		"failure_code":           nil,
		"failure_message":        nil,
		"outcome":                nil,
	})
	if succeeded {
		ch.data["amount_captured"] = num(pi.data, "amount")
		ch.data["captured"], ch.data["paid"], ch.data["status"] = true, true, "succeeded"
		ch.data["balance_transaction"] = newID("txn")
		ch.data["outcome"] = map[string]any{"network_status": "approved_by_network", "type": "authorized", "seller_message": "Payment complete.", "risk_level": "normal"}
	} else {
		ch.data["failure_code"], ch.data["failure_message"] = "card_declined", tc.Message
		ch.data["outcome"] = map[string]any{"network_status": "declined_by_network", "type": "issuer_declined", "reason": tc.DeclineCode, "seller_message": "The bank did not return any further details with this decline."}
	}
	a.put(ch)
	return ch
}

func sessionEmail(cs *object) string {
	if d := sub(cs.data, "customer_details"); d != nil {
		return str(d, "email")
	}
	return str(cs.data, "customer_email")
}

// decline is a card refused by the issuer: charge.failed, then
// payment_intent.payment_failed; the session stays open.
func (a *Account) decline(cs, pi *object, tc TestCard) {
	ch := a.newCharge(pi, tc, false, sessionEmail(cs))
	pi.data["status"] = "requires_payment_method"
	pi.data["latest_charge"] = ch.id
	pi.data["next_action"] = nil
	pi.data["last_payment_error"] = map[string]any{"type": "card_error", "code": "card_declined", "decline_code": tc.DeclineCode,
		"message": tc.Message, "charge": ch.id, "payment_method": paymentMethod(tc)}
	a.put(pi)
	a.emit("charge.failed", ch, requestRef{})
	a.emit("payment_intent.payment_failed", pi, requestRef{})
}

// succeed is a card accepted: charge.succeeded, payment_intent.succeeded,
// then (an invoice first, when the session asked for one) the session's
// checkout.session.completed, and the invoice's own events after it.
func (a *Account) succeed(cs, pi *object, tc TestCard) PayResult {
	email := sessionEmail(cs)
	ch := a.newCharge(pi, tc, true, email)
	pi.data["status"] = "succeeded"
	pi.data["amount_received"] = num(pi.data, "amount")
	pi.data["latest_charge"] = ch.id
	pm, attached := a.paymentMethodFor(cs, tc)
	pi.data["payment_method"] = pm.id
	if attached {
		pi.data["setup_future_usage"] = cs.private["setup_future_usage"]
		pi.data["customer"] = pm.data["customer"]
		ch.data["customer"] = pm.data["customer"]
		ch.data["payment_method"] = pm.id
		a.put(ch)
	}
	pi.data["last_payment_error"] = nil
	pi.data["next_action"] = nil
	delete(pi.private, "card")
	a.put(pi)
	if attached {
		a.emit("payment_method.attached", pm, requestRef{})
	}
	a.emit("charge.succeeded", ch, requestRef{})
	a.emit("payment_intent.succeeded", pi, requestRef{})

	var inv *object
	if ic := sub(cs.data, "invoice_creation"); ic != nil && flag(ic, "enabled") {
		inv = a.paidInvoiceFor(cs, pi)
		cs.data["invoice"] = inv.id
	}
	cs.data["status"] = "complete"
	cs.data["payment_status"] = "paid"
	a.put(cs)
	a.emit("checkout.session.completed", cs, requestRef{})
	if inv != nil {
		for _, t := range []string{"invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded"} {
			a.emit(t, inv, requestRef{})
		}
	}
	if tc.Outcome == CardDisputed {
		a.openDispute(ch, "fraudulent")
	}
	return PayResult{Outcome: CardSucceeds, RedirectURL: successURL(cs)}
}

// completeSubscription pays a subscription session: the subscription
// starts (customer.subscription.created) and the session completes. The
// sandbox does not hold the Stripe Prices a subscription names, so it
// charges nothing up front, as for a metered price.
func (a *Account) completeSubscription(cs *object, tc TestCard) PayResult {
	if tc.Outcome == CardDeclined {
		return PayResult{Outcome: CardDeclined, Message: tc.Message}
	}
	customer := str(cs.data, "customer")
	if customer == "" {
		c := a.createCustomer(url.Values{"email": {sessionEmail(cs)}})
		a.emit("customer.created", c, requestRef{})
		customer = c.id
		cs.data["customer"] = customer
	}
	meta := metadataCopy(sub(cs.private, "subscription_metadata"))
	var items []any
	for _, li := range lineItems(cs) {
		items = append(items, map[string]any{"object": "subscription_item", "price": map[string]any{"id": li.Price, "object": "price"}, "quantity": nil})
	}
	now := a.now()
	s := a.create("subscription", newID("sub"), map[string]any{
		"customer": customer, "status": "active", "metadata": meta,
		"items":                map[string]any{"object": "list", "data": items},
		"current_period_start": now.Unix(), "cancel_at_period_end": false, "collection_method": "charge_automatically",
	})
	cs.data["subscription"] = s.id
	cs.data["status"] = "complete"
	cs.data["payment_status"] = "paid"
	a.put(cs)
	a.emit("customer.subscription.created", s, requestRef{})
	a.emit("checkout.session.completed", cs, requestRef{})
	return PayResult{Outcome: CardSucceeds, RedirectURL: successURL(cs)}
}

func successURL(cs *object) string {
	return strings.ReplaceAll(str(cs.data, "success_url"), "{CHECKOUT_SESSION_ID}", cs.id)
}

// expire ends an open session: its PaymentIntent, when one was started
// and not paid, is canceled (payment_intent.canceled), then
// checkout.session.expired.
func (a *Account) expire(cs *object) {
	if pi := a.get("payment_intent", str(cs.data, "payment_intent")); pi != nil && str(pi.data, "status") != "succeeded" && str(pi.data, "status") != "canceled" {
		pi.data["status"] = "canceled"
		pi.data["cancellation_reason"] = "abandoned"
		pi.data["canceled_at"] = a.now().Unix()
		a.put(pi)
		a.emit("payment_intent.canceled", pi, requestRef{})
	}
	cs.data["status"] = "expired"
	a.put(cs)
	a.emit("checkout.session.expired", cs, requestRef{})
}

// ExpireSession expires open session id now, as
// POST /v1/checkout/sessions/{id}/expire does. Errors: *Error.
func (a *Account) ExpireSession(ctx context.Context, id string) error {
	return a.do(ctx, func() error {
		_, err := a.expireSession(id)
		return err
	})
}

func (a *Account) expireSession(id string) (*object, error) {
	cs := a.get("checkout.session", id)
	if cs == nil {
		return nil, missing("checkout.session", id)
	}
	if str(cs.data, "status") != "open" {
		return nil, invalid("", "Only Checkout Sessions with a status in [\"open\"] can be expired; this one is %s.", str(cs.data, "status"))
	}
	a.expire(cs)
	return cs, nil
}

// ExpireDue expires every open session past its expires_at, as Stripe
// does on its own; it returns how many.
func (a *Account) ExpireDue(ctx context.Context) (int, error) {
	n := 0
	err := a.do(ctx, func() error {
		now := a.now()
		for _, cs := range a.list("checkout.session") {
			if str(cs.data, "status") == "open" && !now.Before(time.Unix(num(cs.data, "expires_at"), 0)) {
				a.expire(cs)
				n++
			}
		}
		return nil
	})
	return n, err
}

// PayCheckoutSession marks session id paid by PaymentIntent piID without
// any event, as Stripe shows it once paid: for tests that deliver the
// events themselves. It returns the session, nil when unknown.
func (a *Account) PayCheckoutSession(ctx context.Context, id, piID string) (map[string]any, error) {
	return a.SetFields(ctx, id, map[string]any{"status": "complete", "payment_status": "paid", "payment_intent": piID})
}

// Refund refunds amount (0: what is left) of the charge of PaymentIntent or
// charge id: charge.refunded with the charge's cumulative
// amount_refunded, then refund.created. Errors: *Error (unknown, not
// paid, nothing left to refund, more than is left, disputed).
func (a *Account) Refund(ctx context.Context, id string, amount int64, reason string) (map[string]any, error) {
	var out map[string]any
	err := a.do(ctx, func() error {
		re, err := a.refund(id, amount, reason, requestRef{})
		if err != nil {
			return err
		}
		out = clone(re.data)
		return nil
	})
	return out, err
}

func (a *Account) chargeOf(id string) (*object, error) {
	if ch := a.get("charge", id); ch != nil {
		return ch, nil
	}
	pi := a.get("payment_intent", id)
	if pi == nil {
		return nil, missing("charge or payment_intent", id)
	}
	ch := a.get("charge", str(pi.data, "latest_charge"))
	if ch == nil || str(pi.data, "status") != "succeeded" {
		return nil, invalid("payment_intent", "PaymentIntent %s has no successful charge to refund.", id)
	}
	return ch, nil
}

func (a *Account) refund(id string, amount int64, reason string, req requestRef) (*object, error) {
	ch, err := a.chargeOf(id)
	if err != nil {
		return nil, err
	}
	if str(ch.data, "status") != "succeeded" {
		return nil, invalid("charge", "Charge %s has not succeeded; there is nothing to refund.", ch.id)
	}
	if d := a.get("dispute", str(ch.private, "dispute")); d != nil {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "charge_disputed",
			Message: fmt.Sprintf("Charge %s has been charged back; cannot issue a refund.", ch.id)}
	}
	left := num(ch.data, "amount") - num(ch.data, "amount_refunded")
	if amount == 0 {
		amount = left
	}
	if left <= 0 {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "charge_already_refunded",
			Message: fmt.Sprintf("Charge %s has already been refunded.", ch.id)}
	}
	if amount < 0 || amount > left {
		return nil, invalid("amount", "Refund amount (%d) is greater than unrefunded amount on charge (%d).", amount, left)
	}
	re := a.create("refund", newID("re"), map[string]any{
		"amount": amount, "charge": ch.id, "payment_intent": ch.data["payment_intent"], "currency": ch.data["currency"],
		"status": "succeeded", "reason": nullable(reason), "metadata": map[string]any{}, "balance_transaction": newID("txn"),
	})
	refunded := num(ch.data, "amount_refunded") + amount
	ch.data["amount_refunded"] = refunded
	ch.data["refunded"] = refunded == num(ch.data, "amount")
	list := sub(ch.data, "refunds")
	if list == nil {
		list = map[string]any{"object": "list", "has_more": false}
	}
	prev, _ := list["data"].([]any)
	list["data"] = append([]any{clone(re.data)}, prev...)
	list["total_count"] = len(prev) + 1
	ch.data["refunds"] = list
	a.put(ch)
	a.emit("charge.refunded", ch, req)
	a.emit("refund.created", re, req)
	return re, nil
}

// OpenDispute is the cardholder disputing the charge of PaymentIntent or
// charge id: the funds are withdrawn at once (charge.dispute.created, then
// charge.dispute.funds_withdrawn), the dispute needing a response.
// Errors: *Error (unknown, not paid, already disputed).
func (a *Account) OpenDispute(ctx context.Context, id, reason string) (map[string]any, error) {
	var out map[string]any
	err := a.do(ctx, func() error {
		ch, err := a.chargeOf(id)
		if err != nil {
			return err
		}
		if str(ch.data, "status") != "succeeded" {
			return invalid("charge", "Charge %s has not succeeded; it cannot be disputed.", ch.id)
		}
		if ch.private["dispute"] != nil {
			return invalid("charge", "Charge %s is already disputed.", ch.id)
		}
		if reason == "" {
			reason = "fraudulent"
		}
		out = clone(a.openDispute(ch, reason).data)
		return nil
	})
	return out, err
}

func (a *Account) openDispute(ch *object, reason string) *object {
	amount := num(ch.data, "amount") - num(ch.data, "amount_refunded")
	now := a.now()
	d := a.create("dispute", newID("dp"), map[string]any{
		"amount": amount, "charge": ch.id, "payment_intent": ch.data["payment_intent"], "currency": ch.data["currency"],
		"status": "needs_response", "reason": reason, "is_charge_refundable": false, "metadata": map[string]any{},
		"evidence_details": map[string]any{"due_by": now.Add(7 * 24 * time.Hour).Unix(), "has_evidence": false, "past_due": false, "submission_count": 0},
		"balance_transactions": []any{map[string]any{"object": "balance_transaction", "id": newID("txn"), "amount": -amount, "type": "adjustment",
			"currency": ch.data["currency"], "description": "Chargeback withdrawal for " + ch.id}},
	})
	ch.private["dispute"] = d.id
	ch.data["disputed"] = true
	a.put(ch)
	a.emit("charge.dispute.created", d, requestRef{})
	a.emit("charge.dispute.funds_withdrawn", d, requestRef{})
	return d
}

// CloseDispute decides dispute id (or the open dispute of a PaymentIntent
// or charge id). Won: evidence is submitted (charge.dispute.updated, under
// review), the dispute closes won (charge.dispute.closed) and the funds
// come back (charge.dispute.funds_reinstated). Lost: charge.dispute.closed.
// Errors: *Error (unknown, already closed).
func (a *Account) CloseDispute(ctx context.Context, id string, won bool) (map[string]any, error) {
	var out map[string]any
	err := a.do(ctx, func() error {
		d := a.get("dispute", id)
		if d == nil {
			if ch, err := a.chargeOf(id); err == nil {
				d = a.get("dispute", str(ch.private, "dispute"))
			}
		}
		if d == nil {
			return missing("dispute", id)
		}
		switch str(d.data, "status") {
		case "won", "lost", "warning_closed", "prevented":
			return invalid("", "Dispute %s is already closed (%s).", d.id, str(d.data, "status"))
		}
		if !won {
			d.data["status"] = "lost"
			a.put(d)
			a.emit("charge.dispute.closed", d, requestRef{})
			out = clone(d.data)
			return nil
		}
		if str(d.data, "status") != "under_review" {
			d.data["status"] = "under_review"
			if ed := sub(d.data, "evidence_details"); ed != nil {
				ed["has_evidence"] = true
				ed["submission_count"] = num(ed, "submission_count") + 1
			}
			a.put(d)
			a.emit("charge.dispute.updated", d, requestRef{})
		}
		d.data["status"] = "won"
		txns, _ := d.data["balance_transactions"].([]any)
		d.data["balance_transactions"] = append(txns, map[string]any{"object": "balance_transaction", "id": newID("txn"),
			"amount": num(d.data, "amount"), "type": "adjustment", "currency": d.data["currency"], "description": "Chargeback reversal for " + str(d.data, "charge")})
		a.put(d)
		a.emit("charge.dispute.closed", d, requestRef{})
		a.emit("charge.dispute.funds_reinstated", d, requestRef{})
		out = clone(d.data)
		return nil
	})
	return out, err
}
