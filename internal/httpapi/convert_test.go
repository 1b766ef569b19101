package httpapi

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/catalog"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/customers"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/events"
	"github.com/tallybilling/tally/internal/metering"
	"github.com/tallybilling/tally/internal/payments"
	"github.com/tallybilling/tally/internal/stripehook"
)

var (
	convT0   = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	convZero = time.Time{}
)

func ptr[T any](v T) *T { return &v }

// A customer read back answers what the upsert named; absent optional
// text is absent (not ""), and metadata is {} rather than null.
func TestCustomerConversion(t *testing.T) {
	t.Parallel()
	meta := api.Metadata{"plan": "pro"}
	body := &api.CustomerUpsert{Email: ptr("ada@example.com"), Name: ptr("Ada"), LowBalanceThreshold: ptr(int64(0)),
		Metadata: &meta, StripeCustomerId: ptr("cus_1")}
	in := fromAPIUpsert("ada", body)
	if in.ID != "ada" || *in.Email != "ada@example.com" || *in.Name != "Ada" || *in.LowBalanceThreshold != 0 ||
		in.Metadata["plan"] != "pro" || *in.StripeCustomerID != "cus_1" {
		t.Fatalf("fromAPIUpsert = %+v", in)
	}
	stored := customers.Customer{ID: in.ID, Email: *in.Email, Name: *in.Name, LowBalanceThreshold: in.LowBalanceThreshold,
		Metadata: in.Metadata, StripeCustomerID: *in.StripeCustomerID, CreatedAt: convT0, UpdatedAt: convT0}
	out := toAPICustomer(stored)
	if out.Id != "ada" || *out.Email != *body.Email || *out.Name != *body.Name || *out.LowBalanceThreshold != 0 ||
		!reflect.DeepEqual(out.Metadata, meta) || *out.StripeCustomerId != "cus_1" || !out.CreatedAt.Equal(convT0) {
		t.Fatalf("round trip = %+v", out)
	}

	// Nothing named keeps everything: nil pointers and nil metadata.
	if in := fromAPIUpsert("ada", &api.CustomerUpsert{}); !reflect.DeepEqual(in, customers.UpsertInput{ID: "ada"}) {
		t.Errorf("empty body = %+v", in)
	}
	if in := fromAPIUpsert("ada", nil); in.ID != "ada" || in.Email != nil || in.Metadata != nil {
		t.Errorf("nil body = %+v", in)
	}

	bare := toAPICustomer(customers.Customer{ID: "bare"})
	if bare.Email != nil || bare.Name != nil || bare.StripeCustomerId != nil || bare.LowBalanceThreshold != nil {
		t.Errorf("empty fields became values: %+v", bare)
	}
	if b, _ := json.Marshal(bare); !strings.Contains(string(b), `"metadata":{}`) {
		t.Errorf("nil metadata is not {}: %s", b)
	}
}

func TestCatalogConversion(t *testing.T) {
	t.Parallel()
	out := toAPICatalog(catalog.Catalog{
		CreditPacks: []catalog.CreditPack{
			{ID: "months", Credits: 10, Expiry: catalog.Expiry{Months: 12}},
			{ID: "seconds", Credits: 10, Expiry: catalog.Expiry{Duration: 1500 * time.Millisecond}},
			{ID: "never", Credits: 10},
		},
		Products: []catalog.Product{{ID: "p", Name: "P", Amount: 500, Currency: "eur"}},
		Plans:    []catalog.Plan{{ID: "pl", Name: "Pl", Meter: "api_calls"}},
	})
	months, seconds, never := out.CreditPacks[0], out.CreditPacks[1], out.CreditPacks[2]
	if months.ExpiresAfterMonths == nil || *months.ExpiresAfterMonths != 12 || months.ExpiresAfterSeconds != nil {
		t.Errorf("months pack = %+v", months)
	}
	// A fraction of a second rounds up: credits never expire sooner than said.
	if seconds.ExpiresAfterSeconds == nil || *seconds.ExpiresAfterSeconds != 2 || seconds.ExpiresAfterMonths != nil {
		t.Errorf("seconds pack = %+v", seconds)
	}
	if never.ExpiresAfterMonths != nil || never.ExpiresAfterSeconds != nil {
		t.Errorf("never pack = %+v", never)
	}
	if out.Products[0] != (api.Product{Id: "p", Name: "P", Amount: 500, Currency: "eur"}) || out.Plans[0] != (api.Plan{Id: "pl", Name: "Pl", Meter: "api_calls"}) {
		t.Errorf("products %+v plans %+v", out.Products, out.Plans)
	}
	if b, _ := json.Marshal(toAPICatalog(catalog.Catalog{})); string(b) != `{"credit_packs":[],"plans":[],"products":[]}` {
		t.Errorf("empty catalog = %s", b)
	}
}

