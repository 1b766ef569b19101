package catalog

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

const goodCatalog = `
redirect_url_prefixes: ["https://app.example.com/", "http://localhost:3000/billing"]
credit_packs:
  - id: starter
    name: Starter pack
    amount: 1000
    currency: usd
    credits: 1000
    expires_after: 8760h
  - id: forever
    name: Forever pack
    amount: 99999999
    currency: eur
    credits: 5
products:
  - id: ebook
    name: The e-book
    amount: 1900
    currency: usd
plans:
  - id: api
    name: API usage
    stripe_price: price_123
    meter: api_calls
    stripe_meter_id: mtr_123
`

func TestParseGood(t *testing.T) {
	t.Parallel()
	c, err := Parse([]byte(goodCatalog))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := Catalog{
		RedirectURLPrefixes: []string{"https://app.example.com/", "http://localhost:3000/billing"},
		CreditPacks: []CreditPack{
			{ID: "starter", Name: "Starter pack", Amount: 1000, Currency: "usd", Credits: 1000, Expiry: Expiry{Duration: 8760 * time.Hour}},
			{ID: "forever", Name: "Forever pack", Amount: 99999999, Currency: "eur", Credits: 5, Expiry: Expiry{Months: DefaultExpiryMonths}},
		},
		Products: []Product{{ID: "ebook", Name: "The e-book", Amount: 1900, Currency: "usd"}},
		Plans:    []Plan{{ID: "api", Name: "API usage", StripePrice: "price_123", Meter: "api_calls", StripeMeterID: "mtr_123", Delivery: DeliveryLive}},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got  %+v\nwant %+v", c, want)
	}

	if p, ok := c.Pack("starter"); !ok || p.Credits != 1000 {
		t.Errorf("Pack(starter) = %+v, %v", p, ok)
	}
	if _, ok := c.Pack("ebook"); ok {
		t.Error("Pack found a product")
	}
	if p, ok := c.Product("ebook"); !ok || p.Amount != 1900 {
		t.Errorf("Product(ebook) = %+v, %v", p, ok)
	}
	if _, ok := c.Product("starter"); ok {
		t.Error("Product found a pack")
	}
	if p, ok := c.Plan("api"); !ok || p.Meter != "api_calls" {
		t.Errorf("Plan(api) = %+v, %v", p, ok)
	}
	if p, ok := c.PlanByMeter("api_calls"); !ok || p.ID != "api" {
		t.Errorf("PlanByMeter(api_calls) = %+v, %v", p, ok)
	}
	if _, ok := c.PlanByMeter("api"); ok {
		t.Error("PlanByMeter matched a plan id")
	}
}

func TestParseEmptyAndZeroExpiry(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{"", "\n# nothing yet\n", "{}"} {
		c, err := Parse([]byte(doc))
		if err != nil {
			t.Fatalf("Parse(%q): %v", doc, err)
		}
		if !reflect.DeepEqual(c, Catalog{}) {
			t.Fatalf("Parse(%q) = %+v, want empty", doc, c)
		}
	}
}

// A pack says how long its credits last: omitted, 12 calendar months; a
// number of calendar months; a fixed duration; or never (never, 0).
func TestParsePackExpiry(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		field string
		want  Expiry
	}{
		{"", Expiry{Months: 12}},
		{"expires_after: null", Expiry{Months: 12}},
		{"expires_after: never", Expiry{}},
		{"expires_after: Never", Expiry{}},
		{"expires_after: 0", Expiry{}},
		{"expires_after: 0s", Expiry{}},
		{"expires_after: 6mo", Expiry{Months: 6}},
		{"expires_after: 24mo", Expiry{Months: 24}},
		{"expires_after: 720h", Expiry{Duration: 720 * time.Hour}},
	} {
		doc := "credit_packs:\n- {id: a, name: A, amount: 1, currency: usd, credits: 1"
		if c.field != "" {
			doc += ", " + c.field
		}
		doc += "}\n"
		cat, err := Parse([]byte(doc))
		if err != nil {
			t.Fatalf("%q: %v", c.field, err)
		}
		if got := cat.CreditPacks[0].Expiry; got != c.want {
			t.Errorf("%q: expiry %+v, want %+v", c.field, got, c.want)
		}
	}
	for _, bad := range []string{"0mo", "-1mo", "1.5mo", "mo", "-1h", "365d", "soon", "12 months"} {
		_, err := Parse([]byte("credit_packs:\n- {id: a, name: A, amount: 1, currency: usd, credits: 1, expires_after: '" + bad + "'}\n"))
		if err == nil || !strings.Contains(err.Error(), "credit_packs[0].expires_after") {
			t.Errorf("expires_after %q: %v, want a refusal naming credit_packs[0].expires_after", bad, err)
		}
	}
}

