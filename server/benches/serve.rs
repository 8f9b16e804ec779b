//! Serving benchmark: requests/s, generated tokens/s and time to first token at several numbers of
//! concurrent clients, for the same questions asked with a cartridge (256 KV slots) and with the
//! corpus in the prompt (ICL, 2048 tokens), plus resident memory per concurrent sequence. All
//! measured in one run over real HTTP on loopback against an in-process `cartridge serve`.
//!
//! ```text
//! cargo bench -p cartridge-server --bench serve                       # defaults below
//! cargo bench -p cartridge-server --bench serve -- --concurrency 1,8,32 --requests-per-client 2 \
//!     --max-tokens 32 --cartridge-tokens 256 --icl-tokens 2048 --corpus examples/corpora/quenmar
//! ```
//! Options: `--model PATH` (default model otherwise), `--quantized`, `--json` (one JSON object per
//! row instead of the table). The cartridge is the KV of the corpus's first `--cartridge-tokens`
//! tokens: its cost is what is measured here, not its quality. Each row runs against a fresh
//! server process (this binary re-run with `--serve-child`); resident memory per sequence is that
//! process's (peak RSS during the row - RSS of the idle server) / concurrency, so it includes the
//! forward's temporaries; `KV/seq` is the f32 KV cache each sequence holds (its prompt and answer,
//! plus its share of the cartridge, which is stored once). Run on a quiet machine.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use cartridge_formats::cart::{Compression, Provenance};
use cartridge_runtime::cartridge_file::save_cartridge;
use cartridge_runtime::loader::{self, LoadedModel};
use cartridge_server::{EngineConfig, ServerConfig};
use serde_json::{json, Value};

struct Options {
    model: Option<PathBuf>,
    quantized: bool,
    corpus: PathBuf,
    concurrency: Vec<usize>,
    requests_per_client: usize,
    max_tokens: usize,
    cartridge_tokens: usize,
    icl_tokens: usize,
    json: bool,
    /// Internal: run only the server, over this cartridge folder (the parent measures it).
    serve_child: Option<PathBuf>,
    max_batch: usize,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        model: None,
        quantized: false,
        corpus: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/corpora/quenmar"
        )),
        concurrency: vec![1, 8, 32],
        requests_per_client: 2,
        max_tokens: 32,
        cartridge_tokens: 256,
        icl_tokens: 2048,
        json: false,
        serve_child: None,
        max_batch: 32,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            "--model" => o.model = Some(PathBuf::from(value()?)),
            "--quantized" => o.quantized = true,
            "--corpus" => o.corpus = PathBuf::from(value()?),
            "--concurrency" => {
                o.concurrency = value()?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--concurrency takes a list like 1,8,32")?
            }
            "--requests-per-client" => o.requests_per_client = value()?.parse()?,
            "--max-tokens" => o.max_tokens = value()?.parse()?,
            "--cartridge-tokens" => o.cartridge_tokens = value()?.parse()?,
            "--icl-tokens" => o.icl_tokens = value()?.parse()?,
            "--json" => o.json = true,
            "--serve-child" => o.serve_child = Some(PathBuf::from(value()?)),
            "--max-batch" => o.max_batch = value()?.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    if o.concurrency.is_empty() || o.concurrency.contains(&0) || o.requests_per_client == 0 {
        bail!("concurrency and requests per client must be at least 1");
    }
    Ok(o)
}

/// The corpus text: a file, or a folder's files in name order.
fn read_corpus(path: &PathBuf) -> Result<String> {
    if path.is_file() {
        return Ok(std::fs::read_to_string(path)?);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut text = String::new();
    for f in files {
        text.push_str(&std::fs::read_to_string(&f)?);
        text.push_str("\n\n");
    }
    Ok(text)
}

/// Resident memory of process `pid`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One streamed request: (time to first token, prompt tokens, generated tokens).
fn streamed(base: &str, body: &Value) -> Result<(f64, u64, u64)> {
    let start = Instant::now();
    let resp = ureq::post(&format!("{base}/v1/chat/completions"))
        .send_json(body.clone())
        .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    let mut ttft = None;
    let mut tokens = 0;
    let mut prompt = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            bail!("server error: {v}");
        }
        if ttft.is_none() && v["choices"][0]["delta"].get("content").is_some() {
            ttft = Some(start.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
            prompt = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        }
    }
    Ok((
        ttft.unwrap_or_else(|| start.elapsed().as_secs_f64()),
        prompt,
        tokens,
    ))
}

