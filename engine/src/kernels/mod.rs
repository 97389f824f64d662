//! Matrix-vector kernels for the forward pass: quantized weight rows (GGML Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K) against activations quantized to 8 bits,
//! half-precision rows (F16, BF16) against f32 activations, and f32 dot products.
//!
//! Every kernel has a portable scalar version, which is the reference, and vector versions
//! chosen at run time ([`Kernels::detect`]) so that the binary stays built for the baseline
//! target (reproducible enclave images, README "Build target") and still uses the vector units
//! the Nitro host has: AVX2/FMA/F16C and AVX-512 VNNI on x86-64 ([`x86`]), NEON with or
//! without the dot-product instructions on aarch64 (Graviton, [`aarch64`]: the packed groups,
//! `dot` and `axpy`; the rest is the portable code, which the compiler vectorizes for NEON).
//! The vector code is the crate's only `unsafe` code; tests compare every variant the CPU runs
//! with the scalar reference (`make test-aarch64` runs them for aarch64 under emulation).
//!
//! The block formats are GGML's (ggml-common.h): 32 weights per block, an f16 scale `d`, for
//! Q4_1 and Q5_1 an f16 minimum `m`, for Q5 a 32-bit word of fifth bits, and the quants. Q4
//! quants are nibbles: byte `j` holds weight `j` in its low nibble and weight `j + 16` in its
//! high nibble. The K-quants hold 256 weights per super-block in sub-blocks with 6-bit (Q4_K,
//! Q5_K) or 8-bit (Q6_K) scales; every kernel sees a block as 32-weight chunks, each with one
//! activation block, where weight `e` is `q[e] · d[e / 16] + m` ([`decode_chunk`]): the
//! arithmetic of ggml-quants.c's `dequantize_row_*`, so the results equal candle's and
//! llama.cpp's dequantization exactly.
//!
//! Matrices are re-laid out at load time, in place, into groups of 8 rows ([`repack`]): per
//! block, the 8 rows' scales, then their quants interleaved 4 bytes at a time. One 32-byte
//! load then holds 4 quants of each of 8 rows, so a `maddubs` against 4 broadcast activations
//! yields 8 rows' partial sums at once, and the scales apply to 8 rows in one multiply: the
//! layout of llama.cpp's `block_q4_0x8` repacking (ggml-cpu/repack.cpp), here for Q4_0, Q4_1
//! and Q8_0. The group is the same size as the 8 rows it replaces.

/// Activation rows processed together, so their accumulators stay in registers.
const GROUP: usize = 4;

/// Calls kernel `$f` with its activation-row count `G` set to `$g` (1 to [`GROUP`]) and its
/// other const parameters `$c`, so that each group size has its own monomorphized kernel with
/// its accumulators in registers.
macro_rules! grouped {
    (8; $g:expr, $f:ident $(, $c:literal)*; $($arg:expr),*) => {
        match $g {
            8 => $f::<8 $(, $c)*>($($arg),*),
            7 => $f::<7 $(, $c)*>($($arg),*),
            6 => $f::<6 $(, $c)*>($($arg),*),
            5 => $f::<5 $(, $c)*>($($arg),*),
            _ => grouped!(4; $g, $f $(, $c)*; $($arg),*),
        }
    };
    (4; $g:expr, $f:ident $(, $c:literal)*; $($arg:expr),*) => {
        match $g {
            4 => $f::<4 $(, $c)*>($($arg),*),
            3 => $f::<3 $(, $c)*>($($arg),*),
            2 => $f::<2 $(, $c)*>($($arg),*),
            _ => $f::<1 $(, $c)*>($($arg),*),
        }
    };
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;

/// Weights (and activations) per quantization block.
pub const QK: usize = 32;

/// An activation block quantized to 8 bits: `x[i] ≈ d * q[i]`, with `s = d * Σ q[i]` kept so
/// that Q4_1's minimum and Q4_0's offset cost one multiply per block (as GGML's Q8_1 does).
/// Scales stay f32 (GGML rounds them to f16), which only adds precision.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub q: [i8; QK],
}

/// Weights per K-quant super-block (GGML's `QK_K`).
pub const QK_K: usize = 256;

/// The GGML block types with a native kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QuantKind {
    /// Every kind, for tests and benchmarks.
    pub const ALL: [QuantKind; 8] = [
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q5_0,
        QuantKind::Q5_1,
        QuantKind::Q8_0,
        QuantKind::Q4K,
        QuantKind::Q5K,
        QuantKind::Q6K,
    ];

    /// GGML's name for the type.
    pub const fn name(self) -> &'static str {
        match self {
            QuantKind::Q4_0 => "Q4_0",
            QuantKind::Q4_1 => "Q4_1",
            QuantKind::Q5_0 => "Q5_0",
            QuantKind::Q5_1 => "Q5_1",
            QuantKind::Q8_0 => "Q8_0",
            QuantKind::Q4K => "Q4_K",
            QuantKind::Q5K => "Q5_K",
            QuantKind::Q6K => "Q6_K",
        }
    }

    /// Weights per block: [`QK`], or [`QK_K`] for the K-quants.
    pub const fn block_elems(self) -> usize {
        match self {
            QuantKind::Q4K | QuantKind::Q5K | QuantKind::Q6K => QK_K,
            _ => QK,
        }
    }

    /// Bytes per block (ggml-common.h's `block_*` structs).
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 => 18,
            QuantKind::Q4_1 => 20,
            QuantKind::Q5_0 => 22,
            QuantKind::Q5_1 => 24,
            QuantKind::Q8_0 => 34,
            QuantKind::Q4K => 144,
            QuantKind::Q5K => 176,
            QuantKind::Q6K => 210,
        }
    }

    /// Bytes in one row of `cols` weights (`cols` a multiple of [`Self::block_elems`]).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Whether [`repack`] and the grouped kernels handle this kind.
    pub const fn packable(self) -> bool {
        true
    }

    /// Bytes of nibbles or bytes of quants per block of a [packable](Self::packable) kind.
    pub const fn quant_bytes(self) -> usize {
        match self {
            QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 | QuantKind::Q5_1 => QK / 2,
            _ => QK,
        }
    }
}

/// Half-precision weight types, multiplied against f32 activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

impl HalfKind {
    /// The weight at `bytes[2 * i..2 * i + 2]` (0 if out of range).
    #[inline]
    pub fn at(self, bytes: &[u8], i: usize) -> f32 {
        match (self, bytes.get(2 * i..2 * i + 2)) {
            (HalfKind::F16, Some(&[lo, hi])) => f16::from_le_bytes([lo, hi]).to_f32(),
            (HalfKind::Bf16, Some(&[lo, hi])) => half::bf16::from_le_bytes([lo, hi]).to_f32(),
            _ => 0.0,
        }
    }
}

/// How attention scores are formed from `q·k`: multiplied by `scale`, then, with a soft cap
/// `c`, mapped through `c · tanh(s / c)` (Gemma 2's `attn_logit_softcapping`, applied by
/// llama.cpp after the scaling).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl Score {
    /// Scaled scores without a cap.
    pub fn scaled(scale: f32) -> Self {
        Score {
            scale,
            softcap: None,
        }
    }
}

/// Where one KV head's keys and values sit in a sequence's cache, for [`Kernels::attend`]:
/// position `p`'s key (and value) is `keys[p * stride + off..][..head_dim]`, `n` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSpan {
    pub stride: usize,
    pub off: usize,
    pub n: usize,
    pub head_dim: usize,
}

/// The activation of a gated feed-forward layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    /// SiLU, `x · σ(x)`: SwiGLU (Llama, Qwen, SmolLM, Phi).
    Silu,
    /// GELU in GGML's tanh approximation (`ggml_gelu`): GeGLU (Gemma).
    GeluTanh,
}

