package httpapi

import (
	"context"
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/events"
)

// The outbound events are a contract: every payload type tally emits has its
// schema in openapi.yaml under its type in Event's discriminator, the spec
// lists no type tally does not emit, and each schema has exactly the
// payload's fields, requiring those the payload always sends. A payload
// added or changed without its schema fails here.
func TestEveryEventTypeHasItsSchema(t *testing.T) {
	t.Parallel()
	doc := specDoc(t)
	event := doc.Components.Schemas["Event"].Value
	if event.Discriminator == nil || event.Discriminator.PropertyName != "type" {
		t.Fatalf("Event has no discriminator on type: %+v", event.Discriminator)
	}
	mapping := event.Discriminator.Mapping
	var oneOf []string
	for _, s := range event.OneOf {
		oneOf = append(oneOf, s.Ref)
	}

	var emitted []string
	for _, p := range events.Payloads() {
		typ := p.Type()
		emitted = append(emitted, typ)
		ref, ok := mapping[typ]
		if !ok {
			t.Errorf("%s (events.%T) has no schema: add it to Event's oneOf and discriminator in openapi.yaml", typ, p)
			continue
		}
		if !slices.Contains(oneOf, ref.Ref) {
			t.Errorf("%s maps to %s, which is not in Event's oneOf", typ, ref.Ref)
		}
		variant := doc.Components.Schemas[strings.TrimPrefix(ref.Ref, "#/components/schemas/")].Value
		if tp := variant.Properties["type"]; tp == nil || !reflect.DeepEqual(tp.Value.Enum, []any{typ}) {
			t.Errorf("%s: %s does not pin type to %q", typ, ref.Ref, typ)
		}
		data := variant.Properties["data"]
		if data == nil || !slices.Contains(variant.Required, "data") {
			t.Errorf("%s: %s has no required data", typ, ref.Ref)
			continue
		}
		checkPayloadSchema(t, p, data.Value, event)
	}
	var listed []string
	for typ := range mapping {
		listed = append(listed, typ)
	}
	slices.Sort(emitted)
	slices.Sort(listed)
	if !slices.Equal(emitted, listed) {
		t.Errorf("openapi.yaml lists event types %v, tally emits %v", listed, emitted)
	}
	if len(oneOf) != len(listed) {
		t.Errorf("Event's oneOf has %d schemas for %d types", len(oneOf), len(listed))
	}
}

// checkPayloadSchema compares payload p with its data schema: the same
// fields, the same required ones, and both a full and a minimal sample of p
// valid against it, alone and inside an Event as the feed sends it.
func checkPayloadSchema(t *testing.T, p events.Payload, schema, event *openapi3.Schema) {
	t.Helper()
	full := reflect.New(reflect.TypeOf(p)).Elem()
	fill(full, schema)
	minimal := reflect.New(full.Type()).Elem()
	minimal.Set(full)
	strip(minimal)

	var properties []string
	for name := range schema.Properties {
		properties = append(properties, name)
	}
	if got := jsonKeys(t, full.Interface()); !sameSet(got, properties) {
		t.Errorf("%s: the payload sends %v, the schema describes %v", p.Type(), got, sorted(properties))
	}
	if got := jsonKeys(t, minimal.Interface()); !sameSet(got, schema.Required) {
		t.Errorf("%s: the payload always sends %v, the schema requires %v", p.Type(), got, sorted(schema.Required))
	}
	for name, sample := range map[string]reflect.Value{"full": full, "minimal": minimal} {
		data := jsonValue(t, sample.Interface())
		if err := schema.VisitJSON(data, openapi3.VisitAsResponse(), openapi3.MultiErrors()); err != nil {
			t.Errorf("%s: %s sample %v breaks its schema: %v", p.Type(), name, data, err)
		}
		envelope := map[string]any{"id": "evt_1", "type": p.Type(), "created_at": "2025-01-02T03:04:05Z", "data": data}
		if err := event.VisitJSON(envelope, openapi3.VisitAsResponse(), openapi3.MultiErrors()); err != nil {
			t.Errorf("%s: %s sample breaks Event: %v", p.Type(), name, err)
		}
	}
}

// An event of a type the spec does not list breaks the feed's contract, so
// the end-to-end tests' response validation catches a type emitted without
// its schema.
func TestAnUnknownEventTypeBreaksTheContract(t *testing.T) {
	t.Parallel()
	event := specDoc(t).Components.Schemas["Event"].Value
	envelope := map[string]any{"id": "evt_1", "type": "payment.teleported", "created_at": "2025-01-02T03:04:05Z", "data": map[string]any{}}
	if err := event.VisitJSON(envelope, openapi3.VisitAsResponse()); err == nil {
		t.Fatal("an event of an unknown type passed Event's schema")
	}
	// And a known type with the wrong data does too.
	envelope["type"] = "payment.failed"
	envelope["data"] = map[string]any{"payment_id": "pay_1"}
	if err := event.VisitJSON(envelope, openapi3.VisitAsResponse()); err == nil {
		t.Fatal("payment.failed without its required fields passed Event's schema")
	}
}

func specDoc(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := openapi3.NewLoader().LoadFromData(api.SpecYAML)
	if err != nil {
		t.Fatal(err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	return doc
}

// fill sets every field of v, guided by schema where a value must be one of
// an enum.
func fill(v reflect.Value, schema *openapi3.Schema) {
	switch v.Kind() {
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			v.Set(reflect.ValueOf(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)))
			return
		}
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if f.Anonymous {
				fill(v.Field(i), schema) // its fields are the payload's own in JSON
				continue
			}
			var prop *openapi3.Schema
			if schema != nil && schema.Properties[jsonName(f)] != nil {
				prop = schema.Properties[jsonName(f)].Value
			}
			fill(v.Field(i), prop)
		}
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem(), schema)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		var items *openapi3.Schema
		if schema != nil && schema.Items != nil {
			items = schema.Items.Value
		}
		fill(v.Index(0), items)
	case reflect.Map:
		v.Set(reflect.MakeMap(v.Type()))
		v.SetMapIndex(reflect.ValueOf("k").Convert(v.Type().Key()), reflect.ValueOf("v").Convert(v.Type().Elem()))
	case reflect.String:
		s := "x"
		if schema != nil && len(schema.Enum) > 0 {
			s = schema.Enum[0].(string)
		}
		v.SetString(s)
	case reflect.Int, reflect.Int64:
		v.SetInt(7)
	}
}

// strip leaves v as the payload's smallest form: no optional field, null
// where a field may be null.
func strip(v reflect.Value) {
	for i := range v.NumField() {
		f := v.Type().Field(i)
		switch {
		case f.Anonymous:
			strip(v.Field(i))
		case strings.Contains(f.Tag.Get("json"), ",omitempty"), f.Type.Kind() == reflect.Pointer:
			v.Field(i).SetZero()
		}
	}
}

func jsonName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
	return name
}

func jsonValue(t *testing.T, v any) map[string]any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func jsonKeys(t *testing.T, v any) []string {
	var keys []string
	for k := range jsonValue(t, v) {
		keys = append(keys, k)
	}
	return sorted(keys)
}

func sameSet(a, b []string) bool { return slices.Equal(sorted(a), sorted(b)) }

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
