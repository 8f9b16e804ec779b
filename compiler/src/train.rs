//! The training loop: examples -> parameters -> (micro-batched forward/backward, Adam) x steps ->
//! held-out evaluation, checkpoints, metrics -> the `.cart`.
//!
//! Determinism: initialisation, split and data order are seeded; every tensor op runs in a fixed
//! order on the CPU, so the same settings give the same bytes, and a run stopped after step `k` and
//! resumed from its checkpoint writes exactly the file an uninterrupted run writes.

use std::path::{Path as FsPath, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use cartridge_formats::cart::Provenance;
use cartridge_formats::dataset::{Dataset, Record};
use cartridge_formats::lock::{self, LockFile};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::cartridge_file::{save_cartridge, save_soft_prompt, SoftPrompt};
use cartridge_runtime::{Path, PrefixKv, Transformer};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, CheckpointState};
use crate::config::{ArtifactKind, RunOptions, TrainConfig};
use crate::data::{self, Example, PromptSummary};
use crate::error::{Error, Result};
use crate::eval::{self, EvalPoint};
use crate::init::{init_kv_reporting, init_soft_prompt, InitKind, InitProgress, InitialParams};
use crate::metrics::MetricsLog;
use crate::objective::{loss_sum, Batch};
use crate::optim::Adam;
use crate::params::{KvParams, Params, SoftParams};

/// Checkpoint format version.
const CHECKPOINT_VERSION: u32 = 1;

/// Conversations with teacher top-k, and where they came from.
#[derive(Debug, Clone, Default)]
pub struct TrainData {
    /// The records, in dataset order.
    pub records: Vec<Record>,
    /// `sha256:<hex>` of the corpus (recorded in the provenance).
    pub corpus_digest: Option<String>,
    /// The teacher that produced the top-k (its tokenizer must be the student's).
    pub teacher: Option<ModelFingerprint>,
    /// A summary placed after a soft prompt, before every conversation (soft prompts only).
    pub summary: Option<PromptSummary>,
}

impl TrainData {
    /// Every record of a dataset, with its manifest's corpus digest and teacher.
    pub fn from_dataset(ds: &Dataset) -> Result<Self> {
        let m = ds.manifest();
        Ok(Self {
            records: ds.records()?,
            corpus_digest: Some(m.corpus_digest.clone()).filter(|d| !d.is_empty()),
            teacher: Some(m.teacher.clone()),
            summary: None,
        })
    }
}

/// The frozen model the parameters are trained for.
#[derive(Debug, Clone, Copy)]
pub struct ModelRef<'a> {
    /// The forward (f32).
    pub transformer: &'a Transformer,
    /// Its identity, written into the `.cart`.
    pub fingerprint: &'a ModelFingerprint,
}

/// One optimiser step, as reported to the progress callback and the metrics file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepInfo {
    /// Steps completed (1-based index of this step).
    pub step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Mean per-target training loss of this step's batch (before the update).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Real tokens in the batch.
    pub tokens: usize,
    /// Target tokens in the batch.
    pub targets: usize,
    /// Wall time of the step.
    pub seconds: f64,
}

/// What the callback hears.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// The start is being computed (corpus-selected starts only; before [`Progress::Started`]).
    Init(InitProgress),
    /// Training is about to start (or continue at `start_step`).
    Started {
        /// First step to run (0, or the checkpoint's).
        start_step: usize,
        /// Steps of the whole run.
        total_steps: usize,
        /// Training conversations.
        train_examples: usize,
        /// Held-out conversations.
        eval_examples: usize,
        /// Trainable scalars.
        trainable: usize,
    },
    /// A step finished.
    Step(StepInfo),
    /// A held-out evaluation finished.
    Eval(EvalPoint),
    /// A checkpoint was written.
    Checkpoint {
        /// Steps it covers.
        step: usize,
    },
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Whether all steps ran and the artifact was written (false: stopped early, checkpointed).
    pub finished: bool,
    /// Steps completed so far (in this and earlier invocations).
    pub steps: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Training conversations.
    pub train_examples: usize,
    /// Held-out conversations.
    pub eval_examples: usize,
    /// Trainable scalars.
    pub trainable: usize,
    /// Mean training loss of the last step run here.
    pub last_train_loss: Option<f64>,
    /// Held-out evaluation before training (or at resume).
    pub first_eval: Option<EvalPoint>,
    /// Held-out evaluation at the end.
    pub final_eval: Option<EvalPoint>,
    /// The written artifact.
    pub out: Option<PathBuf>,
    /// Its size in bytes.
    pub out_bytes: u64,
    /// The metrics file.
    pub metrics: PathBuf,
    /// The PNG of the curves (written with the artifact).
    pub plot: Option<PathBuf>,
    /// The checkpoint left behind when stopped early.
    pub checkpoint: Option<PathBuf>,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Training tokens per second (real tokens of the steps run here, step time only).
    pub tokens_per_second: f64,
}

