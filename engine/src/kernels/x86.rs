//! AVX2/FMA/F16C versions of the kernels in the parent module: the crate's only `unsafe` code.
//!
//! Soundness rests on two rules. (1) These functions are reached only through a
//! `Kernels` value made by `Kernels::detect`, after [`available`] said the CPU has AVX2, FMA
//! and F16C; that is what makes calling the `#[target_feature]` functions sound. (2) Every
//! memory access goes through a fixed-size array reference (`&[u8; 16]`, `&[i8; 32]`,
//! `&[f32; 8]`) taken with safe slicing, so the unaligned loads and stores below never read or
//! write outside a Rust object. The algorithms follow GGML's `ggml_vec_dot_q4_1_q8_1`,
//! `ggml_vec_dot_q5_0_q8_0`, `ggml_vec_dot_q8_0_q8_0` and the K-quant dot products
//! (ggml-cpu/arch/x86/quants.c), batched over several activation rows so each weight block is
//! unpacked once per group; the K-quants are taken 32 weights at a time against this crate's
//! 32-value activation blocks (see the parent module).

#![allow(unsafe_code)]

use super::{gather, scale_min_k4, BlockQ8, HalfKind, KvSpan, QuantKind, GROUP, PACK, QK};
use half::f16;
use std::arch::x86_64::*;

/// Whether this CPU has everything the kernels below use.
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

mod packed;
mod wide;

pub(super) fn quant_row(kind: QuantKind, w: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
    // SAFETY: the caller holds a `Kernels` from `Kernels::detect`, which checked `available()`.
    unsafe { quant_row_avx2(kind, w, acts, nb, out) }
}

pub(super) fn quant_group(
    kind: QuantKind,
    group: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    // SAFETY: as in `quant_row`.
    unsafe { packed::avx2::quant_group(kind, group, acts, nb, out) }
}

pub(super) use packed::vnni_available;

pub(super) use wide::pairs;

/// Two consecutive repacked groups at once, for the kinds [`pairs`] accepts.
pub(super) fn quant_pair_vnni(
    kind: QuantKind,
    pair: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    // SAFETY: as in `quant_group_vnni`.
    unsafe { wide::pair(kind, pair, acts, nb, out) }
}

pub(super) fn quant_group_vnni(
    kind: QuantKind,
    group: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    // SAFETY: the caller holds a `Kernels` from `Kernels::detect`, which checked
    // `vnni_available()`.
    unsafe { packed::vnni::quant_group(kind, group, acts, nb, out) }
}

pub(super) fn half_row(kind: HalfKind, w: &[u8], xs: &[f32], out: &mut [f32]) {
    // SAFETY: as in `quant_row`.
    unsafe { half_row_avx2(kind, w, xs, out) }
}

/// Whether [`scores`] and [`weighted_sums`] take heads of `hd` dimensions.
pub(super) fn attention_fits(hd: usize) -> bool {
    hd.is_multiple_of(8) && hd <= MAX_HEAD_DIM
}

pub(super) fn scores(q: &[f32], keys: &[f16], kv: KvSpan, scale: f32, out: &mut Vec<f32>) {
    // SAFETY: as in `quant_row`.
    unsafe { scores_avx2(q, keys, kv, scale, out) }
}

pub(super) fn weighted_sums(w: &[f32], vals: &[f16], kv: KvSpan, out: &mut [f32]) {
    // SAFETY: as in `quant_row`.
    unsafe { weighted_sums_avx2(w, vals, kv, out) }
}

pub(super) fn quantize_row(x: &[f32], out: &mut [BlockQ8]) {
    // SAFETY: as in `quant_row`.
    unsafe { quantize_row_avx2(x, out) }
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: as in `quant_row`.
    unsafe { dot_avx2(a, b) }
}

pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    // SAFETY: as in `quant_row`.
    unsafe { axpy_avx2(alpha, x, y) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quant_row_avx2(kind: QuantKind, w: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
    let mut j0 = 0;
    while j0 < out.len() {
        let g = (out.len() - j0).min(GROUP);
        let rows = acts.get(j0 * nb..(j0 + g) * nb).unwrap_or_default();
        let dst = out.get_mut(j0..j0 + g).unwrap_or_default();
        match kind {
            QuantKind::Q8_0 => grouped!(4; g, q8_group; w, rows, nb, dst),
            QuantKind::Q4_1 => grouped!(4; g, q4_group, true; w, rows, nb, dst),
            QuantKind::Q4_0 => grouped!(4; g, q4_group, false; w, rows, nb, dst),
            QuantKind::Q5_0 => grouped!(4; g, q5_group, false; w, rows, nb, dst),
            QuantKind::Q5_1 => grouped!(4; g, q5_group, true; w, rows, nb, dst),
            QuantKind::Q4K => grouped!(4; g, qk45_group, false; w, rows, nb, dst),
            QuantKind::Q5K => grouped!(4; g, qk45_group, true; w, rows, nb, dst),
            QuantKind::Q6K => grouped!(4; g, q6k_group; w, rows, nb, dst),
        }
        j0 += g;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(lo: u8, hi: u8) -> f32 {
    let bits = i32::from(u16::from_le_bytes([lo, hi]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load_u8x16(b: &[u8; 16]) -> __m128i {
    // SAFETY: reads exactly the 16 bytes of `b`; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load_u8x32(b: &[u8; 32]) -> __m256i {
    // SAFETY: reads exactly the 32 bytes of `b`.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load_i8x32(b: &[i8; 32]) -> __m256i {
    // SAFETY: reads exactly the 32 bytes of `b`.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load_f32x8(b: &[f32; 8]) -> __m256 {
    // SAFETY: reads exactly the 8 floats of `b`.
    unsafe { _mm256_loadu_ps(b.as_ptr()) }
}

/// Eight half-precision values as f32.
#[target_feature(enable = "avx2,fma,f16c")]
fn load_f16x8(b: &[f16; 8]) -> __m256 {
    // SAFETY: `f16` is `repr(transparent)` over `u16`, so this reads exactly the 16 bytes of
    // `b`.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
}

#[target_feature(enable = "avx2,fma,f16c")]
fn store_f32x8(b: &mut [f32; 8], v: __m256) {
    // SAFETY: writes exactly the 8 floats of `b`.
    unsafe { _mm256_storeu_ps(b.as_mut_ptr(), v) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

const fn q4_kind(q4_1: bool) -> QuantKind {
    if q4_1 {
        QuantKind::Q4_1
    } else {
        QuantKind::Q4_0
    }
}

/// Q4_0 / Q4_1 weight row against `G` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_group<const G: usize, const Q4_1: bool>(
    w: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    let bb = q4_kind(Q4_1).block_bytes();
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut accm = [0.0f32; G];
    for (b, blk) in w.chunks_exact(bb).enumerate().take(nb) {
        let (d, m, qs) = match blk {
            [d0, d1, m0, m1, qs @ ..] if Q4_1 => (f16_to_f32(*d0, *d1), Some((*m0, *m1)), qs),
            [d0, d1, qs @ ..] => (f16_to_f32(*d0, *d1), None, qs),
            _ => continue,
        };
        let m = match m {
            Some((m0, m1)) => f16_to_f32(m0, m1),
            None => -8.0 * d,
        };
        let Ok(qs) = <&[u8; 16]>::try_from(qs) else {
            continue;
        };
        let packed = load_u8x16(qs);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), low);
        let wq = _mm256_set_m128i(hi, lo);
        for j in 0..G {
            let Some(a) = acts.get(j * nb + b) else {
                continue;
            };
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, load_i8x32(&a.q)), ones);
            if let (Some(acc), Some(accm)) = (acc.get_mut(j), accm.get_mut(j)) {
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a.d), *acc);
                *accm += m * a.s;
            }
        }
    }
    for ((o, a), m) in out.iter_mut().zip(acc).zip(accm) {
        *o = hsum(a) + m;
    }
}

/// Q8_0 weight row against `G` activation rows: `maddubs` needs an unsigned operand, so the
/// weight's sign moves onto the activation (`|w| * sign(w) a`), as GGML does.
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_group<const G: usize>(w: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); G];
    for (b, blk) in w
        .chunks_exact(QuantKind::Q8_0.block_bytes())
        .enumerate()
        .take(nb)
    {
        let [d0, d1, qs @ ..] = blk else { continue };
        let Ok(qs) = <&[u8; QK]>::try_from(qs) else {
            continue;
        };
        let d = f16_to_f32(*d0, *d1);
        let wq = load_u8x32(qs);
        let wabs = _mm256_sign_epi8(wq, wq);
        for j in 0..G {
            let Some(a) = acts.get(j * nb + b) else {
                continue;
            };
            let signed = _mm256_sign_epi8(load_i8x32(&a.q), wq);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, signed), ones);
            if let Some(acc) = acc.get_mut(j) {
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a.d), *acc);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum(a);
    }
}

