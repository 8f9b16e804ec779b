//! Selected-keys initialisation keeps, per layer and KV head, exactly the corpus keys that cover
//! what a question after the corpus reads, with their values untouched and their keys moved to the
//! cartridge's slots.

mod common;

use candle_core::Tensor;
use cartridge_compiler::coverage::{coverage_pick, SegmentReads};
use cartridge_compiler::init::{init_kv, select_corpus_kv, Fit};
use cartridge_compiler::InitKind;
use cartridge_formats::cart::{Compression, Provenance};
use cartridge_runtime::cartridge_file::{load_cartridge, save_cartridge};
use common::{max_abs_diff, tiny_model, tokens};

#[test]
fn selected_keys_are_each_heads_coverage_choice() {
    let (model, _) = tiny_model(3, "m");
    let corpus = tokens(11, 200);
    let p = 24;
    let cart = select_corpus_kv(&model, p, &corpus, Fit::None).expect("select");
    assert_eq!(cart.len(), p);
    // The observers: every corpus query, moved to the end of the corpus.
    let (full, queries) = model.kv_and_queries(&corpus).expect("queries");
    let n = corpus.len();
    let mut distinct_choices = 0;
    for (li, ((k, v), q)) in full.layers().iter().zip(&queries).enumerate() {
        let (ck, cv) = cart.layer(li).unwrap();
        let at_end = model.move_queries(q, n, n as u32 - 1).unwrap();
        let mut chosen_per_head = Vec::new();
        for h in 0..k.dim(0).unwrap() {
            // The reference choice: slot 0, then the coverage choice of positions 1.., in order.
            let reads = SegmentReads::new(&at_end.get(h).unwrap(), &k.get(h).unwrap()).unwrap();
            let picked = coverage_pick(&[reads], p - 1).unwrap();
            let chosen: Vec<usize> = std::iter::once(0)
                .chain(picked.into_iter().map(|(_, j)| j))
                .collect();
            for (slot, &pos) in chosen.iter().enumerate() {
                let want_v = v.narrow(0, h, 1).unwrap().narrow(1, pos, 1).unwrap();
                let got_v = cv.narrow(0, h, 1).unwrap().narrow(1, slot, 1).unwrap();
                assert_eq!(
                    max_abs_diff(&want_v, &got_v),
                    0.0,
                    "layer {li} head {h} slot {slot}"
                );
                let key = k.narrow(0, h, 1).unwrap().narrow(1, pos, 1).unwrap();
                let moved = model
                    .move_keys(&key, &[vec![pos as u32]], &[slot as u32])
                    .unwrap();
                let got_k = ck.narrow(0, h, 1).unwrap().narrow(1, slot, 1).unwrap();
                assert!(
                    max_abs_diff(&moved, &got_k) < 1e-5,
                    "layer {li} head {h} slot {slot}"
                );
            }
            chosen_per_head.push(chosen);
        }
        if chosen_per_head.windows(2).any(|w| w[0] != w[1]) {
            distinct_choices += 1;
        }
    }
    // Heads really choose for themselves (on a random model they disagree somewhere).
    assert!(distinct_choices > 0);
    // Through `init_kv` the same cartridge comes out.
    let via = init_kv(&model, p, InitKind::SelectedKeys, Some(&corpus), 0).expect("init");
    for (a, b) in via.layers().iter().zip(cart.layers()) {
        assert_eq!(max_abs_diff(&a.0, &b.0), 0.0);
        assert_eq!(max_abs_diff(&a.1, &b.1), 0.0);
    }
}

#[test]
fn a_corpus_longer_than_the_window_is_scored_in_segments() {
    let (model, _) = tiny_model(3, "m");
    let window = model.config().max_position_embeddings;
    let corpus = tokens(12, 2 * window + 40);
    let p = 64;
    let cart = select_corpus_kv(&model, p, &corpus, Fit::None).expect("select");
    assert_eq!(cart.len(), p);
    // Slot 0 is the corpus's first token at position 0 (up to the rounding of a longer forward).
    let first = model.prefix_kv(None, &corpus[..1]).expect("kv");
    for (li, (k, v)) in cart.layers().iter().enumerate() {
        let (fk, fv) = first.layer(li).unwrap();
        assert!(max_abs_diff(&k.narrow(1, 0, 1).unwrap(), fk) < 1e-5);
        assert!(max_abs_diff(&v.narrow(1, 0, 1).unwrap(), fv) < 1e-5);
    }
    // Every value comes from some segment's KV (the segments' own forwards, here prefilled in
    // chunks, hence the tolerance), none of them a
    // later segment's first token (its attention sink).
    let segments: Vec<_> = corpus
        .chunks(window)
        .map(|s| model.prefix_kv(None, s).expect("kv"))
        .collect();
    let (_, v) = cart.layer(1).unwrap();
    let seg_v: Vec<Tensor> = segments
        .iter()
        .map(|s| s.layer(1).unwrap().1.clone())
        .collect();
    for h in 0..v.dim(0).unwrap() {
        for slot in 1..p {
            let got = v.narrow(0, h, 1).unwrap().narrow(1, slot, 1).unwrap();
            // The closest (segment, position): it must match and must not be a first token.
            let (best, at) = seg_v
                .iter()
                .flat_map(|sv| {
                    let sv = sv.narrow(0, h, 1).unwrap();
                    (0..sv.dim(1).unwrap())
                        .map(|j| (max_abs_diff(&sv.narrow(1, j, 1).unwrap(), &got), j))
                        .collect::<Vec<_>>()
                })
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap();
            assert!(
                best < 1e-5,
                "head {h} slot {slot}: value from no segment position"
            );
            assert!(
                at > 0,
                "head {h} slot {slot}: a segment's first token was selected"
            );
        }
    }
}

