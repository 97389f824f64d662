//! NEON versions of the kernels in the parent module for aarch64 (AWS Graviton): the repacked
//! 8-row groups, which carry prefill and batched decode, and the f32 dot product and `axpy`.
//! The other kernels stay on the portable code, which the compiler vectorizes for NEON by
//! itself (NEON is part of the aarch64 baseline).
//!
//! Two variants are stamped out of one macro, as the x86 module does: [`dotprod`] with the
//! Armv8.2 dot-product instruction `SDOT` (by element: 4 rows' 4 quants against 4 activation
//! bytes, one 32-bit sum per row), which every Graviton that runs Nitro Enclaves has
//! (Neoverse N1, V1, V2), and [`neon`] with widening multiplies (`SMULL`, `ADDP`, `SADALP`)
//! for cores without it. `SDOT` is written with `asm!`: its intrinsics (`vdotq_laneq_s32`)
//! are not stable in the Rust this crate builds with (rust-lang/rust#117224).
//!
//! The repacked layout ([`super::repack`]) is the one `SDOT` by element wants: a 32-byte run
//! holds 4 quants of each of 8 rows, so its 16-byte halves are rows 0–3 and rows 4–7, one row
//! per 32-bit lane, and the 4 activation bytes are lane `k` of a 16-byte load of the
//! activation block (llama.cpp's `ggml_gemv_q4_0_4x4_q8_0` uses the same idea). The K-quants'
//! per-row 6-bit scales are unpacked with the scalar reference's [`scale_min_k4`], once per
//! super-block and group.
//!
//! Soundness: (1) the `dotprod` functions are reached only through a `Kernels` value made by
//! `Kernels::detect` or `Kernels::supported`, after [`dotprod_available`] said the CPU has the
//! feature; NEON itself is in every aarch64 Linux target's baseline. (2) Every load and store
//! goes through a fixed-size array reference taken with safe slicing, so no access leaves a
//! Rust object. (3) The `asm!` block only reads and writes the vector registers it names.

#![allow(unsafe_code)]

use super::{gather, scale_min_k4, BlockQ8, QuantKind, GROUP, PACK, QK};
use half::f16;
use std::arch::aarch64::*;

/// Whether this CPU has the dot-product instructions [`dotprod`] uses.
pub(super) fn dotprod_available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

#[target_feature(enable = "neon")]
#[inline]
fn load_u8x16(b: &[u8; 16]) -> uint8x16_t {
    // SAFETY: reads exactly the 16 bytes of `b`.
    unsafe { vld1q_u8(b.as_ptr()) }
}

#[target_feature(enable = "neon")]
#[inline]
fn load_i8x16(b: &[i8; 16]) -> int8x16_t {
    // SAFETY: reads exactly the 16 bytes of `b`.
    unsafe { vld1q_s8(b.as_ptr()) }
}

#[target_feature(enable = "neon")]
#[inline]
fn load_f32x4(b: &[f32; 4]) -> float32x4_t {
    // SAFETY: reads exactly the 4 floats of `b`.
    unsafe { vld1q_f32(b.as_ptr()) }
}

#[target_feature(enable = "neon")]
#[inline]
fn store_f32x4(b: &mut [f32; 4], v: float32x4_t) {
    // SAFETY: writes exactly the 4 floats of `b`.
    unsafe { vst1q_f32(b.as_mut_ptr(), v) }
}

/// The 16 bytes at `b[at..at + 16]`, or zeros if out of range (callers size groups exactly).
#[target_feature(enable = "neon")]
#[inline]
fn at16(b: &[u8], at: usize) -> uint8x16_t {
    match b.get(at..at + 16).map(<&[u8; 16]>::try_from) {
        Some(Ok(v)) => load_u8x16(v),
        _ => vdupq_n_u8(0),
    }
}

/// The 4 f16 values at `b[at..at + 8]` as f32 (zeros if out of range): the scales of 4 rows.
#[target_feature(enable = "neon")]
#[inline]
fn f16x4_at(b: &[u8], at: usize) -> float32x4_t {
    let v = [0, 1, 2, 3].map(|i| match b.get(at + 2 * i..at + 2 * i + 2) {
        Some(&[lo, hi]) => f16::from_le_bytes([lo, hi]).to_f32(),
        _ => 0.0,
    });
    load_f32x4(&v)
}

