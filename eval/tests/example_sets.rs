//! The example question sets (`examples/evals/`) parse, are big enough, and every reference answer
//! is found verbatim (up to case and line breaks) in its corpus (`examples/corpora/`), which is
//! what makes them answerable from the corpus alone.

use std::path::{Path, PathBuf};

use cartridge_eval::qa::read_qa;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The corpus's text, lower case, whitespace runs collapsed to one space.
fn corpus_text(name: &str) -> String {
    let dir = examples().join("corpora").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus folder")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let text: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read"))
        .collect();
    text.join(" ")
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn check(name: &str, min_items: usize, min_choices: usize) {
    let items = read_qa(&examples().join("evals").join(format!("{name}.jsonl"))).expect("parse");
    assert!(
        items.len() >= min_items,
        "{name}: {} questions",
        items.len()
    );
    let choices = items.iter().filter(|i| i.choices.is_some()).count();
    assert!(choices >= min_choices, "{name}: {choices} multiple-choice");
    let text = corpus_text(name);
    for it in &items {
        let answer = it.answer.to_lowercase();
        assert!(
            text.contains(&answer),
            "{name}: the answer {:?} to {:?} is not in the corpus",
            it.answer,
            it.question
        );
    }
    let mut questions: Vec<&str> = items.iter().map(|i| i.question.as_str()).collect();
    questions.sort_unstable();
    questions.dedup();
    assert_eq!(
        questions.len(),
        items.len(),
        "{name}: a question is repeated"
    );
}

#[test]
fn quenmar_questions_are_answered_by_the_corpus() {
    check("quenmar", 60, 5);
}

#[test]
fn tidewright_questions_are_answered_by_the_corpus() {
    check("tidewright", 30, 5);
}
