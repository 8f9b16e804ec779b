//! The same checks on every device this build can open (`testing::test_devices`: the CPU, and
//! `cuda:0` in a CUDA build on a GPU machine), and for the bf16 compute path against f32:
//!
//! - prefix equivalence: the continuation's logits after the prefix's own KV used as a cartridge
//!   equal those of the full sequence, and a device's logits equal the CPU's (f32);
//! - the full training loss's gradient matches finite differences (f64) on the device's loss
//!   path (the fused CPU op, or the block loop elsewhere), and the block loop matches autograd;
//! - bf16 compute with f32 parameters: logits, loss and gradient within bf16 tolerance of f32;
//! - a tiny build trains on each device in f32 and bf16, and the f32 result matches the CPU's.
//!
//! On a CPU-only machine the CUDA half is simply absent; `scripts/gpu-check.sh` sets
//! `CARTRIDGE_REQUIRE_CUDA=1` so that on a GPU machine it cannot be.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use cartridge_compiler::data::Example;
use cartridge_compiler::fused_loss::blockwise_loss_sum;
use cartridge_compiler::objective::{loss_sum, unfused_target_loss_sum, Batch};
use cartridge_compiler::params::{KvParams, Params};
use cartridge_compiler::{
    train, ComputeDtype, ModelRef, Objective, Progress, RunOptions, TrainConfig, TrainData,
};
use cartridge_formats::cart::{self, CartFile};
use cartridge_runtime::cartridge_file::load_cartridge;
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::testing::test_devices;
use cartridge_runtime::{Path, PrefixKv};
use common::{corpus, max_abs_diff, tiny_model, tiny_model_on, tokens, toy_data, VOCAB};

fn ids(toks: &[u32], device: &Device) -> Tensor {
    Tensor::from_vec(toks.to_vec(), (1, toks.len()), device).unwrap()
}

fn examples(data: &TrainData) -> Vec<Example> {
    data.records
        .iter()
        .map(|r| Example::from_record(r, 1024, VOCAB).unwrap().unwrap())
        .collect()
}

/// The loss (mean per target) and the gradients of every trainable variable, in f64 on the CPU.
fn loss_and_grads(model: &Transformer, params: &Params, batch: &Batch) -> (f64, Vec<Vec<f64>>) {
    let prefix = params
        .stack_in(model.dtype())
        .unwrap()
        .resolve(model, Path::Train)
        .unwrap();
    let loss = loss_sum(model, prefix.as_ref(), batch, Path::Train)
        .unwrap()
        .affine(1.0 / batch.targets as f64, 0.0)
        .unwrap();
    let store = loss.backward().unwrap();
    let grads = params
        .vars()
        .iter()
        .map(|v| {
            store
                .get(v.as_tensor())
                .expect("a gradient reaches every variable")
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let loss = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (loss, grads)
}

fn cosine(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    dot / (na.sqrt() * nb.sqrt())
}

#[test]
fn prefix_equivalence_and_cpu_parity_on_every_device() {
    let (cpu_model, _) = tiny_model(11, "model-a");
    let toks = tokens(5, 14);
    let (head, tail) = toks.split_at(6);
    let cpu_logits = cpu_model
        .forward(
            None,
            None,
            &ids(&toks, &Device::Cpu),
            Logits::All,
            Path::Infer,
        )
        .unwrap();
    for device in test_devices() {
        let (model, _) = tiny_model_on(11, "model-a", DType::F32, &device);
        let full = model
            .forward(None, None, &ids(&toks, &device), Logits::All, Path::Infer)
            .unwrap();
        let parity = max_abs_diff(&full, &cpu_logits);
        assert!(
            parity < 1e-4,
            "{device:?}: logits differ from the CPU's by {parity}"
        );
        for path in [Path::Infer, Path::Train] {
            let cart = model.prefix_kv(None, head).unwrap();
            let after = model
                .forward(Some(&cart), None, &ids(tail, &device), Logits::All, path)
                .unwrap();
            let expected = full.narrow(1, head.len(), tail.len()).unwrap();
            let diff = max_abs_diff(&after, &expected);
            assert!(
                diff < 1e-4,
                "{device:?} {path:?}: cartridge logits differ by {diff}"
            );
        }
    }
}

#[test]
fn bf16_forward_stays_within_bf16_tolerance_of_f32() {
    let (cpu_model, _) = tiny_model(11, "model-a");
    let toks = tokens(6, 12);
    let (head, tail) = toks.split_at(5);
    let cart = cpu_model.prefix_kv(None, head).unwrap();
    let reference = cpu_model
        .forward(
            Some(&cart),
            None,
            &ids(tail, &Device::Cpu),
            Logits::All,
            Path::Infer,
        )
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    for device in test_devices() {
        let (model, _) = tiny_model_on(11, "model-a", DType::BF16, &device);
        // An f32 cartridge, cast to the model's dtype as the trainer and the runtime do.
        let cart = PrefixKv::new(
            cart.layers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_device(&device).unwrap().to_dtype(DType::BF16).unwrap(),
                        v.to_device(&device).unwrap().to_dtype(DType::BF16).unwrap(),
                    )
                })
                .collect(),
        )
        .unwrap();
        for path in [Path::Infer, Path::Train] {
            let logits = model
                .forward(Some(&cart), None, &ids(tail, &device), Logits::All, path)
                .unwrap();
            assert_eq!(logits.dtype(), DType::BF16);
            // bf16 keeps 8 bits of mantissa: a few units of 2^-8 of the logits' scale, after
            // three layers of rounding.
            let diff = max_abs_diff(&logits, &reference) / scale;
            assert!(
                diff < 3e-2,
                "{device:?} {path:?}: bf16 logits off by {diff} of their scale"
            );
        }
    }
}

