//! Decoding: the KV cache reproduces full recomputation, batched (left-padded) decoding reproduces
//! one-by-one decoding, stop tokens / max tokens / callbacks stop sequences, seeded sampling is
//! reproducible.

mod common;

use candle_core::{DType, Tensor};
use cartridge_runtime::generate::{
    generate, generate_batch, BatchOptions, Control, FinishReason, GenerateRequest, SamplingParams,
};
use cartridge_runtime::models::{Logits, Transformer};
use cartridge_runtime::{KvCache, Path, PrefixKv};
use common::{ids, max_abs_diff, tiny_model, tokens, ALL};

const TOL: f64 = 1e-4;

fn full_logits(model: &Transformer, prefix: Option<&PrefixKv>, seq: &[u32]) -> Tensor {
    model
        .forward(prefix, None, &ids(seq), Logits::All, Path::Infer)
        .expect("forward")
}

#[test]
fn incremental_decoding_equals_full_recomputation() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(40, 6, vocab)).expect("cart");
        let seq = tokens(41, 12, vocab);
        for prefix in [None, Some(&cart)] {
            let want = full_logits(&model, prefix, &seq);
            // Prompt of 3, then chunks of 1, 2, 1, 3, 1, 1 (covers masks with and without a past).
            let mut cache = model.new_cache(1);
            let mut at = 0;
            for len in [3, 1, 2, 1, 3, 1, 1] {
                let got = model
                    .forward(
                        prefix,
                        Some(&mut cache),
                        &ids(&seq[at..at + len]),
                        Logits::All,
                        Path::Infer,
                    )
                    .expect("step");
                let d = max_abs_diff(&got, &want.narrow(1, at, len).expect("n"));
                assert!(
                    d < TOL,
                    "{arch:?} step at {at}: cache vs full differ by {d}"
                );
                at += len;
                assert_eq!(cache.len(), at);
            }
            // The cache of a sequence is a prefix: same K/V as computing it directly.
            let as_prefix = cache.to_prefix(0).expect("to_prefix");
            let direct = model.prefix_kv(prefix, &seq).expect("kv");
            for ((k1, v1), (k2, v2)) in as_prefix.layers().iter().zip(direct.layers()) {
                assert!(max_abs_diff(k1, k2) < TOL && max_abs_diff(v1, v2) < TOL);
            }
        }
    }
}

#[test]
fn left_padded_batch_forward_equals_single_forwards() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(50, 4, vocab)).expect("cart");
        let seqs = [
            tokens(51, 2, vocab),
            tokens(52, 7, vocab),
            tokens(53, 5, vocab),
        ];
        let longest = 7;
        let pads: Vec<usize> = seqs.iter().map(|s| longest - s.len()).collect();
        let mut grid = Vec::new();
        for (s, &p) in seqs.iter().zip(&pads) {
            grid.extend(std::iter::repeat_n(0u32, p));
            grid.extend(s);
        }
        let grid = Tensor::from_vec(grid, (3, longest), model.device()).expect("grid");
        let mut cache = KvCache::with_left_padding(model.config().num_layers, pads.clone());
        let got = model
            .forward(
                Some(&cart),
                Some(&mut cache),
                &grid,
                Logits::All,
                Path::Infer,
            )
            .expect("batch");
        let next = [5u32, 9, 13];
        let step = model
            .forward(
                Some(&cart),
                Some(&mut cache),
                &Tensor::from_vec(next.to_vec(), (3, 1), model.device()).expect("t"),
                Logits::Last,
                Path::Infer,
            )
            .expect("step");
        for (i, s) in seqs.iter().enumerate() {
            let want = full_logits(&model, Some(&cart), s);
            let row = got
                .narrow(0, i, 1)
                .expect("r")
                .narrow(1, pads[i], s.len())
                .expect("n");
            let d = max_abs_diff(&row, &want);
            assert!(d < TOL, "{arch:?} seq {i}: padded prefill differs by {d}");
            let mut ext = s.clone();
            ext.push(next[i]);
            let want = full_logits(&model, Some(&cart), &ext);
            let d = max_abs_diff(
                &step.narrow(0, i, 1).expect("r"),
                &want
                    .narrow(1, s.len(), 1)
                    .expect("n")
                    .squeeze(1)
                    .expect("s"),
            );
            assert!(
                d < TOL,
                "{arch:?} seq {i}: padded decode step differs by {d}"
            );
        }
        // Dropping a sequence keeps the others exact (and trims padding nobody needs).
        cache.retain(&[2, 0]).expect("retain");
        assert_eq!(cache.pads(), &[0, 3]);
        assert_eq!(cache.len(), 6);
        let step2 = model
            .forward(
                Some(&cart),
                Some(&mut cache),
                &Tensor::from_vec(vec![3u32, 4], (2, 1), model.device()).expect("t"),
                Logits::Last,
                Path::Infer,
            )
            .expect("step2");
        for (row, (i, tok)) in [(2usize, 3u32), (0, 4)].into_iter().enumerate() {
            let mut ext = seqs[i].clone();
            ext.push(next[i]);
            ext.push(tok);
            let want = full_logits(&model, Some(&cart), &ext);
            let d = max_abs_diff(
                &step2.narrow(0, row, 1).expect("r"),
                &want
                    .narrow(1, ext.len() - 1, 1)
                    .expect("n")
                    .squeeze(1)
                    .expect("s"),
            );
            assert!(d < TOL, "{arch:?} seq {i} after retain: differs by {d}");
        }
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling,
        max_tokens,
        stop_tokens: Vec::new(),
        top_logprobs: 5,
    }
}

