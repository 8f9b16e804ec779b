//! Shared test helper: tiny random Llama / Qwen2 / Qwen3 models (`cartridge_runtime::testing`)
//! written to a temp dir and loaded back through `safetensors_dir`.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use cartridge_runtime::models::{Architecture, Transformer};
use cartridge_runtime::safetensors_dir;
use cartridge_runtime::testing::TinySpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const ALL: [Architecture; 3] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::Qwen3,
];

/// A tiny random model of `arch`, loaded in `dtype` on the CPU. Keep the TempDir alive only as
/// long as loading needs it: weights are copied out of the map.
pub fn tiny_model(arch: Architecture, dtype: DType) -> Transformer {
    let dir = tempfile::tempdir().expect("tempdir");
    TinySpec::for_arch(arch)
        .write(dir.path(), 7 + arch as u64)
        .expect("write tiny model");
    let (_, model) = safetensors_dir::load_model(dir.path(), dtype, &Device::Cpu).expect("load");
    model
}

/// `[1, n]` u32 tensor of ids.
pub fn ids(tokens: &[u32]) -> Tensor {
    Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu).expect("ids")
}

/// Max |a - b| in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).expect("f64") - b.to_dtype(DType::F64).expect("f64"))
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f64>()
        .expect("scalar")
}

/// Deterministic pseudo-random token ids in `2..vocab`.
pub fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(2..vocab as u32)).collect()
}
