package main

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/httpapi"
)

// What `tally verify` prints is read by operators and by scripts: the text
// lines are pinned byte for byte; the --json report is pinned member for
// member (jsonBody is what it printed before it used the API's type) and
// is the body GET /v1/admin/verify answers, indented.
func TestVerifyReportOutput(t *testing.T) {
	t.Parallel()
	breached := credits.VerifyReport{
		CustomersChecked: 3, PaymentsChecked: 2,
		Problems: []credits.VerifyProblem{
			{Kind: "balance_ledger_mismatch", CustomerID: "ada", Detail: "balance 110, ledger sums to 10"},
			{Kind: "payment_not_credited", PaymentID: "pay_1", Detail: "succeeded without a grant"},
			{Kind: "both", CustomerID: "bob", PaymentID: "pay_2", Detail: "d"},
		},
		Receivables: []credits.Receivable{{CustomerID: "cyd", Shortfall: 7, Revokes: 2}},
	}
	clean := credits.VerifyReport{OK: true, CustomersChecked: 1}

	for _, c := range []struct {
		name     string
		rep      credits.VerifyReport
		text     string
		jsonBody string
	}{
		{
			name: "breached",
			rep:  breached,
			text: `checked 3 customers and 2 payments
BREACH balance_ledger_mismatch customer=ada: balance 110, ledger sums to 10
BREACH payment_not_credited payment=pay_1: succeeded without a grant
BREACH both customer=bob payment=pay_2: d
receivable customer=cyd: 7 credits refunded or disputed after they were spent (2 revokes)
`,
			jsonBody: `{
  "ok": false,
  "customers_checked": 3,
  "payments_checked": 2,
  "problems": [
    {
      "kind": "balance_ledger_mismatch",
      "customer_id": "ada",
      "detail": "balance 110, ledger sums to 10"
    },
    {
      "kind": "payment_not_credited",
      "payment_id": "pay_1",
      "detail": "succeeded without a grant"
    },
    {
      "kind": "both",
      "customer_id": "bob",
      "payment_id": "pay_2",
      "detail": "d"
    }
  ],
  "receivables": [
    {
      "customer_id": "cyd",
      "shortfall": 7,
      "revokes": 2
    }
  ]
}
`,
		},
		{
			name: "clean",
			rep:  clean,
			text: `checked 1 customers and 0 payments
ok: every invariant holds
`,
			jsonBody: `{
  "ok": true,
  "customers_checked": 1,
  "payments_checked": 0,
  "problems": [],
  "receivables": []
}
`,
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			var text bytes.Buffer
			if err := printVerifyReport(&text, c.rep, false); err != nil {
				t.Fatal(err)
			}
			if text.String() != c.text {
				t.Errorf("text\n got %q\nwant %q", text.String(), c.text)
			}
			var out bytes.Buffer
			if err := printVerifyReport(&out, c.rep, true); err != nil {
				t.Fatal(err)
			}
			checkPrintedJSON(t, out.String(), c.jsonBody, httpapi.ToAPIVerifyReport(c.rep))
		})
	}
}

// checkPrintedJSON fails unless printed, what a command printed with
// --json, has the members of want and is body, the API's answer for the
// same report, indented as the command indents it.
func checkPrintedJSON(t *testing.T, printed, want string, body any) {
	t.Helper()
	var got, wanted any
	if err := json.Unmarshal([]byte(printed), &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(want), &wanted); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, wanted) {
		t.Errorf("json members\n got %s\nwant %s", printed, want)
	}
	api, err := json.MarshalIndent(body, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if printed != string(api)+"\n" {
		t.Errorf("json differs from the API's body\n got %s\n api %s", printed, api)
	}
}
