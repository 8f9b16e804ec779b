//! Finite-difference check of the full training loss (cartridge -> forward -> gathered target rows
//! -> LM head -> top-k cross-entropy, with and without the tail class), in f64 on a tiny model:
//! the analytic gradient of every
//! trainable part must match central differences, and frozen slots must get none.

mod common;

use candle_core::{DType, Device, Tensor};
use cartridge_compiler::data::Example;
use cartridge_compiler::objective::{loss_sum, Batch};
use cartridge_compiler::params::{KvParams, Params};
use cartridge_compiler::Objective;
use cartridge_runtime::Path;
use common::{corpus, tiny_model, tiny_model_dtype, toy_data, VOCAB};

const EPS: f64 = 1e-5;

#[test]
fn full_loss_gradient_matches_finite_differences() {
    for objective in [Objective::Distill, Objective::DistillTail] {
        full_loss_gradient_matches(objective);
    }
}

fn full_loss_gradient_matches(objective: Objective) {
    let (model, _) = tiny_model_dtype(11, "model-a", DType::F64);
    // Teacher top-k from the f32 twin (the same weights): data are data.
    let (model32, _) = tiny_model(11, "model-a");
    let data = toy_data(&model32, 3, 6);
    let exs: Vec<Example> = data
        .records
        .iter()
        .map(|r| Example::from_record(r, 1024, VOCAB).unwrap().unwrap())
        .collect();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::new(&refs, objective, &Device::Cpu).unwrap();
    let init = model.prefix_kv(None, &corpus()[..5]).unwrap();
    let params = Params::Kv(KvParams::new(&init, 1).unwrap());
    let vars = params.vars();
    let loss = |params: &Params| -> Tensor {
        let prefix = params
            .stack()
            .unwrap()
            .resolve(&model, Path::Train)
            .unwrap();
        loss_sum(&model, prefix.as_ref(), &batch, Path::Train)
            .unwrap()
            .affine(1.0 / batch.targets as f64, 0.0)
            .unwrap()
    };
    let grads = loss(&params).backward().unwrap();
    let last = vars.len() - 1;
    for vi in [0, 1, last - 1, last] {
        let var = &vars[vi];
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("a gradient reaches the variable")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let shape = var.dims().to_vec();
        let (mut num, mut den) = (0f64, 0f64);
        for i in [0, 7, base.len() / 2, base.len() - 1] {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = loss(&params).to_scalar::<f64>().unwrap();
                var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                l
            };
            let fd = (at(EPS) - at(-EPS)) / (2.0 * EPS);
            num += (fd - g[i]).powi(2);
            den += fd * fd;
        }
        assert!(
            den > 1e-16,
            "variable {vi}: numeric gradient is zero, bad test"
        );
        let rel = (num / den).sqrt();
        assert!(
            rel < 1e-4,
            "{objective:?}, variable {vi}: relative gradient error {rel}"
        );
    }
}

/// The fused LM-head + loss op gives the autograd formula's loss and prefix gradients.
#[test]
fn fused_loss_matches_autograd() {
    for objective in [Objective::Distill, Objective::DistillTail] {
        fused_loss_matches(objective);
    }
}

fn fused_loss_matches(objective: Objective) {
    use cartridge_compiler::objective::{target_loss_sum, unfused_target_loss_sum};
    use cartridge_runtime::models::Logits;
    let (model, _) = tiny_model(11, "model-a");
    let data = toy_data(&model, 4, 7);
    let exs: Vec<Example> = data
        .records
        .iter()
        .map(|r| Example::from_record(r, 1024, VOCAB).unwrap().unwrap())
        .collect();
    let refs: Vec<&Example> = exs.iter().collect();
    let batch = Batch::new(&refs, objective, &Device::Cpu).unwrap();
    let init = model.prefix_kv(None, &corpus()[..5]).unwrap();
    let params = Params::Kv(KvParams::new(&init, 1).unwrap());
    let vars = params.vars();
    let run = |fused: bool| {
        let prefix = params
            .stack()
            .unwrap()
            .resolve(&model, Path::Train)
            .unwrap();
        let hidden = model
            .forward(
                prefix.as_ref(),
                None,
                &batch.tokens,
                Logits::Hidden,
                Path::Train,
            )
            .unwrap();
        let (b, t, h) = hidden.dims3().unwrap();
        let rows = hidden
            .reshape((b * t, h))
            .unwrap()
            .index_select(&batch.rows, 0)
            .unwrap();
        let loss = if fused {
            target_loss_sum(&model, &rows, &batch).unwrap()
        } else {
            unfused_target_loss_sum(&model, &rows, &batch).unwrap()
        };
        let grads = loss.backward().unwrap();
        let g: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), g)
    };
    let (lf, gf) = run(true);
    let (lu, gu) = run(false);
    assert!(
        (lf - lu).abs() <= 1e-5 * lu.abs(),
        "{objective:?}: {lf} vs {lu}"
    );
    for (a, b) in gf.iter().zip(&gu) {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        assert!(
            den > 0.0 && (num / den).sqrt() < 1e-4,
            "{objective:?}: rel {}",
            (num / den).sqrt()
        );
    }
}

/// Packed rows give the right-padded batch's loss and prefix gradients.
#[test]
fn packed_batch_matches_padded_batch() {
    let (model, _) = tiny_model(11, "model-a");
    let data = toy_data(&model, 5, 7);
    let exs: Vec<Example> = data
        .records
        .iter()
        .map(|r| Example::from_record(r, 1024, VOCAB).unwrap().unwrap())
        .collect();
    let refs: Vec<&Example> = exs.iter().collect();
    let longest = exs.iter().map(|e| e.tokens.len()).max().unwrap();
    let padded = Batch::new(&refs, Objective::Distill, &Device::Cpu).unwrap();
    // Room for about two conversations per row: several rows, several segments each.
    let packed = Batch::packed(&refs, 2 * longest, Objective::Distill, &Device::Cpu).unwrap();
    let segments = packed.segments.clone().unwrap();
    assert!(segments.len() < refs.len() && segments.iter().any(|s| s.len() > 1));
    assert!(packed.slots < padded.slots);
    assert_eq!(packed.targets, padded.targets);
    let init = model.prefix_kv(None, &corpus()[..5]).unwrap();
    let params = Params::Kv(KvParams::new(&init, 1).unwrap());
    let vars = params.vars();
    let run = |batch: &Batch| {
        let prefix = params
            .stack()
            .unwrap()
            .resolve(&model, Path::Train)
            .unwrap();
        let loss = loss_sum(&model, prefix.as_ref(), batch, Path::Train).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = vars
            .iter()
            .flat_map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), g)
    };
    let (lp, gp) = run(&padded);
    let (lk, gk) = run(&packed);
    assert!(
        (lp - lk).abs() < 1e-4 * lp.abs(),
        "loss: padded {lp}, packed {lk}"
    );
    let scale = gp.iter().fold(0f32, |m, g| m.max(g.abs()));
    let diff = gp
        .iter()
        .zip(&gk)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && diff < 1e-4 * scale,
        "gradients differ by {diff} (scale {scale})"
    );
}
