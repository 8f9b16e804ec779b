//! Training settings ([`TrainConfig`], serialisable: the CLI's TOML mirrors it, and it is stored in
//! the `.cart` provenance) and per-invocation options ([`RunOptions`]) that do not change the result.

use std::path::PathBuf;

use candle_core::DType;
use cartridge_formats::cart::Compression;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::init::{InitKind, InitialParams};
use crate::objective::Objective;
use crate::optim::AdamParams;
use crate::schedule::Schedule;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// A KV cartridge: per layer K and V for `tokens` slots.
    #[default]
    Kv,
    /// A soft prompt: `tokens` input embeddings.
    SoftPrompt,
}

/// The precision of the frozen model's forward and backward during training. The trained
/// parameters (the master copy), the optimiser state and the loss are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    /// Everything in f32 (the CPU default; bit-identical reruns).
    #[default]
    F32,
    /// Model weights and activations in bf16, parameters cast to bf16 on every forward (the GPU
    /// default: half the memory traffic, tensor-core matmuls).
    Bf16,
}

impl ComputeDtype {
    /// The candle dtype of the model's weights and activations.
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

/// Everything that determines the trained bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// KV cartridge or soft prompt.
    pub artifact: ArtifactKind,
    /// Cartridge slots `p` (or soft-prompt length `n`).
    pub tokens: usize,
    /// Leading cartridge slots held constant (the attention sink; ignored for soft prompts).
    pub frozen_tokens: usize,
    /// How the parameters start.
    pub init: InitKind,
    /// The loss.
    pub objective: Objective,
    /// Base learning rate. The default, 5e-3, is below the reference trainer's 2e-2 (DESIGN.md
    /// §5): the short CPU runs `build` makes by default (tens of steps, a corpus-KV start) lose
    /// ground at 2e-2. On the example corpus, held-out gap closed after 4 / 16 steps: 26% / 39%
    /// at 2e-2, 46% / 59% at 5e-3, from 38% at the start (BENCHMARKS.md, "Training").
    pub lr: f64,
    /// Adam betas and eps (weight decay is 0).
    pub adam: AdamParams,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Conversations per optimiser step.
    pub batch_size: usize,
    /// Conversations per forward/backward (gradient accumulation when below `batch_size`).
    pub micro_batch: usize,
    /// Pack each micro-batch's conversations into rows of at most this many tokens, each with its
    /// own positions and a block-diagonal mask (0: one conversation per right-padded row). The
    /// loss is the same either way; packing skips the compute padding costs.
    pub pack_len: usize,
    /// Passes over the training conversations (when `max_steps` is not set).
    pub epochs: usize,
    /// Optimiser steps, overriding `epochs`.
    pub max_steps: Option<usize>,
    /// Tokens kept per conversation (targets beyond are dropped).
    pub max_seq_len: usize,
    /// Seed of the data order, held-out split and random initialisation.
    pub seed: u64,
    /// Conversations held out for evaluation.
    pub eval_conversations: usize,
    /// Evaluate every this many steps (0: only at the start and the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only when a run is stopped early).
    pub checkpoint_every: usize,
    /// Precision of the model's forward and backward (parameters and loss stay f32).
    pub compute_dtype: ComputeDtype,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            artifact: ArtifactKind::Kv,
            tokens: 256,
            frozen_tokens: 1,
            init: InitKind::SelectedKeys,
            objective: Objective::Distill,
            lr: 5e-3,
            adam: AdamParams::default(),
            schedule: Schedule::Constant,
            batch_size: 4,
            micro_batch: 4,
            pack_len: 1024,
            epochs: 1,
            max_steps: None,
            max_seq_len: 1024,
            seed: 0,
            eval_conversations: 16,
            eval_every: 0,
            checkpoint_every: 50,
            compute_dtype: ComputeDtype::F32,
        }
    }
}

impl TrainConfig {
    /// Reject settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.tokens == 0 {
            return bad("tokens must be at least 1");
        }
        if self.artifact == ArtifactKind::Kv && self.frozen_tokens >= self.tokens {
            return bad("frozen_tokens must be below tokens");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a positive number");
        }
        if self.batch_size == 0 || self.micro_batch == 0 {
            return bad("batch_size and micro_batch must be at least 1");
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len must be at least 2");
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return bad("epochs must be at least 1 (or set max_steps)");
        }
        Ok(())
    }

    /// The settings a resumed run must share with the checkpoint: all but the evaluation and
    /// checkpoint cadence, which do not change the trained bytes.
    pub fn result_settings(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("eval_every");
            o.remove("checkpoint_every");
        }
        v
    }
}

/// Options of one invocation.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Continue from the checkpoint if one exists.
    pub resume: bool,
    /// Stop (with a checkpoint, without writing the artifact) once this many steps are done.
    pub stop_after: Option<usize>,
    /// Creation time to record (default: now; a resumed run keeps its checkpoint's).
    pub created: Option<String>,
    /// Checkpoint file (default: the output with extension `ckpt`).
    pub checkpoint_path: Option<PathBuf>,
    /// Metrics file (default: the output with extension `metrics.jsonl`).
    pub metrics_path: Option<PathBuf>,
    /// Compression of the written `.cart`.
    pub compression: Compression,
    /// The start of a [`InitKind::Given`] run.
    pub initial: Option<InitialParams>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            resume: false,
            stop_after: None,
            created: None,
            checkpoint_path: None,
            metrics_path: None,
            compression: Compression::None,
            initial: None,
        }
    }
}