// Calendar months end on the same day of the month, or on the month's last
// day when it has no such day; durations are exact; never is nil.
func TestExpiryAfter(t *testing.T) {
	t.Parallel()
	at := func(s string) time.Time {
		t.Helper()
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, c := range []struct {
		expiry Expiry
		from   string
		want   string // "" for never
	}{
		{Expiry{Months: 12}, "2026-03-15T10:30:00Z", "2027-03-15T10:30:00Z"},
		{Expiry{Months: 12}, "2028-02-29T23:00:00Z", "2029-02-28T23:00:00Z"},
		{Expiry{Months: 1}, "2027-01-31T08:00:00Z", "2027-02-28T08:00:00Z"},
		{Expiry{Months: 1}, "2028-01-31T08:00:00Z", "2028-02-29T08:00:00Z"},
		{Expiry{Months: 13}, "2026-11-30T00:00:00Z", "2027-12-30T00:00:00Z"},
		{Expiry{Months: 12}, "2026-06-01T01:00:00+02:00", "2027-05-31T23:00:00Z"},
		{Expiry{Duration: 90 * time.Minute}, "2026-03-15T10:30:00Z", "2026-03-15T12:00:00Z"},
		{Expiry{}, "2026-03-15T10:30:00Z", ""},
	} {
		got := c.expiry.After(at(c.from))
		switch {
		case c.want == "" && got != nil:
			t.Errorf("%+v after %s = %s, want never", c.expiry, c.from, got)
		case c.want != "" && (got == nil || !got.Equal(at(c.want))):
			t.Errorf("%+v after %s = %v, want %s", c.expiry, c.from, got, c.want)
		}
	}
}

// A pack of exactly the largest grant loads; one credit more would take the
// money and then never be granted, so it is refused at load.
func TestParseLargestPack(t *testing.T) {
	t.Parallel()
	c, err := Parse([]byte("credit_packs:\n- {id: a, name: A, amount: 1, currency: usd, credits: 1000000000000}\n"))
	if err != nil {
		t.Fatalf("a pack of the largest grant: %v", err)
	}
	if c.CreditPacks[0].Credits != MaxCreditsPerMove {
		t.Fatalf("credits = %d, want %d", c.CreditPacks[0].Credits, int64(MaxCreditsPerMove))
	}
	_, err = Parse([]byte("credit_packs:\n- {id: a, name: A, amount: 1, currency: usd, credits: 1000000000001}\n"))
	if err == nil || !strings.Contains(err.Error(), "credit_packs[0].credits") || !strings.Contains(err.Error(), "1000000000000") {
		t.Fatalf("a pack beyond the largest grant: %v, want a refusal naming the limit", err)
	}
}

func TestDeployExampleCatalogParses(t *testing.T) {
	t.Parallel()
	c, err := Load("../../deploy/catalog.example.yaml")
	if err != nil {
		t.Fatalf("deploy/catalog.example.yaml: %v", err)
	}
	if len(c.CreditPacks) != 2 || len(c.Products) != 1 || len(c.Plans) != 1 {
		t.Fatalf("example catalog has %d packs, %d products, %d plans; want 2, 1, 1", len(c.CreditPacks), len(c.Products), len(c.Plans))
	}
	if p, ok := c.Pack("starter"); !ok || p.Amount != 1000 || p.Credits != 1000 || p.Expiry != (Expiry{Months: DefaultExpiryMonths}) {
		t.Fatalf("starter pack = %+v, want the default expiry", p)
	}
	if p, ok := c.Pack("pro"); !ok || p.Amount != 5000 || p.Credits != 6000 || !p.Expiry.Never() {
		t.Fatalf("pro pack = %+v, want one that never expires", p)
	}
	if !c.RedirectAllowed("http://localhost:3000/done") || !c.RedirectAllowed("https://app.example.com/billing/ok") {
		t.Fatal("example prefixes do not allow their own URLs")
	}
}

func TestParseRejects(t *testing.T) {
	t.Parallel()
	pack := func(fields string) string {
		base := map[string]string{"id": "p", "name": "P", "amount": "100", "currency": "usd", "credits": "10"}
		for _, kv := range strings.Split(fields, ";") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				if v == "DEL" {
					delete(base, k)
				} else {
					base[k] = v
				}
			}
		}
		var b strings.Builder
		b.WriteString("credit_packs:\n  -")
		for _, k := range []string{"id", "name", "amount", "currency", "credits", "expires_after"} {
			if v, ok := base[k]; ok {
				b.WriteString(" " + k + ": " + v + "\n   ")
			}
		}
		return b.String()
	}
	cases := []struct {
		name, doc, want string
	}{
		{"unknown top-level field", "packs: []\n", "field packs not found"},
		{"unknown item field", pack("") + " price: 3\n", "field price not found"},
		{"not yaml", "credit_packs: [\n", "catalog"},
		{"two documents", "products: []\n---\nplans: []\n", "one YAML document"},
		{"id uppercase", pack("id=Starter"), "credit_packs[0].id"},
		{"id empty", pack("id=DEL"), "credit_packs[0].id"},
		{"id too long", pack("id=" + strings.Repeat("a", 65)), "credit_packs[0].id"},
		{"id leading dash", pack("id=-a"), "credit_packs[0].id"},
		{"name empty", pack("name=\"  \""), "credit_packs[0].name"},
		{"amount zero", pack("amount=0"), "credit_packs[0].amount"},
		{"amount negative", pack("amount=-1"), "credit_packs[0].amount"},
		{"amount too big", pack("amount=100000000"), "credit_packs[0].amount"},
		{"amount not integer", pack("amount=10.5"), "not an integer"},
		{"amount quoted", pack("amount='100'"), "not an integer"},
		{"credits float", pack("credits=1e3"), "not an integer"},
		{"amount overflow", pack("amount=9223372036854775808"), "catalog"},
		{"currency upper", pack("currency=USD"), "credit_packs[0].currency"},
		{"currency long", pack("currency=usdd"), "credit_packs[0].currency"},
		{"credits zero", pack("credits=0"), "credit_packs[0].credits"},
		{"credits negative", pack("credits=-10"), "credit_packs[0].credits"},
		{"credits beyond the largest grant", pack("credits=1000000000001"), "credit_packs[0].credits"},
		{"expiry negative", pack("expires_after=-1h"), "credit_packs[0].expires_after"},
		{"expiry no months", pack("expires_after=0mo"), "credit_packs[0].expires_after"},
		{"expiry days", pack("expires_after=365d"), "credit_packs[0].expires_after"},
		{"product amount", "products:\n- {id: e, name: E, amount: 0, currency: usd}\n", "products[0].amount"},
		{"product currency", "products:\n- {id: e, name: E, amount: 5, currency: ''}\n", "products[0].currency"},
		{"plan missing price", "plans:\n- {id: a, name: A, meter: m, stripe_meter_id: mtr}\n", "plans[0].stripe_price"},
		{"plan missing meter", "plans:\n- {id: a, name: A, stripe_price: p, stripe_meter_id: mtr}\n", "plans[0].meter"},
		{"plan missing meter id", "plans:\n- {id: a, name: A, stripe_price: p, meter: m}\n", "plans[0].stripe_meter_id"},
		{"plan missing name", "plans:\n- {id: a, stripe_price: p, meter: m, stripe_meter_id: mtr}\n", "plans[0].name"},
		{"duplicate meter", "plans:\n- {id: a, name: A, stripe_price: p, meter: m, stripe_meter_id: x}\n- {id: b, name: B, stripe_price: p, meter: m, stripe_meter_id: y}\n", "plans[1].meter"},
		{"duplicate id across kinds", pack("id=same") + "\nproducts:\n- {id: same, name: E, amount: 5, currency: usd}\n", "products[0].id"},
		{"duplicate key", "products:\n- {id: a, id: b, name: E, amount: 5, currency: usd}\n", "already defined"},
		{"prefix relative", "redirect_url_prefixes: [/return]\n", "redirect_url_prefixes[0]"},
		{"prefix ftp", "redirect_url_prefixes: ['ftp://example.com/']\n", "redirect_url_prefixes[0]"},
		{"prefix userinfo", "redirect_url_prefixes: ['https://u@example.com/']\n", "redirect_url_prefixes[0]"},
		{"prefix query", "redirect_url_prefixes: ['https://example.com/?a=b']\n", "redirect_url_prefixes[0]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.doc))
			if err == nil {
				t.Fatalf("accepted:\n%s\n=> %+v", tc.doc, c)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q\ndoc:\n%s", err, tc.want, tc.doc)
			}
		})
	}
}

