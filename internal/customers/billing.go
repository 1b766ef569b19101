package customers

import (
	"encoding/json"
	"fmt"
	"net/mail"
	"regexp"
	"unicode"

	"github.com/tallybilling/tally/internal/errs"
	"github.com/tallybilling/tally/internal/text"
)

// Billing is what invoices show of a customer and what its Stripe
// Customer holds: all optional. InvoiceAlways asks Stripe for an invoice
// after every Checkout of the customer.
type Billing struct {
	Name          string
	Email         string
	Address       *Address
	TaxID         *TaxID
	InvoiceAlways bool
}

// Address is a postal address; Country is ISO 3166-1 alpha-2.
type Address struct {
	Line1, Line2, City, State, PostalCode, Country string
}

// TaxID is a tax id as Stripe types it (eu_vat, us_ein, ...).
type TaxID struct {
	Type, Value string
}

// billingDoc is Billing as the billing jsonb column stores it (without
// InvoiceAlways, which has its own column).
type billingDoc struct {
	Name    string      `json:"name,omitempty"`
	Email   string      `json:"email,omitempty"`
	Address *addressDoc `json:"address,omitempty"`
	TaxID   *taxIDDoc   `json:"tax_id,omitempty"`
}

type addressDoc struct {
	Line1      string `json:"line1,omitempty"`
	Line2      string `json:"line2,omitempty"`
	City       string `json:"city,omitempty"`
	State      string `json:"state,omitempty"`
	PostalCode string `json:"postal_code,omitempty"`
	Country    string `json:"country,omitempty"`
}

type taxIDDoc struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

var (
	countryPattern = regexp.MustCompile(`^[A-Z]{2}$`)
	taxTypePattern = regexp.MustCompile(`^[a-z]{2}_[a-z_]{2,10}$`)
)

// SingleLine reports whether s is printable text on one line (text.Check,
// and no control character at all): what invoices print and Stripe stores.
func SingleLine(s string) bool {
	if text.Check(s) != nil {
		return false
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// validate checks b as the API's schema does, for callers that bypass it,
// and that every field is one line of printable text: it is printed on
// invoices.
func (b Billing) validate() error {
	for field, v := range map[string]string{"name": b.Name, "email": b.Email} {
		if !SingleLine(v) || len(v) > 512 {
			return errs.InvalidField("/billing/"+field, field+" must be at most 512 characters of printable text on one line")
		}
	}
	if b.Email != "" {
		if a, err := mail.ParseAddress(b.Email); err != nil || a.Address != b.Email {
			return errs.InvalidField("/billing/email", "email must be a plain address like ap@example.com")
		}
	}
	if a := b.Address; a != nil {
		for field, v := range map[string]string{"line1": a.Line1, "line2": a.Line2, "city": a.City, "state": a.State, "postal_code": a.PostalCode} {
			if !SingleLine(v) || len(v) > 200 {
				return errs.InvalidField("/billing/address/"+field, field+" must be at most 200 characters of printable text on one line")
			}
		}
		if a.Country != "" && !countryPattern.MatchString(a.Country) {
			return errs.InvalidField("/billing/address/country", "country must be an ISO 3166-1 alpha-2 code such as DE")
		}
	}
	if t := b.TaxID; t != nil {
		if !taxTypePattern.MatchString(t.Type) {
			return errs.InvalidField("/billing/tax_id/type", "type must be a Stripe tax id type such as eu_vat")
		}
		if !SingleLine(t.Value) || t.Value == "" || len(t.Value) > 64 {
			return errs.InvalidField("/billing/tax_id/value", "value must be 1 to 64 characters of printable text")
		}
	}
	return nil
}

func (b Billing) doc() string {
	d := billingDoc{Name: b.Name, Email: b.Email}
	if a := b.Address; a != nil {
		d.Address = &addressDoc{Line1: a.Line1, Line2: a.Line2, City: a.City, State: a.State, PostalCode: a.PostalCode, Country: a.Country}
	}
	if t := b.TaxID; t != nil {
		d.TaxID = &taxIDDoc{Type: t.Type, Value: t.Value}
	}
	out, _ := json.Marshal(d) // plain strings: cannot fail
	return string(out)
}

func billingFrom(raw *string, invoiceAlways bool) (*Billing, error) {
	if raw == nil {
		if invoiceAlways {
			return &Billing{InvoiceAlways: true}, nil
		}
		return nil, nil
	}
	var d billingDoc
	if err := json.Unmarshal([]byte(*raw), &d); err != nil {
		return nil, fmt.Errorf("customers: billing: %w", err)
	}
	b := &Billing{Name: d.Name, Email: d.Email, InvoiceAlways: invoiceAlways}
	if a := d.Address; a != nil {
		b.Address = &Address{Line1: a.Line1, Line2: a.Line2, City: a.City, State: a.State, PostalCode: a.PostalCode, Country: a.Country}
	}
	if t := d.TaxID; t != nil {
		b.TaxID = &TaxID{Type: t.Type, Value: t.Value}
	}
	return b, nil
}

// InvoiceEmail is where an invoice goes: the billing email, else the
// customer's own.
func (c Customer) InvoiceEmail() string {
	if c.Billing != nil && c.Billing.Email != "" {
		return c.Billing.Email
	}
	return c.Email
}
