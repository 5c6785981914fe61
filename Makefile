# thin-snapshotter: build, test, bench, demo.
#
#   make test   — everything: gofmt, vet, unit tests (race), then on a real
#                 dm-thin kernel (directly on a host that has it as root,
#                 otherwise in a throwaway qemu VM: test/vm/run) the integration
#                 tests, containerd end to end, and the kill -9 soak.
#   make demo   — the whole stack (thin-snapshotter + containerd + a container) in the VM.

GO         ?= go
BIN        := bin
BENCHDIR   := .bench
PKGS       := ./...
# Packages whose tests need root and dm-thin; their test binaries run in the VM.
DM_PKGS    := dmsetup snapshotter cmd/thin-snapshotter
VMFLAGS    ?=

.PHONY: all build test lint test-unit test-integration test-vm bench bench-vm fuzz demo clean

all: build

build:
	$(GO) build -o $(BIN)/thin-snapshotter ./cmd/thin-snapshotter

test: lint test-unit test-integration test-e2e test-soak

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

test-unit:
	$(GO) test -race -count=1 $(PKGS)

# Builds the integration test binaries, then runs them on a real kernel:
# directly when this host has dm-thin and we are root, else inside the VM.
test-integration: build
	@mkdir -p $(BENCHDIR)
	@for p in $(DM_PKGS); do $(GO) test -c -o $(BENCHDIR)/$$(echo $$p | tr / _).test ./$$p || exit 1; done
	@if test/vm/have-dm; then \
		echo "== host has dm-thin: running integration tests directly"; \
		THIN_TEST_REQUIRE_DM=1 test/run-integration $(BENCHDIR) $(DM_PKGS); \
	else \
		echo "== no dm-thin on this host: running integration tests in the VM"; \
		test/vm/run $(VMFLAGS) -- test/run-integration $(BENCHDIR) $(DM_PKGS); \
	fi

test-vm: build
	@mkdir -p $(BENCHDIR)
	@for p in $(DM_PKGS); do $(GO) test -c -o $(BENCHDIR)/$$(echo $$p | tr / _).test ./$$p || exit 1; done
	test/vm/run $(VMFLAGS) -- test/run-integration $(BENCHDIR) $(DM_PKGS)

# Soak: kill -9 the daemon at random moments under a concurrent workload
# (30 rounds by default), reboot simulations, offline checks, then
# containerd's testsuite; in the VM unless this host has dm-thin.
# SOAK_FLAGS e.g. -soak.rounds 50 -soak.seed N (see test/soak). By default
# the testsuite's 128LayersMount is left out (5 min in the VM; the full
# suite on thin runs in test-integration): SOAK_FLAGS= runs it too.
SOAK_FLAGS ?= -test.skip 'SoakKill9/containerd-testsuite/128LayersMount'
.PHONY: test-soak
test-soak: build
	@mkdir -p $(BENCHDIR)
	$(GO) test -c -o $(BENCHDIR)/test_soak.test ./test/soak
	@if test/vm/have-dm; then \
		test/run-integration $(BENCHDIR) test/soak -- $(SOAK_FLAGS); \
	else \
		test/vm/run --timeout 1800 $(VMFLAGS) --out $(BENCHDIR)/soak-logs -- test/run-integration $(BENCHDIR) test/soak -- $(SOAK_FLAGS); \
	fi

# Benchmarks: storage on the host; dm and snapshotter ones on the real kernel
# (in the VM unless this host has dm-thin), where they compare our client with
# the dmsetup CLI and thin with overlayfs in the same run.
BENCH_PKGS := dmsetup snapshotter
BENCHTIME  ?= 3s
bench: bench-go bench-containerd

.PHONY: bench-go
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem ./storage/
	@mkdir -p $(BENCHDIR)
	@for p in $(BENCH_PKGS); do $(GO) test -c -o $(BENCHDIR)/$$p.test ./$$p || exit 1; done
	@if test/vm/have-dm; then \
		test/run-integration $(BENCHDIR) $(BENCH_PKGS) -- -test.run '^$$' -test.bench . -test.benchtime $(BENCHTIME); \
	else \
		test/vm/run $(VMFLAGS) -- test/run-integration $(BENCHDIR) $(BENCH_PKGS) -- -test.run '^$$' -test.bench . -test.benchtime $(BENCHTIME); \
	fi

