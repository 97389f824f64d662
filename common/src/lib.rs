//! Code shared by the enclave, the host relay and the client: the NSM abstraction (the real
//! `/dev/nsm` driver and, behind the `mock-nsm` feature, a mock NSM with its own persisted CA),
//! the sealed-model format, the host↔enclave wire protocol and transport, and the client↔enclave
//! channel (binary HTTP inside chunked Oblivious HTTP, and the attested key binding).
//!
//! The codecs do no I/O: they work on byte slices and typed values. The `tokio` feature adds
//! the socket side (`wire::io` framing and the vsock/Unix [`transport`]) for the binaries
//! (DESIGN.md §2).

/// Declares a closed set of names that cross a process boundary as strings: an enum with its
/// serde form, its list ([`Self::ALL`]-style) and its label, plus an `Other` that unknown names
/// (from another version) read as.
macro_rules! closed_names {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $label:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $label)] $variant,)*
            /// A name this build does not know (a record from another version): counted under
            /// "other" rather than dropped.
            #[serde(other, rename = "other")]
            Other,
        }

        impl $name {
            /// Every known value (not [`Self::Other`]).
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// Its name in the record and in metric labels.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                    $name::Other => "other",
                }
            }
        }
    };
}

pub mod apikeys;
pub mod audit;
pub mod bhttp;
pub mod binding;
pub mod cbor;
#[cfg(feature = "ohttp")]
pub mod channel;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
pub mod cms;
pub mod media;
pub mod nsm;
pub mod relay;
pub mod sealed;
#[cfg(feature = "tokio")]
pub mod transport;
pub mod wire;

#[cfg(feature = "mock-nsm")]
pub mod mock_ca;
