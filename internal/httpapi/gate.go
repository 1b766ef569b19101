package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"unicode/utf8"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/internal/errs"
)

// gate runs before every handler of the contract: it finds the operation in
// openapi.yaml, authenticates and authorizes the caller by the operation's
// security, then validates the request against the spec with kin-openapi.
// Nothing reaches a handler, so nothing is written, unless all three pass.
// It also decides 400 against 422 for the handler's own refusals.
type gate struct {
	router routers.Router
	auth   *authenticator
	// routes finds an operation by the echo route that matched ("GET
	// /v1/customers/:customer_id/balance"): a map lookup instead of the
	// gorillamux router's regular expressions over every path of the spec,
	// which a CPU profile of the balance read showed costing about a tenth
	// of the request. router stays for whatever routes misses.
	routes map[string]*routers.Route
	// fast answers for kin-openapi on the operations it holds when the
	// request is plainly valid (fastgate.go; their bodies: usagebody.go,
	// consumebody.go); nil: always kin-openapi.
	fast map[*openapi3.Operation]*fastOp
}

func loadSpec(spec []byte) (*openapi3.T, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(spec)
	if err != nil {
		return nil, fmt.Errorf("httpapi: load openapi.yaml: %w", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("httpapi: openapi.yaml is invalid: %w", err)
	}
	return doc, nil
}

func newGate(doc *openapi3.T, auth *authenticator) (*gate, error) {
	// Match on paths only; the servers list describes deployments, not hosts to check.
	routed := *doc
	routed.Servers = nil
	router, err := gorillamux.NewRouter(&routed)
	if err != nil {
		return nil, fmt.Errorf("httpapi: route openapi.yaml: %w", err)
	}
	g := &gate{router: router, auth: auth, routes: map[string]*routers.Route{}, fast: map[*openapi3.Operation]*fastOp{}}
	for path, item := range routed.Paths.Map() {
		for method, op := range item.Operations() {
			route := &routers.Route{Spec: &routed, Path: path, PathItem: item, Method: method, Operation: op}
			g.routes[method+" "+echoPath(path)] = route
			// A schema the fast path cannot follow leaves it off; the
			// tests of the real contract fail on the operations they
			// expect it on.
			if f, err := newFastOp(route, fastBody(&routed, op)); err == nil {
				g.fast[op] = f
			}
		}
	}
	return g, nil
}

// fastBody is the fast body reader of op, nil when it has none.
func fastBody(doc *openapi3.T, op *openapi3.Operation) bodyReader {
	switch op.OperationID {
	case usageIngestOperation:
		if u, err := newUsageBody(doc, op); err == nil {
			return u
		}
	case consumeOperation:
		if b, err := newConsumeBody(doc, op); err == nil {
			return b
		}
	}
	return nil
}

// echoPath writes an OpenAPI path template as echo (and the generated
// RegisterHandlers) writes it: /a/{id}/b is /a/:id/b.
func echoPath(path string) string {
	parts := strings.Split(path, "/")
	for i, part := range parts {
		if strings.HasPrefix(part, "{") && strings.HasSuffix(part, "}") {
			parts[i] = ":" + part[1:len(part)-1]
		}
	}
	return strings.Join(parts, "/")
}

// findRoute finds the operation of req and its path parameters. Echo
// matched the route already; when the path holds no escaped character
// (RawPath empty) echo's parameter values are exactly what the gorillamux
// router would find, so the lookup by route is the same answer without the
// regular expressions. Anything else goes through the router, as before.
func (g *gate) findRoute(c echo.Context, req *http.Request) (*routers.Route, map[string]string, error) {
	if req.URL.RawPath == "" {
		if route, ok := g.routes[req.Method+" "+c.Path()]; ok {
			names, values := c.ParamNames(), c.ParamValues()
			params := make(map[string]string, len(names))
			for i, name := range names {
				if i < len(values) {
					params[name] = values[i]
				}
			}
			return route, params, nil
		}
	}
	return g.router.FindRoute(req)
}

func (g *gate) middleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		req := c.Request()
		route, pathParams, err := g.findRoute(c, req)
		if err != nil {
			if errors.Is(err, routers.ErrMethodNotAllowed) {
				return echo.ErrMethodNotAllowed
			}
			return echo.ErrNotFound
		}
		op := route.Operation
		if _, raw := op.Extensions["x-tally-raw"]; raw {
			return next(c)
		}
		security := doc(route).Security
		if op.Security != nil {
			security = *op.Security
		}
		if len(security) > 0 {
			p, err := g.auth.authenticate(req.Header.Get(echo.HeaderAuthorization))
			if err != nil {
				return err
			}
			if err := authorize(p, route, security, pathParams); err != nil {
				return err
			}
			req = req.WithContext(context.WithValue(req.Context(), principalKey, p))
			c.SetRequest(req)
		}
		if err := g.validate(c, req, route, pathParams); err != nil {
			return validationProblem(err)
		}
		return bodyRuleProblem(next(c))
	}
}