/// √(2/π) and the cubic coefficient of GELU's tanh approximation.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

impl Glu {
    /// The activation of one value: the scalar reference.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Glu::Silu => x / (1.0 + (-x).exp()),
            Glu::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_A * x * x)).tanh()),
        }
    }
}

/// Rows per repacked group.
pub const PACK: usize = 8;

/// Fewest activation rows for which [`Kernels::quant_groups`] hands pairs of groups to the
/// AVX-512 16-row kernels; fewer rows go one 8-row group at a time. In cache the pair kernel is
/// the faster even for one row (`examples/kernels`), but in the model, reading weights from
/// memory, it was the slower below 5 rows. Measured on Zen 4 (2 vCPUs, `examples/bench
/// --threads 2`, builds interleaved): SmolLM2 Q4_1 one stream 188–191 tok/s with pairs, 264–299
/// without; 2 streams 349–359 (pairs from 2 rows) against 460–496 (from 5); 4 streams 540–559
/// against 686–689; Qwen2.5-Coder-0.5B Q4_K_M one stream 59–60 against 72–74, 2 streams 107–109
/// against 134, 4 streams 179–180 against 222–223. From 8 rows on, pairs and single groups were
/// within a few percent (pairs ahead on Qwen's prefill, 477–485 against 439–443 tok/s).
#[cfg(target_arch = "x86_64")]
const PAIR_MIN_ROWS: usize = 5;

/// Which implementation the kernels use, fixed when the model is loaded. The vector variant
/// can only be obtained from [`Kernels::detect`], which checks the CPU first: that check is
/// what makes calling the `target_feature` functions sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels(Imp);

/// The implementations that run the portable code for kernels without a vector version of
/// their own: on aarch64 the NEON variants too (the compiler vectorizes that code for NEON).
#[cfg(target_arch = "aarch64")]
macro_rules! portable {
    () => {
        Imp::Scalar | Imp::Neon | Imp::NeonDot
    };
}
#[cfg(not(target_arch = "aarch64"))]
macro_rules! portable {
    () => {
        Imp::Scalar
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Imp {
    /// Portable Rust; the reference.
    Scalar,
    /// AVX2 + FMA + F16C, detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-512 VNNI's dot-product instruction for the packed groups (Ice Lake,
    /// Sapphire Rapids, Zen 4 and later), detected at run time.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// NEON (the aarch64 baseline), with widening multiplies for the packed groups.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// NEON with the Armv8.2 dot-product instructions (every Graviton), detected at run time.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Kernels {
    /// The portable reference implementation.
    #[allow(non_upper_case_globals)]
    pub const Scalar: Kernels = Kernels(Imp::Scalar);

    /// The fastest implementation this CPU supports.
    pub fn detect() -> Self {
        Self::supported().last().copied().unwrap_or(Self::Scalar)
    }

    /// Every implementation this CPU runs, the scalar reference first and the fastest last
    /// (the tests check each one against the reference).
    pub fn supported() -> Vec<Self> {
        let mut all = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::available() {
                all.push(Kernels(Imp::Avx2));
            }
            if x86::vnni_available() {
                all.push(Kernels(Imp::Vnni));
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            all.push(Kernels(Imp::Neon));
            if aarch64::dotprod_available() {
                all.push(Kernels(Imp::NeonDot));
            }
        }
        all
    }

    /// The supported implementation called `name` (as [`Kernels::name`] gives it).
    pub fn by_name(name: &str) -> Option<Self> {
        Self::supported().into_iter().find(|k| k.name() == name)
    }

    /// A short name for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self.0 {
            Imp::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 => "avx2+fma+f16c",
            #[cfg(target_arch = "x86_64")]
            Imp::Vnni => "avx2+avx512vnni",
            #[cfg(target_arch = "aarch64")]
            Imp::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            Imp::NeonDot => "neon+dotprod",
        }
    }

    /// Dot products of one quantized weight row with `n` activation rows.
    ///
    /// `w` is one row (`nb` blocks of `kind`), `acts` holds `n` rows of `nb` blocks each, and
    /// `out[j]` receives row `j`'s result. Mismatched lengths leave `out` zeroed; callers size
    /// everything from the validated model shapes, so that never happens.
    pub fn quant_row(
        self,
        kind: QuantKind,
        w: &[u8],
        acts: &[BlockQ8],
        nb: usize,
        out: &mut [f32],
    ) {
        let n = out.len();
        let cols = nb * QK;
        if nb == 0
            || !cols.is_multiple_of(kind.block_elems())
            || w.len() != kind.row_bytes(cols)
            || acts.len() != n * nb
        {
            out.fill(0.0);
            return;
        }
        match self.0 {
            portable!() => scalar_quant_row(kind, w, acts, nb, out),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni => x86::quant_row(kind, w, acts, nb, out),
        }
    }

    /// One repacked group of [`PACK`] rows against `n` activation rows: `out[j * PACK + r]`
    /// is row `r` of the group dotted with activation row `j` (`n = out.len() / PACK`).
    pub fn quant_group(
        self,
        kind: QuantKind,
        group: &[u8],
        acts: &[BlockQ8],
        nb: usize,
        out: &mut [f32],
    ) {
        let n = out.len() / PACK;
        let cols = nb * QK;
        if nb == 0
            || !kind.packable()
            || !cols.is_multiple_of(kind.block_elems())
            || group.len() != PACK * kind.row_bytes(cols)
            || acts.len() != n * nb
        {
            out.fill(0.0);
            return;
        }
        match self.0 {
            Imp::Scalar => scalar_quant_group(kind, group, acts, nb, out),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 => x86::quant_group(kind, group, acts, nb, out),
            #[cfg(target_arch = "x86_64")]
            Imp::Vnni => x86::quant_group_vnni(kind, group, acts, nb, out),
            #[cfg(target_arch = "aarch64")]
            Imp::Neon => aarch64::quant_group(kind, group, acts, nb, out),
            #[cfg(target_arch = "aarch64")]
            Imp::NeonDot => aarch64::quant_group_dotprod(kind, group, acts, nb, out),
        }
    }

    /// Several consecutive repacked groups (`groups` holds `k` of them, each [`PACK`] rows)
    /// against `n` activation rows: `out` holds `k` blocks of `[n][PACK]`, one per group, as
    /// [`Kernels::quant_group`] gives them (`n = out.len() / (k · PACK)`). Where a kernel for
    /// 16 rows at once exists, pairs of groups go through it.
    pub fn quant_groups(
        self,
        kind: QuantKind,
        groups: &[u8],
        acts: &[BlockQ8],
        nb: usize,
        out: &mut [f32],
    ) {
        let cols = nb * QK;
        let group = PACK * kind.row_bytes(cols);
        let k = groups.len() / group.max(1);
        if nb == 0
            || !kind.packable()
            || !cols.is_multiple_of(kind.block_elems())
            || k == 0
            || groups.len() != k * group
            || !out.len().is_multiple_of(k * PACK)
            || acts.len() != out.len() / (k * PACK) * nb
        {
            out.fill(0.0);
            return;
        }
        let per = out.len() / k;
        // Only the x86 pair kernel below takes from the front.
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let (mut ws, mut os) = (groups, out);
        #[cfg(target_arch = "x86_64")]
        if self.0 == Imp::Vnni && x86::pairs(kind) && per / PACK >= PAIR_MIN_ROWS {
            while ws.len() >= 2 * group {
                let (w, rest_w) = ws.split_at(2 * group);
                let (o, rest_o) = std::mem::take(&mut os).split_at_mut(2 * per);
                x86::quant_pair_vnni(kind, w, acts, nb, o);
                (ws, os) = (rest_w, rest_o);
            }
        }
        for (w, o) in ws.chunks_exact(group).zip(os.chunks_exact_mut(per)) {
            self.quant_group(kind, w, acts, nb, o);
        }
    }

    /// Dot products of one half-precision weight row (`xs.len() / n` weights, `n = out.len()`)
    /// with `n` f32 activation rows: `out[j] = w · xs[j]`. Mismatched lengths leave `out`
    /// zeroed.
    pub fn half_row(self, kind: HalfKind, w: &[u8], xs: &[f32], out: &mut [f32]) {
        let cols = w.len() / 2;
        if cols == 0 || !w.len().is_multiple_of(2) || xs.len() != cols * out.len() {
            out.fill(0.0);
            return;
        }
        match self.0 {
            portable!() => {
                for (o, x) in out.iter_mut().zip(xs.chunks_exact(cols)) {
                    *o = scalar_half_dot(kind, w, x);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni => x86::half_row(kind, w, xs, out),
        }
    }

    /// The attention of the query heads in `q` (`q.len() / kv.head_dim` of them, one after
    /// the other) that share one KV head, over its `kv.n` cached positions: per head,
    /// `scores[p] = scale · q·k_p` (soft-capped if `score` says so), a softmax, and
    /// `out = Σ_p softmax_p · v_p`, written where the head's query is. Position `p`'s key (and
    /// value) is `keys[p * stride + off..][..head_dim]`. `scores` is scratch space. The cache
    /// holds half precision, as llama.cpp's does by default: a decode step reads every running
    /// sequence's whole cache, so its size is memory traffic that batching cannot share; the
    /// heads of a group go together so each key and value is read and widened once for all.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        self,
        q: &[f32],
        keys: &[f16],
        vals: &[f16],
        kv: KvSpan,
        score: Score,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let KvSpan {
            stride,
            off,
            n,
            head_dim: hd,
        } = kv;
        let need = (n.max(1) - 1) * stride + off + hd;
        if hd == 0
            || q.is_empty()
            || !q.len().is_multiple_of(hd)
            || out.len() != q.len()
            || n == 0
            || keys.len() < need
            || vals.len() < need
        {
            out.fill(0.0);
            return;
        }
        let key = |p: usize| keys.get(p * stride + off..p * stride + off + hd);
        let val = |p: usize| vals.get(p * stride + off..p * stride + off + hd);
        // `scores` is `[head][position]`.
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni if x86::attention_fits(hd) => {
                x86::scores(q, keys, kv, score.scale, scores)
            }
            _ => {
                scores.clear();
                for qh in q.chunks_exact(hd) {
                    scores.extend(
                        (0..n).map(|p| scalar_dot(qh, key(p).unwrap_or_default()) * score.scale),
                    );
                }
            }
        }
        if let Some(cap) = score.softcap {
            scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
        }
        // Each head's softmax, normalized in place.
        for s in scores.chunks_exact_mut(n) {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
            let sum = match self.0 {
                #[cfg(target_arch = "x86_64")]
                Imp::Avx2 | Imp::Vnni => x86::exp_shifted(s, max),
                _ => {
                    let mut sum = 0.0;
                    for v in s.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    sum
                }
            };
            let norm = 1.0 / sum;
            s.iter_mut().for_each(|v| *v *= norm);
        }
        out.fill(0.0);
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni if x86::attention_fits(hd) => {
                x86::weighted_sums(scores, vals, kv, out)
            }
            _ => {
                for (oh, sh) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(n)) {
                    for (p, w) in sh.iter().enumerate() {
                        scalar_axpy(*w, val(p).unwrap_or_default(), oh);
                    }
                }
            }
        }
    }

    /// `gate[i] = act(gate[i]) · up[i]` over the shorter of the two: the gated feed-forward
    /// activation (SwiGLU, GeGLU).
    pub fn glu(self, act: Glu, gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let (gate, up) = (
            gate.get_mut(..n).unwrap_or_default(),
            up.get(..n).unwrap_or_default(),
        );
        match self.0 {
            portable!() => {
                for (g, u) in gate.iter_mut().zip(up) {
                    *g = act.apply(*g) * u;
                }
            }
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni => x86::glu(act, gate, up),
        }
    }

    /// `Σ a[i] * b[i]` over the shorter of the two.
    pub fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (
            a.get(..n).unwrap_or_default(),
            b.get(..n).unwrap_or_default(),
        );
        match self.0 {
            Imp::Scalar => scalar_dot(a, b),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni => x86::dot(a, b),
            #[cfg(target_arch = "aarch64")]
            Imp::Neon | Imp::NeonDot => aarch64::dot(a, b),
        }
    }

    /// `y[i] += alpha * x[i]` over the shorter of the two.
    pub fn axpy(self, alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (x, y) = (
            x.get(..n).unwrap_or_default(),
            y.get_mut(..n).unwrap_or_default(),
        );
        match self.0 {
            Imp::Scalar => scalar_axpy(alpha, x, y),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni => x86::axpy(alpha, x, y),
            #[cfg(target_arch = "aarch64")]
            Imp::Neon | Imp::NeonDot => aarch64::axpy(alpha, x, y),
        }
    }
}

