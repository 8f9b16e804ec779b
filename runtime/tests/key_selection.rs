//! The primitives a cartridge initialised from selected corpus keys stands on: moving post-RoPE
//! keys, and the queries that observe them, to other positions.

mod common;

use candle_core::{DType, Tensor};
use common::{max_abs_diff, tiny_model, tokens, ALL};

#[test]
fn moved_keys_equal_keys_computed_at_the_target_position() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let text = tokens(3, 9, model.config().vocab_size);
        // Layer 0's keys depend on the token and its position only: the key of the token at
        // position 8, moved to position 2, must be the key of that token computed at position 2.
        let kv = model.prefix_kv(None, &text).expect("kv");
        let (k, _) = kv.layer(0).expect("layer 0");
        let kvh = k.dim(0).expect("dim");
        let last = k.narrow(1, 8, 1).expect("narrow");
        let moved = model
            .move_keys(&last, &vec![vec![8]; kvh], &[2])
            .expect("move");
        let at2 = model
            .prefix_kv(None, &[text[0], text[1], text[8]])
            .expect("kv");
        let want = at2
            .layer(0)
            .expect("layer")
            .0
            .narrow(1, 2, 1)
            .expect("narrow");
        let diff = max_abs_diff(&moved, &want);
        assert!(diff < 1e-5, "{arch:?}: moved key differs by {diff}");
        // Per-head source positions: head h's slot comes from position h + 1.
        let from: Vec<Vec<u32>> = (0..kvh).map(|h| vec![h as u32 + 1]).collect();
        let parts: Vec<Tensor> = (0..kvh)
            .map(|h| k.narrow(0, h, 1).unwrap().narrow(1, h + 1, 1).unwrap())
            .collect();
        let mixed = Tensor::cat(&parts, 0).expect("cat");
        let moved = model.move_keys(&mixed, &from, &[0]).expect("move");
        for h in 0..kvh {
            let alone = model.prefix_kv(None, &[text[h + 1]]).expect("kv");
            let want = alone.layer(0).unwrap().0.narrow(0, h, 1).unwrap();
            let got = moved.narrow(0, h, 1).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-5, "{arch:?} head {h}");
        }
        // Mismatched position lists are refused.
        assert!(model.move_keys(&last, &[vec![8]], &[2]).is_err() || kvh == 1);
        assert!(model
            .move_keys(&last, &vec![vec![8]; kvh], &[2, 3])
            .is_err());
    }
}

/// A query moved to another position is the query computed there: the observers the compiler
/// reads a corpus with are its queries moved after it.
#[test]
fn moved_queries_equal_queries_computed_at_the_target_position() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let text = tokens(6, 24, model.config().vocab_size);
        let n = text.len();
        // Layer 0's queries depend on the token and its position only.
        let (_, queries) = model.kv_and_queries(&text).expect("queries");
        let moved = model
            .move_queries(&queries[0], n, n as u32 - 1)
            .expect("move");
        let (_, q_last) = model
            .kv_and_queries(&[text[0], text[3]].repeat(n / 2))
            .expect("queries");
        // Token text[3] (row 3 of group 0) moved to n - 1, against the same token computed at
        // n - 1 (odd, so text[3] in the repeated pair).
        let got = moved.narrow(1, 3, 1).expect("narrow");
        let want = q_last[0].narrow(1, n - 1, 1).expect("narrow");
        assert!(max_abs_diff(&got, &want) < 1e-4, "{arch:?}");
        // Rows that are not whole groups of the text's tokens are refused.
        assert!(model.move_queries(&queries[0], n + 1, 0).is_err());
    }
}
