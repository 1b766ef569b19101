package httpapi

import (
	"bytes"
	"html/template"
	"sort"
	"strings"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/tallybilling/tally/internal/errs"
)

// renderDocs renders openapi.yaml once, at start, as a self-contained HTML
// page: no script, stylesheet or font is fetched when it is viewed.
func renderDocs(doc *openapi3.T) ([]byte, error) {
	type param struct {
		In, Name, Schema, Desc string
		Required               bool
	}
	type response struct{ Status, Desc, Schema string }
	type operation struct {
		Method, Path, ID, Summary, Description, Body, Security string
		Params                                                 []param
		Responses                                              []response
	}
	type field struct {
		Name, Schema, Desc string
		Required           bool
	}
	type schema struct {
		Name, Desc string
		Fields     []field
		Enum       []string
	}
	var ops []operation
	paths := doc.Paths.InMatchingOrder()
	sort.Strings(paths)
	for _, path := range paths {
		item := doc.Paths.Value(path)
		for method, op := range item.Operations() {
			o := operation{Method: method, Path: path, ID: op.OperationID, Summary: op.Summary, Description: op.Description}
			sec := doc.Security
			if op.Security != nil {
				sec = *op.Security
			}
			var names []string
			for _, req := range sec {
				for name := range req {
					names = append(names, name)
				}
			}
			if _, admin := op.Extensions["x-tally-admin"]; admin {
				names = []string{"apiKey (admin scope)"}
			}
			if len(names) == 0 {
				names = []string{"none"}
			}
			o.Security = strings.Join(names, " or ")
			for _, p := range append(item.Parameters, op.Parameters...) {
				o.Params = append(o.Params, param{In: p.Value.In, Name: p.Value.Name, Schema: schemaName(p.Value.Schema), Desc: p.Value.Description, Required: p.Value.Required})
			}
			if op.RequestBody != nil && op.RequestBody.Value != nil {
				for _, mt := range op.RequestBody.Value.Content {
					o.Body = schemaName(mt.Schema)
				}
			}
			codes := make([]string, 0, op.Responses.Len())
			for code := range op.Responses.Map() {
				codes = append(codes, code)
			}
			sort.Strings(codes)
			for _, code := range codes {
				r := op.Responses.Value(code).Value
				resp := response{Status: code}
				if r.Description != nil {
					resp.Desc = *r.Description
				}
				for _, mt := range r.Content {
					resp.Schema = schemaName(mt.Schema)
				}
				o.Responses = append(o.Responses, resp)
			}
			ops = append(ops, o)
		}
	}
	sort.SliceStable(ops, func(i, j int) bool {
		if ops[i].Path != ops[j].Path {
			return ops[i].Path < ops[j].Path
		}
		return ops[i].Method < ops[j].Method
	})
	var schemas []schema
	names := make([]string, 0, len(doc.Components.Schemas))
	for name := range doc.Components.Schemas {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		s := doc.Components.Schemas[name].Value
		sc := schema{Name: name, Desc: s.Description}
		for _, e := range s.Enum {
			if v, ok := e.(string); ok {
				sc.Enum = append(sc.Enum, v)
			}
		}
		req := map[string]bool{}
		for _, r := range s.Required {
			req[r] = true
		}
		fieldNames := make([]string, 0, len(s.Properties))
		for fn := range s.Properties {
			fieldNames = append(fieldNames, fn)
		}
		sort.Strings(fieldNames)
		for _, fn := range fieldNames {
			p := s.Properties[fn]
			sc.Fields = append(sc.Fields, field{Name: fn, Schema: schemaName(p), Desc: p.Value.Description, Required: req[fn]})
		}
		schemas = append(schemas, sc)
	}
	codes := make([]string, 0, len(problemTypes))
	for code := range problemTypes {
		codes = append(codes, string(code))
	}
	sort.Strings(codes)
	type codeRow struct {
		Code, Title string
		Status      int
	}
	var codeRows []codeRow
	for _, c := range codes {
		codeRows = append(codeRows, codeRow{Code: c, Title: problemTypes[errs.Code(c)].title, Status: problemTypes[errs.Code(c)].status})
	}
	var buf bytes.Buffer
	err := docsPage.Execute(&buf, map[string]any{
		"Title": doc.Info.Title, "Version": doc.Info.Version, "Description": doc.Info.Description,
		"Ops": ops, "Schemas": schemas, "Codes": codeRows,
	})
	return buf.Bytes(), err
}

func schemaName(ref *openapi3.SchemaRef) string {
	if ref == nil {
		return ""
	}
	if ref.Ref != "" {
		return ref.Ref[strings.LastIndex(ref.Ref, "/")+1:]
	}
	v := ref.Value
	if v == nil || v.Type == nil {
		return "any"
	}
	t := strings.Join(v.Type.Slice(), "|")
	if t == "array" && v.Items != nil {
		return "[]" + schemaName(v.Items)
	}
	if v.Format != "" {
		t += " (" + v.Format + ")"
	}
	return t
}

var docsPage = template.Must(template.New("docs").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{.Title}} API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
code,pre,.path{font-family:ui-monospace,monospace}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em}
.op{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
.m{display:inline-block;min-width:4.5em;font-weight:bold;text-transform:uppercase}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
</style></head><body>
<h1>{{.Title}} <small>{{.Version}}</small></h1>
<pre>{{.Description}}</pre>
<p>The machine-readable contract is at <a href="/openapi.yaml">/openapi.yaml</a>.</p>
<h2>Operations</h2>
{{range .Ops}}<div class="op" id="{{.ID}}"><div><span class="m">{{.Method}}</span> <span class="path">{{.Path}}</span> — {{.Summary}}</div>
<div>Authentication: {{.Security}}</div>
{{if .Description}}<pre>{{.Description}}</pre>{{end}}
{{if .Params}}<table><tr><th>in</th><th>name</th><th>type</th><th>required</th><th></th></tr>{{range .Params}}<tr><td>{{.In}}</td><td><code>{{.Name}}</code></td><td>{{.Schema}}</td><td>{{if .Required}}yes{{end}}</td><td>{{.Desc}}</td></tr>{{end}}</table>{{end}}
{{if .Body}}<div>Body: <a href="#schema-{{.Body}}">{{.Body}}</a></div>{{end}}
<table><tr><th>status</th><th>meaning</th><th>body</th></tr>{{range .Responses}}<tr><td>{{.Status}}</td><td>{{.Desc}}</td><td>{{.Schema}}</td></tr>{{end}}</table>
</div>{{end}}
<h2 id="errors">Errors</h2>
<table><tr><th>code</th><th>status</th><th>title</th></tr>{{range .Codes}}<tr id="error-{{.Code}}"><td><code>{{.Code}}</code></td><td>{{.Status}}</td><td>{{.Title}}</td></tr>{{end}}</table>
<h2>Schemas</h2>
{{range .Schemas}}<div class="op" id="schema-{{.Name}}"><strong>{{.Name}}</strong>{{if .Desc}} — {{.Desc}}{{end}}
{{if .Enum}}<div>One of: {{range .Enum}}<code>{{.}}</code> {{end}}</div>{{end}}
{{if .Fields}}<table><tr><th>field</th><th>type</th><th>required</th><th></th></tr>{{range .Fields}}<tr><td><code>{{.Name}}</code></td><td>{{.Schema}}</td><td>{{if .Required}}yes{{end}}</td><td>{{.Desc}}</td></tr>{{end}}</table>{{end}}
</div>{{end}}
</body></html>
`))
