//! The real NSM: `/dev/nsm` inside a Nitro Enclave, through AWS's driver in
//! `aws-nitro-enclaves-nsm-api` (which owns the one `ioctl`, so this crate needs no `unsafe`).
//!
//! The driver's `nsm_init` reports failure as a `-1` descriptor; [`DeviceNsm::open`] turns
//! that into an error at once, so no handle ever holds an invalid descriptor.

use super::{Nsm, NsmError, Request, Response};
use aws_nitro_enclaves_nsm_api::driver;

/// Where the NSM device lives in a Nitro Enclave.
pub const DEVICE_PATH: &str = "/dev/nsm";

/// An open `/dev/nsm`. Closed on drop.
pub struct DeviceNsm {
    fd: i32,
}

impl DeviceNsm {
    /// Opens `/dev/nsm`. Fails outside a Nitro Enclave.
    pub fn open() -> Result<Self, NsmError> {
        // Probe with std first: the driver only logs why it failed, and the reason matters
        // to an operator (missing device versus permissions).
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE_PATH)
            .map_err(|source| NsmError::Open {
                path: DEVICE_PATH,
                source,
            })?;
        let fd = driver::nsm_init();
        if fd < 0 {
            return Err(NsmError::Open {
                path: DEVICE_PATH,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self { fd })
    }
}

impl Nsm for DeviceNsm {
    fn process(&self, request: Request) -> Response {
        driver::nsm_process_request(self.fd, request)
    }
}

impl Drop for DeviceNsm {
    fn drop(&mut self) {
        driver::nsm_exit(self.fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_outside_an_enclave_is_an_error_not_a_bad_handle() {
        // These machines have no /dev/nsm; on a Nitro instance this test is skipped by nature.
        if std::path::Path::new(DEVICE_PATH).exists() {
            return;
        }
        match DeviceNsm::open() {
            Err(NsmError::Open { path, .. }) => assert_eq!(path, DEVICE_PATH),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a device that does not exist"),
        }
    }
}