impl Kernels {
    /// [`quantize_row`], vectorized where the CPU allows (rounding half to even there, as
    /// GGML's AVX2 `quantize_row_q8_1` does; the scalar version rounds half away from zero).
    pub fn quantize_row(self, x: &[f32], out: &mut [BlockQ8]) {
        match self.0 {
            portable!() => quantize_row(x, out),
            #[cfg(target_arch = "x86_64")]
            Imp::Avx2 | Imp::Vnni => x86::quantize_row(x, out),
        }
    }
}

/// Quantizes `x` (a multiple of [`QK`] long) into `out`, one block per 32 values, rounding to
/// nearest as GGML's `quantize_row_q8_1` does.
pub fn quantize_row(x: &[f32], out: &mut [BlockQ8]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in block.q.iter_mut().zip(xs) {
            // |v * id| <= 127 by construction, so the cast cannot saturate.
            let r = (v * id).round() as i8;
            sum += i32::from(r);
            *q = r;
        }
        block.d = d;
        block.s = d * sum as f32;
    }
}

/// Reads the little-endian f16 at `bytes[at..at + 2]` as f32 (0 if out of range).
#[inline]
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    match bytes.get(at..at + 2) {
        Some(&[lo, hi]) => f16::from_le_bytes([lo, hi]).to_f32(),
        _ => 0.0,
    }
}

/// The byte at `i`, or 0: block slices are sized by the callers, so this only keeps a
/// malformed slice from panicking.
#[inline]
fn byte(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K or Q5_K super-block (GGML's
/// `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (byte(q, j) & 63, byte(q, j + 4) & 63)
    } else {
        (
            (byte(q, j + 4) & 0xF) | ((byte(q, j - 4) >> 6) << 4),
            (byte(q, j + 4) >> 4) | ((byte(q, j) >> 6) << 4),
        )
    }
}

