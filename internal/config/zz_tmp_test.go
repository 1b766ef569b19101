package config

import (
	"fmt"
	"os"
	"reflect"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

func FuzzTmpHang(f *testing.F) {
	f.Add([]byte(goodCatalog))
	f.Add([]byte("credit_packs: [{id: a, name: A, amount: 1, currency: usd, credits: 1, expires_after: 1h30m}]"))
	f.Add([]byte("&a [*a]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		stage := make(chan string, 4)
		done := make(chan struct{})
		go func() {
			defer close(done)
			stage <- "parse"
			c, err := ParseCatalog(data)
			if err != nil {
				return
			}
			stage <- "marshal"
			out, _ := yaml.Marshal(toDoc(c))
			stage <- "reparse"
			again, _ := ParseCatalog(out)
			_ = reflect.DeepEqual(c, again)
		}()
		last := ""
		timer := time.After(3 * time.Second)
		for {
			select {
			case s := <-stage:
				last = s
			case <-done:
				return
			case <-timer:
				os.WriteFile(fmt.Sprintf("/tmp/hang-%d.bin", time.Now().UnixNano()), data, 0o644)
				panic("hang in stage " + last + fmt.Sprintf(": %q", data))
			}
		}
	})
}
