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

func TestAuthentication(t *testing.T) {
	t.Parallel()
	s := startServer(t, baseEnv(t))
	ctx := context.Background()
	if r, err := s.service(t).UpsertCustomerWithResponse(ctx, "alice", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create alice: %v %v", err, r)
	}
	if r, err := s.service(t).UpsertCustomerWithResponse(ctx, "bob", client.CustomerUpsert{}); err != nil || r.StatusCode() != http.StatusCreated {
		t.Fatalf("create bob: %v %v", err, r)
	}
	alice := userToken(t, "alice", time.Now().Add(time.Hour))
	cases := []struct {
		name   string
		token  string
		call   func(c *client.ClientWithResponses) (int, []byte, error)
		status int
		code   client.ErrorCode
	}{
		{"no token", "", getCustomer("alice"), 401, client.ErrorCodeUnauthorized},
		{"wrong key", "not-a-key", getCustomer("alice"), 401, client.ErrorCodeUnauthorized},
		{"service key", testServiceKey, getCustomer("alice"), 200, ""},
		{"admin key on a service route", testAdminKey, getCustomer("alice"), 200, ""},
		{"service key on an admin route", testServiceKey, verify(), 403, client.ErrorCodeForbidden},
		{"end user reads itself", alice, getCustomer("alice"), 200, ""},
		{"end user reads another customer", alice, getCustomer("bob"), 403, client.ErrorCodeForbidden},
		{"end user on a service-only route", alice, upsertCustomer("alice"), 403, client.ErrorCodeForbidden},
		{"expired token", userToken(t, "alice", time.Now().Add(-time.Minute)), getCustomer("alice"), 401, client.ErrorCodeUnauthorized},
		{"token signed with another secret", forgedToken(t), getCustomer("alice"), 401, client.ErrorCodeUnauthorized},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, body, err := tc.call(s.client(t, tc.token))
			if err != nil {
				t.Fatal(err)
			}
			mustStatus(t, tc.name, status, body, tc.status)
			if tc.code != "" {
				var p client.Problem
				if err := json.Unmarshal(body, &p); err != nil || p.Code != tc.code || p.RequestId == nil {
					t.Fatalf("problem = %s (err %v), want code %s with a request id", body, err, tc.code)
				}
			}
		})
	}
}

func getCustomer(id string) func(c *client.ClientWithResponses) (int, []byte, error) {
	return func(c *client.ClientWithResponses) (int, []byte, error) {
		r, err := c.GetCustomerWithResponse(context.Background(), id)
		if err != nil {
			return 0, nil, err
		}
		return r.StatusCode(), r.Body, nil
	}
}

func upsertCustomer(id string) func(c *client.ClientWithResponses) (int, []byte, error) {
	return func(c *client.ClientWithResponses) (int, []byte, error) {
		r, err := c.UpsertCustomerWithResponse(context.Background(), id, client.CustomerUpsert{})
		if err != nil {
			return 0, nil, err
		}
		return r.StatusCode(), r.Body, nil
	}
}

func verify() func(c *client.ClientWithResponses) (int, []byte, error) {
	return func(c *client.ClientWithResponses) (int, []byte, error) {
		r, err := c.VerifyInvariantsWithResponse(context.Background())
		if err != nil {
			return 0, nil, err
		}
		return r.StatusCode(), r.Body, nil
	}
}

func forgedToken(t *testing.T) string {
	tok := userToken(t, "alice", time.Now().Add(time.Hour))
	parts := strings.Split(tok, ".")
	parts[2] = strings.Repeat("A", len(parts[2]))
	return strings.Join(parts, ".")
}
