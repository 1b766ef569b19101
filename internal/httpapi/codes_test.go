package httpapi

import (
	"go/ast"
	"go/importer"
	"go/parser"
	"go/token"
	"go/types"
	"net/http"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
)

// declaredCodes reads internal/errs from source and returns the value of
// every constant of type errs.Code, so that a code added there is seen here
// without anyone remembering to list it.
func declaredCodes(t *testing.T) map[errs.Code]string {
	t.Helper()
	_, here, _, _ := runtime.Caller(0)
	dir := filepath.Join(filepath.Dir(here), "..", "errs")
	paths, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	var files []*ast.File
	for _, p := range paths {
		if strings.HasSuffix(p, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, p, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	conf := types.Config{Importer: importer.ForCompiler(fset, "source", nil)}
	pkg, err := conf.Check("github.com/tallybilling/tally/internal/errs", fset, files, nil)
	if err != nil {
		t.Fatalf("type-check internal/errs: %v", err)
	}
	codeType := pkg.Scope().Lookup("Code")
	if codeType == nil {
		t.Fatal("internal/errs declares no type Code")
	}
	codes := map[errs.Code]string{}
	for _, name := range pkg.Scope().Names() {
		c, ok := pkg.Scope().Lookup(name).(*types.Const)
		if !ok || !types.Identical(c.Type(), codeType.Type()) {
			continue
		}
		codes[errs.Code(strings.Trim(c.Val().ExactString(), `"`))] = "errs." + name
	}
	if len(codes) == 0 {
		t.Fatal("found no errs.Code constants")
	}
	return codes
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
	declared := declaredCodes(t)
	enum := specErrorCodes(t)
	for code, name := range declared {
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
		if _, ok := declared[code]; !ok {
			t.Errorf("problemTypes has a row for %q, which internal/errs does not declare", code)
		}
	}
	for _, v := range enum {
		if _, ok := declared[errs.Code(v)]; !ok {
			t.Errorf("openapi.yaml's ErrorCode %q is no constant of internal/errs", v)
		}
	}
}
