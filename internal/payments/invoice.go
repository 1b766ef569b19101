package payments

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/stripeapi"
	"github.com/tallybilling/tally/internal/text"
)

// Pay by invoice: a company buys credits (or a product) on net terms. tally
// writes a pending payment with method=invoice, then has Stripe create,
// finalize and send an invoice for it (collection_method=send_invoice).
// The payment is credited when invoice.paid arrives, through the one
// confirmation guard, keyed by the invoice; invoice.voided and
// invoice.marked_uncollectible fail it. For every other payment, invoice
// events only show the invoice on the payment: they never move money.

// invoiceCreationFailed begins the reason of a pay-by-invoice payment
// whose invoice Stripe did not create, finalize or send.
const invoiceCreationFailed = "invoice creation failed"

// DefaultDaysUntilDue is when an invoice is due unless asked otherwise.
const DefaultDaysUntilDue = 30

// MaxDaysUntilDue bounds days_until_due.
const MaxDaysUntilDue = 365

// InvoicePaymentInput asks for an invoice for one catalog item.
type InvoicePaymentInput struct {
	CustomerID string
	Item       string
	// Quantity 0 means 1; DaysUntilDue nil means DefaultDaysUntilDue.
	Quantity      int64
	DaysUntilDue  *int64
	Memo          string
	PurchaseOrder string
}

// InvoicePaymentResult is the pending payment and its sent invoice.
type InvoicePaymentResult struct {
	PaymentID string
	Status    Status
	Amount    int64
	Currency  string
	Credits   int64
	Invoice   Invoice
}

// invoicePaymentAnswer is an InvoicePaymentResult as stored for replay.
type invoicePaymentAnswer struct {
	PaymentID string `json:"payment_id"`
	Status    string `json:"status"`
	Amount    int64  `json:"amount"`
	Currency  string `json:"currency"`
	Credits   int64  `json:"credits"`
	Invoice   struct {
		ID, Number, Status, HostedURL, PDF string
	} `json:"invoice"`
}

func (in *InvoicePaymentInput) validate(s *Service) (item, int64, error) {
	it, err := s.resolveItem(in.CustomerID, in.Item, &in.Quantity)
	if err != nil {
		return item{}, 0, err
	}
	if it.kind == KindPlan {
		return item{}, 0, errs.InvalidField("/item", fmt.Sprintf("%q is a plan; a plan is subscribed to through Checkout, not invoiced once", in.Item))
	}
	days := int64(DefaultDaysUntilDue)
	if in.DaysUntilDue != nil {
		days = *in.DaysUntilDue
	}
	if days < 0 || days > MaxDaysUntilDue {
		return item{}, 0, errs.InvalidField("/days_until_due", fmt.Sprintf("days_until_due must be between 0 and %d", MaxDaysUntilDue))
	}
	if err := text.Check(in.Memo); err != nil || utf8.RuneCountInString(in.Memo) > 500 || strings.ContainsFunc(in.Memo, memoControl) {
		return item{}, 0, errs.InvalidField("/memo", "memo must be at most 500 characters of printable text (lines and tabs allowed)")
	}
	// Stripe's custom field values hold at most 140 characters, on one line.
	if !customers.SingleLine(in.PurchaseOrder) || utf8.RuneCountInString(in.PurchaseOrder) > 140 {
		return item{}, 0, errs.InvalidField("/purchase_order", "purchase_order must be at most 140 characters of printable text on one line")
	}
	return it, days, nil
}

// memoControl refuses the control characters a printed memo cannot hold
// (line breaks and tabs it can).
func memoControl(r rune) bool { return unicode.IsControl(r) && r != '\n' && r != '\r' && r != '\t' }

