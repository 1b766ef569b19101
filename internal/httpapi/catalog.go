package httpapi

import (
	"context"

	"github.com/tallybilling/tally/api"
)

// GetCatalog answers the catalog loaded at start.
func (s *Server) GetCatalog(ctx context.Context, r api.GetCatalogRequestObject) (api.GetCatalogResponseObject, error) {
	return api.GetCatalog200JSONResponse(toAPICatalog(s.d.Config.Catalog)), nil
}
