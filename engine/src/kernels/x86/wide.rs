//! AVX-512 kernels over two repacked groups at once (16 weight rows in one 512-bit vector):
//! each broadcast activation word then feeds 16 rows' `vpdpbusd` instead of 8, halving the
//! broadcasts and the dot-product instructions per weight (llama.cpp's AVX-512
//! `ggml_gemm_q4_0_8x8_q8_0` pairs its 8-row blocks the same way). Q4_0, Q4_1, Q5_0 and
//! Q5_1 run the algorithm of [`super::packed`]'s kernels on the same integers. Q8_0 has no
//! sign trick here (AVX-512 has no `vpsignb`): its weights are offset to unsigned (`w + 128`)
//! and `128 · Σ a` is taken off each block's integer sum, `Σ a` recovered exactly from the
//! activation block's `s = d · Σ a` (|Σ a| ≤ 4,064, far inside f32's exact integers).
//!
//! Soundness as in the parent module: these run only through a `Kernels` whose
//! implementation was chosen after `packed::vnni_available()` said the CPU has AVX-512 F, BW,
//! VL and VNNI; every access goes through fixed-size array references taken with safe
//! slicing.

#![allow(unsafe_code)]

use super::super::{BlockQ8, QuantKind, PACK, QK};
use super::{gather, prefetch_ahead, quad};
use std::arch::x86_64::*;

/// Activation rows per pass: 2 × `ROWS` accumulators and the weight vectors fit in the 32
/// registers.
const ROWS: usize = 8;

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn load2(a: &[u8; 32], b: &[u8; 32]) -> __m512i {
    // SAFETY: reads exactly the 32 bytes of `a` and of `b`.
    unsafe {
        let lo = _mm256_loadu_si256(a.as_ptr().cast());
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(lo),
            _mm256_loadu_si256(b.as_ptr().cast()),
        )
    }
}

/// 16 f16 values, 8 from each of `a` and `b`, as f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn f16x16(a: &[u8; 16], b: &[u8; 16]) -> __m512 {
    // SAFETY: reads exactly the 16 bytes of `a` and of `b`.
    unsafe {
        let lo = _mm_loadu_si128(a.as_ptr().cast());
        let hi = _mm_loadu_si128(b.as_ptr().cast());
        _mm512_cvtph_ps(_mm256_set_m128i(hi, lo))
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn broadcast_i8x4(b: &[i8; 4]) -> __m512i {
    // SAFETY: reads exactly the 4 bytes of `b`.
    _mm512_broadcastd_epi32(unsafe { _mm_loadu_si32(b.as_ptr().cast()) })
}

/// Two groups of `kind` (`pair` holds them one after the other; [`pairs`] says which kinds)
/// against the activation rows: `out` receives the first group's `[n][PACK]` results, then
/// the second's.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) fn pair(
    kind: QuantKind,
    pair: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    let n = out.len() / (2 * PACK);
    let (first, second) = out.split_at_mut(n * PACK);
    let mut j0 = 0;
    while j0 < n {
        let g = (n - j0).min(ROWS);
        let rows = acts.get(j0 * nb..(j0 + g) * nb).unwrap_or_default();
        let o0 = first
            .get_mut(j0 * PACK..(j0 + g) * PACK)
            .unwrap_or_default();
        let o1 = second
            .get_mut(j0 * PACK..(j0 + g) * PACK)
            .unwrap_or_default();
        match kind {
            QuantKind::Q4_0 => grouped!(8; g, q45_pair_rows, false, false; pair, rows, nb, o0, o1),
            QuantKind::Q4_1 => grouped!(8; g, q45_pair_rows, true, false; pair, rows, nb, o0, o1),
            QuantKind::Q5_0 => grouped!(8; g, q45_pair_rows, false, true; pair, rows, nb, o0, o1),
            QuantKind::Q5_1 => grouped!(8; g, q45_pair_rows, true, true; pair, rows, nb, o0, o1),
            QuantKind::Q8_0 => grouped!(8; g, q8_pair_rows; pair, rows, nb, o0, o1),
            _ => {}
        }
        j0 += g;
    }
}

/// The fifth bits of one chunk half of both groups as a byte mask: bit `e` of word `j`
/// ([`super::super::repack`]'s layout) selects byte `e` of the first group's half, and the
/// second group's word the upper 32 bytes. A mask register makes the expansion one masked
/// add where AVX2 needs `bytes_from_bits_32`'s shuffle, or and compare per group. Measured
/// with `examples/kernels` on Zen 4 (EPYC, AVX-512 VNNI), best of 6 interleaved runs: Q5_0
/// one row 29 → 47 weights per ns, 4 rows 85 → 124, 16 rows 126 → 136 (the [`super::packed`]
/// VNNI kernels got the same change).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn fifth2(w0: &[[u8; 4]], w1: &[[u8; 4]], j: usize) -> __mmask64 {
    let word = |w: &[[u8; 4]]| u64::from(u32::from_le_bytes(w.get(j).copied().unwrap_or([0; 4])));
    _cvtu64_mask64(word(w0) | (word(w1) << 32))
}

/// Writes the two groups' halves of each accumulator.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn store_pair<const G: usize>(acc: &[__m512; G], o0: &mut [f32], o1: &mut [f32]) {
    for ((a, o0), o1) in acc
        .iter()
        .zip(o0.chunks_exact_mut(PACK))
        .zip(o1.chunks_exact_mut(PACK))
    {
        let mut both = [0.0f32; 2 * PACK];
        // SAFETY: writes exactly the 16 floats of `both`.
        unsafe { _mm512_storeu_ps(both.as_mut_ptr(), *a) };
        let (lo, hi) = both.split_at(PACK);
        o0.copy_from_slice(lo);
        o1.copy_from_slice(hi);
    }
}