fuzz:
	@for f in $$($(GO) test -list '^Fuzz' ./dmsetup | grep ^Fuzz); do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 20s ./dmsetup || exit 1; done
	@for f in $$($(GO) test -list '^Fuzz' ./storage | grep ^Fuzz); do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime 20s ./storage || exit 1; done

# End-to-end: thin-snapshotter + containerd $(CONTAINERD_VERSION) + runc on a real
# dm-thin kernel (test/e2e). containerd is go-installed on the host once.
CONTAINERD_VERSION ?= v2.4.2
CONTAINERD_DIR     ?= $(BENCHDIR)/containerd-$(CONTAINERD_VERSION)
.PHONY: test-e2e
test-e2e: build
	CONTAINERD_VERSION=$(CONTAINERD_VERSION) test/e2e/ensure-containerd $(CONTAINERD_DIR)
	@mkdir -p $(BENCHDIR)
	$(GO) test -c -o $(BENCHDIR)/e2e.test ./test/e2e
	@if test/vm/have-dm; then \
		THIN_TEST_REQUIRE_DM=1 THIN_E2E_CONTAINERD_DIR=$(abspath $(CONTAINERD_DIR)) $(BENCHDIR)/e2e.test -test.v -test.count=1 -test.timeout 30m; \
	else \
		test/vm/run --mem 4096 --timeout 2400 $(VMFLAGS) --out $(BENCHDIR)/e2e-logs \
			--env THIN_E2E_CONTAINERD_DIR=$(abspath $(CONTAINERD_DIR)) -- \
			$(BENCHDIR)/e2e.test -test.v -test.count=1 -test.timeout 30m; \
	fi

# Every snapshot call through containerd $(CONTAINERD_VERSION) on overlayfs, thin
# and containerd's devmapper in one run, one table (test/bench): in the VM
# unless this host has dm-thin. The table also goes to $(BENCHDIR)/bench-results.txt.
# BENCH_FLAGS e.g. -scale 2000 -layers 10 (.bench/containerd-bench -h lists them).
BENCH_FLAGS ?=
.PHONY: bench-containerd
bench-containerd: build
	CONTAINERD_VERSION=$(CONTAINERD_VERSION) test/e2e/ensure-containerd $(CONTAINERD_DIR)
	@mkdir -p $(BENCHDIR)
	$(GO) build -o $(BENCHDIR)/containerd-bench ./test/bench
	@if test/vm/have-dm; then \
		$(BENCHDIR)/containerd-bench -containerd-dir $(abspath $(CONTAINERD_DIR)) -out $(BENCHDIR)/bench-results.txt $(BENCH_FLAGS); \
	else \
		test/vm/run --disk 16G --mem 4096 --timeout 3600 $(VMFLAGS) --out $(BENCHDIR)/bench-out -- \
			$(BENCHDIR)/containerd-bench -containerd-dir $(abspath $(CONTAINERD_DIR)) $(BENCH_FLAGS) && \
		cp $(BENCHDIR)/bench-out/bench-results.txt $(BENCHDIR)/bench-out/bench-results.csv $(BENCHDIR)/; \
	fi

# The demo: the whole stack in the VM, narrated (test/demo/run).
demo: build
	CONTAINERD_VERSION=$(CONTAINERD_VERSION) test/e2e/ensure-containerd $(CONTAINERD_DIR)
	@mkdir -p $(BENCHDIR)
	$(GO) build -o $(BENCHDIR)/mkimage ./test/demo/mkimage
	test/vm/run --mem 3072 --timeout 1200 $(VMFLAGS) -- test/demo/run $(abspath $(BIN)) $(abspath $(CONTAINERD_DIR)) $(abspath $(BENCHDIR))/mkimage

clean:
	rm -rf $(BIN) $(BENCHDIR)