// usageIngestOperation is the operation whose body the gate may read
// without kin-openapi (usagebody.go).
const usageIngestOperation = "ingestUsageEvents"

// validate checks req against the contract with kin-openapi. For an
// operation with a fast path (fastgate.go), a plainly valid body is decoded
// once and left for the handler (decodedBinder), and plainly valid
// parameters need no kin-openapi at all; any other request goes to
// kin-openapi as before (with a body the fast path read, for the
// parameters only).
func (g *gate) validate(c echo.Context, req *http.Request, route *routers.Route, pathParams map[string]string) error {
	opts := &openapi3filter.Options{
		MultiError:         true,
		AuthenticationFunc: openapi3filter.NoopAuthenticationFunc,
	}
	// The body is read whole first, so that kin-openapi, the fast path and
	// the handler all read the same bytes, and a body that cannot be read
	// whole is answered as such.
	hasBody := req.Body != nil && req.Body != http.NoBody
	var (
		data     []byte
		jsonBody bool
	)
	if hasBody {
		var err error
		if data, err = readBody(req); err != nil {
			return bodyReadProblem(err)
		}
		jsonBody = jsonMediaType(req)
	}
	if f := g.fast[route.Operation]; f != nil {
		switch {
		case f.body == nil:
			if !hasBody && f.paramsOK(req, pathParams) {
				return nil
			}
		case hasBody && req.Header.Get(echo.HeaderContentType) == echo.MIMEApplicationJSON:
			if v, ok := f.body.read(data); ok {
				opts.ExcludeRequestBody = true
				req.ContentLength = int64(len(data))
				c.Set(decodedBody, v)
				if f.paramsOK(req, pathParams) {
					return nil
				}
			}
		}
	}
	// The fast path reads exactly one value; kin-openapi's decoder and
	// echo's binder stop after the first, and would read `{...}garbage`
	// as `{...}`.
	// An operation with no request body in the contract reads none, and
	// kin-openapi leaves it whatever it holds; judging it here refused
	// `{}x` and let `x` through.
	if jsonBody && !opts.ExcludeRequestBody && route.Operation.RequestBody != nil {
		// A JSON text is UTF-8 (RFC 8259, 8.1). kin-openapi and the binder
		// (encoding/json) read each byte that is not as U+FFFD, so the
		// handler was given another text than the one sent, which
		// text.Check could no longer refuse: two usage identifiers that
		// differed only in such a byte became one, and the second event
		// was answered a duplicate and counted nowhere. The fast paths
		// never read such a body (they leave it here).
		if at, ok := notUTF8(data); ok {
			return bodyProblem(fmt.Sprintf("the body is not valid JSON: it is not UTF-8 text, at byte %d", at), nil)
		}
		// An escape of half a UTF-16 surrogate pair names no character,
		// and encoding/json reads it as U+FFFD alike: "\ud800" and
		// "\udbff" were one identifier, as the bytes above were.
		if at, ok := loneSurrogate(data); ok {
			return bodyProblem(fmt.Sprintf("the body is not valid JSON: the escape at byte %d is half a UTF-16 surrogate pair, no character UTF-8 text can hold", at), nil)
		}
		if at, ok := dataAfterValue(data); ok {
			return bodyProblem(fmt.Sprintf("the body is not valid JSON: data after the top-level value, at byte %d", at), nil)
		}
	}
	return openapi3filter.ValidateRequest(req.Context(), &openapi3filter.RequestValidationInput{
		Request:    req,
		PathParams: pathParams,
		Route:      route,
		Options:    opts,
	})
}