func TestEventConversion(t *testing.T) {
	t.Parallel()
	out, err := toAPIEvent(events.Stored{ID: 42, Type: "credits.granted", CustomerID: "ada", Data: json.RawMessage(`{"amount":5}`), CreatedAt: convT0})
	if err != nil {
		t.Fatal(err)
	}
	granted, err := out.AsCreditsGrantedEvent()
	if out.Id != "evt_42" || out.Type != "credits.granted" || *out.CustomerId != "ada" || err != nil || granted.Data.Amount != 5 {
		t.Errorf("event = %+v, data %+v (%v)", out, granted, err)
	}
	b, err := json.Marshal(out)
	if want := `{"created_at":"` + convT0.Format(time.RFC3339Nano) + `","customer_id":"ada","data":{"amount":5},"id":"evt_42","type":"credits.granted"}`; err != nil || string(b) != want {
		t.Errorf("event JSON = %s (%v), want %s", b, err, want)
	}
	if out, _ := toAPIEvent(events.Stored{ID: 1, Data: json.RawMessage(`{}`)}); out.CustomerId != nil {
		t.Errorf("an event without a customer names %q", *out.CustomerId)
	}
	if _, err := toAPIEvent(events.Stored{ID: 7, Data: json.RawMessage(`{`)}); err == nil || errs.CodeOf(err) != errs.Internal {
		t.Errorf("unreadable data: %v, want an internal error", err)
	}
	if limitOr(nil) != 50 || limitOr(ptr(3)) != 3 {
		t.Errorf("limitOr: %d %d", limitOr(nil), limitOr(ptr(3)))
	}
}

// The converters pass what the caller sent, including the zero time, to
// the domain, which refuses it: turning it into nil would read a zero
// expiry as "never" and a zero timestamp as "now".
func TestRequestsKeepZeroTimesAndNilPointers(t *testing.T) {
	t.Parallel()
	g := fromAPIGrant("ada", &api.GrantRequest{Amount: 5, Reason: "r", ExpiresAt: &convZero})
	if g.ExpiresAt == nil || !g.ExpiresAt.IsZero() || g.Source != credits.SourceService || g.CustomerID != "ada" {
		t.Errorf("grant with a zero expiry = %+v", g)
	}
	if g := fromAPIGrant("ada", &api.GrantRequest{Amount: 5}); g.ExpiresAt != nil || g.Metadata != nil {
		t.Errorf("grant without expiry or metadata = %+v", g)
	}
	if g := fromAPIGrant("ada", nil); g.CustomerID != "ada" || g.Source != credits.SourceService || g.Amount != 0 {
		t.Errorf("nil grant body = %+v", g)
	}
	c := fromAPIConsume("ada", &api.ConsumeRequest{Amount: 3, Reason: "r", Metadata: &api.Metadata{"k": "v"}})
	if !reflect.DeepEqual(c, credits.ConsumeInput{CustomerID: "ada", Amount: 3, Reason: "r", Metadata: map[string]string{"k": "v"}}) {
		t.Errorf("consume = %+v", c)
	}
	if c := fromAPIConsume("ada", nil); c.CustomerID != "ada" || c.Amount != 0 {
		t.Errorf("nil consume body = %+v", c)
	}

	batch := fromAPIUsageBatch(&api.UsageBatch{Events: []api.UsageEventInput{
		{CustomerId: "ada", Meter: "m", Value: 2, Identifier: "u1", Timestamp: &convZero},
		{CustomerId: "bob", Meter: "m", Value: 0, Identifier: "u2"},
	}})
	if len(batch) != 2 || batch[0].Timestamp == nil || !batch[0].Timestamp.IsZero() || batch[1].Timestamp != nil ||
		batch[0] != (metering.EventInput{CustomerID: "ada", Meter: "m", Value: 2, Identifier: "u1", Timestamp: batch[0].Timestamp}) {
		t.Errorf("usage batch = %+v", batch)
	}
	if fromAPIUsageBatch(nil) != nil {
		t.Error("a nil batch converts to events")
	}

	if in := fromAPICheckout(&api.CheckoutSessionCreate{CustomerId: "ada", Item: "starter"}); in.Quantity != 0 || in.Item != "starter" {
		t.Errorf("checkout without quantity = %+v", in)
	}
	if in := fromAPICheckout(&api.CheckoutSessionCreate{CustomerId: "ada", Item: "starter", Quantity: ptr(int64(3))}); in.Quantity != 3 {
		t.Errorf("checkout quantity = %+v", in)
	}
}

