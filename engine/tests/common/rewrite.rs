//! The test models rewritten into the layouts of families no small GGUF on PyPI represents
//! (Phi-3, Gemma 2, a llama mixture of experts): same weight bytes, other names, fusions and
//! metadata; and into tensor types no such file uses (Q2_K, Q3_K).

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use candle_core::quantized::gguf_file;
use candle_core::Device;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use std::collections::BTreeMap;

/// Every tensor of a GGUF file, by name.
pub fn tensors(bytes: &[u8]) -> (gguf_file::Content, BTreeMap<String, QTensor>) {
    let mut reader = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let tensors = names
        .into_iter()
        .map(|n| {
            let t = content.tensor(&mut reader, &n, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    (content, tensors)
}

pub fn write_gguf(
    metadata: &BTreeMap<String, Value>,
    tensors: &BTreeMap<String, QTensor>,
) -> Vec<u8> {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

/// The metadata with `from.` keys renamed `to.` and the architecture set to `to`.
pub fn renamed(content: &gguf_file::Content, from: &str, to: &str) -> BTreeMap<String, Value> {
    let mut md: BTreeMap<String, Value> = content
        .metadata
        .iter()
        .map(|(k, v)| match k.strip_prefix(&format!("{from}.")) {
            Some(rest) => (format!("{to}.{rest}"), v.clone()),
            None => (k.clone(), v.clone()),
        })
        .collect();
    md.insert("general.architecture".into(), Value::String(to.into()));
    md
}

/// Tensors of one type and width stacked row after row: GGML rows are whole blocks, so their
/// bytes concatenate.
pub fn stack(parts: &[&QTensor]) -> QTensor {
    let (dtype, cols) = (parts[0].dtype(), parts[0].shape().dims()[1]);
    let mut data = Vec::new();
    let mut rows = 0;
    for p in parts {
        assert_eq!((p.dtype(), p.shape().dims()[1]), (dtype, cols));
        data.extend_from_slice(&p.data().unwrap());
        rows += p.shape().dims()[0];
    }
    qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).unwrap()
}

/// A llama query or key projection's rows from GGML's interleaved-RoPE order back to the NeoX
/// halves, undoing llama.cpp's conversion-time permutation: row `2i + j` of a head becomes
/// row `j · head_dim/2 + i`.
pub fn to_neox(t: &QTensor, head_dim: usize) -> QTensor {
    let (rows, cols) = t.shape().dims2().unwrap();
    let data = t.data().unwrap();
    let (rb, half) = (data.len() / rows, head_dim / 2);
    let mut out = Vec::with_capacity(data.len());
    for r in 0..rows {
        let (h, m) = (r / head_dim, r % head_dim);
        let src = h * head_dim + 2 * (m % half) + m / half;
        out.extend_from_slice(&data[src * rb..(src + 1) * rb]);
    }
    qtensor_from_ggml(t.dtype(), &out, vec![rows, cols], &Device::Cpu).unwrap()
}

/// A `llama` file as `phi3`: Q, K (in NeoX order) and V fused into `attn_qkv`, gate and up
/// fused into `ffn_up`, a separate output head, and RoPE base 10,000 (candle's Phi-3 knows no
/// other).
pub fn phi3_from_llama(bytes: &[u8]) -> Vec<u8> {
    let (content, mut ts) = tensors(bytes);
    let mut md = renamed(&content, "llama", "phi3");
    let u = |k: &str| md[k].to_u32().unwrap() as usize;
    let (n_layer, head_dim) = (
        u("phi3.block_count"),
        u("phi3.embedding_length") / u("phi3.attention.head_count"),
    );
    md.insert("phi3.rope.freq_base".into(), Value::F32(10_000.0));
    md.insert(
        "phi3.rope.dimension_count".into(),
        Value::U32(head_dim as u32),
    );
    for i in 0..n_layer {
        let mut take = |w: &str| ts.remove(&format!("blk.{i}.{w}.weight")).unwrap();
        let (q, k, v) = (take("attn_q"), take("attn_k"), take("attn_v"));
        let (gate, up) = (take("ffn_gate"), take("ffn_up"));
        let qkv = stack(&[&to_neox(&q, head_dim), &to_neox(&k, head_dim), &v]);
        ts.insert(format!("blk.{i}.attn_qkv.weight"), qkv);
        ts.insert(format!("blk.{i}.ffn_up.weight"), stack(&[&gate, &up]));
    }
    if !ts.contains_key("output.weight") {
        let embd = stack(&[&ts["token_embd.weight"]]);
        ts.insert("output.weight".into(), embd);
    }
    write_gguf(&md, &ts)
}

/// Gemma 2's soft caps in the rewritten file: small enough that they bite.
pub const GEMMA2_CAPS: (f32, f32) = (10.0, 15.0);

/// A `gemma3` file as `gemma2`: no QK-norm, one RoPE base, the default every-other-layer
/// window pattern, and soft caps.
pub fn gemma2_from_gemma3(bytes: &[u8]) -> Vec<u8> {
    let (content, mut ts) = tensors(bytes);
    let mut md = renamed(&content, "gemma3", "gemma2");
    md.remove("gemma2.attention.sliding_window_pattern");
    md.insert("gemma2.rope.freq_base".into(), Value::F32(10_000.0));
    md.insert(
        "gemma2.attn_logit_softcapping".into(),
        Value::F32(GEMMA2_CAPS.0),
    );
    md.insert(
        "gemma2.final_logit_softcapping".into(),
        Value::F32(GEMMA2_CAPS.1),
    );
    ts.retain(|name, _| {
        !name.ends_with("attn_q_norm.weight") && !name.ends_with("attn_k_norm.weight")
    });
    write_gguf(&md, &ts)
}

/// A dense `llama` file as a mixture of two experts in the per-expert layout candle reads
/// (`ffn_gate.N`), both copies of the dense feed-forward and a zero router, so both are
/// chosen with weight ½ each: the same function as the dense model, on the fallback path.
pub fn moe_from_llama(bytes: &[u8]) -> Vec<u8> {
    let (content, mut ts) = tensors(bytes);
    let mut md = renamed(&content, "llama", "llama");
    md.insert("llama.expert_count".into(), Value::U32(2));
    md.insert("llama.expert_used_count".into(), Value::U32(2));
    let n_layer = md["llama.block_count"].to_u32().unwrap() as usize;
    let n_embd = md["llama.embedding_length"].to_u32().unwrap() as usize;
    for i in 0..n_layer {
        for w in ["ffn_gate", "ffn_up", "ffn_down"] {
            let t = ts.remove(&format!("blk.{i}.{w}.weight")).unwrap();
            for e in 0..2 {
                ts.insert(format!("blk.{i}.{w}.{e}.weight"), stack(&[&t]));
            }
        }
        let router = vec![0u8; 2 * n_embd * 4];
        ts.insert(
            format!("blk.{i}.ffn_gate_inp.weight"),
            qtensor_from_ggml(
                candle_core::quantized::GgmlDType::F32,
                &router,
                vec![2, n_embd],
                &Device::Cpu,
            )
            .unwrap(),
        );
    }
    write_gguf(&md, &ts)
}

/// The file with every `ffn_down` re-quantized to `dtype` (the projection whose rows are whole
/// 256-weight super-blocks in the test models, as in llama.cpp's Q2_K and Q3_K_M files): a
/// lossy copy, but the same file for both sides of a comparison.
pub fn requantized_ffn_down(bytes: &[u8], dtype: candle_core::quantized::GgmlDType) -> Vec<u8> {
    let (content, mut ts) = tensors(bytes);
    let md = content.metadata.clone().into_iter().collect();
    for (name, t) in ts.iter_mut() {
        if name.ends_with("ffn_down.weight") {
            let f = t.dequantize(&Device::Cpu).unwrap();
            *t = QTensor::quantize(&f, dtype).unwrap();
        }
    }
    write_gguf(&md, &ts)
}
