//! `cartridge eval` refuses a malformed question file with the file and line number, before it
//! loads any model.

mod common;

use common::cartridge;

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
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("qa.jsonl:2: missing or empty \"answer\""),
        "stderr: {stderr}"
    );
}