// CreateInvoicePayment writes a pending payment with method=invoice for a
// catalog pack or product, then creates its Stripe invoice (one line for
// the item; metadata tally_payment_id and tally_customer_id; the purchase
// order as a custom field), finalizes it and sends it to the customer's
// billing email. The customer must exist. Idempotency as CreateCheckout: a
// repeat with the same key and body replays the first answer; a failed
// attempt stores nothing under the key and leaves a failed payment.
//
// Errors: errs.Invalid (/item, /quantity, /days_until_due, /memo,
// /purchase_order), errs.NotFound (customer), errs.IdempotencyKeyInFlight,
// errs.IdempotencyKeyReused, errs.PaymentProviderError, errs.RateLimited,
// errs.Unavailable (also when no Stripe key is configured).
func (s *Service) CreateInvoicePayment(ctx context.Context, in InvoicePaymentInput, key db.IdempotencyKey) (InvoicePaymentResult, bool, error) {
	it, days, err := in.validate(s)
	if err != nil {
		return InvoicePaymentResult{}, false, err
	}
	c, err := customers.Get(ctx, s.db, in.CustomerID)
	if err != nil {
		return InvoicePaymentResult{}, false, err
	}
	if c.InvoiceEmail() == "" {
		return InvoicePaymentResult{}, false, errs.UnprocessableField("/customer_id",
			fmt.Sprintf("customer %s has no billing email (or email) to send the invoice to; set billing.email with PUT /v1/customers/%s", c.ID, c.ID))
	}
	if s.stripe == nil {
		return InvoicePaymentResult{}, false, errs.E(errs.Unavailable, "pay by invoice is not available: no Stripe key is configured (TALLY_STRIPE_SECRET_KEY)")
	}
	var r *db.Reservation
	if key.Key != "" {
		reserved, err := db.Reserve(ctx, s.db, key, s.reservationLease)
		if err != nil {
			return InvoicePaymentResult{}, false, err
		}
		if reserved.Replayed {
			var a invoicePaymentAnswer
			if err := json.Unmarshal(reserved.Result, &a); err != nil {
				return InvoicePaymentResult{}, false, fmt.Errorf("payments: stored invoice payment answer: %w", err)
			}
			return InvoicePaymentResult{PaymentID: a.PaymentID, Status: Status(a.Status), Amount: a.Amount, Currency: a.Currency,
				Credits: a.Credits, Invoice: Invoice(a.Invoice)}, true, nil
		}
		r = &reserved
	}
	res, err := s.startInvoicePayment(ctx, in, it, days, r)
	if err != nil {
		if r != nil {
			s.release(ctx, *r)
		}
		return InvoicePaymentResult{}, false, err
	}
	return res, false, nil
}

func (s *Service) startInvoicePayment(ctx context.Context, in InvoicePaymentInput, it item, days int64, r *db.Reservation) (InvoicePaymentResult, error) {
	now := s.now()
	paymentID := db.NewID("pay")
	var stripeCustomer string
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		c, err := customers.Get(ctx, tx, in.CustomerID)
		if err != nil {
			return err
		}
		stripeCustomer = c.StripeCustomerID
		return insertPayment(ctx, tx, newPayment{id: paymentID, customerID: in.CustomerID, item: in.Item, quantity: in.Quantity, it: it,
			method: MethodInvoice, purchaseOrder: in.PurchaseOrder, livemode: s.livemode, now: now, reason: "invoice requested"})
	})
	if err != nil {
		return InvoicePaymentResult{}, err
	}
	// As for a checkout: once the payment is on record the work runs to
	// its end even if the caller hangs up.
	work, stop := context.WithCancelCause(context.WithoutCancel(ctx))
	defer stop(nil)
	release := func() {}
	if r != nil {
		release = s.holdReservation(work, *r, stop)
	}
	inv, err := s.issueInvoice(work, in, it, days, paymentID, stripeCustomer)
	release()
	if err != nil {
		if cause := context.Cause(work); cause != nil {
			err = errs.Wrap(err, errs.Unavailable, "the invoice payment lost its idempotency reservation: %v", cause)
		}
		s.markFailed(work, paymentID, invoiceCreationFailed, err)
		return InvoicePaymentResult{}, err
	}
	res := InvoicePaymentResult{PaymentID: paymentID, Status: Pending, Amount: it.unitAmount * in.Quantity, Currency: it.currency,
		Credits: it.credits * in.Quantity, Invoice: inv}
	var a invoicePaymentAnswer
	a.PaymentID, a.Status, a.Amount, a.Currency, a.Credits = res.PaymentID, string(res.Status), res.Amount, res.Currency, res.Credits
	a.Invoice.ID, a.Invoice.Number, a.Invoice.Status, a.Invoice.HostedURL, a.Invoice.PDF = inv.ID, inv.Number, inv.Status, inv.HostedURL, inv.PDF
	answer, err := json.Marshal(a)
	if err != nil {
		return InvoicePaymentResult{}, err
	}
	if r != nil {
		err := s.detachedStep(work, func(ctx context.Context) error {
			return db.InTx(ctx, s.db, func(tx *gorm.DB) error { return r.Complete(ctx, tx, answer) })
		})
		if err != nil {
			return InvoicePaymentResult{}, err
		}
	}
	// The payment may have moved on meanwhile (paid at once, out of band).
	var p Payment
	err = s.detachedStep(work, func(ctx context.Context) (err error) {
		p, err = load(ctx, s.db, paymentID, false)
		return err
	})
	if err == nil {
		res.Status = p.Status
		if p.Invoice != nil {
			res.Invoice = *p.Invoice
		}
	}
	return res, nil
}

