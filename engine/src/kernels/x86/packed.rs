//! The kernels for repacked 8-row groups (the prefill and batched-decode hot path), stamped out
//! once per instruction set: [`avx2`] with `maddubs` + `madd` (GGML's AVX2 dot products) and
//! [`vnni`] with AVX-512 VNNI's `vpdpbusd` on 256-bit vectors, which does a row's 4-byte
//! unsigned × signed dot product and its 32-bit accumulation in one instruction.
//!
//! Both run the same algorithm through five accumulation helpers each module defines:
//! `dp1n`/`dp2n` add one or two `u8 × i8` products per 32-bit lane to an accumulator whose
//! partial sums the caller has bounded to fit in 16 bits (AVX2 keeps them in i16 lanes until
//! `widen`), `dp1w`/`dp2w` add them to 32-bit lanes. VNNI never saturates and the bounds hold
//! for AVX2, so both give the same integers. Soundness as in the parent module: `vnni` is only
//! called after [`vnni_available`] said the CPU has AVX-512 F, BW, VL and VNNI besides AVX2.

#![allow(unsafe_code)]

/// Whether this CPU has what [`vnni`] uses besides the parent module's AVX2, FMA and F16C.
pub(in crate::kernels) fn vnni_available() -> bool {
    super::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// The packed-group kernels for target features `$feat`, taking up to 4 activation rows per
/// pass over a weight group, or `$wide` (4 or 8) for Q4_0 and Q4_1: as many as their
/// accumulators fit in registers (measured with `examples/kernels.rs`).
macro_rules! packed_kernels {
    ($feat:literal, $wide:tt) => {
        #[target_feature(enable = $feat)]
        pub(in crate::kernels) fn quant_group(kind: QuantKind, group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let n = out.len() / PACK;
            let mut j0 = 0;
            // Q4's kernel keeps the fewest registers live, so it takes `$wide` rows at a time.
            let max = if matches!(kind, QuantKind::Q4_0 | QuantKind::Q4_1) { $wide } else { 4 };
            while j0 < n {
                let g = (n - j0).min(max);
                let rows = acts.get(j0 * nb..(j0 + g) * nb).unwrap_or_default();
                let dst = out.get_mut(j0 * PACK..(j0 + g) * PACK).unwrap_or_default();
                match kind {
                    QuantKind::Q4_1 => grouped!($wide; g, packed_group, true; group, rows, nb, dst),
                    QuantKind::Q4_0 => grouped!($wide; g, packed_group, false; group, rows, nb, dst),
                    QuantKind::Q5_1 => grouped!(4; g, packed_q5_group, true; group, rows, nb, dst),
                    QuantKind::Q5_0 => grouped!(4; g, packed_q5_group, false; group, rows, nb, dst),
                    QuantKind::Q8_0 => grouped!(4; g, packed_q8_group; group, rows, nb, dst),
                    QuantKind::Q4K => grouped!(4; g, packed_qk45_group, false; group, rows, nb, dst),
                    QuantKind::Q5K => grouped!(4; g, packed_qk45_group, true; group, rows, nb, dst),
                    QuantKind::Q6K => grouped!(4; g, packed_q6k_group; group, rows, nb, dst),
                }
                j0 += g;
            }
        }

        /// 8 repacked rows against `G` activation rows. Per block, the 8 `maddubs` products of a row
        /// pair fit in 16 bits (|15 · 127 · 2| · 8 = 30,480), so they are summed before widening.
        #[target_feature(enable = $feat)]
        fn packed_group<const G: usize, const Q4_1: bool>(
            group: &[u8],
            acts: &[BlockQ8],
            nb: usize,
            out: &mut [f32],
        ) {
            let bb = q4_kind(Q4_1).block_bytes();
            let head = (bb - QK / 2) * PACK;
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); G];
            for (b, blk) in group.chunks_exact(PACK * bb).enumerate().take(nb) {
                prefetch_ahead(blk);
                let (scales, quants) = blk.split_at(head);
                let (Some(a), Ok(quants)) = (
                    gather::<G>(acts, nb, b),
                    <&[u8; PACK * QK / 2]>::try_from(quants),
                ) else {
                    continue;
                };
                let mut isum = [_mm256_setzero_si256(); G];
                // Chunk k holds bytes 4k..4k+4 of each of the 8 rows: weights 4k.. in the low
                // nibbles, 16 + 4k.. in the high ones.
                for (k, chunk) in quants.as_chunks::<32>().0.iter().enumerate() {
                    let w = load_u8x32(chunk);
                    let lo = _mm256_and_si256(w, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), low);
                    for (isum, a) in isum.iter_mut().zip(&a) {
                        let (x0, x1) = (broadcast_i8x4(quad(&a.q, k)), broadcast_i8x4(quad(&a.q, 4 + k)));
                        *isum = dp2n(*isum, lo, x0, hi, x1);
                    }
                }
                let Some(Ok(d)) = scales.get(..16).map(<&[u8; 16]>::try_from) else {
                    continue;
                };
                let d = load_u8x16_f16(d);
                let m = if Q4_1 {
                    match scales.get(16..32).map(<&[u8; 16]>::try_from) {
                        Some(Ok(m)) => load_u8x16_f16(m),
                        _ => _mm256_setzero_ps(),
                    }
                } else {
                    _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                };
                for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
                    let p = _mm256_cvtepi32_ps(widen(isum));
                    *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(d, _mm256_set1_ps(a.d)), *acc);
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), *acc);
                }
            }
            for (o, a) in out.chunks_exact_mut(PACK).zip(acc) {
                if let Ok(o) = <&mut [f32; 8]>::try_from(o) {
                    store_f32x8(o, a);
                }
            }
        }

        /// 8 repacked Q5_0 / Q5_1 rows against `G` activation rows: the Q4 kernel above with each
        /// chunk's fifth bits (one 32-bit word per nibble half, laid out by `repack` in the chunk's
        /// byte order) or-ed in. A row pair's `maddubs` products reach 2 · 31 · 128 = 7,936, so two of
        /// them still fit in 16 bits, and each chunk is widened to 32 bits.
        #[target_feature(enable = $feat)]
        fn packed_q5_group<const G: usize, const Q5_1: bool>(
            group: &[u8],
            acts: &[BlockQ8],
            nb: usize,
            out: &mut [f32],
        ) {
            let kind = if Q5_1 {
                QuantKind::Q5_1
            } else {
                QuantKind::Q5_0
            };
            let bb = kind.block_bytes();
            let halves = if Q5_1 { 32 } else { 16 };
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); G];
            for (b, blk) in group.chunks_exact(PACK * bb).enumerate().take(nb) {
                prefetch_ahead(blk);
                let (head, quants) = blk.split_at(halves + 32);
                let (scales, words) = head.split_at(halves);
                let (Some(a), Ok(quants), Ok(words)) = (
                    gather::<G>(acts, nb, b),
                    <&[u8; PACK * QK / 2]>::try_from(quants),
                    <&[u8; 32]>::try_from(words),
                ) else {
                    continue;
                };
                let words = words.as_chunks::<4>().0;
                let fifth = |j: usize| fifth_bits(u32::from_le_bytes(words.get(j).copied().unwrap_or([0; 4])));
                let mut isum = [_mm256_setzero_si256(); G];
                for (k, chunk) in quants.as_chunks::<32>().0.iter().enumerate() {
                    let w = load_u8x32(chunk);
                    let lo = _mm256_or_si256(_mm256_and_si256(w, low), fifth(k));
                    let hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(w), low),
                        fifth(4 + k),
                    );
                    for (isum, a) in isum.iter_mut().zip(&a) {
                        let (x0, x1) = (broadcast_i8x4(quad(&a.q, k)), broadcast_i8x4(quad(&a.q, 4 + k)));
                        *isum = dp2w(*isum, lo, x0, hi, x1);
                    }
                }
                let Some(Ok(d)) = scales.get(..16).map(<&[u8; 16]>::try_from) else {
                    continue;
                };
                let d = load_u8x16_f16(d);
                let m = if Q5_1 {
                    match scales.get(16..32).map(<&[u8; 16]>::try_from) {
                        Some(Ok(m)) => load_u8x16_f16(m),
                        _ => _mm256_setzero_ps(),
                    }
                } else {
                    _mm256_mul_ps(d, _mm256_set1_ps(-16.0))
                };
                for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
                    let p = _mm256_cvtepi32_ps(isum);
                    *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(d, _mm256_set1_ps(a.d)), *acc);
                    *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), *acc);
                }
            }
            for (o, a) in out.chunks_exact_mut(PACK).zip(acc) {
                if let Ok(o) = <&mut [f32; 8]>::try_from(o) {
                    store_f32x8(o, a);
                }
            }
        }

        /// 8 repacked Q4_K / Q5_K rows against `G` activation rows. Per super-block, the 8 rows'
        /// 6-bit scales and minimums come out of the three 32-byte scale words with GGML's byte-wise
        /// masks (`kmask1..3` in `ggml_vec_dot_q4_K_q8_K`), which `repack` made lane-parallel: byte
        /// `4r + j` of each word is byte `4w + j` of row `r`'s scales. Sub-block `c` is the low (`c`
        /// even) or high nibbles of chunks `8 (c/2)..8 (c/2) + 8`, each 4 weights of the 8 rows, with
        /// Q5_K's fifth bit `c` of the matching fifth-bit chunk. A sub-block's `maddubs` sums stay
        /// within i16 for Q4_K (8 · 2 · 15 · 127 = 30,480); Q5_K's are widened chunk by chunk.
        #[target_feature(enable = $feat)]
        fn packed_qk45_group<const G: usize, const Q5: bool>(
            group: &[u8],
            acts: &[BlockQ8],
            nb: usize,
            out: &mut [f32],
        ) {
            let kind = if Q5 { QuantKind::Q5K } else { QuantKind::Q4K };
            let bb = kind.block_bytes();
            let qs_at = if Q5 { 384 } else { 128 };
            let low = _mm256_set1_epi8(0x0F);
            let six = _mm256_set1_epi8(0x3F);
            let two = _mm256_set1_epi8(0x03);
            let one = _mm256_set1_epi8(0x01);
            let mut acc = [_mm256_setzero_ps(); G];
            for (sb, blk) in group.chunks_exact(PACK * bb).enumerate() {
                prefetch_ahead(blk);
                let (d, dmin) = (f16x8_at(blk, 0), f16x8_at(blk, 16));
                let (u0, u1, u2) = (load_at(blk, 32), load_at(blk, 64), load_at(blk, 96));
                let sc03 = _mm256_and_si256(u0, six);
                let mn03 = _mm256_and_si256(u1, six);
                let sc47 = _mm256_or_si256(
                    _mm256_and_si256(u2, low),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(u0), two)),
                );
                let mn47 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(u2), low),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(u1), two)),
                );
                for c in 0..8 {
                    let Some(a) = gather::<G>(acts, nb, sb * 8 + c) else {
                        continue;
                    };
                    let (scv, mnv) = if c < 4 { (sc03, mn03) } else { (sc47, mn47) };
                    let scale = _mm256_mul_ps(_mm256_cvtepi32_ps(lane_byte(scv, c % 4)), d);
                    let min = _mm256_mul_ps(_mm256_cvtepi32_ps(lane_byte(mnv, c % 4)), dmin);
                    let bit = _mm_cvtsi32_si128(c as i32);
                    let mut isum = [_mm256_setzero_si256(); G];
                    for k in 0..8 {
                        let w = load_at(blk, qs_at + (8 * (c / 2) + k) * 32);
                        let mut q = if c % 2 == 0 {
                            _mm256_and_si256(w, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(w), low)
                        };
                        if Q5 {
                            let h =
                                _mm256_and_si256(_mm256_srl_epi16(load_at(blk, 128 + k * 32), bit), one);
                            q = _mm256_or_si256(q, _mm256_slli_epi16::<4>(h));
                        }
                        for (isum, a) in isum.iter_mut().zip(&a) {
                            let x = broadcast_i8x4(quad(&a.q, k));
                            *isum = if Q5 {
                                dp1w(*isum, q, x)
                            } else {
                                dp1n(*isum, q, x)
                            };
                        }
                    }
                    for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
                        let i = if Q5 { isum } else { widen(isum) };
                        let p = _mm256_cvtepi32_ps(i);
                        *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(scale, _mm256_set1_ps(a.d)), *acc);
                        *acc = _mm256_fnmadd_ps(min, _mm256_set1_ps(a.s), *acc);
                    }
                }
            }
            for (o, a) in out.chunks_exact_mut(PACK).zip(acc) {
                if let Ok(o) = <&mut [f32; 8]>::try_from(o) {
                    store_f32x8(o, a);
                }
            }
        }

        /// 8 repacked Q6_K rows against `G` activation rows: chunk `c = 4n + kk` of each row is 8
        /// runs of 4 weights, each from one 32-byte run of low nibbles and one of high bit pairs,
        /// made signed (`q - 32`) for the sign trick; its two halves have their own 8-bit scales,
        /// taken from the scale words as `repack` laid them out. A half's sums stay within i16
        /// (4 · 2 · 32 · 127 = 32,512).
        #[target_feature(enable = $feat)]
        fn packed_q6k_group<const G: usize>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = QuantKind::Q6K.block_bytes();
            let low = _mm256_set1_epi8(0x0F);
            let three = _mm256_set1_epi8(0x03);
            let offset = _mm256_set1_epi8(32);
            let mut acc = [_mm256_setzero_ps(); G];
            for (sb, blk) in group.chunks_exact(PACK * bb).enumerate() {
                prefetch_ahead(blk);
                let d = f16x8_at(blk, 1664);
                for c in 0..8 {
                    let Some(a) = gather::<G>(acts, nb, sb * 8 + c) else {
                        continue;
                    };
                    let (n, kk) = (c / 4, c % 4);
                    let shift = _mm_cvtsi32_si128(2 * kk as i32);
                    let mut isum = [[_mm256_setzero_si256(); 2]; G];
                    for g in 0..8 {
                        let l = load_at(blk, (16 * n + 8 * (kk % 2) + g) * 32);
                        let h = load_at(blk, 1024 + (8 * n + g) * 32);
                        let lo = if kk < 2 {
                            _mm256_and_si256(l, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(l), low)
                        };
                        let hi =
                            _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srl_epi16(h, shift), three));
                        let w = _mm256_sub_epi8(_mm256_or_si256(lo, hi), offset);
                        let wabs = _mm256_sign_epi8(w, w);
                        for (isum, a) in isum.iter_mut().zip(&a) {
                            let x = _mm256_sign_epi8(broadcast_i8x4(quad(&a.q, g)), w);
                            if let Some(s) = isum.get_mut(g / 4) {
                                *s = dp1n(*s, wabs, x);
                            }
                        }
                    }
                    // Scales 2c and 2c + 1 of each row: byte (2c + h) % 4 of word (2c + h) / 4, signed.
                    let scale = |h: usize| {
                        let s = 2 * c + h;
                        let word = load_at(blk, 1536 + (s / 4) * 32);
                        let up = _mm_cvtsi32_si128(24 - 8 * (s % 4) as i32);
                        let v = _mm256_srai_epi32::<24>(_mm256_sll_epi32(word, up));
                        _mm256_mul_ps(_mm256_cvtepi32_ps(v), d)
                    };
                    let (s0, s1) = (scale(0), scale(1));
                    for ((acc, [i0, i1]), a) in acc.iter_mut().zip(isum).zip(&a) {
                        let ad = _mm256_set1_ps(a.d);
                        let p0 = _mm256_cvtepi32_ps(widen(i0));
                        let p1 = _mm256_cvtepi32_ps(widen(i1));
                        *acc = _mm256_fmadd_ps(p0, _mm256_mul_ps(s0, ad), *acc);
                        *acc = _mm256_fmadd_ps(p1, _mm256_mul_ps(s1, ad), *acc);
                    }
                }
            }
            for (o, a) in out.chunks_exact_mut(PACK).zip(acc) {
                if let Ok(o) = <&mut [f32; 8]>::try_from(o) {
                    store_f32x8(o, a);
                }
            }
        }

        /// 8 repacked Q8_0 rows against `G` activation rows, with GGML's sign trick (`maddubs` needs
        /// an unsigned operand: `|w| · sign(w)·a`). Each product pair can reach 32,512, so it is widened
        /// to 32 bits at once.
        #[target_feature(enable = $feat)]
        fn packed_q8_group<const G: usize>(group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
            let bb = QuantKind::Q8_0.block_bytes();
            let mut acc = [_mm256_setzero_ps(); G];
            for (b, blk) in group.chunks_exact(PACK * bb).enumerate().take(nb) {
                prefetch_ahead(blk);
                let (scales, quants) = blk.split_at(2 * PACK);
                let (Some(a), Ok(quants), Ok(d)) = (
                    gather::<G>(acts, nb, b),
                    <&[u8; PACK * QK]>::try_from(quants),
                    <&[u8; 16]>::try_from(scales),
                ) else {
                    continue;
                };
                let mut isum = [_mm256_setzero_si256(); G];
                for (k, chunk) in quants.as_chunks::<32>().0.iter().enumerate() {
                    let w = load_u8x32(chunk);
                    let wabs = _mm256_sign_epi8(w, w);
                    for (isum, a) in isum.iter_mut().zip(&a) {
                        let signed = _mm256_sign_epi8(broadcast_i8x4(quad(&a.q, k)), w);
                        *isum = dp1w(*isum, wabs, signed);
                    }
                }
                let d = load_u8x16_f16(d);
                for ((acc, isum), a) in acc.iter_mut().zip(isum).zip(&a) {
                    *acc = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_mul_ps(d, _mm256_set1_ps(a.d)),
                        *acc,
                    );
                }
            }
            for (o, a) in out.chunks_exact_mut(PACK).zip(acc) {
                if let Ok(o) = <&mut [f32; 8]>::try_from(o) {
                    store_f32x8(o, a);
                }
            }
        }
    };
}