/// The two 16-byte halves of each activation block: weights `0..16` and `16..32`.
#[target_feature(enable = "neon")]
#[inline]
fn halves<const G: usize>(acts: &[&BlockQ8; G]) -> [(int8x16_t, int8x16_t); G] {
    let mut x = [(vdupq_n_s8(0), vdupq_n_s8(0)); G];
    for (x, a) in x.iter_mut().zip(acts) {
        let (lo, hi) = a.q.split_at(QK / 2);
        if let (Ok(lo), Ok(hi)) = (<&[i8; 16]>::try_from(lo), <&[i8; 16]>::try_from(hi)) {
            *x = (load_i8x16(lo), load_i8x16(hi));
        }
    }
    x
}

/// The fifth bits of rows `4h..4h + 4` of a Q5_0 / Q5_1 run as 0x10 or 0 per quant, from the
/// 32-bit word at `blk[at..]`: word bit `4r + i` belongs to byte `i` of row `r`, so a table
/// lookup spreads the word's bytes over the lanes and a bit test picks each lane's bit.
#[target_feature(enable = "neon")]
#[inline]
fn q5_fifth(blk: &[u8], at: usize, h: usize) -> uint8x16_t {
    let word = match blk.get(at..at + 4) {
        Some(&[b0, b1, b2, b3]) => u32::from_le_bytes([b0, b1, b2, b3]),
        _ => 0,
    };
    // Rows 0–3 are bits 0..16 of the word (its bytes 0 and 1), rows 4–7 bits 16..32.
    let first = 2 * h as u8;
    let spread = load_u8x16(&std::array::from_fn(|t| first + u8::from(t >= 8)));
    let bits = load_u8x16(&std::array::from_fn(|t| 1 << (t % 8)));
    let v = vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(word)), spread);
    vandq_u8(vtstq_u8(v, bits), vdupq_n_u8(0x10))
}

/// Rows `4h..4h + 4` of run `k` of sub-block `c` of a repacked Q4_K (`Q5` false) or Q5_K
/// super-block: the low (`c` even) or high nibbles of run `8 (c/2) + k`, with Q5_K's fifth
/// bit `c` of fifth-bit run `k`.
#[target_feature(enable = "neon")]
#[inline]
fn qk45_quants<const Q5: bool>(blk: &[u8], c: usize, k: usize, h: usize) -> int8x16_t {
    let qs = if Q5 { 384 } else { 128 };
    let w = at16(blk, qs + (8 * (c / 2) + k) * 32 + 16 * h);
    let q = if c.is_multiple_of(2) {
        vandq_u8(w, vdupq_n_u8(0x0F))
    } else {
        vshrq_n_u8::<4>(w)
    };
    let q = if Q5 {
        let shift = vdupq_n_s8(-(c as i8));
        let f = vandq_u8(
            vshlq_u8(at16(blk, 128 + k * 32 + 16 * h), shift),
            vdupq_n_u8(1),
        );
        vorrq_u8(q, vshlq_n_u8::<4>(f))
    } else {
        q
    };
    vreinterpretq_s8_u8(q)
}

/// Rows `4h..4h + 4` of run `g` of chunk `4n + kk` of a repacked Q6_K super-block: a run of
/// low nibbles and one of high bit pairs, minus 32.
#[target_feature(enable = "neon")]
#[inline]
fn q6k_quants(blk: &[u8], (n, kk): (usize, usize), g: usize, h: usize) -> int8x16_t {
    let l = at16(blk, (16 * n + 8 * (kk % 2) + g) * 32 + 16 * h);
    let hb = at16(blk, 1024 + (8 * n + g) * 32 + 16 * h);
    let lo = if kk < 2 {
        vandq_u8(l, vdupq_n_u8(0x0F))
    } else {
        vshrq_n_u8::<4>(l)
    };
    let hi = vshlq_n_u8::<4>(vandq_u8(
        vshlq_u8(hb, vdupq_n_s8(-2 * kk as i8)),
        vdupq_n_u8(3),
    ));
    vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, hi)), vdupq_n_s8(32))
}

