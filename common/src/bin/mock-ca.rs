//! `mock-ca`: creates or shows the mock NSM's persisted root CA (local mode only).
//!
//! ```text
//! mock-ca init DIR   create the CA in DIR if it does not exist; print the root's path and SHA-256
//! mock-ca show DIR   print the root certificate (PEM) of an existing CA
//! mock-ca measurements LABEL
//!                    print the PCRs of the mock image LABEL as `nitro-cli build-enclave`
//!                    prints them (input for `host kms-policy`)
//! mock-ca nsm-signer DIR OUT
//!                    issue an NSM signing chain from the CA in DIR (as the mock NSM does) and
//!                    write OUT/signing-key.pem (0600), OUT/certificate.pem, OUT/cabundle.pem:
//!                    what QEMU's patched virtio-nsm signs with (scripts/qemu); the leaf lasts
//!                    3 hours, as AWS's do
//! ```
//! Exit status 0 on success, 1 on failure, 2 on a usage error.

use aws_lc_rs::digest::{digest, SHA256};
use common::mock_ca::{MockCa, ROOT_CERT_FILE};
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str =
    "usage: mock-ca init DIR | mock-ca show DIR | mock-ca measurements LABEL | mock-ca nsm-signer DIR OUT";

/// Writes the signing chain of a fresh mock NSM on the CA in `dir` into `out`.
fn nsm_signer(dir: &Path, out: &Path) -> Result<(), String> {
    use common::nsm::mock::{ImageMeasurement, MockNsm, MockNsmConfig};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ca = MockCa::load(dir).map_err(|e| e.to_string())?;
    let nsm = MockNsm::new(ca, MockNsmConfig::new(ImageMeasurement::from_label("qemu")))
        .map_err(|e| e.to_string())?;
    let signer = nsm.signer().map_err(|e| e.to_string())?;
    let fail = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::create_dir_all(out).map_err(|e| fail(out, e))?;
    let key = out.join("signing-key.pem");
    let _ = std::fs::remove_file(&key);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(signer.key_pem.as_bytes()))
        .map_err(|e| fail(&key, e))?;
    for (name, pem) in [
        ("certificate.pem", &signer.certificate_pem),
        ("cabundle.pem", &signer.cabundle_pem),
    ] {
        let p = out.join(name);
        std::fs::write(&p, pem).map_err(|e| fail(&p, e))?;
    }
    println!(
        "NSM signer in {} (leaf valid until {} s since the epoch)",
        out.display(),
        signer.not_after
    );
    Ok(())
}

/// The mock image's PCR0-4 in nitro-cli's JSON shape.
fn measurements(label: &str) -> String {
    let m = common::nsm::mock::ImageMeasurement::from_label(label);
    let hex = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let pcrs = [&m.pcr0, &m.pcr1, &m.pcr2, &m.pcr3, &m.pcr4]
        .iter()
        .enumerate()
        .map(|(i, v)| format!("    \"PCR{i}\": \"{}\"", hex(&v[..])))
        .collect::<Vec<_>>()
        .join(",\n");
    format!("{{\n  \"Measurements\": {{\n    \"HashAlgorithm\": \"Sha384 {{ ... }}\",\n{pcrs}\n  }}\n}}")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, dir) = match args.as_slice() {
        [c, label] if c == "measurements" => {
            println!("{}", measurements(label));
            return ExitCode::SUCCESS;
        }
        [c, d, out] if c == "nsm-signer" => {
            return match nsm_signer(Path::new(d), Path::new(out)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mock-ca nsm-signer: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        [c, d] if c == "init" || c == "show" => (c.as_str(), Path::new(d)),
        [h] if h == "-h" || h == "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        "init" => MockCa::load_or_create(dir).map(|ca| {
            let fp = digest(&SHA256, ca.root_der());
            let hexed: String = fp.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            println!("mock CA root: {}", dir.join(ROOT_CERT_FILE).display());
            println!("root SHA-256 (DER): {hexed}");
        }),
        _ => MockCa::load(dir).and_then(|ca| {
            print!("{}", ca.root_pem()?);
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock-ca {command}: {e}");
            ExitCode::FAILURE
        }
    }
}