func TestParseReportsEveryProblem(t *testing.T) {
	t.Parallel()
	doc := `
redirect_url_prefixes: [nope]
credit_packs:
  - {id: A, name: "", amount: 0, currency: US, credits: 0, expires_after: soon}
plans:
  - {id: a, name: A}
`
	_, err := Parse([]byte(doc))
	if err == nil {
		t.Fatal("accepted a broken catalog")
	}
	for _, want := range []string{
		"redirect_url_prefixes[0]", "credit_packs[0].id", "credit_packs[0].name", "credit_packs[0].amount",
		"credit_packs[0].currency", "credit_packs[0].credits", "credit_packs[0].expires_after",
		"plans[0].stripe_price", "plans[0].meter", "plans[0].stripe_meter_id",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %s in:\n%v", want, err)
		}
	}
}

func TestRedirectAllowed(t *testing.T) {
	t.Parallel()
	c := Catalog{RedirectURLPrefixes: []string{
		"https://app.example.com",          // host only
		"http://localhost:3000/",           // host with port
		"https://shop.example.org/billing", // path without trailing slash
	}}
	cases := []struct {
		url  string
		want bool
	}{
		{"https://app.example.com/", true},
		{"https://app.example.com", true},
		{"https://app.example.com/checkout/done?session_id={CHECKOUT_SESSION_ID}", true},
		{"https://APP.Example.com/x", true},
		{"HTTPS://app.example.com/x", true},
		{"https://app.example.com:443/x", true},
		{"https://app.example.com/#frag", true},
		{"http://localhost:3000/cancel", true},
		{"https://shop.example.org/billing", true},
		{"https://shop.example.org/billing/", true},
		{"https://shop.example.org/billing/ok?x=1", true},
		{"https://shop.example.org/billing?x=1", true},

		// scheme, port and host must match exactly
		{"http://app.example.com/", false},
		{"https://app.example.com:8443/", false},
		{"http://localhost:3001/", false},
		{"http://localhost/", false},
		{"https://evil.com/", false},
		// userinfo tricks
		{"https://app.example.com@evil.com/", false},
		{"https://app.example.com:443@evil.com/", false},
		{"https://user:pw@app.example.com/", false},
		{"https://evil.com\\@app.example.com/", false},
		{"https://app.example.com\\.evil.com/", false},
		// host prefix tricks
		{"https://app.example.com.evil.com/", false},
		{"https://app.example.comevil.com/", false},
		{"https://app.example.com./", false},
		// path prefix and traversal tricks
		{"https://shop.example.org/billing-evil", false},
		{"https://shop.example.org/billingx/", false},
		{"https://shop.example.org/billing/../admin", false},
		{"https://shop.example.org/billing/%2e%2e/admin", false},
		{"https://shop.example.org/", false},
		// not absolute http(s)
		{"//app.example.com/", false},
		{"/relative", false},
		{"javascript:alert(1)//https://app.example.com/", false},
		{"data:text/html,https://app.example.com/", false},
		{"ftp://app.example.com/", false},
		{"https:app.example.com/", false},
		{"https:///app.example.com/", false},
		{"", false},
		// whitespace and control characters
		{" https://app.example.com/", false},
		{"https://app.example.com/\n", false},
		{"https://app.example.com/a b", false},
		{"https://app.example.com\t.evil.com/", false},
		{"https://app.example.com/" + strings.Repeat("a", 5000), false},
	}
	for _, tc := range cases {
		if got := c.RedirectAllowed(tc.url); got != tc.want {
			t.Errorf("RedirectAllowed(%q) = %v, want %v", tc.url, got, tc.want)
		}
	}
	if (Catalog{}).RedirectAllowed("https://app.example.com/") {
		t.Error("an empty allow-list allowed a URL")
	}
}

