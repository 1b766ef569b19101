// Package stripemock starts stripe-mock, Stripe's official stateless mock
// server (pinned at Version), for tests, on a free loopback port.
//
// One process is shared by all tests of a test binary. It starts lazily on
// the first Start and stops either when Main's m.Run returns (the usual
// way: a package whose tests use stripe-mock has
//
//	func TestMain(m *testing.M) { os.Exit(stripemock.Main(m)) }
//
// ) or, in a package without that TestMain, when the cleanup of the last test
// holding it runs (reference counted; a later test then starts a new one).
// On Linux the process also dies with the test binary, should that be killed.
//
// The binary is looked up in order: $TALLY_STRIPE_MOCK_BIN, <module
// root>/bin/stripe-mock, $GOBIN/stripe-mock, $GOPATH/bin/stripe-mock (GOPATH
// defaulting to ~/go), then $PATH. A missing binary fails the test; it is
// never skipped.
package stripemock

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// Version is the stripe-mock release the project pins (see `make tools`).
const Version = "v0.203.0"

// EnvBin names the environment variable that points at a stripe-mock binary.
const EnvBin = "TALLY_STRIPE_MOCK_BIN"

const missingHint = "stripe-mock not found; run `make tools` (go install github.com/stripe/stripe-mock@" + Version + ")"

// startTimeout bounds how long stripe-mock may take to load its spec and answer.
const startTimeout = 60 * time.Second

// shared is the one stripe-mock process of this test binary. Package-level
// state is the point here: a process per test would cost seconds each.
var shared struct {
	mu      sync.Mutex
	proc    *process
	refs    int
	inMain  bool
	lastErr error
}

type process struct {
	cmd  *exec.Cmd
	url  string
	done chan struct{} // closed when the process has exited
	out  *lockedBuffer
}

// Main runs the package's tests with m.Run and then stops the shared
// stripe-mock, if one was started. Use it from TestMain.
func Main(m *testing.M) int {
	shared.mu.Lock()
	shared.inMain = true
	shared.mu.Unlock()

	code := m.Run()

	shared.mu.Lock()
	defer shared.mu.Unlock()
	shared.inMain = false
	if shared.proc != nil {
		shared.proc.stop()
		shared.proc = nil
	}
	return code
}

// Start returns the base URL (http://127.0.0.1:port) of the shared running
// stripe-mock, starting it if needed. It fails the test when stripe-mock is
// missing or does not come up.
func Start(t testing.TB) string {
	t.Helper()
	shared.mu.Lock()
	defer shared.mu.Unlock()

	if shared.proc != nil {
		select {
		case <-shared.proc.done: // it died; start a new one
			shared.proc = nil
		default:
		}
	}
	if shared.proc == nil {
		bin, err := Find()
		if err != nil {
			t.Fatalf("%v", err)
		}
		p, err := launch(bin)
		if err != nil {
			t.Fatalf("stripemock: %v", err)
		}
		shared.proc = p
	}
	shared.refs++
	url := shared.proc.url
	t.Cleanup(release)
	return url
}

func release() {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	shared.refs--
	if shared.refs == 0 && !shared.inMain && shared.proc != nil {
		shared.proc.stop()
		shared.proc = nil
	}
}

// Find returns the path of the stripe-mock binary, or an error that says how
// to install it.
func Find() (string, error) {
	if p := os.Getenv(EnvBin); p != "" {
		if isExecutable(p) {
			return p, nil
		}
		return "", fmt.Errorf("%s=%s is not an executable file; %s", EnvBin, p, missingHint)
	}
	var candidates []string
	if root, ok := moduleRoot(); ok {
		candidates = append(candidates, filepath.Join(root, "bin", "stripe-mock"))
	}
	if gobin := os.Getenv("GOBIN"); gobin != "" {
		candidates = append(candidates, filepath.Join(gobin, "stripe-mock"))
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if home, err := os.UserHomeDir(); err == nil {
			gopath = filepath.Join(home, "go")
		}
	}
	for _, dir := range filepath.SplitList(gopath) {
		if dir != "" {
			candidates = append(candidates, filepath.Join(dir, "bin", "stripe-mock"))
		}
	}
	for _, c := range candidates {
		if isExecutable(c) {
			return c, nil
		}
	}
	if p, err := exec.LookPath("stripe-mock"); err == nil {
		return p, nil
	}
	return "", errors.New(missingHint)
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

// moduleRoot is the directory of the nearest go.mod above the working directory.
func moduleRoot() (string, bool) {
	dir, err := os.Getwd()
	if err != nil {
		return "", false
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, true
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", false
		}
		dir = parent
	}
}

var listeningRE = regexp.MustCompile(`Listening for HTTP at address: (\S+)`)

func launch(bin string) (*process, error) {
	// Both listeners get a system-chosen loopback port: left alone, the HTTPS
	// one binds :12112 on every interface and a second stripe-mock (another
	// test binary running in parallel) would fail to start.
	cmd := exec.Command(bin, "-http-addr", "127.0.0.1:", "-https-addr", "127.0.0.1:")
	setProcAttr(cmd)
	addrCh := make(chan string, 1)
	out := &lockedBuffer{onLine: func(line string) {
		if m := listeningRE.FindStringSubmatch(line); m != nil {
			select {
			case addrCh <- m[1]:
			default:
			}
		}
	}}
	cmd.Stdout = out
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{}), out: out}
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()

	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	select {
	case addr := <-addrCh:
		p.url = "http://" + addr
	case <-p.done:
		return nil, fmt.Errorf("%s exited before listening:\n%s", bin, out.String())
	case <-deadline.C:
		p.stop()
		return nil, fmt.Errorf("%s did not report its address within %s:\n%s", bin, startTimeout, out.String())
	}
	if err := waitReady(p); err != nil {
		p.stop()
		return nil, fmt.Errorf("%s at %s: %w\n%s", bin, p.url, err, out.String())
	}
	return p, nil
}

// waitReady polls until stripe-mock answers an authenticated request.
func waitReady(p *process) error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.url+"/v1/customers", nil)
		req.Header.Set("Authorization", "Bearer sk_test_123")
		resp, err := client.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET /v1/customers answered %s", resp.Status)
		}
		select {
		case <-p.done:
			return errors.New("exited while starting")
		case <-ctx.Done():
			return fmt.Errorf("not ready within %s: %v", startTimeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
	}
}

// lockedBuffer keeps stripe-mock's output for error messages and hands
// each complete line of it to onLine.
type lockedBuffer struct {
	mu      sync.Mutex
	b       strings.Builder
	partial string
	onLine  func(line string)
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b.Write(p)
	l.partial += string(p)
	for {
		i := strings.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		if l.onLine != nil {
			l.onLine(l.partial[:i])
		}
		l.partial = l.partial[i+1:]
	}
	return len(p), nil
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