// bodyReadProblem answers a body that could not be read whole: one over
// the size limit as before (413: the *http.MaxBytesError goes on), any
// other (cut short of its declared length, a client that stalled) with a
// 400 that says so, where kin-openapi's own read named its security step.
func bodyReadProblem(err error) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return mbe
	}
	detail := "the request body could not be read whole"
	if errors.Is(err, io.ErrUnexpectedEOF) {
		detail += ": it ended before its declared length"
	}
	return bodyProblem(detail, err)
}

// bodyProblem is the 400 invalid_request of a body that is not one
// readable JSON value, as validationProblem answers a body kin-openapi
// could not parse.
func bodyProblem(detail string, cause error) error {
	return &problemStatus{err: &errs.Error{Code: errs.Invalid, Message: detail, Fields: []errs.FieldError{{Detail: detail}}, Err: cause},
		status: http.StatusBadRequest}
}

// jsonMediaType reports whether req's Content-Type is JSON, and writes a
// JSON one in lower case: media types are case-insensitive (RFC 9110,
// 8.3.1), and echo's binder, which compares bytes, answered
// APPLICATION/JSON with 415 once kin-openapi had accepted it. The media
// type is what comes before the first semicolon, as kin-openapi and echo's
// binder read it: parameters mime.ParseMediaType refuses ("charset" with no
// value, ";;", a repeated name) do not make the body any less JSON to
// them, so they do not here.
func jsonMediaType(req *http.Request) bool {
	ct := req.Header.Get(echo.HeaderContentType)
	if ct == echo.MIMEApplicationJSON {
		return true
	}
	typ, params, hasParams := strings.Cut(ct, ";")
	mt := strings.ToLower(strings.TrimSpace(typ))
	if mt != echo.MIMEApplicationJSON && !strings.HasSuffix(mt, "+json") {
		return false
	}
	if typ != mt {
		if hasParams {
			mt += ";" + params
		}
		req.Header.Set(echo.HeaderContentType, mt)
	}
	return true
}

// notUTF8 reports where data first holds a byte sequence that is not
// UTF-8.
func notUTF8(data []byte) (int, bool) {
	if utf8.Valid(data) {
		return 0, false
	}
	for at := 0; at < len(data); {
		r, n := utf8.DecodeRune(data[at:])
		if r == utf8.RuneError && n == 1 {
			return at, true
		}
		at += n
	}
	return 0, false
}

// loneSurrogate reports where data first holds a \u escape of half a
// UTF-16 surrogate pair: a high one (D800 to DBFF) not followed by an
// escaped low one (DC00 to DFFF), or a low one alone. A backslash stands
// only inside a string of valid JSON (elsewhere kin-openapi refuses the
// body), and every escape is a backslash and one character or \uXXXX.
func loneSurrogate(data []byte) (int, bool) {
	unit := func(at int) (rune, bool) {
		if at+6 > len(data) || data[at] != '\\' || data[at+1] != 'u' {
			return 0, false
		}
		var r rune
		for _, c := range data[at+2 : at+6] {
			switch {
			case '0' <= c && c <= '9':
				r = r<<4 | rune(c-'0')
			case 'a' <= c && c <= 'f':
				r = r<<4 | rune(c-'a'+10)
			case 'A' <= c && c <= 'F':
				r = r<<4 | rune(c-'A'+10)
			default:
				return 0, false
			}
		}
		return r, true
	}
	for at := 0; at < len(data); {
		i := bytes.IndexByte(data[at:], '\\')
		if i < 0 {
			return 0, false
		}
		at += i
		r, ok := unit(at)
		switch {
		case !ok:
			at += 2 // a one-character escape, or one kin-openapi refuses
		case 0xD800 <= r && r <= 0xDBFF:
			if low, ok := unit(at + 6); ok && 0xDC00 <= low && low <= 0xDFFF {
				at += 12
				continue
			}
			return at, true
		case 0xDC00 <= r && r <= 0xDFFF:
			return at, true
		default:
			at += 6
		}
	}
	return 0, false
}