/// One 32-weight chunk against the same chunk of `G` activation rows: `acc[j] += scale ·
/// a.d · (wq · a.q)` lane by lane (lanes 0–3 cover weights 0–15, lanes 4–7 weights 16–31, so
/// a chunk with two half scales passes them as one vector) and `accm[j] += m · a.s`. Unsigned
/// quants go straight into `maddubs`; signed ones use GGML's sign trick (`|w| · sign(w)·a`).
/// Each `maddubs` pair stays within i16: at most 2 · 63 · 128 unsigned, 2 · 128 · 127 signed.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn accumulate<const G: usize, const SIGNED: bool>(
    wq: __m256i,
    scale: __m256,
    m: f32,
    a: &[&BlockQ8; G],
    acc: &mut [__m256; G],
    accm: &mut [f32; G],
) {
    let ones = _mm256_set1_epi16(1);
    let wabs = if SIGNED { _mm256_sign_epi8(wq, wq) } else { wq };
    for ((acc, accm), a) in acc.iter_mut().zip(accm.iter_mut()).zip(a) {
        let x = load_i8x32(&a.q);
        let x = if SIGNED { _mm256_sign_epi8(x, wq) } else { x };
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, x), ones);
        let s = _mm256_mul_ps(scale, _mm256_set1_ps(a.d));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, *acc);
        *accm += m * a.s;
    }
}

/// How far ahead of the weight block being read [`prefetch_ahead`] asks for cache lines, in
/// bytes: 4 to 7 blocks of a repacked group. The hardware prefetchers follow each group's
/// stream, but with one stream per thread and a decode step that computes while it reads, the
/// loads of the next blocks are not in flight early enough. Measured on Zen 4 (2 vCPUs,
/// AVX-512 VNNI, `examples/bench --streams 1,8`, rounds interleaved with a build without it,
/// the paired kernels prefetching): SmolLM2 Q4_1 8 streams 521–536 → 594–615 tok/s (two
/// rounds); the Qwen2.5 test model 1 stream 42–48 → 50–55, 8 streams 159–197 → 198–221 (five
/// rounds). 512 and 2,048 bytes did no better; the packed kernels' prefetch added 0–15 tok/s
/// at 8 Qwen streams (four rounds).
const PREFETCH_AHEAD: usize = 1024;

/// Asks for the cache lines [`PREFETCH_AHEAD`] bytes past each line of `blk` (the weight block
/// a kernel is about to read), so that later blocks' loads overlap this block's arithmetic.
#[inline(always)]
fn prefetch_ahead(blk: &[u8]) {
    let mut at = 0;
    while at < blk.len() {
        let line = blk.as_ptr().wrapping_add(PREFETCH_AHEAD + at);
        // SAFETY: a prefetch is a hint: it never faults and reads nothing architecturally, so
        // any address will do; this one is computed with wrapping arithmetic and never
        // dereferenced. SSE, so every x86_64 CPU has it.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) };
        at += 64;
    }
}

