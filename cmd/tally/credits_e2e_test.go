package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/pkg/client"
)

// wideClient is a service client whose transport keeps enough connections
// open for a thousand concurrent requests without exhausting local ports.
func (s *server) wideClient(t testing.TB) *client.ClientWithResponses {
	t.Helper()
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxConnsPerHost = 64
	tr.MaxIdleConns = 64
	tr.MaxIdleConnsPerHost = 64
	t.Cleanup(tr.CloseIdleConnections)
	c, err := client.NewClientWithResponses(s.URL,
		// A request may queue behind a thousand others on one row lock; on a
		// loaded machine that took over two minutes.
		client.WithHTTPClient(&http.Client{Transport: tr, Timeout: 5 * time.Minute}),
		client.WithRequestEditorFn(func(ctx context.Context, req *http.Request) error {
			req.Header.Set("Authorization", "Bearer "+testServiceKey)
			return nil
		}))
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return c
}

// A bad day (docs/guarantees.md, "Never overdrawn"): a thousand concurrent
// consumes of 1 credit against a balance of 100, over HTTP.
func TestThousandConcurrentConsumesSpendExactlyTheBalance(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.wideClient(t)
	grantOverHTTP(t, c, "hot", 100, "grant-1")

	const n = 1000
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		ok, poor int
		other    []string
		ids      = map[string]bool{}
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.ConsumeCreditsWithResponse(context.Background(), "hot",
				&client.ConsumeCreditsParams{IdempotencyKey: fmt.Sprintf("consume-%d", i)},
				client.ConsumeRequest{Amount: 1, Reason: "api call"})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				other = append(other, err.Error())
			case r.StatusCode() == http.StatusOK:
				ok++
				ids[r.JSON200.TransactionId] = true
			case r.StatusCode() == http.StatusPaymentRequired:
				p := r.ApplicationproblemJSON402
				if p == nil || p.Code != client.ErrorCodeInsufficientCredits || p.Balance == nil || *p.Balance != 0 {
					other = append(other, "402 without insufficient_credits and balance 0: "+string(r.Body))
				}
				poor++
			default:
				other = append(other, fmt.Sprintf("%d %s", r.StatusCode(), r.Body))
			}
		}()
	}
	wg.Wait()
	if len(other) > 0 {
		t.Fatalf("%d unexpected answers, first: %s", len(other), other[0])
	}
	if ok != 100 || poor != 900 || len(ids) != 100 {
		t.Fatalf("%d succeeded (%d distinct transactions), %d refused; want 100 and 900", ok, len(ids), poor)
	}
	if b := balanceOverHTTP(t, c, "hot"); b.Balance != 0 {
		t.Fatalf("final balance %d, want 0", b.Balance)
	}
	if entries := ledgerOverHTTP(t, c, "hot"); len(entries) != 101 || entries[0].BalanceAfter != 0 {
		t.Fatalf("%d ledger entries, want 101 ending at 0", len(entries))
	}
	mustVerifyClean(t, s)
}

