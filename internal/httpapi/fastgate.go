package httpapi

import (
	"fmt"
	"net/http"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/routers"
)

// A CPU profile of consume (issue 11) showed kin-openapi's ValidateRequest
// at about an eighth of the server's CPU per request even with a body it
// did not have to read: its security check with the no-op authenticator
// (the gate authenticated already) reads the body once more into a fresh
// buffer, and each parameter is decoded and walked generically. For the
// balance read it was the same walk over two parameters.
//
// fastOp is what the gate needs to answer for kin-openapi on one operation
// when the request is plainly valid: every parameter is a string in the
// path or a header, or an optional query parameter that is absent, and its
// value passes its schema (VisitJSON, as kin-openapi calls it); the body is
// absent where the operation has none, or read by the operation's fast body
// reader. For anything else the gate calls kin-openapi as before, so every
// refusal is kin-openapi's. fastgate_test.go compares the two paths.
type fastOp struct {
	params []plainParam
	// body reads the operation's JSON body; nil when the operation has no
	// body (then a request must come without one) or no fast reader (then
	// fastOp is not built).
	body bodyReader
}

// bodyReader reads a body the way kin-openapi and the strict handler's
// binder would, or says it does not know (ok false).
type bodyReader interface {
	read(data []byte) (value any, ok bool)
}

// plainParam is a parameter the fast path checks itself.
type plainParam struct {
	in, name string
	// header is the canonical header key (in header).
	header   string
	required bool
	schema   *openapi3.Schema
	// check is set when the schema has a rule beyond its type.
	check bool
}

// newFastOp prepares the fast path of one operation, or says why it has
// none. body is the operation's fast body reader (nil: none).
func newFastOp(route *routers.Route, body bodyReader) (*fastOp, error) {
	doc, op := route.Spec, route.Operation
	if doc.IsOpenAPI31OrLater() {
		return nil, fmt.Errorf("OpenAPI %s validates with JSON Schema 2020-12", doc.OpenAPI)
	}
	if op.RequestBody != nil && body == nil {
		return nil, fmt.Errorf("a body without a fast reader")
	}
	if op.RequestBody == nil && body != nil {
		return nil, fmt.Errorf("a fast reader for no body")
	}
	// With the no-op authenticator kin-openapi's security check passes
	// unless a scheme is not declared.
	security := &doc.Security
	if op.Security != nil {
		security = op.Security
	}
	for _, req := range *security {
		for name := range req {
			if doc.Components == nil || doc.Components.SecuritySchemes[name] == nil || doc.Components.SecuritySchemes[name].Value == nil {
				return nil, fmt.Errorf("security scheme %q is not declared", name)
			}
		}
	}
	f := &fastOp{body: body}
	var params []*openapi3.Parameter
	for _, ref := range route.PathItem.Parameters {
		p := ref.Value
		if op.Parameters != nil && op.Parameters.GetByInAndName(p.In, p.Name) != nil {
			continue
		}
		params = append(params, p)
	}
	for _, ref := range op.Parameters {
		params = append(params, ref.Value)
	}
	for _, p := range params {
		pp, err := newPlainParam(p)
		if err != nil {
			return nil, fmt.Errorf("parameter %s %s: %w", p.In, p.Name, err)
		}
		f.params = append(f.params, pp)
	}
	return f, nil
}

func newPlainParam(p *openapi3.Parameter) (plainParam, error) {
	if p == nil || p.Content != nil || p.Schema == nil || p.Schema.Value == nil {
		return plainParam{}, fmt.Errorf("no plain schema")
	}
	if p.AllowEmptyValue {
		return plainParam{}, fmt.Errorf("allowEmptyValue")
	}
	s := p.Schema.Value
	pp := plainParam{in: p.In, name: p.Name, required: p.Required, schema: s}
	switch p.In {
	case openapi3.ParameterInPath, openapi3.ParameterInHeader:
		if p.Style != "" && p.Style != openapi3.SerializationSimple {
			return plainParam{}, fmt.Errorf("style %s", p.Style)
		}
		plain, err := leafShape(s, openapi3.TypeString)
		if err != nil {
			return plainParam{}, err
		}
		pp.check = !plain
		pp.header = http.CanonicalHeaderKey(p.Name)
	case openapi3.ParameterInQuery:
		// Only ever absent on the fast path (no query string): nothing to
		// check then, unless kin-openapi would refuse or fill it in.
		if p.Required {
			return plainParam{}, fmt.Errorf("a required query parameter")
		}
		if s.Default != nil || len(s.AllOf) > 0 {
			return plainParam{}, fmt.Errorf("a default")
		}
	default:
		return plainParam{}, fmt.Errorf("in %s", p.In)
	}
	return pp, nil
}

// paramsOK says whether every parameter of req is plainly valid: true
// only when kin-openapi would find nothing wrong with them.
func (f *fastOp) paramsOK(req *http.Request, pathParams map[string]string) bool {
	for i := range f.params {
		p := &f.params[i]
		var v string
		switch p.in {
		case openapi3.ParameterInPath:
			var ok bool
			if v, ok = pathParams[p.name]; !ok || v == "" {
				return false
			}
		case openapi3.ParameterInHeader:
			raw, ok := req.Header[p.header]
			if !ok {
				if p.required {
					return false
				}
				continue
			}
			if len(raw) == 0 {
				return false
			}
			// kin-openapi reads the first value; the generated wrapper
			// refuses more than one, as it does after kin-openapi.
			v = raw[0]
		case openapi3.ParameterInQuery:
			if req.URL.RawQuery != "" {
				return false
			}
			continue
		default:
			return false
		}
		if p.check && p.schema.VisitJSON(v, openapi3.MultiErrors()) != nil {
			return false
		}
	}
	return true
}
