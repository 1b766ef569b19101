package httpapi

// convert.go is the one place where generated api types and domain types meet.

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripehook"
)

func ptrIfSet(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func thresholdsOf(t []int64) *[]int64 {
	if len(t) == 0 {
		return nil
	}
	return &t
}

func toAPICustomer(c customers.Customer) api.Customer {
	meta := api.Metadata(c.Metadata)
	if meta == nil {
		meta = api.Metadata{}
	}
	return api.Customer{
		Id:                   c.ID,
		Email:                ptrIfSet(c.Email),
		Name:                 ptrIfSet(c.Name),
		LowBalanceThreshold:  c.LowBalanceThreshold,
		LowBalanceThresholds: thresholdsOf(c.LowBalanceThresholds),
		Metadata:             meta,
		StripeCustomerId:     ptrIfSet(c.StripeCustomerID),
		Billing:              toAPIBilling(c.Billing),
		CreatedAt:            c.CreatedAt,
		UpdatedAt:            c.UpdatedAt,
	}
}

func toAPIBilling(b *customers.Billing) *api.BillingDetails {
	if b == nil {
		return nil
	}
	out := &api.BillingDetails{Name: ptrIfSet(b.Name), Email: ptrIfSet(b.Email)}
	if b.InvoiceAlways {
		out.InvoiceAlways = &b.InvoiceAlways
	}
	if a := b.Address; a != nil {
		out.Address = &struct {
			City       *string `json:"city,omitempty"`
			Country    *string `json:"country,omitempty"`
			Line1      *string `json:"line1,omitempty"`
			Line2      *string `json:"line2,omitempty"`
			PostalCode *string `json:"postal_code,omitempty"`
			State      *string `json:"state,omitempty"`
		}{City: ptrIfSet(a.City), Country: ptrIfSet(a.Country), Line1: ptrIfSet(a.Line1), Line2: ptrIfSet(a.Line2),
			PostalCode: ptrIfSet(a.PostalCode), State: ptrIfSet(a.State)}
	}
	if t := b.TaxID; t != nil {
		out.TaxId = &struct {
			Type  string `json:"type"`
			Value string `json:"value"`
		}{Type: t.Type, Value: t.Value}
	}
	return out
}

func fromAPIBilling(b *api.BillingDetails) *customers.Billing {
	if b == nil {
		return nil
	}
	out := &customers.Billing{Name: strOr(b.Name), Email: strOr(b.Email), InvoiceAlways: b.InvoiceAlways != nil && *b.InvoiceAlways}
	if a := b.Address; a != nil {
		out.Address = &customers.Address{Line1: strOr(a.Line1), Line2: strOr(a.Line2), City: strOr(a.City), State: strOr(a.State),
			PostalCode: strOr(a.PostalCode), Country: strOr(a.Country)}
	}
	if t := b.TaxId; t != nil {
		out.TaxID = &customers.TaxID{Type: t.Type, Value: t.Value}
	}
	return out
}

func fromAPIUpsert(id string, b *api.CustomerUpsert) customers.UpsertInput {
	in := customers.UpsertInput{ID: id}
	if b == nil {
		return in
	}
	in.Email = b.Email
	in.Name = b.Name
	in.LowBalanceThreshold = b.LowBalanceThreshold
	in.LowBalanceThresholds = b.LowBalanceThresholds
	if b.Metadata != nil {
		in.Metadata = map[string]string(*b.Metadata)
	}
	in.StripeCustomerID = b.StripeCustomerId
	in.Billing = fromAPIBilling(b.Billing)
	return in
}

func toAPICatalog(c catalog.Catalog) api.Catalog {
	out := api.Catalog{CreditPacks: []api.CreditPack{}, Products: []api.Product{}, Plans: []api.Plan{}}
	for _, p := range c.CreditPacks {
		pack := api.CreditPack{Id: p.ID, Name: p.Name, Amount: p.Amount, Currency: p.Currency, Credits: p.Credits, Invoice: p.Invoice}
		if p.ConfirmOn != "" {
			v := api.CreditPackConfirmOn(p.ConfirmOn)
			pack.ConfirmOn = &v
		}
		if m := p.Expiry.Months; m > 0 {
			pack.ExpiresAfterMonths = &m
		}
		if d := p.Expiry.Duration; d > 0 {
			secs := int64((d + time.Second - 1) / time.Second)
			pack.ExpiresAfterSeconds = &secs
		}
		out.CreditPacks = append(out.CreditPacks, pack)
	}
	for _, p := range c.Products {
		prod := api.Product{Id: p.ID, Name: p.Name, Amount: p.Amount, Currency: p.Currency, Invoice: p.Invoice}
		if p.ConfirmOn != "" {
			v := api.ProductConfirmOn(p.ConfirmOn)
			prod.ConfirmOn = &v
		}
		out.Products = append(out.Products, prod)
	}
	for _, p := range c.Plans {
		out.Plans = append(out.Plans, api.Plan{Id: p.ID, Name: p.Name, Meter: p.Meter})
	}
	return out
}

// toAPIEvent is a stored event as the feed shows it. Its data is passed on
// as stored: events.Append wrote it from the type's payload, the shape
// openapi.yaml gives that type in Event's oneOf.
func toAPIEvent(e events.Stored) (api.Event, error) {
	typed, err := json.Marshal(struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	}{e.Type, e.Data})
	if err != nil {
		return api.Event{}, fmt.Errorf("httpapi: event %d data: %w", e.ID, err)
	}
	var out api.Event
	if err := out.UnmarshalJSON(typed); err != nil {
		return api.Event{}, fmt.Errorf("httpapi: event %d: %w", e.ID, err)
	}
	out.Id, out.CreatedAt, out.CustomerId = "evt_"+strconv.FormatInt(e.ID, 10), e.CreatedAt, ptrIfSet(e.CustomerID)
	return out, nil
}

