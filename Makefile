# tally: build, check, test and run. `make help` lists the targets.
#
# Needs Go (the version in go.mod, or Go 1.21+ that fetches it), PostgreSQL
# (a server at PG_SERVER, or just the installed binaries: `make run` and
# `make test` then start a private server) and a C compiler for the race
# detector. Everything else (stripe-mock, oapi-codegen) comes pinned from the
# Go module proxy.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

# Every recipe works from the repository root, whatever directory make was
# started in (`make -C`, `make -f path/to/Makefile`).
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
BIN := $(ROOT)/bin
GO ?= go

# Debian's Go defaults to GOTOOLCHAIN=local; auto lets a Go 1.21 or later run
# the go.mod version (fetched from the module proxy) and changes nothing when
# the local one is recent enough. GOTOOLCHAIN=local make ... still wins.
GOTOOLCHAIN ?= auto
export GOTOOLCHAIN

ifndef VERSION
VERSION := $(shell git -C '$(ROOT)' describe --tags --always --dirty 2>/dev/null || echo dev)
endif

# stripe-mock is pinned; `make tools` installs exactly this version into bin/
# and the test harness finds it through TALLY_STRIPE_MOCK_BIN.
STRIPE_MOCK_VERSION := v0.203.0
STRIPE_MOCK := $(BIN)/stripe-mock
STRIPE_MOCK_STAMP := $(BIN)/.stripe-mock.version

# promtool checks deploy/prometheus's alert rules in the tests: the one on
# PATH (Debian's prometheus package; .ci/run installs it), else `make tools`
# builds this pinned one into bin/ (a few minutes, once). The tests find it
# through TALLY_PROMTOOL_BIN.
PROMTOOL_VERSION := v0.316.0
PROMTOOL := $(or $(shell command -v promtool 2>/dev/null),$(BIN)/promtool)

# PostgreSQL for `make run` and the tests: the server at PG_SERVER when it
# accepts the postgres user without a password; otherwise bin/tally-devdb
# starts a private server from the installed PostgreSQL binaries, with its
# files under PG_STATE, and stops it when the command ends. `make run` keeps
# its private database between runs (delete PG_STATE to start over); `make
# test` gets a fresh private server each time.
PG_SERVER ?= postgres://postgres@127.0.0.1:5432
PG_STATE ?= $(ROOT)/.state/postgres
RUN_DB ?= tally
RUN_DATABASE_URL ?= $(PG_SERVER)/$(RUN_DB)?sslmode=disable
TALLY_TEST_DATABASE_URL ?= $(PG_SERVER)/postgres?sslmode=disable
DEVDB := $(BIN)/tally-devdb
RUN_HTTP_ADDR ?= :8080
STRIPE_MOCK_PORT ?= 12111

# Development-only API keys for `make run`, docker-compose and `make bench`.
# The server is given only their SHA-256 (TALLY_API_KEYS); a caller sends the key
# itself as `Authorization: Bearer <key>`. Never use these outside a laptop.
DEV_API_KEY ?= tally_dev_service_key
DEV_ADMIN_KEY ?= tally_dev_admin_key
DEV_WEBHOOK_SECRET ?= whsec_dev

BENCH_URL ?= http://127.0.0.1:8080
BENCH_ARGS ?=
BENCH_SEED_ARGS ?=

IMAGE ?= tally:$(VERSION)

.PHONY: help tools generate check-generated fmt-check vet build devdb run \
	check-race test test-short bench bench-seed docker clean

help: ## list the targets
	@echo 'tally make targets:'
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

