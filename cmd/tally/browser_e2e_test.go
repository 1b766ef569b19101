package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tallybilling/tally/pkg/client"
)

// The browser tests walk the README's walk-through in Debian's Chromium,
// headless, against the real `run` with the Stripe sandbox: the demo app
// signs in, buys a pack on the hosted checkout page, comes back to the new
// balance and spends; a declined card, the authentication card approved
// and failed, a refund from the dashboard. tally verify is clean after each.
//
// A failing test leaves a screenshot of the page in browserArtifacts (the
// failure message names the file).

// browserArtifacts is where failing browser tests leave their screenshots:
// TALLY_TEST_ARTIFACTS, or .state/test-artifacts in the checkout.
func browserArtifacts() string {
	if dir := os.Getenv("TALLY_TEST_ARTIFACTS"); dir != "" {
		return dir
	}
	return repoFile(".state/test-artifacts")
}

// chromium finds the browser: TALLY_CHROMIUM, or Debian's chromium.
func chromium(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("TALLY_CHROMIUM"); p != "" {
		if _, err := exec.LookPath(p); err != nil {
			t.Fatalf("TALLY_CHROMIUM=%s: %v; unset it to use Debian's chromium (apt-get install -y chromium)", p, err)
		}
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("the browser tests need Chromium, which is not installed: apt-get install -y chromium " +
		"(or set TALLY_CHROMIUM to a Chrome or Chromium binary). .ci/run installs it.")
	return ""
}

// browser starts one headless Chromium for the whole test, with a fresh
// profile, and closes it at the end.
func browser(t *testing.T) context.Context {
	t.Helper()
	skipShort(t)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromium(t)),
		chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1200, 900),
	)
	ctx, cancel := chromedp.NewContext(alloc)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("start Chromium: %v", err)
	}
	return ctx
}

// tab opens a tab for one subtest, bounded in time; when the subtest fails,
// a screenshot of the tab is saved and named in the log.
func tab(t *testing.T, browserCtx context.Context) context.Context {
	t.Helper()
	ctx, cancel := chromedp.NewContext(browserCtx)
	ctx, cancelTimeout := context.WithTimeout(ctx, 90*time.Second)
	t.Cleanup(func() { cancelTimeout(); cancel() })
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		shotCtx, cancelShot := context.WithTimeout(ctx, 10*time.Second)
		defer cancelShot()
		png, err := chromedp.Run(shotCtx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Logf("no screenshot of the failed page: %v", err)
			return
		}
		dir := browserArtifacts()
		name := filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())+"-"+time.Now().Format("20060102-150405")+".png")
		err = os.MkdirAll(dir, 0o755)
		if err == nil {
			err = os.WriteFile(name, png, 0o644)
		}
		if err != nil {
			t.Logf("could not save the screenshot: %v", err)
			return
		}
		url, _ := chromedp.Run(shotCtx, chromedp.Location())
		t.Logf("screenshot of the failed page (%s): %s", url, name)
	})
	return ctx
}

func do(t *testing.T, ctx context.Context, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// waitPage waits for a JavaScript condition on the page, across
// navigations (a check that meets a page being replaced is tried again).
func waitPage(t *testing.T, ctx context.Context, what, expr string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last error
	for time.Now().Before(deadline) && ctx.Err() == nil {
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool]("Boolean("+expr+")"))
		if err == nil && ok {
			return
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	loc, _ := chromedp.Run(ctx, chromedp.Location())
	t.Fatalf("%s: not so after 20s (page %s; last error %v)", what, loc, last)
}

func text(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("text of %s: %v", sel, err)
	}
	return strings.TrimSpace(s)
}

