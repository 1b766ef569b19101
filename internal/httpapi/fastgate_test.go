package httpapi

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/getkin/kin-openapi/routers"
	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/db"
)

// contractServer is the contract's routes over one spec, as New serves
// them, with the gate's fast paths or without them. The handlers are not
// called: a strict middleware records what the handler would have been
// handed (the request object, and for a consume the idempotency guard it
// would build) and answers 204.
type contractServer struct {
	e *echo.Echo
	g *gate
	// got is the last request object handed to a handler, guard its guard.
	got   any
	guard db.IdempotencyKey
	// decoded is whether the last handler's body came from the gate.
	decoded bool
}

func newContractServer(t testing.TB, spec []byte, fast bool) *contractServer {
	t.Helper()
	g := newTestGate(t, spec, fast)
	s := &contractServer{e: echo.New(), g: g}
	s.e.HTTPErrorHandler = errorHandler(slog.New(slog.DiscardHandler))
	record := func(_ api.StrictHandlerFunc, _ string) api.StrictHandlerFunc {
		return func(c echo.Context, request any) (any, error) {
			s.got = request
			if r, ok := request.(api.ConsumeCreditsRequestObject); ok {
				s.guard = idempotencyKey(c.Request().Context(), r.CustomerId, "consumeCredits", &r.Params.IdempotencyKey, r.Body)
			}
			return nil, c.NoContent(http.StatusNoContent)
		}
	}
	serveContract(s.e, g, &Server{}, 4096, record)
	s.e.Binder = spyBinder{Binder: s.e.Binder, decoded: &s.decoded}
	return s
}

// contractRequest is one request; header values are set as given (a nil
// slice: the header is absent).
type contractRequest struct {
	method, target string
	body           string
	hasBody        bool
	contentType    string
	key            []string
	token          string
}

type contractAnswer struct {
	Status  int
	Header  http.Header
	Body    string
	Got     any
	Guard   db.IdempotencyKey
	Decoded bool
}

func (s *contractServer) send(r contractRequest) contractAnswer {
	var req *http.Request
	if r.hasBody {
		req = httptest.NewRequest(r.method, r.target, strings.NewReader(r.body))
	} else {
		req = httptest.NewRequest(r.method, r.target, nil)
	}
	if r.contentType != "" {
		req.Header.Set("Content-Type", r.contentType)
	}
	if r.key != nil {
		req.Header["Idempotency-Key"] = r.key
	}
	token := r.token
	if token == "" {
		token = "svc-key"
	}
	req.Header.Set("Authorization", "Bearer "+token)
	rec := httptest.NewRecorder()
	s.got, s.guard, s.decoded = nil, db.IdempotencyKey{}, false
	s.e.ServeHTTP(rec, req)
	return contractAnswer{Status: rec.Code, Header: rec.Header(), Body: rec.Body.String(), Got: s.got, Guard: s.guard, Decoded: s.decoded}
}

// sameContractAnswer sends r to both servers and fails unless the answers,
// and what the handler was handed, are the same; it returns the answer.
func sameContractAnswer(t *testing.T, fast, slow *contractServer, r contractRequest) contractAnswer {
	t.Helper()
	got, want := fast.send(r), slow.send(r)
	if slow.decoded {
		t.Errorf("%s %s: the gate without fast paths handed the handler a body", r.method, r.target)
	}
	got.Decoded = false
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s %s key %q body %.200q:\nfast path   %d %v %q %#v %+v\nkin-openapi %d %v %q %#v %+v", r.method, r.target, r.key, r.body,
			got.Status, got.Header, got.Body, got.Got, got.Guard, want.Status, want.Header, want.Body, want.Got, want.Guard)
	}
	return want
}

