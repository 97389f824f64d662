//! Chat with a GGUF model from the command line: `cargo run --release -p engine --example chat -- MODEL.gguf "prompt" [--kernels NAME]`
//! (one of `Kernels::supported`, by name; the fastest by default), greedy.

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let kernels = match args.iter().position(|a| a == "--kernels") {
        Some(i) => {
            let name = args.get(i + 1).ok_or("missing value")?.clone();
            args.drain(i..i + 2);
            engine::kernels::Kernels::by_name(&name).ok_or("no such kernels on this CPU")?
        }
        None => engine::kernels::Kernels::detect(),
    };
    let mut args = args.into_iter();
    let path = args
        .next()
        .ok_or("usage: chat MODEL.gguf PROMPT [--kernels NAME]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France? Answer in one word.".into());
    let t0 = std::time::Instant::now();
    let engine = engine::load(
        zeroize::Zeroizing::new(std::fs::read(path)?),
        engine::EngineConfig {
            kernels,
            ..Default::default()
        },
    )?;
    eprintln!("kernels: {}", kernels.name());
    eprintln!("loaded in {:?}", t0.elapsed());
    let params = engine::GenerationParams {
        max_tokens: Some(128),
        sampling: engine::SamplingParams::greedy(),
        ..Default::default()
    };
    let mut g = engine.chat(&[engine::Message::new("user", prompt)], params)?;
    eprintln!("prompt: {} tokens", g.prompt_tokens());
    while let Some(ev) = g.blocking_next() {
        match ev {
            engine::Event::Text(t) => {
                print!("{t}");
                std::io::stdout().flush()?;
            }
            engine::Event::Done {
                finish_reason,
                usage,
                timings,
            } => {
                println!();
                eprintln!("{finish_reason:?} {usage:?} {timings:?}");
                eprintln!(
                    "prefill {:.1} tok/s, decode {:.1} tok/s",
                    usage.prompt_tokens as f64 / timings.prefill.as_secs_f64(),
                    (usage.completion_tokens.saturating_sub(1)) as f64
                        / timings.decode.as_secs_f64()
                );
            }
            engine::Event::Failed(e) => return Err(e.into()),
        }
    }
    Ok(())
}
