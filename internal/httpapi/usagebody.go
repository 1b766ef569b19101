package httpapi

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
)

// The usage intake's body (1,000 events a request) cost kin-openapi a full
// decode into interface{} and a walk of the schema, then the strict handler
// a second decode into api.UsageBatch: together more than half of the
// server's CPU per event, which PostgreSQL needs (issue 11).
//
// usageBody reads such a body once, straight into api.UsageBatch, but only
// when it is plainly valid: every member known and present once, every
// value of its schema type, no escapes in strings, nothing after the
// object. It says "don't know" for everything else, and the gate then
// validates the body with kin-openapi as before; so every refusal, its
// status and its problem fields, is as before (kin-openapi's, or for a
// value only the handler's decode refuses, such as a leap second, the
// binder's). What it
// accepts it must accept exactly as kin-openapi and encoding/json would:
// usagebody_test.go runs bodies through both paths and compares.
//
// It reads its rules from openapi.yaml, not from this file: the item
// limits and required members come from the schema, and a leaf schema with
// any rule beyond its type is checked by kin-openapi itself (VisitJSON on
// that value). A schema it cannot follow (another member, a type the Go
// struct does not have, nullable, defaults, composition, OpenAPI 3.1)
// leaves the fast path off: newUsageBody says why, and
// TestUsageBodyFastPathAnswersAsKinOpenAPI fails with that reason.
type usageBody struct {
	minItems, maxItems int
	// required is a bitmask of the usage event's required members (by
	// usageMember); the batch itself must require events (newUsageBody).
	required uint8
	// leaves are the members' schemas; check[m] is set when the schema
	// has a rule beyond its type, to be checked by kin-openapi per value.
	leaves [memberCount]*openapi3.Schema
	check  [memberCount]bool
}

// usageMember numbers the members of UsageEventInput.
type usageMember uint8

const (
	memberCustomerID usageMember = iota
	memberMeter
	memberValue
	memberTimestamp
	memberIdentifier
	memberCount
)

// usageMembers is each member's name and JSON type, as api.UsageEventInput
// holds it (string, float64, *time.Time from a string).
var usageMembers = [memberCount]struct {
	name, typ string
}{
	memberCustomerID: {"customer_id", openapi3.TypeString},
	memberMeter:      {"meter", openapi3.TypeString},
	memberValue:      {"value", openapi3.TypeNumber},
	memberTimestamp:  {"timestamp", openapi3.TypeString},
	memberIdentifier: {"identifier", openapi3.TypeString},
}

// newUsageBody prepares the fast path for an operation whose JSON body is
// the UsageBatch schema, or says why it cannot.
func newUsageBody(doc *openapi3.T, op *openapi3.Operation) (*usageBody, error) {
	batch, err := jsonBodySchema(doc, op)
	if err != nil {
		return nil, err
	}
	u := &usageBody{}
	if err := containerShape(batch, openapi3.TypeObject, "Type", "Properties", "Required", "AdditionalProperties"); err != nil {
		return nil, fmt.Errorf("batch: %w", err)
	}
	events := batch.Properties["events"]
	if len(batch.Properties) != 1 || events == nil || events.Value == nil {
		return nil, fmt.Errorf("batch: properties other than events")
	}
	if !slices.Equal(batch.Required, []string{"events"}) {
		return nil, fmt.Errorf("batch: required %v, want [events]", batch.Required)
	}
	list := events.Value
	if err := containerShape(list, openapi3.TypeArray, "Type", "Items", "MinItems", "MaxItems"); err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	if list.Items == nil || list.Items.Value == nil {
		return nil, fmt.Errorf("events: no items schema")
	}
	u.minItems = int(list.MinItems)
	u.maxItems = math.MaxInt
	if list.MaxItems != nil && *list.MaxItems < uint64(u.maxItems) {
		u.maxItems = int(*list.MaxItems)
	}
	event := list.Items.Value
	if err := containerShape(event, openapi3.TypeObject, "Type", "Properties", "Required", "AdditionalProperties"); err != nil {
		return nil, fmt.Errorf("event: %w", err)
	}
	if len(event.Properties) != int(memberCount) {
		return nil, fmt.Errorf("event: %d properties, the fast path knows %d", len(event.Properties), memberCount)
	}
	for m, member := range usageMembers {
		ref := event.Properties[member.name]
		if ref == nil || ref.Value == nil {
			return nil, fmt.Errorf("event: no property %q", member.name)
		}
		plain, err := leafShape(ref.Value, member.typ)
		if err != nil {
			return nil, fmt.Errorf("event.%s: %w", member.name, err)
		}
		u.leaves[m], u.check[m] = ref.Value, !plain
	}
	for _, name := range event.Required {
		m := memberByName([]byte(name))
		if m == memberCount {
			return nil, fmt.Errorf("event: required %q is not a property", name)
		}
		u.required |= 1 << m
	}
	return u, nil
}

