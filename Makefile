# thin-snapshotter: build, test, bench, demo.
#
#   make test   — everything: lint (below), unit tests (race), then on a real
#                 dm-thin kernel (directly on a host that has it as root,
#                 otherwise in a throwaway qemu VM: test/vm/run) the integration
#                 tests, containerd end to end, and the kill -9 soak.
#   make demo   — the whole stack (thin-snapshotter + containerd + a container) in the VM.
#   make proto  — regenerate the Go code of proto/ (committed; make lint checks it).

GO         ?= go
BIN        := bin
BENCHDIR   := .bench
PKGS       := ./...
# Packages whose tests need root and dm-thin (internal/imagefs: root, loop
# devices and mounts); their test binaries run in the VM.
DM_PKGS    := dmsetup internal/imagefs snapshotter cmd/thin-snapshotter test/contrib
VMFLAGS    ?=

.PHONY: all build test lint lint-tree lint-links lint-tools lint-fmt lint-vet lint-go lint-shell lint-proto proto proto-tools \
	test-unit test-integration test-vm test-soak test-e2e bench fuzz demo clean

all: build

# The version is the nearest tag (or the commit), the commit the full hash;
# `thin-snapshotter --version` prints them. Without git (a source tarball),
# the binary falls back to what the Go toolchain recorded.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS := -X main.version=$(VERSION) -X main.commit=$(COMMIT)

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/thin-snapshotter ./cmd/thin-snapshotter

test: lint test-unit test-integration test-e2e test-soak

# --- lint ---------------------------------------------------------------------
# In this order: no binaries or big files tracked, every relative link in
# the markdown files points at a file (and heading) that exists, formatting
# (gofmt and goimports, as .golangci.yml configures them), go vet,
# golangci-lint (.golangci.yml), shellcheck on every #! shell script.
# `make -k lint` goes on past a failing step to show them all.
lint: lint-tree lint-links lint-fmt lint-vet lint-go lint-shell lint-proto

# golangci-lint is pinned and installed once per GOPATH under a versioned name,
# so another version on PATH is never picked up.
GOLANGCI_LINT_VERSION := v2.15.0
GOPATH_BIN     = $(firstword $(subst :, ,$(shell $(GO) env GOPATH)))/bin
GOLANGCI_LINT  = $(GOPATH_BIN)/golangci-lint-$(GOLANGCI_LINT_VERSION)

lint-tree:
	test/lint/check-tree

lint-links:
	test/lint/check-links

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

# --- generated code -------------------------------------------------------------
# protoc is Debian's (apt-get install protobuf-compiler; .ci/run does): its
# version is in the generated headers, so regenerate with that one. The
# plugins are pinned: protoc-gen-go at go.mod's google.golang.org/protobuf,
# protoc-gen-go-grpc at a release whose code needs no newer grpc than
# go.mod's; both installed once per GOPATH under versioned names.
PROTOS                     := proto/thin/admin/v1/admin.proto
PROTOC_GEN_GO_VERSION       = $(shell $(GO) list -m -f '{{.Version}}' google.golang.org/protobuf)
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
PROTOC_GEN_GO               = $(GOPATH_BIN)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)
PROTOC_GEN_GO_GRPC          = $(GOPATH_BIN)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)

# $(call install-versioned,PACKAGE@VERSION,BINARY,TARGET)
define install-versioned
@if [ ! -x $(3) ]; then \
	echo "== installing $(1) as $(3)"; \
	tmp=$$(mktemp -d) && \
	GOBIN=$$tmp GOFLAGS= $(GO) install $(1) && \
	mkdir -p $(GOPATH_BIN) && mv $$tmp/$(2) $(3); \
	rc=$$?; rm -rf "$$tmp"; exit $$rc; \
fi
endef

proto-tools:
	@command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler"; exit 1; }
	$(call install-versioned,google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION),protoc-gen-go,$(PROTOC_GEN_GO))
	$(call install-versioned,google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION),protoc-gen-go-grpc,$(PROTOC_GEN_GO_GRPC))

# $(call protoc,OUT_DIR): generates the Go code of $(PROTOS) under OUT_DIR,
# laid out as under proto/.
define protoc
protoc -I proto --plugin=protoc-gen-go=$(PROTOC_GEN_GO) --plugin=protoc-gen-go-grpc=$(PROTOC_GEN_GO_GRPC) \
	--go_out=$(1) --go_opt=paths=source_relative \
	--go-grpc_out=$(1) --go-grpc_opt=paths=source_relative \
	$(PROTOS:proto/%=%)
endef

proto: proto-tools
	$(call protoc,proto)

# Regenerates into a temporary directory and fails on any difference with
# the committed code.
lint-proto: proto-tools
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(call protoc,$$tmp) && \
	stale=0 && for f in $$(cd $$tmp && find . -name '*.go' | sort); do \
		diff -u proto/$$f $$tmp/$$f || stale=1; \
	done && \
	if [ $$stale = 1 ]; then echo "generated code under proto/ is stale: run make proto"; exit 1; fi; \
	echo "lint-proto: generated code under proto/ is current"

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

# The pool fault tests swap dm-flakey in under a pool's devices.
test-integration test-vm: export THIN_VM_MODULES += dm-flakey
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

# Benchmarks: storage on the host; dm, snapshotter and daemon ones on the real
# kernel (in the VM unless this host has dm-thin), where they compare our
# client with the dmsetup CLI, thin with overlayfs, and a call through our
# socket with one in-process, in the same run.
BENCH_PKGS := dmsetup snapshotter cmd/thin-snapshotter
BENCHTIME  ?= 3s
bench: bench-go bench-containerd

.PHONY: bench-go
bench-go:
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
