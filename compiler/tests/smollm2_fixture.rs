//! The compiler's loss and Adam against the SmolLM2-135M reference training run (5 Adam steps of a
//! 16-token cartridge, computed by Hugging Face transformers on torch; the `train_check` section of
//! `runtime/tests/fixtures/smollm2_reference.json`, read here as data).
//!
//! The model comes from `scripts/fetch-model.sh` (or `$CARTRIDGE_MODEL`). Without it the test
//! prints a note and passes, except under CI (`CI` set), where a missing model is a failure.

use std::time::Instant;

use candle_core::{Device, Tensor};
use cartridge_compiler::data::Example;
use cartridge_compiler::objective::{loss_sum, Batch};
use cartridge_compiler::params::{KvParams, Params};
use cartridge_compiler::{Adam, AdamParams, Objective};
use cartridge_runtime::{loader, Path};
use serde_json::Value;

const FIXTURE: &str = include_str!("../../runtime/tests/fixtures/smollm2_reference.json");
/// Loss agreement with the reference (the runtime's own train_check uses the same bound).
const LOSS_TOL: f64 = 2e-4;

fn model_path() -> Option<std::path::PathBuf> {
    let path = loader::default_model_path().expect("a default model path");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "model {} is missing under CI: run scripts/fetch-model.sh before the tests",
            path.display()
        );
    }
    eprintln!(
        "skipped: model {} not found; run scripts/fetch-model.sh",
        path.display()
    );
    None
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[test]
fn loss_and_adam_reproduce_the_reference_losses() {
    let Some(path) = model_path() else { return };
    let fixture: Value = serde_json::from_str(FIXTURE).expect("fixture JSON");
    let c = &fixture["train_check"];
    let loaded = loader::load(&path, &Device::Cpu).expect("model loads");
    let net = loaded.transformer().expect("forward");
    let doc = u32s(&c["doc_ids"]);
    let query = u32s(&c["query_ids"]);
    let p = c["p"].as_u64().expect("p") as usize;
    let n = query.len();
    // The fixture's targets are the teacher's top-20 at every query position i, i.e. the
    // distribution predicted by row i (the last one predicts past the query).
    let rows: Vec<Vec<u32>> = c["teacher_top20_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(u32s)
        .collect();
    let lps: Vec<Vec<f64>> = c["teacher_top20_logprobs"]
        .as_array()
        .expect("lps")
        .iter()
        .map(f64s)
        .collect();
    let ex = Example {
        tokens: query.clone(),
        rows: (0..n as u32).collect(),
        next: vec![0; n],
        topk_ids: rows.iter().flatten().copied().collect(),
        topk_logprobs: lps.iter().flatten().map(|&x| x as f32).collect(),
        k: 20,
    };
    let batch = Batch::new(&[&ex], Objective::Distill, &Device::Cpu).expect("batch");

    let init = net.prefix_kv(None, &doc[..p]).expect("init");
    let params = Params::Kv(KvParams::new(&init, 1).expect("params"));
    let vars = params.vars();
    let mut adam = Adam::new(vars.clone(), AdamParams::default()).expect("adam");
    let want = f64s(&c["losses_before_each_step"]);
    let mut got = Vec::new();
    let t0 = Instant::now();
    for _ in 0..want.len() {
        let prefix = params.stack().unwrap().resolve(&net, Path::Train).unwrap();
        let loss = loss_sum(&net, prefix.as_ref(), &batch, Path::Train)
            .unwrap()
            .affine(1.0 / n as f64, 0.0)
            .unwrap();
        got.push(f64::from(loss.to_scalar::<f32>().unwrap()));
        let store = loss.backward().unwrap();
        let grads: Vec<Option<Tensor>> = vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect();
        assert!(grads.iter().all(Option::is_some), "a gradient is missing");
        adam.update(&grads, 2e-2).unwrap();
    }
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    eprintln!(
        "losses {got:?}\nreference {want:?}\nmax |diff| {worst:.2e} ({:.2} s for 5 steps)",
        t0.elapsed().as_secs_f64()
    );
    assert!(worst < LOSS_TOL, "max loss difference {worst}");
    assert!(
        got[4] < got[0],
        "the reference run's loss falls; ours must too"
    );
}
