//! Finite-difference gradient checks on the training path: gradients must reach prefix K/V and
//! soft-prompt embeddings through every layer (a silently detached op — candle's fused RMSNorm,
//! RoPE or softmax — would break them). Done in f64 so central differences are precise.

mod common;

use candle_core::{DType, Tensor, Var};
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::{Path, PrefixKv, PrefixStack};
use common::{ids, tiny_model, tokens, ALL};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EPS: f64 = 1e-5;

/// A scalar loss that depends on every logit: a fixed random projection, plus a log-softmax term
/// so the loss is not linear in the logits.
struct Loss {
    proj: Tensor,
    cont: Vec<u32>,
}

impl Loss {
    fn new(model: &Transformer, seed: u64) -> Self {
        let vocab = model.config().vocab_size;
        let cont = tokens(seed, 4, vocab);
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f64> = (0..cont.len() * vocab)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let proj = Tensor::from_vec(v, (1, cont.len(), vocab), model.device()).expect("proj");
        Self { proj, cont }
    }

    fn eval(&self, model: &Transformer, stack: &PrefixStack, path: Path) -> Tensor {
        let prefix = stack.resolve(model, path).expect("resolve");
        let logits = model
            .forward(prefix.as_ref(), None, &ids(&self.cont), Logits::All, path)
            .expect("forward");
        let lsm = cartridge_runtime::ops::log_softmax_last_dim(&logits).expect("lsm");
        (logits * &self.proj)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .add(&lsm.narrow(2, 3, 1).expect("n").sum_all().expect("s"))
            .expect("add")
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().expect("scalar")
}

/// Central difference of `f` w.r.t. element `idx` (flat) of `x`.
fn central(x: &Tensor, idx: usize, f: &dyn Fn(&Tensor) -> f64) -> f64 {
    let shape = x.dims().to_vec();
    let base: Vec<f64> = x.flatten_all().expect("f").to_vec1().expect("v");
    let at = |delta: f64| {
        let mut v = base.clone();
        v[idx] += delta;
        f(&Tensor::from_vec(v, shape.as_slice(), x.device()).expect("t"))
    };
    (at(EPS) - at(-EPS)) / (2.0 * EPS)
}

/// Relative error between analytic and numeric gradient vectors.
fn rel_err(g: &[f64], fd: &[f64]) -> f64 {
    let num: f64 = g
        .iter()
        .zip(fd)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = fd.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-12);
    num / den
}

fn picks(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| rng.random_range(0..n)).collect()
}

/// Gradient of the loss w.r.t. prefix K/V of the first and last layers, analytic vs numeric.
/// Returns the relative errors for the given path (so the test can show the inference path fails).
/// Relative errors of the analytic gradients of prefix K/V against central differences; with
/// `detach_first_values`, the analytic pass sees layer 0's values detached (a control: what a
/// silently detached op looks like to the check).
fn cartridge_check(model: &Transformer, path: Path, detach_first_values: bool) -> Vec<f64> {
    let vocab = model.config().vocab_size;
    let init = model.prefix_kv(None, &tokens(21, 5, vocab)).expect("init");
    let vars: Vec<(Var, Var)> = init
        .layers()
        .iter()
        .map(|(k, v)| {
            (
                Var::from_tensor(k).expect("var"),
                Var::from_tensor(v).expect("var"),
            )
        })
        .collect();
    let stack_of = |layers: Vec<(Tensor, Tensor)>| {
        PrefixStack::new().with_cartridge(PrefixKv::new(layers).expect("prefix"))
    };
    let current: Vec<(Tensor, Tensor)> = vars
        .iter()
        .map(|(k, v)| (k.as_tensor().clone(), v.as_tensor().clone()))
        .collect();
    let loss = Loss::new(model, 22);
    let mut analytic = current.clone();
    if detach_first_values {
        analytic[0].1 = analytic[0].1.detach();
    }
    let grads = loss
        .eval(model, &stack_of(analytic), path)
        .backward()
        .expect("backward");
    let last = vars.len() - 1;
    let mut errs = Vec::new();
    for (layer, is_k) in [(0, true), (0, false), (last, true), (last, false)] {
        let var = if is_k { &vars[layer].0 } else { &vars[layer].1 };
        let g: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().expect("f").to_vec1().expect("v"),
            None => vec![0.0; var.elem_count()],
        };
        let idx = picks(var.elem_count(), 6, layer as u64 * 2 + is_k as u64);
        let f = |x: &Tensor| {
            let mut layers = current.clone();
            if is_k {
                layers[layer].0 = x.clone();
            } else {
                layers[layer].1 = x.clone();
            }
            // The reference is always the training path: exact and differentiable-free.
            scalar(&loss.eval(model, &stack_of(layers), Path::Train))
        };
        let fd: Vec<f64> = idx
            .iter()
            .map(|&i| central(var.as_tensor(), i, &f))
            .collect();
        let ga: Vec<f64> = idx.iter().map(|&i| g[i]).collect();
        assert!(
            fd.iter().any(|x| x.abs() > 1e-6),
            "numeric gradient is zero: bad test"
        );
        errs.push(rel_err(&ga, &fd));
    }
    errs
}

