//! The server over real HTTP on loopback with a real client (ureq): chat with 0, 1 and 2
//! cartridges, whole and streamed, equals the runtime's own output for the same prefix stack;
//! completions with text and token-id prompts and log-probs with ids; bad requests get 4xx with
//! an OpenAI-style error body; metrics, models, cartridges and health answer.

mod common;

use cartridge_runtime::generate::SamplingParams;
use common::{fixture, get, post, post_raw, post_stream, runtime_answer};
use serde_json::{json, Value};

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn assert_openai_error(status: u16, body: &Value, want_status: u16, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(e["type"].is_string(), "{what}: {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {body}"
    );
}

#[test]
fn chat_with_zero_one_and_two_cartridges_equals_the_runtime() {
    let f = fixture(|_| {});
    let tok = &f.loaded.tokenizer;
    // Sampled with a seed (the tiny random model's greedy answers are too repetitive to tell
    // prefixes apart); the server honours the seed exactly.
    let sampling = SamplingParams {
        temperature: 0.8,
        top_k: None,
        top_p: None,
        seed: 3,
    };
    let mut answers = Vec::new();
    for carts in [&[][..], &["a"][..], &["a", "b"][..], &["b", "a"][..]] {
        let want = runtime_answer(&f, carts, "hello there", 12, sampling.clone());
        answers.push(want.clone());
        let body = json!({
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 12,
            "temperature": 0.8,
            "seed": 3,
            "cartridges": carts.iter().map(|c| json!({"id": c})).collect::<Vec<_>>(),
        });
        let (status, v) = post(&f.base, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(ids_of(&choice["token_ids"]), want, "cartridges {carts:?}");
        let text_ids: Vec<u32> = want
            .iter()
            .copied()
            .filter(|&t| t != common::IM_END)
            .collect();
        let want_text = tok.decode(&text_ids, true).expect("decode");
        assert_eq!(choice["message"]["content"], json!(want_text));
        let finish = if want.last() == Some(&common::IM_END) {
            "stop"
        } else {
            "length"
        };
        assert_eq!(choice["finish_reason"], json!(finish));
        assert_eq!(v["usage"]["completion_tokens"], json!(want.len()));

        // The same request streamed: the deltas add up to the same text, then [DONE].
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let (events, done) = post_stream(&f.base, "/v1/chat/completions", &sbody);
        assert!(done, "no [DONE]");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], json!("assistant"));
        let streamed: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, want_text, "streamed, cartridges {carts:?}");
        let last = events.last().expect("events");
        assert_eq!(last["choices"][0]["finish_reason"], json!(finish));
    }
    // The prefix matters: each cartridge set gives its own answer, so the equalities above could
    // not hold by accident. ([a, b] and [b, a] agree: keys keep the rotation they were trained
    // with and the user's tokens start after the total length, so attention over the prefix
    // does not depend on slot order.)
    for i in 0..3 {
        for j in 0..i {
            assert_ne!(answers[i], answers[j], "sets {i} and {j} answer alike");
        }
    }
}