/// Chunk `c` (32 weights; `c < kind.block_elems() / 32`) of one block: integer quants `q`,
/// the scales of its two halves `d`, and the offset `m`, so that weight `e` is
/// `q[e] · d[e / 16] + m`. This is the scalar reference every kernel is tested against.
pub fn decode_chunk(kind: QuantKind, blk: &[u8], c: usize) -> ([i32; QK], [f32; 2], f32) {
    let mut q = [0i32; QK];
    let nibble = |qs: usize, e: usize| -> i32 {
        // Q4_0/Q4_1/Q5 layout: weight e < 16 in the low nibble of byte e, e ≥ 16 in the high
        // nibble of byte e - 16.
        let b = byte(blk, qs + e % 16);
        i32::from(if e < 16 { b & 0x0F } else { b >> 4 })
    };
    let word = |at: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| byte(blk, at + i)));
    match kind {
        QuantKind::Q4_0 | QuantKind::Q4_1 => {
            let d = f16_at(blk, 0);
            let (m, qs) = match kind {
                QuantKind::Q4_1 => (f16_at(blk, 2), 4),
                _ => (-8.0 * d, 2),
            };
            for (e, q) in q.iter_mut().enumerate() {
                *q = nibble(qs, e);
            }
            (q, [d; 2], m)
        }
        QuantKind::Q5_0 | QuantKind::Q5_1 => {
            let d = f16_at(blk, 0);
            let (m, qh, qs) = match kind {
                QuantKind::Q5_1 => (f16_at(blk, 2), word(4), 8),
                _ => (-16.0 * d, word(2), 6),
            };
            for (e, q) in q.iter_mut().enumerate() {
                *q = nibble(qs, e) | (((qh >> e) & 1) << 4) as i32;
            }
            (q, [d; 2], m)
        }
        QuantKind::Q8_0 => {
            for (e, q) in q.iter_mut().enumerate() {
                *q = i32::from(byte(blk, 2 + e) as i8);
            }
            (q, [f16_at(blk, 0); 2], 0.0)
        }
        QuantKind::Q4K | QuantKind::Q5K => {
            // d, dmin, 12 bytes of scales, [Q5_K: 32 bytes of fifth bits], 128 bytes of
            // nibbles: chunk c is the low (c even) or high nibbles of bytes 32·(c/2)...
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let (sc, mn) = scale_min_k4(c, blk.get(4..16).unwrap_or_default());
            let qs = if kind == QuantKind::Q5K { 48 } else { 16 };
            for (e, q) in q.iter_mut().enumerate() {
                let b = byte(blk, qs + 32 * (c / 2) + e);
                *q = i32::from((b >> (4 * (c % 2))) & 0x0F);
                if kind == QuantKind::Q5K {
                    *q |= i32::from((byte(blk, 16 + e) >> c) & 1) << 4;
                }
            }
            (q, [d * f32::from(sc); 2], -(dmin * f32::from(mn)))
        }
        QuantKind::Q6K => {
            // 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales, d. Each half of
            // the super-block (n) is four chunks k: low/high nibbles of two 32-byte runs.
            let d = f16_at(blk, 208);
            let (n, k) = (c / 4, c % 4);
            for (e, q) in q.iter_mut().enumerate() {
                let lo = (byte(blk, 64 * n + 32 * (k % 2) + e) >> (4 * (k / 2))) & 0x0F;
                let hi = (byte(blk, 128 + 32 * n + e) >> (2 * k)) & 3;
                *q = i32::from(lo | (hi << 4)) - 32;
            }
            let sc = |i: usize| f32::from(byte(blk, 192 + 8 * n + 2 * k + i) as i8);
            (q, [d * sc(0), d * sc(1)], 0.0)
        }
    }
}

/// Bytes of a GGML Q2_K super-block: 16 bytes of 4-bit scale and minimum pairs, 64 of 2-bit
/// quants, the f16 `d` and `dmin`.
pub const Q2K_BLOCK_BYTES: usize = 84;

/// Rewrites one Q2_K super-block as a Q6_K block and its 16 minimums, with exactly the
/// weights of the original: weight `i` is the Q6_K block's weight minus `mins[i / 16]`.
///
/// Q2_K's weight `i` is `(d · a) · q − dmin · b` with `a`, `b` the 4-bit scale and minimum of
/// its 16 weights and `q` a 2-bit quant (ggml-quants.c `dequantize_row_q2_K`). No kernel type
/// holds a minimum per 16 weights, so the product goes to Q6_K (the same `d`, `a` as its
/// 8-bit scale, `q` as its quant) and the minimums stay beside it, for the matrix products to
/// subtract `Σ mins · (sums of 16 activations)`: 0.82 + 0.25 bytes per weight instead of an
/// f32 copy's 4.
pub fn q2k_to_q6k(q2: &[u8]) -> ([u8; 210], [f32; 16]) {
    let mut out = [0u8; 210];
    let mut mins = [0.0f32; 16];
    let dmin = f16_at(q2, 82);
    for (j, min) in mins.iter_mut().enumerate() {
        let sc = byte(q2, j);
        if let Some(o) = out.get_mut(192 + j) {
            *o = sc & 0x0F;
        }
        *min = dmin * f32::from(sc >> 4);
    }
    for i in 0..QK_K {
        // Q2_K: weight 128n + 32j + l takes bits 2j of quant byte 16 + 32n + l.
        let (n, j, l) = (i / 128, (i % 128) / 32, i % 32);
        put_q6k(
            &mut out,
            n,
            j,
            l,
            ((byte(q2, 16 + 32 * n + l) >> (2 * j)) & 3) + 32,
        );
    }
    out[208] = byte(q2, 80);
    out[209] = byte(q2, 81);
    (out, mins)
}

/// Writes the 6-bit quant `q6` of Q6_K weight `128n + 32k + l`: its low nibble (`k / 2`) of
/// byte `64n + 32(k % 2) + l`, its two high bits `2k` of byte `128 + 32n + l` (the layout
/// [`decode_chunk`] reads).
fn put_q6k(out: &mut [u8; 210], n: usize, k: usize, l: usize, q6: u8) {
    if let Some(b) = out.get_mut(64 * n + 32 * (k % 2) + l) {
        *b |= (q6 & 0x0F) << (4 * (k / 2));
    }
    if let Some(b) = out.get_mut(128 + 32 * n + l) {
        *b |= (q6 >> 4) << (2 * k);
    }
}

/// Bytes of a GGML Q3_K super-block: 32 bytes of high-bit masks, 64 of 2-bit quants, 12 of
/// 6-bit scales, the f16 `d`.
pub const Q3K_BLOCK_BYTES: usize = 110;

/// Rewrites one Q3_K super-block as a Q6_K one with exactly the same weights.
///
/// Q3_K has no kernel of its own: its weight `i` is `(d · s[i / 16]) · q[i]` with `s` a 6-bit
/// scale less 32 (−32…31) and `q` a 3-bit quant less 4 (−4…3) (ggml-quants.c
/// `dequantize_row_q3_K`), and Q6_K's is `(d · s'[i / 16]) · q'[i]` with an 8-bit `s'` and a
/// 6-bit `q'` less 32: the same `d`, the same scales and the same quants fit, and the float
/// products are the same. A Q6_K block is 210 bytes to Q3_K's 110, a fifth of the f32 copy it
/// replaces.
pub fn q3k_to_q6k(q3: &[u8]) -> [u8; 210] {
    let mut out = [0u8; 210];
    // The 16 scales, unpacked as ggml does (low nibbles of bytes 0-7, then the 2-bit high
    // parts packed in bytes 8-11).
    let word = |at: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| byte(q3, 96 + at + i)));
    let (a0, a1, tmp) = (word(0), word(4), word(8));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    for (i, sc) in aux.iter().flat_map(|w| w.to_le_bytes()).enumerate() {
        if let Some(o) = out.get_mut(192 + i) {
            *o = (i16::from(sc) - 32) as i8 as u8;
        }
    }
    for i in 0..QK_K {
        // Q3_K: weight 128n + 32j + l takes bits 2j of quant byte 32n + l and bit 4n + j of
        // mask byte l; a clear mask bit subtracts 4.
        let (n, j, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = (byte(q3, 32 + 32 * n + l) >> (2 * j)) & 3;
        let high = (byte(q3, l) >> (4 * n + j)) & 1;
        // (low − 4 + 4·high) + 32: 28…35.
        put_q6k(&mut out, n, j, l, low + 4 * high + 28);
    }
    out[208] = byte(q3, 108);
    out[209] = byte(q3, 109);
    out
}

