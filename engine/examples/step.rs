//! Time of one forward step of the model alone (no serving loop, no sampling) for batches of
//! 1 to 32 sequences each decoding one token after a prompt of `--context` tokens, with and
//! without the output projection: where batched decoding stops scaling.
//!
//! `step MODEL.gguf [--context 100] [--steps 32] [--threads 2] [--batches 1,2,4,8,16,32]`

use engine::model::{Chunk, Logits, Model, Scratch};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let num = |name: &str, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(opt(name).map(|v| v.parse()).transpose()?.unwrap_or(default))
    };
    let path = args
        .first()
        .ok_or("usage: step MODEL.gguf [--context N] [--steps N]")?;
    let (context, steps, threads) = (
        num("--context", 100)?,
        num("--steps", 32)?,
        num("--threads", 2)?,
    );
    let batches: Vec<usize> = match opt("--batches") {
        Some(v) => v.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 2, 4, 8, 16, 32],
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let bytes = zeroize::Zeroizing::new(std::fs::read(path)?);
    let g = engine::gguf::Gguf::parse(&bytes)?;
    let kernels = engine::kernels::Kernels::detect();
    let model = Model::load(bytes.clone(), &g, kernels)?;
    let vocab = model.config().n_vocab;
    println!(
        "{}; kernels {}, {threads} threads, context {context}",
        model.describe(),
        kernels.name()
    );
    println!(
        "{:>6} {:>14} {:>12} {:>14} {:>12}",
        "batch", "ms/step", "tok/s", "ms (no logits)", "tok/s"
    );
    let mut s = Scratch::default();
    for &b in &batches {
        let mut caches: Vec<_> = (0..b)
            .map(|_| model.new_cache(context + 2 * steps + 2))
            .collect();
        let prompt: Vec<u32> = (0..context as u32)
            .map(|i| (i * 7919 + 13) % vocab as u32)
            .collect();
        for c in caches.iter_mut() {
            model.forward(
                &mut [Chunk {
                    cache: c,
                    tokens: &prompt,
                    logits: Logits::None,
                }],
                &mut s,
            )?;
        }
        let mut times = [0.0f64; 2];
        for (t, logits) in times.iter_mut().zip([Logits::Last, Logits::None]) {
            let tok = [42u32];
            let t0 = Instant::now();
            for _ in 0..steps {
                let mut batch: Vec<Chunk<'_>> = caches
                    .iter_mut()
                    .map(|cache| Chunk {
                        cache,
                        tokens: &tok,
                        logits,
                    })
                    .collect();
                model.forward(&mut batch, &mut s)?;
            }
            *t = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        }
        println!(
            "{b:>6} {:>14.3} {:>12.1} {:>14.3} {:>12.1}",
            times[0],
            b as f64 * 1e3 / times[0],
            times[1],
            b as f64 * 1e3 / times[1]
        );
    }
    Ok(())
}