#[test]
fn completions_take_text_or_ids_and_return_logprobs_with_ids() {
    let f = fixture(|_| {});
    let prompt: Vec<u32> = vec![40, 41, 42, 43, 44];
    let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3,
                      "cartridges": [{"id": "a.cart"}], "return_tokens_as_token_ids": true});
    let (status, v) = post(&f.base, "/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    let ids = ids_of(&choice["token_ids"]);
    assert_eq!(ids.len(), 6);
    let lp = &choice["logprobs"];
    assert_eq!(ids_of(&lp["token_ids"]), ids);
    let tokens: Vec<String> = ids.iter().map(|i| format!("token_id:{i}")).collect();
    assert_eq!(lp["tokens"], json!(tokens));
    for (pos, alts) in lp["top_logprobs_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .enumerate()
    {
        let alts = alts.as_array().expect("alts");
        assert_eq!(alts.len(), 3);
        // Greedy: the chosen token is the most probable, with the chosen log-prob.
        assert_eq!(alts[0][0].as_u64(), Some(ids[pos] as u64));
        let chosen = lp["token_logprobs"][pos].as_f64().expect("lp");
        assert!((alts[0][1].as_f64().expect("lp") - chosen).abs() < 1e-6);
        assert!(chosen <= 0.0);
        // The legacy map has the same entries keyed by token_id:N.
        let key = format!("token_id:{}", ids[pos]);
        assert!(lp["top_logprobs"][pos].get(&key).is_some());
    }
    // Same ids as the runtime run directly after the cartridge.
    let kv = cartridge_runtime::cartridge_file::load_cartridge(
        &f.carts.path().join("a.cart"),
        &f.loaded.fingerprint,
        &candle_core::Device::Cpu,
    )
    .expect("cart");
    let req = cartridge_runtime::generate::GenerateRequest {
        prompt,
        sampling: cartridge_runtime::generate::SamplingParams::greedy(),
        max_tokens: 6,
        stop_tokens: f.loaded.tokenizer.eos_token_ids().to_vec(),
        top_logprobs: 0,
    };
    let want = cartridge_runtime::generate::generate(&f.model, Some(&kv), &req, |_| {
        cartridge_runtime::generate::Control::Continue
    })
    .expect("generate");
    assert_eq!(ids, want.tokens);

    // Chat log-probs without alternatives: the chosen token's only, with its id.
    let (status, v) = post(
        &f.base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "logprobs": true, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    assert_eq!(content.len(), 3);
    assert_eq!(
        ids_of(&v["choices"][0]["token_ids"])[0] as u64,
        content[0]["token_id"].as_u64().expect("id")
    );
    assert!(content
        .iter()
        .all(|c| c["top_logprobs"].as_array().is_some_and(Vec::is_empty)));
    assert!(content
        .iter()
        .all(|c| c["logprob"].as_f64().is_some_and(|l| l <= 0.0)));

    // Text prompt, streamed, with a seed: the same seed gives the same text twice.
    let body = json!({"prompt": "abc", "max_tokens": 8, "temperature": 0.9, "seed": 5,
                      "stream": true});
    let run = || {
        let (events, done) = post_stream(&f.base, "/v1/completions", &body);
        assert!(done);
        events
            .iter()
            .map(|e| e["choices"][0]["text"].as_str().unwrap_or("").to_string())
            .collect::<String>()
    };
    assert_eq!(run(), run());
}

#[test]
fn bad_requests_get_openai_style_4xx() {
    let f = fixture(|c| c.limits.max_body_bytes = 2048);
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "malformed JSON",
            r#"{"messages": [{"role": "user""#.into(),
            400,
        ),
        ("not JSON", "hello".into(), 400),
        ("wrong type", json!({"messages": "hi"}).to_string(), 400),
        (
            "wrong number type",
            json!({"messages": user, "max_tokens": "3"}).to_string(),
            400,
        ),
        (
            "negative seed",
            json!({"messages": user, "seed": -1}).to_string(),
            400,
        ),
        ("no messages", json!({"messages": []}).to_string(), 400),
        (
            "unknown cartridge",
            json!({"messages": user, "cartridges": [{"id": "nope"}]}).to_string(),
            404,
        ),
        (
            "dot-dot id",
            json!({"messages": user, "cartridges": [{"id": "../a"}]}).to_string(),
            400,
        ),
        (
            "absolute id",
            json!({"messages": user, "cartridges": [{"id": "/etc/passwd"}]}).to_string(),
            400,
        ),
        (
            "separator id",
            json!({"messages": user, "cartridges": [{"id": "x/a"}]}).to_string(),
            400,
        ),
        (
            "cartridge not an object",
            json!({"messages": user, "cartridges": ["a"]}).to_string(),
            400,
        ),
        (
            "temperature",
            json!({"messages": user, "temperature": -2}).to_string(),
            400,
        ),
        ("n", json!({"messages": user, "n": 3}).to_string(), 400),
        (
            "max tokens",
            json!({"messages": user, "max_tokens": 0}).to_string(),
            400,
        ),
        (
            "past the window",
            json!({"messages": user, "max_tokens": 2000}).to_string(),
            400,
        ),
        (
            "other model",
            json!({"messages": user, "model": "gpt-9"}).to_string(),
            404,
        ),
        (
            "oversized body",
            json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]}).to_string(),
            413,
        ),
    ];
    for (what, body, want) in cases {
        let (status, _, v) = post_raw(&f.base, chat, &body);
        assert_openai_error(status, &v, want, what);
    }
    let comp = "/v1/completions";
    for (what, body, want) in [
        ("id past the vocabulary", json!({"prompt": [1, 99999]}), 400),
        ("mixed prompt", json!({"prompt": [1, "a"]}), 400),
        ("empty prompt", json!({"prompt": []}), 400),
        (
            "too many logprobs",
            json!({"prompt": "a", "logprobs": 50}),
            400,
        ),
    ] {
        let (status, v) = post(&f.base, comp, &body);
        assert_openai_error(status, &v, want, what);
    }
    let (status, body) = get(&f.base, "/v1/nothing");
    assert_openai_error(
        status,
        &serde_json::from_str(&body).expect("json"),
        404,
        "no route",
    );
    // A symlink out of the folder is not served either.
    #[cfg(unix)]
    {
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::copy(f.carts.path().join("a.cart"), outside.path().join("x.cart")).expect("cp");
        std::os::unix::fs::symlink(
            outside.path().join("x.cart"),
            f.carts.path().join("link.cart"),
        )
        .expect("symlink");
        let (status, v) = post(
            &f.base,
            chat,
            &json!({"messages": user, "cartridges": [{"id": "link"}]}),
        );
        assert_openai_error(status, &v, 404, "symlink out of the folder");
    }
    // The server is fine afterwards.
    let (status, v) = post(&f.base, chat, &json!({"messages": user, "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn models_cartridges_metrics_and_health() {
    let f = fixture(|c| c.cache_bytes = 1);
    let (status, body) = get(&f.base, "/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    let fp: cartridge_formats::ModelFingerprint =
        serde_json::from_value(v["data"][0]["fingerprint"].clone()).expect("fingerprint");
    assert_eq!(fp, f.loaded.fingerprint);
    let (status, body) = get(&f.base, "/v1/cartridges");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(v["data"][0]["tokens"], json!(5));
    // Using a then b with a budget of 1 byte: each load evicts the other.
    for c in ["a", "b", "a"] {
        let (s, v) = post(
            &f.base,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                    "cartridges": [{"id": c}]}),
        );
        assert_eq!(s, 200, "{v}");
    }
    let (status, text) = get(&f.base, "/metrics");
    assert_eq!(status, 200);
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    assert_eq!(metric("cartridge_loaded_cartridges "), 1.0);
    assert_eq!(metric("cartridge_cartridge_loads_total "), 3.0);
    assert_eq!(metric("cartridge_cartridge_evictions_total "), 2.0);
    assert!(metric("cartridge_loaded_cartridge_bytes ") > 0.0);
    assert_eq!(metric("cartridge_generated_tokens_total "), 3.0);
    assert_eq!(metric("cartridge_request_seconds_count "), 3.0);
    assert!(text
        .contains("cartridge_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 3"));
    let (status, body) = get(&f.base, "/health");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["status"],
        json!("ok")
    );
}