// issueInvoice has Stripe create, finalize and send the payment's invoice,
// recording it on the payment after each step (so an event about it finds
// the payment's own invoice on record).
func (s *Service) issueInvoice(ctx context.Context, in InvoicePaymentInput, it item, days int64, paymentID, stripeCustomer string) (Invoice, error) {
	if stripeCustomer == "" {
		var err error
		stripeCustomer, err = s.linkStripeCustomer(ctx, in.CustomerID)
		if err != nil {
			return Invoice{}, err
		}
	}
	line := it.name
	if in.Quantity > 1 {
		line = fmt.Sprintf("%d × %s", in.Quantity, it.name)
	}
	draft, err := s.stripe.CreateInvoice(ctx, stripeapi.InvoiceInput{
		PaymentID: paymentID, TallyCustomerID: in.CustomerID, StripeCustomerID: stripeCustomer,
		Description: line, Amount: it.unitAmount * in.Quantity, Currency: it.currency, DaysUntilDue: days,
		Memo: in.Memo, PurchaseOrder: in.PurchaseOrder, Metadata: map[string]string{stripeapi.MetadataItem: in.Item},
	})
	if err != nil {
		return Invoice{}, err
	}
	if err := s.storeInvoice(ctx, paymentID, stripeCustomer, invoiceFromStripe(draft)); err != nil {
		return Invoice{}, err
	}
	sent, err := s.stripe.FinalizeAndSendInvoice(ctx, paymentID, draft.ID)
	if err != nil {
		return Invoice{}, err
	}
	if err := s.storeInvoice(ctx, paymentID, stripeCustomer, invoiceFromStripe(sent)); err != nil {
		return Invoice{}, err
	}
	return Invoice{ID: sent.ID, Number: sent.Number, Status: sent.Status, HostedURL: sent.HostedInvoiceURL, PDF: sent.InvoicePDF}, nil
}

// storeInvoice records what Stripe answered about the payment's own invoice.
func (s *Service) storeInvoice(ctx context.Context, paymentID, stripeCustomer string, inv StripeInvoice) error {
	ctx, cancel := context.WithTimeout(ctx, detachedStepTimeout)
	defer cancel()
	return db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		p, err := load(ctx, tx, paymentID, true)
		if err != nil {
			return err
		}
		if err := s.applyLinks(ctx, tx, p, map[string]string{"invoice_id": inv.ID, "stripe_customer_id": stripeCustomer}); err != nil {
			return err
		}
		p.InvoiceID = inv.ID
		return s.recordInvoice(ctx, tx, &p, inv)
	})
}

// markFailed records that Stripe never completed what the payment needed
// at its creation (prefix says what). What Stripe did create despite the
// error can still succeed later: failed → succeeded is allowed.
func (s *Service) markFailed(ctx context.Context, paymentID, prefix string, cause error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), detachedStepTimeout)
	defer cancel()
	reason := prefix + ": " + text.Truncate(cause.Error(), 1000)
	err := db.InTx(ctx, s.db, func(tx *gorm.DB) error {
		p, err := load(ctx, tx, paymentID, true)
		if err != nil {
			return err
		}
		ok, err := transition(ctx, tx, p, Failed, EventRef{}, reason)
		if err != nil || !ok {
			return err
		}
		return updatePayment(ctx, tx, paymentID, map[string]any{"status": string(Failed), "failure_reason": reason, "updated_at": s.now()})
	})
	if err != nil {
		s.logger.ErrorContext(ctx, "mark payment failed after a Stripe error", "payment_id", paymentID, "error", err)
	}
}

