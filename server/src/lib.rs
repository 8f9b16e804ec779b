//! `cartridge serve`: an OpenAI-compatible HTTP server (axum + tokio) whose requests name
//! cartridges from a served folder, composed in the order given (DESIGN.md §6).
//!
//! - [`routes`]: `POST /v1/chat/completions`, `POST /v1/completions` (text or token-id prompts,
//!   `stream: true` as server-sent events, `logprobs` / `top_logprobs` with token ids), `GET
//!   /v1/models` (with the model fingerprint, so a remote self-study backend can check it), `GET
//!   /v1/cartridges`, `GET /health`, `GET /metrics` (Prometheus);
//! - [`registry`]: cartridge ids -> verified files, shared, LRU-evicted under a byte budget;
//! - [`engine`]: one thread that owns the model and runs continuous batching
//!   ([`cartridge_runtime::BatchDecoder`]) with a bounded queue;
//! - [`api`]: request bodies and limits; [`error`]: OpenAI-style errors; [`metrics`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let loaded = cartridge_runtime::loader::load_default(&candle_core::Device::Cpu)?;
//! let model = loaded.transformer()?;
//! let config = cartridge_server::ServerConfig::new("cartridges/".into());
//! let server = cartridge_server::spawn(config, &loaded, model)?;
//! println!("listening on http://{}", server.addr());
//! server.wait()?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod registry;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cartridge_runtime::loader::LoadedModel;
use cartridge_runtime::tokenizer::Tokenizer;
use cartridge_runtime::Transformer;
use tokio::sync::oneshot;

pub use api::Limits;
pub use engine::EngineConfig;
pub use error::ApiError;

/// What can stop the server from starting or make it stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding, the cartridge folder, or a thread.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The server thread failed.
    #[error("{0}")]
    Msg(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

/// Everything `cartridge serve` can set.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (port 0: any free port; see [`ServerHandle::addr`]).
    pub addr: SocketAddr,
    /// The folder whose `.cart` files requests may name.
    pub cartridges_dir: PathBuf,
    /// Loaded cartridges are evicted least-recently-used past this many bytes.
    pub cache_bytes: u64,
    /// Batching and queue.
    pub engine: EngineConfig,
    /// Per-request limits.
    pub limits: Limits,
    /// The model name requests use (default: the model file's stem).
    pub model_name: Option<String>,
    /// Tokio worker threads for HTTP (the model runs on its own thread).
    pub http_threads: usize,
    /// How a request's cartridges share positions.
    pub composition: cartridge_runtime::Composition,
}

impl ServerConfig {
    /// Defaults: `127.0.0.1:8080`, 1 GiB of cartridges, [`EngineConfig::default`],
    /// [`Limits::default`].
    pub fn new(cartridges_dir: PathBuf) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cartridges_dir,
            cache_bytes: 1 << 30,
            engine: EngineConfig::default(),
            limits: Limits::default(),
            model_name: None,
            http_threads: 2,
            composition: cartridge_runtime::Composition::Overlap,
        }
    }
}

/// Token ids that end a chat answer: EOS plus the end-of-turn tokens of common chat formats that
/// exist in the vocabulary (the rule the self-study teacher uses).
pub fn chat_stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = tokenizer.eos_token_ids().to_vec();
    for t in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|endoftext|>",
        "<end_of_turn>",
        "</s>",
    ] {
        if let Some(id) = tokenizer.token_to_id(t) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: std::thread::JoinHandle<Result<(), ServerError>>,
    metrics: Arc<metrics::Metrics>,
}

impl ServerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Stop accepting, finish open connections, and wait.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    /// Run until the process gets Ctrl-C.
    pub fn wait(self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(self) -> Result<(), ServerError> {
        self.thread
            .join()
            .map_err(|_| ServerError::Msg("the server thread panicked".into()))?
    }
}

/// Start serving `model` (with `loaded`'s tokenizer, template and fingerprint) on a thread of
/// its own; returns once the socket is bound.
pub fn spawn(
    config: ServerConfig,
    loaded: &LoadedModel,
    model: Transformer,
) -> Result<ServerHandle, ServerError> {
    let registry = registry::Registry::new(
        &config.cartridges_dir,
        loaded.fingerprint.clone(),
        loaded.device.clone(),
        config.cache_bytes,
    )
    .map_err(io(format!(
        "cartridge folder {}",
        config.cartridges_dir.display()
    )))?;
    let info = routes::ModelInfo {
        name: config.model_name.clone().unwrap_or_else(|| {
            loaded
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        }),
        fingerprint: loaded.fingerprint.clone(),
        context_window: loaded.config.max_position_embeddings,
        vocab_size: loaded.config.vocab_size,
        chat_stop_tokens: chat_stop_tokens(&loaded.tokenizer),
        eos_tokens: loaded.tokenizer.eos_token_ids().to_vec(),
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let (engine, _engine_thread) = engine::start(model, config.engine.clone(), metrics.clone())
        .map_err(io("starting the engine thread"))?;
    let state = Arc::new(routes::AppState {
        engine,
        registry: Arc::new(registry),
        tokenizer: Arc::new(loaded.tokenizer.clone()),
        template: loaded.chat_template.clone().map(Arc::new),
        metrics: metrics.clone(),
        info,
        limits: config.limits.clone(),
        composition: config.composition,
    });
    let listener =
        std::net::TcpListener::bind(config.addr).map_err(io(format!("binding {}", config.addr)))?;
    listener
        .set_nonblocking(true)
        .map_err(io("configuring the socket"))?;
    let addr = listener
        .local_addr()
        .map_err(io("reading the bound address"))?;
    let (tx, rx) = oneshot::channel::<()>();
    let threads = config.http_threads.max(1);
    let thread = std::thread::Builder::new()
        .name("cartridge-http".into())
        .spawn(move || -> Result<(), ServerError> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .map_err(io("starting the async runtime"))?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(io("registering the socket"))?;
                let app = routes::router(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        tokio::select! {
                            _ = rx => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    })
                    .await
                    .map_err(io("serving"))
            })
            // The engine thread ends when the last handle (in the router state) is dropped.
        })
        .map_err(io("starting the server thread"))?;
    Ok(ServerHandle {
        addr,
        shutdown: Some(tx),
        thread,
        metrics,
    })
}
