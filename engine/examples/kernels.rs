//! Single-thread throughput of each weight kernel: one matrix-vector product (decode) and a
//! product against 4 and 16 activation rows (prefill), in weights per nanosecond and in weight
//! bytes per second, on random weights, for every vector implementation this CPU supports.
//! `cargo run --release -p engine --example kernels`.

use engine::kernels::{quantize_row, repack, BlockQ8, Kernels, QuantKind, PACK, QK};
use std::time::Instant;

fn main() {
    let all = Kernels::supported();
    // The scalar reference alone when there is nothing else.
    for k in all.iter().skip(usize::from(all.len() > 1)) {
        run(*k);
    }
}

fn run(k: Kernels) {
    let (rows, cols) = (2048usize, 1024usize);
    let nb = cols / QK;
    println!("kernels: {}, {rows}x{cols} matrix, 1 thread", k.name());
    println!(
        "{:<6} {:>6} {:>12} {:>10}",
        "type", "acts", "weights/ns", "GB/s"
    );
    for kind in QuantKind::ALL {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let row_bytes = kind.row_bytes(cols);
        let mut w: Vec<u8> = (0..rows * row_bytes).map(|_| next() as u8).collect();
        // Sane f16 scales: 0x2000 is about 0.0078 (the random bytes may be NaN or huge).
        for blk in w.chunks_exact_mut(kind.block_bytes()) {
            let at = if kind == QuantKind::Q6K { 208 } else { 0 };
            if let Some(d) = blk.get_mut(at..at + 2) {
                d.copy_from_slice(&[0, 0x20]);
            }
        }
        let packed = kind.packable();
        if packed {
            let group = PACK * row_bytes;
            for g in w.chunks_exact_mut(group) {
                let src = g.to_vec();
                repack(kind, &src, cols / kind.block_elems(), g);
            }
        }
        for n in [1usize, 4, 16] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0)
                .collect();
            let mut acts = vec![BlockQ8::default(); n * nb];
            for (xs, a) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(nb)) {
                quantize_row(xs, a);
            }
            let mut out = vec![0.0f32; rows * n];
            let reps = (64 / n).max(4);
            let t0 = Instant::now();
            for _ in 0..reps {
                if packed {
                    k.quant_groups(kind, &w, &acts, nb, &mut out);
                } else {
                    for (r, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
                        k.quant_row(kind, r, &acts, nb, o);
                    }
                }
            }
            let ns = t0.elapsed().as_nanos() as f64 / reps as f64;
            println!(
                "{:<6} {:>6} {:>12.2} {:>10.2}",
                kind.name(),
                n,
                (rows * cols * n) as f64 / ns,
                w.len() as f64 / ns
            );
            std::hint::black_box(&out);
        }
    }
}