/// 32 bytes, byte `e` 0xFF where bit `e` of `x` is set (GGML's `bytes_from_bits_32`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn bytes_from_bits_32(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Writes the `G` sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn finish<const G: usize>(acc: [__m256; G], accm: [f32; G], out: &mut [f32]) {
    for ((o, a), m) in out.iter_mut().zip(acc).zip(accm) {
        *o = hsum(a) + m;
    }
}

/// Q5_0 / Q5_1 weight row against `G` activation rows: nibbles as in Q4, the fifth bit from
/// the block's 32-bit word; Q5_0's offset of 16 becomes `m = -16 d`.
#[target_feature(enable = "avx2,fma,f16c")]
fn q5_group<const G: usize, const Q5_1: bool>(
    w: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    let kind = if Q5_1 {
        QuantKind::Q5_1
    } else {
        QuantKind::Q5_0
    };
    let low = _mm_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut accm = [0.0f32; G];
    for (b, blk) in w.chunks_exact(kind.block_bytes()).enumerate().take(nb) {
        let (d, m, qh, qs) = match blk {
            [d0, d1, m0, m1, h0, h1, h2, h3, qs @ ..] if Q5_1 => (
                f16_to_f32(*d0, *d1),
                f16_to_f32(*m0, *m1),
                [*h0, *h1, *h2, *h3],
                qs,
            ),
            [d0, d1, h0, h1, h2, h3, qs @ ..] => {
                let d = f16_to_f32(*d0, *d1);
                (d, -16.0 * d, [*h0, *h1, *h2, *h3], qs)
            }
            _ => continue,
        };
        let (Ok(qs), Some(a)) = (<&[u8; 16]>::try_from(qs), gather::<G>(acts, nb, b)) else {
            continue;
        };
        let packed = load_u8x16(qs);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), low);
        let high = _mm256_and_si256(bytes_from_bits_32(u32::from_le_bytes(qh)), bit4);
        let wq = _mm256_or_si256(_mm256_set_m128i(hi, lo), high);
        accumulate::<G, false>(wq, _mm256_set1_ps(d), m, &a, &mut acc, &mut accm);
    }
    finish(acc, accm, out);
}

/// Q4_K / Q5_K weight row against `G` activation rows: per super-block, the eight 6-bit
/// scales and minimums once, then the eight 32-weight chunks (GGML's `ggml_vec_dot_q4_K_q8_K`
/// takes the same chunks, 64 weights per pass).
#[target_feature(enable = "avx2,fma,f16c")]
fn qk45_group<const G: usize, const Q5: bool>(
    w: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    let kind = if Q5 { QuantKind::Q5K } else { QuantKind::Q4K };
    let low = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut accm = [0.0f32; G];
    for (sb, blk) in w.chunks_exact(kind.block_bytes()).enumerate() {
        let [d0, d1, m0, m1, rest @ ..] = blk else {
            continue;
        };
        let (d, dmin) = (f16_to_f32(*d0, *d1), f16_to_f32(*m0, *m1));
        let (scales, rest) = rest.split_at(12.min(rest.len()));
        let (qh, qs) = rest.split_at(if Q5 { 32.min(rest.len()) } else { 0 });
        let qh = match <&[u8; 32]>::try_from(qh) {
            Ok(qh) => Some(load_u8x32(qh)),
            Err(_) => None,
        };
        let Ok(qs) = <&[u8; 128]>::try_from(qs) else {
            continue;
        };
        for (p, run) in qs.as_chunks::<32>().0.iter().enumerate() {
            let bytes = load_u8x32(run);
            let nibbles = [
                _mm256_and_si256(bytes, low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low),
            ];
            for (h, mut wq) in nibbles.into_iter().enumerate() {
                let c = 2 * p + h;
                let Some(a) = gather::<G>(acts, nb, sb * 8 + c) else {
                    continue;
                };
                if let Some(qh) = qh {
                    let bit = _mm256_set1_epi8((1u8 << c) as i8);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                    wq = _mm256_or_si256(wq, _mm256_and_si256(set, bit4));
                }
                let (sc, mn) = scale_min_k4(c, scales);
                let scale = _mm256_set1_ps(d * f32::from(sc));
                let m = -(dmin * f32::from(mn));
                accumulate::<G, false>(wq, scale, m, &a, &mut acc, &mut accm);
            }
        }
    }
    finish(acc, accm, out);
}

