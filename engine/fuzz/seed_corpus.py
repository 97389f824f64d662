#!/usr/bin/env python3
"""Seeds the GGUF fuzz corpus: the head of the real default model (header, metadata, tensor
table start), a tiny complete llama GGUF and a tiny gemma3 one (SentencePiece, K-quants)
written here, so the fuzzer starts from valid structure. Usage: seed_corpus.py MODEL.gguf OUT_DIR"""
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


# GGML type ids and (weights, bytes) per block, for the K-quant seed.
TYPES = {"Q5_0": (6, 32, 22), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210)}


def tiny_gemma3():
    """A tiny complete gemma3 GGUF with a SentencePiece vocabulary and K-quant matrices (rows
    of 256 weights), so the fuzzer reaches the SentencePiece builder, the sliding-window
    configuration and the K-quant repacking."""
    u32 = lambda k, v: kv(k, 4, struct.pack("<I", v))
    f32 = lambda k, v: kv(k, 6, struct.pack("<f", v))
    s = lambda k, v: kv(k, 8, string(v))
    b = lambda k, v: kv(k, 7, struct.pack("<?", v))
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\u2581", "a", "b",
              "\u2581a", "ab", "<0x41>", "<0x0A>"]
    types = [3, 3, 3, 2, 3, 3, 1, 1, 1, 1, 1, 6, 6]
    arr_str = lambda k, vals: kv(k, 9, struct.pack("<IQ", 8, len(vals)) + b"".join(string(v) for v in vals))
    arr_i32 = lambda k, vals: kv(k, 9, struct.pack("<IQ", 5, len(vals)) + b"".join(struct.pack("<i", v) for v in vals))
    arr_f32 = lambda k, vals: kv(k, 9, struct.pack("<IQ", 6, len(vals)) + b"".join(struct.pack("<f", v) for v in vals))
    d, hd, ff = 256, 128, 256
    kvs = [
        s("general.architecture", "gemma3"), u32("gemma3.block_count", 2), u32("gemma3.embedding_length", d),
        u32("gemma3.feed_forward_length", ff), u32("gemma3.attention.head_count", 2),
        u32("gemma3.attention.head_count_kv", 1), u32("gemma3.attention.key_length", hd),
        u32("gemma3.attention.value_length", hd), u32("gemma3.context_length", 64),
        u32("gemma3.attention.sliding_window", 4), f32("gemma3.rope.freq_base", 1e6),
        f32("gemma3.attention.layer_norm_rms_epsilon", 1e-6),
        s("tokenizer.ggml.model", "llama"), arr_str("tokenizer.ggml.tokens", tokens),
        arr_f32("tokenizer.ggml.scores", [0.0] * 6 + [-1.0, -2.0, -2.0, -1.5, -3.0, 0.0, 0.0]),
        arr_i32("tokenizer.ggml.token_type", types), u32("tokenizer.ggml.bos_token_id", 2),
        u32("tokenizer.ggml.eos_token_id", 1), b("tokenizer.ggml.add_bos_token", True),
        b("tokenizer.ggml.add_space_prefix", False), u32("general.alignment", 32),
    ]
    tensors, data = [], b""

    def add(name, dims, ty):
        nonlocal data
        if ty == "F32":
            tid, nbytes = 0, 4 * dims[0] * (dims[1] if len(dims) > 1 else 1)
        else:
            tid, per, size = TYPES[ty]
            nbytes = dims[0] // per * size * dims[1]
        tensors.append(string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
                       + struct.pack("<IQ", tid, len(data)))
        data += bytes(nbytes) + bytes((-nbytes) % 32)

    add("token_embd.weight", [d, len(tokens)], "Q8_0")
    add("output_norm.weight", [d], "F32")
    for i in range(2):
        for w in ["attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"]:
            add(f"blk.{i}.{w}.weight", [d], "F32")
        for w in ["attn_q_norm", "attn_k_norm"]:
            add(f"blk.{i}.{w}.weight", [hd], "F32")
        for w, cols, rows, ty in [("attn_q", d, 2 * hd, "Q5_0"), ("attn_k", d, hd, "Q4_K"), ("attn_v", d, hd, "Q8_0"),
                                  ("attn_output", 2 * hd, d, "Q4_K"), ("ffn_gate", d, ff, "Q4_K"),
                                  ("ffn_up", d, ff, "Q5_0"), ("ffn_down", ff, d, "Q6_K")]:
            add(f"blk.{i}.{w}.weight", [cols, rows], ty)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    head += bytes((-len(head)) % 32)
    return head + data


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    with open(model, "rb") as f:
        open(os.path.join(out, "smollm2-head"), "wb").write(f.read(65536))
    open(os.path.join(out, "tiny-llama"), "wb").write(tiny_llama())
    open(os.path.join(out, "tiny-gemma3"), "wb").write(tiny_gemma3())


if __name__ == "__main__":
    main()
