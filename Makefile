# thin-snapshotter: build, test, bench, demo.
#
#   make test   — everything: lint (below), unit tests (race), then on a real
#                 dm-thin kernel (directly on a host that has it as root,
#                 otherwise in a throwaway qemu VM: test/vm/run) the integration
#                 tests, containerd end to end, and the kill -9 soak.
#   make demo   — the whole stack (thin-snapshotter + containerd + a container) in the VM.

GO         ?= go
BIN        := bin
BENCHDIR   := .bench
PKGS       := ./...
# Packages whose tests need root and dm-thin; their test binaries run in the VM.
DM_PKGS    := dmsetup snapshotter cmd/thin-snapshotter test/contrib
VMFLAGS    ?=

.PHONY: all build test lint lint-tree lint-tools lint-fmt lint-vet lint-go lint-shell \
	test-unit test-integration test-vm test-soak test-e2e bench fuzz demo clean

all: build

build:
	$(GO) build -o $(BIN)/thin-snapshotter ./cmd/thin-snapshotter

test: lint test-unit test-integration test-e2e test-soak

# --- lint ---------------------------------------------------------------------
# In this order: no binaries or big files tracked, formatting (gofmt and
# goimports, as .golangci.yml configures them), go vet, golangci-lint
# (.golangci.yml), shellcheck on every #! shell script. `make -k lint` goes on
# past a failing step to show them all.
lint: lint-tree lint-fmt lint-vet lint-go lint-shell

# golangci-lint is pinned and installed once per GOPATH under a versioned name,
# so another version on PATH is never picked up.
GOLANGCI_LINT_VERSION := v2.15.0
GOPATH_BIN     = $(firstword $(subst :, ,$(shell $(GO) env GOPATH)))/bin
GOLANGCI_LINT  = $(GOPATH_BIN)/golangci-lint-$(GOLANGCI_LINT_VERSION)

lint-tree:
	test/lint/check-tree

# Installs golangci-lint when missing or not the pinned version. shellcheck
# comes from Debian's package (apt-get install shellcheck; .ci/run does).
lint-tools:
	@if [ "$$($(GOLANGCI_LINT) version --short 2>/dev/null)" != "$(GOLANGCI_LINT_VERSION:v%=%)" ]; then \
		echo "== installing golangci-lint $(GOLANGCI_LINT_VERSION) as $(GOLANGCI_LINT)"; \
		tmp=$$(mktemp -d) && \
		GOBIN=$$tmp GOFLAGS= $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION) && \
		mkdir -p $(GOPATH_BIN) && mv $$tmp/golangci-lint $(GOLANGCI_LINT); \
		rc=$$?; rm -rf "$$tmp"; exit $$rc; \
	fi

# Prints the diff and fails when a file is not formatted; `$(GOLANGCI_LINT) fmt`
# (the path `make lint` prints) rewrites them.
lint-fmt: lint-tools
	$(GOLANGCI_LINT) fmt --diff

lint-vet:
	$(GO) vet $(PKGS)

lint-go: lint-tools
	$(GOLANGCI_LINT) run $(PKGS)

lint-shell:
	test/lint/shellcheck

test-unit:
	$(GO) test -race -count=1 $(PKGS)

# --- on the real kernel -------------------------------------------------------
# $(call on-kernel,PKGS,TEST_FLAGS,VM_FLAGS,ENV)
# Builds the test binaries of PKGS into $(BENCHDIR) (dmsetup.test,
# cmd_thin-snapshotter.test, ...) and runs them with test/run-integration on a
# real dm-thin kernel: directly when this host has one and we are root
# (test/vm/have-dm), else in a throwaway qemu VM (test/vm/run VM_FLAGS
# $(VMFLAGS)). TEST_FLAGS follow run-integration's own flags (-test.v
# -test.count=1 -test.timeout 40m), so they can override them; ENV (KEY=VALUE
# ...) is the tests' environment either way.
HAVE_DM := test/vm/have-dm
define on-kernel
@mkdir -p $(BENCHDIR)
@for p in $(1); do $(GO) test -c -o $(BENCHDIR)/$$(echo $$p | tr / _).test ./$$p || exit 1; done
@if $(HAVE_DM); then \
	echo "== host has dm-thin: running $(strip $(1)) directly"; \
	env $(4) test/run-integration $(BENCHDIR) $(1) -- $(2); \
