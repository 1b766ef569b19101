package sandbox

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/tallybilling/tally/internal/text"
)

//go:embed templates/*.html
var templateFiles embed.FS

// WebOptions configure NewWeb.
type WebOptions struct {
	Account *Account
	// API, when set, is the sandbox's Stripe API, whose faults and recent
	// requests show on the dashboard; APIURL is where it is served.
	API    *API
	APIURL string
	// Demo, when set, serves the demo app at /sandbox/demo.
	Demo   *Demo
	Logger *slog.Logger
}

// Web serves the sandbox's pages, all under /sandbox, each with a banner
// saying it is a sandbox:
//
//	GET  /sandbox                           the dashboard
//	GET  /sandbox/checkout/{id}             the hosted checkout page (a session's url)
//	POST /sandbox/checkout/{id}/pay         form: card, email; 303 to success_url, or the page with the decline (402)
//	POST /sandbox/checkout/{id}/authenticate form: result=approve|fail (the 3D Secure step)
//	GET  /sandbox/checkout/{id}/cancel      303 to cancel_url (the session stays open)
//	POST /sandbox/checkout/{id}/expire
//	GET  /sandbox/invoices/{id}             the hosted invoice page
//	POST /sandbox/payments/{id}/refund      form: amount (empty: all that is left)
//	POST /sandbox/payments/{id}/dispute
//	POST /sandbox/disputes/{id}/close       form: outcome=won|lost
//	POST /sandbox/invoices/{id}/{finalize|send|pay|void|mark_uncollectible}
//	POST /sandbox/events/{id}/resend
//	POST /sandbox/faults                    form: count, status (fail the next API requests)
//
// Every action answers 303 to the dashboard (or to back, when the form
// names a page of the sandbox), so that a script can use it as a form
// endpoint; a refused action answers 4xx with the page and the reason.
type Web struct {
	opts WebOptions
	tmpl *template.Template
	mux  *http.ServeMux
}

// NewWeb builds the pages.
func NewWeb(opts WebOptions) *Web {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	funcs := template.FuncMap{
		"money": money,
		"when":  func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05") },
		"unix": func(v any) string {
			n := num(map[string]any{"v": v}, "v")
			if n == 0 {
				return ""
			}
			return time.Unix(n, 0).UTC().Format("2006-01-02 15:04:05")
		},
		"str":   func(m map[string]any, k string) string { return str(m, k) },
		"num":   func(m map[string]any, k string) int64 { return num(m, k) },
		"sub":   func(m map[string]any, k string) map[string]any { return sub(m, k) },
		"short": text.Truncate,
		"deref": func(p any) any {
			switch v := p.(type) {
			case *int:
				if v == nil {
					return ""
				}
				return *v
			case *string:
				if v == nil {
					return ""
				}
				return *v
			case *time.Time:
				if v == nil {
					return ""
				}
				return v.UTC().Format("15:04:05")
			}
			return p
		},
	}
	w := &Web{opts: opts, tmpl: template.Must(template.New("").Funcs(funcs).ParseFS(templateFiles, "templates/*.html")), mux: http.NewServeMux()}
	m := w.mux
	m.HandleFunc("GET /sandbox", w.dashboard)
	m.HandleFunc("GET /sandbox/{$}", w.dashboard)
	m.HandleFunc("GET /sandbox/checkout/{id}", w.checkoutPage)
	m.HandleFunc("POST /sandbox/checkout/{id}/pay", w.pay)
	m.HandleFunc("POST /sandbox/checkout/{id}/authenticate", w.authenticate)
	m.HandleFunc("GET /sandbox/checkout/{id}/cancel", w.cancel)
	m.HandleFunc("POST /sandbox/checkout/{id}/expire", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		return "Checkout Session expired.", opts.Account.ExpireSession(ctx, r.PathValue("id"))
	}))
	m.HandleFunc("GET /sandbox/invoices/{id}", w.invoicePage)
	m.HandleFunc("POST /sandbox/payments/{id}/refund", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		var amount int64
		if v := strings.TrimSpace(r.PostFormValue("amount")); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 1 {
				return "", invalid("amount", "The amount to refund must be a positive whole number of minor units, not %q.", v)
			}
			amount = n
		}
		re, err := opts.Account.Refund(ctx, r.PathValue("id"), amount, r.PostFormValue("reason"))
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("Refunded %s (%s).", money(num(re, "amount"), str(re, "currency")), str(re, "id")), nil
	}))
	m.HandleFunc("POST /sandbox/payments/{id}/dispute", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		d, err := opts.Account.OpenDispute(ctx, r.PathValue("id"), r.PostFormValue("reason"))
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("Dispute %s opened: %s withdrawn.", str(d, "id"), money(num(d, "amount"), str(d, "currency"))), nil
	}))
	m.HandleFunc("POST /sandbox/disputes/{id}/close", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		outcome := r.PostFormValue("outcome")
		if outcome != "won" && outcome != "lost" {
			return "", invalid("outcome", "outcome must be won or lost, not %q.", outcome)
		}
		d, err := opts.Account.CloseDispute(ctx, r.PathValue("id"), outcome == "won")
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("Dispute %s closed: %s.", str(d, "id"), str(d, "status")), nil
	}))
	m.HandleFunc("POST /sandbox/invoices/{id}/{action}", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		inv, err := opts.Account.InvoiceAction(ctx, r.PathValue("id"), r.PathValue("action"))
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("Invoice %s is %s.", str(inv, "id"), str(inv, "status")), nil
	}))
	m.HandleFunc("POST /sandbox/events/{id}/resend", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		return "Event queued for delivery.", opts.Account.Resend(ctx, r.PathValue("id"))
	}))
	m.HandleFunc("POST /sandbox/faults", w.action(func(ctx context.Context, r *http.Request) (string, error) {
		if opts.API == nil {
			return "", invalid("", "No Stripe API is served here.")
		}
		count, err1 := strconv.Atoi(r.PostFormValue("count"))
		status, err2 := strconv.Atoi(r.PostFormValue("status"))
		if err1 != nil || err2 != nil || count < 1 || count > 1000 || status < 400 || status > 599 {
			return "", invalid("", "count must be 1 to 1000 and status a 4xx or 5xx.")
		}
		retryAfter := ""
		if status == http.StatusTooManyRequests {
			retryAfter = "1"
		}
		opts.API.FailNext(count, status, retryAfter)
		return fmt.Sprintf("The next %d Stripe API requests answer %d.", count, status), nil
	}))
	if opts.Demo != nil {
		opts.Demo.register(m)
	}
	return w
}