// fastAnswered says whether the gate answered r without kin-openapi: the
// operation has a fast path, its parameters (and body) are plainly valid.
func (s *contractServer) fastAnswered(t *testing.T, r contractRequest) bool {
	t.Helper()
	req := httptest.NewRequest(r.method, r.target, nil)
	if r.key != nil {
		req.Header["Idempotency-Key"] = r.key
	}
	c := s.e.NewContext(req, httptest.NewRecorder())
	s.e.Router().Find(r.method, req.URL.Path, c)
	route, params, err := s.g.findRoute(c, req)
	if err != nil {
		return false
	}
	f := s.g.fast[route.Operation]
	if f == nil || !f.paramsOK(req, params) {
		return false
	}
	if f.body == nil {
		return !r.hasBody
	}
	_, ok := f.body.read([]byte(r.body))
	return ok && r.hasBody && r.contentType == echo.MIMEApplicationJSON
}

const consumeOK = `{"amount":1,"reason":"tally-bench"}`

// consumeBodies are consume bodies of every kind; fast marks those the
// fast path must read itself (so the test cannot pass by always falling
// back).
var consumeBodies = []struct {
	name string
	body string
	fast bool
}{
	{"plain", consumeOK, true},
	{"other order", `{"reason":"r","amount":5}`, true},
	{"white space", " \r\n{ \"amount\" :\t7 ,\n\"reason\" : \"job 42\" } \n", true},
	{"the largest amount", `{"amount":1000000000000,"reason":"r"}`, true},
	{"a reason of 255", `{"amount":1,"reason":"` + strings.Repeat("r", 255) + `"}`, true},
	{"a reason of 255 runes", `{"amount":1,"reason":"` + strings.Repeat("ü", 255) + `"}`, true},
	{"non-ASCII", `{"amount":1,"reason":"kü 😀"}`, true},
	{"a bidirectional control (the handler's to refuse)", "{\"amount\":1,\"reason\":\"a\u202eb\"}", true},
	{"HTML characters", `{"amount":1,"reason":"<a&b>"}`, true},

	// Accepted, but left to kin-openapi and encoding/json.
	{"metadata", `{"amount":1,"reason":"r","metadata":{"k":"v"}}`, false},
	{"empty metadata", `{"amount":1,"reason":"r","metadata":{}}`, false},
	{"an escape", `{"amount":1,"reason":"a\u0062\n"}`, false},
	{"an escaped slash", `{"amount":1,"reason":"a\/b"}`, false},
	{"a member twice", `{"amount":1,"amount":2,"reason":"r"}`, false},
	{"a whole number as a fraction", `{"amount":1.0,"reason":"r"}`, false},
	{"an exponent", `{"amount":1e2,"reason":"r"}`, false},
	{"bytes after the object", consumeOK + ` {}`, false},

	// Refused.
	{"empty", ``, false},
	{"an empty object", `{}`, false},
	{"null", `null`, false},
	{"an array", `[]`, false},
	{"a string", `"x"`, false},
	{"no amount", `{"reason":"r"}`, false},
	{"no reason", `{"amount":1}`, false},
	{"amount zero", `{"amount":0,"reason":"r"}`, false},
	{"amount negative", `{"amount":-1,"reason":"r"}`, false},
	{"amount minus zero", `{"amount":-0,"reason":"r"}`, false},
	{"amount over the maximum", `{"amount":1000000000001,"reason":"r"}`, false},
	{"amount over int64", `{"amount":9223372036854775808,"reason":"r"}`, false},
	{"amount far over int64", `{"amount":123456789012345678901234567890,"reason":"r"}`, false},
	{"amount a fraction", `{"amount":1.5,"reason":"r"}`, false},
	{"amount a string", `{"amount":"1","reason":"r"}`, false},
	{"amount null", `{"amount":null,"reason":"r"}`, false},
	{"amount true", `{"amount":true,"reason":"r"}`, false},
	{"a leading zero", `{"amount":01,"reason":"r"}`, false},
	{"a plus sign", `{"amount":+1,"reason":"r"}`, false},
	{"an empty reason", `{"amount":1,"reason":""}`, false},
	{"a reason of 256", `{"amount":1,"reason":"` + strings.Repeat("r", 256) + `"}`, false},
	{"a reason a number", `{"amount":1,"reason":1}`, false},
	{"a reason null", `{"amount":1,"reason":null}`, false},
	{"metadata null", `{"amount":1,"reason":"r","metadata":null}`, false},
	{"metadata a string", `{"amount":1,"reason":"r","metadata":"x"}`, false},
	{"metadata of numbers", `{"amount":1,"reason":"r","metadata":{"k":1}}`, false},
	{"another member", `{"amount":1,"reason":"r","note":"x"}`, false},
	{"a member in other case", `{"Amount":1,"reason":"r"}`, false},
	{"not closed", `{"amount":1,"reason":"r"`, false},
	{"a member after no comma", `{"amount":1 "reason":"r"}`, false},
	{"a trailing comma", `{"amount":1,"reason":"r",}`, false},
	{"a control character", "{\"amount\":1,\"reason\":\"a\tb\"}", false},
	{"cut short", consumeOK[:20], false},
	{"invalid UTF-8", "{\"amount\":1,\"reason\":\"a\xffb\"}", false},
	{"a trailing comma", `{"amount":1,"reason":"r",}`, false},
	{"single quotes", `{'amount':1,'reason':'r'}`, false},
	{"over the size limit", `{"amount":1,"reason":"` + strings.Repeat("r", 5000) + `"}`, false},
}

