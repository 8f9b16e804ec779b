//! Self-study throughput on the default model: answer tokens/s with 1, 8 and 32 conversations
//! per chunk, and where the time goes (shared-prefix prefill vs per-request prefill + decode, and
//! an estimate of top-k extraction from a timed `top_logprobs` over a vocabulary-sized row).
//!
//! `cargo run --release -p cartridge-selfstudy --example synth_bench -- [CORPUS] [BATCHES] [DUMP]`
//! (CORPUS defaults to `formats/SPEC.md`, BATCHES to `1,8,32`). With DUMP, the answer-role calls
//! of every run (the chunk's token ids, each request's prompt ids, limits, stop tokens) and their
//! timings are written there as JSON, so that `scripts/bench_synth.py` can replay exactly the same
//! requests in PyTorch.

use std::time::Instant;

use candle_core::Device;
use cartridge_selfstudy::backend::{Backend, BackendInfo, Completion, CompletionOutput, Timings};
use cartridge_selfstudy::corpus::{ingest, IngestOptions};
use cartridge_selfstudy::local::LocalBackend;
use cartridge_selfstudy::{synthesize, SynthesisConfig};
use serde_json::json;

/// One `complete` call as the synthesis loop made it, with its wall time.
struct Call {
    shared: Vec<u32>,
    requests: Vec<Completion>,
    secs: f64,
    generated: usize,
}

/// Forwards to the local backend and records the answer-role calls (those asking for top-k).
struct Recording<'a> {
    inner: &'a mut LocalBackend,
    answers: Vec<Call>,
}

impl Backend for Recording<'_> {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }
    fn encode(&self, text: &str) -> cartridge_selfstudy::Result<Vec<u32>> {
        self.inner.encode(text)
    }
    fn decode(&self, ids: &[u32]) -> cartridge_selfstudy::Result<String> {
        self.inner.decode(ids)
    }
    fn token_text(&self, id: u32) -> cartridge_selfstudy::Result<String> {
        self.inner.token_text(id)
    }
    fn render_chat(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> cartridge_selfstudy::Result<String> {
        self.inner.render_chat(messages, add_generation_prompt)
    }
    fn complete(
        &mut self,
        shared: &[u32],
        requests: &[Completion],
    ) -> cartridge_selfstudy::Result<Vec<CompletionOutput>> {
        let t0 = Instant::now();
        let out = self.inner.complete(shared, requests)?;
        if requests.iter().any(|r| r.top_logprobs > 0) {
            self.answers.push(Call {
                shared: shared.to_vec(),
                requests: requests.to_vec(),
                secs: t0.elapsed().as_secs_f64(),
                generated: out.iter().map(|o| o.tokens.len()).sum(),
            });
        }
        Ok(out)
    }
    fn timings(&self) -> Timings {
        self.inner.timings()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let corpus_path = args.get(1).map_or("formats/SPEC.md", String::as_str);
    let batches: Vec<usize> = args
        .get(2)
        .map_or("1,8,32", String::as_str)
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dump = args.get(3);
    let corpus = ingest(corpus_path.as_ref(), &IngestOptions::default())?;
    let loaded = cartridge_runtime::loader::load_default(&Device::Cpu)?;
    let vocab = loaded.config.vocab_size;
    let mut backend = LocalBackend::new(loaded)?;

    // Top-k extraction cost per answer token, measured on a random vocabulary-sized row.
    let row: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
        .collect();
    let t0 = Instant::now();
    let reps = 200;
    for _ in 0..reps {
        std::hint::black_box(cartridge_runtime::generate::top_logprobs(&row, 20));
    }
    let topk_secs = t0.elapsed().as_secs_f64() / reps as f64;
    println!(
        "top_logprobs(k=20) over {vocab} logits: {:.3} ms",
        topk_secs * 1e3
    );

    let mut runs = Vec::new();
    for b in batches {
        let out = tempfile::tempdir()?;
        let cfg = SynthesisConfig {
            num_conversations: b as u64,
            batch: b,
            chunk_min_tokens: 512,
            chunk_max_tokens: 512,
            max_user_tokens: 48,
            max_answer_tokens: 96,
            // A different seed per run: each run prefills its own chunk.
            seed: b as u64,
            ..SynthesisConfig::default()
        };
        let mut recording = Recording {
            inner: &mut backend,
            answers: Vec::new(),
        };
        let s = synthesize(&cfg, &mut recording, &corpus, out.path(), false, |_| {})?;
        let answers = std::mem::take(&mut recording.answers);
        let t = s.timings;
        let prefix = t.prefix_secs;
        let topk = topk_secs * s.answer_tokens as f64;
        let answer_secs: f64 = answers.iter().map(|c| c.secs).sum();
        let answer_generated: usize = answers.iter().map(|c| c.generated).sum();
        println!(
            "batch {b:>2}: {} conversations, {} answer tokens in {:.1} s = {:.1} answer tok/s; \
             shared prefill {:.1} s ({:.0}%), prompt prefill {:.1} s ({:.0}%), decode {:.1} s \
             ({:.0}%, of which top-k ~{:.2} s); answer role alone {:.1} s = {:.1} tok/s",
            s.written,
            s.answer_tokens,
            s.elapsed_secs,
            s.answer_tokens_per_sec,
            prefix,
            100.0 * prefix / s.elapsed_secs,
            t.prompt_secs,
            100.0 * t.prompt_secs / s.elapsed_secs,
            t.decode_secs,
            100.0 * t.decode_secs / s.elapsed_secs,
            topk,
            answer_secs,
            answer_generated as f64 / answer_secs,
        );
        let recs = cartridge_formats::dataset::Dataset::open(
            out.path(),
            cartridge_formats::dataset::ReadOptions::default(),
        )?
        .records()?;
        if let Some(r) = recs.first() {
            println!(
                "  sample [{}] user: {:?}",
                r.seed_kind, r.messages[0].content
            );
            println!("  sample assistant: {:?}", r.messages[1].content);
        }
        runs.push(json!({
            "batch": b,
            "conversations": s.written,
            "answer_tokens": s.answer_tokens,
            "elapsed_secs": s.elapsed_secs,
            "answer_tokens_per_sec": s.answer_tokens_per_sec,
            "timings": t,
            "topk_secs_estimate": topk,
            "answer_calls": answers.iter().map(|c| json!({
                "shared": c.shared,
                "prompts": c.requests.iter().map(|r| &r.prompt).collect::<Vec<_>>(),
                "max_tokens": c.requests.iter().map(|r| r.max_tokens).collect::<Vec<_>>(),
                "temperature": c.requests.first().map_or(0.0, |r| r.temperature),
                "top_k": c.requests.first().map_or(0, |r| r.top_logprobs),
                "secs": c.secs,
                "generated": c.generated,
            })).collect::<Vec<_>>(),
        }));
    }
    if let Some(path) = dump {
        let doc = json!({
            "stop_tokens": backend.info().stop_tokens,
            "topk_ms": topk_secs * 1e3,
            "runs": runs,
        });
        std::fs::write(path, serde_json::to_vec(&doc)?)?;
        println!("wrote {path}");
    }
    Ok(())
}