// Lists are [] and absent optional members are absent, never "" or 0:
// clients tell "none" from "zero" by presence.
func TestResponsesOmitWhatIsNotThere(t *testing.T) {
	t.Parallel()
	bal, _ := json.Marshal(toAPIBalance(credits.Balance{CustomerID: "ada"}))
	if !strings.Contains(string(bal), `"grants":[]`) {
		t.Errorf("balance without grants: %s", bal)
	}
	b := toAPIBalance(credits.Balance{CustomerID: "ada", Balance: 5, Grants: []credits.GrantSummary{
		{ID: "g1", Amount: 5, Remaining: 5, Source: credits.SourcePurchase, PaymentID: "pay_1", CreatedAt: convT0},
		{ID: "g2", Amount: 1, Remaining: 1, Source: credits.SourceService},
	}})
	if *b.Grants[0].PaymentId != "pay_1" || b.Grants[1].PaymentId != nil || b.Grants[0].Source != api.Purchase {
		t.Errorf("grants = %+v", b.Grants)
	}

	page := toAPILedgerPage(credits.LedgerPage{Entries: []credits.LedgerEntry{
		{ID: "t1", Kind: credits.KindConsume, Amount: -2, Draws: []credits.Draw{{GrantID: "g1", Amount: 2}}},
		{ID: "t2", Kind: credits.KindRevoke, Amount: -1, Shortfall: 3, Draws: []credits.Draw{}},
		{ID: "t3", Kind: credits.KindGrant, Amount: 5, GrantID: "g1", Metadata: map[string]string{"k": "v"}},
	}})
	consume, revoke, grant := page.Data[0], page.Data[1], page.Data[2]
	if consume.Draws == nil || len(*consume.Draws) != 1 || consume.Shortfall != nil || consume.GrantId != nil {
		t.Errorf("consume entry = %+v", consume)
	}
	if revoke.Shortfall == nil || *revoke.Shortfall != 3 || revoke.Draws == nil || len(*revoke.Draws) != 0 {
		t.Errorf("revoke entry = %+v", revoke)
	}
	if grant.Draws != nil || *grant.GrantId != "g1" || grant.Metadata["k"] != "v" || page.NextCursor != nil {
		t.Errorf("grant entry = %+v, next %v", grant, page.NextCursor)
	}
	if j, _ := json.Marshal(consume); !strings.Contains(string(j), `"metadata":{}`) {
		t.Errorf("nil metadata is not {}: %s", j)
	}
	if p := toAPILedgerPage(credits.LedgerPage{NextCursor: "c"}); *p.NextCursor != "c" || p.Data == nil {
		t.Errorf("empty page = %+v", p)
	}

	rep, _ := json.Marshal(ToAPIVerifyReport(credits.VerifyReport{OK: true}))
	if !strings.Contains(string(rep), `"problems":[]`) || !strings.Contains(string(rep), `"receivables":[]`) {
		t.Errorf("clean report: %s", rep)
	}
	v := ToAPIVerifyReport(credits.VerifyReport{Problems: []credits.VerifyProblem{{Kind: "k", PaymentID: "pay_1", Detail: "d"}}})
	if v.Problems[0].CustomerId != nil || *v.Problems[0].PaymentId != "pay_1" {
		t.Errorf("problem = %+v", v.Problems[0])
	}

	p := toAPIPayment(payments.Payment{ID: "pay_1", Status: payments.Pending, ItemKind: payments.KindCreditPack,
		Transitions: []payments.Transition{{To: payments.Pending}, {From: payments.Pending, To: payments.Succeeded, StripeEventID: "evt_1"}}})
	if p.AmountTax != nil || p.ReceivedCurrency != nil || p.CheckoutSessionId != nil || p.SucceededAt != nil || p.FailureReason != nil {
		t.Errorf("unknown Stripe details became values: %+v", p)
	}
	if p.Transitions[0].From != nil || p.Transitions[0].StripeEventId != nil || *p.Transitions[1].From != "pending" || *p.Transitions[1].StripeEventId != "evt_1" {
		t.Errorf("transitions = %+v", p.Transitions)
	}
	taxed := toAPIPayment(payments.Payment{Checkout: payments.CheckoutTotals{Currency: "eur", AmountTax: 0}, ReceivedCurrency: "eur"})
	if taxed.AmountTax == nil || *taxed.AmountTax != 0 || *taxed.ReceivedCurrency != "eur" {
		t.Errorf("a known zero tax is not 0: %+v", taxed)
	}

	se := toAPIStripeEvent(stripehook.Stored{ID: "evt_1", Status: stripehook.Processed})
	if se.LastError != nil || se.ApiVersion != nil || se.ProcessedAt != nil {
		t.Errorf("stripe event = %+v", se)
	}
}

