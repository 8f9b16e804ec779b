//! Seed prompts: instructions to the *user role* to write one message about the excerpt it sees
//! (DESIGN.md §4). Five kinds, each with several phrasings of our own, drawn by configurable
//! weights (uniform by default); a user file can add more phrasings. A sixth kind, `recall`, is
//! ours and off by default: its phrasing is the user's message itself (no user role runs), asking
//! the assistant to repeat the excerpt word for word from a quoted opening, so the teacher's
//! answers spread the corpus's own sentences evenly over the data. A seventh, `verbatim`, asks
//! the same, but its answer is the excerpt's own text, which the teacher scores instead of
//! writing: a teacher too small to recite still gives its distribution at every fact.

use rand::Rng;

use crate::error::{Error, Result};

/// The kinds of seed prompt.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SeedKind {
    /// Restate part of the excerpt in a structured format (JSON, YAML, TOML, a table...).
    Structuring,
    /// Summarise part or all of the excerpt.
    Summarization,
    /// Ask a specific question the excerpt answers.
    Question,
    /// Ask for help with a practical task that relies on the excerpt.
    UseCase,
    /// Ask for something creative grounded in the excerpt.
    Creative,
    /// Not written by the user role: a fixed request to repeat the excerpt word for word from
    /// an opening quoted from a random place in it (`{opening}` in the phrasing).
    Recall,
    /// [`SeedKind::Recall`]'s request, answered with the excerpt's own text from the quoted
    /// opening on; the teacher scores that answer (its top-k before each token) instead of
    /// generating one. Needs a backend that can score ([`crate::backend::Backend::can_score`]).
    Verbatim,
}

impl SeedKind {
    /// All kinds, in a fixed order. Kinds added later come last, so datasets drawn without them
    /// (weight 0) draw exactly what they drew before those kinds existed.
    pub const ALL: [SeedKind; 7] = [
        SeedKind::Structuring,
        SeedKind::Summarization,
        SeedKind::Question,
        SeedKind::UseCase,
        SeedKind::Creative,
        SeedKind::Recall,
        SeedKind::Verbatim,
    ];

    /// The name stored in datasets.
    pub fn name(self) -> &'static str {
        match self {
            SeedKind::Structuring => "structuring",
            SeedKind::Summarization => "summarization",
            SeedKind::Question => "question",
            SeedKind::UseCase => "use_case",
            SeedKind::Creative => "creative",
            SeedKind::Recall => "recall",
            SeedKind::Verbatim => "verbatim",
        }
    }

    /// Whether the phrasing is sent as the user's message as it is, instead of instructing the
    /// user role to write one.
    pub fn is_fixed_message(self) -> bool {
        matches!(self, SeedKind::Recall | SeedKind::Verbatim)
    }

    /// Parse a name (`use-case` and `use_case` both work).
    pub fn parse(s: &str) -> Option<SeedKind> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        SeedKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Formats the structuring seeds ask for.
const FORMATS: [&str; 6] = ["JSON", "YAML", "TOML", "XML", "a Markdown table", "CSV"];

/// Where a recall (or verbatim) phrasing quotes the opening of the text to repeat.
pub const OPENING: &str = "{opening}";

/// The user role's instruction after a recall seed's first exchange (turns > 1): the first
/// message was not its own, so it is asked to follow up on what was quoted.
pub const RECALL_FOLLOW_UP: &str = "You asked the assistant to repeat a passage of the excerpt \
     above. Write one specific follow-up question about what that passage says. Output only the \
     question.";

