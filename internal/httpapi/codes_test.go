package httpapi

import (
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

// stringConsts returns the string constants that internal/<pkg> declares,
// read from source, whose declared type (or, for untyped ones, name) keep
// accepts, as a map from value to name; so a code or an enum value added
// there is checked here without anyone listing it.
func stringConsts(t *testing.T, pkg string, keep func(name, typ string) bool) map[string]string {
	t.Helper()
	_, here, _, _ := runtime.Caller(0)
	paths, err := filepath.Glob(filepath.Join(filepath.Dir(here), "..", pkg, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	fset := token.NewFileSet()
	for _, p := range paths {
		if strings.HasSuffix(p, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, p, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, s := range gd.Specs {
				vs := s.(*ast.ValueSpec)
				typ := ""
				if id, ok := vs.Type.(*ast.Ident); ok {
					typ = id.Name
				}
				for i, name := range vs.Names {
					if i >= len(vs.Values) {
						continue
					}
					val, typ := vs.Values[i], typ
					// X = Code("x") declares a Code as X Code = "x" does.
					if call, ok := val.(*ast.CallExpr); ok && len(call.Args) == 1 {
						if id, ok := call.Fun.(*ast.Ident); ok {
							val, typ = call.Args[0], id.Name
						}
					}
					lit, ok := val.(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING || !keep(name.Name, typ) {
						continue
					}
					v, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					out[v] = name.Name
				}
			}
		}
	}
	if len(out) == 0 {
		t.Fatalf("no constants found in internal/%s", pkg)
	}
	return out
}

func ofType(want string) func(name, typ string) bool {
	return func(_, typ string) bool { return typ == want }
}

// specErrorCodes is the ErrorCode enum of the embedded openapi.yaml.
func specErrorCodes(t *testing.T) []string {
	t.Helper()
	doc, err := loadSpec(api.SpecYAML)
	if err != nil {
		t.Fatal(err)
	}
	ref := doc.Components.Schemas["ErrorCode"]
	if ref == nil || ref.Value == nil {
		t.Fatal("openapi.yaml has no ErrorCode schema")
	}
	var out []string
	for _, v := range ref.Value.Enum {
		s, ok := v.(string)
		if !ok {
			t.Fatalf("ErrorCode enum value %v is not a string", v)
		}
		out = append(out, s)
	}
	return out
}

// An error code is a promise to clients: each code of internal/errs is
// answered with a real HTTP error status and a title, and is a value of the
// contract's ErrorCode enum spelled the same way; the enum has no value
// that no code produces, and the map no row for a code that is gone.
func TestEveryCodeIsInTheContract(t *testing.T) {
	t.Parallel()
	declared := stringConsts(t, "errs", ofType("Code"))
	enum := specErrorCodes(t)
	for value, name := range declared {
		code, name := errs.Code(value), "errs."+name
		row, ok := problemTypes[code]
		if !ok {
			t.Errorf("%s (%q) has no row in problemTypes: give it a status and a title", name, code)
			continue
		}
		if row.status < 400 || row.status > 599 || http.StatusText(row.status) == "" {
			t.Errorf("%s is answered with status %d, not an HTTP error status", name, row.status)
		}
		if strings.TrimSpace(row.title) == "" {
			t.Errorf("%s has no title", name)
		}
		if string(row.code) != string(code) || !row.code.Valid() {
			t.Errorf("%s (%q) is sent as ErrorCode %q", name, code, row.code)
		}
		if !slices.Contains(enum, string(code)) {
			t.Errorf("%s (%q) is not a value of ErrorCode in openapi.yaml", name, code)
		}
	}
	for code := range problemTypes {
		if _, ok := declared[string(code)]; !ok {
			t.Errorf("problemTypes has a row for %q, which internal/errs does not declare", code)
		}
	}
	for _, v := range enum {
		if _, ok := declared[v]; !ok {
			t.Errorf("openapi.yaml's ErrorCode %q is no constant of internal/errs", v)
		}
	}
}
