package app

import (
	"context"

	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/credits"
	"github.com/tallybilling/tally/internal/payments"
)

// Verify is the invariant report of `tally verify` and GET /v1/admin/verify:
// the credits checks plus every other capability's checks, all run in one
// read-only snapshot of the database so they agree with each other on a
// live system. Problems are in the report; err means a check could not run.
func Verify(ctx context.Context, gdb *gorm.DB) (credits.VerifyReport, error) {
	return credits.Verify(ctx, gdb, verifyCheckers()...)
}

// verifyCheckers lists the checks other capabilities contribute to the
// report (payments: every succeeded credit-pack payment credited exactly
// once, refunds and disputes took back their share), and the checks that
// need the real clock (credits: no hold left active long past its expiry).
// Add one line per capability.
func verifyCheckers() []credits.Checker {
	return []credits.Checker{payments.Verify, credits.CheckOverdueHolds}
}