struct Row {
    mode: &'static str,
    clients: usize,
    requests: usize,
    secs: f64,
    tokens: u64,
    ttft_mean: f64,
    ttft_p50: f64,
    ttft_max: f64,
    rss_per_seq_mib: f64,
    /// Mean prompt + generated tokens per request (what each sequence's KV cache holds).
    seq_tokens: f64,
}

fn run_one(
    base: &str,
    server_pid: u32,
    mode: &'static str,
    clients: usize,
    per_client: usize,
    make_body: &(dyn Fn(usize) -> Value + Sync),
) -> Result<Row> {
    // The idle server's memory, then a warm-up request (first-touch page faults, the cartridge
    // load) outside the timings; memory is counted from the idle baseline.
    let before = rss_kib(server_pid);
    streamed(base, &make_body(usize::MAX))?;
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(server_pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let results = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let results = &results;
            s.spawn(move || {
                for k in 0..per_client {
                    let r = streamed(base, &make_body(c * per_client + k));
                    if let Ok(mut v) = results.lock() {
                        v.push(r);
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let results = results.into_inner().map_err(|_| anyhow::anyhow!("lock"))?;
    let mut ttfts = Vec::new();
    let mut tokens = 0;
    let mut seq_tokens = 0;
    for r in results {
        let (t, p, n) = r?;
        ttfts.push(t);
        tokens += n;
        seq_tokens += p + n;
    }
    ttfts.sort_by(f64::total_cmp);
    let peak = peak.load(Ordering::Relaxed);
    Ok(Row {
        mode,
        clients,
        requests: ttfts.len(),
        secs,
        tokens,
        ttft_mean: ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64,
        ttft_p50: ttfts.get(ttfts.len() / 2).copied().unwrap_or(0.0),
        ttft_max: ttfts.last().copied().unwrap_or(0.0),
        rss_per_seq_mib: peak.saturating_sub(before) as f64 / 1024.0 / clients as f64,
        seq_tokens: seq_tokens as f64 / ttfts.len().max(1) as f64,
    })
}

/// The server side of one row: load the model, serve `dir`, print the address, run until killed.
fn serve_child(o: &Options, path: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let loaded = loader::load(path, &Device::Cpu)?;
    let model = if o.quantized {
        loaded.quantized_transformer()?
    } else {
        loaded.transformer()?
    };
    let mut config = ServerConfig::new(dir.to_path_buf());
    config.addr = "127.0.0.1:0".parse()?;
    config.engine = EngineConfig {
        max_batch: o.max_batch,
        queue: 4 * o.max_batch,
        ..EngineConfig::default()
    };
    config.limits.max_prompt_tokens = o.icl_tokens + 512;
    let server = cartridge_server::spawn(config, &loaded, model)?;
    println!("listening on http://{}", server.addr());
    std::io::stdout().flush()?;
    server.wait()?;
    Ok(())
}

/// A server process for one row, killed when dropped.
struct ChildServer {
    child: Child,
    base: String,
}

impl ChildServer {
    fn start(
        o: &Options,
        model: &std::path::Path,
        carts: &std::path::Path,
        max_batch: usize,
    ) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-child")
            .arg(carts)
            .arg("--model")
            .arg(model)
            .args(["--max-batch", &max_batch.to_string()])
            .args(["--icl-tokens", &o.icl_tokens.to_string()])
            .stdout(Stdio::piped());
        if o.quantized {
            cmd.arg("--quantized");
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let base = match line.trim().strip_prefix("listening on ") {
            Some(b) => b.to_string(),
            None => {
                let _ = child.kill();
                bail!("the server process did not start: {line:?}");
            }
        };
        Ok(Self { child, base })
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() -> Result<()> {
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    let o = parse_args()?;
    let path = loader::resolve_model_path(o.model.as_deref())?;
    if let Some(dir) = &o.serve_child {
        return serve_child(&o, &path, dir);
    }
    let loaded: LoadedModel = loader::load(&path, &Device::Cpu)?;
    let tokenizer = loaded.tokenizer.clone();
    let corpus_ids = tokenizer.encode(&read_corpus(&o.corpus)?, false)?;
    let need = o.icl_tokens.max(o.cartridge_tokens);
    if corpus_ids.len() < need {
        bail!(
            "the corpus has {} tokens, {need} are needed",
            corpus_ids.len()
        );
    }
    let icl_text = tokenizer.decode(&corpus_ids[..o.icl_tokens], true)?;
    let model = if o.quantized {
        loaded.quantized_transformer()?
    } else {
        loaded.transformer()?
    };
    let kv = model.prefix_kv(None, &corpus_ids[..o.cartridge_tokens])?;
    drop(model);
    let carts = tempfile::tempdir()?;
    save_cartridge(
        &carts.path().join("corpus.cart"),
        &kv,
        1,
        &loaded.fingerprint,
        Provenance::default(),
        Compression::None,
    )?;
    // f32 K and V per token over all layers: the KV cache a sequence's tokens occupy.
    let c = &loaded.config;
    let kv_bytes_per_token = (c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4) as f64;
    drop((kv, loaded));
    let max_tokens = o.max_tokens;
    let question = |i: usize| format!("Question {i}: what does the text say about the harbour?");
    let cartridge_body = move |i: usize| {
        json!({"messages": [{"role": "user", "content": question(i)}], "max_tokens": max_tokens,
               "temperature": 0, "stream": true, "cartridges": [{"id": "corpus"}]})
    };
    let icl_body = |i: usize| {
        json!({"messages": [{"role": "system", "content": icl_text},
                            {"role": "user", "content": question(i)}],
               "max_tokens": max_tokens, "temperature": 0, "stream": true})
    };
    if !o.json {
        println!(
            "model {} ({}), corpus {}: cartridge {} slots vs ICL {} tokens, {} new tokens per request",
            path.display(),
            if o.quantized { "quantised decode" } else { "f32" },
            o.corpus.display(),
            o.cartridge_tokens,
            o.icl_tokens,
            o.max_tokens
        );
        println!(
            "{:<10} {:>7} {:>8} {:>9} {:>11} {:>10} {:>9} {:>9} {:>12} {:>11}",
            "mode",
            "clients",
            "requests",
            "req/s",
            "gen tok/s",
            "TTFT mean",
            "TTFT p50",
            "TTFT max",
            "RSS/seq MiB",
            "KV/seq MiB"
        );
    }
    for &clients in &o.concurrency {
        for (mode, body) in [
            (
                "cartridge",
                &cartridge_body as &(dyn Fn(usize) -> Value + Sync),
            ),
            ("icl", &icl_body as &(dyn Fn(usize) -> Value + Sync)),
        ] {
            // A fresh server process per row: its resident memory is measured alone, and no row
            // inherits another's allocator state.
            let server = ChildServer::start(&o, &path, carts.path(), clients)?;
            let r = run_one(
                &server.base,
                server.child.id(),
                mode,
                clients,
                o.requests_per_client,
                body,
            )?;
            drop(server);
            // KV per sequence: its own tokens, plus its share of the cartridge (stored once).
            let shared = if mode == "cartridge" {
                o.cartridge_tokens as f64 / clients as f64
            } else {
                0.0
            };
            let kv_mib = (r.seq_tokens + shared) * kv_bytes_per_token / (1024.0 * 1024.0);
            if o.json {
                println!(
                    "{}",
                    json!({"mode": r.mode, "clients": r.clients, "requests": r.requests,
                           "seconds": r.secs, "requests_per_s": r.requests as f64 / r.secs,
                           "generated_tokens": r.tokens,
                           "generated_tokens_per_s": r.tokens as f64 / r.secs,
                           "ttft_mean_s": r.ttft_mean, "ttft_p50_s": r.ttft_p50,
                           "ttft_max_s": r.ttft_max, "rss_per_sequence_mib": r.rss_per_seq_mib,
                           "kv_per_sequence_mib": kv_mib})
                );
            } else {
                println!(
                    "{:<10} {:>7} {:>8} {:>9.2} {:>11.1} {:>9.3}s {:>8.3}s {:>8.3}s {:>12.1} {:>11.1}",
                    r.mode,
                    r.clients,
                    r.requests,
                    r.requests as f64 / r.secs,
                    r.tokens as f64 / r.secs,
                    r.ttft_mean,
                    r.ttft_p50,
                    r.ttft_max,
                    r.rss_per_seq_mib,
                    kv_mib
                );
            }
        }
    }
    Ok(())
}
