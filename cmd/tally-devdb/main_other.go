//go:build !linux

// Command tally-devdb starts a private PostgreSQL for `make run` and `make
// test` on Linux; elsewhere it says what to do instead.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "tally-devdb: private PostgreSQL servers are supported on Linux only; "+
		"start PostgreSQL yourself and set PG_SERVER (make run) or TALLY_TEST_DATABASE_URL (the tests)")
	os.Exit(1)
}
