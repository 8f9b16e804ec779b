//! The prefix stack is exact: a cartridge made from a prefix's own KV, a soft prompt made from its
//! embeddings, and compositions of both give the logits of running the prefix as plain tokens.

mod common;

use candle_core::{DType, Tensor};
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::{Path, PrefixKv, PrefixStack};
use common::{ids, max_abs_diff, tiny_model, tokens, ALL};

const TOL: f64 = 1e-4;

/// Logits of the last `n_cont` positions of a plain run of `prefix ++ cont`.
fn plain(model: &Transformer, prefix: &[u32], cont: &[u32]) -> Tensor {
    let all: Vec<u32> = prefix.iter().chain(cont).copied().collect();
    let l = model
        .forward(None, None, &ids(&all), Logits::All, Path::Infer)
        .expect("forward");
    l.narrow(1, prefix.len(), cont.len()).expect("narrow")
}

fn after(model: &Transformer, stack: &PrefixStack, cont: &[u32], path: Path) -> Tensor {
    let resolved = stack.resolve(model, path).expect("resolve");
    assert_eq!(resolved.as_ref().map_or(0, PrefixKv::len), stack.len());
    model
        .forward(resolved.as_ref(), None, &ids(cont), Logits::All, path)
        .expect("forward")
}

#[test]
fn cartridge_from_prefix_kv_equals_plain_run() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let prefix = tokens(1, 7, vocab);
        let cont = tokens(2, 5, vocab);
        let want = plain(&model, &prefix, &cont);
        let cart = model.prefix_kv(None, &prefix).expect("kv");
        assert_eq!(cart.len(), 7);
        let (k0, _) = cart.layer(0).expect("layer");
        assert_eq!(k0.dims(), &[2, 7, model.config().head_dim]);
        for path in [Path::Infer, Path::Train] {
            let got = after(
                &model,
                &PrefixStack::new().with_cartridge(cart.clone()),
                &cont,
                path,
            );
            let d = max_abs_diff(&got, &want);
            assert!(
                d < TOL,
                "{arch:?} {path:?}: cartridge vs plain differ by {d}"
            );
        }
        // The check has teeth: a cartridge of other tokens changes the logits.
        let other = model.prefix_kv(None, &tokens(3, 7, vocab)).expect("kv");
        let got = after(
            &model,
            &PrefixStack::new().with_cartridge(other),
            &cont,
            Path::Infer,
        );
        assert!(
            max_abs_diff(&got, &want) > 1e-2,
            "{arch:?}: prefix has no effect"
        );
    }
}

#[test]
fn soft_prompt_from_prefix_embeddings_equals_plain_run() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let prefix = tokens(4, 6, vocab);
        let cont = tokens(5, 4, vocab);
        let want = plain(&model, &prefix, &cont);
        let emb = model
            .embed(&ids(&prefix))
            .expect("embed")
            .squeeze(0)
            .expect("squeeze");
        for path in [Path::Infer, Path::Train] {
            let stack = PrefixStack::new().with_soft_prompt(emb.clone());
            let got = after(&model, &stack, &cont, path);
            let d = max_abs_diff(&got, &want);
            assert!(
                d < TOL,
                "{arch:?} {path:?}: soft prompt vs plain differ by {d}"
            );
        }
        // Feeding the soft prompt as ordinary input embeddings is the same computation.
        let cont_emb = model
            .embed(&ids(&cont))
            .expect("embed")
            .squeeze(0)
            .expect("squeeze");
        let both = Tensor::cat(&[&emb, &cont_emb], 0)
            .expect("cat")
            .unsqueeze(0)
            .expect("unsq");
        let got = model
            .forward_embeds(None, None, &both, Logits::All, Path::Infer)
            .expect("forward")
            .narrow(1, prefix.len(), cont.len())
            .expect("narrow");
        assert!(max_abs_diff(&got, &want) < TOL);
    }
}

/// Two cartridges made from consecutive parts compose into the plain run when the second part's KV
/// is computed after the first (its keys carry positions p1..p1+p2-1); a soft prompt after a
/// cartridge also lands at the right positions.
#[test]
fn composed_cartridges_and_soft_prompts_equal_plain_run() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let prefix = tokens(6, 9, vocab);
        let cont = tokens(7, 4, vocab);
        let want = plain(&model, &prefix, &cont);
        let (p1, rest) = prefix.split_at(3);
        let (p2, p3) = rest.split_at(4);
        let c1 = model.prefix_kv(None, p1).expect("kv1");
        let c2 = model.prefix_kv(Some(&c1), p2).expect("kv2");
        let c12 = PrefixKv::concat(&[&c1, &c2]).expect("concat");
        let c3 = model.prefix_kv(Some(&c12), p3).expect("kv3");
        for path in [Path::Infer, Path::Train] {
            let stack = PrefixStack::new()
                .with_cartridge(c1.clone())
                .with_cartridge(c2.clone())
                .with_cartridge(c3.clone());
            let d = max_abs_diff(&after(&model, &stack, &cont, path), &want);
            assert!(d < TOL, "{arch:?} {path:?}: three cartridges differ by {d}");

            // Cartridges 1+2, then parts 3 as a soft prompt; also split into two soft prompts.
            let e3 = model.embed(&ids(p3)).expect("e").squeeze(0).expect("s");
            let stack = PrefixStack::new()
                .with_cartridge(c1.clone())
                .with_cartridge(c2.clone())
                .with_soft_prompt(e3.clone());
            let d = max_abs_diff(&after(&model, &stack, &cont, path), &want);
            assert!(
                d < TOL,
                "{arch:?} {path:?}: cartridges + soft prompt differ by {d}"
            );
            let e23 = model
                .embed(&ids(&prefix[3..]))
                .expect("e")
                .squeeze(0)
                .expect("s");
            let stack = PrefixStack::new()
                .with_cartridge(c1.clone())
                .with_soft_prompt(e23.narrow(0, 0, 2).expect("n"))
                .with_soft_prompt(e23.narrow(0, 2, 4).expect("n"));
            let d = max_abs_diff(&after(&model, &stack, &cont, path), &want);
            assert!(
                d < TOL,
                "{arch:?} {path:?}: cartridge + two soft prompts differ by {d}"
            );
        }
        // Attention is blind to slot order inside the prefix (each key carries its own rotation
        // and the user's positions depend only on the total length), so swapping composed
        // cartridges gives the same logits: documented in `prefix.rs`.
        let swapped = PrefixStack::new()
            .with_cartridge(c2.clone())
            .with_cartridge(c1.clone())
            .with_cartridge(c3.clone());
        let d = max_abs_diff(&after(&model, &swapped, &cont, Path::Infer), &want);
        assert!(d < TOL, "{arch:?}: swapped cartridges differ by {d}");
    }
}

/// A shared prefix serves a batch of continuations: each row equals its own single run.
#[test]
fn batch_shares_one_prefix() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let prefix = tokens(8, 5, vocab);
        let cart = model.prefix_kv(None, &prefix).expect("kv");
        let conts = [
            tokens(9, 4, vocab),
            tokens(10, 4, vocab),
            tokens(11, 4, vocab),
        ];
        let flat: Vec<u32> = conts.iter().flatten().copied().collect();
        let batch = Tensor::from_vec(flat, (3, 4), model.device()).expect("batch");
        for path in [Path::Infer, Path::Train] {
            let got = model
                .forward(Some(&cart), None, &batch, Logits::All, path)
                .expect("forward");
            for (i, c) in conts.iter().enumerate() {
                let want = plain(&model, &prefix, c);
                let row = got.narrow(0, i, 1).expect("row");
                let d = max_abs_diff(&row, &want);
                assert!(d < TOL, "{arch:?} {path:?} row {i}: differs by {d}");
            }
        }
    }
}

/// `Logits::Hidden` times the LM head gives the logits (the hook for a fused LM-head loss).
#[test]
fn hidden_states_times_lm_head_are_the_logits() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(90, 3, vocab)).expect("cart");
        let seq = ids(&tokens(91, 5, vocab));
        let want = model
            .forward(Some(&cart), None, &seq, Logits::All, Path::Train)
            .expect("logits");
        let h = model
            .forward(Some(&cart), None, &seq, Logits::Hidden, Path::Train)
            .expect("hidden");
        assert_eq!(h.dims(), &[1, 5, model.config().hidden_size]);
        let got = h
            .squeeze(0)
            .expect("s")
            .matmul(&model.lm_head_weight().t().expect("t"))
            .expect("mm");
        assert!(max_abs_diff(&got.unsqueeze(0).expect("u"), &want) < 1e-5);
    }
}

/// A long text (more than one prefill chunk) made into a cartridge gives the logits of running it
/// as plain tokens: the chunked prefill of `prefix_kv` keeps positions and visibility exact.
#[test]
fn long_prefix_kv_is_prefilled_in_exact_chunks() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let prefix = tokens(7, 700, vocab);
        let cont = tokens(8, 5, vocab);
        let want = plain(&model, &prefix, &cont);
        let cart = model.prefix_kv(None, &prefix).expect("kv");
        assert_eq!(cart.len(), 700);
        let got = after(
            &model,
            &PrefixStack::new().with_cartridge(cart),
            &cont,
            Path::Infer,
        );
        let d = max_abs_diff(&got, &want);
        assert!(
            d < TOL,
            "{arch:?}: chunked cartridge vs plain differ by {d}"
        );
    }
}
