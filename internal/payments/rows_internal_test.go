package payments

import (
	"strings"
	"sync"
	"testing"

	"gorm.io/gorm/schema"
)

// scanPayment reads paymentColumns by hand: a column paymentRow gains (or
// loses) must be added there too, or load would leave it empty. This
// compares the list with the columns gorm sees in paymentRow, in order.
func TestPaymentColumnsAreThePaymentRow(t *testing.T) {
	s, err := schema.Parse(&paymentRow{}, &sync.Map{}, schema.NamingStrategy{})
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, f := range s.Fields {
		if f.DBName != "" {
			want = append(want, f.DBName)
		}
	}
	got := strings.Split(paymentColumns, ", ")
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("paymentColumns = %v\npaymentRow has %v", got, want)
	}
}
