package httpapi

import (
	"context"
	"errors"
	"mime"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/tallybilling/tally/api"
	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/metering"
)

// usageImportPath is the usage import's route, which streams (answerWithin).
const usageImportPath = "/v1/admin/usage-imports"

// MaxImportBytes is the largest body POST /v1/admin/usage-imports takes.
const MaxImportBytes = 100 << 20

// importStall is how long an import's body may stop arriving.
const importStall = time.Minute

// importSummary is the body of an import's answer (UsageImportSummary in
// openapi.yaml; the operation lives outside the strict server, which would
// read the whole body before the handler runs).
type importSummary struct {
	Read       int64         `json:"read"`
	Accepted   int64         `json:"accepted"`
	Duplicates int64         `json:"duplicates"`
	Conflicts  int64         `json:"conflicts"`
	Rejected   int64         `json:"rejected"`
	Historical int64         `json:"historical"`
	Queued     int64         `json:"queued"`
	Errors     []importError `json:"errors"`
}

type importError struct {
	Line   int64     `json:"line"`
	Code   errs.Code `json:"code"`
	Detail string    `json:"detail"`
}

// ToImportSummary is sum as the contract shapes it; `tally usage import
// --json` prints it too.
func ToImportSummary(sum metering.ImportSummary) any {
	out := importSummary{Read: sum.Read, Accepted: sum.Accepted, Duplicates: sum.Duplicates, Conflicts: sum.Conflicts,
		Rejected: sum.Rejected, Historical: sum.Historical, Queued: sum.Queued, Errors: make([]importError, len(sum.Errors))}
	for i, e := range sum.Errors {
		out.Errors[i] = importError{Line: e.Line, Code: e.Code, Detail: e.Detail}
	}
	return out
}

// importUsage is POST /v1/admin/usage-imports: the body is streamed into
// the import as it arrives, up to MaxImportBytes. A body cut by the limit
// is 413; the batches stored before stay stored, and sending the file
// again (within the limit) resumes it.
func (s *Server) importUsage(c echo.Context) error {
	req := c.Request()
	if req.ContentLength > MaxImportBytes {
		return errs.E(errs.PayloadTooLarge, "an import is at most %d bytes; split the file (importing it in parts changes nothing)", MaxImportBytes)
	}
	var format metering.ImportFormat
	mt, _, _ := mime.ParseMediaType(req.Header.Get(echo.HeaderContentType))
	switch mt {
	case "text/csv":
		format = metering.ImportCSV
	case "application/x-ndjson":
		format = metering.ImportNDJSON
	default:
		return &problemStatus{err: errs.E(errs.Invalid, "Content-Type must be text/csv or application/x-ndjson, got %q", mt), status: http.StatusUnsupportedMediaType}
	}
	dry := false
	if v := c.QueryParam("dry_run"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return errs.InvalidField("dry_run", "dry_run must be true or false")
		}
		dry = b
	}
	// An import outlasts the server's read and write timeouts, which are
	// sized for ordinary requests: the body may take as long as the import
	// needs, as long as it keeps arriving (importStall between batches).
	rc := http.NewResponseController(c.Response().Writer)
	_ = rc.SetWriteDeadline(time.Time{})
	_ = rc.SetReadDeadline(time.Now().Add(importStall))
	body := http.MaxBytesReader(c.Response(), req.Body, MaxImportBytes)
	sum, err := s.d.Metering.Import(req.Context(), body, metering.ImportOptions{Format: format, DryRun: dry,
		Progress: func(int64, int64) { _ = rc.SetReadDeadline(time.Now().Add(importStall)) }})
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return errs.Wrap(err, errs.PayloadTooLarge,
				"the import is larger than %d bytes; the %d rows read before the limit were imported (%d accepted): import the rest separately",
				MaxImportBytes, sum.Read, sum.Accepted)
		}
		if _, ok := errs.As(err); !ok {
			return errs.Wrap(err, errs.Invalid, "the request body could not be read after %d rows (%d accepted; send the file again to resume): %v",
				sum.Read, sum.Accepted, err)
		}
		return err
	}
	return c.JSON(http.StatusOK, ToImportSummary(sum))
}

// CancelUsageEvent cancels an event, before or after delivery.
func (s *Server) CancelUsageEvent(ctx context.Context, r api.CancelUsageEventRequestObject) (api.CancelUsageEventResponseObject, error) {
	ev, err := s.d.Metering.Cancel(ctx, r.Identifier)
	if err != nil {
		return nil, err
	}
	return api.CancelUsageEvent200JSONResponse(toAPIUsageEvent(ev)), nil
}

// ListReconciliations pages through stored reconciliation runs.
func (s *Server) ListReconciliations(ctx context.Context, r api.ListReconciliationsRequestObject) (api.ListReconciliationsResponseObject, error) {
	meter, cursor := "", ""
	if r.Params.Meter != nil {
		meter = *r.Params.Meter
	}
	if r.Params.Cursor != nil {
		cursor = string(*r.Params.Cursor)
	}
	page, err := s.d.Metering.ListRuns(ctx, meter, cursor, limitOr(r.Params.Limit))
	if err != nil {
		return nil, err
	}
	out := api.ReconciliationRunPage{Data: make([]api.ReconciliationRun, len(page.Runs))}
	for i, run := range page.Runs {
		rec := ToAPIReconciliation(run.Reconciliation)
		out.Data[i] = api.ReconciliationRun{Id: run.ID, Meter: run.Meter, From: run.From, To: run.To, Kind: api.ReconciliationRunKind(run.Kind),
			CustomerId: ptrIfSet(run.CustomerID), Checked: run.Checked, Mismatches: rec.Mismatches, Drift: run.Drift, CreatedAt: run.CreatedAt}
	}
	if page.Next != "" {
		out.NextCursor = &page.Next
	}
	return api.ListReconciliations200JSONResponse(out), nil
}

// CompareUsage compares tally's totals with a legacy system's.
func (s *Server) CompareUsage(ctx context.Context, r api.CompareUsageRequestObject) (api.CompareUsageResponseObject, error) {
	legacy := make([]metering.LegacyTotal, len(r.Body.Legacy))
	for i, l := range r.Body.Legacy {
		legacy[i] = metering.LegacyTotal{CustomerID: l.CustomerId, Total: l.Total}
	}
	cmp, err := s.d.Metering.Compare(ctx, r.Body.Meter, r.Body.From, r.Body.To, legacy)
	if err != nil {
		return nil, unprocessable(err)
	}
	return api.CompareUsage200JSONResponse(ToAPIComparison(cmp)), nil
}

// ToAPIComparison is c as the contract shapes it; `tally usage compare
// --json` prints it too.
func ToAPIComparison(c metering.Comparison) api.UsageComparison {
	out := api.UsageComparison{Meter: c.Meter, From: c.From, To: c.To, Compared: c.Compared, Mismatches: make([]api.ComparisonMismatch, len(c.Mismatches))}
	for i, m := range c.Mismatches {
		out.Mismatches[i] = api.ComparisonMismatch{CustomerId: m.CustomerID, TallyTotal: m.TallyTotal, LegacyTotal: m.LegacyTotal, Difference: m.Difference}
	}
	return out
}
