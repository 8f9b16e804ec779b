//! The engine: one OS thread owns the model (CPU compute stays off the async runtime) and runs
//! continuous batching over every request in flight.
//!
//! Requests arrive through a channel into a FIFO queue bounded by `queue` (a full queue answers
//! 429 at submission). Each loop iteration admits queued requests while fewer than `max_batch`
//! sequences run, groups them by cartridge set (one [`BatchDecoder`] per set: sequences with the
//! same set share its resolved prefix), steps every group once, and sends each token to its
//! request's channel. A request whose channel is closed (client gone, stop string reached) or
//! whose deadline passed leaves its batch before the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use cartridge_runtime::batch_decoder::{SeqId, TokenEvent};
use cartridge_runtime::generate::GenerateRequest;
use cartridge_runtime::{BatchDecoder, Composition, Path, PrefixKv, PrefixStack, Transformer};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Batching and admission limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded at once, over all cartridge sets.
    pub max_batch: usize,
    /// Requests allowed to wait for a place in the batch; one more gets 429.
    pub queue: usize,
    /// Prompt tokens prefilled per group per step (bounds how long a long prompt stalls decoding).
    pub prefill_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            queue: 256,
            prefill_tokens: 512,
        }
    }
}

/// What goes in front of a request's tokens: cartridges in order, then an optional soft prompt.
#[derive(Debug, Clone, Default)]
pub struct PrefixParts {
    /// Identity of the set (requests with equal keys share a batch).
    pub key: Vec<String>,
    /// KV cartridges, composed in this order.
    pub cartridges: Vec<Arc<PrefixKv>>,
    /// A soft prompt `[n, hidden]` after them.
    pub soft_prompt: Option<Arc<Tensor>>,
    /// How the cartridges share positions (the server's `--compose`).
    pub composition: Composition,
}

impl PrefixParts {
    /// Total prefix tokens.
    pub fn len(&self) -> usize {
        let soft = self
            .soft_prompt
            .as_ref()
            .map_or(0, |t| t.dim(0).unwrap_or(0));
        self.composition
            .slots(self.cartridges.iter().map(|c| c.len()))
            + soft
    }

    /// Whether there is no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the engine sends back for one request.
#[derive(Debug)]
pub enum Event {
    /// A generated token (its `finish` is set on the last one).
    Token(TokenEvent),
    /// The request failed; nothing follows.
    Failed(ApiError),
}

/// One request for the engine.
#[derive(Debug)]
pub struct Job {
    /// Its cartridge set.
    pub prefix: PrefixParts,
    /// Prompt ids (after the prefix) and sampling.
    pub request: GenerateRequest,
    /// Where its tokens go; closing it cancels the request.
    pub events: UnboundedSender<Event>,
    /// When to give up on it.
    pub deadline: Instant,
}

/// The handlers' side of the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: Sender<Job>,
    queued: Arc<AtomicUsize>,
    queue_limit: usize,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Queue `job`, or refuse it with 429 when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let limit = self.queue_limit;
        if self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < limit).then_some(q + 1)
            })
            .is_err()
        {
            self.metrics
                .rejected_queue_full
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::busy(1));
        }
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::internal("the engine has stopped"));
        }
        Ok(())
    }

    /// Requests waiting for a place in the batch.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Start the engine thread for `model`. It runs until every [`EngineHandle`] is dropped.
pub fn start(
    model: Transformer,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let handle = EngineHandle {
        tx,
        queued: queued.clone(),
        queue_limit: config.queue,
        metrics: metrics.clone(),
    };
    let engine = Engine {
        model,
        config,
        metrics,
        queued,
        pending: VecDeque::new(),
        groups: HashMap::new(),
        active: HashMap::new(),
        next_id: 0,
    };
    let thread = std::thread::Builder::new()
        .name("cartridge-engine".into())
        .spawn(move || engine.run(rx))?;
    Ok((handle, thread))
}

/// A request admitted into a batch.
struct Active {
    events: UnboundedSender<Event>,
    deadline: Instant,
    key: Vec<String>,
}

struct Engine {
    model: Transformer,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    pending: VecDeque<Job>,
    groups: HashMap<Vec<String>, BatchDecoder>,
    active: HashMap<SeqId, Active>,
    next_id: SeqId,
}

