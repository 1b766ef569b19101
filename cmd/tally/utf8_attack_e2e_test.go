package main

import (
	"net/http"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// A JSON body must be UTF-8 (RFC 8259, 8.1). encoding/json reads every byte
// that is not as U+FFFD, so a body that is not UTF-8 was taken as another
// text than the one sent: two usage events whose identifiers differ only in
// such a byte became one identifier, the second answered a conflict (or,
// with the same value, a duplicate: the caller's event counted nowhere),
// and the identifier stored and sent to Stripe was not the caller's. Text
// tally stores (text.Check) refuses bytes that are not UTF-8, but never saw
// them. Such a body is refused whole, 400 invalid_request, and writes
// nothing, on the usage intake as on every JSON body.
func TestAttackABodyThatIsNotUTF8IsRefusedAndWritesNothing(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	s := startServer(t, meteringEnv(t, fake.URL()))
	gdb := openDB(t, s)
	grantOverHTTP(t, s.service(t), "utf8-1", 10, "utf8-grant")

	cases := []struct{ name, path, body, key string }{
		// Two events, one identifier each: "u8-" then 0xFF, "u8-" then 0xFE.
		{"usage identifiers", "/v1/usage-events",
			"{\"events\":[{\"customer_id\":\"utf8-1\",\"meter\":\"api_calls\",\"value\":1,\"identifier\":\"u8-\xff\"}," +
				"{\"customer_id\":\"utf8-1\",\"meter\":\"api_calls\",\"value\":1,\"identifier\":\"u8-\xfe\"}]}", ""},
		{"a usage customer", "/v1/usage-events",
			"{\"events\":[{\"customer_id\":\"utf8-\xc3\",\"meter\":\"api_calls\",\"value\":1,\"identifier\":\"u8-c\"}]}", ""},
		// Escapes of half a UTF-16 pair, read as U+FFFD alike.
		{"usage identifiers escaped", "/v1/usage-events",
			`{"events":[{"customer_id":"utf8-1","meter":"api_calls","value":1,"identifier":"u8-\ud800"},` +
				`{"customer_id":"utf8-1","meter":"api_calls","value":1,"identifier":"u8-\udbff"}]}`, ""},
		{"a consume's reason", "/v1/customers/utf8-1/credits/consume", "{\"amount\":1,\"reason\":\"job \xff\"}", "utf8-consume"},
		{"a grant's reason", "/v1/customers/utf8-1/credits/grants", "{\"amount\":1,\"reason\":\"gift \xe2\x80\"}", "utf8-grant-2"},
	}
	for _, c := range cases {
		status, p, out := rawPost(t, s.URL+c.path, c.key, c.body)
		if status != http.StatusBadRequest || p.Code != client.ErrorCodeInvalidRequest || p.Detail == nil || !strings.Contains(*p.Detail, "UTF-8") {
			t.Errorf("%s not UTF-8: %d %s, want 400 invalid_request saying the body is not UTF-8", c.name, status, out)
		}
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM usage_events`); n != 0 {
		t.Errorf("%d usage events stored from bodies that are not UTF-8", n)
	}
	if b := balanceOf(t, gdb, "utf8-1"); b != 10 {
		t.Errorf("balance %d after refused consume and grant, want 10", b)
	}
	if n := countRows(t, gdb, `SELECT count(*) FROM credit_ledger WHERE customer_id = 'utf8-1'`); n != 1 {
		t.Errorf("%d ledger entries, want the first grant's only", n)
	}

	// The same bodies in UTF-8 are taken, identifiers as sent.
	status, _, out := rawPost(t, s.URL+"/v1/usage-events", "", `{"events":[{"customer_id":"utf8-1","meter":"api_calls","value":1,"identifier":"u8-ÿ"},`+
		`{"customer_id":"utf8-1","meter":"api_calls","value":1,"identifier":"u8-þ"}]}`)
	if status != http.StatusAccepted || !strings.Contains(out, `"accepted":2`) {
		t.Errorf("the UTF-8 batch: %d %s, want both accepted", status, out)
	}
	mustVerifyClean(t, s)
}
