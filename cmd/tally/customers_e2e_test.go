package main

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/pkg/client"
)

func TestCustomersEndToEnd(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	ctx := context.Background()
	svc := s.service(t)

	email := "ada@example.com"
	threshold := int64(25)
	created, err := svc.UpsertCustomerWithResponse(ctx, "user-1", client.CustomerUpsert{Email: &email, LowBalanceThreshold: &threshold, Metadata: &client.Metadata{"plan": "pro"}})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "create", created.StatusCode(), created.Body, http.StatusCreated)
	if created.JSON201.Id != "user-1" || *created.JSON201.Email != email || *created.JSON201.LowBalanceThreshold != 25 {
		t.Fatalf("created customer = %+v", created.JSON201)
	}

	name := "Ada"
	updated, err := svc.UpsertCustomerWithResponse(ctx, "user-1", client.CustomerUpsert{Name: &name})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "update", updated.StatusCode(), updated.Body, http.StatusOK)
	if *updated.JSON200.Email != email || *updated.JSON200.Name != "Ada" || updated.JSON200.Metadata["plan"] != "pro" {
		t.Fatalf("update lost fields it did not name: %+v", updated.JSON200)
	}

	got, err := s.client(t, userToken(t, "user-1", time.Now().Add(time.Hour))).GetCustomerWithResponse(ctx, "user-1")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "own customer with end-user token", got.StatusCode(), got.Body, http.StatusOK)

	missing, err := svc.GetCustomerWithResponse(ctx, "nobody")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "unknown customer", missing.StatusCode(), missing.Body, http.StatusNotFound)
	if missing.ApplicationproblemJSONDefault == nil || missing.ApplicationproblemJSONDefault.Code != client.ErrorCodeNotFound {
		t.Fatalf("unknown customer problem = %s", missing.Body)
	}

	feed := pollEvents(t, svc, "", 2)
	var types []string
	for _, e := range feed.Data {
		types = append(types, e.Type)
	}
	if strings.Join(types, ",") != "customer.created,customer.updated" {
		t.Fatalf("event types = %v", types)
	}
	again, err := svc.ListEventsWithResponse(ctx, &client.ListEventsParams{After: &feed.NextCursor})
	if err != nil {
		t.Fatal(err)
	}
	if len(again.JSON200.Data) != 0 || again.JSON200.NextCursor != feed.NextCursor {
		t.Fatalf("feed after the end = %s", again.Body)
	}
}

// A request that breaks the contract is refused before any handler runs and
// writes nothing: no customer, no event.
func TestContractViolationsWriteNothing(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	cases := []struct {
		name, body string
		status     int
		pointer    string
	}{
		{"wrong type", `{"low_balance_threshold":"ten"}`, 422, "/low_balance_threshold"},
		{"negative threshold", `{"low_balance_threshold":-1}`, 422, "/low_balance_threshold"},
		{"unknown field", `{"emial":"a@b.c"}`, 422, ""},
		{"malformed JSON", `{"email":`, 400, ""},
		{"bad email", `{"email":"not-an-email"}`, 422, "/email"},
		{"bad stripe id", `{"stripe_customer_id":"acct_1"}`, 422, "/stripe_customer_id"},
		{"NUL in name", `{"name":"a\u0000b"}`, 422, "/name"},
		{"NUL in metadata", `{"metadata":{"k":"\u0000"}}`, 422, "/metadata"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodPut, s.URL+"/v1/customers/carol", strings.NewReader(tc.body))
			req.Header.Set("Authorization", "Bearer "+testServiceKey)
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var p client.Problem
			if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.status || p.Code != client.ErrorCodeInvalidRequest || resp.Header.Get("Content-Type") != "application/problem+json" {
				t.Fatalf("status %d code %s content-type %s, want %d invalid_request problem+json", resp.StatusCode, p.Code, resp.Header.Get("Content-Type"), tc.status)
			}
			if tc.pointer != "" && (p.Errors == nil || (*p.Errors)[0].Pointer != tc.pointer) {
				t.Fatalf("errors = %+v, want pointer %s", p.Errors, tc.pointer)
			}
		})
	}
	bad, _ := http.NewRequest(http.MethodPut, s.URL+"/v1/customers/"+strings.Repeat("x", 256), strings.NewReader(`{}`))
	bad.Header.Set("Authorization", "Bearer "+testServiceKey)
	bad.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(bad)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("over-long customer id: status %d, want 400", resp.StatusCode)
	}
	big, _ := http.NewRequest(http.MethodPut, s.URL+"/v1/customers/carol", strings.NewReader(`{"name":"`+strings.Repeat("x", 2<<20)+`"}`))
	big.Header.Set("Authorization", "Bearer "+testServiceKey)
	big.Header.Set("Content-Type", "application/json")
	resp, err = http.DefaultClient.Do(big)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("2 MiB body: status %d, want 413", resp.StatusCode)
	}

	r, err := s.service(t).GetCustomerWithResponse(context.Background(), "carol")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "carol after refused requests", r.StatusCode(), r.Body, http.StatusNotFound)
	// A marker written after the refused requests: once the feed shows it,
	// anything they had written would show before it.
	if r, err := s.service(t).UpsertCustomerWithResponse(context.Background(), "marker", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create marker: %v %v", err, r)
	}
	feed := pollEvents(t, s.service(t), "", 1)
	if len(feed.Data) != 1 || feed.Data[0].CustomerId == nil || *feed.Data[0].CustomerId != "marker" {
		t.Fatalf("refused requests wrote events: %+v", feed.Data)
	}
}