#[test]
fn cartridge_gradients_match_finite_differences() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F64);
        let errs = cartridge_check(&model, Path::Train, false);
        eprintln!("{arch:?}: prefix K/V relative errors {errs:?}");
        for e in &errs {
            assert!(
                *e < 1e-2,
                "{arch:?}: prefix K/V gradient relative error {e} ({errs:?})"
            );
        }
    }
}

/// The check has teeth: a detached gradient (what candle's fused RMSNorm, RoPE or softmax would
/// cause) is reported. (On the CPU the inference path is now differentiable too, its RoPE being
/// ours, so the control detaches a tensor itself.)
#[test]
fn a_detached_gradient_is_caught() {
    let model = tiny_model(cartridge_runtime::models::Architecture::Llama, DType::F64);
    let errs = cartridge_check(&model, Path::Train, true);
    eprintln!("detached values: relative errors {errs:?}");
    assert!(
        errs[1] > 0.5 && errs.iter().filter(|e| **e > 1e-1).count() == 1,
        "only layer 0's detached values should be reported: {errs:?}"
    );
}

#[test]
fn soft_prompt_gradients_match_finite_differences() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F64);
        let vocab = model.config().vocab_size;
        // A cartridge in front too: the soft prompt then attends to it, and its positions start
        // after it.
        let cart = model.prefix_kv(None, &tokens(31, 3, vocab)).expect("cart");
        let init = model
            .embed(&ids(&tokens(32, 4, vocab)))
            .expect("embed")
            .squeeze(0)
            .expect("squeeze");
        let var = Var::from_tensor(&init).expect("var");
        let stack_of = |soft: Tensor| {
            PrefixStack::new()
                .with_cartridge(cart.clone())
                .with_soft_prompt(soft)
        };
        let loss = Loss::new(&model, 33);
        let grads = loss
            .eval(&model, &stack_of(var.as_tensor().clone()), Path::Train)
            .backward()
            .expect("backward");
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("soft prompt received no gradient")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        let idx = picks(var.elem_count(), 8, 34);
        let f = |x: &Tensor| scalar(&loss.eval(&model, &stack_of(x.clone()), Path::Train));
        let fd: Vec<f64> = idx
            .iter()
            .map(|&i| central(var.as_tensor(), i, &f))
            .collect();
        let ga: Vec<f64> = idx.iter().map(|&i| g[i]).collect();
        assert!(
            fd.iter().any(|x| x.abs() > 1e-6),
            "numeric gradient is zero: bad test"
        );
        let e = rel_err(&ga, &fd);
        eprintln!("{arch:?}: soft prompt relative error {e}");
        assert!(
            e < 1e-2,
            "{arch:?}: soft prompt gradient relative error {e}"
        );
    }
}
