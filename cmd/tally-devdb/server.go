//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// superuser is the role initdb creates, the one every URL names.
	superuser = "postgres"
	// scratchPrefix names the per-run clusters, which any later run may
	// remove once nothing holds their lock.
	scratchPrefix = "scratch-"

	readyTimeout = 2 * time.Minute // includes crash recovery after a kill
	stopTimeout  = time.Minute     // fast shutdown, before immediate
	startTries   = 5               // a free port can be taken before the server binds it
)

// server is a private PostgreSQL started by this process.
type server struct {
	say      func(string, ...any)
	root     string // the state directory
	name     string // the cluster's files are root/name{,.lock,.password,.log}
	scratch  bool
	major    string
	port     int
	password string
	cmd      *exec.Cmd
	exited   chan struct{} // closed when the postmaster has exited
	lock     *os.File      // held for as long as this process owns the cluster
}

func (s *server) dataDir() string           { return filepath.Join(s.root, s.name) }
func (s *server) sidecar(ext string) string { return filepath.Join(s.root, s.name+ext) }

func (s *server) url(database string) string { return serverURL(s.port, s.password, database) }

// account is the operating system user the server runs as.
type account struct {
	name     string
	uid, gid uint32
	switchTo bool // started as root: run initdb and postgres as this user
}

// startServer starts a private server as described in the package comment.
func startServer(ctx context.Context, o options, say func(string, ...any)) (*server, error) {
	t0 := time.Now()
	acct, err := serverAccount()
	if err != nil {
		return nil, err
	}
	root, err := stateRoot(ctx, o.state, acct, say)
	if err != nil {
		return nil, err
	}
	s := &server{say: say, root: root, name: o.keep, scratch: o.keep == ""}
	if err := s.claim(ctx); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			s.release()
		}
	}()
	if err := stopLeftover(s.dataDir(), say); err != nil {
		return nil, err
	}
	bin, err := s.binaries()
	if err != nil {
		return nil, err
	}
	// The log holds this run's messages only; a kept cluster's would grow.
	if err := os.WriteFile(s.sidecar(".log"), nil, 0o644); err != nil {
		return nil, err
	}
	if err := s.initdb(ctx, bin, acct); err != nil {
		return nil, err
	}
	if err := s.start(ctx, bin, acct, o.maxConnections); err != nil {
		return nil, err
	}
	ok = true
	say("started a private PostgreSQL %s in %s on 127.0.0.1:%d in %s; it stops when the command ends",
		s.major, relative(s.dataDir()), s.port, elapsed(t0))
	return s, nil
}

// serverAccount is the invoking user, or a non-root one when invoked as root.
func serverAccount() (account, error) {
	if os.Geteuid() != 0 {
		u, err := user.Current()
		if err != nil {
			return account{name: strconv.Itoa(os.Geteuid())}, nil
		}
		return account{name: u.Username}, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil || uid == 0 {
			continue
		}
		return account{name: name, uid: uint32(uid), gid: uint32(gid), switchTo: true}, nil
	}
	return account{}, errors.New("PostgreSQL refuses to run as root, and there is no postgres or nobody user to run it as: " +
		"create one (adduser --system postgres) or run as another user")
}

func (a account) attr() *syscall.SysProcAttr {
	if !a.switchTo {
		return &syscall.SysProcAttr{}
	}
	return &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: a.uid, Gid: a.gid}}
}

func (a account) chown(path string) error {
	if !a.switchTo {
		return nil
	}
	return os.Chown(path, int(a.uid), int(a.gid))
}

// stateRoot creates the state directory and returns its absolute path. When
// the server's user cannot reach it (a checkout under root's 0700 home), it
// falls back to a directory of the same checkout under the system's
// temporary directory, and says so.
func stateRoot(ctx context.Context, dir string, acct account, say func(string, ...any)) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return "", fmt.Errorf("state directory: %w", err)
	}
	if !acct.switchTo || canEnter(ctx, acct, abs) {
		return abs, nil
	}
	sum := sha256.Sum256([]byte(abs))
	alt := filepath.Join(os.TempDir(), "tally-postgres-"+hex.EncodeToString(sum[:6]))
	if err := os.MkdirAll(alt, 0o755); err != nil {
		return "", fmt.Errorf("state directory: %w", err)
	}
	if err := os.Chmod(alt, 0o755); err != nil {
		return "", fmt.Errorf("state directory: %w", err)
	}
	if !canEnter(ctx, acct, alt) {
		return "", fmt.Errorf("the %s user, which PostgreSQL runs as, can enter neither %s nor %s", acct.name, abs, alt)
	}
	say("the %s user cannot enter %s (a parent directory is closed to it); using %s instead", acct.name, abs, alt)
	return alt, nil
}

