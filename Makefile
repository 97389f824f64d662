# Confidential inference on AWS Nitro Enclaves: build, test and lint entry points.
# `make test` is what CI runs (.ci/run).

CARGO ?= cargo
STATE ?= state
FUZZ_SECONDS ?= 60

PYTHON ?= python3

.PHONY: build test test-deps lint bench mock-ca fuzz clean

build:
	$(CARGO) build --workspace --all-targets --locked

# Python packages the tests drive mock-kms with (boto3, as users will).
test-deps:
	$(PYTHON) -c "import boto3" 2>/dev/null || $(PYTHON) -m pip install --quiet --disable-pip-version-check boto3

# Every test in the workspace, the mock NSM included (its feature is test-only).
test: test-deps
	$(CARGO) test --workspace --all-features --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings

# Criterion benchmarks (full verification of a real document).
bench:
	$(CARGO) bench -p attestation-verifier --bench verify --locked

# The mock NSM's persisted CA for local mode (idempotent).
mock-ca:
	$(CARGO) run -q -p common --features mock-nsm --bin mock-ca --locked -- init $(STATE)/mock-ca

# Coverage-guided fuzzing of the verifier (libFuzzer through cargo-fuzz). cargo-fuzz needs
# nightly compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p attestation-verifier/fuzz/corpus/verify
	cp ../shared/vectors/nitro/*.cbor attestation-verifier/fuzz/corpus/verify/
	cd attestation-verifier && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run verify -- -max_total_time=$(FUZZ_SECONDS) -max_len=16384

clean:
	$(CARGO) clean
