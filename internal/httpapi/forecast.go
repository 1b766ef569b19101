package httpapi

import (
	"context"
	"time"

	openapi_types "github.com/oapi-codegen/runtime/types"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/payments"
)

// GetCreditsForecast forecasts a customer's consumption and suggests a
// pack; the gate has checked an end user owns the customer.
func (s *Server) GetCreditsForecast(ctx context.Context, r api.GetCreditsForecastRequestObject) (api.GetCreditsForecastResponseObject, error) {
	horizon := 30
	if r.Params.HorizonDays != nil {
		horizon = *r.Params.HorizonDays
	}
	f, err := s.d.Credits.Forecast(ctx, r.CustomerId, horizon, s.d.Config.Catalog.CreditPacks, payments.MaxQuantity)
	if err != nil {
		return nil, err
	}
	return api.GetCreditsForecast200JSONResponse(toAPIForecast(f)), nil
}

func apiDate(t *time.Time) *openapi_types.Date {
	if t == nil {
		return nil
	}
	return &openapi_types.Date{Time: *t}
}

func toAPIForecast(f credits.ForecastResult) api.CreditsForecast {
	out := api.CreditsForecast{
		CustomerId: f.CustomerID, Balance: f.Balance, Available: f.Available, GeneratedAt: f.GeneratedAt,
		Model: api.CreditsForecastModel(f.Model), HistoryDays: f.HistoryDays, HorizonDays: f.HorizonDays,
		Daily:      make([]api.ForecastDay, 0, len(f.Daily)),
		RunwayDays: api.ForecastRunway{Expected: f.Runway.ExpectedDays, Pessimistic: f.Runway.PessimisticDays},
		DepletesOn: api.ForecastDepletesOn{Expected: apiDate(f.Runway.ExpectedDepletesOn), Pessimistic: apiDate(f.Runway.PessimisticDepletesOn)},
	}
	for _, d := range f.Daily {
		out.Daily = append(out.Daily, api.ForecastDay{Date: openapi_types.Date{Time: d.Date}, Expected: d.Expected, Low: d.Low, High: d.High})
	}
	if sg := f.Suggestion; sg != nil {
		out.Suggestion = &api.ForecastSuggestion{Item: sg.Item, Quantity: sg.Quantity, CoversDays: sg.CoversDays, Reason: sg.Reason}
	}
	return out
}