// limitOr is the page size a list asks for, 50 when it does not say.
func limitOr(l *api.Limit) int {
	if l == nil {
		return 50
	}
	return *l
}

// Credits.

func fromAPIConsume(customerID string, b *api.ConsumeRequest) credits.ConsumeInput {
	in := credits.ConsumeInput{CustomerID: customerID}
	if b == nil {
		return in
	}
	in.Amount, in.Reason = b.Amount, b.Reason
	if b.Metadata != nil {
		in.Metadata = map[string]string(*b.Metadata)
	}
	return in
}

func fromAPIGrant(customerID string, b *api.GrantRequest) credits.GrantInput {
	in := credits.GrantInput{CustomerID: customerID, Source: credits.SourceService}
	if b == nil {
		return in
	}
	in.Amount, in.Reason, in.ExpiresAt = b.Amount, b.Reason, b.ExpiresAt
	in.Priority, in.EffectiveAt = b.Priority, b.EffectiveAt
	if b.Category != nil {
		in.Category = string(*b.Category)
	}
	if b.Metadata != nil {
		in.Metadata = map[string]string(*b.Metadata)
	}
	return in
}

func toAPIGrantResult(r credits.GrantResult) api.GrantResult {
	return api.GrantResult{TransactionId: r.TransactionID, GrantId: r.GrantID, Amount: r.Amount, Balance: r.Balance, ExpiresAt: r.ExpiresAt,
		Priority: r.Priority, Category: api.GrantResultCategory(r.Category), EffectiveAt: r.EffectiveAt}
}

func fromAPIHold(customerID string, b *api.HoldRequest) credits.HoldInput {
	in := credits.HoldInput{CustomerID: customerID}
	if b == nil {
		return in
	}
	in.Amount, in.Reason = b.Amount, b.Reason
	if b.ExpiresInSeconds != nil {
		// The schema bounds it (1..604800); a value it lets through that
		// Validate refuses cannot come from here.
		in.ExpiresIn = time.Duration(*b.ExpiresInSeconds) * time.Second
	}
	if b.Metadata != nil {
		in.Metadata = map[string]string(*b.Metadata)
	}
	return in
}

