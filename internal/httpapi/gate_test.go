package httpapi

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/config"
	"github.com/tallybilling/tally/internal/errs"
)

// gateSpec is the smallest contract that exercises every decision of the
// gate: the default security (API keys), an operation open to all, one
// end users may call for their own customer, an admin one, a raw one, and
// a body and a query parameter with rules.
const gateSpec = `
openapi: 3.0.3
info: {title: gate test, version: "1"}
security:
  - apiKey: []
paths:
  /open:
    get:
      operationId: open
      security: []
      responses: {"200": {description: ok}}
  /things/{customer_id}:
    parameters:
      - {name: customer_id, in: path, required: true, schema: {type: string, pattern: '^[a-z0-9-]+$', maxLength: 20}}
    get:
      operationId: getThing
      security: [{apiKey: []}, {userToken: []}]
      parameters:
        - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 10}}
      responses: {"200": {description: ok}}
    put:
      operationId: putThing
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              additionalProperties: false
              properties:
                name: {type: string, maxLength: 5}
                count: {type: integer, minimum: 0}
      responses: {"200": {description: ok}}
  /admin:
    get:
      operationId: admin
      x-tally-admin: true
      responses: {"200": {description: ok}}
  /raw:
    post:
      operationId: raw
      x-tally-raw: true
      responses: {"200": {description: ok}}
components:
  securitySchemes:
    apiKey: {type: http, scheme: bearer}
    userToken: {type: http, scheme: bearer, bearerFormat: JWT}
`

var gateSecret = []byte("0123456789abcdef0123456789abcdef")

// gateCall is one request through the gate, answered as the server would.
type gateCall struct {
	status int
	code   string
	// reached is whether the handler ran, and caller who it saw.
	reached bool
	caller  principal
	body    map[string]any
}

// testGate is the gate over gateSpec, with auth_test.go's keys and
// gateSecret for end-user tokens.
func testGate(t *testing.T) *gate {
	t.Helper()
	return newTestGate(t, []byte(gateSpec), true)
}

