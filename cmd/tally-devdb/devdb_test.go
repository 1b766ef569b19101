//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tallybilling/tally/internal/db/dbtest"
)

// The test binary plays both parts: tally-devdb itself (helperEnv set) and
// the command it runs (first argument childArg), so the real process,
// signal and exit-status paths are what is tested.
const (
	helperEnv = "TALLY_DEVDB_TEST_AS_MAIN"
	childArg  = "-devdb-test-child"
	urlEnv    = "DEVDB_TEST_URL"
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == childArg {
		os.Exit(child(os.Args[2:]))
	}
	if os.Getenv(helperEnv) != "" {
		os.Exit(run(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

// report is what the command saw, written as JSON to a file.
type report struct {
	URL            string `json:"url"`
	MaxConnections string `json:"max_connections"`
	Fsync          string `json:"fsync"`
	DataDirectory  string `json:"data_directory"`
	PostmasterPID  int    `json:"postmaster_pid"`
	PostmasterUID  int    `json:"postmaster_uid"`
	Rows           int    `json:"rows"`
	Err            string `json:"err,omitempty"`
}

// child is the command: child OUT [insert] [hold] [exit=N]. It connects to
// the URL it was given, optionally inserts a row into table t, writes what it
// saw to OUT, then with hold waits for a signal and appends every signal it
// gets within a second to OUT.signals.
func child(args []string) int {
	out := args[0]
	var insert, hold bool
	code := 0
	for _, a := range args[1:] {
		switch {
		case a == "insert":
			insert = true
		case a == "hold":
			hold = true
		case strings.HasPrefix(a, "exit="):
			code, _ = strconv.Atoi(strings.TrimPrefix(a, "exit="))
		}
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)

	rep := report{URL: os.Getenv(urlEnv)}
	if err := inspect(&rep, insert); err != nil {
		rep.Err = err.Error()
	}
	b, _ := json.Marshal(rep)
	if err := os.WriteFile(out+".tmp", b, 0o644); err != nil {
		return 99
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return 99
	}
	if !hold {
		return code
	}
	var got []string
	got = append(got, (<-sigs).String())
	for deadline := time.After(time.Second); ; {
		select {
		case s := <-sigs:
			got = append(got, s.String())
			continue
		case <-deadline:
		}
		break
	}
	_ = os.WriteFile(out+".signals", []byte(strings.Join(got, "\n")), 0o644)
	return code
}

func inspect(rep *report, insert bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, rep.URL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	for name, dst := range map[string]*string{"max_connections": &rep.MaxConnections, "fsync": &rep.Fsync, "data_directory": &rep.DataDirectory} {
		if err := conn.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(dst); err != nil {
			return err
		}
	}
	if insert {
		if _, err := conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1)"); err != nil {
			return err
		}
	}
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&rep.Rows); err != nil && !strings.Contains(err.Error(), "42P01") {
		return err
	}
	if b, err := os.ReadFile(filepath.Join(rep.DataDirectory, "postmaster.pid")); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		rep.PostmasterPID, _ = strconv.Atoi(line)
		if st, err := os.Stat(fmt.Sprintf("/proc/%d", rep.PostmasterPID)); err == nil {
			rep.PostmasterUID = int(st.Sys().(*syscall.Stat_t).Uid)
		}
	}
	return nil
}

// helper is one tally-devdb process.
type helper struct {
	t      *testing.T
	cmd    *exec.Cmd
	out    string // the command's report file
	stderr syncBuffer
	done   chan struct{}
	status int
}

// syncBuffer collects a process's output while the test reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startHelper runs tally-devdb with flags and the child command with
// childArgs, in a process group of its own as a shell would.
func startHelper(t *testing.T, flags []string, childArgs ...string) *helper {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	h := &helper{t: t, out: filepath.Join(t.TempDir(), "report.json"), done: make(chan struct{})}
	args := append(append([]string{"-env", urlEnv}, flags...), "--", self, childArg, h.out)
	h.cmd = exec.Command(self, append(args, childArgs...)...)
	h.cmd.Env = append(os.Environ(), helperEnv+"=1")
	h.cmd.Stderr = &h.stderr
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(h.done)
		err := h.cmd.Wait()
		var exit *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &exit):
			h.status = exit.ExitCode()
		default:
			h.status = -2
		}
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
		<-h.done
	})
	return h
}

// wait returns the exit status once tally-devdb has ended.
func (h *helper) wait() int {
	h.t.Helper()
	select {
	case <-h.done:
		return h.status
	case <-time.After(3 * time.Minute):
		h.t.Fatalf("tally-devdb did not end; its output:\n%s", h.stderr.String())
		return 0
	}
}