#[test]
fn batched_generation_equals_one_by_one() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(60, 5, vocab)).expect("cart");
        let sampled = SamplingParams {
            temperature: 0.9,
            top_k: Some(20),
            top_p: Some(0.95),
            seed: 3,
        };
        let reqs = vec![
            request(tokens(61, 3, vocab), 6, SamplingParams::greedy()),
            request(tokens(62, 8, vocab), 3, SamplingParams::greedy()),
            request(tokens(63, 1, vocab), 7, sampled.clone()),
            request(tokens(64, 5, vocab), 0, SamplingParams::greedy()),
        ];
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        // A tiny prefill budget forces several prefill chunks.
        let opts = BatchOptions { prefill_tokens: 6 };
        let batch = generate_batch(&model, Some(&cart), &reqs, &opts, |i, t| {
            streamed[i].push(t);
            Control::Continue
        })
        .expect("batch");
        for (i, r) in reqs.iter().enumerate() {
            let single = generate(&model, Some(&cart), r, |_| Control::Continue).expect("single");
            assert_eq!(batch[i].tokens, single.tokens, "{arch:?} request {i}");
            assert_eq!(batch[i].tokens, streamed[i]);
            assert_eq!(batch[i].tokens.len(), r.max_tokens);
            assert_eq!(batch[i].finish, FinishReason::Length);
            assert_eq!(batch[i].top_logprobs.len(), r.max_tokens);
            for (a, b) in batch[i].top_logprobs.iter().zip(&single.top_logprobs) {
                assert_eq!(a.len(), 5);
                for ((ia, la), (ib, lb)) in a.iter().zip(b) {
                    assert_eq!(ia, ib);
                    assert!((la - lb).abs() < 1e-4, "{arch:?} logprob {la} vs {lb}");
                }
            }
            // Greedy picks the top-1 of the untempered distribution.
            if r.sampling.temperature <= 0.0 {
                for (tok, top) in batch[i].tokens.iter().zip(&batch[i].top_logprobs) {
                    assert_eq!(*tok, top[0].0);
                }
            }
        }
        // Greedy generation reproduces a manual argmax loop over full recomputation.
        let r = &reqs[0];
        let mut seq = r.prompt.clone();
        for _ in 0..r.max_tokens {
            let l = full_logits(&model, Some(&cart), &seq);
            let last: Vec<f32> = l
                .get(0)
                .expect("g")
                .get(seq.len() - 1)
                .expect("g")
                .to_vec1()
                .expect("v");
            seq.push(cartridge_runtime::generate::argmax(&last));
        }
        assert_eq!(
            &seq[r.prompt.len()..],
            batch[0].tokens.as_slice(),
            "{arch:?}"
        );
    }
}