#[test]
fn loss_gradient_matches_finite_differences_on_every_device() {
    const EPS: f64 = 1e-5;
    let (model32, _) = tiny_model(11, "model-a");
    let data = toy_data(&model32, 3, 6);
    let exs = examples(&data);
    let refs: Vec<&Example> = exs.iter().collect();
    for device in test_devices() {
        let (model, _) = tiny_model_on(11, "model-a", DType::F64, &device);
        let batch = Batch::new(&refs, Objective::Distill, &device).unwrap();
        let init = model.prefix_kv(None, &corpus()[..5]).unwrap();
        let params = Params::Kv(KvParams::new(&init, 1).unwrap());
        let vars = params.vars();
        let (_, grads) = loss_and_grads(&model, &params, &batch);
        let loss_at = |params: &Params| loss_and_grads(&model, params, &batch).0;
        let last = vars.len() - 1;
        for vi in [0, last] {
            let var = &vars[vi];
            let base: Vec<f64> = var
                .as_tensor()
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let shape = var.dims().to_vec();
            let set = |v: Vec<f64>| {
                var.set(&Tensor::from_vec(v, shape.as_slice(), &device).unwrap())
                    .unwrap()
            };
            let (mut num, mut den) = (0f64, 0f64);
            for i in [0, base.len() / 3, base.len() - 1] {
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[i] += d;
                    set(v);
                    let l = loss_at(&params);
                    set(base.clone());
                    l
                };
                let fd = (at(EPS) - at(-EPS)) / (2.0 * EPS);
                num += (fd - grads[vi][i]).powi(2);
                den += fd * fd;
            }
            assert!(
                den > 1e-16,
                "{device:?} variable {vi}: zero numeric gradient, bad test"
            );
            let rel = (num / den).sqrt();
            assert!(
                rel < 1e-4,
                "{device:?} variable {vi}: relative gradient error {rel}"
            );
        }
    }
}

#[test]
fn block_loop_loss_matches_autograd() {
    // More targets than one block of rows (128), so the loop's seams are crossed.
    let (model, _) = tiny_model(11, "model-a");
    let data = toy_data(&model, 24, 8);
    let exs = examples(&data);
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::new(&refs, Objective::Distill, &Device::Cpu).unwrap();
    assert!(batch.targets > 128, "{} targets: bad test", batch.targets);
    let hidden = model.config().hidden_size;
    let rows =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch.targets, hidden), &Device::Cpu).unwrap())
            .unwrap();
    let unit = |t: &Tensor| t.affine(1.0 / batch.targets as f64, 0.0).unwrap();
    let want = unit(&unfused_target_loss_sum(&model, rows.as_tensor(), &batch).unwrap());
    let got = unit(
        &blockwise_loss_sum(
            model.lm_head_weight(),
            &batch.ids,
            &batch.weights,
            &batch.weight_sums,
            batch.tail_class,
            rows.as_tensor(),
        )
        .unwrap(),
    );
    let (w, g) = (
        want.to_scalar::<f32>().unwrap(),
        got.to_scalar::<f32>().unwrap(),
    );
    assert!(((w - g) / w).abs() < 1e-5, "loss {g} vs autograd {w}");
    let gw = want
        .backward()
        .unwrap()
        .get(rows.as_tensor())
        .unwrap()
        .clone();
    let gg = got
        .backward()
        .unwrap()
        .get(rows.as_tensor())
        .unwrap()
        .clone();
    let scale = gw
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let diff = max_abs_diff(&gw, &gg) / scale;
    assert!(diff < 1e-5, "gradient differs by {diff} of its scale");
}