impl Engine {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            if self.active.is_empty() && self.pending.is_empty() {
                // Idle: block for work, waking now and then so that nothing is left behind.
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(job) => self.pending.push_back(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.pending.push_back(job);
            }
            self.admit();
            self.drop_gone();
            self.step();
            self.metrics
                .running
                .store(self.active.len() as u64, Ordering::Relaxed);
        }
    }

    fn dequeue(&mut self) -> Option<Job> {
        let job = self.pending.pop_front()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        Some(job)
    }

    /// Move queued requests into batches while there is room.
    fn admit(&mut self) {
        while self.active.len() < self.config.max_batch.max(1) {
            let Some(job) = self.dequeue() else {
                return;
            };
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if Instant::now() > job.deadline {
                self.metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::Failed(ApiError::timeout()));
                continue;
            }
            if let Err(e) = self.add(&job) {
                let _ = job.events.send(Event::Failed(e));
                continue;
            }
        }
    }

    fn add(&mut self, job: &Job) -> Result<(), ApiError> {
        let key = job.prefix.key.clone();
        if !self.groups.contains_key(&key) {
            let stack = PrefixStack {
                cartridges: job
                    .prefix
                    .cartridges
                    .iter()
                    .map(|c| (**c).clone())
                    .collect(),
                soft_prompts: job
                    .prefix
                    .soft_prompt
                    .iter()
                    .map(|t| (**t).clone())
                    .collect(),
                composition: job.prefix.composition,
            };
            let prefix = stack
                .resolve(&self.model, Path::Infer)
                .map_err(|e| ApiError::internal(format!("cannot compose the prefix: {e}")))?;
            let dec = BatchDecoder::new(&self.model, prefix, self.config.prefill_tokens);
            self.groups.insert(key.clone(), dec);
        }
        let id = self.next_id;
        self.next_id += 1;
        let dec = self
            .groups
            .get_mut(&key)
            .ok_or_else(|| ApiError::internal("batch group vanished"))?;
        dec.add(id, job.request.clone())
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        self.active.insert(
            id,
            Active {
                events: job.events.clone(),
                deadline: job.deadline,
                key,
            },
        );
        Ok(())
    }

    /// Take out sequences whose client went away or whose time is up.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed() || now > a.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let Some(a) = self.active.remove(&id) else {
                continue;
            };
            if a.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            } else {
                self.metrics.timed_out.fetch_add(1, Ordering::Relaxed);
                let _ = a.events.send(Event::Failed(ApiError::timeout()));
            }
            if let Some(dec) = self.groups.get_mut(&a.key) {
                if let Err(e) = dec.cancel(id) {
                    self.fail_group(&a.key, &e.to_string());
                }
            }
        }
    }

    /// One step of every group; tokens go to their requests.
    fn step(&mut self) {
        let keys: Vec<Vec<String>> = self.groups.keys().cloned().collect();
        for key in keys {
            let Some(dec) = self.groups.get_mut(&key) else {
                continue;
            };
            if dec.is_empty() {
                self.groups.remove(&key);
                continue;
            }
            let events = match dec.step(&self.model) {
                Ok(events) => events,
                Err(e) => {
                    self.fail_group(&key, &e.to_string());
                    continue;
                }
            };
            self.metrics.engine_steps.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .generated_tokens
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            for event in events {
                let id = event.id;
                let finished = event.finish.is_some();
                let delivered = self
                    .active
                    .get(&id)
                    .is_some_and(|a| a.events.send(Event::Token(event)).is_ok());
                if finished || !delivered {
                    self.active.remove(&id);
                }
                if !finished && !delivered {
                    if let Some(dec) = self.groups.get_mut(&key) {
                        let _ = dec.cancel(id);
                    }
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A forward failed: every request of the group gets the error and the group is dropped.
    fn fail_group(&mut self, key: &[String], message: &str) {
        if let Some(dec) = self.groups.remove(key) {
            for id in dec.ids() {
                if let Some(a) = self.active.remove(&id) {
                    let _ = a
                        .events
                        .send(Event::Failed(ApiError::internal(message.to_string())));
                }
            }
        }
    }
}
