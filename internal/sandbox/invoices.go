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

// Invoices follow Stripe's lifecycle: draft → open (finalize) → paid, void
// or uncollectible. Each move sends its event: invoice.created,
// invoice.finalized, invoice.sent, invoice.paid with
// invoice.payment_succeeded, invoice.voided, invoice.marked_uncollectible.
// Paying an invoice here settles it out of band: no PaymentIntent or charge
// is created for it.

func (a *Account) newInvoice(customer, currency, collection string, daysUntilDue int64, meta map[string]any) *object {
	now := a.now()
	var due any
	if collection == "send_invoice" {
		due = now.Add(time.Duration(daysUntilDue) * 24 * time.Hour).Unix()
	}
	return a.create("invoice", newID("in"), map[string]any{
		"customer": customer, "currency": currency, "status": "draft", "collection_method": collection,
		"amount_due": 0, "amount_paid": 0, "amount_remaining": 0, "subtotal": 0, "total": 0,
		"lines":  map[string]any{"object": "list", "data": []any{}, "has_more": false, "total_count": 0},
		"number": nil, "hosted_invoice_url": nil, "invoice_pdf": nil, "due_date": due, "metadata": meta,
		"custom_fields": nil, "description": nil, "auto_advance": false,
		"status_transitions": map[string]any{"finalized_at": nil, "paid_at": nil, "voided_at": nil, "marked_uncollectible_at": nil},
	})
}

// createInvoice is POST /v1/invoices.
func (a *Account) createInvoice(form url.Values, req requestRef) (*object, error) {
	customer := form.Get("customer")
	if a.get("customer", customer) == nil {
		return nil, missing("customer", customer)
	}
	collection := form.Get("collection_method")
	if collection == "" {
		collection = "charge_automatically"
	}
	if collection != "charge_automatically" && collection != "send_invoice" {
		return nil, invalid("collection_method", "Invalid collection_method: %s", collection)
	}
	days := int64(0)
	if v := form.Get("days_until_due"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return nil, invalid("days_until_due", "Invalid integer: %s", v)
		}
		days = n
	}
	if collection == "send_invoice" && form.Get("days_until_due") == "" && form.Get("due_date") == "" {
		return nil, invalid("days_until_due", "Invoices with collection_method=send_invoice need days_until_due or due_date.")
	}
	currency := strings.ToLower(form.Get("currency"))
	if currency == "" {
		currency = "usd"
	}
	inv := a.newInvoice(customer, currency, collection, days, stringMap(bracketMap(form, "metadata")))
	inv.data["description"] = nullable(form.Get("description"))
	var fields []any
	for i := 0; ; i++ {
		name := form.Get(fmt.Sprintf("custom_fields[%d][name]", i))
		if name == "" {
			break
		}
		fields = append(fields, map[string]any{"name": name, "value": form.Get(fmt.Sprintf("custom_fields[%d][value]", i))})
	}
	if fields != nil {
		inv.data["custom_fields"] = fields
	}
	a.put(inv)
	a.emit("invoice.created", inv, req)
	return inv, nil
}

// createInvoiceItem is POST /v1/invoiceitems: one line on a draft invoice.
func (a *Account) createInvoiceItem(form url.Values, req requestRef) (*object, error) {
	inv := a.get("invoice", form.Get("invoice"))
	if inv == nil {
		return nil, missing("invoice", form.Get("invoice"))
	}
	if str(inv.data, "status") != "draft" {
		return nil, invalid("invoice", "Invoice %s is %s; items can be added only to a draft.", inv.id, str(inv.data, "status"))
	}
	quantity := int64(1)
	if v := form.Get("quantity"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 {
			return nil, invalid("quantity", "Invalid quantity: %s", v)
		}
		quantity = n
	}
	var amount int64
	switch {
	case form.Get("amount") != "":
		n, err := strconv.ParseInt(form.Get("amount"), 10, 64)
		if err != nil || n < 0 {
			return nil, invalid("amount", "Invalid integer: %s", form.Get("amount"))
		}
		amount = n
	case form.Get("unit_amount") != "" || form.Get("price_data[unit_amount]") != "":
		raw := form.Get("unit_amount")
		if raw == "" {
			raw = form.Get("price_data[unit_amount]")
		}
		n, err := strconv.ParseInt(raw, 10, 64)
		if err != nil || n < 0 {
			return nil, invalid("unit_amount", "Invalid integer: %s", raw)
		}
		amount = n * quantity
	default:
		return nil, invalid("amount", "Missing required param: amount (or unit_amount).")
	}
	currency := strings.ToLower(form.Get("currency"))
	if currency == "" {
		currency = strings.ToLower(form.Get("price_data[currency]"))
	}
	if currency != "" && currency != str(inv.data, "currency") {
		if lines, _ := sub(inv.data, "lines")["data"].([]any); len(lines) > 0 {
			return nil, invalid("currency", "The invoice is in %s, not %s.", str(inv.data, "currency"), currency)
		}
		inv.data["currency"] = currency
	}
	item := a.create("invoiceitem", newID("ii"), map[string]any{
		"customer": inv.data["customer"], "invoice": inv.id, "amount": amount, "currency": inv.data["currency"],
		"quantity": quantity, "description": nullable(form.Get("description")), "metadata": stringMap(bracketMap(form, "metadata")),
	})
	lines := sub(inv.data, "lines")
	data, _ := lines["data"].([]any)
	lines["data"] = append(data, map[string]any{"id": newID("il"), "object": "line_item", "amount": amount, "currency": inv.data["currency"],
		"description": item.data["description"], "quantity": quantity, "invoice_item": item.id})
	lines["total_count"] = len(data) + 1
	total := num(inv.data, "total") + amount
	inv.data["subtotal"], inv.data["total"], inv.data["amount_due"], inv.data["amount_remaining"] = total, total, total, total
	a.put(inv)
	a.emit("invoiceitem.created", item, req)
	return item, nil
}

