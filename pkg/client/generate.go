// Package client is the Go client for tally's HTTP API, generated from
// openapi.yaml by oapi-codegen. Services that call tally use NewClientWithResponses
// with a request editor that sets `Authorization: Bearer <key>`.
package client

//go:generate go run github.com/oapi-codegen/oapi-codegen/v2/cmd/oapi-codegen@v2.8.2 -config oapi-codegen.yaml ../../openapi.yaml