// report waits for the command's report.
func (h *helper) report() report {
	h.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		b, err := os.ReadFile(h.out)
		if err == nil {
			var r report
			if err := json.Unmarshal(b, &r); err != nil {
				h.t.Fatal(err)
			}
			if r.Err != "" {
				h.t.Fatalf("the command could not use %s: %s\ntally-devdb said:\n%s", r.URL, r.Err, h.stderr.String())
			}
			return r
		}
		select {
		case <-h.done:
			h.t.Fatalf("tally-devdb ended (status %d) before the command reported; it said:\n%s", h.status, h.stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("no report from the command; tally-devdb said:\n%s", h.stderr.String())
		}
	}
}

// signals waits for the signals a holding command recorded.
func (h *helper) signals() string {
	h.t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if b, err := os.ReadFile(h.out + ".signals"); err == nil {
			return string(b)
		}
	}
	return "(none recorded)"
}

// deadURL is a URL where nothing listens: a port taken and released.
func deadURL(t *testing.T, database string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "postgres://postgres@" + addr + "/" + database + "?sslmode=disable"
}

// stateDir is a state directory the server's user can reach (t.TempDir is
// closed to other users, and as root the server runs as another user).
func stateDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tally-devdb-test-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return filepath.Join(dir, "state")
}

func alive(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil {
		return false
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return !strings.Contains(string(b), ") Z ")
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); alive(pid); {
		if time.Now().After(deadline) {
			t.Fatalf("process %d is still running", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func refuses(t *testing.T, rawURL string) {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", u.Host, time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections after tally-devdb ended", u.Host)
	}
}

func scratchLeft(t *testing.T, state string) []string {
	t.Helper()
	left, err := filepath.Glob(filepath.Join(state, scratchPrefix+"*"))
	if err != nil {
		t.Fatal(err)
	}
	return left
}

func TestNoServerStartsAPrivateOneForTheCommandAndStopsIt(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts PostgreSQL servers (skipped by -short; make test runs it)")
	}
	state := stateDir(t)
	configured := deadURL(t, "postgres")
	h := startHelper(t, []string{"-url", configured, "-state", state, "-max-connections", "123"}, "exit=7")
	if got := h.wait(); got != 7 {
		t.Errorf("exit status %d, want the command's 7; output:\n%s", got, h.stderr.String())
	}
	r := h.report()
	if r.URL == configured || !strings.HasPrefix(r.URL, "postgres://postgres:") || !strings.Contains(r.URL, "@127.0.0.1:") {
		t.Errorf("the command got %q, want a private server on 127.0.0.1 with a password", r.URL)
	}
	if r.MaxConnections != "123" || r.Fsync != "off" {
		t.Errorf("max_connections %s, fsync %s; want 123, off", r.MaxConnections, r.Fsync)
	}
	if !strings.HasPrefix(r.DataDirectory, state+string(filepath.Separator)+scratchPrefix) {
		t.Errorf("data directory %s, want a scratch cluster under %s", r.DataDirectory, state)
	}
	if os.Geteuid() == 0 && r.PostmasterUID == 0 {
		t.Errorf("started as root, the server runs as root (uid %d)", r.PostmasterUID)
	}
	if r.PostmasterPID == 0 {
		t.Fatal("no postmaster pid in the report")
	}
	if alive(r.PostmasterPID) {
		t.Errorf("postmaster %d still runs after tally-devdb ended", r.PostmasterPID)
	}
	refuses(t, r.URL)
	if left := scratchLeft(t, state); len(left) != 0 {
		t.Errorf("scratch files left behind: %v", left)
	}
	for _, want := range []string{"no PostgreSQL accepts postgres at", "connection refused", "started a private PostgreSQL", "stopped the private PostgreSQL"} {
		if !strings.Contains(h.stderr.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, h.stderr.String())
		}
	}
}

// configuredURL is the server the other tests of the repository use; it must
// answer for this test (make test provides one).
func configuredURL() string {
	if u := os.Getenv(dbtest.EnvURL); u != "" {
		return u
	}
	return dbtest.DefaultURL
}

