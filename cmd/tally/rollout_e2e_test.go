package main

import (
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// rolloutCatalog has two flows priced alike, each under its own strategy.
func rolloutCatalog(flowA, flowB string) string {
	return `
redirect_url_prefixes: ["https://app.example.com/"]
credit_packs:
  - {id: flow-a, name: Flow A, amount: 1000, currency: usd, credits: 1000, confirm_on: ` + flowA + `}
  - {id: flow-b, name: Flow B, amount: 1000, currency: usd, credits: 1000, confirm_on: ` + flowB + `}
`
}

// Two items under different strategies in one catalog, then a switch of
// both and a switch back, with payments in flight across each restart:
// every payment is confirmed by the strategy it was created under (the
// other strategy's event credits nothing), once.
func TestConfirmStrategiesSideBySide(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	env := payEnv(t, fake.URL())
	env["TALLY_CATALOG_FILE"] = writeCatalog(t, rolloutCatalog("payment_intent", "checkout_session"))
	s := startServer(t, env)
	gdb := openDB(t, s)

	type flight struct {
		pay, customer, want string
	}
	start := func(item, customer, want string) flight {
		pay := checkout(t, s, customer, item, 1)
		if p := getPayment(t, s, pay); p.ConfirmOn == nil || string(*p.ConfirmOn) != want {
			t.Fatalf("%s created under %v, want %s", item, p.ConfirmOn, want)
		}
		return flight{pay, customer, want}
	}
	// confirm delivers the other strategy's event first (nothing), then the
	// payment's own (credited), then both again (nothing more).
	confirm := func(f flight) {
		t.Helper()
		session := paidAtStripe(t, fake, s, f.pay)
		sessionEvent := func() { deliver(t, s, stripeEvent(newEventID(), "checkout.session.completed", session)) }
		intentEvent := func() {
			deliver(t, s, stripeEvent(newEventID(), "payment_intent.succeeded", paymentIntent(f.pay, f.customer, "succeeded", 1000, 1000, "usd")))
		}
		own, other := intentEvent, sessionEvent
		if f.want == "checkout_session" {
			own, other = sessionEvent, intentEvent
		}
		other()
		if bal := balanceOf(t, gdb, f.customer); bal != 0 {
			t.Fatalf("%s (%s) was credited %d by the other strategy's event", f.pay, f.want, bal)
		}
		own()
		other()
		own()
		if bal := balanceOf(t, gdb, f.customer); bal != 1000 {
			t.Fatalf("%s (%s): balance %d, want 1000", f.pay, f.want, bal)
		}
		p := getPayment(t, s, f.pay)
		if p.Status != client.PaymentStatusSucceeded || p.ConfirmedBy == nil || string(*p.ConfirmedBy) != f.want {
			t.Fatalf("%s: %s confirmed by %v, want %s", f.pay, p.Status, p.ConfirmedBy, f.want)
		}
	}
	restart := func(flowA, flowB string) {
		s.shutdown(t)
		env["TALLY_CATALOG_FILE"] = writeCatalog(t, rolloutCatalog(flowA, flowB))
		s = startServer(t, env)
	}

	a1 := start("flow-a", "a1", "payment_intent")
	b1 := start("flow-b", "b1", "checkout_session")
	confirm(a1)

	// Move flow A to the session strategy and flow B to the PaymentIntent:
	// b1, in flight, keeps its own.
	restart("checkout_session", "payment_intent")
	a2 := start("flow-a", "a2", "checkout_session")
	b2 := start("flow-b", "b2", "payment_intent")
	confirm(b1)
	confirm(a2)

	// And back: a2's and b2's strategies stay theirs.
	restart("payment_intent", "checkout_session")
	a3 := start("flow-a", "a3", "payment_intent")
	confirm(b2)
	confirm(a3)
	assertInvariants(t, s)
}