/// Our built-in phrasings. `{format}` is replaced by one of [`FORMATS`]; `{opening}` (recall) by
/// a few words quoted from the excerpt when the conversation is synthesised.
fn builtin(kind: SeedKind) -> &'static [&'static str] {
    match kind {
        SeedKind::Structuring => &[
            "Write one message asking the assistant to take a specific part of the excerpt above \
             and rewrite its facts as {format}. Name the part precisely (a heading, a function, a \
             clause, a date) so there is no doubt which part you mean. Output only the message.",
            "You want the key details of one section of the excerpt organised as {format}. Write \
             the single request you would send to the assistant, saying which section and which \
             fields you expect. Output only the request.",
            "Compose a short instruction for the assistant: extract the entities, numbers and \
             relationships from one concrete passage of the excerpt into {format}. Quote a few \
             words of the passage so it can be located. Reply with the instruction alone.",
        ],
        SeedKind::Summarization => &[
            "Write one message asking the assistant to summarise a specific part of the excerpt \
             above. Say exactly which part (by its title, names or topic) and how long the summary \
             should be. Output only the message.",
            "You are a busy reader who needs the gist of the excerpt. Write the single request you \
             would send to get a concise summary of its main points, mentioning what you care \
             about most. Output only the request.",
            "Compose a request for a summary of one passage in the excerpt aimed at a newcomer to \
             the subject, naming the passage precisely. Reply with the request alone.",
        ],
        SeedKind::Question => &[
            "Write one specific question that can be answered from the excerpt above. Include \
             enough detail (names, identifiers, numbers, titles) that the question is unambiguous. \
             Output only the question.",
            "Ask the assistant a question that requires combining two or more facts from the \
             excerpt. Mention the concrete details the question is about. Output only the question.",
            "Write a factual question about a detail of the excerpt that a careless reader could \
             get wrong. Make it precise and self-contained. Reply with the question alone.",
            "Ask why or how something described in the excerpt happens or works, referring to it \
             by its specific name or wording. Output only the question.",
        ],
        SeedKind::UseCase => &[
            "Think of a realistic task someone could accomplish with the information in the \
             excerpt above. Write the one message that person would send to the assistant to get \
             help with that task, including the relevant specifics. Output only the message.",
            "Imagine you must make a decision or solve a practical problem that depends on the \
             excerpt. Write your single request to the assistant, describing your situation and \
             what you need. Output only the request.",
            "Write a message from a professional who relies on the content of the excerpt for \
             their work and needs the assistant to apply it to a concrete case. Reply with the \
             message alone.",
        ],
        SeedKind::Creative => &[
            "Write one message asking the assistant for a creative piece (a short poem, a story, a \
             dialogue, an analogy) that is grounded in specific details of the excerpt above. Say \
             which details must appear. Output only the message.",
            "Ask the assistant to explain an idea from the excerpt to a child, using an inventive \
             comparison. Name the idea precisely. Output only the request.",
            "Compose a playful but precise request: have the assistant imagine a conversation \
             between two people, places or components mentioned in the excerpt. Reply with the \
             request alone.",
        ],
        SeedKind::Recall | SeedKind::Verbatim => &[
            "Repeat, word for word, the passage of the excerpt that begins: \"{opening}\"",
            "Quote the excerpt exactly as written, starting from \"{opening}\".",
            "Continue the excerpt word for word from: \"{opening}\"",
        ],
    }
}

/// Relative weights of the five kinds (need not sum to one).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SeedWeights {
    /// Structuring.
    pub structuring: f64,
    /// Summarization.
    pub summarization: f64,
    /// Question.
    pub question: f64,
    /// Use case.
    pub use_case: f64,
    /// Creative.
    pub creative: f64,
    /// Recall (0 unless asked for; left out of stored settings when 0, so datasets made before
    /// it existed still resume).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recall: f64,
    /// Verbatim (0 unless asked for; left out of stored settings when 0, like `recall`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub verbatim: f64,
}

fn is_zero(w: &f64) -> bool {
    *w == 0.0
}

impl Default for SeedWeights {
    fn default() -> Self {
        Self {
            structuring: 1.0,
            summarization: 1.0,
            question: 1.0,
            use_case: 1.0,
            creative: 1.0,
            recall: 0.0,
            verbatim: 0.0,
        }
    }
}

impl SeedWeights {
    fn get(&self, k: SeedKind) -> f64 {
        match k {
            SeedKind::Structuring => self.structuring,
            SeedKind::Summarization => self.summarization,
            SeedKind::Question => self.question,
            SeedKind::UseCase => self.use_case,
            SeedKind::Creative => self.creative,
            SeedKind::Recall => self.recall,
            SeedKind::Verbatim => self.verbatim,
        }
    }

    /// Parse `kind=weight,kind=weight` (kinds not named keep weight 0 when any is named).
    pub fn parse(s: &str) -> Result<Self> {
        let mut w = SeedWeights {
            structuring: 0.0,
            summarization: 0.0,
            question: 0.0,
            use_case: 0.0,
            creative: 0.0,
            recall: 0.0,
            verbatim: 0.0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| Error::Seeds(format!("weight {part:?} is not kind=number")))?;
            let kind = SeedKind::parse(k)
                .ok_or_else(|| Error::Seeds(format!("unknown seed kind {k:?}")))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| Error::Seeds(format!("weight {v:?} is not a number")))?;
            match kind {
                SeedKind::Structuring => w.structuring = v,
                SeedKind::Summarization => w.summarization = v,
                SeedKind::Question => w.question = v,
                SeedKind::UseCase => w.use_case = v,
                SeedKind::Creative => w.creative = v,
                SeedKind::Recall => w.recall = v,
                SeedKind::Verbatim => w.verbatim = v,
            }
        }
        Ok(w)
    }
}

/// A seed prompt drawn for one conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// Its kind.
    pub kind: SeedKind,
    /// The instruction to the user role.
    pub text: String,
}

/// The seed prompts to draw from.
#[derive(Debug, Clone)]
pub struct SeedBank {
    weights: SeedWeights,
    extra: Vec<(SeedKind, String)>,
}