tools: ## install the pinned stripe-mock into bin/ (only when missing or another version), and promtool when none is on PATH
	@if [ -x '$(STRIPE_MOCK)' ] && [ "$$(cat '$(STRIPE_MOCK_STAMP)' 2>/dev/null)" = '$(STRIPE_MOCK_VERSION)' ]; then \
		echo 'stripe-mock $(STRIPE_MOCK_VERSION) is in bin/'; \
	else \
		echo 'installing stripe-mock $(STRIPE_MOCK_VERSION) into bin/ from the Go module proxy'; \
		rm -f '$(STRIPE_MOCK_STAMP)'; \
		cd '$(ROOT)' && GOBIN='$(BIN)' $(GO) install github.com/stripe/stripe-mock@$(STRIPE_MOCK_VERSION); \
		echo '$(STRIPE_MOCK_VERSION)' > '$(STRIPE_MOCK_STAMP)'; \
	fi
	@if [ ! -x '$(PROMTOOL)' ]; then \
		echo 'no promtool on PATH: building promtool $(PROMTOOL_VERSION) into bin/ from the Go module proxy (a few minutes, once)'; \
		cd '$(ROOT)' && GOBIN='$(BIN)' GOFLAGS=-mod=mod $(GO) install github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION); \
	fi

generate: ## regenerate api/ and pkg/client/ from openapi.yaml
	cd '$(ROOT)' && $(GO) generate ./api/... ./pkg/client/...

# Regenerates into a throw-away copy of the tree and compares: the result
# depends only on the files as they are, not on what git has committed, and
# the working tree is never touched.
check-generated: ## fail if the generated code does not match openapi.yaml
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	tar -C '$(ROOT)' --exclude=./.git --exclude=./bin --exclude=./.state -cf - . | tar -C "$$tmp" -xf -; \
	(cd "$$tmp" && $(GO) generate ./api/... ./pkg/client/...); \
	stale=0; \
	for dir in api pkg/client; do \
		diff -ru "$(ROOT)/$$dir" "$$tmp/$$dir" >&2 || stale=1; \
	done; \
	if [ $$stale -ne 0 ]; then \
		echo 'generated code is stale: run make generate' >&2; exit 1; \
	fi; \
	echo 'generated code is up to date'

# Tracked and untracked-but-not-ignored files, so a new file is checked before
# its first commit; outside a git checkout every .go file under the root.
fmt-check: ## fail if any Go file is not gofmt-formatted
	@cd '$(ROOT)'; \
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		files=$$(git ls-files --cached --others --exclude-standard -- '*.go'); \
	else \
		files=$$(find . -name '*.go' -not -path './bin/*' -not -path './.git/*'); \
	fi; \
	gofmt="$$($(GO) env GOROOT)/bin/gofmt"; \
	bad=$$(for f in $$files; do [ -f "$$f" ] && printf '%s\n' "$$f"; done | xargs -r "$$gofmt" -l); \
	if [ -n "$$bad" ]; then \
		printf 'these files are not gofmt-formatted (run gofmt -w on them):\n%s\n' "$$bad" >&2; exit 1; \
	fi; \
	echo 'gofmt: all Go files formatted'

vet: ## go vet every package
	cd '$(ROOT)' && $(GO) vet ./...

build: ## build the static binary bin/tally
	cd '$(ROOT)' && CGO_ENABLED=0 $(GO) build -trimpath \
		-ldflags '-X main.version=$(VERSION)' -o '$(BIN)/tally' ./cmd/tally
	@echo 'built bin/tally $(VERSION)'

# Runs a command against PostgreSQL (see PG_SERVER above); not for direct use.
devdb:
	@cd '$(ROOT)' && CGO_ENABLED=0 $(GO) build -o '$(DEVDB)' ./cmd/tally-devdb

# A local server against PostgreSQL (a private one stops when tally stops).
# STRIPE=sandbox (the default) runs the offline Stripe sandbox inside tally:
# its hosted checkout page, dashboard and demo app, webhooks delivered to
# tally, state kept in the database. STRIPE=mock starts stripe-mock
# alongside instead (stateless: nothing can be paid). The catalog is
# deploy/catalog.example.yaml.
STRIPE ?= sandbox
RUN_PORT := $(lastword $(subst :, ,$(RUN_HTTP_ADDR)))
RUN_URL ?= http://localhost:$(RUN_PORT)
# The end-user token secret of `make run` (the demo app signs in with it).
DEV_JWT_SECRET ?= tally-dev-jwt-secret-for-make-run-only