func throughGate(t *testing.T, handler echo.HandlerFunc, method, path, token, body string) gateCall {
	t.Helper()
	g := testGate(t)
	var req *http.Request
	if body != "" {
		req = httptest.NewRequest(method, path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
	} else {
		req = httptest.NewRequest(method, path, nil)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	rec := httptest.NewRecorder()
	c := echo.New().NewContext(req, rec)
	var call gateCall
	next := func(c echo.Context) error {
		call.reached = true
		call.caller, _ = principalFrom(c.Request().Context())
		if handler != nil {
			return handler(c)
		}
		return c.NoContent(http.StatusOK)
	}
	if err := g.middleware(next)(c); err != nil {
		errorHandler(slog.New(slog.DiscardHandler))(err, c)
	}
	call.status = rec.Code
	if rec.Body.Len() > 0 {
		if err := json.Unmarshal(rec.Body.Bytes(), &call.body); err != nil {
			t.Fatalf("body is not JSON: %s", rec.Body)
		}
		call.code, _ = call.body["code"].(string)
	}
	return call
}

func userJWT(t *testing.T, sub string) string {
	return sign(t, jwt.SigningMethodHS256, gateSecret, jwt.RegisteredClaims{Subject: sub, ExpiresAt: jwt.NewNumericDate(authNow.Add(time.Hour))})
}

// pointers lists the JSON pointers the problem's errors[] names.
func pointers(body map[string]any) []string {
	list, _ := body["errors"].([]any)
	var out []string
	for _, f := range list {
		m, _ := f.(map[string]any)
		p, _ := m["pointer"].(string)
		out = append(out, p)
	}
	return out
}

// Authentication, then authorization, then validation: nothing reaches a
// handler unless all three pass, and the first refusal is the answer.
func TestGateDecisions(t *testing.T) {
	t.Parallel()
	alice := userJWT(t, "alice")
	for _, c := range []struct {
		name                string
		method, path, token string
		body                string
		status              int
		code                string
		pointers            []string // when set, the errors[] pointers, in order
		caller              principal
	}{
		{name: "an open operation needs no token", method: http.MethodGet, path: "/open", status: 200},
		{name: "an open operation ignores a bad token", method: http.MethodGet, path: "/open", token: "nope", status: 200},
		{name: "no token", method: http.MethodGet, path: "/things/alice", status: 401, code: "unauthorized"},
		{name: "unknown key", method: http.MethodGet, path: "/things/alice", token: "nope", status: 401, code: "unauthorized"},
		{name: "service key", method: http.MethodGet, path: "/things/alice", token: "svc-key", status: 200,
			caller: principal{scope: config.ScopeService, keyHash: keyPrefix("svc-key")}},
		{name: "end user on its own customer", method: http.MethodGet, path: "/things/alice", token: alice, status: 200,
			caller: principal{customerID: "alice"}},
		{name: "end user on another customer", method: http.MethodGet, path: "/things/bob", token: alice, status: 403, code: "forbidden"},
		{name: "end user where the operation lists only API keys", method: http.MethodPut, path: "/things/alice", token: alice,
			body: `{"name":"a"}`, status: 403, code: "forbidden"},
		{name: "service key on an admin operation", method: http.MethodGet, path: "/admin", token: "svc-key", status: 403, code: "forbidden"},
		{name: "end user on an admin operation", method: http.MethodGet, path: "/admin", token: alice, status: 403, code: "forbidden"},
		{name: "admin key on an admin operation", method: http.MethodGet, path: "/admin", token: "adm-key", status: 200,
			caller: principal{scope: config.ScopeAdmin, keyHash: keyPrefix("adm-key")}},
		{name: "a raw operation is the handler's to guard", method: http.MethodPost, path: "/raw", status: 200},
		{name: "no such path", method: http.MethodGet, path: "/nowhere", token: "svc-key", status: 404, code: "not_found"},
		{name: "no such method", method: http.MethodDelete, path: "/things/alice", token: "svc-key", status: 405, code: "invalid_request"},

		// Validation comes after authentication and authorization: a
		// caller who may not call learns nothing about the rules.
		{name: "a bad body without a token", method: http.MethodPut, path: "/things/alice", body: `{"name":"toolong"}`,
			status: 401, code: "unauthorized"},
		{name: "a body breaking the schema is 422", method: http.MethodPut, path: "/things/alice", token: "svc-key",
			body: `{"name":"toolong"}`, status: 422, code: "invalid_request", pointers: []string{"/name"}},
		{name: "every offending field is named", method: http.MethodPut, path: "/things/alice", token: "svc-key",
			body: `{"name":"toolong","count":-1}`, status: 422, code: "invalid_request", pointers: []string{"/count", "/name"}},
		{name: "an unknown member is 422", method: http.MethodPut, path: "/things/alice", token: "svc-key",
			body: `{"nmae":"a"}`, status: 422, code: "invalid_request"},
		{name: "malformed JSON is 400", method: http.MethodPut, path: "/things/alice", token: "svc-key",
			body: `{"name":`, status: 400, code: "invalid_request"},
		{name: "a missing required body is 400", method: http.MethodPut, path: "/things/alice", token: "svc-key",
			status: 400, code: "invalid_request"},
		{name: "a bad query parameter is 400", method: http.MethodGet, path: "/things/alice?limit=99", token: "svc-key",
			status: 400, code: "invalid_request", pointers: []string{"query:limit"}},
		{name: "a query parameter of the wrong type is 400", method: http.MethodGet, path: "/things/alice?limit=ten", token: "svc-key",
			status: 400, code: "invalid_request", pointers: []string{"query:limit"}},
		{name: "a bad path parameter is 400", method: http.MethodGet, path: "/things/ALICE", token: "svc-key",
			status: 400, code: "invalid_request", pointers: []string{"path:customer_id"}},
		{name: "a good body passes", method: http.MethodPut, path: "/things/alice", token: "svc-key",
			body: `{"name":"ok","count":2}`, status: 200, caller: principal{scope: config.ScopeService, keyHash: keyPrefix("svc-key")}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := throughGate(t, nil, c.method, c.path, c.token, c.body)
			if got.status != c.status || got.code != c.code {
				t.Fatalf("status %d code %q, want %d %q; body %v", got.status, got.code, c.status, c.code, got.body)
			}
			if got.reached != (c.status == 200) {
				t.Fatalf("handler reached: %v, with status %d", got.reached, got.status)
			}
			if got.caller != c.caller {
				t.Errorf("handler saw caller %+v, want %+v", got.caller, c.caller)
			}
			if c.pointers != nil {
				ps := pointers(got.body)
				if strings.Join(ps, " ") != strings.Join(c.pointers, " ") {
					t.Errorf("errors[] pointers %q, want %q", ps, c.pointers)
				}
			}
		})
	}
}

// A handler's invalid_request naming a body field by JSON pointer is a
// rule the readable body broke (422, like the schema's); one naming a
// parameter or nothing stays 400; other errors pass untouched.
func TestGateHandlerRefusals(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		err    error
		status int
		code   string
	}{
		{"a body field", errs.InvalidField("/name", "has a bidirectional control"), 422, "invalid_request"},
		{"a parameter", errs.InvalidField("query:cursor", "not a cursor"), 400, "invalid_request"},
		{"no field", errs.E(errs.Invalid, "cannot"), 400, "invalid_request"},
		{"another code", errs.E(errs.NotFound, "no such thing"), 404, "not_found"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := throughGate(t, func(echo.Context) error { return c.err }, http.MethodPut, "/things/alice", "svc-key", `{"name":"ok"}`)
			if got.status != c.status || got.code != c.code {
				t.Fatalf("status %d code %q, want %d %q; body %v", got.status, got.code, c.status, c.code, got.body)
			}
		})
	}
}

