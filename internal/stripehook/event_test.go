package stripehook

import (
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/errs"
)

var seedEvents = []string{
	`{"id":"evt_1","object":"event","api_version":"2025-03-31.basil","created":1700000000,"livemode":false,"type":"payment_intent.succeeded","data":{"object":{"id":"pi_1","object":"payment_intent","amount":1000,"amount_received":1000,"currency":"usd","livemode":false,"metadata":{"tally_payment_id":"pay_1"},"status":"succeeded","latest_charge":"ch_1"}}}`,
	`{"id":"evt_2","object":"event","api_version":null,"type":"checkout.session.completed","data":{"object":{"id":"cs_1","payment_intent":{"id":"pi_1","object":"payment_intent"},"customer":null,"payment_status":"unpaid","metadata":{"tally_payment_id":"pay_1","n":3}}}}`,
	`{"id":"evt_3","type":"charge.refunded","data":{"object":{"id":"ch_1","payment_intent":"pi_1","amount":1000,"amount_refunded":500,"currency":"usd"}}}`,
	`{"id":"evt_4","type":"customer.subscription.updated","data":{"object":{"id":"sub_1","customer":"cus_1","status":"active","metadata":null}}}`,
	`{"id":"evt_5","type":"radar.early_fraud_warning.created","data":{"object":{"id":"issfr_1"}}}`,
	`{"id":"evt_6","type":"payment_intent.succeeded","data":{"object":[]}}`,
	`{"id":"","type":"x","data":{"object":{}}}`,
	`{"id":"evt_7","object":"customer","type":"x","data":{"object":{}}}`,
	`[1,2,3]`,
	`{"id":"evt_8","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1","amount":"1000"}}}`,
	"{\"id\":\"evt_\xff\",\"type\":\"x\",\"data\":{\"object\":{}}}",
	``,
}

// FuzzParseEvent feeds arbitrary bodies to the webhook decoder: it must
// never panic, must accept only events with an id, a type and an object,
// and decoding an accepted event's object for its type must either work or
// fail with invalid_request (which parks the event), never anything else.
func FuzzParseEvent(f *testing.F) {
	for _, s := range seedEvents {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		ev, err := ParseEvent(payload)
		if err != nil {
			if !errs.Is(err, errs.Invalid) {
				t.Fatalf("ParseEvent error without invalid_request: %v", err)
			}
			return
		}
		if ev.ID == "" || ev.Type == "" || len(ev.ID) > maxIDLen || !isObject(ev.Object) {
			t.Fatalf("accepted an event without id, type or object: %+v", ev)
		}
		for _, dst := range []any{&paymentIntentObject{}, &checkoutSessionObject{}, &chargeObject{}, &subscriptionObject{}} {
			if err := decodeObject(ev, dst, func() string { return "x" }); err != nil && !errs.Is(err, errs.Invalid) {
				t.Fatalf("decodeObject error without invalid_request: %v", err)
			}
		}
	})
}

func TestParseEvent(t *testing.T) {
	t.Parallel()
	ev, err := ParseEvent([]byte(seedEvents[0]))
	if err != nil {
		t.Fatal(err)
	}
	if ev.ID != "evt_1" || ev.Type != "payment_intent.succeeded" || ev.APIVersion != "2025-03-31.basil" || ev.Created != 1700000000 {
		t.Fatalf("envelope = %+v", ev)
	}
	for i, want := range map[int]string{5: "data.object", 6: "no id", 7: "not an event", 8: "not a JSON object", 10: "UTF-8", 11: "not a JSON object"} {
		if _, err := ParseEvent([]byte(seedEvents[i])); !errs.Is(err, errs.Invalid) || !strings.Contains(err.Error(), want) {
			t.Errorf("seed %d: %v, want invalid_request mentioning %q", i, err, want)
		}
	}
}

// Objects may arrive with expandable fields expanded and with metadata
// values that are not strings; neither must stop us reading what we need.
func TestDecodeTolerates(t *testing.T) {
	t.Parallel()
	ev, err := ParseEvent([]byte(seedEvents[1]))
	if err != nil {
		t.Fatal(err)
	}
	var cs checkoutSessionObject
	if err := decodeObject(ev, &cs, func() string { return cs.ID }); err != nil {
		t.Fatal(err)
	}
	d := cs.domain()
	if d.PaymentIntent != "pi_1" || d.Customer != "" || d.Metadata["tally_payment_id"] != "pay_1" || d.PaymentStatus != "unpaid" {
		t.Fatalf("session = %+v", d)
	}
	bad, err := ParseEvent([]byte(seedEvents[9]))
	if err != nil {
		t.Fatal(err)
	}
	var pi paymentIntentObject
	if err := decodeObject(bad, &pi, func() string { return pi.ID }); !errs.Is(err, errs.Invalid) {
		t.Fatalf("an amount as a string decoded: %v", err)
	}
}