#[test]
fn bf16_loss_and_gradient_track_f32() {
    let (model32, _) = tiny_model(11, "model-a");
    let data = toy_data(&model32, 6, 8);
    let exs = examples(&data);
    let refs: Vec<&Example> = exs.iter().collect();
    let init = model32.prefix_kv(None, &corpus()[..8]).unwrap();
    let batch = Batch::new(&refs, Objective::Distill, &Device::Cpu).unwrap();
    let (loss32, grads32) = loss_and_grads(
        &model32,
        &Params::Kv(KvParams::new(&init, 1).unwrap()),
        &batch,
    );
    for device in test_devices() {
        let (model, _) = tiny_model_on(11, "model-a", DType::BF16, &device);
        let batch = Batch::new(&refs, Objective::Distill, &device).unwrap();
        // f32 master parameters on the device; the forward casts them to bf16.
        let params = Params::Kv(KvParams::new(&init.to_device(&device).unwrap(), 1).unwrap());
        assert!(params.vars().iter().all(|v| v.dtype() == DType::F32));
        let (loss, grads) = loss_and_grads(&model, &params, &batch);
        let rel = ((loss - loss32) / loss32).abs();
        assert!(rel < 1e-2, "{device:?}: bf16 loss {loss} vs f32 {loss32}");
        let cos = cosine(&grads, &grads32);
        assert!(
            cos > 0.99,
            "{device:?}: bf16 gradient's cosine to f32's is {cos}"
        );
    }
}

fn build_cfg(compute_dtype: ComputeDtype) -> TrainConfig {
    TrainConfig {
        tokens: 8,
        frozen_tokens: 1,
        lr: 2e-2,
        batch_size: 4,
        micro_batch: 2,
        // 40 steps: since the selection reads keys as a question after the corpus would, the
        // selected start is closer to the teacher (2.37 against 2.82), and 20 steps lowered the
        // held-out loss by 9%, short of the 10% this test asks.
        max_steps: Some(40),
        seed: 7,
        eval_conversations: 4,
        eval_every: 0,
        checkpoint_every: 0,
        compute_dtype,
        ..TrainConfig::default()
    }
}

/// Train the tiny model on `device` in `dtype`: (first held-out loss, last held-out loss, the
/// trained cartridge's stored dtype).
fn tiny_build(device: &Device, dtype: ComputeDtype, data: &TrainData) -> (f64, f64, cart::DType) {
    let (model, fp) = tiny_model_on(11, "model-a", dtype.dtype(), device);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("toy.cart");
    let mut evals = Vec::new();
    let opts = RunOptions {
        created: Some("2026-01-01T00:00:00Z".into()),
        ..RunOptions::default()
    };
    train(
        &build_cfg(dtype),
        ModelRef {
            transformer: &model,
            fingerprint: &fp,
        },
        data,
        Some(&corpus()),
        &out,
        &opts,
        &mut |p| {
            if let Progress::Eval(e) = p {
                evals.push(e.loss);
            }
        },
    )
    .expect("training runs");
    let stored = CartFile::open(&out).unwrap().header().dtype;
    // It loads back for the model it was trained for.
    load_cartridge(&out, &fp, device).unwrap();
    (evals[0], *evals.last().unwrap(), stored)
}

#[test]
fn tiny_build_trains_on_every_device_in_f32_and_bf16() {
    let (model32, _) = tiny_model(11, "model-a");
    let data = toy_data(&model32, 16, 8);
    let (cpu_first, cpu_last, _) = tiny_build(&Device::Cpu, ComputeDtype::F32, &data);
    assert!(
        cpu_last < 0.9 * cpu_first,
        "CPU f32: {cpu_first} -> {cpu_last}"
    );
    for device in test_devices() {
        let (first, last, stored) = tiny_build(&device, ComputeDtype::F32, &data);
        assert_eq!(stored, cart::DType::F32);
        // Same data, order and arithmetic up to summation order: the same run.
        let rel = ((last - cpu_last) / cpu_last).abs();
        assert!(
            rel < 1e-3,
            "{device:?} f32: final loss {last} vs CPU {cpu_last}"
        );
        assert!(last < 0.9 * first);
        let (first16, last16, stored16) = tiny_build(&device, ComputeDtype::Bf16, &data);
        // The master parameters, and so the cartridge, are f32 whatever the compute dtype.
        assert_eq!(stored16, cart::DType::F32);
        assert!(
            last16 < 0.9 * first16,
            "{device:?} bf16: {first16} -> {last16}"
        );
        let rel = ((last16 - cpu_last) / cpu_last).abs();
        assert!(
            rel < 1e-2,
            "{device:?} bf16: final loss {last16} vs f32 {cpu_last}"
        );
    }
}