/// Scale `s` (of 16) of rows `4h..4h + 4` of a repacked Q6_K super-block, times their `d`:
/// byte `s % 4` of scale word `s / 4`, signed.
#[target_feature(enable = "neon")]
#[inline]
fn q6k_scale(blk: &[u8], s: usize, h: usize, d: float32x4_t) -> float32x4_t {
    let v = [0, 1, 2, 3].map(|i| {
        let at = 1536 + 32 * (s / 4) + 4 * (4 * h + i) + s % 4;
        f32::from(blk.get(at).copied().unwrap_or(0) as i8)
    });
    vmulq_f32(load_f32x4(&v), d)
}

/// Runs `$body` four times with the constant `$k` set to 0, 1, 2 and 3 (a lane index must be
/// a constant).
macro_rules! lanes {
    ($k:ident => $body:block) => {{
        const $k: i32 = 0;
        $body
    }
    {
        const $k: i32 = 1;
        $body
    }
    {
        const $k: i32 = 2;
        $body
    }
    {
        const $k: i32 = 3;
        $body
    }};
}

/// Runs `$body` twice, with the constant `$h` set to 0 (rows 0–3 of a group, the low 16
/// bytes of a run) and 1 (rows 4–7).
macro_rules! row_halves {
    ($h:ident => $body:block) => {{
        const $h: usize = 0;
        $body
    }
    {
        const $h: usize = 1;
        $body
    }};
}

/// `acc[i] + Σ_t w[4i + t] · x[4L + t]` for each 32-bit lane `i`: `SDOT` by element.
#[cfg(test)]
fn dot4_reference(acc: [i32; 4], w: [i8; 16], x: [i8; 16], l: usize) -> [i32; 4] {
    let mut out = acc;
    for (i, o) in out.iter_mut().enumerate() {
        for t in 0..4 {
            *o += i32::from(w[4 * i + t]) * i32::from(x[4 * l + t]);
        }
    }
    out
}