// consumeCustomers and idempotencyKeys are path and header values of
// every kind for a consume.
var (
	consumeCustomers = []string{"bench-1", "a", "c_1.x:y@z-w", strings.Repeat("c", 255), strings.Repeat("c", 256),
		"has%09tab", "%C3%BC", "a%2Fb", "a%20b", "c%31", "bad!", "-"}
	idempotencyKeys = [][]string{{"k-1"}, nil, {""}, {"a", "b"}, {strings.Repeat("k", 255)}, {strings.Repeat("k", 256)}, {"kü"}}
)

// plainCustomer and plainKey are whether a customer id (as in the path)
// and Idempotency-Key values are plainly valid for the contract.
func plainCustomer(id string) bool {
	return len(id) <= 255 && id != "" && strings.Trim(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:@-") == ""
}

func plainKey(key []string) bool {
	return len(key) > 0 && key[0] != "" && utf8.RuneCountInString(key[0]) <= 255
}

// Every consume gets the same answer, and the handler the same request and
// guard, with the fast path as with kin-openapi alone; the plainly valid
// ones are answered by the fast path.
func TestConsumeFastPathAnswersAsKinOpenAPI(t *testing.T) {
	t.Parallel()
	fast := newContractServer(t, api.SpecYAML, true)
	slow := newContractServer(t, api.SpecYAML, false)
	route := fast.g.routes["POST /v1/customers/:customer_id/credits/consume"]
	if route == nil || fast.g.fast[route.Operation] == nil || fast.g.fast[route.Operation].body == nil {
		t.Fatalf("the fast path is off for consume: %v", fastPathWhy("/v1/customers/{customer_id}/credits/consume", http.MethodPost))
	}
	fastCount := 0
	for _, b := range consumeBodies {
		for _, id := range consumeCustomers {
			for _, key := range idempotencyKeys {
				for _, ct := range []string{echo.MIMEApplicationJSON, "application/json; charset=utf-8", "text/plain", ""} {
					r := contractRequest{method: http.MethodPost, target: "/v1/customers/" + id + "/credits/consume",
						body: b.body, hasBody: b.body != "", contentType: ct, key: key}
					answer := sameContractAnswer(t, fast, slow, r)
					wantFast := b.fast && ct == echo.MIMEApplicationJSON && plainCustomer(id) && plainKey(key)
					if got := fast.fastAnswered(t, r); got != wantFast {
						t.Errorf("%s %q key %q: answered by the fast path %v, want %v", b.name, id, key, got, wantFast)
					}
					if wantFast && len(key) == 1 {
						fastCount++
						if answer.Status != http.StatusNoContent {
							t.Errorf("%s: status %d, want the handler's 204: %s", b.name, answer.Status, answer.Body)
						}
						if !fast.send(r).Decoded {
							t.Errorf("%s: the handler was not given the gate's body", b.name)
						}
					}
				}
			}
		}
	}
	if fastCount < 9 {
		t.Fatalf("only %d requests took the fast path", fastCount)
	}
}

// The balance read, and every other operation the fast path covers, gets
// the same answer with it as with kin-openapi alone.
func TestParamsFastPathAnswersAsKinOpenAPI(t *testing.T) {
	t.Parallel()
	fast := newContractServer(t, api.SpecYAML, true)
	slow := newContractServer(t, api.SpecYAML, false)
	route := fast.g.routes["GET /v1/customers/:customer_id/balance"]
	if route == nil || fast.g.fast[route.Operation] == nil {
		t.Fatalf("the fast path is off for the balance read: %v", fastPathWhy("/v1/customers/{customer_id}/balance", http.MethodGet))
	}
	alice := userJWT(t, "alice")
	queries := []string{"", "?at=2026-01-02T03:04:05Z", "?at=yesterday", "?at=", "?x=1", "?"}
	for _, id := range append(consumeCustomers, "alice") {
		for _, q := range queries {
			for _, token := range []string{"", alice} {
				for _, body := range []string{"", "{}"} {
					r := contractRequest{method: http.MethodGet, target: "/v1/customers/" + id + "/balance" + q, token: token,
						body: body, hasBody: body != ""}
					answer := sameContractAnswer(t, fast, slow, r)
					wantFast := plainCustomer(id) && (q == "" || q == "?") && body == ""
					if got := fast.fastAnswered(t, r); got != wantFast {
						t.Errorf("GET %s with body %q: answered by the fast path %v, want %v", r.target, body, got, wantFast)
					}
					if wantFast && (token == "" || id == "alice") && answer.Status != http.StatusNoContent {
						t.Errorf("GET %s: status %d, want the handler's 204: %s", r.target, answer.Status, answer.Body)
					}
				}
			}
		}
	}
	// Every operation the fast path covers, with parameters good and bad.
	covered := 0
	for key, route := range fast.g.routes {
		f := fast.g.fast[route.Operation]
		if f == nil || f.body != nil {
			continue
		}
		covered++
		method, path, _ := strings.Cut(key, " ")
		for _, value := range []string{"p-1", "BAD%20VALUE!", strings.Repeat("p", 300), "p%2F1"} {
			target := strings.NewReplacer(":customer_id", value, ":hold_id", value, ":payment_id", value).Replace(path)
			for _, p := range strings.Split(target, "/") {
				if strings.HasPrefix(p, ":") {
					target = strings.Replace(target, p, value, 1)
				}
			}
			for _, key := range idempotencyKeys {
				sameContractAnswer(t, fast, slow, contractRequest{method: method, target: target, key: key})
			}
			sameContractAnswer(t, fast, slow, contractRequest{method: method, target: target + "?limit=0"})
		}
	}
	if covered < 10 {
		t.Fatalf("only %d operations have a fast path for their parameters", covered)
	}
}

// fastPathWhy says why the contract's operation has no fast path.
func fastPathWhy(path, method string) error {
	doc, err := loadSpec(api.SpecYAML)
	if err != nil {
		return err
	}
	item := doc.Paths.Find(path)
	if item == nil || item.GetOperation(method) == nil {
		return fmt.Errorf("no %s %s", method, path)
	}
	op := item.GetOperation(method)
	switch op.OperationID {
	case consumeOperation:
		if _, err := newConsumeBody(doc, op); err != nil {
			return err
		}
	case usageIngestOperation:
		if _, err := newUsageBody(doc, op); err != nil {
			return err
		}
	}
	_, err = newFastOp(&routers.Route{Spec: doc, Path: path, PathItem: item, Method: method, Operation: op}, fastBody(doc, op))
	return err
}

// Arbitrary consume requests: the same answer with the fast path as
// without it.
func FuzzConsumeBody(f *testing.F) {
	for _, c := range consumeBodies {
		f.Add(c.body, "bench-1", "k-1")
	}
	f.Add(consumeOK, "bad!", "")
	fast := newContractServer(f, api.SpecYAML, true)
	slow := newContractServer(f, api.SpecYAML, false)
	f.Fuzz(func(t *testing.T, body, customer, key string) {
		target := "/v1/customers/" + url.PathEscape(customer) + "/credits/consume"
		if _, err := url.ParseRequestURI(target); err != nil || customer == "" {
			return
		}
		sameContractAnswer(t, fast, slow, contractRequest{method: http.MethodPost, target: target, body: body, hasBody: true,
			contentType: echo.MIMEApplicationJSON, key: []string{key}})
	})
}

// The fast paths follow openapi.yaml: a rule on a value is checked by
// kin-openapi, required members are read from the schema, and a schema
// they cannot follow turns them off.
func TestFastPathFollowsTheSchema(t *testing.T) {
	t.Parallel()
	spec := string(api.SpecYAML)
	const (
		consumeSchema = "ConsumeRequest:\n      type: object\n      additionalProperties: false\n      required: [amount, reason]\n" +
			"      properties:\n        amount: {type: integer, format: int64, minimum: 1, maximum: 1000000000000}\n" +
			"        reason: {type: string, minLength: 1, maxLength: 255}\n"
		customerPattern = "      pattern: '^[A-Za-z0-9_.:@-]+$'\n\n    Metadata:"
		atParam         = "showed at it.\n          schema: {type: string, format: date-time}"
		consumePath     = "/v1/customers/bench-1/credits/consume"
	)
	consume := func(body string) contractRequest {
		return contractRequest{method: http.MethodPost, target: consumePath, body: body, hasBody: true,
			contentType: echo.MIMEApplicationJSON, key: []string{"k-1"}}
	}
	balance := contractRequest{method: http.MethodGet, target: "/v1/customers/bench-1/balance"}
	type request struct {
		req  contractRequest
		fast bool
	}
	for _, c := range []struct {
		name, old, new string
		requests       []request
	}{
		{"a shorter reason", consumeSchema, strings.Replace(consumeSchema, "maxLength: 255", "maxLength: 3", 1), []request{
			{consume(`{"amount":1,"reason":"abc"}`), true},
			{consume(`{"amount":1,"reason":"abcd"}`), false}}},
		{"a lower maximum", consumeSchema, strings.Replace(consumeSchema, "maximum: 1000000000000", "maximum: 10", 1), []request{
			{consume(`{"amount":10,"reason":"r"}`), true},
			{consume(`{"amount":11,"reason":"r"}`), false}}},
		{"metadata required", consumeSchema, strings.Replace(consumeSchema, "[amount, reason]", "[amount, reason, metadata]", 1), []request{
			{consume(consumeOK), false}}},
		{"reason optional", consumeSchema, strings.Replace(consumeSchema, "[amount, reason]", "[amount]", 1), []request{
			{consume(`{"amount":1}`), true}}},
		{"additional members allowed", consumeSchema, strings.Replace(consumeSchema, "      additionalProperties: false\n", "", 1), []request{
			{consume(consumeOK), false},
			{consume(`{"amount":1,"reason":"r","note":"x"}`), false}}},
		{"another member", consumeSchema, consumeSchema + "        note: {type: string}\n", []request{
			{consume(consumeOK), false}}},
		{"a nullable reason", consumeSchema, strings.Replace(consumeSchema, "maxLength: 255}", "maxLength: 255, nullable: true}", 1), []request{
			{consume(`{"amount":1,"reason":null}`), false}}},
		{"a number amount", consumeSchema, strings.Replace(consumeSchema, "{type: integer, format: int64,", "{type: number,", 1), []request{
			{consume(`{"amount":1.5,"reason":"r"}`), false}}},
		{"a narrower customer id", customerPattern, strings.Replace(customerPattern, "A-Za-z0-9_.:@-", "a-z", 1), []request{
			{balance, false},
			{contractRequest{method: http.MethodGet, target: "/v1/customers/bench/balance"}, true},
			{consume(consumeOK), false}}},
		{"a default time", atParam, strings.Replace(atParam, "format: date-time}", "format: date-time, default: '2026-01-01T00:00:00Z'}", 1), []request{
			{balance, false}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if strings.Count(spec, c.old) != 1 {
				t.Fatalf("openapi.yaml holds %q %d times: update this test", c.old, strings.Count(spec, c.old))
			}
			changed := []byte(strings.Replace(spec, c.old, c.new, 1))
			fast := newContractServer(t, changed, true)
			slow := newContractServer(t, changed, false)
			for _, r := range c.requests {
				sameContractAnswer(t, fast, slow, r.req)
				if got := fast.fastAnswered(t, r.req); got != r.fast {
					t.Errorf("%s %s %q: answered by the fast path %v, want %v", r.req.method, r.req.target, r.req.body, got, r.fast)
				}
			}
		})
	}
}

// A body is one JSON value. kin-openapi's decoder and echo's binder both
// stop after the first value, so `{...}garbage` was read as `{...}`: a
// consume or a grant with trailing data spent or granted credits (a
// differential attack on the running binaries found it on every build).
// Now any JSON body with more than whitespace after its value is refused
// with 400 before a handler is reached, with the fast paths on or off;
// trailing whitespace is still fine.
//
// Whatever the Content-Type's case or parameters: media types are
// case-insensitive (RFC 9110), and APPLICATION/JSON, which echo's binder
// answered 415 after kin-openapi had accepted it, is read as
// application/json. Parameters that do not parse (a parameter with no
// value, an empty one, a repeated name, a space before the semicolon) are
// still JSON to kin-openapi and the binder, which look only at what comes
// before the first semicolon; the gate took them for "not JSON" and
// skipped its check, and a second attack had consumes, grants,
// adjustments, holds and usage batches applied so.
func TestABodyIsOneJSONValue(t *testing.T) {
	t.Parallel()
	const usageOne = `{"events":[{"customer_id":"c1","meter":"api_calls","value":1,"identifier":"e1","timestamp":"2026-11-30T10:00:00Z"}]}`
	bodies := map[string]string{
		"/v1/customers/c1/credits/consume": consumeOK,
		"/v1/customers/c1/credits/grants":  `{"amount":5,"reason":"promo"}`,
		"/v1/usage-events":                 usageOne,
	}
	contentTypes := []string{echo.MIMEApplicationJSON, "APPLICATION/JSON", "Application/Json; charset=utf-8",
		"application/json; charset", "application/json;;", "application/json ; x", "application/json; a=1; a=2",
		"application/json; charset=\"utf-8", "APPLICATION/JSON; charset"}
	tails := []string{"garbage", "}", " {}", `{"amount":1000}`, " 1", "\x00", "]", ` "x"`, "\n{"}
	for _, fastOn := range []bool{true, false} {
		s := newContractServer(t, api.SpecYAML, fastOn)
		for target, body := range bodies {
			for _, ct := range contentTypes {
				post := func(body string) contractAnswer {
					return s.send(contractRequest{method: http.MethodPost, target: target, body: body, hasBody: true, contentType: ct, key: []string{"k-1"}})
				}
				for _, ok := range []string{body, body + " \n\t\r "} {
					if a := post(ok); a.Status != http.StatusNoContent || a.Got == nil {
						t.Errorf("fast %v: %s %q as %q: %d, handler reached %v, want 204 from the handler: %s", fastOn, target, ok, ct, a.Status, a.Got != nil, a.Body)
					}
				}
				for _, tail := range tails {
					a := post(body + tail)
					if a.Status != http.StatusBadRequest || a.Got != nil || !strings.Contains(a.Body, `"code":"invalid_request"`) ||
						!strings.Contains(a.Body, "data after the top-level value") {
						t.Errorf("fast %v: %s with %q after the body as %q: %d, handler reached %v, want 400 invalid_request naming the data after it: %s",
							fastOn, target, tail, ct, a.Status, a.Got != nil, a.Body)
					}
				}
			}
		}
	}
}

// A body that ends before its declared length (the client's connection
// closed, a proxy cut it) is answered 400 saying so, with the fast paths
// on or off, and reaches no handler; kin-openapi's own read answered
// "security requirements failed: reading failed: unexpected EOF", which
// named a step that had nothing to do with it.
func TestABodyCutShortIsSaidToBe(t *testing.T) {
	t.Parallel()
	for _, fastOn := range []bool{true, false} {
		s := newContractServer(t, api.SpecYAML, fastOn)
		srv := httptest.NewServer(s.e)
		for _, r := range []struct{ method, target, body string }{
			{http.MethodPost, "/v1/customers/c1/credits/consume", `{"amount":1,"reason":"x"}`},
			{http.MethodPost, "/v1/customers/c1/credits/grants", `{"amount":5,"reason":"promo"}`},
			{http.MethodPost, "/v1/usage-events", `{"events":[]}`},
			{http.MethodGet, "/v1/customers/c1/balance", `{}`},
		} {
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(conn, "%s %s HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer svc-key\r\nIdempotency-Key: k-1\r\n"+
				"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", r.method, r.target, len(r.body)+10, r.body)
			_ = conn.(*net.TCPConn).CloseWrite()
			s.got = nil
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("fast %v: %s %s: %v", fastOn, r.method, r.target, err)
			}
			body, _ := io.ReadAll(resp.Body)
			conn.Close()
			if resp.StatusCode != http.StatusBadRequest || s.got != nil || !strings.Contains(string(body), "ended before its declared length") {
				t.Errorf("fast %v: %s %s cut short: %d, handler reached %v, want 400 saying the body ended early: %s",
					fastOn, r.method, r.target, resp.StatusCode, s.got != nil, body)
			}
		}
		srv.Close()
	}
}

