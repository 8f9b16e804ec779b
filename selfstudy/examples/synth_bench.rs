//! Self-study throughput on the default model: answer tokens/s with 1, 8 and 32 conversations
//! per chunk, and where the time goes (shared-prefix prefill vs per-request prefill + decode, and
//! an estimate of top-k extraction from a timed `top_logprobs` over a vocabulary-sized row).
//!
//! `cargo run --release -p cartridge-selfstudy --example synth_bench -- [CORPUS] [BATCHES]`
//! (CORPUS defaults to `formats/SPEC.md`, BATCHES to `1,8,32`).

use std::time::Instant;

use candle_core::Device;
use cartridge_selfstudy::corpus::{ingest, IngestOptions};
use cartridge_selfstudy::local::LocalBackend;
use cartridge_selfstudy::{synthesize, SynthesisConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let corpus_path = args.get(1).map_or("formats/SPEC.md", String::as_str);
    let batches: Vec<usize> = args
        .get(2)
        .map_or("1,8,32", String::as_str)
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
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
        let s = synthesize(&cfg, &mut backend, &corpus, out.path(), false, |_| {})?;
        let t = s.timings;
        let prefix = t.prefix_secs;
        let topk = topk_secs * s.answer_tokens as f64;
        println!(
            "batch {b:>2}: {} conversations, {} answer tokens in {:.1} s = {:.1} answer tok/s; \
             shared prefill {:.1} s ({:.0}%), prompt prefill {:.1} s ({:.0}%), decode {:.1} s \
             ({:.0}%, of which top-k ~{:.2} s)",
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
    }
    Ok(())
}
