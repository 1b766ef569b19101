package httpapi

import (
	"net/http"
	"net/http/pprof"

	"github.com/labstack/echo/v4"
)

// registerProfiling serves Go's runtime profiles under /debug/pprof/ to
// admin keys only: a CPU profile taken under load is how the request path
// is measured (BENCHMARKS.md), and a profile tells an outsider what the
// process does, so it is never open. `go tool pprof` sends no header; fetch
// the profile with curl -H 'Authorization: Bearer <admin key>' and open the
// file.
func registerProfiling(g *echo.Group, auth *authenticator) {
	admin := adminOnly(auth)
	g.GET("/debug/pprof/profile", echo.WrapHandler(http.HandlerFunc(pprof.Profile)), admin)
	g.GET("/debug/pprof/trace", echo.WrapHandler(http.HandlerFunc(pprof.Trace)), admin)
	g.GET("/debug/pprof/cmdline", echo.WrapHandler(http.HandlerFunc(pprof.Cmdline)), admin)
	g.GET("/debug/pprof/symbol", echo.WrapHandler(http.HandlerFunc(pprof.Symbol)), admin)
	// Index serves the named profiles too (heap, allocs, goroutine, mutex, block).
	g.GET("/debug/pprof/*", echo.WrapHandler(http.HandlerFunc(pprof.Index)), admin)
}