func TestConsumeRetriedConcurrentlyWithOneKeySpendsOnce(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.wideClient(t)
	grantOverHTTP(t, c, "retry", 50, "grant-1")

	const n = 20
	type answer struct {
		status   int
		body     string
		replayed string
	}
	answers := make([]answer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			meta := client.Metadata{"job": "export-7"}
			r, err := c.ConsumeCreditsWithResponse(context.Background(), "retry",
				&client.ConsumeCreditsParams{IdempotencyKey: "one-key"},
				client.ConsumeRequest{Amount: 7, Reason: "export", Metadata: &meta})
			if err != nil {
				t.Errorf("consume: %v", err)
				return
			}
			answers[i] = answer{r.StatusCode(), string(r.Body), r.HTTPResponse.Header.Get("Idempotent-Replayed")}
		}()
	}
	wg.Wait()
	first := 0
	for i, a := range answers {
		if a.status != http.StatusOK || a.body != answers[0].body {
			t.Fatalf("answer %d: %d %s; want 200 and the same body as %s", i, a.status, a.body, answers[0].body)
		}
		switch a.replayed {
		case "":
			first++
		case "true":
		default:
			t.Fatalf("Idempotent-Replayed: %q", a.replayed)
		}
	}
	if first != 1 {
		t.Fatalf("%d answers without Idempotent-Replayed, want exactly the first one", first)
	}
	entries := ledgerOverHTTP(t, c, "retry")
	if len(entries) != 2 || entries[0].Kind != client.Consume || entries[0].Amount != -7 || entries[0].Metadata["job"] != "export-7" {
		t.Fatalf("ledger %+v, want the grant and one consume of 7", entries)
	}
	if b := balanceOverHTTP(t, c, "retry"); b.Balance != 43 {
		t.Fatalf("balance %d, want 43", b.Balance)
	}
	// Replays spend nothing, so they count nothing.
	if m := metricsText(t, s); !strings.Contains(m, "\ntally_credits_consumed_total 7\n") {
		t.Fatalf("/metrics lacks tally_credits_consumed_total 7:\n%s", m)
	}

	// The same key with another body is refused and spends nothing.
	r, err := c.ConsumeCreditsWithResponse(context.Background(), "retry",
		&client.ConsumeCreditsParams{IdempotencyKey: "one-key"}, client.ConsumeRequest{Amount: 8, Reason: "export"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "same key, other body", r.StatusCode(), r.Body, http.StatusUnprocessableEntity)
	if p := r.ApplicationproblemJSONDefault; p == nil || p.Code != client.ErrorCodeIdempotencyKeyReused {
		t.Fatalf("problem %s, want idempotency_key_reused", r.Body)
	}
	// Grants replay too.
	g1 := grantOverHTTP(t, c, "retry", 5, "grant-2")
	gr, err := c.GrantCreditsWithResponse(context.Background(), "retry", &client.GrantCreditsParams{IdempotencyKey: "grant-2"},
		client.GrantRequest{Amount: 5, Reason: "welcome"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "grant replay", gr.StatusCode(), gr.Body, http.StatusCreated)
	if gr.HTTPResponse.Header.Get("Idempotent-Replayed") != "true" || gr.JSON201.TransactionId != g1.TransactionId {
		t.Fatalf("grant replay %s (header %q), want the first answer replayed", gr.Body, gr.HTTPResponse.Header.Get("Idempotent-Replayed"))
	}
	if b := balanceOverHTTP(t, c, "retry"); b.Balance != 48 {
		t.Fatalf("balance %d after a replayed grant, want 48", b.Balance)
	}
	mustVerifyClean(t, s)
}

// rawPost sends body as-is, so tests can break the contract in ways the
// typed client cannot.
func rawPost(t testing.TB, url, key string, body string) (int, client.Problem, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testServiceKey)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var p client.Problem
	if resp.StatusCode >= 400 {
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
			t.Fatalf("error answer with Content-Type %q: %s", ct, raw)
		}
		if err := json.Unmarshal(raw, &p); err != nil {
			t.Fatalf("problem body %s: %v", raw, err)
		}
	}
	return resp.StatusCode, p, string(raw)
}

