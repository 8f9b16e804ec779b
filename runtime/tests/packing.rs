//! Packed rows are exact: several sequences packed into one row (per-sequence positions, a
//! block-diagonal mask) give each sequence the logits of running it alone after the same prefix.

mod common;

use candle_core::{DType, Tensor};
use cartridge_runtime::models::Logits;
use cartridge_runtime::{Path, PrefixStack};
use common::{ids, max_abs_diff, tiny_model, tokens, ALL};

const TOL: f64 = 1e-4;

#[test]
fn packed_sequences_equal_separate_runs() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(1, 5, vocab)).expect("kv");
        let prefix = PrefixStack::new().with_cartridge(cart);
        let seqs = [
            tokens(2, 4, vocab),
            tokens(3, 6, vocab),
            tokens(4, 3, vocab),
        ];
        // Row 0 packs two sequences; row 1 holds one and two padding slots.
        let t = 10;
        let mut row0 = seqs[0].clone();
        row0.extend_from_slice(&seqs[1]);
        let mut row1 = seqs[2].clone();
        row1.resize(t, 0);
        let flat: Vec<u32> = row0.iter().chain(&row1).copied().collect();
        let batch = Tensor::from_vec(flat, (2, t), model.device()).expect("batch");
        let segments = vec![vec![4, 6], vec![3]];
        for path in [Path::Infer, Path::Train] {
            let resolved = prefix.resolve(&model, path).expect("resolve");
            let packed = model
                .forward_packed(resolved.as_ref(), &batch, &segments, Logits::All, path)
                .expect("packed forward");
            let places = [(0, 0), (0, 4), (1, 0)];
            for (seq, &(row, start)) in seqs.iter().zip(&places) {
                let alone = model
                    .forward(resolved.as_ref(), None, &ids(seq), Logits::All, path)
                    .expect("forward");
                let got = packed
                    .narrow(0, row, 1)
                    .and_then(|r| r.narrow(1, start, seq.len()))
                    .expect("narrow");
                let d = max_abs_diff(&got, &alone);
                assert!(d < TOL, "{arch:?} {path:?}: packed vs alone differ by {d}");
            }
            // The check has teeth: without the block mask the second sequence sees the first.
            let one_segment = vec![vec![10], vec![3]];
            let leaky = model
                .forward_packed(resolved.as_ref(), &batch, &one_segment, Logits::All, path)
                .expect("forward");
            let d = max_abs_diff(
                &leaky.narrow(1, 4, 6).expect("narrow"),
                &packed.narrow(1, 4, 6).expect("narrow"),
            );
            assert!(d > 1e-3, "{arch:?}: the mask has no effect");
        }
    }
}

#[test]
fn bad_segments_are_refused() {
    let model = tiny_model(ALL[0], DType::F32);
    let batch = Tensor::from_vec(vec![1u32; 8], (2, 4), model.device()).expect("batch");
    for segments in [
        vec![vec![5], vec![1]],
        vec![vec![0, 2], vec![1]],
        vec![vec![2]],
    ] {
        assert!(model
            .forward_packed(None, &batch, &segments, Logits::All, Path::Infer)
            .is_err());
    }
}