func TestUsageConversion(t *testing.T) {
	t.Parallel()
	local := time.FixedZone("CET", 3600)
	ev := toAPIUsageEvent(metering.UsageEvent{Identifier: "u1", CustomerID: "ada", Meter: "m", Value: 3,
		Timestamp: time.Date(2026, 3, 1, 13, 0, 0, 0, local), Status: metering.StatusPending})
	if ev.Timestamp.Location() != time.UTC || !ev.Timestamp.Equal(convT0) || ev.DeadCode != nil || ev.LastError != nil || ev.DeliveredAt != nil {
		t.Errorf("usage event = %+v", ev)
	}
	if dead := toAPIUsageEvent(metering.UsageEvent{Status: metering.StatusDead, DeadCode: metering.DeadTooOld}); dead.DeadCode == nil || *dead.DeadCode != api.UsageDeadCodeTooOld {
		t.Errorf("dead event = %+v", dead)
	}

	res := toAPIIntakeResult(metering.IntakeResult{Accepted: 1, Rejected: 1, Results: []metering.EventResult{
		{Identifier: "u1", Status: metering.ResultAccepted},
		{Identifier: "u2", Status: metering.ResultConflict, Code: errs.IdentifierConflict, Detail: "taken"},
	}})
	if res.Results[0].Code != nil || res.Results[0].Detail != nil {
		t.Errorf("accepted result = %+v", res.Results[0])
	}
	if *res.Results[1].Code != api.ErrorCodeIdentifierConflict || *res.Results[1].Detail != "taken" {
		t.Errorf("conflict result = %+v", res.Results[1])
	}

	rq := toAPIRequeueResult(metering.RequeueResult{Requeued: 1, Skipped: 1, Results: []metering.RequeueItem{
		{Identifier: "u1", Requeued: true},
		{Identifier: "u2", Skip: metering.SkipForceRequired, Detail: "maybe sent"},
	}})
	if rq.Results[0].Status != api.Requeued || rq.Results[0].Code != nil || rq.Results[0].Detail != nil {
		t.Errorf("requeued = %+v", rq.Results[0])
	}
	if rq.Results[1].Status != api.Skipped || *rq.Results[1].Code != api.RequeueSkipCodeForceRequired || *rq.Results[1].Detail != "maybe sent" {
		t.Errorf("skipped = %+v", rq.Results[1])
	}

	if pg := toAPIUsageEventPage(metering.Page{}); pg.Data == nil || pg.NextCursor != nil {
		t.Errorf("empty usage page = %+v", pg)
	}
	tot := toAPIUsageTotals(metering.Totals{CustomerID: "ada", Meters: []metering.MeterTotal{{Meter: "m", Total: 4, Events: 2}}})
	if tot.Meters[0] != (api.MeterTotal{Meter: "m", Total: 4, Events: 2}) {
		t.Errorf("totals = %+v", tot)
	}
	rec := ToAPIReconciliation(metering.Reconciliation{Meter: "m", Mismatches: []metering.Mismatch{{CustomerID: "ada", LocalTotal: 3, StripeTotal: 1, Difference: 2}}})
	if rec.Mismatches[0] != (api.ReconciliationMismatch{CustomerId: "ada", LocalTotal: 3, StripeTotal: 1, Difference: 2}) {
		t.Errorf("reconciliation = %+v", rec)
	}
}

