package events_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tallybilling/tally/internal/events"
)

// Payloads lists every payload type of the package once, each with its own
// event type, so the contract test over Payloads (httpapi's) sees every
// type tally can emit: a payload type declared but not listed fails here.
func TestPayloadsListsEveryPayloadType(t *testing.T) {
	t.Parallel()
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	var declared []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), e.Name(), nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fn, ok := d.(*ast.FuncDecl)
			if !ok || fn.Name.Name != "payload" || fn.Recv == nil {
				continue
			}
			if id, ok := fn.Recv.List[0].Type.(*ast.Ident); ok {
				declared = append(declared, id.Name)
			}
		}
	}
	var listed []string
	types := map[string]string{}
	for _, p := range events.Payloads() {
		name := reflect.TypeOf(p).Name()
		listed = append(listed, name)
		if other, dup := types[p.Type()]; dup {
			t.Errorf("%s and %s both have type %q", other, name, p.Type())
		}
		types[p.Type()] = name
	}
	slices.Sort(declared)
	slices.Sort(listed)
	if len(declared) == 0 || !slices.Equal(declared, listed) {
		t.Errorf("payload types declared: %v; listed by Payloads: %v", declared, listed)
	}
}
