package httpapi

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/db"
)

// usageStub is the strict server of these tests: it keeps what
// IngestUsageEvents was handed, and the idempotency guard the real handler
// would build from it, and answers 202.
type usageStub struct {
	api.StrictServerInterface
	got   *api.UsageBatch
	guard db.IdempotencyKey
}

func (s *usageStub) IngestUsageEvents(ctx context.Context, r api.IngestUsageEventsRequestObject) (api.IngestUsageEventsResponseObject, error) {
	s.got = r.Body
	s.guard = idempotencyKey(ctx, "", usageIngestOperation, r.Params.IdempotencyKey, r.Body)
	return api.IngestUsageEvents202JSONResponse{Body: api.UsageIntakeResult{Accepted: len(r.Body.Events), Results: []api.UsageEventResult{}}}, nil
}

// usageServer is the contract's routes over one spec, as New serves them,
// with the gate's fast path for the usage body or without it.
type usageServer struct {
	e    *echo.Echo
	stub *usageStub
	// body is the gate's fast path, nil when it is off.
	body *usageBody
	// decoded says whether the last request's handler was given the
	// batch the gate decoded (the fast path ran), kept out of the answers
	// compared.
	decoded bool
}

// spyBinder records whether the handler's body came from the gate.
type spyBinder struct {
	echo.Binder
	decoded *bool
}

func (b spyBinder) Bind(i any, c echo.Context) error {
	*b.decoded = c.Get(decodedBody) != nil
	return b.Binder.Bind(i, c)
}

// newTestGate is the gate of spec with the test authenticator, its fast
// paths on or off.
func newTestGate(t testing.TB, spec []byte, fast bool) *gate {
	t.Helper()
	doc, err := loadSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	g, err := newGate(doc, testAuthenticator(t, gateSecret, nil, "", ""))
	if err != nil {
		t.Fatal(err)
	}
	if !fast {
		g.fast = nil
	}
	return g
}

func newUsageServer(t testing.TB, spec []byte, fast bool, maxBody int64) *usageServer {
	t.Helper()
	g := newTestGate(t, spec, fast)
	s := &usageServer{e: echo.New(), stub: &usageStub{}}
	if route := g.routes["POST /v1/usage-events"]; route != nil {
		if f := g.fast[route.Operation]; f != nil {
			s.body, _ = f.body.(*usageBody)
		}
	}
	s.e.HTTPErrorHandler = errorHandler(slog.New(slog.DiscardHandler))
	serveContract(s.e, g, s.stub, maxBody)
	s.e.Binder = spyBinder{Binder: s.e.Binder, decoded: &s.decoded}
	return s
}

// usageRequest is one POST /v1/usage-events.
type usageRequest struct {
	body        string
	contentType string // "" is application/json; "-" is none
	key         []string
	streamed    bool // no Content-Length: only reading finds a body too long
}

// usageAnswer is everything a caller and the handler see of one request.
type usageAnswer struct {
	Status      int
	ContentType string
	Replayed    string
	Body        string
	Got         *api.UsageBatch
	Guard       db.IdempotencyKey
}

func (s *usageServer) send(r usageRequest) usageAnswer {
	req := httptest.NewRequest(http.MethodPost, "/v1/usage-events", strings.NewReader(r.body))
	if r.streamed {
		req.ContentLength = -1
	}
	switch r.contentType {
	case "":
		req.Header.Set("Content-Type", "application/json")
	case "-":
	default:
		req.Header.Set("Content-Type", r.contentType)
	}
	for _, k := range r.key {
		req.Header.Add("Idempotency-Key", k)
	}
	req.Header.Set("Authorization", "Bearer svc-key")
	rec := httptest.NewRecorder()
	s.stub.got, s.stub.guard, s.decoded = nil, db.IdempotencyKey{}, false
	s.e.ServeHTTP(rec, req)
	return usageAnswer{Status: rec.Code, ContentType: rec.Header().Get("Content-Type"), Replayed: rec.Header().Get("Idempotent-Replayed"),
		Body: rec.Body.String(), Got: s.stub.got, Guard: s.stub.guard}
}