// jsonBodySchema is the schema of op's application/json body, as a fast
// body reader follows it, or why there is none it can follow.
func jsonBodySchema(doc *openapi3.T, op *openapi3.Operation) (*openapi3.Schema, error) {
	if doc.IsOpenAPI31OrLater() {
		return nil, fmt.Errorf("OpenAPI %s validates with JSON Schema 2020-12", doc.OpenAPI)
	}
	if op.RequestBody == nil || op.RequestBody.Value == nil {
		return nil, fmt.Errorf("no request body")
	}
	mt := op.RequestBody.Value.Content.Get(echo.MIMEApplicationJSON)
	if mt == nil || mt.Schema == nil || mt.Schema.Value == nil {
		return nil, fmt.Errorf("no application/json schema")
	}
	return mt.Schema.Value, nil
}

// ignoredKeywords are the Schema fields that do not change what validates.
var ignoredKeywords = map[string]bool{
	"Origin": true, "Title": true, "Description": true, "Example": true, "Examples": true,
	"ExternalDocs": true, "Deprecated": true, "XML": true, "Comment": true,
}

// keywords lists the fields of s that are set, but for ignoredKeywords.
// Any field kin-openapi gains is listed too, so the fast path turns off
// rather than miss a rule.
func keywords(s *openapi3.Schema) []string {
	var out []string
	v := reflect.ValueOf(s).Elem()
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if !f.IsExported() || ignoredKeywords[f.Name] || v.Field(i).IsZero() {
			continue
		}
		if f.Name == "Extensions" && v.Field(i).Len() == 0 {
			continue
		}
		out = append(out, f.Name)
	}
	return out
}

// containerShape checks that s is of type typ, sets no keyword but allowed,
// and (for an object) refuses additional properties.
func containerShape(s *openapi3.Schema, typ string, allowed ...string) error {
	for _, k := range keywords(s) {
		if !slices.Contains(allowed, k) {
			return fmt.Errorf("keyword %s is not handled by the fast path", k)
		}
	}
	if s.Type == nil || !s.Type.Is(typ) {
		return fmt.Errorf("type %v, want %s", s.Type, typ)
	}
	if typ == openapi3.TypeObject && (s.AdditionalProperties.Has == nil || *s.AdditionalProperties.Has) {
		return fmt.Errorf("additional properties are allowed")
	}
	return nil
}

// leafKeywords are the rules kin-openapi checks on a single value, which
// the fast path hands to it (check[m], then VisitJSON in member). Others (nullable, readOnly,
// default, composition) depend on where the value is, and turn the fast path off.
var leafKeywords = []string{"Type", "Format", "Enum", "Min", "Max", "MultipleOf", "ExclusiveMin", "ExclusiveMax",
	"MinLength", "MaxLength", "Pattern"}

// leafShape checks a member's schema: of type typ, with leaf rules only.
// plain is true when type is all kin-openapi would check (a format only
// counts where kin-openapi has a validator for it).
func leafShape(s *openapi3.Schema, typ string) (plain bool, err error) {
	if s.Type == nil || !s.Type.Is(typ) {
		return false, fmt.Errorf("type %v, want %s", s.Type, typ)
	}
	plain = true
	for _, k := range keywords(s) {
		switch {
		case !slices.Contains(leafKeywords, k):
			return false, fmt.Errorf("keyword %s is not handled by the fast path", k)
		case k == "Type":
		case k == "Format" && typ == openapi3.TypeString && openapi3.SchemaStringFormats[s.Format] == nil:
		case k == "Format" && typ == openapi3.TypeNumber && openapi3.SchemaNumberFormats[s.Format] == nil:
		default:
			plain = false
		}
	}
	return plain, nil
}