/// Q6_K weight row against `G` activation rows: per half super-block, two 32-byte runs of low
/// nibbles and one of high bit pairs make four chunks of signed quants `q - 32`, each with two
/// 8-bit scales (one per 16 weights).
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_group<const G: usize>(w: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
    let low = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    let offset = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut accm = [0.0f32; G];
    for (sb, blk) in w.chunks_exact(QuantKind::Q6K.block_bytes()).enumerate() {
        let (Some(Ok(ql)), Some(Ok(qh)), Some(Ok(sc)), Some(&[d0, d1])) = (
            blk.get(..128).map(<&[u8; 128]>::try_from),
            blk.get(128..192).map(<&[u8; 64]>::try_from),
            blk.get(192..208).map(<&[u8; 16]>::try_from),
            blk.get(208..210),
        ) else {
            continue;
        };
        let d = f16_to_f32(d0, d1);
        let (ql, qh) = (ql.as_chunks::<32>().0, qh.as_chunks::<32>().0);
        for n in 0..2 {
            let (Some(l0), Some(l1), Some(h)) = (ql.get(2 * n), ql.get(2 * n + 1), qh.get(n))
            else {
                continue;
            };
            let (l0, l1, h) = (load_u8x32(l0), load_u8x32(l1), load_u8x32(h));
            let chunks = [
                (_mm256_and_si256(l0, low), h),
                (_mm256_and_si256(l1, low), _mm256_srli_epi16::<2>(h)),
                (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l0), low),
                    _mm256_srli_epi16::<4>(h),
                ),
                (
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l1), low),
                    _mm256_srli_epi16::<6>(h),
                ),
            ];
            for (k, (lo, hi)) in chunks.into_iter().enumerate() {
                let c = 4 * n + k;
                let Some(a) = gather::<G>(acts, nb, sb * 8 + c) else {
                    continue;
                };
                let hi = _mm256_slli_epi16::<4>(_mm256_and_si256(hi, three));
                let wq = _mm256_sub_epi8(_mm256_or_si256(lo, hi), offset);
                let s =
                    |i: usize| d * f32::from(sc.get(8 * n + 2 * k + i).copied().unwrap_or(0) as i8);
                let scale = _mm256_set_m128(_mm_set1_ps(s(1)), _mm_set1_ps(s(0)));
                accumulate::<G, true>(wq, scale, 0.0, &a, &mut acc, &mut accm);
            }
        }
    }
    finish(acc, accm, out);
}

/// One half-precision row against several f32 activation rows, 8 weights per step.
#[target_feature(enable = "avx2,fma,f16c")]
fn half_row_avx2(kind: HalfKind, w: &[u8], xs: &[f32], out: &mut [f32]) {
    let cols = w.len() / 2;
    let body = cols - cols % 8;
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(cols)) {
        let mut acc = _mm256_setzero_ps();
        for (wc, xc) in w.chunks_exact(16).zip(x.chunks_exact(8)) {
            let (Ok(wc), Ok(xc)) = (<&[u8; 16]>::try_from(wc), <&[f32; 8]>::try_from(xc)) else {
                continue;
            };
            let wf = match kind {
                HalfKind::F16 => load_u8x16_f16(wc),
                HalfKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(
                    _mm256_cvtepu16_epi32(load_u8x16(wc)),
                )),
            };
            acc = _mm256_fmadd_ps(wf, load_f32x8(xc), acc);
        }
        let tail: f32 = (body..cols)
            .map(|i| kind.at(w, i) * x.get(i).copied().unwrap_or(0.0))
            .sum();
        *o = hsum(acc) + tail;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        if let (Ok(x), Ok(y)) = (<&[f32; 8]>::try_from(x), <&[f32; 8]>::try_from(y)) {
            acc = _mm256_fmadd_ps(load_f32x8(x), load_f32x8(y), acc);
        }
    }
    hsum(acc) + tail
}