// sameAnswer sends r to both servers and fails unless the answers, and
// what the handler was given, are the same.
func sameAnswer(t *testing.T, fast, slow *usageServer, r usageRequest) usageAnswer {
	t.Helper()
	got, want := fast.send(r), slow.send(r)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("body %.300q:\nfast path %+v\nkin-openapi %+v", r.body, describe(got), describe(want))
	}
	return want
}

func describe(a usageAnswer) string {
	s := fmt.Sprintf("%d %s %q guard %+v", a.Status, a.ContentType, a.Body, a.Guard)
	if a.Got != nil {
		s += fmt.Sprintf(" events %d:", len(a.Got.Events))
		for i, e := range a.Got.Events {
			if i == 3 {
				s += " ..."
				break
			}
			s += fmt.Sprintf(" %+v", e)
			if e.Timestamp != nil {
				s += " at " + e.Timestamp.String()
			}
		}
	}
	return s
}

func usageEvents(n int, event string) string {
	return `{"events":[` + strings.TrimSuffix(strings.Repeat(event+",", n), ",") + `]}`
}

const goodEvent = `{"customer_id":"c1","meter":"api_calls","value":1,"identifier":"e1"}`

// withEvent is a batch of one event with the given members.
func withEvent(members string) string { return `{"events":[{` + members + `}]}` }