#[test]
fn a_soft_prompt_after_a_cartridge_equals_the_runtime_stack() {
    use candle_core::{Device, Tensor};
    use cartridge_formats::cart::{Compression, Provenance};
    use cartridge_runtime::cartridge_file::{load_cartridge, save_soft_prompt, SoftPrompt};
    use cartridge_runtime::chat_template::ChatMessage;
    use cartridge_runtime::generate::{generate, Control, GenerateRequest};
    use cartridge_runtime::{Path, PrefixStack};

    let f = fixture(|_| {});
    let hidden = f.model.config().hidden_size;
    let values: Vec<f32> = (0..4 * hidden)
        .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
        .collect();
    let embeddings = Tensor::from_vec(values, (4, hidden), &Device::Cpu).expect("tensor");
    let soft = SoftPrompt {
        embeddings: embeddings.clone(),
        summary: Some("A summary.".into()),
    };
    let fp = &f.loaded.fingerprint;
    let path = f.carts.path().join("sp.cart");
    save_soft_prompt(&path, &soft, fp, Provenance::default(), Compression::None).expect("save");

    let cart = load_cartridge(&f.carts.path().join("a.cart"), fp, &Device::Cpu).expect("cart");
    let prefix = PrefixStack::new()
        .with_cartridge(cart)
        .with_soft_prompt(embeddings)
        .resolve(&f.model, Path::Infer)
        .expect("resolve");
    // The summary is the system message, as `cartridge chat` renders it.
    let msgs = [
        ChatMessage::new("system", "A summary."),
        ChatMessage::new("user", "hi"),
    ];
    let text = f
        .loaded
        .chat_template
        .as_ref()
        .expect("template")
        .render(&msgs, true);
    let prompt = f
        .loaded
        .tokenizer
        .encode(&text.expect("render"), false)
        .expect("encode");
    let sampling = SamplingParams {
        temperature: 0.8,
        top_k: None,
        top_p: None,
        seed: 9,
    };
    let req = GenerateRequest {
        prompt,
        sampling,
        max_tokens: 10,
        stop_tokens: cartridge_server::chat_stop_tokens(&f.loaded.tokenizer),
        top_logprobs: 0,
    };
    let want = generate(&f.model, prefix.as_ref(), &req, |_| Control::Continue).expect("gen");
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                      "temperature": 0.8, "seed": 9, "cartridges": [{"id": "a"}],
                      "soft_prompt": {"id": "sp"}});
    let (status, v) = post(&f.base, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids_of(&v["choices"][0]["token_ids"]), want.tokens);
    // A soft prompt named as a cartridge (or the reverse) is refused.
    let (status, v) = post(
        &f.base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "cartridges": [{"id": "sp"}]}),
    );
    assert_openai_error(status, &v, 400, "soft prompt as a cartridge");
    let (status, v) = post(
        &f.base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "soft_prompt": {"id": "a"}}),
    );
    assert_openai_error(status, &v, 400, "cartridge as a soft prompt");
}
