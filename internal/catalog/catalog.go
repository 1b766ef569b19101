// Package catalog is what a client can buy: credit packs, one-time products
// and metered plans, with their prices and credit counts, and the allow-list
// of URLs a checkout may send the buyer back to. It is domain data read once
// from the catalog file (TALLY_CATALOG_FILE), not a setting: clients name an
// item by id, and amounts and credit counts come only from here.
//
// The package imports nothing of tally's, so every capability may use it.
package catalog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Catalog names everything a client can buy and where a checkout may send the
// buyer back to. Clients name an item by id; amounts and credit counts come
// only from here.
type Catalog struct {
	// RedirectURLPrefixes is the allow-list for checkout success and cancel URLs.
	RedirectURLPrefixes []string
	CreditPacks         []CreditPack
	Products            []Product
	Plans               []Plan
}

// CreditPack is a one-time purchase that grants credits.
type CreditPack struct {
	ID       string
	Name     string
	Amount   int64 // minor units of Currency
	Currency string
	Credits  int64
	// Expiry is how long purchased credits stay spendable: DefaultExpiryMonths
	// calendar months unless the pack says otherwise.
	Expiry Expiry
	// Invoice and ConfirmOn are the pack's own settings (see ItemSettings).
	ItemSettings
}

// ItemSettings are what one pack or product may set for itself rather than
// follow the global setting.
type ItemSettings struct {
	// Invoice says whether a Checkout of the item asks Stripe for an
	// invoice; nil follows TALLY_CHECKOUT_INVOICE_CREATION.
	Invoice *bool
	// ConfirmOn is the confirmation strategy new Checkout payments of the
	// item are created under (payment_intent or checkout_session); empty
	// follows TALLY_CONFIRM_ON. Payments keep the strategy they were
	// created under, so changing it moves only new payments.
	ConfirmOn string
}

// DefaultExpiryMonths is how many calendar months credits bought with a
// pack that does not set expires_after stay spendable.
const DefaultExpiryMonths = 12

// Expiry is how long bought credits stay spendable: Months calendar months,
// or a fixed Duration, or (both zero) forever. At most one is set.
type Expiry struct {
	Months   int
	Duration time.Duration
}

// Never reports whether credits under e never expire.
func (e Expiry) Never() bool { return e.Months == 0 && e.Duration == 0 }

// After returns when credits granted at t expire, nil for never. Calendar
// months are counted in UTC and land on the same day of the month, or on
// the month's last day when it is shorter (January 31 + 1 month is the end
// of February), as Stripe counts billing months.
func (e Expiry) After(t time.Time) *time.Time {
	switch {
	case e.Months > 0:
		t = t.UTC()
		first := time.Date(t.Year(), t.Month(), 1, t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.UTC).AddDate(0, e.Months, 0)
		lastDay := time.Date(first.Year(), first.Month()+1, 0, 0, 0, 0, 0, time.UTC).Day()
		at := first.AddDate(0, 0, min(t.Day(), lastDay)-1)
		return &at
	case e.Duration > 0:
		at := t.Add(e.Duration)
		return &at
	}
	return nil
}

// String is e as a catalog's expires_after says it: "12mo", "720h0m0s" or "never".
func (e Expiry) String() string {
	switch {
	case e.Months > 0:
		return strconv.Itoa(e.Months) + "mo"
	case e.Duration > 0:
		return e.Duration.String()
	}
	return "never"
}

// parseExpiry reads a pack's expires_after: empty for the default, "never"
// or 0 for never, "<n>mo" for n calendar months, or a Go duration.
func parseExpiry(s string) (Expiry, error) {
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return Expiry{Months: DefaultExpiryMonths}, nil
	case strings.EqualFold(s, "never"):
		return Expiry{}, nil
	case strings.HasSuffix(s, "mo"):
		n, err := strconv.Atoi(strings.TrimSuffix(s, "mo"))
		if err != nil || n < 1 || n > 1200 {
			return Expiry{}, fmt.Errorf("%q is not a whole number of months from 1 to 1200 (example: 12mo)", s)
		}
		return Expiry{Months: n}, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return Expiry{}, fmt.Errorf("%q is not never, a number of calendar months (12mo) or a duration (720h)", s)
	}
	if d < 0 {
		return Expiry{}, fmt.Errorf("%q must not be negative (use never, or 0, for credits that never expire)", s)
	}
	return Expiry{Duration: d}, nil
}