impl SeedBank {
    /// Built-in phrasings, drawn by `weights`, plus `extra` phrasings (e.g. from
    /// [`parse_seed_file`]).
    pub fn new(weights: SeedWeights, extra: Vec<(SeedKind, String)>) -> Result<Self> {
        let ws: Vec<f64> = SeedKind::ALL.iter().map(|&k| weights.get(k)).collect();
        if ws.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(Error::Seeds(format!(
                "weights must be finite and non-negative, got {weights:?}"
            )));
        }
        if ws.iter().sum::<f64>() <= 0.0 {
            return Err(Error::Seeds(
                "at least one seed kind needs a positive weight".into(),
            ));
        }
        Ok(Self { weights, extra })
    }

    /// All phrasings of `kind` (built-in, then extra).
    pub fn phrasings(&self, kind: SeedKind) -> Vec<String> {
        builtin(kind)
            .iter()
            .map(|s| s.to_string())
            .chain(
                self.extra
                    .iter()
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, s)| s.clone()),
            )
            .collect()
    }

    /// Draw a kind by weight, then a phrasing uniformly, then (structuring) a format.
    pub fn draw(&self, rng: &mut impl Rng) -> Seed {
        let total: f64 = SeedKind::ALL.iter().map(|&k| self.weights.get(k)).sum();
        let mut r = rng.random::<f64>() * total;
        let mut kind = SeedKind::Creative;
        for k in SeedKind::ALL {
            let w = self.weights.get(k);
            if w > 0.0 {
                kind = k;
                if r < w {
                    break;
                }
                r -= w;
            }
        }
        let phrasings = self.phrasings(kind);
        let text = phrasings[rng.random_range(0..phrasings.len())].clone();
        let format = FORMATS[rng.random_range(0..FORMATS.len())];
        Seed {
            kind,
            text: text.replace("{format}", format),
        }
    }
}

/// Parse a seed file: one `kind: prompt` per line; blank lines and lines starting with `#` are
/// ignored. `{format}` in a structuring prompt is replaced by a format name when drawn.
pub fn parse_seed_file(text: &str) -> Result<Vec<(SeedKind, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, p) = line
            .split_once(':')
            .ok_or_else(|| Error::Seeds(format!("line {}: expected `kind: prompt`", i + 1)))?;
        let kind = SeedKind::parse(k).ok_or_else(|| {
            Error::Seeds(format!(
                "line {}: unknown seed kind {:?} (structuring, summarization, question, use_case, creative, recall, verbatim)",
                i + 1,
                k.trim()
            ))
        })?;
        let p = p.trim();
        if p.is_empty() {
            return Err(Error::Seeds(format!("line {}: empty prompt", i + 1)));
        }
        if kind.is_fixed_message() && !p.contains(OPENING) {
            return Err(Error::Seeds(format!(
                "line {}: a {} prompt must say where the quoted opening goes ({OPENING})",
                i + 1,
                kind.name()
            )));
        }
        out.push((kind, p.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn uniform_by_default_and_weights_respected() {
        let bank = SeedBank::new(SeedWeights::default(), Vec::new()).expect("bank");
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..5000 {
            *counts.entry(bank.draw(&mut rng).kind).or_insert(0) += 1;
        }
        for k in SeedKind::ALL {
            let c = counts.get(&k).copied().unwrap_or(0);
            if k.is_fixed_message() {
                assert_eq!(c, 0, "{k:?} is off by default");
            } else {
                assert!((800..1200).contains(&c), "{k:?}: {c}");
            }
        }
        let only_q =
            SeedBank::new(SeedWeights::parse("question=1").expect("w"), Vec::new()).expect("bank");
        assert!((0..100).all(|_| only_q.draw(&mut rng).kind == SeedKind::Question));
        assert!(SeedBank::new(SeedWeights::parse("question=0").expect("w"), Vec::new()).is_err());
    }

    #[test]
    fn seed_file_adds_phrasings() {
        let extra = parse_seed_file("# mine\nquestion: Ask about dates.\nuse-case: Plan a trip.\n")
            .expect("parse");
        assert_eq!(extra.len(), 2);
        let bank = SeedBank::new(SeedWeights::default(), extra).expect("bank");
        assert!(bank
            .phrasings(SeedKind::UseCase)
            .contains(&"Plan a trip.".to_string()));
        assert!(parse_seed_file("nonsense: x").is_err());
        assert!(parse_seed_file("recall: Repeat the excerpt.").is_err());
        assert_eq!(
            parse_seed_file("recall: Say again from {opening}.").expect("parse")[0].0,
            SeedKind::Recall
        );
        assert!(parse_seed_file("verbatim: Repeat the excerpt.").is_err());
        assert_eq!(
            parse_seed_file("verbatim: Say again from {opening}.").expect("parse")[0].0,
            SeedKind::Verbatim
        );
        assert!(parse_seed_file("no colon").is_err());
    }

    #[test]
    fn every_kind_has_several_phrasings_and_formats_are_filled() {
        for k in SeedKind::ALL {
            assert!(builtin(k).len() >= 3, "{k:?}");
        }
        let bank = SeedBank::new(SeedWeights::parse("structuring=1").expect("w"), Vec::new())
            .expect("bank");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!((0..50).all(|_| !bank.draw(&mut rng).text.contains("{format}")));
    }
}
