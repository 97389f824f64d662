//! `enclave-image`: writes the enclave image's two ramdisks (see the library) for `eif_build`.
//!
//! ```text
//! enclave-image --init PATH --enclave PATH --guardrails PATH --dockerfile PATH
//!               [--modules DIR] --out DIR
//! ```
//! writes `DIR/bootstrap.cpio` (init, console, every `DIR/*.ko` of `--modules`) and
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
    let mut modules = Vec::new();
    if let Some(dir) = arg("--modules") {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ko"))
            .collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            modules.push((name, read(&p)?));
        }
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