func toAPIHoldEnded(e credits.HoldEnd) api.HoldEnded {
	return api.HoldEnded{HoldId: e.HoldID, Status: api.HoldEndedStatus(e.Status), Captured: e.Captured, Released: e.Released,
		TransactionId: ptrIfSet(e.TransactionID), Balance: e.Balance, Available: e.Available}
}

func toAPIHold(h credits.Hold) api.Hold {
	meta := api.Metadata(h.Metadata)
	if meta == nil {
		meta = api.Metadata{}
	}
	out := api.Hold{Id: h.ID, CustomerId: h.CustomerID, Amount: h.Amount, Status: api.HoldStatus(h.Status), Reason: h.Reason,
		Metadata: meta, Draws: make([]api.LedgerDraw, 0, len(h.Draws)), Captured: h.Captured, Released: h.Released,
		TransactionId: ptrIfSet(h.TransactionID), ExpiresAt: h.ExpiresAt, CreatedAt: h.CreatedAt, EndedAt: h.EndedAt}
	for _, d := range h.Draws {
		out.Draws = append(out.Draws, api.LedgerDraw{GrantId: d.GrantID, Amount: d.Amount})
	}
	return out
}

func toAPIHoldPage(p credits.HoldPage) api.HoldPage {
	out := api.HoldPage{Data: make([]api.Hold, 0, len(p.Holds)), NextCursor: ptrIfSet(p.NextCursor)}
	for _, h := range p.Holds {
		out.Data = append(out.Data, toAPIHold(h))
	}
	return out
}

func fromAPIAdjustment(customerID string, b *api.AdjustmentRequest) credits.AdjustInput {
	in := credits.AdjustInput{CustomerID: customerID}
	if b == nil {
		return in
	}
	in.Amount, in.Reason, in.ExpiresAt = b.Amount, b.Reason, b.ExpiresAt
	if b.Metadata != nil {
		in.Metadata = map[string]string(*b.Metadata)
	}
	return in
}

func toAPIBalance(b credits.Balance) api.Balance {
	out := api.Balance{
		CustomerId:          b.CustomerID,
		Balance:             b.Balance,
		Held:                b.Held,
		Pending:             b.Pending,
		Available:           b.Available,
		Grants:              make([]api.GrantSummary, 0, len(b.Grants)),
		NextExpiry:          b.NextExpiry,
		NextExpiryAmount:    b.NextExpiryAmount,
		LowBalanceThreshold: b.LowBalanceThreshold,
	}
	for _, g := range b.Grants {
		out.Grants = append(out.Grants, api.GrantSummary{
			Id: g.ID, Amount: g.Amount, Remaining: g.Remaining, Held: g.Held, Source: api.GrantSummarySource(g.Source),
			PaymentId: ptrIfSet(g.PaymentID), ExpiresAt: g.ExpiresAt, CreatedAt: g.CreatedAt,
			Priority: g.Priority, Category: api.GrantSummaryCategory(g.Category), EffectiveAt: g.EffectiveAt,
		})
	}
	return out
}

func toAPILedgerPage(p credits.LedgerPage) api.LedgerPage {
	out := api.LedgerPage{Data: make([]api.LedgerEntry, 0, len(p.Entries)), NextCursor: ptrIfSet(p.NextCursor)}
	for _, e := range p.Entries {
		meta := api.Metadata(e.Metadata)
		if meta == nil {
			meta = api.Metadata{}
		}
		entry := api.LedgerEntry{
			Id: e.ID, Kind: api.LedgerEntryKind(e.Kind), Amount: e.Amount, BalanceAfter: e.BalanceAfter,
			Reason: e.Reason, Metadata: meta, GrantId: ptrIfSet(e.GrantID), PaymentId: ptrIfSet(e.PaymentID),
			HoldId: ptrIfSet(e.HoldID), CreatedAt: e.CreatedAt,
		}
		if e.Shortfall > 0 {
			entry.Shortfall = &e.Shortfall
		}
		if e.Draws != nil {
			draws := make([]api.LedgerDraw, 0, len(e.Draws))
			for _, d := range e.Draws {
				draws = append(draws, api.LedgerDraw{GrantId: d.GrantID, Amount: d.Amount})
			}
			entry.Draws = &draws
		}
		out.Data = append(out.Data, entry)
	}
	return out
}

