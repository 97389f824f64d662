//! The untrusted relay on the parent instance: client HTTP API, vsock to the enclave, provisioning, KMS calls.

#![forbid(unsafe_code)]

fn main() {
    eprintln!("host: not implemented yet; see the open issues");
    std::process::exit(2);
}