func (w *Web) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	// The pages are the sandbox's own; nothing of them may be cached or framed.
	rw.Header().Set("Cache-Control", "no-store")
	rw.Header().Set("X-Frame-Options", "DENY")
	w.mux.ServeHTTP(rw, r)
}

func money(amount int64, currency string) string {
	c := strings.ToUpper(currency)
	if c == "" {
		return strconv.FormatInt(amount, 10)
	}
	if zeroDecimal[strings.ToLower(currency)] {
		return fmt.Sprintf("%d %s", amount, c)
	}
	sign := ""
	if amount < 0 {
		sign, amount = "-", -amount
	}
	return fmt.Sprintf("%s%d.%02d %s", sign, amount/100, amount%100, c)
}

// zeroDecimal are Stripe's currencies without minor units.
var zeroDecimal = map[string]bool{"bif": true, "clp": true, "djf": true, "gnf": true, "jpy": true, "kmf": true, "krw": true,
	"mga": true, "pyg": true, "rwf": true, "ugx": true, "vnd": true, "vuv": true, "xaf": true, "xof": true, "xpf": true}

func (w *Web) render(rw http.ResponseWriter, status int, name string, data any) {
	rw.Header().Set("Content-Type", "text/html; charset=utf-8")
	rw.WriteHeader(status)
	if err := w.tmpl.ExecuteTemplate(rw, name, data); err != nil {
		w.opts.Logger.Error("sandbox: render page", "page", name, "error", err)
	}
}

// notFoundOr renders the page saying what is missing for a *Error, and
// for any other error (the store cannot be read) the page saying so.
func (w *Web) notFoundOr(rw http.ResponseWriter, what string, err error) {
	var e *Error
	if errors.As(err, &e) {
		w.render(rw, e.Status, "notfound.html", map[string]any{"What": what, "Error": err.Error()})
		return
	}
	w.unavailable(rw, http.StatusInternalServerError, "", err)
}

// unavailable renders the page saying the sandbox's store cannot be read
// (the database is away), with the refused action's reason when there is
// one: nothing of the account is shown, since what memory holds may be
// what the store refused.
func (w *Web) unavailable(rw http.ResponseWriter, status int, errText string, err error) {
	w.render(rw, status, "unavailable.html", map[string]any{"Action": errText, "Error": err.Error()})
}

// statusOf is the HTTP status of a refused action.
func statusOf(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return http.StatusInternalServerError
}