// canEnter reports whether acct may change into dir, which needs every
// parent directory to be searchable by it.
func canEnter(ctx context.Context, acct account, dir string) bool {
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", `cd -- "$1"`, "sh", dir)
	cmd.SysProcAttr = acct.attr()
	cmd.Dir = "/"
	return cmd.Run() == nil
}

// claim takes the cluster's lock. A kept cluster is used by one command at a
// time; a scratch cluster gets a new name, and scratch clusters whose lock
// nobody holds (their run was killed) are removed first. The lock is released
// by the kernel however this process ends, so it says "in use" exactly while
// a run is alive.
func (s *server) claim(ctx context.Context) error {
	gc, err := lockFile(filepath.Join(s.root, "gc.lock"), true)
	if err != nil {
		return err
	}
	defer gc.Close()
	s.removeAbandoned()
	if s.scratch {
		f, err := os.CreateTemp(s.root, scratchPrefix+"*.lock")
		if err != nil {
			return err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		s.lock = f
		s.name = strings.TrimSuffix(filepath.Base(f.Name()), ".lock")
		return nil
	}
	f, err := lockFile(s.sidecar(".lock"), false)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return fmt.Errorf("another command is using the private PostgreSQL in %s (a make run in this checkout?); stop it first", relative(s.dataDir()))
	}
	if err != nil {
		return err
	}
	s.lock = f
	return nil
}

// removeAbandoned removes the scratch clusters of runs that ended without
// cleaning up (killed). The caller holds gc.lock, under which scratch
// clusters are created and removed.
func (s *server) removeAbandoned() {
	entries, err := os.ReadDir(s.root)
	if err != nil {
		return
	}
	names := map[string]bool{}
	for _, e := range entries {
		if base, ok := strings.CutPrefix(e.Name(), scratchPrefix); ok {
			names[scratchPrefix+strings.SplitN(base, ".", 2)[0]] = true
		}
	}
	for name := range names {
		lock := filepath.Join(s.root, name+".lock")
		f, err := lockFile(lock, false)
		if errors.Is(err, syscall.EWOULDBLOCK) {
			continue // a live run
		}
		if err == nil {
			f.Close()
		}
		dir := filepath.Join(s.root, name)
		if err := stopLeftover(dir, s.say); err != nil {
			s.say("leaving %s: %v", relative(dir), err)
			continue
		}
		_ = os.RemoveAll(dir)
		for _, ext := range []string{".password", ".log", ".lock"} {
			_ = os.Remove(filepath.Join(s.root, name+ext))
		}
	}
}