#[test]
fn selected_keys_need_enough_corpus_and_soft_prompts_start_from_the_text() {
    let (model, _) = tiny_model(3, "m");
    let corpus = tokens(13, 10);
    assert!(select_corpus_kv(&model, 11, &corpus, Fit::None).is_err());
    assert!(init_kv(&model, 4, InitKind::SelectedKeys, None, 0).is_err());
    // A soft prompt has no keys to select: the default kind starts it from the first tokens.
    let soft = |kind| {
        cartridge_compiler::init::init_soft_prompt(&model, 4, kind, Some(&corpus), 0).unwrap()
    };
    assert_eq!(
        max_abs_diff(&soft(InitKind::SelectedKeys), &soft(InitKind::CorpusText)),
        0.0
    );
}

#[test]
fn fitted_values_keep_the_selected_keys_and_handle_several_segments() {
    let (model, _) = tiny_model(3, "m");
    let window = model.config().max_position_embeddings;
    // One segment, then three (the last a short tail).
    for len in [window - 8, 2 * window + 40] {
        let corpus = tokens(21, len);
        let p = 48;
        let plain = select_corpus_kv(&model, p, &corpus, Fit::None).expect("select");
        let fitted = init_kv(&model, p, InitKind::SelectedFitted, Some(&corpus), 0).expect("fit");
        let mut moved = 0f64;
        for (a, b) in fitted.layers().iter().zip(plain.layers()) {
            assert!(a.0.dims() == b.0.dims(), "{len} tokens: key shapes differ");
            let keys = a.0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                keys.iter().all(|x| x.is_finite()),
                "{len} tokens: a key is not finite"
            );
            let d = max_abs_diff(&a.1, &b.1);
            assert!(d.is_finite(), "{len} tokens: a fitted value is not finite");
            moved = moved.max(d);
        }
        assert!(moved > 1e-4, "{len} tokens: the fit changed no value");
    }
}

#[test]
fn fitted_keys_are_the_selected_keys_at_their_corpus_distances() {
    let (model, _) = tiny_model(3, "m");
    let len = model.config().max_position_embeddings - 8;
    let corpus = tokens(22, len);
    let p = 24;
    let plain = select_corpus_kv(&model, p, &corpus, Fit::None).expect("select");
    let fitted = select_corpus_kv(&model, p, &corpus, Fit::Values).expect("fit");
    let (full, _) = model.kv_and_queries(&corpus).expect("kv");
    let shift = (len - p) as u32;
    for (li, (k, _)) in full.layers().iter().enumerate() {
        let (fk, _) = fitted.layer(li).unwrap();
        let (pk, _) = plain.layer(li).unwrap();
        for h in 0..k.dim(0).unwrap() {
            let corpus_keys = k.get(h).unwrap();
            for slot in 0..p {
                let key = |t: &Tensor| t.narrow(0, h, 1).unwrap().narrow(1, slot, 1).unwrap();
                // Moved forward by `len - p`, a fitted key is a corpus key where it was computed.
                let back = model.move_keys(&key(fk), &[vec![0]], &[shift]).unwrap();
                let diffs: Vec<f64> = (0..len)
                    .map(|s| {
                        max_abs_diff(
                            &back,
                            &corpus_keys.narrow(0, s, 1).unwrap().unsqueeze(0).unwrap(),
                        )
                    })
                    .collect();
                let (pos, best) = diffs
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(s, &d)| (s, d))
                    .unwrap();
                assert!(best < 1e-4, "layer {li} head {h} slot {slot}: {best}");
                // The same key the plain selection put in this slot (there moved to `slot`).
                let plain_there = model
                    .move_keys(&key(pk), &[vec![slot as u32]], &[pos as u32])
                    .unwrap();
                assert!(
                    max_abs_diff(&plain_there, &back) < 1e-4,
                    "layer {li} head {h} slot {slot}"
                );
            }
        }
    }
}

/// The refined start is the fitted start with its keys moved by gradient descent and its values
/// held, and it survives a trip through a `.cart` file. (That the moved keys read closer to the
/// corpus is `key_fit`'s unit test; that this helps a question is measured on the real model,
/// BENCHMARKS.md: on this tiny random model, random "questions" after it do not read closer.)
#[test]
fn refined_keys_move_and_the_values_stay() {
    let (model, fingerprint) = tiny_model(3, "m");
    let len = model.config().max_position_embeddings - 40;
    let corpus = tokens(23, len);
    let p = 24;
    let fitted = select_corpus_kv(&model, p, &corpus, Fit::Values).expect("fit");
    let refined = init_kv(&model, p, InitKind::SelectedRefined, Some(&corpus), 0).expect("refine");
    let mut moved = 0f64;
    for ((rk, rv), (fk, fv)) in refined.layers().iter().zip(fitted.layers()) {
        assert_eq!(max_abs_diff(rv, fv), 0.0, "the values are held");
        let keys = rk.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(keys.iter().all(|x| x.is_finite()));
        moved = moved.max(max_abs_diff(rk, fk));
    }
    assert!(moved > 1e-3, "no key moved");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.cart");
    save_cartridge(
        &path,
        &refined,
        1,
        &fingerprint,
        Provenance::default(),
        Compression::None,
    )
    .unwrap();
    let back = load_cartridge(&path, &fingerprint, model.device()).unwrap();
    for ((bk, _), (rk, _)) in back.layers().iter().zip(refined.layers()) {
        assert_eq!(max_abs_diff(bk, rk), 0.0);
    }
}