#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
    let va = _mm256_set1_ps(alpha);
    let mut cy = y.chunks_exact_mut(8);
    let mut cx = x.chunks_exact(8);
    for (ys, xs) in (&mut cy).zip(&mut cx) {
        if let (Ok(ys), Ok(xs)) = (<&mut [f32; 8]>::try_from(ys), <&[f32; 8]>::try_from(xs)) {
            let v = _mm256_fmadd_ps(va, load_f32x8(xs), load_f32x8(ys));
            store_f32x8(ys, v);
        }
    }
    for (y, x) in cy.into_remainder().iter_mut().zip(cx.remainder()) {
        *y += alpha * x;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn load_u8x16_f16(b: &[u8; 16]) -> __m256 {
    _mm256_cvtph_ps(load_u8x16(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn broadcast_i8x4(b: &[i8; 4]) -> __m256i {
    // SAFETY: reads exactly the 4 bytes of `b`.
    _mm256_broadcastd_epi32(unsafe { _mm_loadu_si32(b.as_ptr().cast()) })
}

/// Bytes `4k..4k + 4` of an activation block, as the 4-byte array `broadcast_i8x4` takes.
fn quad(q: &[i8; QK], k: usize) -> &[i8; 4] {
    q.as_chunks::<4>().0.get(k).unwrap_or(&[0; 4])
}

/// The 32 bytes at `b[at..at + 32]`, or zeros if out of range (callers size groups exactly).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn load_at(b: &[u8], at: usize) -> __m256i {
    match b.get(at..at + 32).map(<&[u8; 32]>::try_from) {
        Some(Ok(v)) => load_u8x32(v),
        _ => _mm256_setzero_si256(),
    }
}

/// The 8 f16 values at `b[at..at + 16]` as f32 (zeros if out of range).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn f16x8_at(b: &[u8], at: usize) -> __m256 {
    match b.get(at..at + 16).map(<&[u8; 16]>::try_from) {
        Some(Ok(v)) => load_u8x16_f16(v),
        _ => _mm256_setzero_ps(),
    }
}

/// Byte `j` of each 32-bit lane, zero-extended.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lane_byte(v: __m256i, j: usize) -> __m256i {
    let shift = _mm_cvtsi32_si128(8 * j as i32);
    _mm256_and_si256(_mm256_srl_epi32(v, shift), _mm256_set1_epi32(0xFF))
}

/// The widest head the attention kernels below take (Gemma's 256).
const MAX_HEAD_DIM: usize = 256;

/// Positions widened from half precision together, into a buffer on the stack that every
/// head of the group then reads from L1.
const BLOCK: usize = 4;

/// Widens the `m` keys or values of positions `p0..p0 + m` into `buf`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn widen_block(
    src: &[f16],
    kv: KvSpan,
    p0: usize,
    m: usize,
    buf: &mut [[f32; MAX_HEAD_DIM]; BLOCK],
) {
    for (j, row) in buf.iter_mut().enumerate().take(m) {
        let at = (p0 + j) * kv.stride + kv.off;
        let from = src.get(at..at + kv.head_dim).unwrap_or_default();
        for (dst, c) in row
            .as_chunks_mut::<8>()
            .0
            .iter_mut()
            .zip(from.as_chunks::<8>().0)
        {
            store_f32x8(dst, load_f16x8(c));
        }
    }
}