// finalizeInvoice moves a draft to open, with its number and hosted page.
func (a *Account) finalizeInvoice(id string, req requestRef) (*object, error) {
	inv := a.get("invoice", id)
	if inv == nil {
		return nil, missing("invoice", id)
	}
	if str(inv.data, "status") != "draft" {
		return nil, invalid("", "Invoice %s is %s; only a draft can be finalized.", id, str(inv.data, "status"))
	}
	n := 0
	for _, o := range a.list("invoice") {
		if o.data["number"] != nil {
			n++
		}
	}
	inv.data["status"] = "open"
	inv.data["number"] = fmt.Sprintf("SANDBOX-%04d", n+1)
	inv.data["hosted_invoice_url"] = strings.TrimSuffix(a.opts.PublicURL, "/") + "/sandbox/invoices/" + id
	sub(inv.data, "status_transitions")["finalized_at"] = a.now().Unix()
	a.put(inv)
	a.emit("invoice.finalized", inv, req)
	return inv, nil
}

func (a *Account) openInvoice(id string) (*object, error) {
	inv := a.get("invoice", id)
	if inv == nil {
		return nil, missing("invoice", id)
	}
	if s := str(inv.data, "status"); s != "open" {
		return nil, &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invoice_not_open",
			Message: fmt.Sprintf("Invoice %s is %s, not open.", id, s)}
	}
	return inv, nil
}

// sendInvoice is POST /v1/invoices/{id}/send: invoice.sent. As at Stripe,
// the customer needs an email to send it to.
func (a *Account) sendInvoice(id string, req requestRef) (*object, error) {
	inv, err := a.openInvoice(id)
	if err != nil {
		return nil, err
	}
	if c := a.get("customer", str(inv.data, "customer")); c == nil || str(c.data, "email") == "" {
		return nil, invalid("", "Missing email. In order to send an invoice, the customer %s must have a valid email.", str(inv.data, "customer"))
	}
	a.emit("invoice.sent", inv, req)
	return inv, nil
}

// payInvoice settles an open invoice: invoice.paid, invoice.payment_succeeded.
func (a *Account) payInvoice(id string, req requestRef) (*object, error) {
	inv, err := a.openInvoice(id)
	if err != nil {
		return nil, err
	}
	inv.data["status"] = "paid"
	inv.data["amount_paid"] = num(inv.data, "amount_due")
	inv.data["amount_remaining"] = 0
	sub(inv.data, "status_transitions")["paid_at"] = a.now().Unix()
	a.put(inv)
	a.emit("invoice.paid", inv, req)
	a.emit("invoice.payment_succeeded", inv, req)
	return inv, nil
}

// voidInvoice is POST /v1/invoices/{id}/void: invoice.voided.
func (a *Account) voidInvoice(id string, req requestRef) (*object, error) {
	inv, err := a.openInvoice(id)
	if err != nil {
		return nil, err
	}
	inv.data["status"] = "void"
	sub(inv.data, "status_transitions")["voided_at"] = a.now().Unix()
	a.put(inv)
	a.emit("invoice.voided", inv, req)
	return inv, nil
}