// Product is a one-time purchase without credits.
type Product struct {
	ID       string
	Name     string
	Amount   int64 // minor units of Currency
	Currency string
	ItemSettings
}

// Plan is a metered subscription: a Stripe metered price and the meter whose
// events bill it.
type Plan struct {
	ID            string
	Name          string
	StripePrice   string
	Meter         string // the meter event name
	StripeMeterID string
	// Delivery is DeliveryLive (the default: events are sent to Stripe) or
	// DeliveryShadow (events are stored and counted, never sent), for
	// running beside a legacy usage system before switching to tally.
	Delivery string
	// LiveFrom, when set, is the cut-over: events timestamped before it
	// are stored and never sent (the legacy system bills them).
	LiveFrom *time.Time
	// LiveFromNextPeriod sets each customer's cut-over to the start of
	// their next Stripe billing period (their subscription to StripePrice),
	// decided once per customer.
	LiveFromNextPeriod bool
}

// Plan delivery modes (plans[].delivery).
const (
	DeliveryLive   = "live"
	DeliveryShadow = "shadow"
)

// LiveFromNextPeriod is how plans[].live_from names the cut-over at each
// customer's next billing period.
const LiveFromNextPeriod = "next_period"

// Shadow reports whether the plan's events are stored and never sent.
func (p Plan) Shadow() bool { return p.Delivery == DeliveryShadow }

// LiveFromText is live_from as the catalog says it: "" (always live), an
// RFC 3339 time or next_period.
func (p Plan) LiveFromText() string {
	switch {
	case p.LiveFromNextPeriod:
		return LiveFromNextPeriod
	case p.LiveFrom != nil:
		return p.LiveFrom.UTC().Format(time.RFC3339)
	}
	return ""
}

// The confirmation strategies an item's confirm_on may name (the values of
// TALLY_CONFIRM_ON; catalog imports nothing of tally's, so they are
// spelled here too).
const (
	ConfirmOnPaymentIntent   = "payment_intent"
	ConfirmOnCheckoutSession = "checkout_session"
)

// MaxChargeMinorUnits is the largest amount in minor units that Stripe
// charges in one payment (99,999,999, e.g. $999,999.99): the most a catalog
// item costs, and the most one checkout of several units may cost.
const MaxChargeMinorUnits = 99_999_999

// MaxCreditsPerMove is the most credits one movement of a wallet carries: a
// grant, a consume or a revoke (the API's bound on their amount). A pack
// beyond it could take money and never grant it, so it is refused at load,
// and a checkout of several packs beyond it is refused before Stripe is
// called.
const MaxCreditsPerMove = 1_000_000_000_000