/// Dequantizes one row of `kind` weights into `out` (`out.len()` weights).
pub fn dequantize_row(kind: QuantKind, w: &[u8], out: &mut [f32]) {
    let chunks = kind.block_elems() / QK;
    for (blk, ys) in w
        .chunks_exact(kind.block_bytes())
        .zip(out.chunks_exact_mut(kind.block_elems()))
    {
        for (c, ys) in ys.chunks_exact_mut(QK).enumerate().take(chunks) {
            let (q, d, m) = decode_chunk(kind, blk, c);
            for (e, (y, q)) in ys.iter_mut().zip(q).enumerate() {
                *y = q as f32 * if e < 16 { d[0] } else { d[1] } + m;
            }
        }
    }
}

/// Dequantizes one half-precision row into `out` (`out.len()` weights).
pub fn dequantize_half_row(kind: HalfKind, w: &[u8], out: &mut [f32]) {
    for (i, y) in out.iter_mut().enumerate() {
        *y = kind.at(w, i);
    }
}

fn scalar_quant_row(kind: QuantKind, w: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
    let chunks = kind.block_elems() / QK;
    for (o, arow) in out.iter_mut().zip(acts.chunks_exact(nb)) {
        let mut acc = 0.0f32;
        for (b, blk) in w.chunks_exact(kind.block_bytes()).enumerate() {
            for c in 0..chunks {
                let Some(a) = arow.get(b * chunks + c) else {
                    continue;
                };
                let (q, d, m) = decode_chunk(kind, blk, c);
                let (mut lo, mut hi) = (0i32, 0i32);
                for (e, (q, x)) in q.iter().zip(&a.q).enumerate() {
                    if e < 16 {
                        lo += q * i32::from(*x);
                    } else {
                        hi += q * i32::from(*x);
                    }
                }
                acc += a.d * (d[0] * lo as f32 + d[1] * hi as f32) + m * a.s;
            }
        }
        *o = acc;
    }
}

fn scalar_half_dot(kind: HalfKind, w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (i, x) in x.iter().enumerate() {
        if let Some(a) = acc.get_mut(i % 8) {
            *a += kind.at(w, i) * x;
        }
    }
    acc.iter().sum()
}

/// Where each field of a block goes in a repacked group of [`PACK`] rows: `(start, len,
/// packed, unit)` moves bytes `start..start + len` of row `r`'s block so that byte `j` lands
/// at `packed + (j / unit) · unit · PACK + unit · r + j % unit`: f16 fields (`unit` 2) become
/// the 8 rows' values side by side, quants and scales (`unit` 4) runs of 4 bytes of each of
/// the 8 rows, 32 bytes at a time.
const fn regions(kind: QuantKind) -> &'static [(usize, usize, usize, usize)] {
    match kind {
        QuantKind::Q4_0 => &[(0, 2, 0, 2), (2, 16, 16, 4)],
        QuantKind::Q4_1 => &[(0, 2, 0, 2), (2, 2, 16, 2), (4, 16, 32, 4)],
        QuantKind::Q5_0 => &[(0, 2, 0, 2), (6, 16, 48, 4)],
        QuantKind::Q5_1 => &[(0, 2, 0, 2), (2, 2, 16, 2), (8, 16, 64, 4)],
        QuantKind::Q8_0 => &[(0, 2, 0, 2), (2, 32, 16, 4)],
        QuantKind::Q4K => &[
            (0, 2, 0, 2),
            (2, 2, 16, 2),
            (4, 12, 32, 4),
            (16, 128, 128, 4),
        ],
        QuantKind::Q5K => &[
            (0, 2, 0, 2),
            (2, 2, 16, 2),
            (4, 12, 32, 4),
            (16, 32, 128, 4),
            (48, 128, 384, 4),
        ],
        QuantKind::Q6K => &[
            (0, 128, 0, 4),
            (128, 64, 1024, 4),
            (192, 16, 1536, 4),
            (208, 2, 1664, 2),
        ],
    }
}

/// Q5_0 / Q5_1: where the block's 32-bit word of fifth bits is, and where the group's eight
/// rearranged words go.
const fn fifth_bits(kind: QuantKind) -> Option<(usize, usize)> {
    match kind {
        QuantKind::Q5_0 => Some((2, 16)),
        QuantKind::Q5_1 => Some((4, 32)),
        _ => None,
    }
}

#[inline]
const fn packed_at(packed: usize, unit: usize, r: usize, j: usize) -> usize {
    packed + (j / unit) * unit * PACK + unit * r + j % unit
}

/// Re-lays out [`PACK`] consecutive rows of `kind` blocks (`rows`, `blocks` blocks each) into
/// `out`, which has the same size, block by block as [`regions`] says. Q5's fifth bits are
/// rearranged bit by bit: word `j` of a group belongs to 4-byte chunk `j % 4`'s low (`j < 4`)
/// or high nibbles, and its bit `4r + i` is the fifth bit of that nibble of byte `i` of row
/// `r`, so that one `bytes_from_bits_32` expands it in the chunk's own byte order. The layout
/// is that of llama.cpp's `block_q4_0x8` (ggml-cpu/repack.cpp) for every kind, so that one
/// 32-byte load holds 4 quants of each of 8 rows.
pub fn repack(kind: QuantKind, rows: &[u8], blocks: usize, out: &mut [u8]) {
    let bb = kind.block_bytes();
    for b in 0..blocks {
        let dst = out
            .get_mut(b * PACK * bb..(b + 1) * PACK * bb)
            .unwrap_or_default();
        let mut words = [0u32; PACK];
        for r in 0..PACK {
            let Some(src) = rows.get((r * blocks + b) * bb..(r * blocks + b + 1) * bb) else {
                continue;
            };
            for &(start, len, packed, unit) in regions(kind) {
                for j in 0..len {
                    if let Some(d) = dst.get_mut(packed_at(packed, unit, r, j)) {
                        *d = byte(src, start + j);
                    }
                }
            }
            if let Some((at, _)) = fifth_bits(kind) {
                let qh = u32::from_le_bytes([0, 1, 2, 3].map(|i| byte(src, at + i)));
                for (j, w) in words.iter_mut().enumerate() {
                    let first = 16 * (j / 4) + 4 * (j % 4);
                    *w |= ((qh >> first) & 0xF) << (4 * r);
                }
            }
        }
        if let Some((_, packed)) = fifth_bits(kind) {
            for (j, w) in words.iter().enumerate() {
                if let Some(d) = dst.get_mut(packed + 4 * j..packed + 4 * j + 4) {
                    d.copy_from_slice(&w.to_le_bytes());
                }
            }
        }
    }
}

/// Largest block of any kind, in bytes (Q6_K).
const MAX_BLOCK: usize = 210;