// markUncollectible is POST /v1/invoices/{id}/mark_uncollectible.
func (a *Account) markUncollectible(id string, req requestRef) (*object, error) {
	inv, err := a.openInvoice(id)
	if err != nil {
		return nil, err
	}
	inv.data["status"] = "uncollectible"
	sub(inv.data, "status_transitions")["marked_uncollectible_at"] = a.now().Unix()
	a.put(inv)
	a.emit("invoice.marked_uncollectible", inv, req)
	return inv, nil
}

// paidInvoiceFor is the invoice Checkout creates after a one-time payment
// with invoice_creation enabled: already paid.
func (a *Account) paidInvoiceFor(cs, pi *object) *object {
	meta, _ := cs.private["payment_intent_metadata"].(map[string]any)
	inv := a.newInvoice(str(cs.data, "customer"), str(cs.data, "currency"), "charge_automatically", 0, metadataCopy(meta))
	amount := num(pi.data, "amount")
	inv.data["lines"] = map[string]any{"object": "list", "has_more": false, "total_count": 1, "data": []any{
		map[string]any{"id": newID("il"), "object": "line_item", "amount": amount, "currency": cs.data["currency"], "quantity": 1}}}
	inv.data["subtotal"], inv.data["total"], inv.data["amount_due"], inv.data["amount_paid"] = amount, amount, amount, amount
	inv.data["status"] = "paid"
	n := 0
	for _, o := range a.list("invoice") {
		if o.data["number"] != nil {
			n++
		}
	}
	inv.data["number"] = fmt.Sprintf("SANDBOX-%04d", n+1)
	inv.data["hosted_invoice_url"] = strings.TrimSuffix(a.opts.PublicURL, "/") + "/sandbox/invoices/" + inv.id
	now := a.now().Unix()
	inv.data["status_transitions"] = map[string]any{"finalized_at": now, "paid_at": now, "voided_at": nil, "marked_uncollectible_at": nil}
	// Paid by the session's PaymentIntent: what GET /v1/invoice_payments
	// answers for it.
	inv.private["payment_intent"] = pi.id
	a.put(inv)
	return inv
}

// invoicePayments is GET /v1/invoice_payments filtered by
// payment[payment_intent]: the invoices that PaymentIntent paid. Only
// Checkout's invoices have one here (payInvoice settles out of band), so
// a pay-by-invoice invoice has no invoice payment, and any other
// PaymentIntent an empty list (a.mu held).
func (a *Account) invoicePayments(q url.Values) (map[string]any, error) {
	if q.Get("payment[type]") != "payment_intent" || q.Get("payment[payment_intent]") == "" {
		return nil, invalid("payment", "The sandbox lists invoice payments only by payment[type]=payment_intent and payment[payment_intent].")
	}
	pi := q.Get("payment[payment_intent]")
	data := []any{}
	for _, inv := range a.list("invoice") {
		if str(inv.private, "payment_intent") != pi {
			continue
		}
		paidAt := sub(inv.data, "status_transitions")["paid_at"]
		data = append(data, map[string]any{
			"id": "inpay_" + strings.TrimPrefix(inv.id, "in_"), "object": "invoice_payment", "invoice": inv.id,
			"amount_paid": inv.data["amount_paid"], "amount_requested": inv.data["total"], "currency": inv.data["currency"],
			"is_default": true, "livemode": false, "status": "paid", "created": paidAt,
			"payment":            map[string]any{"type": "payment_intent", "payment_intent": pi},
			"status_transitions": map[string]any{"paid_at": paidAt, "canceled_at": nil},
		})
	}
	return map[string]any{"object": "list", "data": data, "has_more": false, "url": "/v1/invoice_payments"}, nil
}

// InvoiceAction applies a dashboard action (finalize, send, pay, void,
// mark_uncollectible) to invoice id. Errors: *Error.
func (a *Account) InvoiceAction(ctx context.Context, id, action string) (map[string]any, error) {
	var out map[string]any
	err := a.do(ctx, func() error {
		o, err := a.invoiceAction(id, action, requestRef{})
		if err != nil {
			return err
		}
		out = clone(o.data)
		return nil
	})
	return out, err
}

func (a *Account) invoiceAction(id, action string, req requestRef) (*object, error) {
	switch action {
	case "finalize":
		return a.finalizeInvoice(id, req)
	case "send":
		return a.sendInvoice(id, req)
	case "pay":
		return a.payInvoice(id, req)
	case "void":
		return a.voidInvoice(id, req)
	case "mark_uncollectible":
		return a.markUncollectible(id, req)
	}
	return nil, invalid("", "Unknown invoice action %q.", action)
}