/// The packed-group kernels for target features `$feat`, on the lane dot product `dot4` the
/// enclosing module defines; up to 4 activation rows per pass over a weight group, so that
/// their accumulators stay in registers.
macro_rules! packed_kernels {
    ($feat:literal) => {
        /// `dot4` for lanes 0 to 3, for the test against [`dot4_reference`].
        #[cfg(test)]
        #[target_feature(enable = $feat)]
        pub(super) fn dot4_lanes(w: &[i8; 16], x: &[i8; 16], acc: &[i32; 4]) -> [[i32; 4]; 4] {
            // SAFETY: each load reads exactly its array; each store writes exactly its array.
            let (wv, xv, a) = unsafe { (vld1q_s8(w.as_ptr()), vld1q_s8(x.as_ptr()), vld1q_s32(acc.as_ptr())) };
            let got = [dot4::<0>(a, wv, xv), dot4::<1>(a, wv, xv), dot4::<2>(a, wv, xv), dot4::<3>(a, wv, xv)];
            let mut out = [[0i32; 4]; 4];
            for (o, g) in out.iter_mut().zip(got) {
                // SAFETY: writes exactly the 4 lanes of `o`.
                unsafe { vst1q_s32(o.as_mut_ptr(), g) };
            }
            out
        }

        #[target_feature(enable = $feat)]
        pub(in crate::kernels) fn quant_group(
            kind: QuantKind,
            group: &[u8],
            acts: &[BlockQ8],
            nb: usize,
            out: &mut [f32],
        ) {
            let n = out.len() / PACK;
            let mut j0 = 0;
            while j0 < n {
                let g = (n - j0).min(GROUP);
                let rows = acts.get(j0 * nb..(j0 + g) * nb).unwrap_or_default();
                let dst = out.get_mut(j0 * PACK..(j0 + g) * PACK).unwrap_or_default();
                match kind {
                    QuantKind::Q4_0 => grouped!(4; g, q4_group, false; group, rows, nb, dst),
                    QuantKind::Q4_1 => grouped!(4; g, q4_group, true; group, rows, nb, dst),
                    QuantKind::Q5_0 => grouped!(4; g, q5_group, false; group, rows, nb, dst),
                    QuantKind::Q5_1 => grouped!(4; g, q5_group, true; group, rows, nb, dst),
                    QuantKind::Q8_0 => grouped!(4; g, q8_group; group, rows, nb, dst),
                    QuantKind::Q4K => grouped!(4; g, qk45_group, false; group, rows, nb, dst),
                    QuantKind::Q5K => grouped!(4; g, qk45_group, true; group, rows, nb, dst),
                    QuantKind::Q6K => grouped!(4; g, q6k_group; group, rows, nb, dst),
                }
                j0 += g;
            }
        }

        /// Writes `acc` (per activation row, rows 0–3 and 4–7 of the group) to `out`.
        #[target_feature(enable = $feat)]
        fn store<const G: usize>(acc: [[float32x4_t; 2]; G], out: &mut [f32]) {
            for (o, a) in out.chunks_exact_mut(PACK).zip(acc) {
                for (o, a) in o.chunks_exact_mut(4).zip(a) {
                    if let Ok(o) = <&mut [f32; 4]>::try_from(o) {
                        store_f32x4(o, a);
                    }
                }
            }
        }

        /// `acc += isum · d · a.d + m · a.s` for one block of 4 rows.
        #[target_feature(enable = $feat)]
        #[inline]
        fn apply(acc: float32x4_t, isum: int32x4_t, d: float32x4_t, m: float32x4_t, a: &BlockQ8) -> float32x4_t {
            let acc = vfmaq_f32(acc, vcvtq_f32_s32(isum), vmulq_n_f32(d, a.d));
            vfmaq_n_f32(acc, m, a.s)
        }

        /// 8 repacked Q4_0 / Q4_1 rows against `G` activation rows. Run `k` of a block holds
        /// bytes `4k..4k + 4` of each row: weights `4k..` in the low nibbles (activation
        /// bytes `4k..`, lane `k` of the low half) and `16 + 4k..` in the high ones.
        #[target_feature(enable = $feat)]
        fn q4_group<const G: usize, const Q4_1: bool>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = if Q4_1 { QuantKind::Q4_1 } else { QuantKind::Q4_0 }.block_bytes();
            let qs = (bb - QK / 2) * PACK;
            let low = vdupq_n_u8(0x0F);
            let mut acc = [[vdupq_n_f32(0.0); 2]; G];
            for (b, blk) in group.chunks_exact(PACK * bb).enumerate().take(nb) {
                let Some(a) = gather::<G>(acts, nb, b) else {
                    continue;
                };
                let x = halves(&a);
                let mut isum = [[vdupq_n_s32(0); 2]; G];
                lanes!(K => {
                    row_halves!(H => {
                        let w = at16(blk, qs + 32 * K as usize + 16 * H);
                        let lo = vreinterpretq_s8_u8(vandq_u8(w, low));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(w));
                        for (s, x) in isum.iter_mut().zip(&x) {
                            s[H] = dot4::<K>(dot4::<K>(s[H], lo, x.0), hi, x.1);
                        }
                    });
                });
                row_halves!(H => {
                    let d = f16x4_at(blk, 8 * H);
                    let m = if Q4_1 { f16x4_at(blk, 16 + 8 * H) } else { vmulq_n_f32(d, -8.0) };
                    for ((acc, s), a) in acc.iter_mut().zip(&isum).zip(&a) {
                        acc[H] = apply(acc[H], s[H], d, m, a);
                    }
                });
            }
            store(acc, out);
        }

        /// 8 repacked Q5_0 / Q5_1 rows against `G` activation rows: the Q4 kernel with each
        /// run's fifth bits or-ed in; word `j` of the group's eight holds those of run `j % 4`'s
        /// low (`j < 4`) or high nibbles ([`super::repack`], [`q5_fifth`]).
        #[target_feature(enable = $feat)]
        fn q5_group<const G: usize, const Q5_1: bool>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = if Q5_1 { QuantKind::Q5_1 } else { QuantKind::Q5_0 }.block_bytes();
            let words = if Q5_1 { 32 } else { 16 };
            let qs = words + 32;
            let low = vdupq_n_u8(0x0F);
            let mut acc = [[vdupq_n_f32(0.0); 2]; G];
            for (b, blk) in group.chunks_exact(PACK * bb).enumerate().take(nb) {
                let Some(a) = gather::<G>(acts, nb, b) else {
                    continue;
                };
                let x = halves(&a);
                let mut isum = [[vdupq_n_s32(0); 2]; G];
                lanes!(K => {
                    row_halves!(H => {
                        let w = at16(blk, qs + 32 * K as usize + 16 * H);
                        let lo = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(w, low), q5_fifth(blk, words + 4 * K as usize, H)));
                        let hi = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(w), q5_fifth(blk, words + 4 * (4 + K as usize), H)));
                        for (s, x) in isum.iter_mut().zip(&x) {
                            s[H] = dot4::<K>(dot4::<K>(s[H], lo, x.0), hi, x.1);
                        }
                    });
                });
                row_halves!(H => {
                    let d = f16x4_at(blk, 8 * H);
                    let m = if Q5_1 { f16x4_at(blk, 16 + 8 * H) } else { vmulq_n_f32(d, -16.0) };
                    for ((acc, s), a) in acc.iter_mut().zip(&isum).zip(&a) {
                        acc[H] = apply(acc[H], s[H], d, m, a);
                    }
                });
            }
            store(acc, out);
        }

        /// 8 repacked Q8_0 rows against `G` activation rows: runs 0–3 against the low half of
        /// the activation block, runs 4–7 against the high half.
        #[target_feature(enable = $feat)]
        fn q8_group<const G: usize>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = QuantKind::Q8_0.block_bytes();
            let qs = 2 * PACK;
            let mut acc = [[vdupq_n_f32(0.0); 2]; G];
            for (b, blk) in group.chunks_exact(PACK * bb).enumerate().take(nb) {
                let Some(a) = gather::<G>(acts, nb, b) else {
                    continue;
                };
                let x = halves(&a);
                let mut isum = [[vdupq_n_s32(0); 2]; G];
                lanes!(K => {
                    row_halves!(H => {
                        let w0 = vreinterpretq_s8_u8(at16(blk, qs + 32 * K as usize + 16 * H));
                        let w1 = vreinterpretq_s8_u8(at16(blk, qs + 32 * (4 + K as usize) + 16 * H));
                        for (s, x) in isum.iter_mut().zip(&x) {
                            s[H] = dot4::<K>(dot4::<K>(s[H], w0, x.0), w1, x.1);
                        }
                    });
                });
                row_halves!(H => {
                    let d = f16x4_at(blk, 8 * H);
                    for ((acc, s), a) in acc.iter_mut().zip(&isum).zip(&a) {
                        acc[H] = vfmaq_f32(acc[H], vcvtq_f32_s32(s[H]), vmulq_n_f32(d, a.d));
                    }
                });
            }
            store(acc, out);
        }

        /// 8 repacked Q4_K / Q5_K rows against `G` activation rows. Sub-block `c` is the low
        /// (`c` even) or high nibbles of runs `8 (c/2)..8 (c/2) + 8`, with Q5_K's fifth bit `c`
        /// of the matching fifth-bit run; its scale and minimum are each row's 6-bit pair.
        #[target_feature(enable = $feat)]
        fn qk45_group<const G: usize, const Q5: bool>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = if Q5 { QuantKind::Q5K } else { QuantKind::Q4K }.block_bytes();
            let mut acc = [[vdupq_n_f32(0.0); 2]; G];
            for (sb, blk) in group.chunks_exact(PACK * bb).enumerate() {
                let d = [f16x4_at(blk, 0), f16x4_at(blk, 8)];
                let dmin = [f16x4_at(blk, 16), f16x4_at(blk, 24)];
                // Each row's 12 scale bytes: byte `s` of row `r` is at 32 + 32 (s/4) + 4r + s%4.
                let rows: [[u8; 12]; PACK] = std::array::from_fn(|r| {
                    std::array::from_fn(|s| blk.get(32 + 32 * (s / 4) + 4 * r + s % 4).copied().unwrap_or(0))
                });
                for c in 0..8 {
                    let Some(a) = gather::<G>(acts, nb, sb * 8 + c) else {
                        continue;
                    };
                    let x = halves(&a);
                    let mut isum = [[vdupq_n_s32(0); 2]; G];
                    lanes!(K => {
                        row_halves!(H => {
                            let w0 = qk45_quants::<Q5>(blk, c, K as usize, H);
                            let w1 = qk45_quants::<Q5>(blk, c, 4 + K as usize, H);
                            for (s, x) in isum.iter_mut().zip(&x) {
                                s[H] = dot4::<K>(dot4::<K>(s[H], w0, x.0), w1, x.1);
                            }
                        });
                    });
                    // Sub-block c's scale and minimum of rows 0–3 and 4–7.
                    let pairs = [0, 1].map(|h| {
                        [0, 1, 2, 3].map(|i| rows.get(4 * h + i).map_or((0, 0), |b| scale_min_k4(c, b)))
                    });
                    let sc = pairs.map(|p| p.map(|(s, _)| f32::from(s)));
                    let mn = pairs.map(|p| p.map(|(_, m)| f32::from(m)));
                    row_halves!(H => {
                        let scale = vmulq_f32(load_f32x4(&sc[H]), d[H]);
                        let min = vmulq_f32(load_f32x4(&mn[H]), dmin[H]);
                        for ((acc, s), a) in acc.iter_mut().zip(&isum).zip(&a) {
                            let v = vfmaq_f32(acc[H], vcvtq_f32_s32(s[H]), vmulq_n_f32(scale, a.d));
                            acc[H] = vfmsq_f32(v, min, vdupq_n_f32(a.s));
                        }
                    });
                }
            }
            store(acc, out);
        }

        /// 8 repacked Q6_K rows against `G` activation rows: chunk `c = 4n + kk` is 8 runs of 4
        /// weights, each from a run of low nibbles and one of high bit pairs, minus 32; its two
        /// halves (runs 0–3 and 4–7) have their own signed 8-bit scales.
        #[target_feature(enable = $feat)]
        fn q6k_group<const G: usize>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = QuantKind::Q6K.block_bytes();
            let mut acc = [[vdupq_n_f32(0.0); 2]; G];
            for (sb, blk) in group.chunks_exact(PACK * bb).enumerate() {
                let d = [f16x4_at(blk, 1664), f16x4_at(blk, 1672)];
                for c in 0..8 {
                    let Some(a) = gather::<G>(acts, nb, sb * 8 + c) else {
                        continue;
                    };
                    let x = halves(&a);
                    let (n, kk) = (c / 4, c % 4);
                    // [activation row][rows 0–3, 4–7][weights 0..16, 16..32]
                    let mut isum = [[[vdupq_n_s32(0); 2]; 2]; G];
                    lanes!(K => {
                        row_halves!(H => {
                            let w0 = q6k_quants(blk, (n, kk), K as usize, H);
                            let w1 = q6k_quants(blk, (n, kk), 4 + K as usize, H);
                            for (s, x) in isum.iter_mut().zip(&x) {
                                s[H][0] = dot4::<K>(s[H][0], w0, x.0);
                                s[H][1] = dot4::<K>(s[H][1], w1, x.1);
                            }
                        });
                    });
                    row_halves!(H => {
                        let (s0, s1) = (q6k_scale(blk, 2 * c, H, d[H]), q6k_scale(blk, 2 * c + 1, H, d[H]));
                        for ((acc, s), a) in acc.iter_mut().zip(&isum).zip(&a) {
                            let v = vfmaq_f32(acc[H], vcvtq_f32_s32(s[H][0]), vmulq_n_f32(s0, a.d));
                            acc[H] = vfmaq_f32(v, vcvtq_f32_s32(s[H][1]), vmulq_n_f32(s1, a.d));
                        }
                    });
                }
            }
            store(acc, out);
        }
    };
}

