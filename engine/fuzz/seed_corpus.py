#!/usr/bin/env python3
"""Seeds the GGUF fuzz corpus: the head of the real default model (header, metadata, tensor
table start) and a tiny complete llama GGUF written here, so the fuzzer starts from valid
structure. Usage: seed_corpus.py MODEL.gguf OUT_DIR"""
import os
import struct
import sys


def string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, payload):
    return string(key) + struct.pack("<I", ty) + payload


def tiny_llama():
    u32 = lambda k, v: kv(k, 4, struct.pack("<I", v))
    f32 = lambda k, v: kv(k, 6, struct.pack("<f", v))
    s = lambda k, v: kv(k, 8, string(v))
    tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ"]
    arr_str = lambda k, vals: kv(k, 9, struct.pack("<IQ", 8, len(vals)) + b"".join(string(v) for v in vals))
    arr_i32 = lambda k, vals: kv(k, 9, struct.pack("<IQ", 5, len(vals)) + b"".join(struct.pack("<i", v) for v in vals))
    kvs = [
        s("general.architecture", "llama"), u32("llama.block_count", 1), u32("llama.embedding_length", 32),
        u32("llama.feed_forward_length", 32), u32("llama.attention.head_count", 2),
        u32("llama.attention.head_count_kv", 1), u32("llama.context_length", 64),
        f32("llama.rope.freq_base", 10000.0), f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        s("tokenizer.ggml.model", "gpt2"), s("tokenizer.ggml.pre", "smollm"), arr_str("tokenizer.ggml.tokens", tokens),
        arr_i32("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1]), arr_str("tokenizer.ggml.merges", ["a b"]),
        u32("tokenizer.ggml.eos_token_id", 1), u32("general.alignment", 32),
    ]
    # Tensors: norms F32 [32]; matrices Q8_0 (34 bytes per 32 values).
    tensors, data = [], b""
    def add(name, dims, ty, nbytes):
        nonlocal data
        tensors.append(string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                       + struct.pack("<IQ", ty, len(data)))
        data += bytes(nbytes) + bytes((-nbytes) % 32)
    add("token_embd.weight", [32, len(tokens)], 8, 34 * len(tokens))
    add("output_norm.weight", [32], 0, 128)
    for w in ["attn_norm", "ffn_norm"]:
        add(f"blk.0.{w}.weight", [32], 0, 128)
    for w, rows in [("attn_q", 32), ("attn_k", 16), ("attn_v", 16), ("attn_output", 32), ("ffn_gate", 32), ("ffn_up", 32), ("ffn_down", 32)]:
        add(f"blk.0.{w}.weight", [32, rows], 8, 34 * rows)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    head += bytes((-len(head)) % 32)
    return head + data


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    with open(model, "rb") as f:
        open(os.path.join(out, "smollm2-head"), "wb").write(f.read(65536))
    open(os.path.join(out, "tiny-llama"), "wb").write(tiny_llama())


if __name__ == "__main__":
    main()