func TestCreditsBadInputIsRefusedAndWritesNothing(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.service(t)
	grantOverHTTP(t, c, "careful", 10, "grant-1")
	consumeURL := s.URL + "/v1/customers/careful/credits/consume"
	grantURL := s.URL + "/v1/customers/careful/credits/grants"
	cases := []struct {
		name, url, key, body string
		status               int
		code                 client.ErrorCode
	}{
		{"negative amount", consumeURL, "k1", `{"amount":-1,"reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"zero amount", consumeURL, "k2", `{"amount":0,"reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"fractional amount", consumeURL, "k3", `{"amount":1.5,"reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"string amount", consumeURL, "k4", `{"amount":"5","reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"huge amount", consumeURL, "k5", `{"amount":1e13,"reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"beyond int64", consumeURL, "k6", `{"amount":99999999999999999999999,"reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"missing reason", consumeURL, "k7", `{"amount":1}`, 422, client.ErrorCodeInvalidRequest},
		{"empty reason", consumeURL, "k8", `{"amount":1,"reason":""}`, 422, client.ErrorCodeInvalidRequest},
		{"missing Idempotency-Key", consumeURL, "", `{"amount":1,"reason":"x"}`, 400, client.ErrorCodeInvalidRequest},
		{"malformed JSON", consumeURL, "k9", `{"amount":`, 400, client.ErrorCodeInvalidRequest},
		{"unknown field", consumeURL, "k10", `{"amount":1,"reason":"x","currency":"usd"}`, 422, client.ErrorCodeInvalidRequest},
		{"unknown customer", s.URL + "/v1/customers/ghost/credits/consume", "k11", `{"amount":1,"reason":"x"}`, 404, client.ErrorCodeNotFound},
		{"grant of zero", grantURL, "k12", `{"amount":0,"reason":"x"}`, 422, client.ErrorCodeInvalidRequest},
		{"grant expiring in the past", grantURL, "k13", `{"amount":5,"reason":"x","expires_at":"2001-01-01T00:00:00Z"}`, 422, client.ErrorCodeInvalidRequest},
		{"grant without key", grantURL, "", `{"amount":5,"reason":"x"}`, 400, client.ErrorCodeInvalidRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, p, raw := rawPost(t, tc.url, tc.key, tc.body)
			if status != tc.status || p.Code != tc.code || p.Detail == nil || *p.Detail == "" {
				t.Fatalf("%d %s; want %d %s with a detail", status, raw, tc.status, tc.code)
			}
		})
	}
	// Nothing moved: the grant is the only entry, the balance unchanged, the
	// unknown customer not created, no idempotency key kept.
	if entries := ledgerOverHTTP(t, c, "careful"); len(entries) != 1 {
		t.Fatalf("%d ledger entries after bad input, want only the grant", len(entries))
	}
	if b := balanceOverHTTP(t, c, "careful"); b.Balance != 10 {
		t.Fatalf("balance %d, want 10", b.Balance)
	}
	if r, err := c.GetCustomerWithResponse(context.Background(), "ghost"); err != nil || r.StatusCode() != http.StatusNotFound {
		t.Fatalf("consume on an unknown customer created it: %v %v", err, r.Status())
	}
	gdb := openDB(t, s)
	var keys int
	if err := gdb.Raw(`SELECT count(*) FROM idempotency_keys`).Scan(&keys).Error; err != nil || keys != 1 {
		t.Fatalf("%d idempotency keys stored (%v), want only the grant's", keys, err)
	}
	mustVerifyClean(t, s)
}

func TestCreditsEndUsersReadTheirOwnButNeverSpendOrGrant(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	svc := s.service(t)
	expires := time.Now().Add(30 * 24 * time.Hour).UTC().Truncate(time.Second)
	r, err := svc.GrantCreditsWithResponse(context.Background(), "uma", &client.GrantCreditsParams{IdempotencyKey: "g1"},
		client.GrantRequest{Amount: 25, Reason: "trial", ExpiresAt: &expires})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
	if r.JSON201.Balance != 25 || r.JSON201.ExpiresAt == nil || !r.JSON201.ExpiresAt.Equal(expires) {
		t.Fatalf("grant answer %s", r.Body)
	}
	grantOverHTTP(t, svc, "vic", 5, "g1")

	user := s.client(t, userToken(t, "uma", time.Now().Add(time.Hour)))
	b := balanceOverHTTP(t, user, "uma")
	if b.Balance != 25 || len(b.Grants) != 1 || b.Grants[0].Source != client.Service || b.NextExpiry == nil ||
		!b.NextExpiry.Equal(expires) || b.NextExpiryAmount == nil || *b.NextExpiryAmount != 25 {
		t.Fatalf("balance as the user sees it: %+v", b)
	}
	if entries := ledgerOverHTTP(t, user, "uma"); len(entries) != 1 || entries[0].Kind != client.Grant || entries[0].GrantId == nil {
		t.Fatalf("ledger as the user sees it: %+v", entries)
	}
	forbidden := []struct {
		name string
		call func() (int, []byte, error)
	}{
		{"another customer's balance", func() (int, []byte, error) {
			r, err := user.GetBalanceWithResponse(context.Background(), "vic", nil)
			return status(r, err)
		}},
		{"another customer's ledger", func() (int, []byte, error) {
			r, err := user.ListCreditTransactionsWithResponse(context.Background(), "vic", nil)
			return status(r, err)
		}},
		{"consume own credits", func() (int, []byte, error) {
			r, err := user.ConsumeCreditsWithResponse(context.Background(), "uma", &client.ConsumeCreditsParams{IdempotencyKey: "u1"},
				client.ConsumeRequest{Amount: 1, Reason: "self-service"})
			return status(r, err)
		}},
		{"grant to itself", func() (int, []byte, error) {
			r, err := user.GrantCreditsWithResponse(context.Background(), "uma", &client.GrantCreditsParams{IdempotencyKey: "u2"},
				client.GrantRequest{Amount: 1000, Reason: "free money"})
			return status(r, err)
		}},
		{"verify", func() (int, []byte, error) {
			r, err := user.VerifyInvariantsWithResponse(context.Background())
			return status(r, err)
		}},
	}
	for _, tc := range forbidden {
		code, body, err := tc.call()
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, tc.name, code, body, http.StatusForbidden)
	}
	if b := balanceOverHTTP(t, svc, "uma"); b.Balance != 25 {
		t.Fatalf("balance %d after refused user calls, want 25", b.Balance)
	}
	mustVerifyClean(t, s)
}

