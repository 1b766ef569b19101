package main

import (
	"bytes"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/httpapi"
	"github.com/tallybilling/tally/internal/metering"
)

// What `tally reconcile` prints is read by operators and by scripts: the
// text is pinned byte for byte, the --json report member for member, and
// it is the body POST /v1/admin/reconciliations answers, indented.
func TestReconciliationOutput(t *testing.T) {
	t.Parallel()
	from := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	to := time.Date(2026, 3, 2, 12, 30, 0, 0, time.UTC)
	for _, c := range []struct {
		name     string
		rec      metering.Reconciliation
		text     string
		jsonBody string
	}{
		{
			name: "drift",
			rec: metering.Reconciliation{Meter: "api_calls", From: from, To: to, Checked: 3, Mismatches: []metering.Mismatch{
				{CustomerID: "ada", LocalTotal: 120, StripeTotal: 100, Difference: -20},
				{CustomerID: "bartholomew", LocalTotal: 5, StripeTotal: 7, Difference: 2},
			}},
			text: `meter api_calls, 2026-03-01T00:00:00Z to 2026-03-02T12:30:00Z: 3 customers checked, 2 differ
CUSTOMER     LOCAL  STRIPE  DIFFERENCE
ada          120    100     -20
bartholomew  5      7       +2
`,
			jsonBody: `{
  "meter": "api_calls",
  "from": "2026-03-01T00:00:00Z",
  "to": "2026-03-02T12:30:00Z",
  "checked": 3,
  "mismatches": [
    {"customer_id": "ada", "local_total": 120, "stripe_total": 100, "difference": -20},
    {"customer_id": "bartholomew", "local_total": 5, "stripe_total": 7, "difference": 2}
  ]
}`,
		},
		{
			name: "clean",
			rec:  metering.Reconciliation{Meter: "api_calls", From: from, To: to, Checked: 1},
			text: "meter api_calls, 2026-03-01T00:00:00Z to 2026-03-02T12:30:00Z: 1 customers checked, 0 differ\n",
			jsonBody: `{"meter": "api_calls", "from": "2026-03-01T00:00:00Z", "to": "2026-03-02T12:30:00Z",
  "checked": 1, "mismatches": []}`,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			var text bytes.Buffer
			if err := printReconciliation(environment{stdout: &text}, c.rec); err != nil {
				t.Fatal(err)
			}
			if text.String() != c.text {
				t.Errorf("text\n got %q\nwant %q", text.String(), c.text)
			}
			var out bytes.Buffer
			if err := printReconciliationJSON(environment{stdout: &out}, c.rec); err != nil {
				t.Fatal(err)
			}
			checkPrintedJSON(t, out.String(), c.jsonBody, httpapi.ToAPIReconciliation(c.rec))
		})
	}
}