/// `out[h · n + p] = scale · q_h·k_p` for every head `h` of `q` and position `p < n`: keys
/// widened [`BLOCK`] at a time, four dot products per horizontal reduction.
#[target_feature(enable = "avx2,fma,f16c")]
fn scores_avx2(q: &[f32], keys: &[f16], kv: KvSpan, scale: f32, out: &mut Vec<f32>) {
    let (n, hd) = (kv.n, kv.head_dim);
    out.clear();
    out.resize(q.len() / hd.max(1) * n, 0.0);
    let mut buf = [[0.0f32; MAX_HEAD_DIM]; BLOCK];
    let mut p0 = 0;
    while p0 < n {
        let m = (n - p0).min(BLOCK);
        widen_block(keys, kv, p0, m, &mut buf);
        for (qh, sh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(n)) {
            let d = buf.each_ref().map(|k| dot8(qh, k));
            let t0 = _mm256_hadd_ps(d[0], d[1]);
            let t1 = _mm256_hadd_ps(d[2], d[3]);
            let t = _mm256_hadd_ps(t0, t1);
            let r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
            let r = _mm_mul_ps(r, _mm_set1_ps(scale));
            let mut four = [0.0f32; BLOCK];
            // SAFETY: writes exactly the 4 floats of `four`.
            unsafe { _mm_storeu_ps(four.as_mut_ptr(), r) };
            if let Some(dst) = sh.get_mut(p0..p0 + m) {
                dst.copy_from_slice(four.get(..m).unwrap_or_default());
            }
        }
        p0 += m;
    }
}

/// `out_h += Σ_p w[h · n + p] · v_p` for every head `h` of `out`: values widened [`BLOCK`] at
/// a time, each head's sums kept in `out` (in L1) between blocks.
#[target_feature(enable = "avx2,fma,f16c")]
fn weighted_sums_avx2(w: &[f32], vals: &[f16], kv: KvSpan, out: &mut [f32]) {
    let (n, hd) = (kv.n, kv.head_dim);
    let mut buf = [[0.0f32; MAX_HEAD_DIM]; BLOCK];
    let mut p0 = 0;
    while p0 < n {
        let m = (n - p0).min(BLOCK);
        widen_block(vals, kv, p0, m, &mut buf);
        for (oh, wh) in out.chunks_exact_mut(hd).zip(w.chunks_exact(n)) {
            let ws = wh.get(p0..p0 + m).unwrap_or_default();
            for (c, oc) in oh.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let mut acc = load_f32x8(oc);
                for (wp, row) in ws.iter().zip(&buf) {
                    let Some(Ok(v)) = row.get(8 * c..8 * c + 8).map(<&[f32; 8]>::try_from) else {
                        continue;
                    };
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(*wp), load_f32x8(v), acc);
                }
                store_f32x8(oc, acc);
            }
        }
        p0 += m;
    }
}

/// Eight partial sums of `q·k` over `q`'s length (a multiple of 8, at most `k`'s).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn dot8(q: &[f32], k: &[f32]) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for (qc, kc) in q.as_chunks::<8>().0.iter().zip(k.as_chunks::<8>().0) {
        acc = _mm256_fmadd_ps(load_f32x8(qc), load_f32x8(kc), acc);
    }
    acc
}

/// GGML's AVX2 `quantize_row_q8_1`, with f32 scales.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_row_avx2(x: &[f32], out: &mut [BlockQ8]) {
    let sign = _mm256_set1_ps(-0.0);
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let mut v = [_mm256_setzero_ps(); 4];
        for (v, c) in v.iter_mut().zip(xs.chunks_exact(8)) {
            if let Ok(c) = <&[f32; 8]>::try_from(c) {
                *v = load_f32x8(c);
            }
        }
        let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        let m = _mm256_max_ps(m01, m23);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let [i0, i1, i2, i3] = v.map(|v| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v, id),
            );
            _mm256_cvtps_epi32(r)
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum = _mm_hadd_epi32(sum, sum);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(sum, sum));
        // Pack to 8 bits; the packs interleave 128-bit lanes and the permutation undoes that.
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: writes exactly the 32 bytes of `block.q`.
        unsafe { _mm256_storeu_si256(block.q.as_mut_ptr().cast(), p) };
        block.d = d;
        block.s = d * sum as f32;
    }
}