// decode reads data as a UsageBatch. ok is false when data is not plainly
// valid, and the caller must then validate it the slow way.
func (u *usageBody) decode(data []byte) (batch *api.UsageBatch, ok bool) {
	s := scanner{data: data}
	if !s.next('{') || !s.next('"') {
		return nil, false
	}
	if name, ok := s.name(); !ok || string(name) != "events" || !s.next(':') || !s.next('[') {
		return nil, false
	}
	// Every event holds at least its required members: some 50 bytes.
	events := make([]api.UsageEventInput, 0, min(u.maxItems, len(data)/50+1))
	if !s.next(']') {
		for {
			if len(events) == u.maxItems {
				return nil, false
			}
			events = append(events, api.UsageEventInput{})
			if !u.event(&s, &events[len(events)-1]) {
				return nil, false
			}
			if s.next(',') {
				continue
			}
			if s.next(']') {
				break
			}
			return nil, false
		}
	}
	if len(events) < u.minItems || !s.next('}') || !s.end() {
		return nil, false
	}
	return &api.UsageBatch{Events: events}, true
}

func (u *usageBody) read(data []byte) (any, bool) {
	if batch, ok := u.decode(data); ok {
		return batch, true
	}
	return nil, false
}

// event reads one event object into e.
func (u *usageBody) event(s *scanner, e *api.UsageEventInput) bool {
	var seen uint8
	return s.object(func(name []byte) bool {
		m := memberByName(name)
		if m == memberCount || seen&(1<<m) != 0 || !u.member(s, m, e) {
			return false
		}
		seen |= 1 << m
		return true
	}) && seen&u.required == u.required
}

func memberByName(name []byte) usageMember {
	for m, member := range usageMembers {
		if string(name) == member.name {
			return usageMember(m)
		}
	}
	return memberCount
}

// member reads the value of member m into e.
func (u *usageBody) member(s *scanner, m usageMember, e *api.UsageEventInput) bool {
	if m == memberValue {
		lit, ok := s.number()
		if !ok {
			return false
		}
		f, ok := parseNumber(lit)
		if !ok || (u.check[m] && u.leaves[m].VisitJSON(json.Number(lit)) != nil) {
			return false
		}
		e.Value = f
		return true
	}
	if !s.next('"') {
		return false
	}
	start := s.pos - 1
	raw, ok := s.name()
	if !ok {
		return false
	}
	str := string(raw)
	if u.check[m] && u.leaves[m].VisitJSON(str) != nil {
		return false
	}
	switch m {
	case memberCustomerID:
		e.CustomerId = str
	case memberMeter:
		e.Meter = str
	case memberIdentifier:
		e.Identifier = str
	case memberTimestamp:
		// As encoding/json decodes a *time.Time: the quoted literal to
		// UnmarshalJSON. What it refuses, the slow path answers.
		t := new(time.Time)
		if t.UnmarshalJSON(s.data[start:s.pos]) != nil {
			return false
		}
		e.Timestamp = t
	}
	return true
}

// parseNumber is encoding/json's float64 of a number literal: small whole
// numbers directly, others by strconv.ParseFloat (out of range: not ok).
func parseNumber(lit []byte) (float64, bool) {
	if len(lit) <= 15 {
		var n int64
		whole := true
		for _, c := range lit {
			if c < '0' || c > '9' {
				whole = false
				break
			}
			n = n*10 + int64(c-'0')
		}
		if whole {
			return float64(n), true
		}
	}
	f, err := strconv.ParseFloat(string(lit), 64)
	return f, err == nil
}

// scanner walks a JSON text, for usageBody: it reads only what the fast
// path accepts and reports anything else as not ok.
type scanner struct {
	data []byte
	pos  int
}

// object reads a JSON object whose members' names are plain strings
// (name), handing each name to member, which reads the member's value
// (the scanner then stands after the colon). It says false when the text
// is not such an object or member says false.
func (s *scanner) object(member func(name []byte) bool) bool {
	if !s.next('{') {
		return false
	}
	if s.next('}') {
		return true
	}
	for {
		if !s.next('"') {
			return false
		}
		name, ok := s.name()
		if !ok || !s.next(':') || !member(name) {
			return false
		}
		if s.next(',') {
			continue
		}
		return s.next('}')
	}
}