// Every value of a domain enum converts to a value of the contract's enum:
// a status added in a capability package without openapi.yaml fails here,
// not in a client that meets it.
func TestDomainEnumsAreInTheContract(t *testing.T) {
	t.Parallel()
	check := func(what string, values map[string]string, valid func(string) bool) {
		for v := range values {
			if !valid(v) {
				t.Errorf("%s %q is not a value of the contract's enum", what, v)
			}
		}
	}
	check("payments.Status", stringConsts(t, "payments", ofType("Status")), func(v string) bool {
		p := toAPIPayment(payments.Payment{Status: payments.Status(v), Transitions: []payments.Transition{{From: payments.Status(v), To: payments.Status(v)}}})
		return p.Status.Valid() && api.PaymentStatus(*p.Transitions[0].From).Valid() && api.PaymentStatus(p.Transitions[0].To).Valid()
	})
	check("payments.ItemKind", stringConsts(t, "payments", ofType("ItemKind")), func(v string) bool {
		return toAPIPayment(payments.Payment{ItemKind: payments.ItemKind(v)}).ItemKind.Valid()
	})
	check("credits.Source", stringConsts(t, "credits", ofType("Source")), func(v string) bool {
		return toAPIBalance(credits.Balance{Grants: []credits.GrantSummary{{Source: credits.Source(v)}}}).Grants[0].Source.Valid()
	})
	check("credits ledger kind", stringConsts(t, "credits", func(name, typ string) bool { return typ == "" && strings.HasPrefix(name, "Kind") }), func(v string) bool {
		return toAPILedgerPage(credits.LedgerPage{Entries: []credits.LedgerEntry{{Kind: v}}}).Data[0].Kind.Valid()
	})
	check("metering.Status", stringConsts(t, "metering", ofType("Status")), func(v string) bool {
		return toAPIUsageEvent(metering.UsageEvent{Status: metering.Status(v)}).Status.Valid()
	})
	check("metering.DeadCode", stringConsts(t, "metering", ofType("DeadCode")), func(v string) bool {
		return toAPIUsageEvent(metering.UsageEvent{DeadCode: metering.DeadCode(v)}).DeadCode.Valid()
	})
	check("metering.ResultStatus", stringConsts(t, "metering", ofType("ResultStatus")), func(v string) bool {
		return toAPIIntakeResult(metering.IntakeResult{Results: []metering.EventResult{{Status: metering.ResultStatus(v)}}}).Results[0].Status.Valid()
	})
	check("metering.RequeueSkip", stringConsts(t, "metering", ofType("RequeueSkip")), func(v string) bool {
		return toAPIRequeueResult(metering.RequeueResult{Results: []metering.RequeueItem{{Skip: metering.RequeueSkip(v)}}}).Results[0].Code.Valid()
	})
	check("stripehook.Status", stringConsts(t, "stripehook", ofType("Status")), func(v string) bool {
		return toAPIStripeEvent(stripehook.Stored{Status: stripehook.Status(v)}).Status.Valid()
	})
}
