package api

import _ "embed"

// SpecYAML is openapi.yaml as written, served at /openapi.yaml and used for
// request validation. `make generate` refreshes the copy.
//
//go:embed openapi.yaml
var SpecYAML []byte
