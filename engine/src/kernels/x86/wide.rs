//! AVX-512 kernels over two repacked groups at once (16 weight rows in one 512-bit vector):
//! each broadcast activation word then feeds 16 rows' `vpdpbusd` instead of 8, halving the
//! broadcasts and the dot-product instructions per weight (llama.cpp's AVX-512
//! `ggml_gemm_q4_0_8x8_q8_0` pairs its 8-row blocks the same way). Same algorithm and the
//! same integers as [`super::packed`]'s Q4 kernel, so the results are equal to it.
//!
//! Soundness as in the parent module: these run only through a `Kernels` whose
//! implementation was chosen after `packed::vnni_available()` said the CPU has AVX-512 F, BW,
//! VL and VNNI; every access goes through fixed-size array references taken with safe
//! slicing.

#![allow(unsafe_code)]

use super::super::{BlockQ8, QuantKind, PACK, QK};
use super::{gather, q4_kind, quad};
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

/// Two Q4_0 / Q4_1 groups (`pair` holds them one after the other) against the activation
/// rows: `out` receives the first group's `[n][PACK]` results, then the second's.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(in crate::kernels) fn q4_pair(
    q4_1: bool,
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
        match (q4_1, g) {
            (true, 8) => q4_pair_rows::<8, true>(pair, rows, nb, o0, o1),
            (true, 7) => q4_pair_rows::<7, true>(pair, rows, nb, o0, o1),
            (true, 6) => q4_pair_rows::<6, true>(pair, rows, nb, o0, o1),
            (true, 5) => q4_pair_rows::<5, true>(pair, rows, nb, o0, o1),
            (true, 4) => q4_pair_rows::<4, true>(pair, rows, nb, o0, o1),
            (true, 3) => q4_pair_rows::<3, true>(pair, rows, nb, o0, o1),
            (true, 2) => q4_pair_rows::<2, true>(pair, rows, nb, o0, o1),
            (true, _) => q4_pair_rows::<1, true>(pair, rows, nb, o0, o1),
            (false, 8) => q4_pair_rows::<8, false>(pair, rows, nb, o0, o1),
            (false, 7) => q4_pair_rows::<7, false>(pair, rows, nb, o0, o1),
            (false, 6) => q4_pair_rows::<6, false>(pair, rows, nb, o0, o1),
            (false, 5) => q4_pair_rows::<5, false>(pair, rows, nb, o0, o1),
            (false, 4) => q4_pair_rows::<4, false>(pair, rows, nb, o0, o1),
            (false, 3) => q4_pair_rows::<3, false>(pair, rows, nb, o0, o1),
            (false, 2) => q4_pair_rows::<2, false>(pair, rows, nb, o0, o1),
            (false, _) => q4_pair_rows::<1, false>(pair, rows, nb, o0, o1),
        }
        j0 += g;
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_pair_rows<const G: usize, const Q4_1: bool>(
    pair: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    o0: &mut [f32],
    o1: &mut [f32],
) {
    let bb = q4_kind(Q4_1).block_bytes();
    let group = PACK * bb * nb;
    let (g0, g1) = pair.split_at(group.min(pair.len()));
    let head = (bb - QK / 2) * PACK;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); G];
    for (b, (blk0, blk1)) in g0
        .chunks_exact(PACK * bb)
        .zip(g1.chunks_exact(PACK * bb))
        .enumerate()
        .take(nb)
    {
        let ((s0, q0), (s1, q1)) = (blk0.split_at(head), blk1.split_at(head));
        let (Some(a), Ok(q0), Ok(q1)) = (
            gather::<G>(acts, nb, b),
            <&[u8; PACK * QK / 2]>::try_from(q0),
            <&[u8; PACK * QK / 2]>::try_from(q1),
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
            let w = load2(c0, c1);
            let lo = _mm512_and_si512(w, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
            for (isum, a) in isum.iter_mut().zip(&a) {
                let x0 = broadcast_i8x4(quad(&a.q, k));
                let x1 = broadcast_i8x4(quad(&a.q, 4 + k));
                *isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*isum, lo, x0), hi, x1);
            }
        }
        let scales = |s: &[u8], at: usize| match s.get(at..at + 16).map(<&[u8; 16]>::try_from) {
            Some(Ok(v)) => *v,
            _ => [0; 16],
        };
        let d = f16x16(&scales(s0, 0), &scales(s1, 0));
        let m = if Q4_1 {
            f16x16(&scales(s0, 16), &scales(s1, 16))
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
        };
        for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
            let p = _mm512_cvtepi32_ps(isum);
            *acc = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(a.d)), *acc);
            *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s), *acc);
        }
    }
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

/// Whether [`q4_pair`] handles `kind`.
pub(in crate::kernels) fn pairs(kind: QuantKind) -> bool {
    matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1)
}