/// With the dot-product extension: one `SDOT` per 4 rows × 4 quants.
pub(super) mod dotprod {
    use super::*;

    /// `SDOT` by element: lane `i` of `acc` gains the dot product of bytes `4i..4i + 4` of
    /// `w` with bytes `4L..4L + 4` of `x`.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    fn dot4<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: register-only arithmetic; the feature is enabled on this function and
        // checked at run time (module documentation).
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                l = const L,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }

    packed_kernels!("neon,dotprod");
}

/// Without it: the 16 products of lane `L`'s 4 bytes with 4 rows' 4 quants by two widening
/// multiplies, summed pairwise to 16 bits (two products of at most 128 · 127 fit) and added
/// pairwise into the 32-bit lanes.
pub(super) mod neon {
    use super::*;

    #[target_feature(enable = "neon")]
    #[inline]
    fn dot4<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
        let xb = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(x)));
        let p0 = vmull_s8(vget_low_s8(w), vget_low_s8(xb));
        let p1 = vmull_high_s8(w, xb);
        vpadalq_s16(acc, vpaddq_s16(p0, p1))
    }

    packed_kernels!("neon");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot4_is_sdot_by_element() {
        let w: [i8; 16] = std::array::from_fn(|i| (i as i8).wrapping_mul(37).wrapping_sub(64));
        let x: [i8; 16] = std::array::from_fn(|i| (127 - 16 * i as i32) as i8);
        let acc = [1, -2, 3, -4];
        let want = [0, 1, 2, 3].map(|l| dot4_reference(acc, w, x, l));
        // SAFETY: NEON is part of the aarch64 baseline.
        assert_eq!(unsafe { neon::dot4_lanes(&w, &x, &acc) }, want);
        if dotprod_available() {
            // SAFETY: just checked.
            assert_eq!(unsafe { dotprod::dot4_lanes(&w, &x, &acc) }, want);
        }
    }
}

