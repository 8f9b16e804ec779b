//! A prefix's logit bias weighs a slot as `e^bias` copies of it would: with bias `ln 2` on some
//! slots, every attention path (the fused prefill op, the decode kernel, the composed ops that
//! half precision and GPUs take) computes what it computes with those slots present twice.

mod common;

use candle_core::{DType, Tensor};
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::{Path, PrefixKv};
use common::{ids, max_abs_diff, tiny_model, tokens, ALL};

fn logits(model: &Transformer, prefix: &PrefixKv, cont: &[u32]) -> Tensor {
    model
        .forward(Some(prefix), None, &ids(cont), Logits::All, Path::Infer)
        .expect("forward")
        .to_dtype(DType::F32)
        .expect("f32")
}

#[test]
fn a_bias_of_ln_2_counts_a_slot_twice_on_every_attention_path() {
    for arch in ALL {
        for dtype in [DType::F32, DType::F16] {
            let model = tiny_model(arch, dtype);
            let vocab = model.config().vocab_size;
            let p = 9;
            let kv = model
                .prefix_kv(None, &tokens(3, p, vocab))
                .expect("prefix kv");
            // Slots 4.. twice, against a bias of ln 2 on them. The doubled prefix is 5 slots
            // longer, so its keys move 5 positions on: the continuation then sees every key at
            // the distance it sees it at after the biased prefix.
            let twice =
                PrefixKv::concat(&[&kv, &kv.narrow(4, p - 4).expect("narrow")]).expect("concat");
            let kv_heads = model.config().num_kv_heads;
            let from: Vec<u32> = (0..p as u32).chain(4..p as u32).collect();
            let to: Vec<u32> = from.iter().map(|&j| j + p as u32 - 4).collect();
            let moved = twice
                .layers()
                .iter()
                .map(|(k, v)| {
                    let k = model
                        .move_keys(k, &vec![from.clone(); kv_heads], &to)
                        .expect("move");
                    (k, v.clone())
                })
                .collect();
            let doubled = PrefixKv::new(moved).expect("doubled");
            let bias: Vec<f32> = (0..kv_heads * p)
                .map(|i| if i % p >= 4 { 2f32.ln() } else { 0.0 })
                .collect();
            let bias =
                Tensor::from_vec(bias, (kv_heads, p), kv.layers()[0].0.device()).expect("bias");
            let biased = kv
                .clone()
                .with_bias(vec![bias; model.config().num_layers])
                .expect("with bias");
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            // Several tokens (the fused op on the CPU in f32) and one (the decode kernel).
            for cont in [tokens(5, 7, vocab), tokens(6, 1, vocab)] {
                let want = logits(&model, &doubled, &cont);
                let got = logits(&model, &biased, &cont);
                let plain = logits(&model, &kv, &cont);
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff < tol,
                    "{arch:?} {dtype:?}, {} tokens: biased vs doubled differ by {diff}",
                    cont.len()
                );
                // And the bias does something: without it the logits differ.
                let unbiased = max_abs_diff(&plain, &want);
                assert!(
                    unbiased > 10.0 * tol,
                    "{arch:?} {dtype:?}: bias changes {unbiased}"
                );
            }
        }
    }
}

#[test]
fn composition_keeps_each_parts_bias_and_gives_the_unbiased_part_zero() {
    let model = tiny_model(ALL[0], DType::F32);
    let vocab = model.config().vocab_size;
    let (kv_heads, layers) = (model.config().num_kv_heads, model.config().num_layers);
    let a = model.prefix_kv(None, &tokens(1, 5, vocab)).expect("a");
    let b = model.prefix_kv(None, &tokens(2, 3, vocab)).expect("b");
    let device = a.layers()[0].0.device().clone();
    let bias = Tensor::ones((kv_heads, 3), DType::F32, &device).expect("ones");
    let b = b.with_bias(vec![bias; layers]).expect("bias");
    let ab = PrefixKv::concat(&[&a, &b]).expect("concat");
    let got = ab.bias().expect("a bias")[0]
        .to_vec2::<f32>()
        .expect("values");
    assert_eq!(got, vec![vec![0., 0., 0., 0., 0., 1., 1., 1.]; kv_heads]);
    // Narrowing and dtype changes keep it.
    let tail = ab
        .narrow(4, 4)
        .expect("narrow")
        .to_dtype(DType::F64)
        .expect("dtype");
    let got = tail.bias().expect("a bias")[1]
        .to_vec2::<f32>()
        .expect("values");
    assert_eq!(got, vec![vec![0., 1., 1., 1.]; kv_heads]);
    // A bias of the wrong shape is refused.
    let wrong = Tensor::ones((kv_heads, 4), DType::F32, &device).expect("ones");
    assert!(a.clone().with_bias(vec![wrong; layers]).is_err());
}
