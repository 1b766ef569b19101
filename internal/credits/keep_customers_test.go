package credits_test

import (
	"strings"
	"testing"

	"gorm.io/gorm"
)

// credit_ledger and credit_consumption_daily have no foreign key to
// customers (migration 00053: every row is written under the customer's
// balance row lock, and credit_balances keeps its key). What the keys also
// guarded, that a customer with credit history is never deleted, still
// holds: through credit_balances' key while the balance row is there, and
// through the customers_keep_credits trigger should it be gone.
func TestCustomerWithCreditHistoryCannotBeDeleted(t *testing.T) {
	t.Parallel()
	f := newFixture(t, defaultCfg())
	f.grant("keeper", 100, nil)
	f.mustConsume("keeper", 3)

	err := f.db.Exec(`DELETE FROM customers WHERE id = 'keeper'`).Error
	if err == nil {
		t.Fatal("delete of a customer with a balance, ledger and consumption: no error, want refused")
	}

	for _, tc := range []struct{ name, without, want string }{
		{"ledger", `DELETE FROM credit_consumption_daily WHERE customer_id = 'keeper'`, "credit ledger entries"},
		{"rollup", `ALTER TABLE credit_ledger DISABLE TRIGGER credit_ledger_append_only;
			DELETE FROM credit_ledger WHERE customer_id = 'keeper'`, "consumption records"},
	} {
		// Without the balance row (tally never deletes one), and with only
		// the table under test holding rows of the customer; rolled back.
		err := f.db.Transaction(func(tx *gorm.DB) error {
			if err := tx.Exec(`DELETE FROM credit_balances WHERE customer_id = 'keeper'`).Error; err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if err := tx.Exec(tc.without).Error; err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			return tx.Exec(`DELETE FROM customers WHERE id = 'keeper'`).Error
		})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: delete of a customer with %s: %v, want refused", tc.name, tc.want, err)
		}
	}
	if n := f.count(`SELECT count(*) FROM credit_ledger WHERE customer_id = 'keeper'`); n != 2 {
		t.Errorf("keeper has %d ledger entries, want 2", n)
	}
	f.mustVerify()
}
