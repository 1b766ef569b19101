package db_test

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"gorm.io/gorm"

	"github.com/tallybilling/tally/internal/db"
	"github.com/tallybilling/tally/internal/db/dbtest"
)

// A server whose host is not on UTC answers times read from the database in
// UTC all the same, as it answers the times it makes: every timestamptz
// comes back in UTC, through gorm, the direct statements and the pgx
// connection beneath gorm. The zone is the process's (TZ, read once at
// start), so the test runs itself again with TZ set.
func TestTimesAreReadInUTCWhateverTheHostsZone(t *testing.T) {
	if os.Getenv("TALLY_TEST_TZ_CHILD") == "" {
		t.Parallel()
		cmd := exec.Command(os.Args[0], "-test.run=^TestTimesAreReadInUTCWhateverTheHostsZone$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "TZ=Asia/Kathmandu", "TALLY_TEST_TZ_CHILD=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("the test under TZ=Asia/Kathmandu: %v\n%s", err, out)
		}
		t.Logf("under TZ=Asia/Kathmandu:\n%s", out)
		return
	}
	if _, off := time.Now().Zone(); off == 0 {
		t.Fatalf("the process's zone is UTC under TZ=%q: nothing is shown", os.Getenv("TZ"))
	}
	gdb := dbtest.New(t)
	ctx := context.Background()
	const q = `SELECT timestamptz '2026-12-02 10:00:00+00'`
	want := time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC)
	check := func(how string, got time.Time) {
		t.Helper()
		if !got.Equal(want) || got.Location() != time.UTC {
			t.Errorf("%s read %s, want %s", how, got, want)
		}
	}

	var viaGorm time.Time
	if err := gdb.Raw(q).Row().Scan(&viaGorm); err != nil {
		t.Fatal(err)
	}
	check("gorm", viaGorm)
	var row struct{ At time.Time }
	if err := gdb.Raw(q + ` AS at`).Scan(&row).Error; err != nil {
		t.Fatal(err)
	}
	check("gorm into a struct", row.At)
	var direct time.Time
	if _, err := db.ScanDirect(ctx, gdb, q, nil, &direct); err != nil {
		t.Fatal(err)
	}
	check("a direct statement", direct)
	var viaPgx time.Time
	if err := db.Pgx(ctx, gdb, func(c *pgx.Conn) error { return c.QueryRow(ctx, q).Scan(&viaPgx) }); err != nil {
		t.Fatal(err)
	}
	check("the pgx connection", viaPgx)
	var inTx time.Time
	if err := gdb.Transaction(func(tx *gorm.DB) error { return tx.Raw(q).Row().Scan(&inTx) }); err != nil {
		t.Fatal(err)
	}
	check("a transaction", inTx)
}
