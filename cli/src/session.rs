//! What `generate` and `chat` share: model options, prefix options, sampling options, and a loaded
//! session (model + resolved prefix stack) built from them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use cartridge_compiler::ComputeDtype;
use cartridge_runtime::cartridge_file::{load_cartridge, load_soft_prompt};
use cartridge_runtime::chat_template::ChatMessage;
use cartridge_runtime::device::{self, DeviceSpec};
use cartridge_runtime::generate::SamplingParams;
use cartridge_runtime::loader::{self, LoadedModel};
use cartridge_runtime::{Composition, Path as ComputePath, PrefixKv, PrefixStack, Transformer};

/// Which model to run.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A `.gguf` file or a Hugging Face model folder [default: SmolLM2-135M-Instruct fetched by
    /// scripts/fetch-model.sh, or $CARTRIDGE_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Decode with the GGUF's quantised weights (several times faster at small batch; log-probs
    /// differ from f32 by the 8-bit quantisation of activations). Prefill and training stay f32.
    #[arg(long)]
    pub quantized: bool,
    /// Where to compute: cpu, cuda (GPU 0) or cuda:N. CUDA needs a binary built with
    /// scripts/build-cuda.sh and a machine with an NVIDIA driver.
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = device::parse)]
    pub device: DeviceSpec,
    /// Precision of the model's forward: f32, bf16, or auto (bf16 on a GPU, f32 on the CPU).
    /// Default: auto for `train` and `build`'s training (the cartridge, its optimiser state and
    /// the loss stay f32), f32 for generation, scoring and self-study, whose log-probabilities
    /// lose about two digits in bf16. Cartridges are converted when loaded; files stay f32.
    #[arg(long, value_name = "DTYPE", value_parser = ["auto", "f32", "bf16"])]
    pub dtype: Option<String>,
}

impl ModelArgs {
    /// Open `--device`, then load the model (the default one unless --model) onto it. The device
    /// is opened first so that an unusable one is reported before the model is read.
    pub fn load(&self) -> Result<LoadedModel> {
        let device = self.device.open()?;
        let path = loader::resolve_model_path(self.model.as_deref())?;
        loader::load(&path, &device).with_context(|| format!("loading model {}", path.display()))
    }

    /// The forward for `loaded` in the inference precision, quantised for decoding when asked.
    pub fn transformer(&self, loaded: &LoadedModel) -> Result<Transformer> {
        let dtype = self.inference_dtype()?;
        Ok(if self.quantized {
            loaded.quantized_transformer()?
        } else {
            Transformer::load(loaded.var_builder_dtype(dtype), &loaded.config)?
        })
    }

    /// `--dtype` for generation, scoring and self-study: f32 unless asked.
    pub fn inference_dtype(&self) -> Result<DType> {
        let dtype = match (self.dtype.as_deref(), self.device.is_cpu()) {
            (Some("bf16"), _) | (Some("auto"), false) => DType::BF16,
            _ => DType::F32,
        };
        if self.quantized && dtype != DType::F32 {
            anyhow::bail!("--quantized decodes with the GGUF's own weights: drop --dtype bf16");
        }
        Ok(dtype)
    }

    /// `--dtype` for training: auto (bf16 on a GPU, f32 on the CPU) unless asked.
    pub fn training_dtype(&self) -> ComputeDtype {
        match (self.dtype.as_deref(), self.device.is_cpu()) {
            (Some("bf16"), _) | (None | Some("auto"), false) => ComputeDtype::Bf16,
            _ => ComputeDtype::F32,
        }
    }
}

/// What goes in front of the user's tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefixArgs {
    /// A KV cartridge to attend to; repeat to compose several (in the order given).
    #[arg(long = "cartridge", value_name = "FILE.cart")]
    pub cartridges: Vec<PathBuf>,
    /// How several cartridges share positions.
    #[arg(long, value_enum, default_value_t = ComposeArg::Overlap)]
    pub compose: ComposeArg,
    /// A soft prompt placed after the cartridges (its summary text, if any, becomes the system message).
    #[arg(long, value_name = "FILE.cart")]
    pub soft_prompt: Option<PathBuf>,
}