/// Prompts of very different lengths (prefilled in separate groups and joined) and repeated
/// prompts (prefilled once, then copied) give what each request gives alone.
#[test]
fn uneven_and_repeated_prompts_equal_one_by_one() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(30, 5, vocab)).expect("cart");
        let sampled = |seed| SamplingParams {
            temperature: 0.8,
            top_k: None,
            top_p: None,
            seed,
        };
        let long = tokens(40, 9, vocab);
        let reqs = vec![
            request(long.clone(), 5, sampled(1)),
            request(tokens(3, 2, vocab), 5, SamplingParams::greedy()),
            request(long.clone(), 5, sampled(2)),
            request(tokens(17, 4, vocab), 4, SamplingParams::greedy()),
            request(tokens(3, 2, vocab), 6, sampled(7)),
            request(long, 5, SamplingParams::greedy()),
            request(tokens(41, 11, vocab), 3, SamplingParams::greedy()),
            request(tokens(38, 12, vocab), 4, sampled(4)),
        ];
        let batch = generate_batch(
            &model,
            Some(&cart),
            &reqs,
            &BatchOptions::default(),
            |_, _| Control::Continue,
        )
        .expect("batch");
        for (i, r) in reqs.iter().enumerate() {
            let single = generate(&model, Some(&cart), r, |_| Control::Continue).expect("single");
            assert_eq!(batch[i].tokens, single.tokens, "{arch:?} request {i}");
            for (a, b) in batch[i].top_logprobs.iter().zip(&single.top_logprobs) {
                for ((ia, la), (ib, lb)) in a.iter().zip(b) {
                    assert_eq!(ia, ib, "{arch:?} request {i}");
                    assert!((la - lb).abs() < 1e-4, "{arch:?} logprob {la} vs {lb}");
                }
            }
        }
    }
}

#[test]
fn stopping_and_seeded_sampling() {
    let model = tiny_model(cartridge_runtime::models::Architecture::Llama, DType::F32);
    let vocab = model.config().vocab_size;
    let prompt = tokens(70, 4, vocab);
    let greedy = generate(
        &model,
        None,
        &request(prompt.clone(), 8, SamplingParams::greedy()),
        |_| Control::Continue,
    )
    .expect("greedy");
    // Stop token: the third greedy token stops generation and is kept.
    let stop = greedy.tokens[2];
    let first = greedy.tokens.iter().position(|&t| t == stop).expect("pos");
    let mut r = request(prompt.clone(), 8, SamplingParams::greedy());
    r.stop_tokens = vec![stop];
    let g = generate(&model, None, &r, |_| Control::Continue).expect("stop");
    assert_eq!(g.tokens, greedy.tokens[..=first].to_vec());
    assert_eq!(g.finish, FinishReason::StopToken(stop));
    // The callback stops a sequence (stop strings are checked there).
    let mut n = 0;
    let g = generate(
        &model,
        None,
        &request(prompt.clone(), 8, SamplingParams::greedy()),
        |_| {
            n += 1;
            if n == 4 {
                Control::Stop
            } else {
                Control::Continue
            }
        },
    )
    .expect("cb");
    assert_eq!(g.tokens.len(), 4);
    assert_eq!(g.finish, FinishReason::Stopped);

    // Seeded sampling: same seed, same tokens; another seed, other tokens.
    let params = |seed| SamplingParams {
        temperature: 1.5,
        top_k: None,
        top_p: None,
        seed,
    };
    let a = generate(
        &model,
        None,
        &request(prompt.clone(), 16, params(11)),
        |_| Control::Continue,
    )
    .expect("a");
    let b = generate(
        &model,
        None,
        &request(prompt.clone(), 16, params(11)),
        |_| Control::Continue,
    )
    .expect("b");
    let c = generate(
        &model,
        None,
        &request(prompt.clone(), 16, params(12)),
        |_| Control::Continue,
    )
    .expect("c");
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);
    // top_k = 1 is greedy whatever the temperature.
    let mut k1 = params(5);
    k1.top_k = Some(1);
    let g = generate(&model, None, &request(prompt, 8, k1), |_| Control::Continue).expect("k1");
    assert_eq!(g.tokens, greedy.tokens);
}

/// A long inference prefill into a cache is chunked internally; the result is unchanged.
#[test]
fn chunked_prefill_equals_one_pass() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(80, 3, vocab)).expect("cart");
        let seq = tokens(81, 600, vocab);
        let want = full_logits(&model, Some(&cart), &seq);
        let mut cache = model.new_cache(1);
        let got = model
            .forward(
                Some(&cart),
                Some(&mut cache),
                &ids(&seq),
                Logits::Last,
                Path::Infer,
            )
            .expect("chunked");
        assert_eq!(cache.len(), 600);
        let d = max_abs_diff(
            &got,
            &want.narrow(1, 599, 1).expect("n").squeeze(1).expect("s"),
        );
        assert!(d < TOL, "{arch:?}: chunked prefill differs by {d}");
    }
}
