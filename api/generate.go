// Package api is generated from openapi.yaml by oapi-codegen: the models, the
// echo strict server interface and the embedded spec. Never edit api.gen.go;
// change openapi.yaml and run `make generate`.
package api

//go:generate go run github.com/oapi-codegen/oapi-codegen/v2/cmd/oapi-codegen@v2.8.2 -config oapi-codegen.yaml ../openapi.yaml

// The spec is also copied here so the binary can serve it byte for byte.
//go:generate cp ../openapi.yaml openapi.yaml