/// `--compose`: how several cartridges share positions ([`Composition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ComposeArg {
    /// Each keeps the positions it was trained at (0..p-1), as `cartridge compose` writes them.
    Overlap,
    /// Each later one drops its first (attention-sink) slot and follows the ones before it.
    Follow,
}

impl From<ComposeArg> for Composition {
    fn from(arg: ComposeArg) -> Self {
        match arg {
            ComposeArg::Overlap => Composition::Overlap,
            ComposeArg::Follow => Composition::Follow,
        }
    }
}

/// How to pick tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most probable tokens up to this probability mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most probable tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Random seed (sampling is reproducible for a given seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// Check ranges and build the runtime's parameters.
    pub fn params(&self) -> Result<SamplingParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!("--temperature must be a finite number >= 0");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                anyhow::bail!("--top-p must be in (0, 1]");
            }
        }
        if self.top_k == Some(0) {
            anyhow::bail!("--top-k must be at least 1");
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// A model loaded with its prefix resolved, ready to generate.
pub struct Session {
    /// Tokenizer, template, fingerprint.
    pub loaded: LoadedModel,
    /// The forward.
    pub model: Transformer,
    /// Cartridges and soft prompt resolved into one KV prefix (None when empty).
    pub prefix: Option<PrefixKv>,
    /// Summary text of the soft prompt, if it has one.
    pub summary: Option<String>,
    /// Seconds spent loading the model and the prefix.
    pub load_seconds: f64,
}

impl Session {
    /// Load the model, then verify, model-check and resolve the prefix stack.
    pub fn open(model: &ModelArgs, prefix: &PrefixArgs) -> Result<Self> {
        let start = Instant::now();
        let loaded = model.load()?;
        // Cartridges go where the model is: copied there once, here, and reused by every turn.
        let device = loaded.device.clone();
        let transformer = model.transformer(&loaded)?;
        let mut stack = PrefixStack::new().with_composition(prefix.compose.into());
        for cart in &prefix.cartridges {
            stack = stack.with_cartridge(load_cartridge(cart, &loaded.fingerprint, &device)?);
        }
        let mut summary = None;
        if let Some(sp) = &prefix.soft_prompt {
            let soft = load_soft_prompt(sp, &loaded.fingerprint, &device)?;
            summary = soft.summary;
            stack = stack.with_soft_prompt(soft.embeddings);
        }
        let resolved = stack.resolve(&transformer, ComputePath::Infer)?;
        Ok(Self {
            loaded,
            model: transformer,
            prefix: resolved,
            summary,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Length of the prefix (the user's first position).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixKv::len)
    }

    /// Token ids for a chat conversation, rendered by the model's chat template with the
    /// generation prompt. A soft prompt's summary becomes the system message; otherwise a prefix
    /// stands in for the system message (rendered as self-study recorded the conversations).
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self.loaded.chat_template.as_ref().context(
            "this model has no chat template; use --raw to feed the prompt as plain text",
        )?;
        let text = match (&self.summary, &self.prefix) {
            (Some(s), _) => {
                let mut all = Vec::with_capacity(messages.len() + 1);
                all.push(ChatMessage::new("system", s.clone()));
                all.extend_from_slice(messages);
                template.render(&all, true)?
            }
            // The prefix is the system message, as in training: no default system prompt.
            (None, Some(_)) => template.render_after_system("system", messages, true)?,
            (None, None) => template.render(messages, true)?,
        };
        Ok(self.loaded.tokenizer.encode(&text, false)?)
    }

    /// Token ids of plain text (no template). A soft prompt's summary goes first, on its own line.
    /// The model's own special tokens (a BOS, for models that want one) are added only when there
    /// is no prefix: a cartridge plays the role of the sequence start, as in training.
    pub fn raw_ids(&self, text: &str) -> Result<Vec<u32>> {
        let text = match &self.summary {
            Some(s) => format!("{s}\n{text}"),
            None => text.to_string(),
        };
        let add_special = self.prefix.is_none();
        Ok(self.loaded.tokenizer.encode(&text, add_special)?)
    }

    /// Decode ids to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.loaded.tokenizer.decode(ids, true).unwrap_or_default()
    }
}