/// The 16 bytes at `s[at..]`, zeros if out of range (callers size blocks exactly).
fn bytes16(s: &[u8], at: usize) -> [u8; 16] {
    match s.get(at..at + 16).map(<&[u8; 16]>::try_from) {
        Some(Ok(v)) => *v,
        _ => [0; 16],
    }
}

/// Q4_0 / Q4_1 (`FIVE` false) or Q5_0 / Q5_1 (`FIVE` true; `MIN`: the `_1` types, with a
/// minimum) pairs: the nibbles of both groups in one vector, Q5's fifth bits or-ed in.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q45_pair_rows<const G: usize, const MIN: bool, const FIVE: bool>(
    pair: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    o0: &mut [f32],
    o1: &mut [f32],
) {
    let kind = match (FIVE, MIN) {
        (false, false) => QuantKind::Q4_0,
        (false, true) => QuantKind::Q4_1,
        (true, false) => QuantKind::Q5_0,
        (true, true) => QuantKind::Q5_1,
    };
    let bb = kind.block_bytes();
    let (g0, g1) = pair.split_at((PACK * bb * nb).min(pair.len()));
    let halves = if MIN { 32 } else { 16 };
    let words = if FIVE { 32 } else { 0 };
    let low = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    let mut acc = [_mm512_setzero_ps(); G];
    for (b, (blk0, blk1)) in g0
        .chunks_exact(PACK * bb)
        .zip(g1.chunks_exact(PACK * bb))
        .enumerate()
        .take(nb)
    {
        prefetch_ahead(blk0);
        prefetch_ahead(blk1);
        let ((h0, q0), (h1, q1)) = (blk0.split_at(halves + words), blk1.split_at(halves + words));
        let (Some(a), Ok(q0), Ok(q1)) = (
            gather::<G>(acts, nb, b),
            <&[u8; PACK * QK / 2]>::try_from(q0),
            <&[u8; PACK * QK / 2]>::try_from(q1),
        ) else {
            continue;
        };
        let (s0, w0) = h0.split_at(halves);
        let (s1, w1) = h1.split_at(halves);
        let (w0, w1) = (w0.as_chunks::<4>().0, w1.as_chunks::<4>().0);
        let mut isum = [_mm512_setzero_si512(); G];
        for (k, (c0, c1)) in q0
            .as_chunks::<32>()
            .0
            .iter()
            .zip(q1.as_chunks::<32>().0)
            .enumerate()
        {
            let w = load2(c0, c1);
            let mut lo = _mm512_and_si512(w, low);
            let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
            if FIVE {
                lo = _mm512_mask_add_epi8(lo, fifth2(w0, w1, k), lo, bit4);
                hi = _mm512_mask_add_epi8(hi, fifth2(w0, w1, 4 + k), hi, bit4);
            }
            for (isum, a) in isum.iter_mut().zip(&a) {
                let x0 = broadcast_i8x4(quad(&a.q, k));
                let x1 = broadcast_i8x4(quad(&a.q, 4 + k));
                *isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*isum, lo, x0), hi, x1);
            }
        }
        let d = f16x16(&bytes16(s0, 0), &bytes16(s1, 0));
        let m = if MIN {
            f16x16(&bytes16(s0, 16), &bytes16(s1, 16))
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(if FIVE { -16.0 } else { -8.0 }))
        };
        for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
            let p = _mm512_cvtepi32_ps(isum);
            *acc = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(a.d)), *acc);
            *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s), *acc);
        }
    }
    store_pair(&acc, o0, o1);
}

/// Q8_0 pairs: weights offset to unsigned bytes, the offset's share taken off exactly.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_pair_rows<const G: usize>(
    pair: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    o0: &mut [f32],
    o1: &mut [f32],
) {
    let bb = QuantKind::Q8_0.block_bytes();
    let (g0, g1) = pair.split_at((PACK * bb * nb).min(pair.len()));
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_ps(); G];
    for (b, (blk0, blk1)) in g0
        .chunks_exact(PACK * bb)
        .zip(g1.chunks_exact(PACK * bb))
        .enumerate()
        .take(nb)
    {
        prefetch_ahead(blk0);
        prefetch_ahead(blk1);
        let ((s0, q0), (s1, q1)) = (blk0.split_at(2 * PACK), blk1.split_at(2 * PACK));
        let (Some(a), Ok(q0), Ok(q1)) = (
            gather::<G>(acts, nb, b),
            <&[u8; PACK * QK]>::try_from(q0),
            <&[u8; PACK * QK]>::try_from(q1),
        ) else {
            continue;
        };
        let mut isum = [_mm512_setzero_si512(); G];
        for (k, (c0, c1)) in q0
            .as_chunks::<32>()
            .0
            .iter()
            .zip(q1.as_chunks::<32>().0)
            .enumerate()
        {
            let w = _mm512_xor_si512(load2(c0, c1), flip);
            for (isum, a) in isum.iter_mut().zip(&a) {
                *isum = _mm512_dpbusd_epi32(*isum, w, broadcast_i8x4(quad(&a.q, k)));
            }
        }
        let d = f16x16(&bytes16(s0, 0), &bytes16(s1, 0));
        for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
            let sum = if a.d == 0.0 {
                0
            } else {
                (a.s / a.d).round() as i32
            };
            let exact = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * sum));
            let p = _mm512_cvtepi32_ps(exact);
            *acc = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(a.d)), *acc);
        }
    }
    store_pair(&acc, o0, o1);
}

/// Whether [`pair`] handles `kind`.
pub(in crate::kernels) fn pairs(kind: QuantKind) -> bool {
    matches!(
        kind,
        QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q5_1 | QuantKind::Q8_0
    )
}