else \
	echo "== no dm-thin on this host: running $(strip $(1)) in the VM"; \
	test/vm/run $(3) $(VMFLAGS) $(addprefix --env ,$(4)) -- test/run-integration $(BENCHDIR) $(1) -- $(2); \
fi
endef

test-integration: build
	$(call on-kernel,$(DM_PKGS))

# test-integration, in the VM even on a host that has dm-thin.
test-vm: HAVE_DM := false
test-vm: build
	$(call on-kernel,$(DM_PKGS))

# Soak: kill -9 the daemon at random moments under a concurrent workload
# (30 rounds by default), reboot simulations, offline checks, then
# containerd's testsuite; in the VM unless this host has dm-thin.
# SOAK_FLAGS e.g. -soak.rounds 50 -soak.seed N (see test/soak). By default
# the testsuite's 128LayersMount is left out (5 min in the VM; the full
# suite on thin runs in test-integration): SOAK_FLAGS= runs it too.
SOAK_FLAGS ?= -test.skip 'SoakKill9/containerd-testsuite/128LayersMount'
test-soak: build
	$(call on-kernel,test/soak,$(SOAK_FLAGS),--timeout 1800 --out $(BENCHDIR)/soak-logs)

# Benchmarks: storage on the host; dm and snapshotter ones on the real kernel
# (in the VM unless this host has dm-thin), where they compare our client with
# the dmsetup CLI and thin with overlayfs in the same run.
BENCH_PKGS := dmsetup snapshotter
BENCHTIME  ?= 3s
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./storage/
	$(call on-kernel,$(BENCH_PKGS),-test.run '^$$' -test.bench . -test.benchtime $(BENCHTIME))

# Each fuzz target of these packages for FUZZTIME.
FUZZ_PKGS := dmsetup storage
FUZZTIME  ?= 20s
fuzz:
	@for p in $(FUZZ_PKGS); do \
		for f in $$($(GO) test -list '^Fuzz' ./$$p | grep ^Fuzz); do \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./$$p || exit 1; \
		done; \
	done

# End-to-end: thin-snapshotter + containerd $(CONTAINERD_VERSION) + runc on a real
# dm-thin kernel (test/e2e), through ctr and through CRI (crictl, a registry,
# CNI). containerd and the CRI tools are go-installed on the host once. In the
# VM, CRI needs "/" to be a mount point (thin_vm.switch_root) and the bridge
# and veth modules for CNI.
CONTAINERD_VERSION ?= v2.4.2
CONTAINERD_DIR     ?= $(BENCHDIR)/containerd-$(CONTAINERD_VERSION)
CRI_TOOLS_DIR      ?= $(BENCHDIR)/cri-tools
E2E_FLAGS          ?=
test-e2e: export THIN_VM_CMDLINE += thin_vm.switch_root
test-e2e: export THIN_VM_MODULES += bridge veth
test-e2e: build
	CONTAINERD_VERSION=$(CONTAINERD_VERSION) test/e2e/ensure-containerd $(CONTAINERD_DIR)
	test/e2e/ensure-cri-tools $(CRI_TOOLS_DIR)
	$(call on-kernel,test/e2e,-test.timeout 30m $(E2E_FLAGS),--mem 4096 --timeout 2400 --out $(BENCHDIR)/e2e-logs,\
		THIN_E2E_CONTAINERD_DIR=$(abspath $(CONTAINERD_DIR)) THIN_E2E_CRI_TOOLS=$(abspath $(CRI_TOOLS_DIR)))

# The demo: the whole stack in the VM, narrated (test/demo/run).
demo: build
	CONTAINERD_VERSION=$(CONTAINERD_VERSION) test/e2e/ensure-containerd $(CONTAINERD_DIR)
	@mkdir -p $(BENCHDIR)
	$(GO) build -o $(BENCHDIR)/mkimage ./test/demo/mkimage
	test/vm/run --mem 3072 --timeout 1200 $(VMFLAGS) -- test/demo/run $(abspath $(BIN)) $(abspath $(CONTAINERD_DIR)) $(abspath $(BENCHDIR))/mkimage

clean:
	rm -rf $(BIN) $(BENCHDIR)
