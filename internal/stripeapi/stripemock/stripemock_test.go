package stripemock

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

func TestFindExplainsHowToInstall(t *testing.T) {
	t.Setenv(EnvBin, filepath.Join(t.TempDir(), "no-such-stripe-mock"))
	_, err := Find()
	if err == nil || !strings.Contains(err.Error(), "make tools") || !strings.Contains(err.Error(), "stripe-mock@"+Version) {
		t.Fatalf("Find() error = %v, want the install hint", err)
	}
}

// Without Main, the process is shared while tests hold it and stopped when
// the last one's cleanup runs.
func TestStartSharesOneProcessAndStopsItAfterTheLastUser(t *testing.T) {
	t.Parallel()
	var first *process
	t.Run("holders", func(t *testing.T) {
		url := Start(t)
		first = shared.proc
		t.Run("second", func(t *testing.T) {
			if again := Start(t); again != url {
				t.Fatalf("second Start = %s, want the shared %s", again, url)
			}
		})
		resp, err := http.Get(url + "/v1/customers")
		if err != nil {
			t.Fatalf("stripe-mock not answering after the inner test: %v", err)
		}
		resp.Body.Close()
	})
	select {
	case <-first.done:
	default:
		t.Fatalf("stripe-mock still running after its last user finished")
	}
	if shared.proc != nil {
		t.Fatalf("shared process not cleared")
	}
}