/// [`neon::quant_group`]: NEON is in the aarch64 baseline.
pub(super) fn quant_group(
    kind: QuantKind,
    group: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    // SAFETY: NEON is part of every aarch64 Linux target's baseline.
    unsafe { neon::quant_group(kind, group, acts, nb, out) }
}

/// [`dotprod::quant_group`], for a `Kernels` value made after [`dotprod_available`].
pub(super) fn quant_group_dotprod(
    kind: QuantKind,
    group: &[u8],
    acts: &[BlockQ8],
    nb: usize,
    out: &mut [f32],
) {
    // SAFETY: the caller holds a `Kernels::NeonDot`, made only after `dotprod_available()`.
    unsafe { dotprod::quant_group(kind, group, acts, nb, out) }
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: NEON is part of every aarch64 Linux target's baseline.
    unsafe { dot_neon(a, b) }
}

pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    // SAFETY: NEON is part of every aarch64 Linux target's baseline.
    unsafe { axpy_neon(alpha, x, y) }
}

/// `Σ a[i] · b[i]`, 16 at a time in four accumulators.
#[target_feature(enable = "neon")]
fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 4];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        let (x, y) = (x.as_chunks::<4>().0, y.as_chunks::<4>().0);
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc = vfmaq_f32(*acc, load_f32x4(x), load_f32x4(y));
        }
    }
    let [a0, a1, a2, a3] = acc;
    vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3))) + tail
}

/// `y[i] += alpha · x[i]`.
#[target_feature(enable = "neon")]
fn axpy_neon(alpha: f32, x: &[f32], y: &mut [f32]) {
    let mut cy = y.chunks_exact_mut(4);
    let mut cx = x.chunks_exact(4);
    for (ys, xs) in (&mut cy).zip(&mut cx) {
        if let (Ok(ys), Ok(xs)) = (<&mut [f32; 4]>::try_from(ys), <&[f32; 4]>::try_from(xs)) {
            let v = vfmaq_n_f32(load_f32x4(ys), load_f32x4(xs), alpha);
            store_f32x4(ys, v);
        }
    }
    for (y, x) in cy.into_remainder().iter_mut().zip(cx.remainder()) {
        *y += alpha * x;
    }
}