// invoiceRank orders invoice statuses so that a late event never shows an
// older state: an invoice.finalized delivered after invoice.paid leaves
// the payment's invoice paid.
func invoiceRank(status string) int {
	switch status {
	case "draft":
		return 0
	case "open":
		return 1
	case "uncollectible":
		return 2
	case "void":
		return 3
	case "paid":
		return 4
	}
	return -1
}

// ownInvoice refuses an invoice that is not the payment's: for a pay-by-
// invoice payment, the one tally created (on record since Stripe answered
// its creation); for others, the one a session linked, or (none linked
// yet) one of the payment's Stripe customer.
func ownInvoice(p Payment, inv StripeInvoice) error {
	if p.InvoiceID != "" && p.InvoiceID != inv.ID {
		return reject("invoice %s names payment %s, whose invoice is %s", inv.ID, p.ID, p.InvoiceID)
	}
	if p.InvoiceID == "" && p.Method == MethodInvoice {
		return reject("invoice %s names payment %s, which has no invoice on record", inv.ID, p.ID)
	}
	if p.InvoiceID == "" && (p.StripeCustomerID == "" || inv.Customer != p.StripeCustomerID) {
		// Linked by nothing tally created: only an invoice of the payment's
		// own Stripe customer may become its invoice.
		return reject("invoice %s names payment %s but is for Stripe customer %q, not the payment's %q", inv.ID, p.ID, inv.Customer, p.StripeCustomerID)
	}
	if p.StripeCustomerID != "" && inv.Customer != "" && inv.Customer != p.StripeCustomerID {
		return reject("invoice %s is for Stripe customer %s, but payment %s is %s's", inv.ID, inv.Customer, p.ID, p.StripeCustomerID)
	}
	if id := inv.Metadata[stripeapi.MetadataPaymentID]; id != "" && id != p.ID {
		return reject("invoice %s names payment %s in its metadata, not %s", inv.ID, id, p.ID)
	}
	if id := inv.Metadata[stripeapi.MetadataCustomerID]; id != "" && id != p.CustomerID {
		return reject("invoice %s names customer %s, but payment %s belongs to %s", inv.ID, id, p.ID, p.CustomerID)
	}
	return nil
}

// recordInvoice stores what the payment shows of its own invoice inv (tx
// holds p's row lock): its id when none is linked yet, its number and
// links once known, and its status unless p already shows a later one.
func (s *Service) recordInvoice(ctx context.Context, tx *gorm.DB, p *Payment, inv StripeInvoice) error {
	if err := ownInvoice(*p, inv); err != nil {
		return err
	}
	if p.InvoiceID == "" {
		if err := s.applyLinks(ctx, tx, *p, map[string]string{"invoice_id": inv.ID}); err != nil {
			return err
		}
		p.InvoiceID = inv.ID
	}
	cur := Invoice{ID: inv.ID}
	if p.Invoice != nil {
		cur = *p.Invoice
	}
	cols := map[string]any{"updated_at": s.now()}
	if inv.Status != "" && invoiceRank(inv.Status) >= invoiceRank(cur.Status) {
		cols["invoice_status"], cur.Status = inv.Status, inv.Status
	}
	for col, v := range map[string]*string{"invoice_number": &inv.Number, "invoice_hosted_url": &inv.HostedInvoiceURL, "invoice_pdf": &inv.InvoicePDF} {
		if *v != "" {
			cols[col] = *v
		}
	}
	if inv.Number != "" {
		cur.Number = inv.Number
	}
	if inv.HostedInvoiceURL != "" {
		cur.HostedURL = inv.HostedInvoiceURL
	}
	if inv.InvoicePDF != "" {
		cur.PDF = inv.InvoicePDF
	}
	p.Invoice = &cur
	return updatePayment(ctx, tx, p.ID, cols)
}

