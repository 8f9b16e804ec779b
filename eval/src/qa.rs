//! Question files: JSON lines of `{"question": ..., "answer": ...}`, or multiple choice
//! `{"question": ..., "options": [...], "answer_index": i}` (an `answer` next to `options` must be
//! `options[answer_index]`). Blank lines are skipped; other members are ignored. Every problem is
//! reported with its file and 1-based line number.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The options of a multiple-choice item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choices {
    /// The candidate answers (at least two).
    pub options: Vec<String>,
    /// Which of them is right.
    pub answer_index: usize,
}

/// One question with its reference answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QaItem {
    /// The question, asked as the user's message.
    pub question: String,
    /// The reference answer (for multiple choice, the right option).
    pub answer: String,
    /// Multiple-choice options, when the item has them.
    pub choices: Option<Choices>,
}

/// A line as written, before the rules are checked.
#[derive(Debug, Deserialize)]
struct RawItem {
    question: Option<String>,
    answer: Option<String>,
    options: Option<Vec<String>>,
    answer_index: Option<usize>,
}

fn check(raw: RawItem) -> std::result::Result<QaItem, String> {
    let question = raw
        .question
        .filter(|q| !q.trim().is_empty())
        .ok_or("missing or empty \"question\"")?;
    let answer = raw.answer.filter(|a| !a.trim().is_empty());
    match (raw.options, raw.answer_index) {
        (None, None) => Ok(QaItem {
            question,
            answer: answer.ok_or("missing or empty \"answer\" (or \"options\")")?,
            choices: None,
        }),
        (None, Some(_)) => Err("\"answer_index\" without \"options\"".into()),
        (Some(_), None) => Err("\"options\" without \"answer_index\"".into()),
        (Some(options), Some(i)) => {
            if options.len() < 2 {
                return Err(format!(
                    "{} option(s): at least 2 are needed",
                    options.len()
                ));
            }
            if options.iter().any(|o| o.trim().is_empty()) {
                return Err("an option is empty".into());
            }
            let right = options.get(i).ok_or_else(|| {
                format!("\"answer_index\" {i} is past the {} options", options.len())
            })?;
            if let Some(a) = &answer {
                if a.trim() != right.trim() {
                    return Err(format!("\"answer\" {a:?} is not options[{i}] {right:?}"));
                }
            }
            Ok(QaItem {
                question,
                answer: right.clone(),
                choices: Some(Choices {
                    options,
                    answer_index: i,
                }),
            })
        }
    }
}

/// Parse the text of a question file; `path` names it in errors.
pub fn parse_qa(text: &str, path: &Path) -> Result<Vec<QaItem>> {
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::QaLine {
            path: path.to_path_buf(),
            line: n + 1,
            message,
        };
        let raw: RawItem = serde_json::from_str(line)
            .map_err(|e| bad(format!("not a JSON object of a question: {e}")))?;
        items.push(check(raw).map_err(bad)?);
    }
    if items.is_empty() {
        return Err(Error::Config(format!(
            "{}: no questions in the file",
            path.display()
        )));
    }
    Ok(items)
}

/// Read and parse a question file.
pub fn read_qa(path: &Path) -> Result<Vec<QaItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_qa(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        parse_qa(text, Path::new("q.jsonl"))
            .expect_err("must fail")
            .to_string()
    }

    #[test]
    fn open_and_multiple_choice_items_parse() {
        let text = "{\"question\": \"Q1?\", \"answer\": \"A1\", \"source\": \"x.md\"}\n\n\
                    {\"question\": \"Q2?\", \"options\": [\"a\", \"b\"], \"answer_index\": 1}\n";
        let items = parse_qa(text, Path::new("q.jsonl")).expect("parse");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].answer, "A1");
        assert!(items[0].choices.is_none());
        assert_eq!(items[1].answer, "b");
        assert_eq!(items[1].choices.as_ref().map(|c| c.answer_index), Some(1));
    }

    #[test]
    fn malformed_lines_are_named_by_number() {
        let good = "{\"question\": \"Q?\", \"answer\": \"A\"}\n";
        let e = err_of(&format!(
            "{good}{good}{{\"question\": \"Q?\", \"answer\": \n"
        ));
        assert!(e.starts_with("q.jsonl:3: not a JSON object"), "{e}");
        let e = err_of(&format!("{good}\n{{\"question\": \"Q?\"}}\n"));
        assert!(
            e.starts_with("q.jsonl:3: missing or empty \"answer\""),
            "{e}"
        );
        let e = err_of("{\"question\": \"Q?\", \"options\": [\"a\", \"b\"], \"answer_index\": 2}");
        assert!(
            e.contains("q.jsonl:1:") && e.contains("past the 2 options"),
            "{e}"
        );
        let e = err_of(
            "{\"question\": \"Q?\", \"answer\": \"a\", \"options\": [\"a\", \"b\"], \"answer_index\": 1}",
        );
        assert!(e.contains("is not options[1]"), "{e}");
        let e = err_of("{\"question\": \"Q?\", \"answer\": \"a\", \"answer_index\": 0}");
        assert!(e.contains("without \"options\""), "{e}");
        let e = err_of("[1, 2]");
        assert!(e.starts_with("q.jsonl:1:"), "{e}");
        assert!(err_of("\n\n").contains("no questions"));
    }
}
