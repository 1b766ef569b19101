package httpapi

import (
	"context"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/events"
)

// ListEvents pages through the outbound event feed, oldest first.
func (s *Server) ListEvents(ctx context.Context, r api.ListEventsRequestObject) (api.ListEventsResponseObject, error) {
	var token string
	if r.Params.After != nil {
		token = *r.Params.After
	}
	after, err := events.ParseCursor(token)
	if err != nil {
		return nil, err
	}
	page, err := s.d.Events.List(ctx, after, limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	out := api.EventPage{Data: make([]api.Event, 0, len(page.Events)), NextCursor: page.Next.String()}
	for _, e := range page.Events {
		ev, err := toAPIEvent(e)
		if err != nil {
			return nil, err
		}
		out.Data = append(out.Data, ev)
	}
	return api.ListEvents200JSONResponse(out), nil
}