// signIn opens the demo app and signs in as customer.
func signIn(t *testing.T, ctx context.Context, s *server, customer string) {
	t.Helper()
	do(t, ctx, "open the demo", chromedp.Navigate(s.URL+"/sandbox/demo"))
	waitPage(t, ctx, "the demo is ready", `document.body.dataset.ready === "true"`)
	if !strings.Contains(text(t, ctx, "#sandbox-banner"), "SANDBOX") {
		t.Fatal("the demo has no sandbox banner")
	}
	do(t, ctx, "sign in", chromedp.SetValue(chromedp.CSS("#customer-id"), customer), chromedp.Click(chromedp.CSS("#signin")))
	waitPage(t, ctx, "the balance shows", `document.getElementById("balance").textContent === "0"`)
}

// startBuying clicks the starter pack and waits for the hosted checkout page.
func startBuying(t *testing.T, ctx context.Context) {
	t.Helper()
	waitPage(t, ctx, "the packs show", `document.querySelector('button[data-pack="starter"]') !== null`)
	do(t, ctx, "buy the starter pack", chromedp.Click(chromedp.CSS(`button[data-pack="starter"]`)))
	waitPage(t, ctx, "the hosted checkout page", `location.pathname.startsWith("/sandbox/checkout/") && document.getElementById("pay") !== null`)
	if got := text(t, ctx, "#total"); got != "10.00 USD" {
		t.Fatalf("the checkout page shows a total of %q, want 10.00 USD", got)
	}
	if !strings.Contains(text(t, ctx, "#line-items"), "Starter pack") {
		t.Fatal("the checkout page does not list the Starter pack")
	}
}

func payWith(t *testing.T, ctx context.Context, card string) {
	t.Helper()
	do(t, ctx, "pay with "+card, chromedp.SendKeys(chromedp.CSS("#card"), card), chromedp.Click(chromedp.CSS("#pay")))
}

// backWithCredits waits for the demo app to show the payment's credits.
func backWithCredits(t *testing.T, ctx context.Context, balance int64) {
	t.Helper()
	waitPage(t, ctx, "back in the demo app", `location.pathname === "/sandbox/demo"`)
	waitPage(t, ctx, "the payment confirmed", `document.getElementById("notice").textContent.startsWith("Payment succeeded")`)
	waitPage(t, ctx, fmt.Sprintf("the balance of %d", balance), fmt.Sprintf(`document.getElementById("balance").textContent === "%d"`, balance))
}

func latestPayment(t *testing.T, s *server, customer string) client.Payment {
	t.Helper()
	r, err := s.service(t).ListCustomerPaymentsWithResponse(context.Background(), customer, &client.ListCustomerPaymentsParams{})
	if err != nil {
		t.Fatal(err)
	}
	if r.JSON200 == nil || len(r.JSON200.Data) == 0 {
		t.Fatalf("%s has no payment: %s", customer, r.Body)
	}
	return r.JSON200.Data[0]
}

