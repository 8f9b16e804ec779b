//! The two primitives a cartridge initialised from selected corpus keys stands on: moving
//! post-RoPE keys to other positions, and the attention each key receives.

mod common;

use candle_core::{DType, Tensor};
use cartridge_runtime::Observers;
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

#[test]
fn attention_received_comes_with_the_texts_own_kv() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let text = tokens(5, 40, model.config().vocab_size);
        let (kv, received) = model
            .attention_received(&text, 30..40, Observers::InPlace)
            .expect("stats");
        let plain = model.prefix_kv(None, &text).expect("kv");
        assert_eq!(received.len(), model.config().num_layers);
        for (li, ((k, v), r)) in kv.layers().iter().zip(&received).enumerate() {
            let (pk, pv) = plain.layer(li).unwrap();
            assert!(
                max_abs_diff(k, pk) < 1e-5 && max_abs_diff(v, pv) < 1e-5,
                "{arch:?}"
            );
            let r = r.to_vec2::<f32>().expect("vec");
            assert_eq!(r.len(), model.config().num_kv_heads);
            for head in &r {
                assert_eq!(head.len(), 40);
                // Each observer row spreads one unit of attention over the keys it sees: the
                // averages weighted by the rows that see each key add up to the 10 rows.
                let mass: f64 = head
                    .iter()
                    .enumerate()
                    .map(|(j, &a)| a as f64 * (40 - j.max(30)) as f64)
                    .sum();
                assert!((mass - 10.0).abs() < 1e-3, "{arch:?}: mass {mass}");
                assert!(head.iter().all(|&a| a >= 0.0));
            }
        }
        for observers in [Observers::InPlace, Observers::AtEnd] {
            assert!(model.attention_received(&text, 30..41, observers).is_err());
            assert!(model.attention_received(&text, 5..5, observers).is_err());
        }
    }
}

/// Read from the end, each observer row sees every key, and its query is the one it would have
/// at position `n - 1`: the statistic equals the in-place one of a text whose observer row is its
/// last token.
#[test]
fn attention_received_at_the_end_reads_every_key_from_the_last_position() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let text = tokens(6, 24, model.config().vocab_size);
        let n = text.len();
        let (_, at_end) = model
            .attention_received(&text, 0..n, Observers::AtEnd)
            .expect("stats");
        for head in at_end.iter().flat_map(|r| r.to_vec2::<f32>().expect("vec")) {
            // Every row spreads one unit over all n keys.
            let mass: f64 = head.iter().map(|&a| a as f64 * n as f64).sum();
            assert!((mass - n as f64).abs() < 1e-3, "{arch:?}: mass {mass}");
        }
        // The last row is at the end already: alone, both readings agree.
        let (_, last_end) = model
            .attention_received(&text, n - 1..n, Observers::AtEnd)
            .expect("stats");
        let (_, last_in) = model
            .attention_received(&text, n - 1..n, Observers::InPlace)
            .expect("stats");
        for (a, b) in last_end.iter().zip(&last_in) {
            assert!(max_abs_diff(a, b) < 1e-5, "{arch:?}");
        }
        // Moved queries are the queries computed at the target position (layer 0's depend on the
        // token and its position only).
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
    }
}