// An operation whose contract has no request body (a balance read, a hold's
// release, a usage event's cancel) never reads one: kin-openapi and the
// handler leave it, whatever it holds ("x", "{", a BOM). The gate's check
// for data after a JSON value refused `{}x` on them with 400 while it let
// "x" through, and the builds before it served both.
func TestABodyNoOperationReadsIsNotJudged(t *testing.T) {
	t.Parallel()
	for _, fastOn := range []bool{true, false} {
		s := newContractServer(t, api.SpecYAML, fastOn)
		for _, r := range []struct{ method, target string }{
			{http.MethodGet, "/v1/customers/c1/balance"},
			{http.MethodPost, "/v1/customers/c1/credits/holds/hld_1/release"},
			{http.MethodPost, "/v1/usage-events/e1/cancel"},
		} {
			for _, body := range []string{"x", "{}", "{}x", `{"a":1}{"a":2}`, "{} \u00a0"} {
				a := s.send(contractRequest{method: r.method, target: r.target, body: body, hasBody: true, contentType: echo.MIMEApplicationJSON})
				if a.Status != http.StatusNoContent || a.Got == nil {
					t.Errorf("fast %v: %s %s with the body %q: %d, handler reached %v, want 204 from the handler, as for any other body: %s",
						fastOn, r.method, r.target, body, a.Status, a.Got != nil, a.Body)
				}
			}
		}
	}
}

