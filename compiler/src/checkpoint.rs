//! Checkpoints: one safetensors file holding the parameters, the frozen slots and both Adam
//! moments, with the trainer state (step, data cursor, seed, settings, creation time) as JSON in
//! the safetensors metadata. One file written with [`write_atomic`], so a crash leaves either the
//! previous checkpoint or the new one, never a mix.
//!
//! The data order and every random draw after initialisation are functions of `(seed, step)`
//! (see [`crate::data`]), so `step` is the whole RNG state; it is stored with the cursor it implies
//! for inspection.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use cartridge_formats::atomic::write_atomic;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Metadata key of the JSON state.
const STATE_KEY: &str = "cartridge.trainer_state";

/// Trainer state saved with the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Checkpoint format version.
    pub version: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// Training examples consumed (`step * batch_size`): the position in the seeded data stream.
    pub cursor: usize,
    /// The run's seed (with `step`, the whole RNG state).
    pub seed: u64,
    /// The settings of the run, compared on resume.
    pub settings: serde_json::Value,
    /// Identity of the training data (example count and digest), compared on resume.
    pub data_digest: String,
    /// Creation time of the run (kept so a resumed run writes the same `.cart` bytes).
    pub created: String,
}

/// Tensors and state read back from a checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The state.
    pub state: CheckpointState,
    /// Trainable parameters, in [`crate::params::Params::vars`] order.
    pub params: Vec<Tensor>,
    /// Frozen slots (K then V per layer; empty for soft prompts or nothing frozen).
    pub frozen: Vec<Tensor>,
    /// Adam first moments.
    pub m: Vec<Tensor>,
    /// Adam second moments.
    pub v: Vec<Tensor>,
}

/// Write a checkpoint atomically.
pub fn save(
    path: &Path,
    state: &CheckpointState,
    params: &[Tensor],
    frozen: &[Tensor],
    moments: (&[Tensor], &[Tensor]),
) -> Result<()> {
    let mut named: Vec<(String, &Tensor)> = Vec::new();
    for (prefix, list) in [
        ("param", params),
        ("frozen", frozen),
        ("adam_m", moments.0),
        ("adam_v", moments.1),
    ] {
        named.extend(
            list.iter()
                .enumerate()
                .map(|(i, t)| (format!("{prefix}.{i}"), t)),
        );
    }
    let json = serde_json::to_string(state).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let meta = HashMap::from([(STATE_KEY.to_string(), json)]);
    let bytes =
        safetensors::tensor::serialize(named, Some(meta)).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &bytes).map_err(|e| Error::io(path, e))
}

/// Read a checkpoint onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| bad("no trainer state".into()))?;
    let state: CheckpointState =
        serde_json::from_str(json).map_err(|e| bad(format!("trainer state: {e}")))?;
    let mut tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(e.to_string()))?;
    let mut take = |prefix: &str| {
        let mut out = Vec::new();
        while let Some(t) = tensors.remove(&format!("{prefix}.{}", out.len())) {
            out.push(t);
        }
        out
    };
    let ck = Checkpoint {
        params: take("param"),
        frozen: take("frozen"),
        m: take("adam_m"),
        v: take("adam_v"),
        state,
    };
    if ck.params.is_empty() || ck.m.len() != ck.params.len() || ck.v.len() != ck.params.len() {
        return Err(bad(format!(
            "{} parameters with {} and {} moments",
            ck.params.len(),
            ck.m.len(),
            ck.v.len()
        )));
    }
    if !tensors.is_empty() {
        return Err(bad(format!("{} unexpected tensors", tensors.len())));
    }
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.ckpt");
        let dev = Device::Cpu;
        let t = |x: f32| Tensor::new(&[[x, x + 1.0], [x + 2.0, x + 3.0]], &dev).unwrap();
        let state = CheckpointState {
            version: 1,
            step: 3,
            cursor: 12,
            seed: 9,
            settings: serde_json::json!({"lr": 0.02}),
            data_digest: "x".into(),
            created: "2026-01-01T00:00:00Z".into(),
        };
        let params = [t(1.0), t(2.0)];
        let m = [t(3.0), t(4.0)];
        let v = [t(5.0), t(6.0)];
        save(&path, &state, &params, &[t(7.0)], (&m, &v)).unwrap();
        let ck = load(&path, &dev).unwrap();
        assert_eq!(ck.state, state);
        assert_eq!(ck.params.len(), 2);
        assert_eq!(ck.frozen.len(), 1);
        assert_eq!(
            ck.v[1].to_vec2::<f32>().unwrap(),
            v[1].to_vec2::<f32>().unwrap()
        );
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(load(&path, &dev), Err(Error::Checkpoint { .. })));
    }
}