func TestBrowserDemoWalk(t *testing.T) {
	t.Parallel()
	s := startServer(t, sandboxEnv(t))
	b := browser(t)

	t.Run("buy with 4242, spend, refund from the dashboard", func(t *testing.T) {
		ctx := tab(t, b)
		signIn(t, ctx, s, "demo-walker")
		startBuying(t, ctx)
		payWith(t, ctx, "4242 4242 4242 4242")
		backWithCredits(t, ctx, starterCredits)
		// The ledger is fetched after the balance, so it is waited for too.
		waitPage(t, ctx, "the ledger showing the purchase", `document.getElementById("ledger").textContent.includes("purchase of 1 × starter")`)
		assertInvariants(t, s)

		do(t, ctx, "spend 100", chromedp.SetValue(chromedp.CSS("#spend-amount"), "100"), chromedp.Click(chromedp.CSS("#spend")))
		waitPage(t, ctx, "the balance after spending", `document.getElementById("balance").textContent === "900"`)
		assertInvariants(t, s)

		pi := *latestPayment(t, s, "demo-walker").PaymentIntentId
		do(t, ctx, "open the dashboard", chromedp.Navigate(s.URL+"/sandbox"))
		row := fmt.Sprintf(`tr[data-payment-intent=%q]`, pi)
		do(t, ctx, "refund in full", chromedp.Click(chromedp.CSS(row+` button[name="refund"]`)))
		waitPage(t, ctx, "the refund confirmed", `(document.getElementById("flash") || {textContent: ""}).textContent.startsWith("Refunded 10.00 USD")`)
		waitPayment(t, s, latestPayment(t, s, "demo-walker").Id, client.PaymentStatusRefunded)

		do(t, ctx, "back to the demo", chromedp.Navigate(s.URL+"/sandbox/demo"))
		// 900 left of the 1000 bought: the refund takes back what is left.
		waitPage(t, ctx, "the balance after the refund", `document.getElementById("balance").textContent === "0"`)
		assertInvariants(t, s)
	})

	t.Run("a declined card credits nothing", func(t *testing.T) {
		ctx := tab(t, b)
		signIn(t, ctx, s, "demo-declined")
		startBuying(t, ctx)
		for _, card := range []string{"4000 0000 0000 0002", "4000 0000 0000 9995"} {
			if _, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`(document.getElementById("card").value = "") === ""`)); err != nil {
				t.Fatalf("clear the card: %v", err)
			}
			payWith(t, ctx, card)
			want := map[string]string{"4000 0000 0000 0002": "Your card was declined.", "4000 0000 0000 9995": "Your card has insufficient funds."}[card]
			waitPage(t, ctx, card+" shows its decline", fmt.Sprintf(`(document.getElementById("payment-error") || {}).textContent === %q`, want))
			if !strings.HasPrefix(text(t, ctx, "#session-status"), "open") {
				t.Fatalf("%s: the session is no longer open", card)
			}
		}
		waitPayment(t, s, latestPayment(t, s, "demo-declined").Id, client.PaymentStatusFailed)
		do(t, ctx, "cancel", chromedp.Click(chromedp.CSS("#cancel")))
		waitPage(t, ctx, "back in the demo app", `location.pathname === "/sandbox/demo" && document.getElementById("notice").textContent.startsWith("Checkout canceled")`)
		if b := balanceOverHTTP(t, s.service(t), "demo-declined"); b.Balance != 0 {
			t.Fatalf("declined cards credited %d", b.Balance)
		}
		assertInvariants(t, s)
	})

	t.Run("authentication approved", func(t *testing.T) {
		ctx := tab(t, b)
		signIn(t, ctx, s, "demo-3ds-ok")
		startBuying(t, ctx)
		payWith(t, ctx, "4000 0027 6000 3184")
		waitPage(t, ctx, "the authentication step", `document.getElementById("authenticate-approve") !== null`)
		do(t, ctx, "approve", chromedp.Click(chromedp.CSS("#authenticate-approve")))
		backWithCredits(t, ctx, starterCredits)
		assertInvariants(t, s)
	})

	t.Run("authentication failed", func(t *testing.T) {
		ctx := tab(t, b)
		signIn(t, ctx, s, "demo-3ds-fail")
		startBuying(t, ctx)
		payWith(t, ctx, "4000 0027 6000 3184")
		waitPage(t, ctx, "the authentication step", `document.getElementById("authenticate-fail") !== null`)
		do(t, ctx, "fail", chromedp.Click(chromedp.CSS("#authenticate-fail")))
		waitPage(t, ctx, "the failure shows", `document.getElementById("payment-error") !== null`)
		if msg := text(t, ctx, "#payment-error"); !strings.Contains(msg, "unable to authenticate") {
			t.Fatalf("the page shows %q", msg)
		}
		waitPayment(t, s, latestPayment(t, s, "demo-3ds-fail").Id, client.PaymentStatusFailed)
		if b := balanceOverHTTP(t, s.service(t), "demo-3ds-fail"); b.Balance != 0 {
			t.Fatalf("a failed authentication credited %d", b.Balance)
		}
		assertInvariants(t, s)
	})
}