var (
	catalogIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,63}$`)
	currencyPattern  = regexp.MustCompile(`^[a-z]{3}$`)
)

// The YAML shape of the catalog file (deploy/catalog.example.yaml shows every
// field); kept apart from the domain types so the file format can change without touching callers.
type catalogDoc struct {
	RedirectURLPrefixes []string        `yaml:"redirect_url_prefixes"`
	CreditPacks         []creditPackDoc `yaml:"credit_packs"`
	Products            []productDoc    `yaml:"products"`
	Plans               []planDoc       `yaml:"plans"`
}

type creditPackDoc struct {
	ID           string  `yaml:"id"`
	Name         string  `yaml:"name"`
	Amount       yamlInt `yaml:"amount"`
	Currency     string  `yaml:"currency"`
	Credits      yamlInt `yaml:"credits"`
	ExpiresAfter string  `yaml:"expires_after"`
	Invoice      *bool   `yaml:"invoice"`
	ConfirmOn    string  `yaml:"confirm_on"`
}

type productDoc struct {
	ID        string  `yaml:"id"`
	Name      string  `yaml:"name"`
	Amount    yamlInt `yaml:"amount"`
	Currency  string  `yaml:"currency"`
	Invoice   *bool   `yaml:"invoice"`
	ConfirmOn string  `yaml:"confirm_on"`
}

// yamlInt refuses anything but a YAML integer: yaml.v3 would otherwise
// truncate "amount: 10.5" to 10, silently changing a price.
type yamlInt int64

func (n *yamlInt) UnmarshalYAML(node *yaml.Node) error {
	if node.Kind != yaml.ScalarNode || node.ShortTag() != "!!int" {
		return fmt.Errorf("line %d: %q is not an integer", node.Line, node.Value)
	}
	var v int64
	if err := node.Decode(&v); err != nil {
		return err
	}
	*n = yamlInt(v)
	return nil
}

type planDoc struct {
	ID            string `yaml:"id"`
	Name          string `yaml:"name"`
	StripePrice   string `yaml:"stripe_price"`
	Meter         string `yaml:"meter"`
	StripeMeterID string `yaml:"stripe_meter_id"`
	Delivery      string `yaml:"delivery"`
	LiveFrom      string `yaml:"live_from"`
}

// Load reads and validates the catalog file at path.
func Load(path string) (Catalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Catalog{}, err
	}
	c, err := Parse(data)
	if err != nil {
		return Catalog{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Parse decodes a catalog YAML document strictly (unknown fields are
// errors) and validates it, reporting every problem at once. An empty
// document is an empty catalog.
func Parse(data []byte) (Catalog, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var doc catalogDoc
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return Catalog{}, nil
		}
		return Catalog{}, fmt.Errorf("catalog: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return Catalog{}, errors.New("catalog: want exactly one YAML document")
	}

	var problems []error
	c := Catalog{RedirectURLPrefixes: doc.RedirectURLPrefixes}
	for i, p := range doc.CreditPacks {
		exp, err := parseExpiry(p.ExpiresAfter)
		if err != nil {
			problems = append(problems, fmt.Errorf("credit_packs[%d].expires_after: %v", i, err))
		}
		c.CreditPacks = append(c.CreditPacks, CreditPack{
			ID: p.ID, Name: p.Name, Amount: int64(p.Amount), Currency: p.Currency,
			Credits: int64(p.Credits), Expiry: exp, ItemSettings: ItemSettings{Invoice: p.Invoice, ConfirmOn: p.ConfirmOn},
		})
	}
	for _, p := range doc.Products {
		c.Products = append(c.Products, Product{ID: p.ID, Name: p.Name, Amount: int64(p.Amount), Currency: p.Currency,
			ItemSettings: ItemSettings{Invoice: p.Invoice, ConfirmOn: p.ConfirmOn}})
	}
	for i, p := range doc.Plans {
		plan := Plan{ID: p.ID, Name: p.Name, StripePrice: p.StripePrice, Meter: p.Meter, StripeMeterID: p.StripeMeterID,
			Delivery: strings.TrimSpace(p.Delivery)}
		if plan.Delivery == "" {
			plan.Delivery = DeliveryLive
		}
		switch lf := strings.TrimSpace(p.LiveFrom); {
		case lf == "":
		case lf == LiveFromNextPeriod:
			plan.LiveFromNextPeriod = true
		default:
			t, err := time.Parse(time.RFC3339, lf)
			if err != nil {
				problems = append(problems, fmt.Errorf("plans[%d].live_from: %q is neither an RFC 3339 time nor %s", i, lf, LiveFromNextPeriod))
				break
			}
			t = t.UTC()
			plan.LiveFrom = &t
		}
		c.Plans = append(c.Plans, plan)
	}
	if err := c.Validate(); err != nil {
		problems = append(problems, err)
	}
	if err := errors.Join(problems...); err != nil {
		return Catalog{}, err
	}
	return c, nil
}

// Validate checks every item and prefix and returns one error per problem.
func (c Catalog) Validate() error {
	var problems []error
	bad := func(where, format string, args ...any) {
		problems = append(problems, fmt.Errorf("%s: %s", where, fmt.Sprintf(format, args...)))
	}
	ids := map[string]string{}
	checkID := func(where, id string) {
		if !catalogIDPattern.MatchString(id) {
			bad(where+".id", "%q must match %s", id, catalogIDPattern)
			return
		}
		if first, dup := ids[id]; dup {
			bad(where+".id", "%q is already used by %s", id, first)
			return
		}
		ids[id] = where
	}
	checkName := func(where, name string) {
		if strings.TrimSpace(name) == "" {
			bad(where+".name", "must not be empty")
		}
	}
	checkMoney := func(where string, amount int64, currency string) {
		if amount <= 0 || amount > MaxChargeMinorUnits {
			bad(where+".amount", "must be between 1 and %d minor units, got %d", MaxChargeMinorUnits, amount)
		}
		if !currencyPattern.MatchString(currency) {
			bad(where+".currency", "%q must be a three-letter lowercase ISO code such as usd", currency)
		}
	}

	for i, p := range c.RedirectURLPrefixes {
		if _, err := parsePrefix(p); err != nil {
			bad(fmt.Sprintf("redirect_url_prefixes[%d]", i), "%q: %v", p, err)
		}
	}
	checkSettings := func(where string, st ItemSettings) {
		if st.ConfirmOn != "" && st.ConfirmOn != ConfirmOnPaymentIntent && st.ConfirmOn != ConfirmOnCheckoutSession {
			bad(where+".confirm_on", "%q is not %s or %s", st.ConfirmOn, ConfirmOnPaymentIntent, ConfirmOnCheckoutSession)
		}
	}
	for i, p := range c.CreditPacks {
		where := fmt.Sprintf("credit_packs[%d]", i)
		checkSettings(where, p.ItemSettings)
		checkID(where, p.ID)
		checkName(where, p.Name)
		checkMoney(where, p.Amount, p.Currency)
		if p.Credits <= 0 || p.Credits > MaxCreditsPerMove {
			bad(where+".credits", "must be between 1 and %d (the largest grant), got %d", int64(MaxCreditsPerMove), p.Credits)
		}
		if e := p.Expiry; e.Months < 0 || e.Duration < 0 || (e.Months > 0 && e.Duration > 0) {
			bad(where+".expires_after", "must be never, a positive number of months or a positive duration, got %+v", e)
		}
	}
	for i, p := range c.Products {
		where := fmt.Sprintf("products[%d]", i)
		checkSettings(where, p.ItemSettings)
		checkID(where, p.ID)
		checkName(where, p.Name)
		checkMoney(where, p.Amount, p.Currency)
	}
	meters := map[string]string{}
	for i, p := range c.Plans {
		where := fmt.Sprintf("plans[%d]", i)
		checkID(where, p.ID)
		checkName(where, p.Name)
		if strings.TrimSpace(p.StripePrice) == "" {
			bad(where+".stripe_price", "must not be empty")
		}
		if strings.TrimSpace(p.StripeMeterID) == "" {
			bad(where+".stripe_meter_id", "must not be empty")
		}
		if p.Delivery != "" && p.Delivery != DeliveryLive && p.Delivery != DeliveryShadow {
			bad(where+".delivery", "%q must be %s or %s", p.Delivery, DeliveryLive, DeliveryShadow)
		}
		if p.LiveFrom != nil && p.LiveFromNextPeriod {
			bad(where+".live_from", "is either a time or %s, not both", LiveFromNextPeriod)
		}
		switch first, dup := meters[p.Meter]; {
		case strings.TrimSpace(p.Meter) == "":
			bad(where+".meter", "must not be empty")
		case dup:
			bad(where+".meter", "%q is already billed by %s", p.Meter, first)
		default:
			meters[p.Meter] = where
		}
	}
	return errors.Join(problems...)
}

// Pack returns the credit pack with id.
func (c Catalog) Pack(id string) (CreditPack, bool) {
	for _, p := range c.CreditPacks {
		if p.ID == id {
			return p, true
		}
	}
	return CreditPack{}, false
}

// Product returns the one-time product with id.
func (c Catalog) Product(id string) (Product, bool) {
	for _, p := range c.Products {
		if p.ID == id {
			return p, true
		}
	}
	return Product{}, false
}

// Plan returns the metered plan with id.
func (c Catalog) Plan(id string) (Plan, bool) {
	for _, p := range c.Plans {
		if p.ID == id {
			return p, true
		}
	}
	return Plan{}, false
}

// PlanByMeter returns the plan billed by the meter event name meter.
func (c Catalog) PlanByMeter(meter string) (Plan, bool) {
	for _, p := range c.Plans {
		if p.Meter == meter {
			return p, true
		}
	}
	return Plan{}, false
}

// maxRedirectURLLen bounds what we parse; Stripe refuses longer URLs anyway.
const maxRedirectURLLen = 5000

// RedirectAllowed reports whether rawURL is an absolute http(s) URL under one
// of the configured prefixes. The comparison is on parsed parts, not strings:
// scheme and host (with its port) must be equal, so neither userinfo
// (https://app.example.com@evil.com/) nor a longer host
// (https://app.example.com.evil.com/) passes, and a prefix path without a
// trailing slash only matches whole segments (/billing matches /billing/x, not
// /billing-evil). URLs with dot segments, backslashes, whitespace or control
// characters are refused because browsers resolve them differently than we
// compare them.
func (c Catalog) RedirectAllowed(rawURL string) bool {
	u, err := parseRedirectURL(rawURL)
	if err != nil {
		return false
	}
	for _, raw := range c.RedirectURLPrefixes {
		p, err := parsePrefix(raw)
		if err != nil {
			continue
		}
		if p.matches(u) {
			return true
		}
	}
	return false
}

type urlPrefix struct {
	scheme, host, port, path string
}

func (p urlPrefix) matches(u *url.URL) bool {
	if u.Scheme != p.scheme || !strings.EqualFold(u.Hostname(), p.host) || portOf(u) != p.port {
		return false
	}
	path := u.Path
	if path == "" {
		path = "/"
	}
	if !strings.HasPrefix(path, p.path) {
		return false
	}
	return len(path) == len(p.path) || strings.HasSuffix(p.path, "/") || path[len(p.path)] == '/'
}

func portOf(u *url.URL) string {
	if port := u.Port(); port != "" {
		return port
	}
	if u.Scheme == "https" {
		return "443"
	}
	return "80"
}

// checkURLText refuses what browsers and url.Parse read differently.
func checkURLText(raw string) error {
	if len(raw) > maxRedirectURLLen {
		return fmt.Errorf("longer than %d characters", maxRedirectURLLen)
	}
	for i := 0; i < len(raw); i++ {
		if b := raw[i]; b <= ' ' || b == 0x7f || b == '\\' {
			return errors.New("contains whitespace, a control character or a backslash")
		}
	}
	return nil
}

func parseHTTPURL(raw string) (*url.URL, error) {
	if err := checkURLText(raw); err != nil {
		return nil, err
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, errors.New("not a URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, errors.New("not an absolute http(s) URL")
	}
	if u.Opaque != "" || u.Hostname() == "" {
		return nil, errors.New("has no host")
	}
	if u.User != nil {
		return nil, errors.New("must not contain user information")
	}
	if u.Port() != "" && strings.Trim(u.Port(), "0123456789") != "" {
		return nil, errors.New("has a bad port")
	}
	for seg := range strings.SplitSeq(u.Path, "/") {
		if seg == "." || seg == ".." {
			return nil, errors.New("must not contain . or .. path segments")
		}
	}
	return u, nil
}

func parseRedirectURL(raw string) (*url.URL, error) { return parseHTTPURL(raw) }

func parsePrefix(raw string) (urlPrefix, error) {
	u, err := parseHTTPURL(raw)
	if err != nil {
		return urlPrefix{}, err
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return urlPrefix{}, errors.New("a prefix must not have a query or fragment")
	}
	path := u.Path
	if path == "" {
		path = "/"
	}
	return urlPrefix{scheme: u.Scheme, host: u.Hostname(), port: portOf(u), path: path}, nil
}