/// Row `r`'s block back out of one repacked block of [`PACK`] rows: the inverse of [`repack`].
fn unpack_block(kind: QuantKind, packed_block: &[u8], r: usize) -> [u8; MAX_BLOCK] {
    let mut out = [0u8; MAX_BLOCK];
    for &(start, len, packed, unit) in regions(kind) {
        for j in 0..len {
            if let Some(o) = out.get_mut(start + j) {
                *o = byte(packed_block, packed_at(packed, unit, r, j));
            }
        }
    }
    if let Some((at, packed)) = fifth_bits(kind) {
        let mut qh = 0u32;
        for j in 0..PACK {
            let w =
                u32::from_le_bytes([0, 1, 2, 3].map(|i| byte(packed_block, packed + 4 * j + i)));
            let first = 16 * (j / 4) + 4 * (j % 4);
            qh |= ((w >> (4 * r)) & 0xF) << first;
        }
        if let Some(o) = out.get_mut(at..at + 4) {
            o.copy_from_slice(&qh.to_le_bytes());
        }
    }
    out
}

/// Row `r` of a repacked group, dequantized into `out` (`out.len()` weights).
pub fn dequantize_packed_row(kind: QuantKind, group: &[u8], r: usize, out: &mut [f32]) {
    for (blk, ys) in group
        .chunks_exact(PACK * kind.block_bytes())
        .zip(out.chunks_exact_mut(kind.block_elems()))
    {
        let row = unpack_block(kind, blk, r);
        dequantize_row(kind, row.get(..kind.block_bytes()).unwrap_or_default(), ys);
    }
}

/// The `G` activation blocks at block index `b`, one per activation row, or `None` when `acts`
/// is too short. Taken once per block so the inner loops index fixed-size arrays only.
fn gather<const G: usize>(acts: &[BlockQ8], nb: usize, b: usize) -> Option<[&BlockQ8; G]> {
    let mut out = [acts.first()?; G];
    for (j, o) in out.iter_mut().enumerate() {
        *o = acts.get(j * nb + b)?;
    }
    Some(out)
}

fn scalar_quant_group(kind: QuantKind, group: &[u8], acts: &[BlockQ8], nb: usize, out: &mut [f32]) {
    let bb = kind.block_bytes();
    let blocks_per_row = nb * QK / kind.block_elems();
    for r in 0..PACK {
        // Row r, unpacked, through the row kernel: the reference is the row reference.
        let mut row = Vec::with_capacity(blocks_per_row * bb);
        for blk in group.chunks_exact(PACK * bb) {
            row.extend_from_slice(unpack_block(kind, blk, r).get(..bb).unwrap_or_default());
        }
        let mut col = vec![0.0f32; out.len() / PACK];
        scalar_quant_row(kind, &row, acts, nb, &mut col);
        for (j, v) in col.into_iter().enumerate() {
            if let Some(o) = out.get_mut(j * PACK + r) {
                *o = v;
            }
        }
    }
}