// usageBodies are bodies of every kind: fast marks those the fast path
// must read itself (the test fails if it does not, so it cannot pass by
// always falling back); status is what the contract answers.
var usageBodies = []struct {
	name   string
	req    usageRequest
	fast   bool
	status int
}{
	{"one event", usageRequest{body: usageEvents(1, goodEvent)}, true, 202},
	{"every member", usageRequest{body: withEvent(`"customer_id":"c1","meter":"api_calls","value":3,"timestamp":"2026-11-23T12:00:00Z","identifier":"e1"`)}, true, 202},
	{"members in another order", usageRequest{body: withEvent(`"identifier":"e1","value":3,"timestamp":"2026-11-23T12:00:00Z","meter":"m","customer_id":"c1"`)}, true, 202},
	{"a timestamp with fraction and offset", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-11-23T13:00:00.123456789+01:00"`)}, true, 202},
	{"the zero time (the handler's to refuse)", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"0001-01-01T00:00:00Z"`)}, true, 202},
	{"white space everywhere", usageRequest{body: " \r\n{ \"events\" :\t[ { \"customer_id\" : \"c1\" ,\n\"meter\":\"m\" , \"value\" : 1 , \"identifier\" : \"e1\" } , " + goodEvent + " ] } \n"}, true, 202},
	{"empty strings", usageRequest{body: withEvent(`"customer_id":"","meter":"","value":1,"identifier":""`)}, true, 202},
	{"non-ASCII strings", usageRequest{body: withEvent(`"customer_id":"kü-1","meter":"m","value":1,"identifier":"ê😀"`)}, true, 202},
	{"a fraction", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1.5,"identifier":"e1"`)}, true, 202},
	{"a negative value", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":-1,"identifier":"e1"`)}, true, 202},
	{"minus zero", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":-0,"identifier":"e1"`)}, true, 202},
	{"zero", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":0,"identifier":"e1"`)}, true, 202},
	{"exponents", usageRequest{body: `{"events":[` + strings.Join([]string{
		`{"customer_id":"c1","meter":"m","value":1e3,"identifier":"e1"}`,
		`{"customer_id":"c1","meter":"m","value":1E+2,"identifier":"e2"}`,
		`{"customer_id":"c1","meter":"m","value":25e-1,"identifier":"e3"}`,
		`{"customer_id":"c1","meter":"m","value":1e308,"identifier":"e4"}`}, ",") + `]}`}, true, 202},
	{"long numbers", usageRequest{body: `{"events":[` + strings.Join([]string{
		`{"customer_id":"c1","meter":"m","value":999999999999999,"identifier":"e1"}`,
		`{"customer_id":"c1","meter":"m","value":9007199254740993,"identifier":"e2"}`,
		`{"customer_id":"c1","meter":"m","value":123456789012345678901234567890,"identifier":"e3"}`,
		`{"customer_id":"c1","meter":"m","value":0.1000000000000000055511151231257827,"identifier":"e4"}`}, ",") + `]}`}, true, 202},
	{"a thousand events", usageRequest{body: usageEvents(1000, goodEvent)}, true, 202},
	{"with an Idempotency-Key", usageRequest{body: usageEvents(2, goodEvent), key: []string{"k-1"}}, true, 202},

	// Accepted, but left to kin-openapi and encoding/json.
	{"an escape in a string", usageRequest{body: withEvent(`"customer_id":"c\u0031","meter":"m\/x","value":1,"identifier":"e\"1"`)}, false, 202},
	{"a member twice", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"value":2,"identifier":"e1"`)}, false, 202},
	{"a charset", usageRequest{body: usageEvents(1, goodEvent), contentType: "application/json; charset=utf-8"}, false, 202},

	// Refused: the answers are kin-openapi's or encoding/json's.
	{"no body", usageRequest{}, false, 400},
	// The gate's own: a JSON text is UTF-8; encoding/json would read each
	// byte that is not as U+FFFD, another identifier than the one sent.
	{"invalid UTF-8", usageRequest{body: withEvent("\"customer_id\":\"c1\",\"meter\":\"m\",\"value\":1,\"identifier\":\"e\xff1\"")}, false, 400},
	{"a sequence cut short", usageRequest{body: withEvent("\"customer_id\":\"c1\",\"meter\":\"m\",\"value\":1,\"identifier\":\"e\xe2\x80\"")}, false, 400},
	// An escape of half a UTF-16 pair names no character: encoding/json
	// reads it as U+FFFD too, so "e\ud800" and "e\udbff" were one identifier.
	{"half a surrogate pair", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e\ud800"`)}, false, 400},
	{"a pair reversed", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e\udc00\ud800"`)}, false, 400},
	{"a whole pair", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e\ud83d\ude00"`)}, false, 202},
	{"an escaped backslash before u", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e\\ud800"`)}, false, 202},
	// The gate's own: a body is one JSON value (kin-openapi stops reading
	// after the first and took this as the one event before it).
	{"bytes after the object", usageRequest{body: usageEvents(1, goodEvent) + ` {"x"`}, false, 400},
	{"an empty object", usageRequest{body: `{}`}, false, 422},
	{"an array", usageRequest{body: `[]`}, false, 422},
	{"null", usageRequest{body: `null`}, false, 422},
	{"events null", usageRequest{body: `{"events":null}`}, false, 422},
	{"no events", usageRequest{body: `{"events":[]}`}, false, 422},
	{"events an object", usageRequest{body: `{"events":{}}`}, false, 422},
	{"events a string", usageRequest{body: `{"events":"x"}`}, false, 422},
	{"an event null", usageRequest{body: `{"events":[null]}`}, false, 422},
	{"an event a number", usageRequest{body: `{"events":[1]}`}, false, 422},
	{"an empty event", usageRequest{body: `{"events":[{}]}`}, false, 422},
	{"1001 events", usageRequest{body: usageEvents(1001, goodEvent)}, false, 422},
	{"another member in the batch", usageRequest{body: `{"events":[` + goodEvent + `],"extra":1}`}, false, 422},
	{"Events", usageRequest{body: `{"Events":[` + goodEvent + `]}`}, false, 422},
	{"another member in an event", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","note":"x"`)}, false, 422},
	{"a member in other case", usageRequest{body: withEvent(`"Customer_Id":"c1","meter":"m","value":1,"identifier":"e1"`)}, false, 422},
	{"no customer_id", usageRequest{body: withEvent(`"meter":"m","value":1,"identifier":"e1"`)}, false, 422},
	{"no meter", usageRequest{body: withEvent(`"customer_id":"c1","value":1,"identifier":"e1"`)}, false, 422},
	{"no value", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","identifier":"e1"`)}, false, 422},
	{"no identifier", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1`)}, false, 422},
	{"customer_id null", usageRequest{body: withEvent(`"customer_id":null,"meter":"m","value":1,"identifier":"e1"`)}, false, 422},
	{"value null", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":null,"identifier":"e1"`)}, false, 422},
	{"timestamp null", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":null`)}, false, 422},
	{"customer_id a number", usageRequest{body: withEvent(`"customer_id":1,"meter":"m","value":1,"identifier":"e1"`)}, false, 422},
	{"meter a boolean", usageRequest{body: withEvent(`"customer_id":"c1","meter":true,"value":1,"identifier":"e1"`)}, false, 422},
	{"value a string", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":"1","identifier":"e1"`)}, false, 422},
	{"identifier an object", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":{}`)}, false, 422},
	{"timestamp a number", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":1`)}, false, 422},
	{"a timestamp without a zone", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-11-23T12:00:00"`)}, false, 422},
	{"a date as timestamp", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-11-23"`)}, false, 422},
	{"month 13", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-13-23T12:00:00Z"`)}, false, 422},
	{"February 30", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-02-30T12:00:00Z"`)}, false, 422},
	{"a leap second", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-12-31T23:59:60Z"`)}, false, 400},
	{"lower-case t and z", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-11-23t12:00:00z"`)}, false, 422},
	{"a number out of range", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1e400,"identifier":"e1"`)}, false, 422},
	{"the fourth event's value", usageRequest{body: `{"events":[` + strings.Repeat(goodEvent+",", 3) +
		`{"customer_id":"c1","meter":"m","value":"x","identifier":"e1"}]}`}, false, 422},
	{"several faults", usageRequest{body: `{"events":[{"meter":1,"value":1,"identifier":"e1"},{"customer_id":"c","meter":"m","value":true,"identifier":"e2","x":0}],"y":2}`}, false, 422},
	{"cut short", usageRequest{body: usageEvents(1, goodEvent)[:40]}, false, 400},
	{"a trailing comma", usageRequest{body: `{"events":[` + goodEvent + `,]}`}, false, 400},
	{"an event not closed", usageRequest{body: `{"events":[{"customer_id":"c1","meter":"m","value":1,"identifier":"e1"]}`}, false, 400},
	{"an event not closed before the next", usageRequest{body: `{"events":[{"customer_id":"c1","meter":"m","value":1,"identifier":"e1",` + goodEvent + `]}`}, false, 400},
	{"a trailing comma in an event", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1",`)}, false, 400},
	{"a leading zero", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":01,"identifier":"e1"`)}, false, 400},
	{"a plus sign", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":+1,"identifier":"e1"`)}, false, 400},
	{"a bare point", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":1.,"identifier":"e1"`)}, false, 400},
	{"NaN", usageRequest{body: withEvent(`"customer_id":"c1","meter":"m","value":NaN,"identifier":"e1"`)}, false, 400},
	{"a control character in a string", usageRequest{body: withEvent("\"customer_id\":\"c\t1\",\"meter\":\"m\",\"value\":1,\"identifier\":\"e1\"")}, false, 400},
	{"single quotes", usageRequest{body: withEvent(`'customer_id':'c1','meter':'m','value':1,'identifier':'e1'`)}, false, 400},
	{"plain text", usageRequest{body: usageEvents(1, goodEvent), contentType: "text/plain"}, false, 400},
	{"no content type", usageRequest{body: usageEvents(1, goodEvent), contentType: "-"}, false, 400},
	{"an empty Idempotency-Key", usageRequest{body: usageEvents(1, goodEvent), key: []string{""}}, true, 400},
	{"an Idempotency-Key too long", usageRequest{body: usageEvents(1, goodEvent), key: []string{strings.Repeat("k", 256)}}, true, 400},
	{"two Idempotency-Keys", usageRequest{body: usageEvents(1, goodEvent), key: []string{"a", "b"}}, true, 400},
	{"over the size limit", usageRequest{body: usageEvents(100, goodEvent)}, true, 413},
	{"over the size limit, streamed", usageRequest{body: usageEvents(100, goodEvent), streamed: true}, true, 413},
}

// usageTestLimit is the body limit of these tests: "over the size limit" is over it.
const usageTestLimit = 4096

// Every body gets the same answer, and the handler the same batch, with
// the fast path as with kin-openapi alone; the plainly valid ones are read
// by the fast path.
func TestUsageBodyFastPathAnswersAsKinOpenAPI(t *testing.T) {
	t.Parallel()
	fast := newUsageServer(t, api.SpecYAML, true, usageTestLimit)
	slow := newUsageServer(t, api.SpecYAML, false, usageTestLimit)
	big := newUsageServer(t, api.SpecYAML, true, 1<<20)
	bigSlow := newUsageServer(t, api.SpecYAML, false, 1<<20)
	if fast.body == nil {
		doc, err := loadSpec(api.SpecYAML)
		if err == nil {
			_, err = newUsageBody(doc, doc.Paths.Find("/v1/usage-events").Post)
		}
		t.Fatalf("the fast path is off for the contract's usage body: %v", err)
	}
	for _, c := range usageBodies {
		t.Run(c.name, func(t *testing.T) {
			f, s := fast, slow
			if len(c.req.body) > usageTestLimit && c.status != 413 {
				f, s = big, bigSlow
			}
			answer := sameAnswer(t, f, s, c.req)
			if answer.Status != c.status {
				t.Errorf("status %d, want %d: %s", answer.Status, c.status, answer.Body)
			}
			// The gate reads a body of application/json only.
			if _, ok := fast.body.decode([]byte(c.req.body)); (ok && c.req.contentType == "") != c.fast {
				t.Errorf("read by the fast path: %v, want %v", ok, c.fast)
			}
			// And the handler of an accepted request was given what the
			// gate read, so the answers compared above came from both paths.
			if answer.Status == http.StatusAccepted && f.decoded != c.fast {
				t.Errorf("the handler was given the gate's batch: %v, want %v", f.decoded, c.fast)
			}
			if s.decoded {
				t.Error("the gate without the fast path handed the handler a batch")
			}
		})
	}
}

// trickle is a request body that arrives a little at a time: it gives its
// bytes, then fails as a client that stopped sending does, and keeps the
// largest read it was asked to fill: the memory set aside for the body.
type trickle struct {
	data  []byte
	asked int
}

func (b *trickle) Read(p []byte) (int, error) {
	b.asked = max(b.asked, len(p))
	if len(b.data) == 0 {
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(p, b.data)
	b.data = b.data[n:]
	return n, nil
}

// A request that declares the largest body and sends a few bytes holds
// memory for what arrived, not for what it declared: many of them at once,
// each waiting out the server's read timeout, must not exhaust its memory
// (400 of them held 1 MiB each, 650 MB, where the server before the fast
// path held 57 MB).
func TestUsageBodyReadHoldsWhatArrivesNotWhatIsDeclared(t *testing.T) {
	t.Parallel()
	const limit = 8 << 20
	s := newUsageServer(t, api.SpecYAML, true, limit)
	body := &trickle{data: []byte(`{"events":[`)}
	req := httptest.NewRequest(http.MethodPost, "/v1/usage-events", body)
	req.ContentLength = limit
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer svc-key")
	rec := httptest.NewRecorder()
	s.e.ServeHTTP(rec, req)
	if rec.Code != http.StatusBadRequest {
		t.Errorf("status %d, want 400 for a body cut short: %s", rec.Code, rec.Body)
	}
	if body.asked > 64<<10 {
		t.Errorf("the gate set aside %d bytes for a body of which %d arrived (declared %d)", body.asked, len(`{"events":[`), limit)
	}
}

// The fast path follows openapi.yaml: a rule on a member's value is
// checked by kin-openapi, limits and required members are read from the
// schema, and a schema it cannot follow turns it off.
func TestUsageBodyFastPathFollowsTheSchema(t *testing.T) {
	t.Parallel()
	spec := string(api.SpecYAML)
	const (
		identifier = `identifier: {type: string, description: 'Unique within`
		value      = `value: {type: number, format: double,`
		members    = "customer_id: {type: string}\n        meter: {type: string}\n        value: {type: number"
		timestamp  = `timestamp: {type: string, format: date-time,`
		maxItems   = "maxItems: 1000\n          items: {$ref: '#/components/schemas/UsageEventInput'}"
		required   = "required: [customer_id, meter, value, identifier]"
		closed     = "UsageEventInput:\n      type: object\n      additionalProperties: false\n"
	)
	ev := func(members string) usageRequest { return usageRequest{body: withEvent(members)} }
	type body struct {
		req  usageRequest
		fast bool
	}
	for _, c := range []struct {
		name, old, new string
		on             bool
		bodies         []body
	}{
		{"a maximum length", identifier, `identifier: {type: string, maxLength: 3, description: 'Unique within`, true, []body{
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e12"`), true},
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e123"`), false}}},
		{"a minimum", value, `value: {type: number, minimum: 0, format: double,`, true, []body{
			{ev(`"customer_id":"c1","meter":"m","value":0,"identifier":"e1"`), true},
			{ev(`"customer_id":"c1","meter":"m","value":-1,"identifier":"e1"`), false}}},
		{"an integer type's multiple", value, `value: {type: number, multipleOf: 1, format: double,`, true, []body{
			{ev(`"customer_id":"c1","meter":"m","value":2,"identifier":"e1"`), true},
			{ev(`"customer_id":"c1","meter":"m","value":1.5,"identifier":"e1"`), false}}},
		{"a pattern", members, strings.Replace(members, "{type: string}", `{type: string, pattern: '^c[0-9]+$'}`, 1), true, []body{
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1"`), true},
			{ev(`"customer_id":"x1","meter":"m","value":1,"identifier":"e1"`), false}}},
		{"an enum", members, strings.Replace(members, "meter: {type: string}", `meter: {type: string, enum: [api_calls]}`, 1), true, []body{
			{ev(`"customer_id":"c1","meter":"api_calls","value":1,"identifier":"e1"`), true},
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1"`), false}}},
		{"fewer items", maxItems, "maxItems: 2\n          items: {$ref: '#/components/schemas/UsageEventInput'}", true, []body{
			{usageRequest{body: usageEvents(2, goodEvent)}, true},
			{usageRequest{body: usageEvents(3, goodEvent)}, false}}},
		{"another required member", required, "required: [customer_id, meter, value, identifier, timestamp]", true, []body{
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":"2026-11-23T12:00:00Z"`), true},
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1"`), false}}},
		{"a nullable timestamp", timestamp, `timestamp: {type: string, nullable: true, format: date-time,`, false, []body{
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","timestamp":null`), false}}},
		{"a default", members, strings.Replace(members, "meter: {type: string}", `meter: {type: string, default: api_calls}`, 1), false, []body{
			{ev(`"customer_id":"c1","value":1,"identifier":"e1"`), false}}},
		{"another member", members, "note: {type: string}\n        " + members, false, []body{
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","note":"x"`), false}}},
		{"an integer customer_id", members, strings.Replace(members, "{type: string}", "{type: integer}", 1), false, []body{
			{ev(`"customer_id":1,"meter":"m","value":1,"identifier":"e1"`), false}}},
		{"additional members allowed", closed, "UsageEventInput:\n      type: object\n", false, []body{
			{ev(`"customer_id":"c1","meter":"m","value":1,"identifier":"e1","x":1`), false}}},
		{"composition", members, strings.Replace(members, "{type: string}", "{type: string, not: {type: string, maxLength: 0}}", 1), false, []body{
			{ev(`"customer_id":"","meter":"m","value":1,"identifier":"e1"`), false}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if strings.Count(spec, c.old) != 1 {
				t.Fatalf("openapi.yaml holds %q %d times: update this test", c.old, strings.Count(spec, c.old))
			}
			changed := []byte(strings.Replace(spec, c.old, c.new, 1))
			fast := newUsageServer(t, changed, true, 1<<20)
			slow := newUsageServer(t, changed, false, 1<<20)
			if (fast.body != nil) != c.on {
				t.Fatalf("fast path on: %v, want %v", fast.body != nil, c.on)
			}
			for _, b := range c.bodies {
				sameAnswer(t, fast, slow, b.req)
				if fast.body != nil {
					if _, ok := fast.body.decode([]byte(b.req.body)); ok != b.fast {
						t.Errorf("%s: read by the fast path: %v, want %v", b.req.body, ok, b.fast)
					}
				}
			}
		})
	}
}

// Arbitrary bodies: the same answer with the fast path as without it.
func FuzzUsageBody(f *testing.F) {
	for _, c := range usageBodies {
		if len(c.req.body) < 2000 {
			f.Add(c.req.body)
		}
	}
	fast := newUsageServer(f, api.SpecYAML, true, 1<<20)
	slow := newUsageServer(f, api.SpecYAML, false, 1<<20)
	f.Fuzz(func(t *testing.T, body string) {
		sameAnswer(t, fast, slow, usageRequest{body: body})
	})
}