// action wraps a dashboard action: 303 back with its message, or the
// dashboard with the reason it was refused.
func (w *Web) action(fn func(ctx context.Context, r *http.Request) (string, error)) http.HandlerFunc {
	return func(rw http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil {
			w.dashboardWith(rw, r, http.StatusBadRequest, "", err.Error())
			return
		}
		msg, err := fn(r.Context(), r)
		if err != nil {
			w.dashboardWith(rw, r, statusOf(err), "", err.Error())
			return
		}
		back := r.PostFormValue("back")
		if !strings.HasPrefix(back, "/sandbox") || strings.HasPrefix(back, "//") {
			back = "/sandbox"
		}
		http.Redirect(rw, r, back+"?msg="+url.QueryEscape(msg), http.StatusSeeOther)
	}
}

type checkoutPage struct {
	View      CheckoutView
	Cards     []TestCard
	Error     string
	Card      string
	ExpiresIn string
}

func (w *Web) checkoutPage(rw http.ResponseWriter, r *http.Request) {
	w.showCheckout(rw, r, http.StatusOK, "", "")
}

func (w *Web) showCheckout(rw http.ResponseWriter, r *http.Request, status int, errText, card string) {
	v, err := w.opts.Account.Checkout(r.Context(), r.PathValue("id"))
	if err != nil {
		w.notFoundOr(rw, "Checkout Session", err)
		return
	}
	if errText == "" {
		errText = v.LastError
	}
	w.render(rw, status, "checkout.html", checkoutPage{View: v, Cards: TestCards, Error: errText, Card: card,
		ExpiresIn: time.Until(v.ExpiresAt).Round(time.Minute).String()})
}

func (w *Web) pay(rw http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		w.showCheckout(rw, r, http.StatusBadRequest, err.Error(), "")
		return
	}
	card := r.PostFormValue("card")
	res, err := w.opts.Account.Pay(r.Context(), r.PathValue("id"), card, strings.TrimSpace(r.PostFormValue("email")))
	w.afterPayment(rw, r, res, err, card)
}

func (w *Web) authenticate(rw http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		w.showCheckout(rw, r, http.StatusBadRequest, err.Error(), "")
		return
	}
	result := r.PostFormValue("result")
	if result != "approve" && result != "fail" {
		w.showCheckout(rw, r, http.StatusBadRequest, "result must be approve or fail", "")
		return
	}
	res, err := w.opts.Account.Authenticate(r.Context(), r.PathValue("id"), result == "approve")
	w.afterPayment(rw, r, res, err, "")
}

func (w *Web) afterPayment(rw http.ResponseWriter, r *http.Request, res PayResult, err error, card string) {
	switch {
	case err != nil:
		// The buyer may have posted again after an answer they never saw
		// (a second click, a dropped connection, a commit whose answer was
		// lost): Stripe's hosted page sends a paid session's buyer on to
		// the merchant, and so does this one, with nothing paid twice.
		if to, ok := w.paidAlready(r); ok {
			http.Redirect(rw, r, to, http.StatusSeeOther)
			return
		}
		w.showCheckout(rw, r, statusOf(err), err.Error(), card)
	case res.Outcome == CardSucceeds:
		http.Redirect(rw, r, res.RedirectURL, http.StatusSeeOther)
	case res.Outcome == CardDeclined:
		w.showCheckout(rw, r, http.StatusPaymentRequired, res.Message, card)
	default: // the authentication step
		w.showCheckout(rw, r, http.StatusOK, "", card)
	}
}

// paidAlready answers the success URL of the request's Checkout Session
// when it is complete (paid, or its card saved) and has one.
func (w *Web) paidAlready(r *http.Request) (string, bool) {
	v, err := w.opts.Account.Checkout(r.Context(), r.PathValue("id"))
	ok := err == nil && v.Status == "complete" && v.SuccessURL != ""
	return v.SuccessURL, ok
}

func (w *Web) cancel(rw http.ResponseWriter, r *http.Request) {
	v, err := w.opts.Account.Checkout(r.Context(), r.PathValue("id"))
	if err != nil {
		w.notFoundOr(rw, "Checkout Session", err)
		return
	}
	if v.CancelURL == "" {
		http.Redirect(rw, r, "/sandbox/checkout/"+url.PathEscape(v.ID), http.StatusSeeOther)
		return
	}
	http.Redirect(rw, r, v.CancelURL, http.StatusSeeOther)
}

