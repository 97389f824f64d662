#!/usr/bin/env python3
"""`make bench-engine`: our engine and the references side by side on the same GGUF, the
same prompt, the same machine and the same number of threads; prints all of them and our
ratio to the fastest reference on each figure.

The references are llama.cpp (llama-cpp-python) and, where it is installed, ik_llama.cpp
(the `ik-llama-cpp-python` wheel, timed with our own loop over its C API: its Python sampler
walks the vocabulary in Python and would time the wrapper). With --q4_0 every engine also
runs a Q4_0 copy of the model made by llama.cpp's own quantizer, llama.cpp's fastest x86
path. Each reference runs in a child process of this script (the two ship different
`libggml.so` under one name); ours is `cargo build --release -p engine --example bench`, also
a child that prints JSON. All do greedy decoding of exactly --tokens tokens after a ChatML
prompt (93 tokens for the default prompt), and each figure is the median of --runs runs.

Concurrency: ours and llama.cpp's own server (the `xllamacpp` wheel embeds it: continuous
batching, one slot per stream) each get --streams requests at once (1, 8 and 32 by default),
greedy, --tokens each; the aggregate decode rate is the tokens made in the window where all
streams decode (from the last first token to the last end) over its length. Ours also reports
the median and 99th percentile time between two tokens of a stream.

The machines are shared (steal time of 25% and more comes and goes within minutes), so with
--rounds N the whole line-up, every engine on every file, runs N times one after the other and
each figure is the median over the rounds: a slow minute then costs every engine alike instead
of whichever happened to run in it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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
    import llama_cpp.llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


def chatml(prompt):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


def timed(ids, runs, tokens, step, greedy, reset):
    """Median time to first token, prefill and decode rates of `runs` greedy generations:
    `step(ids, pos)` evaluates tokens at positions pos.., `greedy()` picks the next one."""
    def once(n):
        reset()
        t0 = time.perf_counter()
        step(ids, 0)
        tok = greedy()
        t1 = time.perf_counter()
        out = [tok]
        for i in range(n - 1):
            step([tok], len(ids) + i)
            tok = greedy()
            out.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    once(8)  # warm-up
    ttft, prefill, decode = [], [], []
    for _ in range(runs):
        first, rest, out = once(tokens)
        ttft.append(first * 1e3)
        prefill.append(len(ids) / first)
        decode.append((tokens - 1) / rest)
    return {
        "prompt_tokens": len(ids),
        "ttft_ms": statistics.median(ttft),
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
    }, out


def llama_cpp_bench(model, prompt, tokens, runs, threads):
    import llama_cpp
    import llama_cpp.llama_cpp

    if amx_cpu():
        plain_llama_cpp()
    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(chatml(prompt).encode(), add_bos=False, special=True)
    vocab = llm.n_vocab()

    def greedy():
        # The last position's logits straight from llama.cpp (`Llama.scores` only holds them
        # with logits_all, which would slow llama.cpp down).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    r, out = timed(ids, runs, tokens, lambda t, _pos: llm.eval(t), greedy, llm.reset)
    plain = " (no extra buffer types: AMX CPU)" if amx_cpu() else ""
    return {**r, "engine": f"llama.cpp {llama_cpp.__version__}{plain}",
            "text": llm.detokenize(out).decode(errors="replace")}


def ik_llama_cpp_bench(model, prompt, tokens, runs, threads):
    from ik_llama_cpp import _ctypes_api as C
    from ik_llama_cpp._internals import IkContext, IkModel, make_batch_range
    from ik_llama_cpp.llama import _cpu_has_avx_vnni

    m = IkModel(model)
    # As the wheel's own `IkLlama` does: its flash attention needs AVX-VNNI (py-cpuinfo).
    ctx = IkContext(m, n_ctx=2048, n_threads=threads, flash_attn=_cpu_has_avx_vnni())
    ids = m.tokenize(chatml(prompt), add_bos=False, special=True)

    def step(toks, pos):
        for i in range(0, len(toks), 512):
            chunk = toks[i:i + 512]
            batch = make_batch_range(chunk, pos_start=pos + i, logits_last=i + 512 >= len(toks))
            try:
                if ctx.decode(batch) != 0:
                    raise RuntimeError("ik_llama.cpp: llama_decode failed")
            finally:
                C.llama_batch_free(batch)

    def greedy():
        logits = np.ctypeslib.as_array(ctx.get_logits(-1), shape=(m.n_vocab,))
        return int(np.argmax(logits))

    r, out = timed(ids, runs, tokens, step, greedy, ctx.kv_cache_clear)
    vnni = "" if _cpu_has_avx_vnni() else " (no flash attention: no AVX-VNNI)"
    return {**r, "engine": f"ik_llama.cpp (ik-llama-cpp-python 0.1.5){vnni}",
            "text": m.detokenize(out)}


def llama_server_bench(model, prompt, tokens, runs, threads, streams):
    """llama.cpp's server in process (xllamacpp), one server per stream count with that many
    slots, each slot's context room for the prompt and the answer. Its own timings give each
    request's decode time, so a request's first token is at its end minus that."""
    import threading

    import xllamacpp as xlc

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    request = {"messages": messages, "max_tokens": tokens, "temperature": 0.0, "top_k": 1,
               "ignore_eos": True, "cache_prompt": False}
    results = []
    for n in streams:
        p = xlc.CommonParams()
        p.model.path = model
        p.n_parallel = n
        p.n_ctx = n * 512
        p.n_batch = 512
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = True
        server = xlc.Server(p)
        server.handle_chat_completions({**request, "max_tokens": 8})
        aggregate = []
        for _ in range(runs):
            done = [None] * n

            def one(i):
                r = server.handle_chat_completions(request)
                done[i] = (time.perf_counter(), r["timings"])

            threads_ = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
            firsts = [end - t["predicted_ms"] / 1e3 for end, t in done]
            made = sum(t["predicted_n"] - 1 for _, t in done)
            aggregate.append(made / (max(end for end, _ in done) - max(firsts)))
        results.append({"streams": n, "aggregate_decode_tok_s": statistics.median(aggregate)})
        del server
    return {"engine": f"llama.cpp server (xllamacpp {xlc.__version__})", "concurrency": results}


REFERENCES = {"llama.cpp": llama_cpp_bench, "ik_llama.cpp": ik_llama_cpp_bench}


def installed(ref):
    module = {"llama.cpp": "llama_cpp", "ik_llama.cpp": "ik_llama_cpp",
              "llama.cpp server": "xllamacpp"}[ref]
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def q4_0_copy(model, work, threads):
    """The model requantized to Q4_0 by llama.cpp's own quantizer (cached in `work`)."""
    import ctypes

    import llama_cpp.llama_cpp as L

    os.makedirs(work, exist_ok=True)
    stem = os.path.splitext(os.path.basename(model))[0]
    out = os.path.join(work, f"{stem}.llama-quantize-Q4_0.gguf")
    if not os.path.exists(out):
        p = L.llama_model_quantize_default_params()
        p.nthread = threads
        p.ftype = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
        p.allow_requantize = True
        if L.llama_model_quantize(model.encode(), (out + ".tmp").encode(), ctypes.byref(p)) != 0:
            raise RuntimeError("llama.cpp could not quantize the model to Q4_0")
        os.rename(out + ".tmp", out)
    return out