/// `e^x` lane by lane: Arm's optimized-routines single-precision `expf` (as GGML's AVX2
/// `ggml_v_expf` adapts it): `x = n ln 2 + b` with `n` rounded by the 1.5 · 2^23 shift, a
/// degree-5 polynomial for `e^b - 1`, and `2^n` put into the exponent bits; lanes with
/// |n| > 126 take the slow path that splits the scale in two so nothing overflows early. At
/// most 1.45 ulp plus rounding (0.5 ulp) from `e^x`; above 88.38 it gives infinity, below -103.97 zero.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn exp8(x: __m256) -> __m256 {
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let shift = c(0x4b40_0000); // 1.5 · 2^23
    let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), shift); // x / ln 2, rounded, + shift
    let n = _mm256_sub_ps(z, shift);
    // b = x - n ln 2, with ln 2 in two parts (Cody–Waite).
    let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_castps_si256(_mm256_set1_ps(1.0)),
    ));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(c(0x3f7f_fff6), b),
    );
    if _mm256_movemask_ps(big) == 0 {
        return _mm256_fmadd_ps(j, k, k);
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
        _mm256_set1_epi32(0x8200_0000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
    let scaled = _mm256_blendv_ps(
        _mm256_fmadd_ps(k, j, k),
        _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1),
        big,
    );
    _mm256_blendv_ps(scaled, _mm256_mul_ps(s1, s1), huge)
}

/// `gate[i] = act(gate[i]) · up[i]`; both activations are `x · σ(t)`: SiLU with `t = x`,
/// GELU's tanh form with `t = 2 √(2/π) (x + 0.044715 x³)` (as `0.5 (1 + tanh(y)) = σ(2y)`).
#[target_feature(enable = "avx2,fma,f16c")]
fn glu_avx2(act: super::Glu, gate: &mut [f32], up: &[f32]) {
    let one = _mm256_set1_ps(1.0);
    let mut g8 = gate.chunks_exact_mut(8);
    let mut u8 = up.chunks_exact(8);
    for (g, u) in (&mut g8).zip(&mut u8) {
        let (Ok(g), Ok(u)) = (<&mut [f32; 8]>::try_from(g), <&[f32; 8]>::try_from(u)) else {
            continue;
        };
        let x = load_f32x8(g);
        let t = match act {
            super::Glu::Silu => x,
            super::Glu::GeluTanh => {
                let x2 = _mm256_mul_ps(x, x);
                let inner = _mm256_fmadd_ps(_mm256_set1_ps(super::GELU_A), x2, one);
                _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_set1_ps(2.0 * super::SQRT_2_OVER_PI), x),
                    inner,
                )
            }
        };
        let sig = _mm256_div_ps(
            x,
            _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), t))),
        );
        store_f32x8(g, _mm256_mul_ps(sig, load_f32x8(u)));
    }
    for (g, u) in g8.into_remainder().iter_mut().zip(u8.remainder()) {
        *g = act.apply(*g) * u;
    }
}

/// `s = e^(s - max)` for every score, and their sum.
#[target_feature(enable = "avx2,fma,f16c")]
fn exp_shifted_avx2(scores: &mut [f32], max: f32) -> f32 {
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut c8 = scores.chunks_exact_mut(8);
    for s in &mut c8 {
        if let Ok(s) = <&mut [f32; 8]>::try_from(s) {
            let e = exp8(_mm256_sub_ps(load_f32x8(s), m));
            acc = _mm256_add_ps(acc, e);
            store_f32x8(s, e);
        }
    }
    let mut tail = 0.0;
    for s in c8.into_remainder() {
        *s = (*s - max).exp();
        tail += *s;
    }
    hsum(acc) + tail
}

pub(super) fn glu(act: super::Glu, gate: &mut [f32], up: &[f32]) {
    // SAFETY: as in `quant_row`.
    unsafe { glu_avx2(act, gate, up) }
}

pub(super) fn exp_shifted(scores: &mut [f32], max: f32) -> f32 {
    // SAFETY: as in `quant_row`.
    unsafe { exp_shifted_avx2(scores, max) }
}