// lockFile opens path and takes an exclusive flock on it, waiting for it when
// wait is set and failing with EWOULDBLOCK otherwise.
func lockFile(path string, wait bool) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	how := syscall.LOCK_EX
	if !wait {
		how |= syscall.LOCK_NB
	}
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (s *server) release() {
	if s.scratch {
		_ = os.RemoveAll(s.dataDir())
		for _, ext := range []string{".password", ".log", ".lock"} {
			_ = os.Remove(s.sidecar(ext))
		}
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

// binaries is the directory of initdb and postgres: for an existing cluster
// the binaries of its major version, else the newest installed.
func (s *server) binaries() (string, error) {
	want := ""
	if b, err := os.ReadFile(filepath.Join(s.dataDir(), "PG_VERSION")); err == nil {
		want = strings.TrimSpace(string(b))
	}
	dirs := installedBinaries()
	if len(dirs) == 0 {
		return "", errors.New("no PostgreSQL server binaries (initdb, postgres) in /usr/lib/postgresql/*/bin or on PATH: " +
			"install them (apt-get install -y postgresql), or start a server and point the URL at it")
	}
	for _, d := range dirs {
		major := binariesMajor(d)
		if want == "" || major == want {
			s.major = major
			return d, nil
		}
	}
	return "", fmt.Errorf("%s was made by PostgreSQL %s, whose binaries are not installed: install them, or remove the directory to start over (its data is lost)",
		relative(s.dataDir()), want)
}

var debianBinDir = regexp.MustCompile(`^/usr/lib/postgresql/([0-9.]+)/bin$`)

// installedBinaries lists candidate binary directories, newest first:
// Debian's versioned directories, then initdb on PATH.
func installedBinaries() []string {
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	var dirs []string
	for _, f := range found {
		d := filepath.Dir(f)
		if isExecutable(filepath.Join(d, "postgres")) {
			dirs = append(dirs, d)
		}
	}
	sort.Slice(dirs, func(i, j int) bool { return versionLess(binariesMajor(dirs[j]), binariesMajor(dirs[i])) })
	if p, err := exec.LookPath("initdb"); err == nil {
		d := filepath.Dir(p)
		if isExecutable(filepath.Join(d, "postgres")) {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// binariesMajor is the major version of the server in dir, as PG_VERSION
// spells it ("15", or "9.6" before version 10).
func binariesMajor(dir string) string {
	if m := debianBinDir.FindStringSubmatch(dir); m != nil {
		return m[1]
	}
	out, err := exec.Command(filepath.Join(dir, "postgres"), "--version").Output()
	if err != nil {
		return ""
	}
	m := regexp.MustCompile(`(\d+)\.(\d+)`).FindStringSubmatch(string(out))
	if m == nil {
		return ""
	}
	if n, _ := strconv.Atoi(m[1]); n < 10 {
		return m[1] + "." + m[2]
	}
	return m[1]
}

func versionLess(a, b string) bool {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(pa) && i < len(pb); i++ {
		x, _ := strconv.Atoi(pa[i])
		y, _ := strconv.Atoi(pb[i])
		if x != y {
			return x < y
		}
	}
	return len(pa) < len(pb)
}

// initdb creates the cluster unless a complete one is there, with the
// superuser's password in a file beside it (read by initdb and by later
// runs of a kept cluster).
func (s *server) initdb(ctx context.Context, bin string, acct account) error {
	pwFile := s.sidecar(".password")
	if _, err := os.Stat(filepath.Join(s.dataDir(), "PG_VERSION")); err == nil {
		pw, err := os.ReadFile(pwFile)
		if err != nil || len(bytes.TrimSpace(pw)) == 0 {
			return fmt.Errorf("%s has no password file %s: remove the directory to start over (its data is lost)",
				relative(s.dataDir()), relative(pwFile))
		}
		s.password = string(bytes.TrimSpace(pw))
		return nil
	}
	// A directory without PG_VERSION is what an interrupted initdb leaves.
	if err := os.RemoveAll(s.dataDir()); err != nil {
		return err
	}
	if err := os.Mkdir(s.dataDir(), 0o700); err != nil {
		return err
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	s.password = hex.EncodeToString(b[:])
	if err := os.WriteFile(pwFile, []byte(s.password+"\n"), 0o600); err != nil {
		return err
	}
	for _, p := range []string{s.dataDir(), pwFile} {
		if err := acct.chown(p); err != nil {
			return err
		}
	}
	log, err := os.OpenFile(s.sidecar(".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "initdb"),
		"--pgdata="+s.dataDir(),
		"--username="+superuser,
		"--auth=scram-sha-256",
		"--pwfile="+pwFile,
		"--encoding=UTF8",
		"--locale=C.UTF-8",
		"--no-sync", // nothing here outlives a power loss anyway (fsync is off)
	)
	cmd.Dir = "/"
	cmd.Env = serverEnv()
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = acct.attr()
	if err := cmd.Run(); err != nil {
		_ = os.RemoveAll(s.dataDir())
		return fmt.Errorf("initdb as %s: %v\n%s", acct.name, err, tail(s.sidecar(".log")))
	}
	return nil
}

// serverEnv is the environment of initdb and postgres: the caller's, less
// the libpq and locale variables that would change what they do.
func serverEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "PG") || strings.HasPrefix(k, "LC_") || k == "LANG" || k == "LANGUAGE" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C.UTF-8")
}

// start runs the postmaster on a free loopback port and waits until it
// accepts connections, trying another port when the chosen one was taken in
// between.
func (s *server) start(ctx context.Context, bin string, acct account, maxConnections int) error {
	var lastErr error
	for try := 0; try < startTries; try++ {
		port, err := freePort()
		if err != nil {
			return err
		}
		err = s.startOn(ctx, bin, acct, maxConnections, port)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		lastErr = err
		// Also what backends of a killed server still holding its shared
		// memory cause: they leave within a moment.
		time.Sleep(500 * time.Millisecond)
	}
	return lastErr
}

func (s *server) startOn(ctx context.Context, bin string, acct account, maxConnections, port int) error {
	log, err := os.OpenFile(s.sidecar(".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(filepath.Join(bin, "postgres"),
		"-D", s.dataDir(),
		"-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories=",
		"-c", "max_connections="+strconv.Itoa(maxConnections),
		// Development and test data only: a commit is written to the
		// operating system, so it survives a crash of the server (kill -9,
		// the OOM killer) but not of the machine.
		"-c", "fsync=off",
		"-c", "full_page_writes=off",
	)
	cmd.Dir = "/"
	cmd.Env = serverEnv()
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = acct.attr()
	// Its own process group, so a Ctrl-C meant for the command does not
	// shut the database down under it; and a fast shutdown when this
	// process dies, however it dies.
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGINT
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	s.cmd, s.exited, s.port = cmd, exited, port

	cfg, err := pgx.ParseConfig(s.url("postgres"))
	if err != nil {
		s.kill()
		return err
	}
	deadline := time.Now().Add(readyTimeout)
	for {
		err := ping(ctx, cfg)
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("postgres exited at start:\n%s", tail(s.sidecar(".log")))
		case <-ctx.Done():
			s.kill()
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.kill()
			return fmt.Errorf("postgres did not accept connections within %s (%v):\n%s", readyTimeout, err, tail(s.sidecar(".log")))
		}
	}
}

// stop shuts the server down (fast: connections are closed, the data stays),
// removes a scratch cluster and releases the lock.
func (s *server) stop() {
	t0 := time.Now()
	if err := s.shutdown(); err != nil {
		s.say("%v", err)
	} else {
		s.say("stopped the private PostgreSQL in %s", elapsed(t0))
	}
	s.release()
}

func (s *server) shutdown() error {
	for _, step := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGINT, stopTimeout}, {syscall.SIGQUIT, 10 * time.Second}, {syscall.SIGKILL, 10 * time.Second}} {
		_ = s.cmd.Process.Signal(step.sig)
		select {
		case <-s.exited:
			return nil
		case <-time.After(step.wait):
		}
	}
	return fmt.Errorf("postgres (pid %d) did not stop", s.cmd.Process.Pid)
}

func (s *server) kill() {
	_ = s.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}

// stopLeftover makes dir safe to start a server in although no run holds the
// cluster's lock. It stops a postmaster still running there (the run that
// started it was killed and the server was not, or is still shutting down)
// and the backends of one that was killed. And it removes a postmaster.pid
// naming a live process that is not that server, which postgres would take
// for a running server after its PID was reused; a file naming a dead
// process is left to postgres, which checks it and its shared memory itself.
func stopLeftover(dir string, say func(string, ...any)) error {
	pidFile := filepath.Join(dir, "postmaster.pid")
	b, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, _ := strconv.Atoi(strings.TrimSpace(line))
	if pid > 0 && runsIn(pid, dir) {
		say("stopping the PostgreSQL (pid %d) that a killed run left in %s", pid, relative(dir))
		if !stopProcess(pid, dir) {
			return fmt.Errorf("PostgreSQL (pid %d) in %s does not stop", pid, dir)
		}
	}
	for _, p := range processesIn(dir) {
		if !stopProcess(p, dir) {
			return fmt.Errorf("a process (pid %d) of a killed PostgreSQL in %s does not stop", p, dir)
		}
	}
	if pid > 0 && !runsIn(pid, dir) && processExists(pid) {
		if err := os.Remove(pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// stopProcess ends pid, which runs in dir: fast shutdown, then immediate,
// then SIGKILL. It reports whether the process is gone.
func stopProcess(pid int, dir string) bool {
	for _, step := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGINT, stopTimeout}, {syscall.SIGQUIT, 10 * time.Second}, {syscall.SIGKILL, 10 * time.Second}} {
		_ = syscall.Kill(pid, step.sig)
		for deadline := time.Now().Add(step.wait); runsIn(pid, dir) && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
		}
		if !runsIn(pid, dir) {
			return true
		}
	}
	return false
}

func processExists(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || err == syscall.EPERM
}

// processesIn lists the live processes whose working directory is dir.
func processesIn(dir string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && runsIn(pid, dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// runsIn reports whether pid is a live process whose working directory is
// dir, as a postmaster's and its backends' is their data directory. A zombie
// has none.
func runsIn(pid int, dir string) bool {
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil {
		return false
	}
	want, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return false
	}
	return cwd == want
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// tail is the end of a log file, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "  " + strings.Join(lines, "\n  ")
}

// relative shortens path for messages when it is under the working
// directory.
func relative(path string) string {
	wd, err := os.Getwd()
	if err != nil {
		return path
	}
	if r, err := filepath.Rel(wd, path); err == nil && !strings.HasPrefix(r, "..") {
		return r
	}
	return path
}
