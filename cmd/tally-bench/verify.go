package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/tallybilling/tally/internal/app"
	"github.com/tallybilling/tally/internal/db"
)

// verifyAfterLoad checks the server's invariants after the load, the way
// -verify says: fast numbers from a service that lost a credit are worth
// nothing. requested reports whether a check was asked for and possible, so
// that one that could not run fails the run.
func verifyAfterLoad(ctx context.Context, s settings, svc *service) (rep verifyReport, requested bool) {
	switch {
	case s.verify == verifyOff:
		return verifyReport{How: "-verify off", Summary: "not run"}, false
	case s.verify == verifyDB:
		return verifyInProcess(ctx, s.db), true
	case s.adminKey == "":
		return verifyReport{How: "GET /v1/admin/verify", Summary: "not run (no -admin-key)"}, false
	default:
		return verifyOverAPI(ctx, svc, s.adminKey), true
	}
}

// verifyOverAPI asks the server: GET /v1/admin/verify.
func verifyOverAPI(ctx context.Context, svc *service, adminKey string) verifyReport {
	r := verifyReport{How: "GET /v1/admin/verify"}
	var got struct {
		OK               bool  `json:"ok"`
		CustomersChecked int64 `json:"customers_checked"`
		PaymentsChecked  int64 `json:"payments_checked"`
		Problems         []any `json:"problems"`
	}
	admin := svc.withKey(adminKey)
	out := admin.do(ctx, request{
		method:  http.MethodGet,
		path:    "/v1/admin/verify",
		want:    http.StatusOK,
		timeout: 5 * time.Minute,
		decode: func(body []byte) outcome {
			if err := json.Unmarshal(body, &got); err != nil {
				return outcome{errLabel: "bad 200 body", errDetail: snippet(body)}
			}
			return outcome{ok: true}
		},
	})
	if err := out.failure("GET /v1/admin/verify"); err != nil {
		r.Summary = "could not run: " + err.Error() + " (on a large database, use -verify db)"
		return r
	}
	return r.with(got.OK, got.CustomersChecked, got.PaymentsChecked, got.Problems)
}

// verifyInProcess runs the project's verify (the code behind `tally verify`
// and GET /v1/admin/verify) in this process on dbURL: no HTTP write timeout
// bounds it, so it also checks a seeded database of millions of rows.
func verifyInProcess(ctx context.Context, dbURL string) verifyReport {
	r := verifyReport{How: "the project's verify in this process on -db"}
	gdb, err := db.Open(ctx, dbURL, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		r.Summary = "could not run: " + err.Error()
		return r
	}
	defer db.Close(gdb)
	started := time.Now()
	got, err := app.Verify(ctx, gdb)
	if err != nil {
		r.Summary = "could not run: " + err.Error()
		return r
	}
	problems := make([]any, len(got.Problems))
	for i, p := range got.Problems {
		problems[i] = p
	}
	r = r.with(got.OK, got.CustomersChecked, got.PaymentsChecked, problems)
	r.Summary += fmt.Sprintf(" in %s", time.Since(started).Round(time.Millisecond))
	return r
}

func (r verifyReport) with(ok bool, customers, payments int64, problems []any) verifyReport {
	r.Checked, r.OK, r.Problems = true, ok, problems
	if ok {
		r.Summary = fmt.Sprintf("ok (%d customers, %d payments checked)", customers, payments)
	} else {
		r.Summary = fmt.Sprintf("FAILED: %d problems (%d customers, %d payments checked)", len(problems), customers, payments)
	}
	return r
}
