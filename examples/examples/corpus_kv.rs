//! Make a cartridge from the KV of a text's first `p` tokens and use it.
//!
//! ```sh
//! cargo run --release -p cartridge-examples --example corpus_kv -- TEXT_FILE OUT.cart [P] [DEVICE] [first|selected|fitted|refined]
//! ```
//!
//! DEVICE is `cpu` (the default), `cuda` or `cuda:N` (built with `--features cuda`). `selected`
//! keeps instead, per layer and KV head, the `p` keys of the whole text that best cover what a
//! question after it reads (`cartridge train --init selected-keys` without the training), and `fitted` the same keys
//! with their values refitted (`--init selected-fitted`), and `refined` those with their keys then
//! refined by gradient descent (`--init selected-refined`); the equality check below
//! is then skipped, since such a cartridge is no longer the KV of a prompt.
//!
//! The KV of a text, stored post-RoPE at positions 0..p-1, is exactly what a cartridge is; training
//! starts from it by default (DESIGN.md §5). With it in front, the model's next-token distribution
//! after a question equals the distribution with the text itself in the prompt: this program prints
//! the largest difference between the two, which should be at float rounding level.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use cartridge_compiler::init::Fit;
use cartridge_formats::cart::{Compression, Provenance};
use cartridge_formats::fingerprint::sha256_hex;
use cartridge_runtime::cartridge_file::{load_cartridge, save_cartridge};
use cartridge_runtime::{device, loader, Logits, Path, Transformer};

fn main() -> Result<()> {
    cartridge_runtime::ops::pin_thread_count();
    cartridge_runtime::malloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (text_path, out) = match args.as_slice() {
        [t, o, ..] => (PathBuf::from(t), PathBuf::from(o)),
        _ => bail!(
            "usage: corpus_kv TEXT_FILE OUT.cart [P] [DEVICE] [first|selected|fitted|refined]"
        ),
    };
    let p: usize = match args.get(2) {
        Some(s) => s.parse().context("P must be a number")?,
        None => 256,
    };
    let device = device::parse(args.get(3).map_or("cpu", String::as_str))?.open()?;
    // (selected, values fitted)
    let (selected, fit) = match args.get(4).map(String::as_str) {
        None | Some("first") => (false, Fit::None),
        Some("selected") => (true, Fit::None),
        Some("fitted") => (true, Fit::Values),
        Some("refined") => (true, Fit::Refined),
        Some(other) => {
            bail!("unknown initialisation {other:?}: first, selected, fitted or refined")
        }
    };
    let loaded = loader::load_default(&device)?;
    let model = Transformer::load(loaded.var_builder(), &loaded.config)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("reading {}", text_path.display()))?;
    let ids = loaded.tokenizer.encode(&text, false)?;
    if ids.len() < p {
        bail!(
            "{} has {} tokens, fewer than p = {p}",
            text_path.display(),
            ids.len()
        );
    }
    let prefix = &ids[..p];

    let kv = if selected {
        cartridge_compiler::init::select_corpus_kv(&model, p, &ids, fit)?
    } else {
        model.prefix_kv(None, prefix)?
    };
    let init = match (selected, fit) {
        (true, Fit::Refined) => "selected_refined",
        (true, Fit::Values) => "selected_fitted",
        (true, Fit::None) => "selected_keys",
        _ => "first_tokens",
    };
    let provenance = Provenance {
        created: cartridge_formats::time::now_rfc3339(),
        corpus_digest: Some(sha256_hex(text.as_bytes())),
        training: serde_json::json!({ "init": init, "tokens": p, "steps": 0 }),
        ..Provenance::default()
    };
    save_cartridge(
        &out,
        &kv,
        1,
        &loaded.fingerprint,
        provenance,
        Compression::None,
    )?;
    println!(
        "wrote {} ({p} {} of {})",
        out.display(),
        if selected { "selected keys" } else { "tokens" },
        text_path.display()
    );
    if selected {
        return Ok(());
    }

    // Use it: the question after the cartridge vs after the text itself.
    let cart = load_cartridge(&out, &loaded.fingerprint, &device)?;
    let question = loaded
        .tokenizer
        .encode("\nQuestion: what is this text about?\nAnswer:", false)?;
    let q = Tensor::from_vec(question.clone(), (1, question.len()), &device)?;
    let with_cart = model.forward(Some(&cart), None, &q, Logits::Last, Path::Infer)?;
    let full: Vec<u32> = prefix.iter().chain(&question).copied().collect();
    let f = Tensor::from_vec(full.clone(), (1, full.len()), &device)?;
    let with_text = model.forward(None, None, &f, Logits::Last, Path::Infer)?;
    let diff = (with_cart - with_text)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("max |logit difference| cartridge vs text in prompt: {diff:.2e}");
    Ok(())
}