// A body cut by the size limit is answered 413, not as a schema failure.
func TestGateBodyOverTheLimit(t *testing.T) {
	t.Parallel()
	g := testGate(t)
	req := httptest.NewRequest(http.MethodPut, "/things/alice", strings.NewReader(`{"name":"`+strings.Repeat("x", 100)+`"}`))
	req.ContentLength = -1 // streamed: only reading it finds it too long
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer svc-key")
	rec := httptest.NewRecorder()
	c := echo.New().NewContext(req, rec)
	reached := false
	h := limitBody(16)(g.middleware(func(echo.Context) error { reached = true; return nil }))
	if err := h(c); err != nil {
		errorHandler(slog.New(slog.DiscardHandler))(err, c)
	}
	if rec.Code != http.StatusRequestEntityTooLarge || reached {
		t.Fatalf("status %d (handler reached %v), want 413; body %s", rec.Code, reached, rec.Body)
	}
	if !strings.Contains(rec.Body.String(), `"code":"payload_too_large"`) {
		t.Fatalf("body %s", rec.Body)
	}
}

// keyPrefix is how a principal names an API key: its hash's first 12 hex digits.
func keyPrefix(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:6])
}

// The gate finds an operation by the echo route that matched, without the
// router's regular expressions; for every operation of the real contract
// that answer is the router's, and it is found by route (not by falling
// back to the router).
func TestGateFindsEveryOperationByItsEchoRoute(t *testing.T) {
	t.Parallel()
	g := newTestGate(t, api.SpecYAML, true)
	e := echo.New()
	checked := 0
	api.RegisterHandlers(e, api.NewStrictHandler(&Server{}, nil))
	for _, r := range e.Routes() {
		if _, ok := g.routes[r.Method+" "+r.Path]; !ok {
			t.Errorf("echo route %s %s has no operation in the gate's table", r.Method, r.Path)
			continue
		}
		// A path with every parameter filled in, and a value for each.
		path := strings.NewReplacer(":", "p-").Replace(r.Path)
		req := httptest.NewRequest(r.Method, path, nil)
		c := e.NewContext(req, httptest.NewRecorder())
		e.Router().Find(r.Method, req.URL.Path, c)
		fast, fastParams, err := g.findRoute(c, req)
		if err != nil {
			t.Errorf("%s %s: %v", r.Method, path, err)
			continue
		}
		slow, slowParams, err := g.router.FindRoute(req)
		if err != nil {
			t.Errorf("%s %s: the router: %v", r.Method, path, err)
			continue
		}
		if fast.Operation != slow.Operation || fast.Path != slow.Path || fast.Method != slow.Method {
			t.Errorf("%s %s: by route %s %s, by the router %s %s", r.Method, path, fast.Method, fast.Path, slow.Method, slow.Path)
		}
		if fmt.Sprint(fastParams) != fmt.Sprint(slowParams) {
			t.Errorf("%s %s: parameters by route %v, by the router %v", r.Method, path, fastParams, slowParams)
		}
		checked++
	}
	if checked < 30 {
		t.Fatalf("only %d routes checked", checked)
	}
}
