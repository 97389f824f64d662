//! Prints the token ids of a text for a GGUF model: `cargo run -p engine --example tokens -- MODEL.gguf TEXT`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: tokens MODEL.gguf TEXT")?;
    let text = args.next().unwrap_or_default();
    let bytes = std::fs::read(path)?;
    let g = engine::gguf::Gguf::parse(&bytes)?;
    let t = engine::tokenizer::Tokenizer::from_gguf(&g)?;
    let ids = t.encode(&text)?;
    println!("{ids:?}");
    for id in ids {
        print!("{:?} ", String::from_utf8_lossy(t.token_bytes(id)));
    }
    println!();
    Ok(())
}
