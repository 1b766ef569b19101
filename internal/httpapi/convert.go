package httpapi

// convert.go is the one place where generated api types and domain types meet.

import (
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/metering"
)

func ptrIfSet(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func toAPICustomer(c customers.Customer) api.Customer {
	meta := api.Metadata(c.Metadata)
	if meta == nil {
		meta = api.Metadata{}
	}
	return api.Customer{
		Id:                  c.ID,
		Email:               ptrIfSet(c.Email),
		Name:                ptrIfSet(c.Name),
		LowBalanceThreshold: c.LowBalanceThreshold,
		Metadata:            meta,
		StripeCustomerId:    ptrIfSet(c.StripeCustomerID),
		CreatedAt:           c.CreatedAt,
		UpdatedAt:           c.UpdatedAt,
	}
}

func fromAPIUpsert(id string, b *api.CustomerUpsert) customers.UpsertInput {
	in := customers.UpsertInput{ID: id}
	if b == nil {
		return in
	}
	in.Email = b.Email
	in.Name = b.Name
	in.LowBalanceThreshold = b.LowBalanceThreshold
	if b.Metadata != nil {
		in.Metadata = map[string]string(*b.Metadata)
	}
	in.StripeCustomerID = b.StripeCustomerId
	return in
}

func toAPICatalog(c config.Catalog) api.Catalog {
	out := api.Catalog{CreditPacks: []api.CreditPack{}, Products: []api.Product{}, Plans: []api.Plan{}}
	for _, p := range c.CreditPacks {
		pack := api.CreditPack{Id: p.ID, Name: p.Name, Amount: p.Amount, Currency: p.Currency, Credits: p.Credits}
		if p.ExpiresAfter > 0 {
			secs := int64(p.ExpiresAfter.Seconds())
			pack.ExpiresAfterSeconds = &secs
		}
		out.CreditPacks = append(out.CreditPacks, pack)
	}
	for _, p := range c.Products {
		out.Products = append(out.Products, api.Product{Id: p.ID, Name: p.Name, Amount: p.Amount, Currency: p.Currency})
	}
	for _, p := range c.Plans {
		out.Plans = append(out.Plans, api.Plan{Id: p.ID, Name: p.Name, Meter: p.Meter})
	}
	return out
}

func toAPIEvent(e events.Stored) (api.Event, error) {
	out := api.Event{Id: "evt_" + strconv.FormatInt(e.ID, 10), Type: e.Type, CreatedAt: e.CreatedAt, CustomerId: ptrIfSet(e.CustomerID)}
	if err := json.Unmarshal(e.Data, &out.Data); err != nil {
		return api.Event{}, fmt.Errorf("httpapi: event %d data: %w", e.ID, err)
	}
	return out, nil
}

// limitOr is the page size a list asks for, 50 when it does not say.
func limitOr(l *api.Limit) int {
	if l == nil {
		return 50
	}
	return *l
}

// Metering.

func fromAPIUsageBatch(b *api.UsageBatch) []metering.EventInput {
	if b == nil {
		return nil
	}
	out := make([]metering.EventInput, len(b.Events))
	for i, e := range b.Events {
		out[i] = metering.EventInput{CustomerID: e.CustomerId, Meter: e.Meter, Value: e.Value, Identifier: e.Identifier}
		if e.Timestamp != nil {
			out[i].Timestamp = *e.Timestamp
		}
	}
	return out
}

func toAPIIntakeResult(r metering.IntakeResult) api.UsageIntakeResult {
	out := api.UsageIntakeResult{Accepted: r.Accepted, Duplicates: r.Duplicates, Rejected: r.Rejected,
		Results: make([]api.UsageEventResult, len(r.Results))}
	for i, res := range r.Results {
		out.Results[i] = api.UsageEventResult{Identifier: res.Identifier, Status: api.UsageEventResultStatus(res.Status)}
		if res.Code != "" {
			code := api.ErrorCode(res.Code)
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
		NextAttemptAt: e.NextAttemptAt,
		DeliveredAt:   e.DeliveredAt,
		CreatedAt:     e.CreatedAt,
	}
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
	}
	return out
}

func toAPIReconciliation(r metering.Reconciliation) api.Reconciliation {
	out := api.Reconciliation{Meter: r.Meter, From: r.From, To: r.To, Checked: r.Checked,
		Mismatches: make([]api.ReconciliationMismatch, len(r.Mismatches))}
	for i, m := range r.Mismatches {
		out.Mismatches[i] = api.ReconciliationMismatch{CustomerId: m.CustomerID, LocalTotal: m.LocalTotal,
			StripeTotal: m.StripeTotal, Difference: m.Difference}
	}
	return out
}