/// `a·b`, with `b` in f32 or in half precision (the KV cache), widened as it is read.
fn scalar_dot<T: Copy>(a: &[f32], b: &[T]) -> f32
where
    f32: From<T>,
{
    // Eight partial sums, like the vector version, so both round alike and auto-vectorize.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * f32::from(*y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * f32::from(*y);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha·x`, with `x` in f32 or in half precision.
fn scalar_axpy<T: Copy>(alpha: f32, x: &[T], y: &mut [f32])
where
    f32: From<T>,
{
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * f32::from(*x);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use proptest::prelude::*;

    /// One random row of `nb * QK` weights of `kind` from a seed, with sane f16 scales.
    fn random_weights(kind: QuantKind, nb: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::sampling::Rng::new(seed);
        let blocks = nb * QK / kind.block_elems();
        let halves: &[usize] = match kind {
            QuantKind::Q4_1 | QuantKind::Q5_1 | QuantKind::Q4K | QuantKind::Q5K => &[0, 2],
            QuantKind::Q6K => &[208],
            _ => &[0],
        };
        let mut w = Vec::new();
        for _ in 0..blocks {
            let mut blk: Vec<u8> = (0..kind.block_bytes())
                .map(|_| (rng.next_u64() & 0xFF) as u8)
                .collect();
            for (i, at) in halves.iter().enumerate() {
                let v = if i == 0 {
                    (rng.next_f32() + 0.01) * 0.05
                } else {
                    (rng.next_f32() - 0.5) * 0.5
                };
                blk[*at..*at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
            w.extend_from_slice(&blk);
        }
        w
    }

    /// Activation-block counts that fit `kind`'s blocks: `nb` 32-value blocks, or `nb`
    /// super-blocks for the K-quants.
    fn blocks(kind: QuantKind, nb: usize) -> usize {
        nb * kind.block_elems() / QK
    }

    fn random_acts(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::sampling::Rng::new(seed);
        (0..len).map(|_| (rng.next_f32() - 0.5) * 4.0).collect()
    }

    fn close(a: f32, b: f32, scale: f32) -> bool {
        (a - b).abs() <= 1e-4 * scale.max(1.0)
    }

    fn check_kind(kind: QuantKind, nb: usize, n: usize, seed: u64) {
        let w = random_weights(kind, nb, seed);
        let x = random_acts(n * nb * QK, seed ^ 0x55);
        let mut acts = vec![BlockQ8::default(); n * nb];
        quantize_row(&x, &mut acts);
        let mut reference = vec![0.0; n];
        Kernels::Scalar.quant_row(kind, &w, &acts, nb, &mut reference);

        // The scalar kernel against plain dequantized arithmetic (quantization error only).
        let mut wf = vec![0.0; nb * QK];
        dequantize_row(kind, &w, &mut wf);
        for (j, r) in reference.iter().enumerate() {
            let exact: f32 = wf.iter().zip(&x[j * nb * QK..]).map(|(a, b)| a * b).sum();
            let mag: f32 = wf
                .iter()
                .zip(&x[j * nb * QK..])
                .map(|(a, b)| (a * b).abs())
                .sum();
            assert!(
                (r - exact).abs() <= 0.02 * mag.max(1.0),
                "{kind:?}: {r} vs {exact}"
            );
        }

        for fast in Kernels::supported() {
            let mut got = vec![0.0; n];
            fast.quant_row(kind, &w, &acts, nb, &mut got);
            for (g, r) in got.iter().zip(&reference) {
                assert!(
                    close(*g, *r, r.abs()),
                    "{kind:?} {}: {g} vs {r}",
                    fast.name()
                );
            }
        }
    }

    #[test]
    fn quant_kernels_match_the_scalar_reference() {
        for kind in QuantKind::ALL {
            for (nb, n) in [(1, 1), (18, 1), (18, 3), (48, 4), (48, 7), (5, 9)] {
                check_kind(kind, blocks(kind, nb), n, (nb * 31 + n) as u64);
            }
        }
    }

    #[test]
    fn half_kernels_match_the_scalar_reference() {
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            for (cols, n) in [(8, 1), (64, 3), (100, 5), (896, 4)] {
                let x = random_acts(n * cols, cols as u64);
                let wf = random_acts(cols, 7);
                let w: Vec<u8> = wf
                    .iter()
                    .flat_map(|v| match kind {
                        HalfKind::F16 => f16::from_f32(*v).to_le_bytes(),
                        HalfKind::Bf16 => half::bf16::from_f32(*v).to_le_bytes(),
                    })
                    .collect();
                let mut deq = vec![0.0; cols];
                dequantize_half_row(kind, &w, &mut deq);
                let (mut want, mut got) = (vec![0.0; n], vec![0.0; n]);
                Kernels::Scalar.half_row(kind, &w, &x, &mut want);
                Kernels::detect().half_row(kind, &w, &x, &mut got);
                for j in 0..n {
                    let exact: f32 = deq.iter().zip(&x[j * cols..]).map(|(a, b)| a * b).sum();
                    assert!(
                        (want[j] - exact).abs() < 1e-3,
                        "{kind:?}: {} vs {exact}",
                        want[j]
                    );
                    assert!(
                        (got[j] - exact).abs() < 1e-3,
                        "{kind:?}: {} vs {exact}",
                        got[j]
                    );
                }
            }
        }
    }

    #[test]
    fn repacked_groups_match_the_row_kernel() {
        for kind in QuantKind::ALL.into_iter().filter(|k| k.packable()) {
            for (nb, n) in [(1, 1), (18, 1), (18, 4), (48, 5), (3, 9)] {
                let nb = blocks(kind, nb);
                let rows: Vec<Vec<u8>> = (0..PACK)
                    .map(|r| random_weights(kind, nb, (r * 7 + nb) as u64))
                    .collect();
                let flat: Vec<u8> = rows.concat();
                let mut packed = vec![0u8; flat.len()];
                repack(kind, &flat, nb * QK / kind.block_elems(), &mut packed);
                for (r, row) in rows.iter().enumerate() {
                    let bb = kind.block_bytes();
                    for (b, blk) in packed.chunks_exact(PACK * bb).enumerate() {
                        assert_eq!(
                            &unpack_block(kind, blk, r)[..bb],
                            &row[b * bb..(b + 1) * bb],
                            "{kind:?}: unpacking undoes repacking"
                        );
                    }
                }
                let x = random_acts(n * nb * QK, nb as u64);
                let mut acts = vec![BlockQ8::default(); n * nb];
                quantize_row(&x, &mut acts);
                for (r, row) in rows.iter().enumerate() {
                    let (mut a, mut b) = (vec![0.0; nb * QK], vec![0.0; nb * QK]);
                    dequantize_row(kind, row, &mut a);
                    dequantize_packed_row(kind, &packed, r, &mut b);
                    assert_eq!(a, b, "{kind:?} row {r}");
                }
                for k in Kernels::supported() {
                    let mut got = vec![0.0; n * PACK];
                    k.quant_group(kind, &packed, &acts, nb, &mut got);
                    for (r, row) in rows.iter().enumerate() {
                        let mut want = vec![0.0; n];
                        Kernels::Scalar.quant_row(kind, row, &acts, nb, &mut want);
                        let mut wf = vec![0.0; nb * QK];
                        dequantize_row(kind, row, &mut wf);
                        for j in 0..n {
                            let g = got[j * PACK + r];
                            // The integer sums are exact; only the float sums of the
                            // blocks' products may round differently: bound by their size.
                            let mag: f32 = wf
                                .iter()
                                .zip(&x[j * nb * QK..])
                                .map(|(a, b)| (a * b).abs())
                                .sum();
                            assert!(
                                (g - want[j]).abs() <= 1e-5 * mag + 1e-5,
                                "{kind:?} {} nb={nb} j={j} r={r}: {g} vs {}",
                                k.name(),
                                want[j]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn several_groups_match_one_group_at_a_time() {
        for kind in QuantKind::ALL.into_iter().filter(|k| k.packable()) {
            let nb = blocks(kind, 3);
            for (k, n) in [(1, 3), (2, 1), (3, 9), (4, 8), (5, 2)] {
                let flat: Vec<u8> = (0..k * PACK)
                    .flat_map(|r| random_weights(kind, nb, (r * 13 + k) as u64))
                    .collect();
                let mut packed = vec![0u8; flat.len()];
                let group = PACK * kind.row_bytes(nb * QK);
                for (src, dst) in flat.chunks_exact(group).zip(packed.chunks_exact_mut(group)) {
                    repack(kind, src, nb * QK / kind.block_elems(), dst);
                }
                let x = random_acts(n * nb * QK, (k + n) as u64);
                let mut acts = vec![BlockQ8::default(); n * nb];
                quantize_row(&x, &mut acts);
                let mut want = vec![0.0; k * n * PACK];
                for (w, o) in packed
                    .chunks_exact(group)
                    .zip(want.chunks_exact_mut(n * PACK))
                {
                    Kernels::Scalar.quant_group(kind, w, &acts, nb, o);
                }
                for kern in Kernels::supported() {
                    let mut got = vec![f32::NAN; k * n * PACK];
                    kern.quant_groups(kind, &packed, &acts, nb, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{kind:?} {} k={k} n={n} at {i}: {g} vs {w}",
                            kern.name()
                        );
                    }
                }
                let mut short = vec![1.0; k * n * PACK];
                Kernels::detect().quant_groups(kind, &packed[1..], &acts, nb, &mut short);
                assert!(
                    short.iter().all(|v| *v == 0.0),
                    "{kind:?}: a cut group gives zeros"
                );
            }
        }
    }

    #[test]
    fn glu_matches_the_scalar_reference() {
        // Across the range where the exponential saturates, and a tail that is not a multiple
        // of 8.
        let gate: Vec<f32> = (0..1003).map(|i| (i as f32 - 501.0) * 0.23).collect();
        let up = random_acts(gate.len(), 9);
        for act in [Glu::Silu, Glu::GeluTanh] {
            for k in Kernels::supported() {
                let mut got = gate.clone();
                k.glu(act, &mut got, &up);
                for ((g, x), u) in got.iter().zip(&gate).zip(&up) {
                    let want = act.apply(*x) * u;
                    assert!(
                        (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{act:?} {} at {x}: {g} vs {want}",
                        k.name()
                    );
                }
            }
        }
        assert!((Glu::GeluTanh.apply(1.0) - 0.841_192).abs() < 1e-5);
        assert!((Glu::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn attention_matches_the_scalar_reference() {
        let (stride, n) = (192, 37);
        let keys: Vec<f16> = random_acts(stride * n, 1)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let vals: Vec<f16> = random_acts(stride * n, 2)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        // Without a cap, and with one small enough to change the scores; one head and a
        // group of three sharing the KV head; a head width the vector path does not take.
        for (hd, heads, softcap) in [
            (64, 1, None),
            (64, 3, None),
            (64, 3, Some(0.1f32)),
            (32, 2, None),
            (12, 2, None),
        ] {
            let score = Score {
                scale: 0.125,
                softcap,
            };
            let q = random_acts(hd * heads, 3);
            for off in [0, 64, 128] {
                let kv = KvSpan {
                    stride,
                    off,
                    n,
                    head_dim: hd,
                };
                let mut want = vec![0.0; hd * heads];
                Kernels::Scalar.attend(&q, &keys, &vals, kv, score, &mut Vec::new(), &mut want);
                // Against a plain two-pass computation, head by head.
                for h in 0..heads {
                    let sc: Vec<f32> = (0..n)
                        .map(|p| {
                            let s = (0..hd)
                                .map(|i| q[h * hd + i] * keys[p * stride + off + i].to_f32())
                                .sum::<f32>()
                                * 0.125;
                            softcap.map_or(s, |c| c * (s / c).tanh())
                        })
                        .collect();
                    if softcap.is_some() {
                        assert!(sc.iter().all(|s| s.abs() <= 0.1));
                    }
                    let m = sc.iter().fold(f32::MIN, |a, b| a.max(*b));
                    let z: f32 = sc.iter().map(|s| (s - m).exp()).sum();
                    for i in 0..hd {
                        let v: f32 = (0..n)
                            .map(|p| (sc[p] - m).exp() / z * vals[p * stride + off + i].to_f32())
                            .sum();
                        let w = want[h * hd + i];
                        assert!((v - w).abs() < 1e-4, "head {h}: {v} vs {w}");
                    }
                }
                for k in Kernels::supported() {
                    let mut got = vec![0.0; hd * heads];
                    k.attend(&q, &keys, &vals, kv, score, &mut Vec::new(), &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() < 1e-4, "{}: {g} vs {w}", k.name());
                    }
                }
            }
        }
        let mut out = vec![1.0; 64];
        let kv = KvSpan {
            stride,
            off: 0,
            n,
            head_dim: 64,
        };
        Kernels::detect().attend(
            &random_acts(64, 3),
            &keys[..10],
            &vals,
            kv,
            Score::scaled(1.0),
            &mut Vec::new(),
            &mut out,
        );
        assert!(
            out.iter().all(|x| *x == 0.0),
            "short caches give zeros, not a panic"
        );
    }

    #[test]
    fn mismatched_lengths_give_zeros_not_a_panic() {
        let mut out = [1.0f32; 2];
        Kernels::detect().quant_row(
            QuantKind::Q4_1,
            &[0u8; 19],
            &[BlockQ8::default(); 2],
            1,
            &mut out,
        );
        assert_eq!(out, [0.0, 0.0]);
    }

    /// Three random super-blocks of `bytes` bytes whose f16 scales at offsets `scales` lie in
    /// ±0.05; with `extreme`, the bytes before the first scale all zeros or all ones.
    fn random_super_blocks(
        rng: &mut crate::sampling::Rng,
        bytes: usize,
        scales: &[usize],
        extreme: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..3 {
            let mut blk: Vec<u8> = (0..bytes).map(|_| (rng.next_u64() & 0xFF) as u8).collect();
            if extreme {
                let fill = if rng.next_u64().is_multiple_of(2) {
                    0x00
                } else {
                    0xFF
                };
                blk[..scales[0]].fill(fill);
            }
            for at in scales {
                let v = (rng.next_f32() - 0.5) * 0.1;
                blk[*at..*at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
            out.extend_from_slice(&blk);
        }
        out
    }

    /// candle's dequantization of `bytes` of `dtype`.
    fn candle_dequantized(dtype: candle_core::quantized::GgmlDType, bytes: &[u8]) -> Vec<f32> {
        use candle_core::Device;
        let n = bytes.len() / dtype.type_size() * dtype.block_size();
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![n], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn q3k_becomes_q6k_with_the_same_weights() {
        let mut rng = crate::sampling::Rng::new(31);
        for round in 0..64 {
            // Round 0: every scale −32 or 31, every quant −4 or 3.
            let q3 = random_super_blocks(&mut rng, Q3K_BLOCK_BYTES, &[108], round == 0);
            let q6: Vec<u8> = q3
                .chunks_exact(Q3K_BLOCK_BYTES)
                .flat_map(q3k_to_q6k)
                .collect();
            let mut ours = vec![0.0; q3.len() / Q3K_BLOCK_BYTES * QK_K];
            dequantize_row(QuantKind::Q6K, &q6, &mut ours);
            // Equal as numbers (a zero weight may come out −0 one way and +0 the other).
            let theirs = candle_dequantized(candle_core::quantized::GgmlDType::Q3K, &q3);
            assert_eq!(ours, theirs, "round {round}");
        }
    }

    #[test]
    fn q2k_becomes_q6k_and_minimums_with_the_same_weights() {
        let mut rng = crate::sampling::Rng::new(37);
        for round in 0..64 {
            // Round 0: every scale and minimum 0 or 15, every quant 0 or 3.
            let q2 = random_super_blocks(&mut rng, Q2K_BLOCK_BYTES, &[80, 82], round == 0);
            let mut ours = vec![0.0; q2.len() / Q2K_BLOCK_BYTES * QK_K];
            for (blk, ys) in q2
                .chunks_exact(Q2K_BLOCK_BYTES)
                .zip(ours.chunks_exact_mut(QK_K))
            {
                let (q6, mins) = q2k_to_q6k(blk);
                dequantize_row(QuantKind::Q6K, &q6, ys);
                for (i, y) in ys.iter_mut().enumerate() {
                    *y -= mins[i / 16];
                }
            }
            let theirs = candle_dequantized(candle_core::quantized::GgmlDType::Q2K, &q2);
            assert_eq!(ours, theirs, "round {round}");
        }
    }

    #[test]
    fn dequantize_matches_candle() {
        use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
        use candle_core::Device;
        for (kind, dtype) in [
            (QuantKind::Q4_0, GgmlDType::Q4_0),
            (QuantKind::Q4_1, GgmlDType::Q4_1),
            (QuantKind::Q5_0, GgmlDType::Q5_0),
            (QuantKind::Q5_1, GgmlDType::Q5_1),
            (QuantKind::Q8_0, GgmlDType::Q8_0),
            (QuantKind::Q4K, GgmlDType::Q4K),
            (QuantKind::Q5K, GgmlDType::Q5K),
            (QuantKind::Q6K, GgmlDType::Q6K),
        ] {
            let nb = blocks(kind, 4);
            let w = random_weights(kind, nb, 9);
            let mut ours = vec![0.0; nb * QK];
            dequantize_row(kind, &w, &mut ours);
            let theirs = qtensor_from_ggml(dtype, &w, vec![nb * QK], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours, theirs, "{kind:?}");
        }
        for (kind, dtype) in [
            (HalfKind::F16, GgmlDType::F16),
            (HalfKind::Bf16, GgmlDType::BF16),
        ] {
            let w: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) & 0x3F).collect();
            let mut ours = vec![0.0; 32];
            dequantize_half_row(kind, &w, &mut ours);
            let theirs = qtensor_from_ggml(dtype, &w, vec![32], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours, theirs, "{kind:?}");
        }
    }

    proptest! {
        #[test]
        fn dot_and_axpy_match_scalar(xs in proptest::collection::vec(-10.0f32..10.0, 0..200), alpha in -2.0f32..2.0) {
            let ys: Vec<f32> = xs.iter().rev().copied().collect();
            let k = Kernels::detect();
            let (fast, slow) = (k.dot(&xs, &ys), Kernels::Scalar.dot(&xs, &ys));
            prop_assert!((fast - slow).abs() <= 1e-3 * (1.0 + slow.abs()));
            let (mut a, mut b) = (ys.clone(), ys.clone());
            k.axpy(alpha, &xs, &mut a);
            Kernels::Scalar.axpy(alpha, &xs, &mut b);
            for (p, q) in a.iter().zip(&b) {
                prop_assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()));
            }
        }

        #[test]
        fn vector_quantization_matches_scalar(xs in proptest::collection::vec(-50.0f32..50.0, 96..=96)) {
            let (mut a, mut b) = ([BlockQ8::default(); 3], [BlockQ8::default(); 3]);
            quantize_row(&xs, &mut a);
            Kernels::detect().quantize_row(&xs, &mut b);
            for (a, b) in a.iter().zip(&b) {
                prop_assert_eq!(a.d, b.d);
                // Only exact ties may round differently, by one step.
                for (p, q) in a.q.iter().zip(&b.q) {
                    prop_assert!((i32::from(*p) - i32::from(*q)).abs() <= 1);
                }
                let sum: i32 = b.q.iter().map(|q| i32::from(*q)).sum();
                prop_assert!((b.s - b.d * sum as f32).abs() <= 1e-3 * (1.0 + b.s.abs()));
            }
        }

        #[test]
        fn quantize_row_is_close(xs in proptest::collection::vec(-100.0f32..100.0, 32..=32)) {
            let mut b = [BlockQ8::default()];
            quantize_row(&xs, &mut b);
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (q, x) in b[0].q.iter().zip(&xs) {
                prop_assert!((f32::from(*q) * b[0].d - x).abs() <= amax / 254.0 + 1e-4);
            }
            let sum: i32 = b[0].q.iter().map(|q| i32::from(*q)).sum();
            prop_assert!((b[0].s - b[0].d * sum as f32).abs() <= 1e-3);
        }
    }
}