// A number the schema takes as a whole number but Go's decoder will not
// (1e2, 100.0: JSON Schema counts both as the integer 100) is refused with
// 400 in the contract's words, naming the field by its JSON pointer, not
// in echo's ("Unmarshal type error: expected=int64, got=number 1e2,
// field=amount, offset=13"), and reaches no handler.
func TestAWholeNumberWrittenAsAFractionIsRefusedPlainly(t *testing.T) {
	t.Parallel()
	for _, fastOn := range []bool{true, false} {
		s := newContractServer(t, api.SpecYAML, fastOn)
		for _, amount := range []string{"1e2", "100.0", "1E+0"} {
			for _, target := range []string{"/v1/customers/c1/credits/consume", "/v1/customers/c1/credits/grants"} {
				a := s.send(contractRequest{method: http.MethodPost, target: target, body: `{"amount":` + amount + `,"reason":"x"}`,
					hasBody: true, contentType: echo.MIMEApplicationJSON, key: []string{"k-1"}})
				want := `"detail":"/amount must be a whole number written without a fraction or an exponent (got number ` + amount + `)"`
				if a.Status != http.StatusBadRequest || a.Got != nil || !strings.Contains(a.Body, want) || !strings.Contains(a.Body, `"pointer":"/amount"`) {
					t.Errorf("fast %v: %s with amount %s: %d, handler reached %v, want 400 with %s: %s", fastOn, target, amount, a.Status, a.Got != nil, want, a.Body)
				}
			}
		}
	}
}
