package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// rawImport posts body to the import endpoint with contentType and key.
func rawImport(t *testing.T, s *server, key, contentType string, body io.Reader) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.URL+"/v1/admin/usage-imports", body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Minute}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The import endpoint against hostile input, over HTTP against the real
// binary: no key or a service key, a wrong content type, a broken header,
// a line of 20 MB, bad UTF-8 and bidi controls, negative, NaN and huge
// values, one identifier with two values, a body over 100 MB, and two
// imports of the same rows at once. Each is refused or counted, and what is
// stored is exactly the good rows, once.
func TestUsageImportHostileEndToEnd(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	s := startServer(t, meteringEnv(t, fake.URL()))
	gdb := openDB(t, s)
	count := func() int64 {
		var n int64
		if err := gdb.Raw(`SELECT count(*) FROM usage_events`).Scan(&n).Error; err != nil {
			t.Fatal(err)
		}
		return n
	}
	recent := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	good := "customer_id,meter,value,timestamp,identifier\nhx,api_calls,1," + recent + ",hx-1\n"

	if st, body := rawImport(t, s, "", "text/csv", strings.NewReader(good)); st != http.StatusUnauthorized {
		t.Errorf("no key: %d %s", st, body)
	}
	if st, body := rawImport(t, s, testServiceKey, "text/csv", strings.NewReader(good)); st != http.StatusForbidden {
		t.Errorf("a service key: %d %s", st, body)
	}
	if st, body := rawImport(t, s, testAdminKey, "application/json", strings.NewReader(good)); st != http.StatusUnsupportedMediaType {
		t.Errorf("application/json: %d %s", st, body)
	}
	for _, header := range []string{"customer_id,meter,value\n", "\xff\xfe,meter,value,timestamp,identifier\n", ""} {
		if st, body := rawImport(t, s, testAdminKey, "text/csv", strings.NewReader(header+"hx,api_calls,1,"+recent+",hx-0\n")); st != http.StatusBadRequest ||
			!strings.Contains(body, "application/problem+json") && !strings.Contains(body, `"code":"invalid_request"`) {
			t.Errorf("header %q: %d %s", header, st, body)
		}
	}
	if n := count(); n != 0 {
		t.Fatalf("%d rows stored by refused imports", n)
	}

	hostile := good +
		"hx,api_calls,2," + recent + ",hx-" + strings.Repeat("9", 20<<20) + "\n" +
		"hx,api_calls,2," + recent + ",\"hx-\xff\xfe\"\n" +
		"hx,api_calls,2," + recent + ",hx-\u202egnp.exe\n" +
		"hx,api_calls,-2," + recent + ",hx-neg\n" +
		"hx,api_calls,NaN," + recent + ",hx-nan\n" +
		"hx,api_calls,+Inf," + recent + ",hx-inf\n" +
		"hx,api_calls,9007199254740993," + recent + ",hx-big\n" +
		"hx,api_calls,1.5," + recent + ",hx-frac\n" +
		"hx,api_calls,3," + recent + ",hx-1\n" + // hx-1 with another value
		"hx,api_calls,1," + recent + ",hx-1\n" + // hx-1 again
		"\"hx\",api_calls,4," + recent + ",\"hx-2\"\r\n" // quoted, CRLF: a good row
	st, body := rawImport(t, s, testAdminKey, "text/csv; charset=utf-8", strings.NewReader(hostile))
	if st != http.StatusOK || !strings.Contains(body, `"accepted":2`) || !strings.Contains(body, `"rejected":8`) ||
		!strings.Contains(body, `"conflicts":1`) || !strings.Contains(body, `"duplicates":1`) {
		t.Fatalf("hostile CSV: %d %.2000s", st, body)
	}
	nd := `{"customer_id":"hx","meter":"api_calls","value":5,"timestamp":"` + recent + `","identifier":"hx-3"}` + "\n" +
		`{"customer_id":"hx","meter":"api_calls","value":"5","timestamp":"` + recent + `","identifier":"hx-4"}` + "\n" +
		`{"customer_id":["hx"],"meter":"api_calls","value":5,"timestamp":"` + recent + `","identifier":"hx-5"}` + "\n" +
		`{"customer_id":"hx","meter":"api_calls","value":5,"identifier":"hx-6"}` + "\n" +
		`{"customer_id":"hx","meter":"api_calls","value":1e999,"timestamp":"` + recent + `","identifier":"hx-7"}` + "\n" +
		"\x00\x01\x02\n"
	st, body = rawImport(t, s, testAdminKey, "application/x-ndjson", strings.NewReader(nd))
	if st != http.StatusOK || !strings.Contains(body, `"accepted":1`) || !strings.Contains(body, `"rejected":5`) {
		t.Fatalf("hostile NDJSON: %d %.2000s", st, body)
	}
	if n := count(); n != 3 {
		t.Fatalf("%d rows stored, want hx-1, hx-2 and hx-3", n)
	}

	// Over 100 MB: the rows before the limit are stored, the answer is 413
	// and says so; sending the same rows again within the limit resumes.
	pr, pw := io.Pipe()
	go func() {
		_, _ = io.WriteString(pw, "customer_id,meter,value,timestamp,identifier\nhx,api_calls,1,"+recent+",hx-big-1\n")
		junk := strings.Repeat("x", 1<<20)
		for range 101 {
			if _, err := io.WriteString(pw, junk); err != nil {
				return
			}
		}
		pw.Close()
	}()
	st, body = rawImport(t, s, testAdminKey, "text/csv", pr)
	if st != http.StatusRequestEntityTooLarge || !strings.Contains(body, "payload_too_large") {
		t.Errorf("a body over 100 MB: %d %.500s", st, body)
	}
	pr.Close()
	if n := count(); n != 4 {
		t.Errorf("%d rows stored after the cut import, want 4 (hx-big-1 read before the limit)", n)
	}

	// Two imports of the same 20,000 rows at once: each row stored once,
	// every row accepted by exactly one of them.
	var b strings.Builder
	b.WriteString("customer_id,meter,value,timestamp,identifier\n")
	for i := range 20_000 {
		fmt.Fprintf(&b, "twin-%d,api_calls,%d,%s,twin-%05d\n", i%20, i%5, recent, i)
	}
	var wg sync.WaitGroup
	sums := make([]client.UsageImportSummary, 2)
	for i := range sums {
		wg.Go(func() {
			res, err := s.admin(t).ImportUsageWithBodyWithResponse(context.Background(), &client.ImportUsageParams{}, "text/csv", strings.NewReader(b.String()))
			if err != nil {
				t.Error(err)
				return
			}
			if res.JSON200 == nil {
				t.Errorf("concurrent import: %d %s", res.StatusCode(), res.Body)
				return
			}
			sums[i] = *res.JSON200
		})
	}
	wg.Wait()
	if sums[0].Accepted+sums[1].Accepted != 20_000 || sums[0].Duplicates+sums[1].Duplicates != 20_000 || sums[0].Conflicts+sums[1].Conflicts != 0 {
		t.Errorf("two imports at once: %+v and %+v, want 20000 accepted between them and the rest duplicates", sums[0], sums[1])
	}
	if n := count(); n != 20_004 {
		t.Errorf("%d rows stored, want 20004", n)
	}
}