// checkInvoice is the validation chain of a confirmation by invoice: the
// invoice is the payment's own, Stripe shows it paid, it was not voided
// before (a void invoice cannot be paid at Stripe: such an event is not
// Stripe's word), and it paid exactly the payment's amount in its currency.
func checkInvoice(p Payment, c confirmation) error {
	inv := c.invoice
	if inv == nil || inv.ID != c.invoiceID {
		return reject("no invoice to check payment %s against", p.ID)
	}
	if err := ownInvoice(p, *inv); err != nil {
		return err
	}
	if inv.Metadata[stripeapi.MetadataPaymentID] != p.ID {
		return reject("invoice %s does not name payment %s in its metadata", inv.ID, p.ID)
	}
	if p.Invoice != nil && p.Invoice.Status == "void" {
		return reject("invoice %s of payment %s was voided; it cannot be paid", inv.ID, p.ID)
	}
	if inv.Status != "paid" {
		return reject("invoice %s is %s, not paid", inv.ID, inv.Status)
	}
	if !strings.EqualFold(c.currency, p.Currency) {
		return reject("invoice %s is in %q, but payment %s is priced in %q", inv.ID, c.currency, p.ID, p.Currency)
	}
	if c.amountReceived != p.Amount {
		return reject("invoice %s paid %d %s, but payment %s costs %d", inv.ID, c.amountReceived, c.currency, p.ID, p.Amount)
	}
	return nil
}

// InvoiceChanged handles invoice.finalized, invoice.paid, invoice.voided
// and invoice.marked_uncollectible of an invoice that names a payment of
// ours (by metadata, or by the invoice id on record). Every payment shows
// the invoice. A pay-by-invoice payment is confirmed by invoice.paid (the
// chain of checkInvoice, then the guard keyed by the invoice) and failed
// by invoice.voided or invoice.marked_uncollectible; for any other payment
// these events never move money.
//
// Errors: ErrNotOurs, *Rejection, errs.Unavailable.
func (s *Service) InvoiceChanged(ctx context.Context, ev EventRef, inv StripeInvoice) error {
	id, err := s.paymentFor(ctx, inv.Metadata, map[string]string{"invoice_id": inv.ID})
	if err != nil {
		return err
	}
	p, err := load(ctx, s.db, id, false)
	if errs.Is(err, errs.NotFound) {
		return reject("metadata names payment %s, which tally does not know", id)
	}
	if err != nil {
		return err
	}
	by := ByInvoice
	if ev.Source == SourceSync {
		by = BySync
	}
	switch {
	case p.Method == MethodInvoice && ev.Type == "invoice.paid":
		return s.confirm(ctx, ev, id, confirmation{invoiceID: inv.ID, amountReceived: inv.AmountPaid, currency: inv.Currency,
			livemode: inv.Livemode, customerID: inv.Metadata[stripeapi.MetadataCustomerID], invoice: &inv, by: by})
	case p.Method == MethodInvoice && (ev.Type == "invoice.voided" || ev.Type == "invoice.marked_uncollectible"):
		return s.failInvoice(ctx, ev, id, inv)
	}
	return s.inEventTx(ctx, ev, id, inv.Livemode, "", func(tx *gorm.DB, p Payment) error {
		return s.recordInvoice(ctx, tx, &p, inv)
	})
}

// failInvoice fails a pay-by-invoice payment whose invoice was voided or
// marked uncollectible (an uncollectible invoice may still be paid later:
// failed → succeeded is allowed; a void one may not, see checkInvoice).
func (s *Service) failInvoice(ctx context.Context, ev EventRef, paymentID string, inv StripeInvoice) error {
	reason := "invoice voided"
	if ev.Type == "invoice.marked_uncollectible" {
		reason = "invoice marked uncollectible"
	}
	return s.inEventTx(ctx, ev, paymentID, inv.Livemode, "", func(tx *gorm.DB, p Payment) error {
		if err := s.recordInvoice(ctx, tx, &p, inv); err != nil {
			return err
		}
		if p.Status == Failed {
			return record(ctx, tx, p, Failed, false, ev, "already failed: "+reason)
		}
		ok, err := transition(ctx, tx, p, Failed, ev, reason)
		if err != nil || !ok {
			return err
		}
		if err := updatePayment(ctx, tx, p.ID, map[string]any{"status": string(Failed), "failure_reason": reason, "updated_at": s.now()}); err != nil {
			return err
		}
		return events.Append(ctx, tx, p.CustomerID, events.PaymentFailed{PaymentID: p.ID, Item: p.Item, Reason: reason, StripeEventID: ev.ID})
	})
}
