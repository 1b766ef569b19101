package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tallybilling/tally/internal/stripeapi/stripefake"
	"github.com/tallybilling/tally/pkg/client"
)

// migrationCatalog: api_calls is live, metered_calls cuts over at each
// customer's next billing period, legacy_calls is a shadow meter.
const migrationCatalog = `
redirect_url_prefixes: ["https://app.example.com/"]
plans:
  - id: api
    name: API usage
    stripe_price: price_api_calls
    meter: api_calls
    stripe_meter_id: mtr_api_calls
  - id: metered
    name: Metered calls
    stripe_price: price_metered
    meter: metered_calls
    stripe_meter_id: mtr_metered
    live_from: next_period
  - id: legacy
    name: Legacy calls
    stripe_price: price_legacy
    meter: legacy_calls
    stripe_meter_id: mtr_legacy
    delivery: shadow
`

func migrationEnv(t *testing.T, fake *stripefake.Fake) map[string]string {
	env := meteringEnv(t, fake.URL())
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := os.WriteFile(path, []byte(migrationCatalog), 0o600); err != nil {
		t.Fatal(err)
	}
	env["TALLY_CATALOG_FILE"] = path
	env["TALLY_RECONCILE_INTERVAL"] = "1m"
	return env
}

// importFile is 200,000 rows: 100,000 historical and 99,000 recent of 100
// customers, 500 repeats, 300 conflicting identifiers and 200 bad rows. It
// returns the body and each customer's total of the rows stored.
func importFile(now time.Time) ([]byte, map[string]int64) {
	var b bytes.Buffer
	b.WriteString("customer_id,meter,value,timestamp,identifier\n")
	totals := map[string]int64{}
	row := func(i int) (string, int64, time.Time) {
		cust := fmt.Sprintf("imp-%03d", i%100)
		ts := now.Add(-time.Duration(40*24*3600+i%(20*24*3600)) * time.Second) // 40 to 60 days old
		if i >= 100_000 {
			ts = now.Add(-time.Duration(24*3600+i%(19*24*3600)) * time.Second) // 1 to 20 days old
		}
		return cust, int64(i % 10), ts
	}
	for i := range 199_000 {
		cust, v, ts := row(i)
		fmt.Fprintf(&b, "%s,api_calls,%d,%s,e2e-%06d\n", cust, v, ts.Format(time.RFC3339), i)
		totals[cust] += v
	}
	for i := range 500 { // the same rows again
		cust, v, ts := row(i * 7)
		fmt.Fprintf(&b, "%s,api_calls,%d,%s,e2e-%06d\n", cust, v, ts.Format(time.RFC3339), i*7)
	}
	for i := range 300 { // a taken identifier with another value
		cust, v, ts := row(i * 11)
		fmt.Fprintf(&b, "%s,api_calls,%d,%s,e2e-%06d\n", cust, v+1, ts.Format(time.RFC3339), i*11)
	}
	recent := now.Add(-time.Hour).Format(time.RFC3339)
	bad := []string{
		"imp-001,api_calls,-5," + recent + ",bad-neg-%d",
		"imp-001,api_calls,NaN," + recent + ",bad-nan-%d",
		"imp-001,api_calls,1e30," + recent + ",bad-huge-%d",
		"imp-001,nope,1," + recent + ",bad-meter-%d",
		"imp-001,api_calls,1,yesterday,bad-ts-%d",
		"imp-001,api_calls,1," + recent + ",bad-\u202ebidi-%d",
		"imp-001,api_calls,1," + recent + ",\"bad-\xffutf8-%d\"",
		"im p,api_calls,1," + recent + ",bad-cust-%d",
	}
	for i := range 200 {
		fmt.Fprintf(&b, bad[i%len(bad)]+"\n", i)
	}
	return b.Bytes(), totals
}

func postImport(t *testing.T, s *server, body []byte) client.UsageImportSummary {
	t.Helper()
	res, err := s.admin(t).ImportUsageWithBodyWithResponse(context.Background(), &client.ImportUsageParams{}, "text/csv", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "import", res.StatusCode(), res.Body, http.StatusOK)
	return *res.JSON200
}