func (w *Web) invoicePage(rw http.ResponseWriter, r *http.Request) {
	var inv map[string]any
	if err := w.opts.Account.view(r.Context(), func() { inv = w.opts.Account.objectCopy(r.PathValue("id")) }); err != nil {
		w.unavailable(rw, http.StatusInternalServerError, "", err)
		return
	}
	if inv == nil || str(inv, "object") != "invoice" {
		w.render(rw, http.StatusNotFound, "notfound.html", map[string]any{"What": "invoice", "Error": "No such invoice: " + r.PathValue("id")})
		return
	}
	w.render(rw, http.StatusOK, "invoice.html", map[string]any{"Invoice": inv, "Msg": r.URL.Query().Get("msg")})
}

// dashboardData is what the dashboard shows.
type dashboardData struct {
	Msg, Error    string
	Payments      []paymentRow
	Sessions      []map[string]any
	Invoices      []map[string]any
	Meters        []MeterView
	Deliveries    []deliveryRow
	Requests      []RecordedRequest
	PendingFaults int
	Webhook       string
	HasAPI        bool
	APIURL        string
}

type paymentRow struct {
	PI       map[string]any
	Charge   map[string]any
	Dispute  map[string]any
	Left     int64
	Metadata string
}

type deliveryRow struct {
	Event    EventRecord
	Attempts []Attempt
}

func (w *Web) dashboard(rw http.ResponseWriter, r *http.Request) {
	w.dashboardWith(rw, r, http.StatusOK, r.URL.Query().Get("msg"), "")
}

func (w *Web) dashboardWith(rw http.ResponseWriter, r *http.Request, status int, msg, errText string) {
	a := w.opts.Account
	d := dashboardData{Msg: msg, Error: errText, HasAPI: w.opts.API != nil, APIURL: w.opts.APIURL}
	if a.opts.Webhook != nil {
		d.Webhook = a.opts.Webhook.URL
	}
	// One read of the store's state: when it cannot be read (the database
	// is away after a refused commit), the page says so with a 5xx rather
	// than showing an account without payments.
	if err := a.view(r.Context(), func() { w.fillDashboard(&d) }); err != nil {
		w.unavailable(rw, max(status, http.StatusInternalServerError), errText, err)
		return
	}
	if w.opts.API != nil {
		reqs := w.opts.API.Requests()
		for i := len(reqs) - 1; i >= 0 && len(d.Requests) < 30; i-- {
			d.Requests = append(d.Requests, reqs[i])
		}
		d.PendingFaults = w.opts.API.PendingFaults()
	}
	w.render(rw, status, "dashboard.html", d)
}

// fillDashboard reads the account's part of the dashboard (a.mu held).
func (w *Web) fillDashboard(d *dashboardData) {
	a := w.opts.Account
	d.Meters = a.meterViews()
	pis := a.objectsCopy("payment_intent")
	for i := len(pis) - 1; i >= 0; i-- {
		pi := pis[i]
		row := paymentRow{PI: pi, Charge: a.objectCopy(str(pi, "latest_charge"))}
		if row.Charge != nil {
			row.Left = num(row.Charge, "amount") - num(row.Charge, "amount_refunded")
		}
		meta := sub(pi, "metadata")
		var parts []string
		for _, k := range sortedKeys(meta) {
			parts = append(parts, k+"="+fmt.Sprint(meta[k]))
		}
		row.Metadata = strings.Join(parts, " ")
		d.Payments = append(d.Payments, row)
	}
	for _, dp := range a.objectsCopy("dispute") {
		for i := range d.Payments {
			if str(d.Payments[i].PI, "id") == str(dp, "payment_intent") {
				d.Payments[i].Dispute = dp
			}
		}
	}
	sessions := a.objectsCopy("checkout.session")
	for i := len(sessions) - 1; i >= 0 && len(d.Sessions) < 50; i-- {
		d.Sessions = append(d.Sessions, sessions[i])
	}
	invoices := a.objectsCopy("invoice")
	for i := len(invoices) - 1; i >= 0; i-- {
		d.Invoices = append(d.Invoices, invoices[i])
	}
	events := a.eventRecords()
	byEvent := map[string][]Attempt{}
	for _, at := range a.attempts {
		byEvent[at.EventID] = append(byEvent[at.EventID], at)
	}
	for i := len(events) - 1; i >= 0 && len(d.Deliveries) < 100; i-- {
		d.Deliveries = append(d.Deliveries, deliveryRow{Event: events[i], Attempts: byEvent[events[i].ID]})
	}
}

// jsonAnswer writes v as JSON with status.
func jsonAnswer(rw http.ResponseWriter, status int, v any) {
	rw.Header().Set("Content-Type", "application/json")
	rw.WriteHeader(status)
	_ = json.NewEncoder(rw).Encode(v)
}