type statusResponse interface{ StatusCode() int }

func status[R statusResponse](r R, err error) (int, []byte, error) {
	if err != nil {
		return 0, nil, err
	}
	var body []byte
	switch v := any(r).(type) {
	case *client.GetBalanceResponse:
		body = v.Body
	case *client.ListCreditTransactionsResponse:
		body = v.Body
	case *client.ConsumeCreditsResponse:
		body = v.Body
	case *client.GrantCreditsResponse:
		body = v.Body
	case *client.VerifyInvariantsResponse:
		body = v.Body
	}
	return r.StatusCode(), body, nil
}

func TestVerifyNamesATamperedBalanceAndExitsNonZero(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	c := s.service(t)
	grantOverHTTP(t, c, "tampered", 10, "g1")
	grantOverHTTP(t, c, "honest", 10, "g1")
	r, err := c.ConsumeCreditsWithResponse(context.Background(), "tampered", &client.ConsumeCreditsParams{IdempotencyKey: "c1"},
		client.ConsumeRequest{Amount: 4, Reason: "x"})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "consume", r.StatusCode(), r.Body, http.StatusOK)
	mustVerifyClean(t, s)

	gdb := openDB(t, s)
	if err := gdb.Exec(`UPDATE credit_balances SET balance = balance + 100 WHERE customer_id = 'tampered'`).Error; err != nil {
		t.Fatal(err)
	}
	out, err := s.tallyCmd(t, "verify")
	if err == nil || exitCode(err) != 2 {
		t.Fatalf("tally verify on a tampered balance: err %v (exit %d), want exit 2\n%s", err, exitCode(err), out)
	}
	if !strings.Contains(out, "BREACH balance_ledger_mismatch customer=tampered") || strings.Contains(out, "honest") {
		t.Fatalf("tally verify output does not name exactly the tampered customer:\n%s", out)
	}

	out, err = s.tallyCmd(t, "verify", "--json")
	if exitCode(err) != 2 {
		t.Fatalf("tally verify --json: %v", err)
	}
	var rep struct {
		OK       bool `json:"ok"`
		Problems []struct {
			Kind       string `json:"kind"`
			CustomerID string `json:"customer_id"`
		} `json:"problems"`
	}
	if err := json.NewDecoder(bytes.NewBufferString(out)).Decode(&rep); err != nil || rep.OK || len(rep.Problems) != 1 || rep.Problems[0].CustomerID != "tampered" {
		t.Fatalf("tally verify --json: %v\n%s", err, out)
	}

	adm, err := s.admin(t).VerifyInvariantsWithResponse(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "admin verify", adm.StatusCode(), adm.Body, http.StatusOK)
	if adm.JSON200.Ok || len(adm.JSON200.Problems) != 1 || adm.JSON200.CustomersChecked != 2 {
		t.Fatalf("GET /v1/admin/verify: %s", adm.Body)
	}
}