def run_one(a, model, ref, common):
    """One engine on one file in a child process; its JSON result."""
    if ref:
        out = subprocess.run([sys.executable, __file__, "--ref", ref, "--model", model,
                              "--prompt", a.prompt, "--streams", a.streams, *common],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    out = subprocess.run([a.ours, model, a.prompt, "--streams", a.streams, *common],
                         check=True, capture_output=True, text=True,
                         # As the enclave runs (enclave/Dockerfile): freed KV caches go back.
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    ours["engine"] = f"ours ({ours['kernels']})"
    return ours


def median_of(results):
    """The median of every number over rounds (peak RSS: the largest); the rest from the first."""
    r = dict(results[0])
    for k, v in r.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [x[k] for x in results]
            r[k] = max(vals) if k == "peak_rss_mib" else statistics.median(vals)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ours", help="the engine's bench binary")
    ap.add_argument("--prompt", default=os.path.join(os.path.dirname(__file__), "prompt.txt"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,8,32", help="numbers of concurrent streams")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole line-up this many times, interleaved; medians over rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--q4_0", action="store_true",
                    help="also run every engine on a Q4_0 copy made by llama.cpp's quantizer")
    ap.add_argument("--work", default="state/bench", help="where the Q4_0 copy is kept")
    ap.add_argument("--ref", choices=sorted([*REFERENCES, "llama.cpp server"]),
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    prompt = open(a.prompt, encoding="utf-8").read().strip()
    if a.ref:
        # A child process: one reference, one model, JSON on the last line.
        if a.ref == "llama.cpp server":
            streams = [int(n) for n in a.streams.split(",")]
            r = llama_server_bench(a.model, prompt, a.tokens, a.runs, a.threads, streams)
        else:
            r = REFERENCES[a.ref](a.model, prompt, a.tokens, a.runs, a.threads)
        print(json.dumps(r))
        return
    if not a.ours:
        ap.error("--ours is required")

    refs = [r for r in REFERENCES if installed(r)]
    models = [a.model] + ([q4_0_copy(a.model, a.work, a.threads)] if a.q4_0 else [])
    common = ["--tokens", str(a.tokens), "--runs", str(a.runs), "--threads", str(a.threads)]
    plan = []
    for model in models:
        label = "Q4_0 copy (llama.cpp's quantizer)" if model != a.model else os.path.basename(model)
        plan += [(label, model, ref) for ref in refs] + [(label, model, None)]
    # The server runs on the file itself, beside ours.
    server = installed("llama.cpp server")
    results = {i: [] for i in range(len(plan))}
    served = []
    for _ in range(max(a.rounds, 1)):
        for i, (label, model, ref) in enumerate(plan):
            results[i].append(run_one(a, model, ref, common))
        if server:
            served.append(run_one(a, a.model, "llama.cpp server", common))
    rows = [(label, median_of(results[i])) for i, (label, _, _) in enumerate(plan)]
    ours_rows = [(label, r) for label, r in rows if r["engine"].startswith("ours")]

    rounds = f", median over {a.rounds} interleaved rounds" if a.rounds > 1 else ""
    print(f"{a.tokens} greedy tokens after the ChatML prompt, {a.threads} threads, "
          f"median of {a.runs} runs{rounds}")
    print()
    print("| model | engine | prompt | time to first token | prefill | decode |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        print(f"| {label} | {r['engine']} | {r['prompt_tokens']} | {r['ttft_ms']:.0f} ms | "
              f"{r['prefill_tok_s']:.0f} tok/s | {r['decode_tok_s']:.1f} tok/s |")
    refs_only = [r for _, r in rows if not r["engine"].startswith("ours")]
    if refs_only:
        def ratios(o, refs):
            return (f"TTFT {o['ttft_ms'] / min(r['ttft_ms'] for r in refs):.2f}×, prefill "
                    f"{o['prefill_tok_s'] / max(r['prefill_tok_s'] for r in refs):.2f}×, decode "
                    f"{o['decode_tok_s'] / max(r['decode_tok_s'] for r in refs):.2f}×")

        print()
        print("ours against the fastest reference (TTFT: lower is better), on the same file / on any file:")
        for label, o in ours_rows:
            same = [r for l, r in rows if l == label and not r["engine"].startswith("ours")]
            print(f"  {label}: {ratios(o, same)} / {ratios(o, refs_only)}")
    print()
    print("Concurrent streams (aggregate decode tok/s, and × that engine's own one stream; "
          "ours: time between tokens, median / p99):")
    print()
    ref_agg = {}
    if served:
        for c in served[0]["concurrency"]:
            vals = [x["aggregate_decode_tok_s"] for r in served for x in r["concurrency"]
                    if x["streams"] == c["streams"]]
            ref_agg[c["streams"]] = statistics.median(vals)
    ref_one = ref_agg.get(1)
    header = "| model | engine | " + " | ".join(f"{n} stream{'s' if n != '1' else ''}" for n in a.streams.split(",")) + " |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for label, o in ours_rows:
        per = {}
        for c in o["concurrency"]:
            vals = [x["aggregate_decode_tok_s"] for r in results[rows.index((label, o))]
                    for x in r["concurrency"] if x["streams"] == c["streams"]]
            per[c["streams"]] = (statistics.median(vals), c["itl_p50_ms"], c["itl_p99_ms"])
        one = per.get(1, (o["decode_tok_s"], 0, 0))[0]
        cells = [f"{v:.0f} ({v / one:.2f}×; {p50:.1f} / {p99:.1f} ms)" for v, p50, p99 in per.values()]
        print(f"| {label} | {o['engine']} | " + " | ".join(cells) + " |")
    if served:
        one = ref_one or 1.0
        cells = [f"{v:.0f} ({v / one:.2f}×)" for v in ref_agg.values()]
        print(f"| {os.path.basename(a.model)} | {served[0]['engine']} | " + " | ".join(cells) + " |")
    print()
    for label, o in ours_rows:
        print(f"ours on {label}: peak RSS {o['peak_rss_mib']:.0f} MiB (model load {o['load_ms']:.0f} ms)")
    print()
    for label, r in rows:
        print(f"{label}, {r['engine']}: {r['text'][:160]!r}")


if __name__ == "__main__":
    main()