// ToAPIVerifyReport is r as the contract shapes it: the body of
// GET /v1/admin/verify, which `tally verify --json` prints too.
func ToAPIVerifyReport(r credits.VerifyReport) api.VerifyReport {
	out := api.VerifyReport{Ok: r.OK, CustomersChecked: r.CustomersChecked, PaymentsChecked: r.PaymentsChecked,
		Problems: make([]api.VerifyProblem, 0, len(r.Problems)), Receivables: make([]api.Receivable, 0, len(r.Receivables))}
	for _, p := range r.Problems {
		out.Problems = append(out.Problems, api.VerifyProblem{Kind: p.Kind, CustomerId: ptrIfSet(p.CustomerID),
			PaymentId: ptrIfSet(p.PaymentID), Detail: p.Detail})
	}
	for _, rc := range r.Receivables {
		out.Receivables = append(out.Receivables, api.Receivable{CustomerId: rc.CustomerID, Shortfall: rc.Shortfall, Revokes: rc.Revokes})
	}
	return out
}

// --- payments ---

func fromAPICheckout(b *api.CheckoutSessionCreate) payments.CheckoutInput {
	in := payments.CheckoutInput{CustomerID: b.CustomerId, Item: b.Item, SuccessURL: b.SuccessUrl, CancelURL: b.CancelUrl}
	if b.Quantity != nil {
		in.Quantity = *b.Quantity
	}
	if b.SavePaymentMethod != nil {
		in.SavePaymentMethod = *b.SavePaymentMethod
	}
	return in
}

func fromAPISetup(customerID string, b *api.PaymentMethodSetupCreate) payments.SetupInput {
	return payments.SetupInput{CustomerID: customerID, SuccessURL: b.SuccessUrl, CancelURL: b.CancelUrl}
}

func toAPISetup(r payments.SetupResult) api.PaymentMethodSetup {
	return api.PaymentMethodSetup{CheckoutSessionId: r.CheckoutSessionID, Url: r.URL, ExpiresAt: r.ExpiresAt}
}

func toAPISavedCard(c payments.SavedCard) *api.SavedPaymentMethod {
	return &api.SavedPaymentMethod{Brand: c.Brand, Last4: c.Last4, ExpMonth: c.ExpMonth, ExpYear: c.ExpYear}
}

func fromAPIAutoTopUp(customerID string, b *api.AutoTopUpSettings) payments.AutoTopUpInput {
	in := payments.AutoTopUpInput{CustomerID: customerID, Enabled: b.Enabled, Threshold: b.Threshold, Item: b.Item, MonthlyLimit: b.MonthlyLimit}
	if b.Quantity != nil {
		in.Quantity = *b.Quantity
	}
	return in
}

func toAPIAutoTopUp(a payments.AutoTopUp) api.AutoTopUp {
	return api.AutoTopUp{
		CustomerId: a.CustomerID, Enabled: a.Enabled, Threshold: a.Threshold, Item: a.Item, Quantity: a.Quantity,
		MonthlyLimit: a.MonthlyLimit, Status: api.AutoTopUpStatus(a.Status), ConsecutiveFailures: a.ConsecutiveFailures,
		DisabledReason: ptrIfSet(a.DisabledReason), InFlightPaymentId: ptrIfSet(a.InFlightPaymentID), MonthCount: a.MonthCount,
		UpdatedAt: a.UpdatedAt,
	}
}

func toAPICheckoutSession(r payments.CheckoutResult) api.CheckoutSession {
	return api.CheckoutSession{PaymentId: r.PaymentID, CheckoutSessionId: r.CheckoutSessionID, Url: r.URL, ExpiresAt: r.ExpiresAt}
}

