//! `enclave-image`: writes the enclave image's two ramdisks (see the library) for `eif_build`.
//!
//! ```text
//! enclave-image --init PATH --enclave PATH --guardrails PATH --dockerfile PATH
//!               [--module PATH.ko]... --out DIR
//! ```
//! writes `DIR/bootstrap.cpio` (init, console, each `--module` and their load order, given by
//! the order of the `--module` arguments) and
//! `DIR/customer.cpio` (cmd, env, rootfs with `/enclave` and `/guardrails.toml`).

use enclave_image::{bootstrap, cpio, customer, launch_from_dockerfile};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enclave-image: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| -> Option<PathBuf> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let need = |name: &str| arg(name).ok_or_else(|| format!("{name} is required"));
    let (init, enclave, guardrails, dockerfile, out) = (
        need("--init")?,
        need("--enclave")?,
        need("--guardrails")?,
        need("--dockerfile")?,
        need("--out")?,
    );
    // In load order: the init loads them in the order they are given (`modules/order`).
    let mut modules = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a != "--module" {
            continue;
        }
        let p = PathBuf::from(args.get(i + 1).ok_or("--module needs a path")?);
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
            .ok_or_else(|| format!("{}: a module is a NAME.ko file", p.display()))?
            .to_owned();
        modules.push((name, read(&p)?));
    }
    let text = String::from_utf8(read(&dockerfile)?)
        .map_err(|_| format!("{}: not UTF-8", dockerfile.display()))?;
    let launch = launch_from_dockerfile(&text).map_err(|e| e.to_string())?;
    let boot = cpio(&bootstrap(read(&init)?, modules)).map_err(|e| e.to_string())?;
    let user = cpio(&customer(
        &launch,
        vec![
            ("/enclave".into(), 0o555, read(&enclave)?),
            ("/guardrails.toml".into(), 0o444, read(&guardrails)?),
        ],
    ))
    .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, bytes) in [("bootstrap.cpio", boot), ("customer.cpio", user)] {
        let p = out.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
