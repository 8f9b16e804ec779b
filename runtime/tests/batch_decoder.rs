//! Continuous batching: sequences that join a running batch between steps, leave when done or
//! cancelled, and are prefilled under a small budget produce exactly the tokens of one-by-one
//! generation (and of `generate_batch`), with the same top-k log-probabilities.

mod common;

use std::collections::HashMap;

use candle_core::DType;
use cartridge_runtime::batch_decoder::{SeqId, TokenEvent};
use cartridge_runtime::generate::{
    generate, generate_batch, BatchOptions, Control, FinishReason, GenerateRequest, SamplingParams,
};
use cartridge_runtime::{BatchDecoder, PrefixKv, Transformer};
use common::{tiny_model, tokens, ALL};

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling,
        max_tokens,
        stop_tokens: Vec::new(),
        top_logprobs: 4,
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: Some(20),
        top_p: Some(0.95),
        seed,
    }
}

/// What one sequence produced through the decoder.
#[derive(Default)]
struct Collected {
    tokens: Vec<u32>,
    top: Vec<Vec<(u32, f32)>>,
    finish: Option<FinishReason>,
}

fn collect(into: &mut HashMap<SeqId, Collected>, events: Vec<TokenEvent>) {
    for e in events {
        let c = into.entry(e.id).or_default();
        assert!(
            c.finish.is_none(),
            "sequence {} got a token after finishing",
            e.id
        );
        c.tokens.push(e.token);
        c.top.push(e.top_logprobs);
        c.finish = e.finish;
    }
}

fn assert_same(
    model: &Transformer,
    prefix: Option<&PrefixKv>,
    req: &GenerateRequest,
    got: &Collected,
) {
    let want = generate(model, prefix, req, |_| Control::Continue).expect("single");
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.finish, Some(want.finish));
    for (a, b) in got.top.iter().zip(&want.top_logprobs) {
        assert_eq!(
            a.iter().map(|x| x.0).collect::<Vec<_>>(),
            b.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        for (x, y) in a.iter().zip(b) {
            assert!((x.1 - y.1).abs() < 1e-4, "logprob {} vs {}", x.1, y.1);
        }
    }
}

#[test]
fn staggered_arrivals_equal_one_by_one_generation() {
    for arch in ALL {
        let model = tiny_model(arch, DType::F32);
        let vocab = model.config().vocab_size;
        let cart = model.prefix_kv(None, &tokens(70, 5, vocab)).expect("cart");
        for prefix in [None, Some(cart)] {
            // A budget of 4 prompt tokens per step: the 9-token prompt takes three steps.
            let mut dec = BatchDecoder::new(&model, prefix.clone(), 4);
            let reqs: Vec<(usize, GenerateRequest)> = vec![
                (
                    0,
                    request(tokens(71, 3, vocab), 7, SamplingParams::greedy()),
                ),
                (0, request(tokens(72, 9, vocab), 4, sampled(5))),
                (
                    2,
                    request(tokens(73, 1, vocab), 6, SamplingParams::greedy()),
                ),
                (3, request(tokens(74, 6, vocab), 1, sampled(6))),
                (5, request(tokens(75, 2, vocab), 5, sampled(7))),
            ];
            let mut got: HashMap<SeqId, Collected> = HashMap::new();
            let mut step = 0;
            while step < 100 {
                for (id, (at, r)) in reqs.iter().enumerate() {
                    if *at == step {
                        dec.add(id as SeqId, r.clone()).expect("add");
                    }
                }
                if dec.is_empty() && step > 5 {
                    break;
                }
                collect(&mut got, dec.step(&model).expect("step"));
                step += 1;
            }
            assert!(
                dec.is_empty(),
                "{arch:?}: decoder still busy after {step} steps"
            );
            for (id, (_, r)) in reqs.iter().enumerate() {
                let c = got.get(&(id as SeqId)).expect("sequence produced tokens");
                assert_same(&model, prefix.as_ref(), r, c);
                assert_eq!(c.tokens.len(), r.max_tokens, "{arch:?} request {id}");
            }
        }
    }
}

#[test]
fn all_at_once_equals_generate_batch_and_stop_tokens_end_sequences() {
    let model = tiny_model(ALL[0], DType::F32);
    let vocab = model.config().vocab_size;
    let mut reqs: Vec<GenerateRequest> = (0..6)
        .map(|i| request(tokens(80 + i, 2 + i as usize, vocab), 8, sampled(i)))
        .collect();
    // Make request 0 stop on whatever its third token is.
    let probe = generate(&model, None, &reqs[0], |_| Control::Continue).expect("probe");
    reqs[0].stop_tokens = vec![probe.tokens[2]];
    let want = generate_batch(&model, None, &reqs, &BatchOptions::default(), |_, _| {
        Control::Continue
    })
    .expect("batch");
    let mut dec = BatchDecoder::new(&model, None, 64);
    for (i, r) in reqs.iter().enumerate() {
        dec.add(i as SeqId, r.clone()).expect("add");
    }
    let mut got: HashMap<SeqId, Collected> = HashMap::new();
    for _ in 0..20 {
        collect(&mut got, dec.step(&model).expect("step"));
    }
    assert!(dec.is_empty());
    for (i, w) in want.iter().enumerate() {
        let c = &got[&(i as SeqId)];
        assert_eq!(c.tokens, w.tokens, "request {i}");
        assert_eq!(c.finish, Some(w.finish));
    }
    let first_stop = probe
        .tokens
        .iter()
        .position(|&t| t == probe.tokens[2])
        .expect("stop");
    assert_eq!(got[&0].tokens.len(), first_stop + 1);
    assert!(matches!(got[&0].finish, Some(FinishReason::StopToken(_))));
}

#[test]
fn cancelling_leaves_the_others_exact_and_bad_requests_are_refused() {
    let model = tiny_model(ALL[1], DType::F32);
    let vocab = model.config().vocab_size;
    let cart = model.prefix_kv(None, &tokens(90, 3, vocab)).expect("cart");
    let reqs: Vec<GenerateRequest> = (0..4)
        .map(|i| {
            request(
                tokens(91 + i, 3 + 2 * i as usize, vocab),
                6,
                SamplingParams::greedy(),
            )
        })
        .collect();
    let mut dec = BatchDecoder::new(&model, Some(cart.clone()), 1000);
    for (i, r) in reqs.iter().enumerate() {
        dec.add(i as SeqId, r.clone()).expect("add");
    }
    assert!(
        dec.add(0, reqs[0].clone()).is_err(),
        "duplicate id accepted"
    );
    assert!(dec
        .add(9, request(vec![], 3, SamplingParams::greedy()))
        .is_err());
    assert!(dec
        .add(9, request(vec![1], 0, SamplingParams::greedy()))
        .is_err());
    let mut got: HashMap<SeqId, Collected> = HashMap::new();
    collect(&mut got, dec.step(&model).expect("prefill"));
    collect(&mut got, dec.step(&model).expect("decode"));
    assert!(dec.cancel(1).expect("cancel running"));
    assert!(!dec.cancel(1).expect("cancel again"));
    assert_eq!(dec.running(), 3);
    for _ in 0..10 {
        collect(&mut got, dec.step(&model).expect("step"));
    }
    assert!(dec.is_empty());
    assert_eq!(got[&1].tokens.len(), 2);
    for i in [0usize, 2, 3] {
        assert_same(&model, Some(&cart), &reqs[i], &got[&(i as SeqId)]);
    }
}
