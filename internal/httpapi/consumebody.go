package httpapi

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/tallybilling/tally/api"
)

// consumeBody reads the body of a consume (issue 11: kin-openapi's decode
// into interface{} and schema walk, then the binder's second decode, were
// a tenth of the server's CPU per consume) once, straight into
// api.ConsumeRequest, but only when it is plainly valid, in the manner of
// usageBody: the members amount and reason, each once, of their schema
// type, no escapes in strings, nothing after the object. A body with
// metadata, or anything else, is "don't know", and the gate validates it
// with kin-openapi as before. Rules come from openapi.yaml: required
// members from the schema, and a member's rules beyond its type (amount's
// bounds, reason's length) are checked by kin-openapi itself (VisitJSON on
// that value). A schema it cannot follow leaves the fast path off;
// TestConsumeBodyFastPathAnswersAsKinOpenAPI fails with the reason.
type consumeBody struct {
	required uint8
	leaves   [consumeMemberCount]*openapi3.Schema
	check    [consumeMemberCount]bool
}

type consumeMember uint8

const (
	consumeAmount consumeMember = iota
	consumeReason
	// consumeMetadata is known to the schema check only: a body that has
	// it goes to kin-openapi.
	consumeMetadata
	consumeMemberCount
)

// consumeMembers is each member's name and JSON type, as api.ConsumeRequest
// holds it (int64, string, *Metadata).
var consumeMembers = [consumeMemberCount]struct {
	name, typ string
}{
	consumeAmount:   {"amount", openapi3.TypeInteger},
	consumeReason:   {"reason", openapi3.TypeString},
	consumeMetadata: {"metadata", openapi3.TypeObject},
}

// consumeOperation is the operation whose body consumeBody reads.
const consumeOperation = "consumeCredits"

// newConsumeBody prepares the fast path for an operation whose JSON body is
// the ConsumeRequest schema, or says why it cannot.
func newConsumeBody(doc *openapi3.T, op *openapi3.Operation) (*consumeBody, error) {
	obj, err := jsonBodySchema(doc, op)
	if err != nil {
		return nil, err
	}
	if err := containerShape(obj, openapi3.TypeObject, "Type", "Properties", "Required", "AdditionalProperties"); err != nil {
		return nil, fmt.Errorf("consume: %w", err)
	}
	if len(obj.Properties) != int(consumeMemberCount) {
		return nil, fmt.Errorf("consume: %d properties, the fast path knows %d", len(obj.Properties), consumeMemberCount)
	}
	b := &consumeBody{}
	for m, member := range consumeMembers {
		ref := obj.Properties[member.name]
		if ref == nil || ref.Value == nil {
			return nil, fmt.Errorf("consume: no property %q", member.name)
		}
		if consumeMember(m) == consumeMetadata {
			// Never read here; only its presence in the schema matters.
			if ref.Value.Type == nil || !ref.Value.Type.Is(openapi3.TypeObject) {
				return nil, fmt.Errorf("consume.metadata: type %v, want object", ref.Value.Type)
			}
			continue
		}
		plain, err := leafShape(ref.Value, member.typ)
		if err != nil {
			return nil, fmt.Errorf("consume.%s: %w", member.name, err)
		}
		b.leaves[m], b.check[m] = ref.Value, !plain
	}
	for _, name := range obj.Required {
		m := consumeMemberByName([]byte(name))
		if m == consumeMemberCount {
			return nil, fmt.Errorf("consume: required %q is not a property", name)
		}
		b.required |= 1 << m
	}
	return b, nil
}

func consumeMemberByName(name []byte) consumeMember {
	for m, member := range consumeMembers {
		if string(name) == member.name {
			return consumeMember(m)
		}
	}
	return consumeMemberCount
}

func (b *consumeBody) read(data []byte) (any, bool) {
	if r, ok := b.decode(data); ok {
		return r, true
	}
	return nil, false
}

// decode reads data as a ConsumeRequest. ok is false when data is not
// plainly valid, and the caller must then validate it the slow way.
func (b *consumeBody) decode(data []byte) (r *api.ConsumeRequest, ok bool) {
	s := scanner{data: data}
	r = &api.ConsumeRequest{}
	var seen uint8
	ok = s.object(func(name []byte) bool {
		m := consumeMemberByName(name)
		if m == consumeMemberCount || m == consumeMetadata || seen&(1<<m) != 0 || !b.member(&s, m, r) {
			return false
		}
		seen |= 1 << m
		return true
	})
	if !ok || seen&b.required != b.required || !s.end() {
		return nil, false
	}
	return r, true
}

// member reads the value of member m into r.
func (b *consumeBody) member(s *scanner, m consumeMember, r *api.ConsumeRequest) bool {
	if m == consumeAmount {
		lit, ok := s.number()
		if !ok || !wholeNumber(lit) {
			return false
		}
		n, err := strconv.ParseInt(string(lit), 10, 64)
		if err != nil || (b.check[m] && b.leaves[m].VisitJSON(json.Number(lit)) != nil) {
			return false
		}
		r.Amount = n
		return true
	}
	if !s.next('"') {
		return false
	}
	raw, ok := s.name()
	if !ok {
		return false
	}
	str := string(raw)
	if b.check[m] && b.leaves[m].VisitJSON(str) != nil {
		return false
	}
	r.Reason = str
	return true
}

// wholeNumber is whether a number literal has neither fraction nor
// exponent: what encoding/json decodes into an int64 as it is written.
func wholeNumber(lit []byte) bool {
	return !slices.ContainsFunc(lit, func(c byte) bool { return c == '.' || c == 'e' || c == 'E' })
}