func TestAnAnsweringServerIsUsedAndAMissingDatabaseCreated(t *testing.T) {
	t.Parallel()
	state := stateDir(t)
	base, err := url.Parse(configuredURL())
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "tally_devdb_" + hex.EncodeToString(b[:])
	u := *base
	u.Path = "/" + name
	t.Cleanup(func() {
		ctx := context.Background()
		if conn, err := pgx.Connect(ctx, base.String()); err == nil {
			_, _ = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
			conn.Close(ctx)
		}
	})

	h := startHelper(t, []string{"-url", u.String(), "-state", state, "-create"})
	if got := h.wait(); got != 0 {
		t.Fatalf("exit status %d; output:\n%s", got, h.stderr.String())
	}
	if r := h.report(); r.URL != u.String() {
		t.Errorf("the command got %q, want the configured %q (which must answer: %s)", r.URL, u.String(), h.stderr.String())
	}
	if strings.Contains(h.stderr.String(), "private") {
		t.Errorf("a private server was started although %s answers:\n%s", base.Redacted(), h.stderr.String())
	}
	if left := scratchLeft(t, state); len(left) != 0 {
		t.Errorf("files in the state directory: %v", left)
	}
}

func TestAKeptServerKeepsItsDataAndRecoversFromKills(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts PostgreSQL servers (skipped by -short; make test runs it)")
	}
	state := stateDir(t)
	flags := []string{"-url", deadURL(t, "tally"), "-state", state, "-keep", "run", "-create"}

	first := startHelper(t, flags, "insert")
	if got := first.wait(); got != 0 {
		t.Fatalf("first run: status %d; output:\n%s", got, first.stderr.String())
	}
	if r := first.report(); r.Rows != 1 || !strings.HasSuffix(r.URL, "/tally?sslmode=disable") {
		t.Fatalf("first run: %d rows in %s, want 1 in database tally", r.Rows, r.URL)
	}

	// kill -9 of tally-devdb while the command runs: the kernel ends the
	// command and shuts the server down.
	second := startHelper(t, flags, "insert", "hold")
	r := second.report()
	if r.Rows != 2 {
		t.Fatalf("second run: %d rows, want 2: the data of the first run is gone", r.Rows)
	}
	if err := second.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	second.wait()
	waitGone(t, r.PostmasterPID)
	// The kernel may send it once per thread of tally-devdb as they die.
	if got := second.signals(); strings.Trim(strings.ReplaceAll(got, "terminated", ""), "\n") != "" {
		t.Errorf("the command got signals %q, want SIGTERM when tally-devdb was killed", got)
	}

	// kill -9 of the server and of tally-devdb: a stale postmaster.pid.
	third := startHelper(t, flags, "insert", "hold")
	r = third.report()
	if r.Rows != 3 {
		t.Fatalf("third run: %d rows, want 3", r.Rows)
	}
	if err := syscall.Kill(r.PostmasterPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = third.cmd.Process.Kill()
	third.wait()
	waitGone(t, r.PostmasterPID)
	if _, err := os.Stat(filepath.Join(r.DataDirectory, "postmaster.pid")); err != nil {
		t.Fatalf("the killed server left no postmaster.pid to recover from: %v", err)
	}

	fourth := startHelper(t, flags, "insert")
	if got := fourth.wait(); got != 0 {
		t.Fatalf("after a kill -9 of the server: status %d; output:\n%s", got, fourth.stderr.String())
	}
	if r := fourth.report(); r.Rows != 4 {
		t.Errorf("after a kill -9 of the server: %d rows, want 4", r.Rows)
	}

	// A postmaster.pid whose PID now belongs to another live process of the
	// server's user: postgres alone would refuse to start ("lock file
	// already exists").
	sleeper := exec.Command("sleep", "120")
	sleeper.SysProcAttr = serverUserAttr(t)
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() })
	pidFile := filepath.Join(r.DataDirectory, "postmaster.pid")
	if err := os.WriteFile(pidFile, []byte(fmt.Sprintf("%d\n%s\n", sleeper.Process.Pid, r.DataDirectory)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(pidFile, int(r.PostmasterUID), -1); err != nil && os.Geteuid() == 0 {
		t.Fatal(err)
	}
	fifth := startHelper(t, flags)
	if got := fifth.wait(); got != 0 {
		t.Fatalf("with a postmaster.pid naming a live process: status %d; output:\n%s", got, fifth.stderr.String())
	}
	if r := fifth.report(); r.Rows != 4 {
		t.Errorf("with a reused pid: %d rows, want 4", r.Rows)
	}
	if !alive(sleeper.Process.Pid) {
		t.Error("the process whose pid was in postmaster.pid was killed")
	}
}

// serverUserAttr runs a process as the user tally-devdb runs servers as.
func serverUserAttr(t *testing.T) *syscall.SysProcAttr {
	t.Helper()
	acct, err := serverAccount()
	if err != nil {
		t.Fatal(err)
	}
	return acct.attr()
}

func TestAnInterruptReachesTheCommandOnceAndStopsTheServer(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts PostgreSQL servers (skipped by -short; make test runs it)")
	}
	state := stateDir(t)
	h := startHelper(t, []string{"-url", deadURL(t, "postgres"), "-state", state}, "hold")
	r := h.report()
	// What Ctrl-C does: SIGINT to the terminal's foreground process group,
	// which holds tally-devdb (and make) but not the command.
	if err := syscall.Kill(-h.cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if got := h.wait(); got != 0 {
		t.Errorf("exit status %d, want the command's 0; output:\n%s", got, h.stderr.String())
	}
	if got := h.signals(); got != "interrupt" {
		t.Errorf("the command got signals %q, want exactly one SIGINT", got)
	}
	if alive(r.PostmasterPID) {
		t.Errorf("postmaster %d still runs", r.PostmasterPID)
	}
	if left := scratchLeft(t, state); len(left) != 0 {
		t.Errorf("scratch files left behind: %v", left)
	}
}

func TestConcurrentRuns(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts PostgreSQL servers (skipped by -short; make test runs it)")
	}
	state := stateDir(t)
	dead := deadURL(t, "tally")

	kept := startHelper(t, []string{"-url", dead, "-state", state, "-keep", "run", "-create"}, "hold")
	keptReport := kept.report()

	// A second user of the kept server is refused, clearly.
	again := startHelper(t, []string{"-url", dead, "-state", state, "-keep", "run", "-create"})
	if got := again.wait(); got != 1 || !strings.Contains(again.stderr.String(), "another command is using the private PostgreSQL") {
		t.Errorf("second user of a kept server: status %d, output:\n%s", got, again.stderr.String())
	}

	// Scratch servers run side by side, with the kept one, on their own ports;
	// one killed leaves files that the next run removes.
	a := startHelper(t, []string{"-url", dead, "-state", state, "-create"}, "hold")
	b := startHelper(t, []string{"-url", dead, "-state", state, "-create"}, "hold")
	ra, rb := a.report(), b.report()
	if ra.URL == rb.URL || ra.URL == keptReport.URL || ra.DataDirectory == rb.DataDirectory {
		t.Errorf("concurrent servers share an address or directory: %s %s %s", ra.URL, rb.URL, keptReport.URL)
	}
	_ = a.cmd.Process.Kill()
	a.wait()
	waitGone(t, ra.PostmasterPID)
	if _, err := os.Stat(ra.DataDirectory); err != nil {
		t.Fatalf("the killed run's cluster is already gone: %v", err)
	}
	c := startHelper(t, []string{"-url", dead, "-state", state, "-create"})
	if got := c.wait(); got != 0 {
		t.Fatalf("status %d; output:\n%s", got, c.stderr.String())
	}
	if _, err := os.Stat(ra.DataDirectory); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the killed run's cluster %s was not removed (%v)", ra.DataDirectory, err)
	}
	if _, err := os.Stat(rb.DataDirectory); err != nil {
		t.Errorf("the live run's cluster was removed: %v", err)
	}

	for _, h := range []*helper{b, kept} {
		_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGINT)
		if got := h.wait(); got != 0 {
			t.Errorf("status %d; output:\n%s", got, h.stderr.String())
		}
	}
	if left := scratchLeft(t, state); len(left) != 0 {
		t.Errorf("scratch files left behind: %v", left)
	}
}

func TestAStateDirectoryTheServerUserCannotEnterFallsBack(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts PostgreSQL servers (skipped by -short; make test runs it)")
	}
	if os.Geteuid() != 0 {
		t.Skip("only a run as root starts the server as another user")
	}
	closed, err := os.MkdirTemp("", "tally-devdb-closed-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(closed) }) // MkdirTemp made it 0700
	state := filepath.Join(closed, "state")
	h := startHelper(t, []string{"-url", deadURL(t, "postgres"), "-state", state})
	if got := h.wait(); got != 0 {
		t.Fatalf("status %d; output:\n%s", got, h.stderr.String())
	}
	r := h.report()
	if strings.HasPrefix(r.DataDirectory, closed) || !strings.Contains(h.stderr.String(), "cannot enter") {
		t.Errorf("data directory %s; want one outside %s, and said so:\n%s", r.DataDirectory, closed, h.stderr.String())
	}
	t.Cleanup(func() { _ = os.RemoveAll(filepath.Dir(r.DataDirectory)) })
}