// An import during a Stripe outage: the import itself never calls Stripe,
// so it completes; its recent rows wait and are delivered once each when
// Stripe is back; a cancel during the outage keeps its row from ever
// reaching Stripe.
func TestUsageImportDuringStripeOutageEndToEnd(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	fake.SetMeter("mtr_api_calls", "api_calls")
	env := meteringEnv(t, fake.URL())
	env["TALLY_METER_BACKOFF_MAX"] = "20ms"
	env["TALLY_METER_RATE_LIMIT"] = "200"
	s := startServer(t, env)
	ctx := context.Background()
	svc := s.service(t)
	sid := "cus_outage"
	if res, err := svc.UpsertCustomerWithResponse(ctx, "outage", client.CustomerUpsert{StripeCustomerId: &sid}); err != nil || res.StatusCode() != http.StatusCreated {
		t.Fatalf("link: %v", err)
	}
	var down sync.Mutex
	isDown := true
	fake.SetFault(func(r *http.Request) (int, string, bool) {
		down.Lock()
		defer down.Unlock()
		if isDown {
			return http.StatusServiceUnavailable, `{"error":{"type":"api_error","message":"Stripe is down."}}`, true
		}
		return 0, "", false
	})
	recent := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	var b strings.Builder
	b.WriteString("customer_id,meter,value,timestamp,identifier\n")
	for i := range 50 {
		fmt.Fprintf(&b, "outage,api_calls,%d,%s,out-%02d\n", i+1, recent, i)
	}
	res, err := s.admin(t).ImportUsageWithBodyWithResponse(ctx, &client.ImportUsageParams{}, "text/csv", strings.NewReader(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "import during the outage", res.StatusCode(), res.Body, http.StatusOK)
	if res.JSON200.Accepted != 50 || res.JSON200.Queued != 50 {
		t.Fatalf("import %s, want 50 queued", res.Body)
	}
	cancelled, err := svc.CancelUsageEventWithResponse(ctx, "out-07")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "cancel during the outage", cancelled.StatusCode(), cancelled.Body, http.StatusOK)
	time.Sleep(500 * time.Millisecond) // sends fail meanwhile
	down.Lock()
	isDown = false
	down.Unlock()
	for i := range 50 {
		if i != 7 {
			waitUsageStatus(t, svc, fmt.Sprintf("out-%02d", i), client.UsageStatusDelivered)
		}
	}
	waitUsageStatus(t, svc, "out-07", client.UsageStatusCancelled)
	for i := range 50 {
		id := fmt.Sprintf("out-%02d", i)
		want := 1
		if i == 7 {
			want = 0 // cancelled before any send reached Stripe, or adjusted
			if fake.Count(id) == 1 && fake.MeterEventAdjustments(id) == 1 {
				want = 1
			}
		}
		if got := fake.Count(id); got != want {
			t.Errorf("%s reached Stripe %d times, want %d", id, got, want)
		}
	}
}
