//! File formats of the cartridge toolchain.
#![deny(missing_docs)]

pub mod fingerprint;

pub use fingerprint::{ModelFingerprint, WeightSampler};
