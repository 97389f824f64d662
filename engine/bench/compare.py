#!/usr/bin/env python3
"""`make bench-engine`: our engine and llama.cpp side by side on the same GGUF, the same
prompt, the same machine and the same number of threads; prints both and the ratios.

llama.cpp runs in this process through llama-cpp-python; ours is `cargo build --release -p
engine --example bench`, run as a child process that prints JSON. Both do greedy decoding of
exactly --tokens tokens after a ChatML prompt (93 tokens for the default prompt), and each
figure is the median of --runs runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import llama_cpp
import llama_cpp.llama_cpp
import numpy as np

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def amx_cpu():
    """Whether this CPU advertises AMX: llama.cpp's AMX path (one of its "extra buffer types")
    crashes in `ggml_backend_amx_mul_mat` on such CPUs under KVM (seen on a Sapphire Rapids
    guest), so there llama.cpp runs without extra buffer types, which also turns off its
    weight repacking: its figures are then those of its plain CPU kernels, and say so."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_int8" in flags


def plain_llama_cpp():
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


def llama_cpp_bench(model, prompt, tokens, runs, threads):
    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    ttft, prefill, decode = [], [], []
    vocab = llm.n_vocab()

    def greedy():
        # The last position's logits straight from llama.cpp (`Llama.scores` only holds them
        # with logits_all, which would slow llama.cpp down).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    def once(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = greedy()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            llm.eval([tok])
            tok = greedy()
            out.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    once(8)  # warm-up
    for _ in range(runs):
        first, rest, out = once(tokens)
        ttft.append(first * 1e3)
        prefill.append(len(ids) / first)
        decode.append((tokens - 1) / rest)
    return {
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "prompt_tokens": len(ids),
        "ttft_ms": statistics.median(ttft),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "text": llm.detokenize(out).decode(errors="replace"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ours", required=True, help="the engine's bench binary")
    ap.add_argument("--prompt", default=os.path.join(os.path.dirname(__file__), "prompt.txt"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    prompt = open(a.prompt, encoding="utf-8").read().strip()

    plain = amx_cpu()
    if plain:
        plain_llama_cpp()
    ref = llama_cpp_bench(a.model, prompt, a.tokens, a.runs, a.threads)
    out = subprocess.run([a.ours, a.model, a.prompt, "--tokens", str(a.tokens), "--streams", str(a.streams),
                          "--runs", str(a.runs), "--threads", str(a.threads)],
                         check=True, capture_output=True, text=True,
                         # As the enclave runs (enclave/Dockerfile): freed KV caches go back.
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    ours = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"prompt: {ours['prompt_tokens']} tokens (llama.cpp: {ref['prompt_tokens']}), {a.tokens} greedy tokens, "
          f"{a.threads} threads, median of {a.runs}; kernels: {ours['kernels']}")
    print()
    print("| engine | time to first token | prefill | decode |")
    print("| --- | --- | --- | --- |")
    for r in (ref, ours):
        name = f"llama.cpp (llama-cpp-python {r['version']}{', no extra buffer types: AMX CPU' if plain else ''})" if r["engine"] == "llama.cpp" else "ours"
        print(f"| {name} | {r['ttft_ms']:.0f} ms | {r['prefill_tok_s']:.0f} tok/s | {r['decode_tok_s']:.1f} tok/s |")
    print(f"| ratio (ours / llama.cpp) | {ours['ttft_ms'] / ref['ttft_ms']:.2f}× | "
          f"{ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}× | {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}× |")
    print()
    agg = ours["aggregate_decode_tok_s"]
    print(f"ours, {ours['streams']} concurrent streams: {agg:.1f} tok/s aggregate decode "
          f"= {agg / ours['decode_tok_s']:.2f}× one stream")
    print(f"ours, peak RSS: {ours['peak_rss_mib']:.0f} MiB (model load {ours['load_ms']:.0f} ms)")
    print()
    print("llama.cpp greedy text:", repr(ref["text"][:300]))
    print("ours greedy text:     ", repr(ours["text"][:300]))


if __name__ == "__main__":
    main()