func toAPIPayment(p payments.Payment) api.Payment {
	out := api.Payment{
		Id: p.ID, CustomerId: p.CustomerID, Item: p.Item, ItemKind: api.PaymentItemKind(p.ItemKind), Quantity: p.Quantity,
		Status: api.PaymentStatus(p.Status), Amount: p.Amount, Currency: p.Currency, AmountReceived: p.AmountReceived,
		AmountRefunded: p.AmountRefunded, AmountDisputed: p.AmountDisputed, Credits: p.Credits, Livemode: p.Livemode,
		CheckoutSessionId: ptrIfSet(p.CheckoutSessionID), PaymentIntentId: ptrIfSet(p.PaymentIntentID),
		InvoiceId: ptrIfSet(p.InvoiceID), SubscriptionId: ptrIfSet(p.SubscriptionID), FailureReason: ptrIfSet(p.FailureReason),
		CreatedAt: p.CreatedAt, UpdatedAt: p.UpdatedAt, SucceededAt: p.SucceededAt,
		Transitions: make([]api.PaymentTransition, 0, len(p.Transitions)),
	}
	out.ReceivedCurrency = ptrIfSet(p.ReceivedCurrency)
	out.Method = api.PaymentMethod(p.Method)
	if p.ConfirmedBy != "" {
		v := api.PaymentConfirmedBy(p.ConfirmedBy)
		out.ConfirmedBy = &v
	}
	if p.ConfirmOn != "" {
		v := api.PaymentConfirmOn(p.ConfirmOn)
		out.ConfirmOn = &v
	}
	if p.Invoice != nil {
		inv := toAPIInvoice(*p.Invoice)
		out.Invoice = &inv
	}
	out.PurchaseOrder = ptrIfSet(p.PurchaseOrder)
	if p.Checkout.Known() {
		tax := p.Checkout.AmountTax
		out.AmountTax = &tax
	}
	for _, t := range p.Transitions {
		out.Transitions = append(out.Transitions, api.PaymentTransition{
			From: ptrIfSet(string(t.From)), To: string(t.To), Applied: t.Applied,
			StripeEventId: ptrIfSet(t.StripeEventID), StripeEventType: ptrIfSet(t.StripeEventType),
			Reason: ptrIfSet(t.Reason), CreatedAt: t.CreatedAt,
		})
		if t.Source != "" {
			v := api.PaymentTransitionSource(t.Source)
			out.Transitions[len(out.Transitions)-1].Source = &v
		}
	}
	return out
}

func toAPIInvoice(i payments.Invoice) api.PaymentInvoice {
	return api.PaymentInvoice{Id: i.ID, Number: ptrIfSet(i.Number), Status: ptrIfSet(i.Status),
		HostedInvoiceUrl: ptrIfSet(i.HostedURL), InvoicePdf: ptrIfSet(i.PDF)}
}

func toAPIStripeEvent(e stripehook.Stored) api.StripeEvent {
	return api.StripeEvent{
		Id: e.ID, Type: e.Type, Status: api.StripeEventStatus(e.Status), Attempts: e.Attempts,
		LastError: ptrIfSet(e.LastError), ApiVersion: ptrIfSet(e.APIVersion), Livemode: e.Livemode,
		ReceivedAt: e.ReceivedAt, ProcessedAt: e.ProcessedAt, NextAttemptAt: e.NextAttemptAt,
		Created: e.Created, DismissedBy: ptrIfSet(e.DismissedBy), DismissedReason: ptrIfSet(e.DismissedReason), DismissedAt: e.DismissedAt,
	}
}

// Metering.

func fromAPIUsageBatch(b *api.UsageBatch) []metering.EventInput {
	if b == nil {
		return nil
	}
	out := make([]metering.EventInput, len(b.Events))
	for i, e := range b.Events {
		out[i] = metering.EventInput{CustomerID: e.CustomerId, Meter: e.Meter, Value: e.Value, Identifier: e.Identifier,
			Timestamp: e.Timestamp}
	}
	return out
}

