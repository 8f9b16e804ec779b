//! `cartridge eval`: a malformed question file is refused with the file and line number before any
//! model is loaded; on the real default model, the corpus in context beats the bare model on
//! questions about it, and the JSON report carries every mode's figures.
//!
//! The real-model test needs the default model (`scripts/fetch-model.sh`); without it it prints a
//! note and passes, except under CI (`CI` set), where a missing model is a failure.

mod common;

use common::{cartridge, model_path};

#[test]
fn malformed_question_line_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qa = dir.path().join("qa.jsonl");
    std::fs::write(
        &qa,
        "{\"question\": \"Q?\", \"answer\": \"A\"}\n{\"question\": \"Q2?\", \"answr\": \"B\"}\n",
    )
    .expect("write");
    let out = cartridge(&["eval", "--data", qa.to_str().expect("utf-8 path")]);
    // Bad input: exit 2, like a corrupt .cart.
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("qa.jsonl:2: missing or empty \"answer\""),
        "stderr: {stderr}"
    );
}

const CORPUS: &str =
    "The lighthouse of Velmora, called the Gray Needle, is 41 meters tall. It was \
    rebuilt in 1788 by the engineer Margit Solheim. Its lamp is visible for 19 nautical miles. The \
    most famous keeper was Tomas Arvidsen, who kept the light from 1841 to 1872.";

const QUESTIONS: &str = r#"{"question": "How tall is the Gray Needle?", "answer": "41 meters"}
{"question": "Who rebuilt the Gray Needle?", "answer": "Margit Solheim"}
{"question": "Who was the most famous keeper of the Gray Needle?", "answer": "Tomas Arvidsen"}
{"question": "For how many nautical miles is the lamp visible?", "options": ["12", "19", "27"], "answer_index": 1}
"#;

#[test]
fn corpus_in_context_beats_the_bare_model() {
    let Some(model) = model_path() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let corpus = dir.path().join("velmora.md");
    std::fs::write(&corpus, CORPUS).expect("write corpus");
    let qa = dir.path().join("qa.jsonl");
    std::fs::write(&qa, QUESTIONS).expect("write questions");
    let png = dir.path().join("eval.png");
    let arg = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();
    let out = cartridge(&[
        "eval",
        "--model",
        &arg(&model),
        "--data",
        &arg(&qa),
        "--corpus",
        &arg(&corpus),
        "--icl-budget",
        "48",
        "--json",
        "--plot",
        &arg(&png),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let modes = report["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, ["bare", "icl", "icl@48"]);
    let ll = |i: usize| {
        modes[i]["qa"]["answer_logprob"]
            .as_f64()
            .expect("answer_logprob")
    };
    assert!(
        ll(1) > ll(0) + 0.5,
        "ICL {} should beat bare {} by a clear margin",
        ll(1),
        ll(0)
    );
    assert_eq!(modes[1]["gap_closed"].as_f64(), Some(1.0));
    assert_eq!(modes[0]["gap_closed"].as_f64(), Some(0.0));
    assert_eq!(modes[1]["gap_closed_capped"].as_f64(), Some(1.0));
    assert_eq!(modes[0]["gap_closed_capped"].as_f64(), Some(0.0));
    // SmolLM2-135M: 30 layers x (K, V) x 3 KV heads x 64 x 4 bytes = 46,080 bytes per token.
    for m in modes {
        let tokens = m["prefix_tokens"].as_u64().expect("prefix_tokens");
        assert_eq!(m["kv_bytes"].as_u64(), Some(tokens * 46_080));
        assert_eq!(m["qa"]["mc_items"].as_u64(), Some(1));
        assert!(m["time_to_first_token_s"].as_f64().expect("ttft") > 0.0);
    }
    assert!(modes[2]["prefix_tokens"].as_u64().expect("tokens") <= 48);
    assert_eq!(report["qa_items"].as_u64(), Some(4));
    let png = std::fs::read(&png).expect("plot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}