// The sweeper runs inside `tally serve`: a grant that expires is recorded
// without any request touching the customer, once, with its notices.
func TestSweeperRecordsExpiriesInARunningServer(t *testing.T) {
	t.Parallel()
	env := baseEnv(t)
	env["TALLY_CREDITS_SWEEP_INTERVAL"] = "200ms"
	env["TALLY_CREDITS_EXPIRING_NOTICE"] = "1h"
	s := startServer(t, env)
	c := s.service(t)
	// Both grants must be in before the first expires, or the second
	// grant's request, not the sweeper, records the expiry. On a loaded
	// machine that may take longer than the lead: then the story starts
	// again with a new customer and twice the lead.
	var r *client.GrantCreditsResponse
	sweep := ""
	for lead := 2 * time.Second; ; lead *= 2 {
		if lead > patience {
			t.Fatalf("two grants took longer than %s", patience)
		}
		sweep = fmt.Sprintf("sweep-%s", lead)
		expires := time.Now().Add(lead)
		var err error
		r, err = c.GrantCreditsWithResponse(context.Background(), sweep, &client.GrantCreditsParams{IdempotencyKey: "g1"},
			client.GrantRequest{Amount: 10, Reason: "trial", ExpiresAt: &expires})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "grant", r.StatusCode(), r.Body, http.StatusCreated)
		grantOverHTTP(t, c, sweep, 5, "g2")
		if time.Now().Before(expires) {
			break
		}
		t.Logf("the second grant came %s after the first, past its expiry: again with %s", lead, 2*lead)
	}

	deadline := time.Now().Add(patience)
	var entries []client.LedgerEntry
	for {
		entries = ledgerOverHTTP(t, c, sweep)
		if entries[0].Kind == client.Expire {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no expire entry %s after the grant expired; ledger: %+v\nlogs:\n%s", patience, entries, s.logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(entries) != 3 || entries[0].Amount != -10 || entries[0].BalanceAfter != 5 || entries[0].GrantId == nil || *entries[0].GrantId != r.JSON201.GrantId {
		t.Fatalf("ledger %+v, want the expire of the trial grant's 10 leaving 5", entries)
	}
	time.Sleep(500 * time.Millisecond) // a few more sweeps: nothing more to record
	if again := ledgerOverHTTP(t, c, sweep); len(again) != 3 {
		t.Fatalf("%d ledger entries after more sweeps, want 3", len(again))
	}
	// The feed shows an event once every older transaction on the server
	// has ended (other tests' too), so it may lag: poll it.
	var counts map[string]int
	for {
		feed, err := c.ListEventsWithResponse(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "events", feed.StatusCode(), feed.Body, http.StatusOK)
		counts = map[string]int{}
		for _, e := range feed.JSON200.Data {
			if e.CustomerId != nil && *e.CustomerId == sweep {
				counts[e.Type]++
			}
		}
		if counts["credits.expired"] > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if counts["credits.expiring"] != 1 || counts["credits.expired"] != 1 || counts["credits.granted"] != 2 {
		t.Fatalf("event counts %v, want one expiring, one expired, two granted", counts)
	}
	mustVerifyClean(t, s)
}