func toAPIIntakeResult(r metering.IntakeResult) api.UsageIntakeResult {
	out := api.UsageIntakeResult{Accepted: r.Accepted, Duplicates: r.Duplicates, Rejected: r.Rejected, Conflicts: r.Conflicts,
		Results: make([]api.UsageEventResult, len(r.Results))}
	for i, res := range r.Results {
		out.Results[i] = api.UsageEventResult{Identifier: res.Identifier, Status: api.UsageEventResultStatus(res.Status)}
		if res.Code != "" {
			code := apiErrorCode(res.Code)
			out.Results[i].Code = &code
		}
		out.Results[i].Detail = ptrIfSet(res.Detail)
	}
	return out
}

func toAPIUsageEvent(e metering.UsageEvent) api.UsageEventStatus {
	return api.UsageEventStatus{
		Identifier:    e.Identifier,
		CustomerId:    e.CustomerID,
		Meter:         e.Meter,
		Value:         e.Value,
		Timestamp:     e.Timestamp.UTC(),
		Status:        api.UsageStatus(e.Status),
		Attempts:      e.Attempts,
		LastError:     ptrIfSet(e.LastError),
		MaybeSentAt:   e.MaybeSentAt,
		DeadCode:      toAPIUsageDeadCode(e.DeadCode),
		NextAttemptAt: e.NextAttemptAt,
		DeliveredAt:   e.DeliveredAt,
		CreatedAt:     e.CreatedAt,
	}
}

func toAPIUsageDeadCode(c metering.DeadCode) *api.UsageDeadCode {
	if c == "" {
		return nil
	}
	out := api.UsageDeadCode(c)
	return &out
}

func toAPIRequeueResult(r metering.RequeueResult) api.RequeueResult {
	out := api.RequeueResult{Requeued: r.Requeued, Skipped: r.Skipped, Results: make([]api.RequeueItem, len(r.Results))}
	for i, it := range r.Results {
		out.Results[i] = api.RequeueItem{Identifier: it.Identifier, Status: api.RequeueItemStatus("requeued")}
		if !it.Requeued {
			code := api.RequeueSkipCode(it.Skip)
			out.Results[i].Status, out.Results[i].Code, out.Results[i].Detail = api.RequeueItemStatus("skipped"), &code, ptrIfSet(it.Detail)
		}
	}
	return out
}

func toAPIUsageEventPage(p metering.Page) api.UsageEventPage {
	out := api.UsageEventPage{Data: make([]api.UsageEventStatus, len(p.Events)), NextCursor: ptrIfSet(p.Next)}
	for i, e := range p.Events {
		out.Data[i] = toAPIUsageEvent(e)
	}
	return out
}

func toAPIUsageTotals(t metering.Totals) api.UsageTotals {
	out := api.UsageTotals{CustomerId: t.CustomerID, From: t.From, To: t.To, Meters: make([]api.MeterTotal, len(t.Meters))}
	for i, m := range t.Meters {
		out.Meters[i] = api.MeterTotal{Meter: m.Meter, Total: m.Total, Events: m.Events}
		if m.Delivery != "" {
			d := api.MeterTotalDelivery(m.Delivery)
			out.Meters[i].Delivery = &d
		}
		switch {
		case m.LiveFrom != nil:
			lf := m.LiveFrom.UTC().Format(time.RFC3339)
			out.Meters[i].LiveFrom = &lf
		case m.LiveFromNextPeriod:
			lf := catalog.LiveFromNextPeriod
			out.Meters[i].LiveFrom = &lf
		}
	}
	return out
}

// ToAPIReconciliation is r as the contract shapes it: the body of
// POST /v1/admin/reconciliations, which `tally reconcile --json` prints too.
func ToAPIReconciliation(r metering.Reconciliation) api.Reconciliation {
	out := api.Reconciliation{Id: ptrIfSet(r.ID), Meter: r.Meter, From: r.From, To: r.To, Checked: r.Checked,
		Mismatches: make([]api.ReconciliationMismatch, len(r.Mismatches))}
	for i, m := range r.Mismatches {
		out.Mismatches[i] = api.ReconciliationMismatch{CustomerId: m.CustomerID, LocalTotal: m.LocalTotal,
			StripeTotal: m.StripeTotal, Difference: m.Difference}
	}
	return out
}