run: build devdb $(if $(filter mock,$(STRIPE)),tools) ## run tally locally on :8080 with the Stripe sandbox (STRIPE=mock: stripe-mock)
	@case '$(STRIPE)' in sandbox|mock) ;; *) echo "make run: STRIPE must be sandbox or mock, not '$(STRIPE)'" >&2; exit 2;; esac
	@echo 'dev API keys (development only; send as "Authorization: Bearer <key>"):'
	@echo '  service: $(DEV_API_KEY)'
	@echo '  admin:   $(DEV_ADMIN_KEY)'
	@if [ '$(STRIPE)' = sandbox ]; then \
		echo 'stripe:   the offline sandbox inside tally (no Stripe account; webhook secret $(DEV_WEBHOOK_SECRET))'; \
		echo '  demo app:  $(RUN_URL)/sandbox/demo'; \
		echo '  dashboard: $(RUN_URL)/sandbox'; \
	else \
		echo 'stripe:   stripe-mock on http://127.0.0.1:$(STRIPE_MOCK_PORT), webhook secret $(DEV_WEBHOOK_SECRET)'; \
	fi
	@if [ '$(STRIPE)' = mock ]; then \
		'$(STRIPE_MOCK)' -http-port $(STRIPE_MOCK_PORT) >/dev/null 2>&1 & mock=$$!; \
		trap 'kill $$mock 2>/dev/null || true' EXIT; \
		stripe_env=(TALLY_STRIPE_SECRET_KEY=sk_test_123 TALLY_STRIPE_API_URL='http://127.0.0.1:$(STRIPE_MOCK_PORT)'); \
	else \
		stripe_env=(TALLY_STRIPE_SANDBOX=true TALLY_STRIPE_SECRET_KEY=sk_test_sandbox \
			TALLY_STRIPE_SANDBOX_URL='$(RUN_URL)' TALLY_STRIPE_SANDBOX_DEMO_KEY='$(DEV_API_KEY)'); \
	fi; \
	trap 'exit 130' INT TERM; \
	service_hash=$$(printf '%s' '$(DEV_API_KEY)' | sha256sum | cut -d' ' -f1); \
	admin_hash=$$(printf '%s' '$(DEV_ADMIN_KEY)' | sha256sum | cut -d' ' -f1); \
	cd '$(ROOT)' && env "$${stripe_env[@]}" \
	TALLY_HTTP_ADDR='$(RUN_HTTP_ADDR)' \
	TALLY_AUTO_MIGRATE=true \
	TALLY_CATALOG_FILE='$(ROOT)/deploy/catalog.example.yaml' \
	TALLY_API_KEYS="service:$$service_hash,admin:$$admin_hash" \
	TALLY_JWT_HS256_SECRET='$(DEV_JWT_SECRET)' \
	TALLY_CORS_ORIGINS='$(RUN_URL),http://127.0.0.1:$(RUN_PORT),http://localhost:3000' \
	TALLY_STRIPE_WEBHOOK_SECRETS='$(DEV_WEBHOOK_SECRET)' \
	'$(DEVDB)' -url '$(RUN_DATABASE_URL)' -create -keep run -state '$(PG_STATE)' -env TALLY_DATABASE_URL -- \
		'$(BIN)/tally' serve

# The race detector needs cgo, and cgo needs a C compiler; without one the go
# command turns cgo off and `go test -race` fails with a less helpful message.
check-race:
	@if [ "$$(cd '$(ROOT)' && $(GO) env CGO_ENABLED)" != 1 ]; then \
		echo 'make test runs the race detector, which needs cgo and a C compiler: apt-get install -y gcc' >&2; \
		exit 1; \
	fi