fn with_suffix(out: &FsPath, suffix: &str) -> PathBuf {
    let mut name = out
        .file_stem()
        .map(|s| s.to_os_string())
        .unwrap_or_else(|| "cartridge".into());
    name.push(suffix);
    out.with_file_name(name)
}

/// Hold `OUT.lock` (next to the artifact, removed when training ends) for the run: a second run
/// into the same output would interleave its checkpoints and metrics with this one's. The
/// output's folder is created first, so a mistyped one shows now rather than after training.
fn lock_output(out: &FsPath) -> Result<Option<LockFile>> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let path = with_suffix(out, ".lock");
    let acquired = lock::try_lock(&path, true).map_err(|e| Error::io(&path, e))?;
    acquired.held().map_err(|holder| Error::Busy {
        out: out.to_path_buf(),
        holder,
    })
}

/// SHA-256 over everything training reads from the examples: a resumed run must see the same data.
fn data_digest(examples: &[Example]) -> String {
    let mut h = Sha256::new();
    h.update((examples.len() as u64).to_le_bytes());
    for e in examples {
        for part in [&e.tokens, &e.rows, &e.next, &e.topk_ids] {
            h.update((part.len() as u64).to_le_bytes());
            for x in part.iter() {
                h.update(x.to_le_bytes());
            }
        }
        for x in &e.topk_logprobs {
            h.update(x.to_bits().to_le_bytes());
        }
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A detached copy of the resolved prefix (evaluation needs no graph).
fn eval_prefix(params: &Params, model: &Transformer) -> Result<Option<PrefixKv>> {
    let Some(p) = params
        .stack_in(model.dtype())?
        .resolve(model, Path::Infer)?
    else {
        return Ok(None);
    };
    let layers = p
        .layers()
        .iter()
        .map(|(k, v)| (k.detach(), v.detach()))
        .collect();
    Ok(Some(PrefixKv::new(layers)?))
}

fn log_eval(
    progress: &mut dyn FnMut(&Progress),
    metrics: &mut MetricsLog,
    p: &EvalPoint,
) -> Result<()> {
    progress(&Progress::Eval(*p));
    metrics.write(
        &serde_json::json!({"event": "eval", "step": p.step, "loss": p.loss,
        "bare_loss": p.bare_loss, "teacher_loss": p.teacher_loss, "gap_closed": p.gap_closed}),
    )
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

/// One optimiser step's gradients: the loss of each micro-batch (scaled by `1 / targets`, the
/// step's target count) back-propagated after a fresh prefix from `params`, summed per variable
/// in [`Params::vars`] order. Returns (gradients, the step's loss, real tokens seen).
pub fn step_gradients(
    net: &Transformer,
    params: &Params,
    batches: impl IntoIterator<Item = Result<Batch>>,
    targets: usize,
) -> Result<(Vec<Option<Tensor>>, f64, usize)> {
    let vars = params.vars();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let (mut loss, mut tokens) = (0f64, 0usize);
    for batch in batches {
        let batch = batch?;
        let prefix = params.stack_in(net.dtype())?.resolve(net, Path::Train)?;
        let l = loss_sum(net, prefix.as_ref(), &batch, Path::Train)?
            .affine(1.0 / targets as f64, 0.0)?;
        loss += scalar(&l)?;
        tokens += batch.real_tokens;
        let store = l.backward()?;
        for (acc, var) in grads.iter_mut().zip(&vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
    }
    Ok((grads, loss, tokens))
}

/// Parameters of the run's shape, all zero, for a checkpoint to fill: every value is replaced by
/// the checkpoint's before use.
fn placeholder_params(cfg: &TrainConfig, net: &Transformer) -> Result<Params> {
    let mc = net.config();
    let dev = net.device();
    Ok(match cfg.artifact {
        ArtifactKind::Kv => {
            let zeros = Tensor::zeros((mc.num_kv_heads, cfg.tokens, mc.head_dim), DType::F32, dev)?;
            let layers = (0..mc.num_layers)
                .map(|_| (zeros.clone(), zeros.clone()))
                .collect();
            Params::Kv(KvParams::new(&PrefixKv::new(layers)?, cfg.frozen_tokens)?)
        }
        ArtifactKind::SoftPrompt => Params::Soft(SoftParams::new(&Tensor::zeros(
            (cfg.tokens, mc.hidden_size),
            DType::F32,
            dev,
        )?)?),
    })
}

/// The parameters a run starts from: computed by `cfg.init`, or the caller's `given` start
/// ([`InitKind::Given`]), checked against the run's kind and size and the model's shapes. They
/// are f32 whatever the compute precision (the master copy).
fn initial_params(
    cfg: &TrainConfig,
    net: &Transformer,
    corpus_ids: Option<&[u32]>,
    given: Option<&InitialParams>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Params> {
    let mc = net.config();
    let mismatch = |what: String| Err(Error::Config(format!("the given start {what}")));
    match (cfg.artifact, cfg.init, given) {
        (_, InitKind::Given, None) => Err(Error::Config(
            "init is `given` but the run was given no start".into(),
        )),
        (_, kind, Some(_)) if kind != InitKind::Given => Err(Error::Config(format!(
            "a start was given, but init is {kind:?}"
        ))),
        (ArtifactKind::Kv, _, Some(InitialParams::Kv(kv))) => {
            if kv.len() != cfg.tokens {
                return mismatch(format!("has {} slots, the run {}", kv.len(), cfg.tokens));
            }
            if kv.num_layers() != mc.num_layers {
                return mismatch(format!(
                    "has {} layers, the model {}",
                    kv.num_layers(),
                    mc.num_layers
                ));
            }
            let want = [mc.num_kv_heads, cfg.tokens, mc.head_dim];
            for (k, v) in kv.layers() {
                if k.dims() != want || v.dims() != want {
                    return mismatch(format!(
                        "has keys {:?} and values {:?}, the model needs {want:?}",
                        k.dims(),
                        v.dims()
                    ));
                }
            }
            let kv = kv.to_device(net.device())?.to_dtype(DType::F32)?;
            Ok(Params::Kv(KvParams::new(&kv, cfg.frozen_tokens)?))
        }
        (ArtifactKind::SoftPrompt, _, Some(InitialParams::SoftPrompt(e))) => {
            let want = [cfg.tokens, mc.hidden_size];
            if e.dims() != want {
                return mismatch(format!("is {:?}, the run needs {want:?}", e.dims()));
            }
            let e = e.to_device(net.device())?.to_dtype(DType::F32)?;
            Ok(Params::Soft(SoftParams::new(&e)?))
        }
        (ArtifactKind::Kv, _, Some(InitialParams::SoftPrompt(_))) => {
            mismatch("is a soft prompt, the run trains a KV cartridge".into())
        }
        (ArtifactKind::SoftPrompt, _, Some(InitialParams::Kv(_))) => {
            mismatch("is a KV cartridge, the run trains a soft prompt".into())
        }
        (ArtifactKind::Kv, kind, None) => {
            let kv = init_kv_reporting(net, cfg.tokens, kind, corpus_ids, cfg.seed, &mut |p| {
                progress(&Progress::Init(p))
            })?;
            Ok(Params::Kv(KvParams::new(
                &kv.to_dtype(DType::F32)?,
                cfg.frozen_tokens,
            )?))
        }
        (ArtifactKind::SoftPrompt, kind, None) => Ok(Params::Soft(SoftParams::new(
            &init_soft_prompt(net, cfg.tokens, kind, corpus_ids, cfg.seed)?,
        )?)),
    }
}

/// Train `cfg.artifact` for `model` on `data` and write it to `out`.
///
/// `corpus_ids` are the corpus's tokens for [`crate::InitKind::CorpusText`] (the first
/// `cfg.tokens` are used). The checkpoint and metrics files sit next to `out` unless `opts` names
/// them. `progress` hears every step, evaluation and checkpoint.
pub fn train(
    cfg: &TrainConfig,
    model: ModelRef<'_>,
    data: &TrainData,
    corpus_ids: Option<&[u32]>,
    out: &FsPath,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainSummary> {
    let started = Instant::now();
    cfg.validate()?;
    let _lock = lock_output(out)?;
    let net = model.transformer;
    if net.dtype() != cfg.compute_dtype.dtype() {
        return Err(Error::Config(format!(
            "the settings ask for {:?} compute, the model runs in {:?}",
            cfg.compute_dtype,
            net.dtype()
        )));
    }
    if let Some(t) = &data.teacher {
        // The teacher's ids must mean the same tokens to the student.
        if t.tokenizer_hash != model.fingerprint.tokenizer_hash
            || t.vocab_size != model.fingerprint.vocab_size
        {
            return Err(Error::Data(format!(
                "the dataset's teacher ({}) has another tokenizer than the model ({})",
                t.short(),
                model.fingerprint.short()
            )));
        }
    }
    let vocab = net.config().vocab_size;
    let examples = data::prepare(&data.records, cfg.max_seq_len, vocab)?;
    if examples.len() < 2 {
        return Err(Error::Data(format!(
            "{} conversations with targets: at least 2 are needed (one to train, one held out)",
            examples.len()
        )));
    }
    // With a summary the student sees it before every conversation; the bare model (the
    // baseline of the gap) sees the conversations alone.
    let bare_examples = examples;
    let examples: Vec<Example> = match &data.summary {
        Some(_) if cfg.artifact != ArtifactKind::SoftPrompt => {
            return Err(Error::Config(
                "a summary goes with a soft prompt, not a KV cartridge".into(),
            ))
        }
        Some(s) if s.ids.is_empty() => {
            return Err(Error::Config("the summary has no tokens".into()))
        }
        Some(s) => bare_examples.iter().map(|e| e.after(&s.ids)).collect(),
        None => bare_examples.clone(),
    };
    // Training positions run from the prefix length to prefix + longest sequence; past the
    // model's RoPE table the runtime could not serve the cartridge either.
    let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let max_pos = net.config().max_position_embeddings;
    if cfg.tokens + longest > max_pos {
        return Err(Error::Config(format!(
            "{} prefix tokens + {longest} sequence tokens exceed the model's {max_pos} positions \
             (lower tokens or max_seq_len)",
            cfg.tokens
        )));
    }
    let digest = data_digest(&examples);
    let (train_idx, eval_idx) = data::split(examples.len(), cfg.eval_conversations, cfg.seed);
    let train_ex: Vec<&Example> = train_idx.iter().map(|&i| &examples[i]).collect();
    let eval_ex: Vec<&Example> = eval_idx.iter().map(|&i| &examples[i]).collect();
    let bare_eval_ex: Vec<&Example> = eval_idx.iter().map(|&i| &bare_examples[i]).collect();
    let total_steps = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.epochs * train_ex.len()).div_ceil(cfg.batch_size));

    let ckpt_path = opts
        .checkpoint_path
        .clone()
        .unwrap_or_else(|| with_suffix(out, ".ckpt"));
    let resume_from = if opts.resume && ckpt_path.is_file() {
        Some(checkpoint::load(&ckpt_path, net.device())?)
    } else {
        None
    };
    let mut params = match (&resume_from, opts.initial.as_ref()) {
        // A computed start is all in the checkpoint (trainable and frozen slots): computing it
        // again only to overwrite it would cost a resumed build minutes (about 10 for quenmar's
        // `selected-refined` start). (A given start is read from its file and may carry a logit
        // bias, which the checkpoint does not hold.)
        (Some(_), None) if cfg.init != InitKind::Given => placeholder_params(cfg, net)?,
        _ => initial_params(cfg, net, corpus_ids, opts.initial.as_ref(), progress)?,
    };
    let vars = params.vars();
    let mut adam = Adam::new(vars.clone(), cfg.adam)?;
    let metrics_path = opts
        .metrics_path
        .clone()
        .unwrap_or_else(|| with_suffix(out, ".metrics.jsonl"));

    // Resume.
    let mut start_step = 0;
    let mut created = opts
        .created
        .clone()
        .unwrap_or_else(cartridge_formats::time::now_rfc3339);
    if let Some(ck) = resume_from {
        let bad = |message: String| Error::Checkpoint {
            path: ckpt_path.clone(),
            message,
        };
        if ck.state.version != CHECKPOINT_VERSION {
            return Err(bad(format!("version {}", ck.state.version)));
        }
        if ck.state.settings != cfg.result_settings() {
            return Err(bad(
                "written with other training settings (start afresh without --resume)".into(),
            ));
        }
        if ck.state.data_digest != digest {
            return Err(bad("written for other training data".into()));
        }
        if ck.params.len() != vars.len() {
            return Err(bad(format!(
                "{} parameters, {} expected",
                ck.params.len(),
                vars.len()
            )));
        }
        for (var, t) in vars.iter().zip(&ck.params) {
            if var.dims() != t.dims() {
                return Err(bad(format!(
                    "parameter {:?}, {:?} expected",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(t)?;
        }
        if let Params::Kv(kv) = &mut params {
            kv.set_frozen(&ck.frozen)?;
        }
        adam.restore(ck.m, ck.v, ck.state.step)?;
        start_step = ck.state.step;
        created = ck.state.created;
    }
    let mut metrics = MetricsLog::open(&metrics_path, (start_step > 0).then_some(start_step))?;
    progress(&Progress::Started {
        start_step,
        total_steps,
        train_examples: train_ex.len(),
        eval_examples: eval_ex.len(),
        trainable: params.trainable_scalars(),
    });

    let save_ckpt = |params: &Params, adam: &Adam, step: usize| -> Result<()> {
        let state = CheckpointState {
            version: CHECKPOINT_VERSION,
            step,
            cursor: step * cfg.batch_size,
            seed: cfg.seed,
            settings: cfg.result_settings(),
            data_digest: digest.clone(),
            created: created.clone(),
        };
        let tensors: Vec<Tensor> = params
            .vars()
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let frozen = match params {
            Params::Kv(kv) => kv.frozen_tensors(),
            Params::Soft(_) => Vec::new(),
        };
        checkpoint::save(&ckpt_path, &state, &tensors, &frozen, adam.moments())
    };
    // Never below the resumed step: a checkpoint must not claim steps its parameters lack.
    let end = opts
        .stop_after
        .map_or(total_steps, |s| s.min(total_steps))
        .max(start_step);
    // A checkpoint of the start, before the evaluations and the first step: a run killed before
    // its first periodic checkpoint then resumes without computing the start again.
    if start_step == 0 && end > 0 && cfg.checkpoint_every > 0 {
        save_ckpt(&params, &adam, 0)?;
        progress(&Progress::Checkpoint { step: 0 });
    }

    // The bare model and the teacher floor do not change during training: measure them once.
    let objective = cfg.objective;
    let (bare, teacher) = if eval_ex.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (
            eval::mean_loss(
                net,
                None,
                &bare_eval_ex,
                objective,
                cfg.micro_batch,
                cfg.pack_len,
            )?,
            eval::teacher_floor(&eval_ex, objective),
        )
    };
    let evaluate = |params: &Params, step: usize| -> Result<Option<EvalPoint>> {
        if eval_ex.is_empty() {
            return Ok(None);
        }
        let prefix = eval_prefix(params, net)?;
        let loss = eval::mean_loss(
            net,
            prefix.as_ref(),
            &eval_ex,
            objective,
            cfg.micro_batch,
            cfg.pack_len,
        )?;
        Ok(Some(EvalPoint {
            step,
            loss,
            bare_loss: bare,
            teacher_loss: teacher,
            gap_closed: eval::gap_closed(bare, teacher, loss),
        }))
    };
    let first_eval = evaluate(&params, start_step)?;
    // A resumed run does not log its starting point again: the log then reads exactly like an
    // uninterrupted run's.
    if let (Some(p), 0) = (&first_eval, start_step) {
        log_eval(progress, &mut metrics, p)?;
    }
    let mut last_loss = None;
    let (mut step_secs, mut step_tokens) = (0f64, 0usize);
    for step in start_step..end {
        let t0 = Instant::now();
        let idx = data::step_indices(step, cfg.batch_size, train_ex.len(), cfg.seed);
        let batch_ex: Vec<&Example> = idx.iter().map(|&i| train_ex[i]).collect();
        let targets: usize = batch_ex.iter().map(|e| e.num_targets()).sum();
        let batches = batch_ex
            .chunks(cfg.micro_batch)
            .map(|chunk| Batch::arrange(chunk, cfg.pack_len, objective, net.device()));
        let (grads, loss, tokens) = step_gradients(net, &params, batches, targets)?;
        let lr = cfg.schedule.lr(cfg.lr, step, total_steps);
        adam.update(&grads, lr)?;
        let info = StepInfo {
            step: step + 1,
            total_steps,
            loss,
            lr,
            tokens,
            targets,
            seconds: t0.elapsed().as_secs_f64(),
        };
        step_secs += info.seconds;
        step_tokens += tokens;
        last_loss = Some(loss);
        progress(&Progress::Step(info));
        metrics.write(
            &serde_json::json!({"event": "step", "step": info.step, "loss": loss,
            "lr": lr, "tokens": tokens, "targets": targets, "seconds": info.seconds}),
        )?;
        let done = step + 1;
        if cfg.eval_every > 0 && done % cfg.eval_every == 0 && done < total_steps {
            if let Some(p) = evaluate(&params, done)? {
                log_eval(progress, &mut metrics, &p)?;
            }
        }
        if cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 && done < total_steps {
            save_ckpt(&params, &adam, done)?;
            progress(&Progress::Checkpoint { step: done });
        }
    }
    let tokens_per_second = if step_secs > 0.0 {
        step_tokens as f64 / step_secs
    } else {
        0.0
    };
    let mut summary = TrainSummary {
        finished: false,
        steps: end,
        total_steps,
        train_examples: train_ex.len(),
        eval_examples: eval_ex.len(),
        trainable: params.trainable_scalars(),
        last_train_loss: last_loss,
        first_eval,
        final_eval: None,
        out: None,
        out_bytes: 0,
        metrics: metrics_path.clone(),
        plot: None,
        checkpoint: None,
        seconds: 0.0,
        tokens_per_second,
    };
    if end < total_steps {
        save_ckpt(&params, &adam, end)?;
        progress(&Progress::Checkpoint { step: end });
        summary.checkpoint = Some(ckpt_path);
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }

    let final_eval = evaluate(&params, total_steps)?;
    if let Some(p) = &final_eval {
        log_eval(progress, &mut metrics, p)?;
    }
    drop(metrics);
    let png = with_suffix(out, ".metrics.png");
    crate::plot::plot_metrics(&metrics_path, &png)?;
    // Everything recorded here is a function of the settings and data (no timings), so the same
    // run writes the same bytes.
    let provenance = Provenance {
        tool: format!("cartridge-compiler {}", env!("CARGO_PKG_VERSION")),
        created,
        corpus_digest: data.corpus_digest.clone(),
        training: serde_json::json!({
            "settings": cfg,
            "steps": total_steps,
            "train_conversations": train_ex.len(),
            "eval_conversations": eval_ex.len(),
            "data_digest": digest,
            "eval": final_eval,
        }),
        metadata: Default::default(),
    };
    match &params {
        Params::Kv(kv) => save_cartridge(
            out,
            &kv.prefix()?,
            kv.frozen_tokens(),
            model.fingerprint,
            provenance,
            opts.compression,
        )?,
        Params::Soft(s) => save_soft_prompt(
            out,
            &SoftPrompt {
                embeddings: s.embeddings().clone(),
                summary: data.summary.as_ref().map(|s| s.text.clone()),
            },
            model.fingerprint,
            provenance,
            opts.compression,
        )?,
    }
    // The artifact supersedes the checkpoint; a stale one could only confuse a later --resume.
    if ckpt_path.is_file() {
        std::fs::remove_file(&ckpt_path).map_err(|e| Error::io(&ckpt_path, e))?;
    }
    summary.finished = true;
    summary.plot = Some(png);
    summary.final_eval = final_eval;
    summary.out_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    summary.out = Some(out.to_path_buf());
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// [`train`] for a loaded model (what `cartridge train` and `cartridge build` call): the forward is
/// built from `loaded`'s weights in `cfg.compute_dtype` (shared, not copied, when that is f32). `data` usually comes from
/// [`TrainData::from_dataset`], with a [`PromptSummary`] when a soft prompt carries one.
pub fn train_loaded(
    cfg: &TrainConfig,
    loaded: &cartridge_runtime::loader::LoadedModel,
    data: &TrainData,
    corpus_ids: Option<&[u32]>,
    out: &FsPath,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainSummary> {
    let net = cartridge_runtime::Transformer::load(
        loaded.var_builder_dtype(cfg.compute_dtype.dtype()),
        &loaded.config,
    )?;
    let model = ModelRef {
        transformer: &net,
        fingerprint: &loaded.fingerprint,
    };
    train(cfg, model, data, corpus_ids, out, opts, progress)
}