/// AVX2: `maddubs` multiplies and adds pairs into i16 lanes, `madd` by ones widens to i32.
pub(in crate::kernels) mod avx2 {
    use super::super::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dp1n(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dp2n(acc: __m256i, w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1));
        _mm256_add_epi16(acc, p)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dp1w(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_add_epi32(acc, widen(_mm256_maddubs_epi16(w, x)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dp2w(acc: __m256i, w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1));
        _mm256_add_epi32(acc, widen(p))
    }

    /// i16 pair sums to i32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn widen(acc: __m256i) -> __m256i {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }

    /// Q5's fifth bits: byte `e` 0x10 where bit `e` of `x` is set.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn fifth_bits(x: u32) -> __m256i {
        _mm256_and_si256(bytes_from_bits_32(x), _mm256_set1_epi8(0x10))
    }

    packed_kernels!("avx2,fma,f16c", 4);
}

/// AVX-512 VNNI on 256-bit vectors (EVEX-encoded, so 32 vector registers: room for Q4's 8
/// activation rows' accumulators).
pub(in crate::kernels) mod vnni {
    use super::super::*;

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn dp1n(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn dp2n(acc: __m256i, w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, w0, x0), w1, x1)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn dp1w(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        dp1n(acc, w, x)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn dp2w(acc: __m256i, w0: __m256i, x0: __m256i, w1: __m256i, x1: __m256i) -> __m256i {
        dp2n(acc, w0, x0, w1, x1)
    }

    /// The accumulators are already 32-bit.
    #[inline]
    fn widen(acc: __m256i) -> __m256i {
        acc
    }

    /// Q5's fifth bits: byte `e` 0x10 where bit `e` of `x` is set, one masked move from a mask
    /// register where AVX2 needs a shuffle, an or and a compare.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    fn fifth_bits(x: u32) -> __m256i {
        _mm256_maskz_mov_epi8(_cvtu32_mask32(x), _mm256_set1_epi8(0x10))
    }

    packed_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", 8);
}