# Independent tests run in parallel (t.Parallel), TEST_PARALLEL at a time in
# each package: most of an end-to-end test is waiting on its server, so more
# than the CPU count pays. TEST_PACKAGES test binaries run at once (go test
# -p, which also bounds the compiles and links; its default is the CPU
# count): cmd/tally's binary runs for most of the suite while its tests wait
# on their servers, and with two slots on two CPUs every other package was
# compiled, linked and run one after another in the other, which took longer
# than cmd/tally. Test pools are small enough that the whole suite fits
# PostgreSQL's default max_connections of 100 (about 70 at the peak with
# these settings), which is what a private test server gets, so a suite that
# needs more fails here first.
TEST_PARALLEL ?= 4
TEST_PACKAGES ?= 3
TEST_MAX_CONNECTIONS ?= 100

test: check-race tools devdb fmt-check vet check-generated ## the test command: checks, then every test under the race detector
	cd '$(ROOT)' && TALLY_STRIPE_MOCK_BIN='$(STRIPE_MOCK)' TALLY_PROMTOOL_BIN='$(PROMTOOL)' \
	'$(DEVDB)' -url '$(TALLY_TEST_DATABASE_URL)' -state '$(PG_STATE)' -max-connections $(TEST_MAX_CONNECTIONS) -env TALLY_TEST_DATABASE_URL -- \
		$(GO) test -race -count=1 -p $(TEST_PACKAGES) -parallel $(TEST_PARALLEL) -timeout 20m ./...

test-short: tools devdb ## the quick loop: unit and database tests under -short (no end-to-end servers), without the race detector
	cd '$(ROOT)' && TALLY_STRIPE_MOCK_BIN='$(STRIPE_MOCK)' TALLY_PROMTOOL_BIN='$(PROMTOOL)' \
	'$(DEVDB)' -url '$(TALLY_TEST_DATABASE_URL)' -state '$(PG_STATE)' -max-connections $(TEST_MAX_CONNECTIONS) -env TALLY_TEST_DATABASE_URL -- \
		$(GO) test -short -count=1 -p $(TEST_PACKAGES) -parallel $(TEST_PARALLEL) ./...

# Drives an already running server (for example `make run` in another shell)
# and measures raw-SQL baselines on the same database.
bench: ## load-test a running server (BENCH_URL, BENCH_ARGS): throughput, latency, PASS/MISS per target
	cd '$(ROOT)' && \
	TALLY_BENCH_URL='$(BENCH_URL)' \
	TALLY_BENCH_API_KEY='$(DEV_API_KEY)' \
	TALLY_BENCH_ADMIN_KEY='$(DEV_ADMIN_KEY)' \
	TALLY_BENCH_WEBHOOK_SECRET='$(DEV_WEBHOOK_SECRET)' \
	TALLY_BENCH_DATABASE_URL='$(RUN_DATABASE_URL)' \
		$(GO) run ./cmd/tally-bench $(BENCH_ARGS)

# Loads 1M customers, 10M ledger entries and 10M usage events into the
# database of `make run` (which must have migrated it), resumably; then
# `make bench BENCH_ARGS='-verify db'` measures against the large database.
bench-seed: ## load the large benchmark data set into RUN_DB (BENCH_SEED_ARGS, e.g. -seed-customers 100000)
	cd '$(ROOT)' && \
	TALLY_BENCH_DATABASE_URL='$(RUN_DATABASE_URL)' \
		$(GO) run ./cmd/tally-bench -seed $(BENCH_SEED_ARGS)

docker: ## build the container image (IMAGE, default tally:<version>)
	docker build --build-arg VERSION='$(VERSION)' -t '$(IMAGE)' '$(ROOT)'

clean: ## remove bin/ (the binary and the installed tools)
	rm -rf '$(BIN)'