// The migration from a legacy usage system, end to end against the real
// binary: history imported twice, a shadow meter, a comparison with the
// legacy totals, a cut-over at the next billing period, the scheduled
// reconciliation finding drift, and cancels before and after delivery.
func TestUsageMigrationEndToEnd(t *testing.T) {
	t.Parallel()
	fake := stripefake.New(t)
	for id, name := range map[string]string{"mtr_api_calls": "api_calls", "mtr_metered": "metered_calls", "mtr_legacy": "legacy_calls"} {
		fake.SetMeter(id, name)
	}
	s := startServer(t, migrationEnv(t, fake))
	ctx := context.Background()
	svc, admin := s.service(t), s.admin(t)
	now := time.Now().UTC()

	link := func(id string) {
		sid := "cus_" + id
		res, err := svc.UpsertCustomerWithResponse(ctx, id, client.CustomerUpsert{StripeCustomerId: &sid})
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode() != http.StatusOK && res.StatusCode() != http.StatusCreated {
			t.Fatalf("link %s: %d %s", id, res.StatusCode(), res.Body)
		}
	}
	ingest := func(evs ...client.UsageEventInput) {
		res, err := svc.IngestUsageEventsWithResponse(ctx, nil, client.UsageBatch{Events: evs})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "ingest", res.StatusCode(), res.Body, http.StatusAccepted)
		if res.JSON202.Accepted != len(evs) {
			t.Fatalf("ingest: %s", res.Body)
		}
	}
	at := func(d time.Duration) *time.Time { x := time.Now().Add(d); return &x }
	event := func(cust, meter, id string, v float64, ts *time.Time) client.UsageEventInput {
		return client.UsageEventInput{CustomerId: cust, Meter: meter, Value: v, Identifier: id, Timestamp: ts}
	}
	// The scheduled reconciliation, first, so that its window settles while
	// the rest runs: two customers' usage in the window that settles next;
	// Stripe counts 5 more for recb.
	link("reca")
	link("recb")
	end := time.Now().Add(-10 * time.Minute).Truncate(time.Minute)
	ts := end.Add(20 * time.Second)
	ingest(event("reca", "api_calls", "reca-1", 7, &ts), event("recb", "api_calls", "recb-1", 8, &ts))
	waitUsageStatus(t, svc, "reca-1", client.UsageStatusDelivered)
	waitUsageStatus(t, svc, "recb-1", client.UsageStatusDelivered)
	fake.SetSummaryOverride("cus_recb", 13)

	// Import, twice.
	body, totals := importFile(now)
	first := postImport(t, s, body)
	if first.Read != 200_000 || first.Accepted != 199_000 || first.Duplicates != 500 || first.Conflicts != 300 ||
		first.Rejected != 200 || first.Historical != 100_000 || first.Queued != 99_000 || len(first.Errors) != 100 {
		t.Fatalf("first import %+v (%d errors)", first, len(first.Errors))
	}
	second := postImport(t, s, body)
	if second.Read != 200_000 || second.Accepted != 0 || second.Duplicates != 199_500 || second.Conflicts != 300 || second.Rejected != 200 {
		t.Fatalf("second import %+v, want nothing new", second)
	}
	gdb := openDB(t, s)
	var n int64
	if err := gdb.Raw(`SELECT count(*) FROM usage_events WHERE identifier LIKE 'e2e-%'`).Scan(&n).Error; err != nil || n != 199_000 {
		t.Fatalf("%d usage rows after two imports (%v), want 199000", n, err)
	}

	// The legacy system agrees with tally but for one customer.
	legacy := []client.LegacyTotal{{CustomerId: "reca", Total: 7}, {CustomerId: "recb", Total: 8}}
	for cust, total := range totals {
		if cust == "imp-042" {
			total++
		}
		legacy = append(legacy, client.LegacyTotal{CustomerId: cust, Total: total})
	}
	cmp, err := admin.CompareUsageWithResponse(ctx, client.UsageComparisonRequest{Meter: "api_calls", From: now.Add(-90 * 24 * time.Hour), To: now, Legacy: legacy})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "comparison", cmp.StatusCode(), cmp.Body, http.StatusOK)
	if cmp.JSON200.Compared != 102 || len(cmp.JSON200.Mismatches) != 1 || cmp.JSON200.Mismatches[0].CustomerId != "imp-042" || cmp.JSON200.Mismatches[0].Difference != -1 {
		t.Errorf("comparison %s, want imp-042 alone, tally one below", cmp.Body)
	}

	// A shadow meter: stored and counted, never sent.
	link("sha")
	ingest(event("sha", "legacy_calls", "sh-1", 4, nil))
	waitUsageStatus(t, svc, "sh-1", client.UsageStatusShadow)

	// The cut-over at the next billing period: np's period ended 30 minutes ago.
	link("np")
	periodEnd := time.Now().Add(-30 * time.Minute).Truncate(time.Second)
	fake.StartSubscription("cus_np", "price_metered", periodEnd.AddDate(0, -1, 0), periodEnd)
	ingest(event("np", "metered_calls", "np-before", 2, at(-40*time.Minute)), event("np", "metered_calls", "np-after", 3, at(-10*time.Minute)))
	waitUsageStatus(t, svc, "np-after", client.UsageStatusDelivered)
	waitUsageStatus(t, svc, "np-before", client.UsageStatusLegacyPeriod)
	usage, err := svc.GetCustomerUsageWithResponse(ctx, "np", &client.GetCustomerUsageParams{})
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "np's usage", usage.StatusCode(), usage.Body, http.StatusOK)
	if len(usage.JSON200.Meters) != 1 || usage.JSON200.Meters[0].LiveFrom == nil || *usage.JSON200.Meters[0].LiveFrom != periodEnd.UTC().Format(time.RFC3339) ||
		usage.JSON200.Meters[0].Total != 5 {
		t.Errorf("np's usage %s, want 5 on metered_calls, live_from %s", usage.Body, periodEnd.UTC().Format(time.RFC3339))
	}
	if fake.Count("np-before")+fake.Count("sh-1") != 0 {
		t.Errorf("a legacy-period or shadow event reached Stripe")
	}

	// Cancel before delivery (the customer has no Stripe customer yet) and
	// after: the adjustment reaches Stripe once.
	ingest(event("late", "api_calls", "cx-before", 1, nil))
	waitUsageStatus(t, svc, "cx-before", client.UsageStatusWaitingCustomer)
	cancel := func(id string, want client.UsageStatus) {
		res, err := svc.CancelUsageEventWithResponse(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "cancel "+id, res.StatusCode(), res.Body, http.StatusOK)
		if res.JSON200.Status != want {
			t.Errorf("cancel %s: %s, want %s", id, res.Body, want)
		}
	}
	cancel("cx-before", client.UsageStatusCancelled)
	link("late")
	link("cx")
	ingest(event("cx", "api_calls", "cx-after", 6, nil))
	waitUsageStatus(t, svc, "cx-after", client.UsageStatusDelivered)
	cancel("cx-after", client.UsageStatusCancelPending)
	waitUsageStatus(t, svc, "cx-after", client.UsageStatusCancelled)
	if fake.Count("cx-before") != 0 || fake.MeterEventAdjustments("cx-after") != 1 {
		t.Errorf("cx-before reached Stripe %d times, cx-after adjusted %d times; want 0 and 1", fake.Count("cx-before"), fake.MeterEventAdjustments("cx-after"))
	}
	user := s.client(t, userToken(t, "cx", time.Now().Add(time.Hour)))
	forbidden, err := user.CancelUsageEventWithResponse(ctx, "cx-after")
	if err != nil {
		t.Fatal(err)
	}
	mustStatus(t, "cancel with an end user's token", forbidden.StatusCode(), forbidden.Body, http.StatusForbidden)

	// The window settles about a minute after the usage was sent.
	deadline := time.Now().Add(150 * time.Second)
	meter := "api_calls"
	for {
		res, err := admin.ListReconciliationsWithResponse(ctx, &client.ListReconciliationsParams{Meter: &meter})
		if err != nil {
			t.Fatal(err)
		}
		mustStatus(t, "reconciliations", res.StatusCode(), res.Body, http.StatusOK)
		found := false
		for _, run := range res.JSON200.Data {
			if run.Kind == client.Scheduled && len(run.Mismatches) == 1 && run.Mismatches[0].CustomerId == "recb" &&
				run.Mismatches[0].Difference == 5 && run.Drift == 5 {
				found = true
			}
		}
		if found {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no scheduled run names recb after 150s: %s", res.Body)
		}
		time.Sleep(time.Second)
	}
	if out, err := s.tallyCmd(t, "verify"); err != nil {
		t.Errorf("verify: %v\n%s", err, out)
	}
	if strings.Contains(s.logs.String(), `"level":"ERROR"`) {
		t.Logf("server logged errors:\n%s", s.logs)
	}
}