// dataAfterValue reports where data holds more than whitespace after its
// first JSON value; a body that is not even one value is kin-openapi's to
// refuse, as before.
func dataAfterValue(data []byte) (int64, bool) {
	if json.Valid(data) {
		return 0, false
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(new(json.RawMessage)); err != nil {
		return 0, false
	}
	return dec.InputOffset(), true
}

// bodyRuleProblem answers a domain rule that a readable body breaks (an
// invalid_request naming a body field by its JSON pointer, such as a
// reason with a bidirectional control character) with 422, as the
// schema's own rules are; 400 stays for what could not be read and for
// parameters and headers.
func bodyRuleProblem(err error) error {
	e, ok := errs.As(err)
	if !ok || e.Code != errs.Invalid || len(e.Fields) == 0 || !strings.HasPrefix(e.Fields[0].Pointer, "/") {
		return err
	}
	return &problemStatus{err: e, status: http.StatusUnprocessableEntity}
}

func doc(route *routers.Route) *openapi3.T { return route.Spec }

// authorize applies the operation's rules: admin operations need an admin
// key; operations that do not list userToken refuse end users; an end user
// may only name its own customer_id in the path.
func authorize(p principal, route *routers.Route, security openapi3.SecurityRequirements, pathParams map[string]string) error {
	if _, admin := route.Operation.Extensions["x-tally-admin"]; admin && !p.isAdmin() {
		return errs.E(errs.Forbidden, "this operation needs an admin key")
	}
	if p.isUser() {
		allowed := false
		for _, req := range security {
			if _, ok := req["userToken"]; ok {
				allowed = true
			}
		}
		if !allowed {
			return errs.E(errs.Forbidden, "end-user tokens may not call this operation")
		}
		if id, ok := pathParams["customer_id"]; ok && id != p.customerID {
			return errs.E(errs.Forbidden, "this token may only access its own customer")
		}
	}
	return nil
}

// validationProblem turns kin-openapi's findings into one invalid_request
// naming every offending field: 400 when the request could not be read as
// the contract says (parameters, malformed JSON), 422 when a well-formed body
// breaks the schema.
func validationProblem(err error) error {
	var (
		mbe *http.MaxBytesError
		ps  *problemStatus
	)
	if errors.As(err, &mbe) || errors.As(err, &ps) {
		return err
	}
	status := http.StatusUnprocessableEntity
	var fields []errs.FieldError
	var walk func(error)
	walk = func(err error) {
		// Type switches, not errors.As: MultiError and RequestError both
		// unwrap, and matching through them would lose which part failed.
		switch e := err.(type) {
		case openapi3.MultiError:
			for _, inner := range e {
				walk(inner)
			}
		case *openapi3filter.RequestError:
			var pe *openapi3filter.ParseError
			switch {
			case e.Parameter != nil:
				status = http.StatusBadRequest
				fields = append(fields, errs.FieldError{
					Pointer: e.Parameter.In + ":" + e.Parameter.Name,
					Detail:  paramDetail(e),
				})
			case e.Err == nil || errors.As(e.Err, &pe):
				status = http.StatusBadRequest
				fields = append(fields, errs.FieldError{Detail: bodyDetail(e)})
			default:
				walk(e.Err)
			}
		case *openapi3.SchemaError:
			fields = append(fields, errs.FieldError{
				Pointer: "/" + strings.Join(e.JSONPointer(), "/"),
				Detail:  e.Reason,
			})
		default:
			status = http.StatusBadRequest
			fields = append(fields, errs.FieldError{Detail: err.Error()})
		}
	}
	walk(err)
	if len(fields) == 0 {
		fields = []errs.FieldError{{Detail: err.Error()}}
	}
	msg := "the request does not match the API contract"
	if len(fields) == 1 {
		msg = strings.TrimSpace(fields[0].Pointer + " " + fields[0].Detail)
	}
	return &problemStatus{err: &errs.Error{Code: errs.Invalid, Message: msg, Fields: fields, Err: err}, status: status}
}

func paramDetail(re *openapi3filter.RequestError) string {
	var se *openapi3.SchemaError
	if errors.As(re.Err, &se) {
		return se.Reason
	}
	if re.Reason != "" {
		return re.Reason
	}
	if re.Err != nil {
		return re.Err.Error()
	}
	return "invalid parameter"
}

func bodyDetail(re *openapi3filter.RequestError) string {
	if re.Err != nil {
		var pe *openapi3filter.ParseError
		if errors.As(re.Err, &pe) {
			return "the body is not valid JSON: " + pe.Error()
		}
		return re.Err.Error()
	}
	if re.Reason != "" {
		return re.Reason
	}
	return "invalid request body"
}
