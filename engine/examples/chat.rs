//! Chat with a GGUF model from the command line: `cargo run --release -p engine --example chat -- MODEL.gguf "prompt"`.

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: chat MODEL.gguf PROMPT")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());
    let t0 = std::time::Instant::now();
    let engine = engine::load(
        zeroize::Zeroizing::new(std::fs::read(path)?),
        engine::EngineConfig::default(),
    )?;
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