// toDoc turns a Catalog back into its file form, for the round-trip property.
func toDoc(c Catalog) catalogDoc {
	var d catalogDoc
	d.RedirectURLPrefixes = c.RedirectURLPrefixes
	for _, p := range c.CreditPacks {
		exp := p.Expiry.String()
		d.CreditPacks = append(d.CreditPacks, creditPackDoc{p.ID, p.Name, yamlInt(p.Amount), p.Currency, yamlInt(p.Credits), exp, p.Invoice, p.ConfirmOn})
	}
	for _, p := range c.Products {
		d.Products = append(d.Products, productDoc{p.ID, p.Name, yamlInt(p.Amount), p.Currency, p.Invoice, p.ConfirmOn})
	}
	for _, p := range c.Plans {
		d.Plans = append(d.Plans, planDoc{p.ID, p.Name, p.StripePrice, p.Meter, p.StripeMeterID, p.Delivery, p.LiveFromText()})
	}
	return d
}

// FuzzParse: the parser never panics, whatever it accepts satisfies
// every rule, and an accepted catalog survives a write-and-read round trip.
func FuzzParse(f *testing.F) {
	f.Add([]byte(goodCatalog))
	f.Add([]byte(""))
	f.Add([]byte("credit_packs: [{id: a, name: A, amount: 1, currency: usd, credits: 1, expires_after: 1h30m}]"))
	f.Add([]byte("credit_packs: [{id: a, name: A, amount: 1, currency: usd, credits: 1, expires_after: 18mo}, {id: b, name: B, amount: 1, currency: usd, credits: 1, expires_after: never}]"))
	f.Add([]byte("redirect_url_prefixes: ['https://a.example/x', 'http://[::1]:8080/']"))
	f.Add([]byte("plans: [{id: p, name: P, stripe_price: price_1, meter: m, stripe_meter_id: mtr}]"))
	f.Add([]byte("products: [{id: e, name: E, amount: 99999999, currency: usd}, {id: e, name: F, amount: 1, currency: usd}]"))
	f.Add([]byte("credit_packs: [{id: a, amount: 9223372036854775807, credits: -9223372036854775808}]"))
	f.Add([]byte("&a [*a]"))
	f.Add([]byte("products: !!binary aGVsbG8="))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if !reflect.DeepEqual(c, Catalog{}) {
				t.Fatalf("error %v came with a non-empty catalog", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse accepted a catalog that does not validate: %v", err)
		}
		for _, p := range c.CreditPacks {
			if p.Amount <= 0 || p.Amount > MaxChargeMinorUnits || p.Credits <= 0 || p.Credits > MaxCreditsPerMove || p.Expiry.Months < 0 || p.Expiry.Duration < 0 || (p.Expiry.Months > 0 && p.Expiry.Duration > 0) {
				t.Fatalf("accepted pack %+v", p)
			}
		}
		out, err := yaml.Marshal(toDoc(c))
		if err != nil {
			t.Fatal(err)
		}
		again, err := Parse(out)
		if err != nil {
			t.Fatalf("round trip failed: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(normalize(c), normalize(again)) {
			t.Fatalf("round trip changed the catalog:\n%+v\n%+v", c, again)
		}
	})
}

// normalize makes nil and empty slices equal; YAML does not tell them apart.
func normalize(c Catalog) Catalog {
	if len(c.RedirectURLPrefixes) == 0 {
		c.RedirectURLPrefixes = nil
	}
	if len(c.CreditPacks) == 0 {
		c.CreditPacks = nil
	}
	if len(c.Products) == 0 {
		c.Products = nil
	}
	if len(c.Plans) == 0 {
		c.Plans = nil
	}
	return c
}