func (s *scanner) space() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\t', '\n', '\r':
			s.pos++
		default:
			return
		}
	}
}

// next skips white space and consumes c if it comes next.
func (s *scanner) next(c byte) bool {
	s.space()
	if s.pos < len(s.data) && s.data[s.pos] == c {
		s.pos++
		return true
	}
	return false
}

// end is whether only white space is left.
func (s *scanner) end() bool {
	s.space()
	return s.pos == len(s.data)
}

// name reads the rest of a string whose opening quote is consumed: its
// bytes as they are, which is its value when it has no escape (refused),
// no control character (not JSON) and valid UTF-8 (which encoding/json
// would replace).
func (s *scanner) name() ([]byte, bool) {
	start := s.pos
	ascii := true
	for ; s.pos < len(s.data); s.pos++ {
		c := s.data[s.pos]
		switch {
		case c == '"':
			raw := s.data[start:s.pos]
			s.pos++
			return raw, ascii || utf8.Valid(raw)
		case c == '\\' || c < 0x20:
			return nil, false
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	return nil, false
}

// number reads a JSON number literal: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *scanner) number() ([]byte, bool) {
	s.space()
	start := s.pos
	if s.peek() == '-' {
		s.pos++
	}
	switch c := s.peek(); {
	case c == '0':
		s.pos++
	case c >= '1' && c <= '9':
		s.digits()
	default:
		return nil, false
	}
	if s.peek() == '.' {
		s.pos++
		if !s.digits() {
			return nil, false
		}
	}
	if c := s.peek(); c == 'e' || c == 'E' {
		s.pos++
		if c := s.peek(); c == '+' || c == '-' {
			s.pos++
		}
		if !s.digits() {
			return nil, false
		}
	}
	return s.data[start:s.pos], true
}

func (s *scanner) peek() byte {
	if s.pos < len(s.data) {
		return s.data[s.pos]
	}
	return 0
}

func (s *scanner) digits() bool {
	start := s.pos
	for s.pos < len(s.data) && s.data[s.pos] >= '0' && s.data[s.pos] <= '9' {
		s.pos++
	}
	return s.pos > start
}

// decodedBody is the echo context key of a body the gate decoded.
const decodedBody = "tally.decodedBody"

// decodedBinder is the echo Binder of the contract's routes. The strict
// handlers bind their body through it: the value the gate decoded when
// there is one of the handler's type, otherwise the body as echo's
// DefaultBinder decodes it (BindBody only, as the generated code does
// with the DefaultBinder).
type decodedBinder struct{ echo.DefaultBinder }

func (b *decodedBinder) Bind(i any, c echo.Context) error {
	if v := c.Get(decodedBody); v != nil {
		dst, src := reflect.ValueOf(i), reflect.ValueOf(v)
		if dst.Kind() == reflect.Pointer && !dst.IsNil() && dst.Type() == src.Type() {
			dst.Elem().Set(src.Elem())
			return nil
		}
	}
	return b.BindBody(c, i)
}

// readBody reads req's body for the fast path and leaves in its place one
// that gives the same bytes again, then the same read error, so that
// kin-openapi reads what it would have read.
func readBody(req *http.Request) ([]byte, error) {
	// The buffer grows with what arrives (doubling), from at most
	// firstBodyRead. Sized by Content-Length instead, a request that
	// declares the largest body and sends a byte held that much memory
	// until the read timeout, each of many at once (400 held 650 MB).
	buf := bytes.NewBuffer(make([]byte, 0, min(max(req.ContentLength, 0), firstBodyRead)+bytes.MinRead))
	_, err := buf.ReadFrom(req.Body)
	data := buf.Bytes()
	req.Body.Close()
	var r io.Reader = bytes.NewReader(data)
	if err != nil {
		r = io.MultiReader(r, errReader{err})
	}
	req.Body = io.NopCloser(r)
	return data, err
}

// firstBodyRead is the most readBody sets aside before any of the body has
// arrived; a larger body costs a few doublings, a copy of a few hundred KiB
// for 1,000 events.
const firstBodyRead = 4 << 10

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }
