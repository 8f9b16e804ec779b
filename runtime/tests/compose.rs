//! Offline composition (`cart::compose`, SPEC.md §6) is the runtime's online composition: a model
//! attending to AB.cart computes exactly (bit for bit) what it computes with A and B stacked per
//! request, with and without a soft prompt after them. `Composition::Follow` places a later
//! cartridge after the earlier ones, without its sink.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use cartridge_formats::cart::{self, CartFile, Compression, Dims, Provenance};
use cartridge_formats::ModelFingerprint;
use cartridge_runtime::cartridge_file::{load_cartridge, save_cartridge};
use cartridge_runtime::model_fingerprint::from_hashes;
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::{Composition, Path as ComputePath, PrefixKv, PrefixStack};
use common::{ids, max_abs_diff, tiny_model, tokens, ALL};

fn logits(model: &Transformer, stack: &PrefixStack, cont: &[u32]) -> Tensor {
    let prefix = stack.resolve(model, ComputePath::Infer).expect("resolve");
    model
        .forward(
            prefix.as_ref(),
            None,
            &ids(cont),
            Logits::All,
            ComputePath::Infer,
        )
        .expect("forward")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("f32")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn compose_files(inputs: &[&Path], out: &Path) {
    let composed = cart::compose_files(inputs, "2026-11-29T00:00:00Z").expect("compose");
    cart::write_file(out, &composed.contents(), Compression::None).expect("write");
}

fn fingerprint(model: &Transformer) -> ModelFingerprint {
    from_hashes(model.config(), "sha256:aa".into(), "sha256:bb".into())
}

#[test]
fn offline_composition_equals_online_stack_bit_for_bit() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let fp = fingerprint(&model);
        let vocab = model.config().vocab_size;
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_path, b_path, ab_path) = (
            dir.path().join("a.cart"),
            dir.path().join("b.cart"),
            dir.path().join("ab.cart"),
        );
        // Two cartridges trained (here: prefilled) alone, each at positions 0..p-1.
        let a = model.prefix_kv(None, &tokens(1, 5, vocab)).expect("a");
        let b = model.prefix_kv(None, &tokens(2, 3, vocab)).expect("b");
        let prov = Provenance::default();
        save_cartridge(&a_path, &a, 1, &fp, prov.clone(), Compression::None).expect("save a");
        save_cartridge(&b_path, &b, 2, &fp, prov, Compression::Zstd).expect("save b");
        compose_files(&[&a_path, &b_path], &ab_path);

        let ab_file = CartFile::open(&ab_path).expect("open ab");
        ab_file.verify().expect("verify ab");
        let Dims::Kv(d) = ab_file.header().dims else {
            panic!("{arch:?}: composed file is not kv");
        };
        assert_eq!((d.tokens, d.frozen_tokens), (8, 1), "{arch:?}");

        let dev = Device::Cpu;
        let load = |p: &Path| load_cartridge(p, &fp, &dev).expect("load");
        let online = PrefixStack::new()
            .with_cartridge(load(&a_path))
            .with_cartridge(load(&b_path));
        let offline = PrefixStack::new().with_cartridge(load(&ab_path));

        // The prefix itself, then the logits after it, are identical bits.
        let on = online
            .resolve(&model, ComputePath::Infer)
            .expect("on")
            .expect("some");
        let off = offline
            .resolve(&model, ComputePath::Infer)
            .expect("off")
            .expect("some");
        for (l, ((k1, v1), (k2, v2))) in on.layers().iter().zip(off.layers()).enumerate() {
            assert_eq!(bits(k1), bits(k2), "{arch:?}: keys of layer {l}");
            assert_eq!(bits(v1), bits(v2), "{arch:?}: values of layer {l}");
        }
        let cont = tokens(3, 6, vocab);
        assert_eq!(
            bits(&logits(&model, &online, &cont)),
            bits(&logits(&model, &offline, &cont)),
            "{arch:?}: logits after [A, B] vs AB.cart"
        );

        // A soft prompt after the cartridges lands at the same positions either way.
        let soft = model
            .embed(&ids(&tokens(4, 2, vocab)))
            .expect("embed")
            .squeeze(0)
            .expect("squeeze");
        assert_eq!(
            bits(&logits(
                &model,
                &online.clone().with_soft_prompt(soft.clone()),
                &cont
            )),
            bits(&logits(
                &model,
                &offline.clone().with_soft_prompt(soft),
                &cont
            )),
            "{arch:?}: logits with a soft prompt after [A, B] vs AB.cart"
        );

        // The check has teeth: B then A is another prefix (same length, other slot order).
        let ba = PrefixKv::concat(&[&load(&b_path), &load(&a_path)]).expect("ba");
        let (k_ba, _) = ba.layer(0).expect("layer");
        let (k_ab, _) = off.layer(0).expect("layer");
        assert_ne!(
            bits(k_ba),
            bits(k_ab),
            "{arch:?}: order must matter in the file"
        );
    }
}

#[test]
fn composing_cartridges_of_different_models_is_refused_naming_both() {
    let model = tiny_model(ALL[0], DType::F32);
    let fp = fingerprint(&model);
    let other = ModelFingerprint {
        weights_hash: "sha256:cc".into(),
        ..fp.clone()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_path, z_path) = (dir.path().join("a.cart"), dir.path().join("z.cart"));
    let a = model.prefix_kv(None, &[3, 4]).expect("a");
    let prov = Provenance::default();
    save_cartridge(&a_path, &a, 1, &fp, prov.clone(), Compression::None).expect("a");
    save_cartridge(&z_path, &a, 1, &other, prov, Compression::None).expect("z");
    let err = cart::compose_files(&[a_path.as_path(), z_path.as_path()], "")
        .expect_err("different models");
    let msg = err.to_string();
    assert!(
        msg.contains("a.cart") && msg.contains("z.cart") && msg.contains("weights_hash"),
        "{msg}"
    );
}

#[test]
fn follow_composition_places_later_cartridges_after_the_earlier_ones_without_their_sinks() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let (a_text, b_text) = (tokens(1, 5, vocab), tokens(2, 4, vocab));
        let a = model.prefix_kv(None, &a_text).expect("a");
        let b = model.prefix_kv(None, &b_text).expect("b");
        let stack = PrefixStack::new()
            .with_cartridge(a.clone())
            .with_cartridge(b.clone())
            .with_composition(Composition::Follow);
        assert_eq!(stack.len(), 5 + 4 - 1, "{arch:?}: one sink dropped");
        let got = stack
            .resolve(&model, ComputePath::Infer)
            .expect("resolve")
            .expect("some");
        assert_eq!(got.len(), stack.len(), "{arch:?}");

        // Layer 0's keys and values depend only on a token and its position, so there the
        // composition is the KV of A's text followed by B's text less its first token, computed
        // by the model at those positions (not by re-rotation).
        let joined: Vec<u32> = a_text.iter().chain(&b_text[1..]).copied().collect();
        let want = model.prefix_kv(None, &joined).expect("joined");
        let ((gk, gv), (wk, wv)) = (&got.layers()[0], &want.layers()[0]);
        assert!(max_abs_diff(gk, wk) < 1e-5, "{arch:?}: layer 0 keys");
        assert!(max_abs_diff(gv, wv) < 1e-6, "{arch:?}: layer 0 values");

        // Every layer: A's slots untouched, B's values kept, B's keys only rotated.
        for (l, ((k, v), ((ak, av), (bk, bv)))) in got
            .layers()
            .iter()
            .zip(a.layers().iter().zip(b.layers()))
            .enumerate()
        {
            assert_eq!(
                bits(&k.narrow(1, 0, 5).expect("n")),
                bits(ak),
                "{arch:?} {l}"
            );
            assert_eq!(
                bits(&v.narrow(1, 0, 5).expect("n")),
                bits(av),
                "{arch:?} {l}"
            );
            let b_values = bv.narrow(1, 1, 3).expect("n");
            assert_eq!(
                bits(&v.narrow(1, 5, 3).expect("n")),
                bits(&b_values),
                "{arch:?} {l}"
            );
            let norms = |t: &Tensor| t.sqr().expect("sq").sum_keepdim(2).expect("sum");
            let moved = norms(&k.narrow(1, 5, 3).expect("n"));
            assert!(
                max_abs_diff(&moved, &norms(&bk.narrow(1, 1, 3).expect("n"))) < 1e-4,
                "{arch:?} {l}: a rotation keeps each key's norm"
            );
        }

        // The check has teeth: the default composition keeps B's keys where they were.
        let overlap = PrefixStack::new()
            .with_cartridge(a.clone())
            .with_cartridge(b.clone())
            .resolve(&model, ComputePath::Infer)
            .expect("overlap")
            .expect("some");
        let overlap_b = overlap.layers()[0].0.narrow(1, 6, 3).expect("n");
        assert!(
            max_abs_diff(&overlap_b, &wk.narrow(1, 5, 3).expect("n")) > 1e-3,
            "{arch:?}: overlap must differ from follow"
        );

        // One cartridge: nothing to place.
        let alone = PrefixStack::new()
            .with_cartridge(b.clone())
            .with_composition(Composition::Follow)
            .resolve(&model, ComputePath::Infer)
            .expect("alone")
            .expect("some");
        assert_eq!(
            bits(&alone.layers()[1].0),
            bits(&b.layers()[1].0),
            "{arch:?}"
        );
    }
}
