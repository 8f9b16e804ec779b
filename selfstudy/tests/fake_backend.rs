//! The synthesis loop drives any [`Backend`]: a scripted fake (no model) shows exactly what the
//! loop asks for and stores — shared prefix once per chunk and role, answer ids and top-k rows as
//! returned — and that a backend returning malformed top-k is refused.

use cartridge_formats::dataset::{Dataset, ReadOptions, Record};
use cartridge_formats::fingerprint::sha256_hex;
use cartridge_formats::ModelFingerprint;
use cartridge_selfstudy::corpus::{Corpus, CorpusFile};
use cartridge_selfstudy::{
    synthesize, Backend, BackendInfo, Completion, CompletionOutput, Result, Scoring, SeedWeights,
    SynthesisConfig, TopK,
};

const END: u32 = 2;

/// Bytes are ids `3 + byte`; `<|im_end|>` is id 2; ChatML rendering.
struct Fake {
    info: BackendInfo,
    calls: Vec<(usize, usize)>,
    /// Every request's prompt and whether it asked for top-k (the assistant role does).
    prompts: Vec<(Vec<u32>, bool)>,
    bad_topk: bool,
    /// Whether it scores given answers (teacher forcing), and the answers it was asked to score.
    scores: bool,
    scored: Vec<Vec<u32>>,
}

impl Fake {
    fn new(bad_topk: bool) -> Self {
        Fake {
            info: BackendInfo {
                teacher: ModelFingerprint {
                    architecture: "llama".into(),
                    num_layers: 1,
                    hidden_size: 8,
                    num_attention_heads: 1,
                    num_kv_heads: 1,
                    head_dim: 8,
                    vocab_size: 259,
                    rope_theta: 1e4,
                    rope_scaling: None,
                    tokenizer_hash: sha256_hex(b"fake tok"),
                    weights_hash: sha256_hex(b"fake w"),
                },
                context_window: 4096,
                stop_tokens: vec![END],
            },
            calls: Vec::new(),
            prompts: Vec::new(),
            bad_topk,
            scores: true,
            scored: Vec::new(),
        }
    }
}

impl Backend for Fake {
    fn info(&self) -> &BackendInfo {
        &self.info
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("<|im_end|>") {
                out.push(END);
                rest = r;
            } else {
                out.push(3 + rest.as_bytes()[0] as u32);
                rest = &rest[1..];
            }
        }
        Ok(out)
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&i| i >= 3)
            .map(|&i| (i - 3) as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
    fn token_text(&self, id: u32) -> Result<String> {
        Ok(if id == END {
            "<|im_end|>".into()
        } else {
            self.decode(&[id])?
        })
    }
    fn render_chat(&self, messages: &[(String, String)], gen: bool) -> Result<String> {
        let mut s: String = messages
            .iter()
            .map(|(r, c)| format!("<|im_start|>{r}\n{c}<|im_end|>\n"))
            .collect();
        if gen {
            s.push_str("<|im_start|>assistant\n");
        }
        Ok(s)
    }
    fn can_score(&self) -> bool {
        self.scores
    }
    /// Before each answer token, that token at log-probability -0.5 and its next id below it.
    fn score(&mut self, _shared: &[u32], reqs: &[Scoring]) -> Result<Vec<Vec<TopK>>> {
        self.scored.extend(reqs.iter().map(|r| r.answer.clone()));
        Ok(reqs
            .iter()
            .map(|r| {
                r.answer
                    .iter()
                    .map(|&t| vec![(t, -0.5), (t + 1, -1.5)][..r.top_logprobs.min(2)].to_vec())
                    .collect()
            })
            .collect())
    }
    fn complete(&mut self, shared: &[u32], reqs: &[Completion]) -> Result<Vec<CompletionOutput>> {
        self.calls.push((shared.len(), reqs.len()));
        self.prompts
            .extend(reqs.iter().map(|r| (r.prompt.clone(), r.top_logprobs > 0)));
        Ok(reqs
            .iter()
            .map(|r| {
                // "ok" + the seed's last digit, then the stop token.
                let digit = b'0' + (r.seed % 10) as u8;
                let tokens = vec![3 + b'o' as u32, 3 + b'k' as u32, 3 + digit as u32, END];
                let rows = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        // A broken backend returns rows of changing widths.
                        let k = if self.bad_topk {
                            1 + i % 2
                        } else {
                            r.top_logprobs
                        };
                        (0..k)
                            .map(|j| (t + j as u32, -(j as f32) - 0.01 * i as f32))
                            .collect()
                    })
                    .collect();
                CompletionOutput {
                    top_logprobs: if r.top_logprobs > 0 { rows } else { Vec::new() },
                    tokens,
                    stopped: true,
                }
            })
            .collect())
    }
}

fn corpus() -> Corpus {
    corpus_of("The quick brown fox jumps over the lazy dog. ".repeat(20))
}

fn corpus_of(text: String) -> Corpus {
    Corpus::from_files(
        "mem",
        vec![CorpusFile {
            path: "fox.txt".into(),
            text,
        }],
    )
    .expect("corpus")
}

fn config() -> SynthesisConfig {
    SynthesisConfig {
        num_conversations: 5,
        batch: 2,
        chunk_min_tokens: 50,
        chunk_max_tokens: 100,
        top_k: 3,
        ..SynthesisConfig::default()
    }
}

#[test]
fn the_loop_stores_what_the_backend_returns() {
    let out = tempfile::tempdir().expect("tmp");
    let mut fake = Fake::new(false);
    let s = synthesize(&config(), &mut fake, &corpus(), out.path(), false, |_| {}).expect("run");
    assert_eq!((s.written, s.chunks), (5, 3));
    // Per chunk: one user-role call and one assistant-role call, both after the same prefix.
    assert_eq!(fake.calls.len(), 6);
    for pair in fake.calls.chunks(2) {
        assert_eq!(pair[0].0, pair[1].0);
    }
    assert_eq!(
        fake.calls.iter().map(|c| c.1).collect::<Vec<_>>(),
        vec![2, 2, 2, 2, 1, 1]
    );
    let recs = Dataset::open(out.path(), ReadOptions::default())
        .expect("open")
        .records()
        .expect("records");
    for r in &recs {
        assert_eq!(r.targets.len(), 1);
        let (start, len) = r.targets[0];
        assert_eq!(len, 4);
        assert_eq!(r.tokens[start as usize + 3], END);
        assert_eq!(r.top_k, 3);
        let (ids, lps) = r.topk_row(0).expect("row");
        assert_eq!(
            ids,
            &[
                r.tokens[start as usize],
                r.tokens[start as usize] + 1,
                r.tokens[start as usize] + 2
            ]
        );
        assert_eq!(lps, &[0.0, -1.0, -2.0]);
        // The conversation tokens are the ChatML text after the system message.
        let text = fake.decode(&r.tokens[..start as usize]).expect("decode");
        assert!(text.starts_with("<|im_start|>user\n"), "{text:?}");
        assert!(text.ends_with("assistant\n"), "{text:?}");
        assert!(r.messages[0].content.starts_with("ok"));
    }
}

#[test]
fn malformed_top_k_from_a_backend_is_refused() {
    let out = tempfile::tempdir().expect("tmp");
    let mut fake = Fake::new(true);
    let err = synthesize(&config(), &mut fake, &corpus(), out.path(), false, |_| {})
        .expect_err("ragged top-k");
    assert!(err.to_string().contains("different widths"), "{err}");
}

/// Eight conversations in one chunk holding the whole corpus, whose words are distinct so a
/// quote's place in it is unambiguous; `tweak` sets what a test is about. Returns the corpus
/// text, the fake (with every prompt it was sent) and the stored records.
fn run_on_distinct_words(tweak: impl FnOnce(&mut SynthesisConfig)) -> (String, Fake, Vec<Record>) {
    let text: String = (0..400).map(|i| format!("w{i:03} ")).collect();
    let mut config = SynthesisConfig {
        num_conversations: 8,
        batch: 8,
        chunk_min_tokens: 4096,
        chunk_max_tokens: 4096,
        focus_tokens: 30,
        top_k: 3,
        ..SynthesisConfig::default()
    };
    tweak(&mut config);
    let out = tempfile::tempdir().expect("tmp");
    let mut fake = Fake::new(false);
    synthesize(
        &config,
        &mut fake,
        &corpus_of(text.clone()),
        out.path(),
        false,
        |_| {},
    )
    .expect("run");
    let recs = Dataset::open(out.path(), ReadOptions::default())
        .expect("open")
        .records()
        .expect("records");
    (text, fake, recs)
}

#[test]
fn focus_shows_only_the_user_role_a_passage_of_the_chunk() {
    let (text, fake, recs) = run_on_distinct_words(|_| {});
    let mut passages = std::collections::BTreeSet::new();
    for (prompt, teacher) in &fake.prompts {
        let shown = fake.decode(prompt).expect("decode");
        if *teacher {
            assert!(
                !shown.contains("<passage>"),
                "the teacher saw a passage: {shown:?}"
            );
            continue;
        }
        let start = shown.find("<passage>\n").expect("a passage") + "<passage>\n".len();
        let len = shown[start..].find("\n</passage>").expect("its end");
        let passage = &shown[start..start + len];
        // 30 byte tokens of the corpus, cut from it as they are.
        assert_eq!(passage.len(), 30);
        assert!(text.contains(passage), "{passage:?} is not in the corpus");
        passages.insert(passage.to_string());
    }
    assert!(
        passages.len() > 1,
        "every conversation got the same passage"
    );
    // The stored seed prompt is what the user role saw; training tokens hold no passage.
    for r in &recs {
        assert!(r.seed_prompt.starts_with("Here is one passage"));
        let tokens = fake.decode(&r.tokens).expect("decode");
        assert!(!tokens.contains("<passage>"), "{tokens:?}");
    }
    // Without it, the stored settings do not name it (older datasets resume unchanged).
    let off = serde_json::to_value(self::config()).expect("json");
    assert!(off.get("focus_tokens").is_none(), "{off}");
}

#[test]
fn recall_seeds_quote_the_chunk_and_skip_the_user_role() {
    let (text, fake, recs) = run_on_distinct_words(|c| {
        c.seed_weights = SeedWeights::parse("recall=1,question=1").expect("weights");
        c.turns = 2;
    });
    let recall: Vec<_> = recs.iter().filter(|r| r.seed_kind == "recall").collect();
    let questions = recs.len() - recall.len();
    assert!(!recall.is_empty() && questions > 0, "both kinds drawn");
    let mut openings = std::collections::BTreeSet::new();
    for r in &recall {
        // The first user message is the phrasing with whole words of the corpus quoted (24
        // byte tokens cut from it: four whole words, or three when the cut starts mid-word).
        let first = &r.messages[0];
        assert_eq!(first.role, "user");
        assert_eq!(first.content, r.seed_prompt);
        let start = first.content.find('"').expect("a quote") + 1;
        let len = first.content[start..].find('"').expect("its end");
        let opening = &first.content[start..start + len];
        let words = opening.split(' ').count();
        assert!((3..=4).contains(&words), "{opening:?}");
        assert!(opening
            .split(' ')
            .all(|w| w.len() == 4 && w.starts_with('w')));
        assert!(text.contains(opening), "{opening:?} is not in the corpus");
        openings.insert(opening.to_string());
        // Later turns are still written by the user role; every answer is the teacher's.
        assert_eq!(r.messages.len(), 4);
        assert!(r.messages[2].content.starts_with("ok"));
        assert_eq!(r.targets.len(), 2);
    }
    assert!(openings.len() > 1, "every recall quoted the same place");
    // The user role ran once per question conversation in the first turn, and once per
    // conversation of either kind in the second.
    let user_prompts = fake.prompts.iter().filter(|(_, teacher)| !teacher).count();
    assert_eq!(user_prompts, questions + recs.len());
    // No user role is instructed with a recall phrasing (it is a message, not an instruction):
    // the second turn's instruction asks for a follow-up instead.
    for (prompt, teacher) in &fake.prompts {
        let shown = fake.decode(prompt).expect("decode");
        let instruction = shown.split("<|im_start|>assistant").next().unwrap_or("");
        if !teacher {
            assert!(!instruction.contains("word for word"), "{shown:?}");
        }
    }
}

#[test]
fn verbatim_seeds_are_answered_with_the_chunk_text_the_teacher_scores() {
    let (text, fake, recs) = run_on_distinct_words(|c| {
        c.seed_weights = SeedWeights::parse("verbatim=1,question=1").expect("weights");
        c.turns = 2;
        c.top_k = 2;
        c.max_answer_tokens = 40;
    });
    let verbatim: Vec<_> = recs.iter().filter(|r| r.seed_kind == "verbatim").collect();
    assert!(
        !verbatim.is_empty() && verbatim.len() < recs.len(),
        "both kinds drawn"
    );
    assert_eq!(fake.scored.len(), verbatim.len(), "one scored answer each");
    for r in &verbatim {
        let start = r.messages[0].content.find('"').expect("a quote") + 1;
        let len = r.messages[0].content[start..].find('"').expect("its end");
        let opening = &r.messages[0].content[start..start + len];
        // The answer is whole words of the corpus from the quoted opening on: 24 to 40 byte
        // tokens cut from it (fewer where the window hangs over the corpus's end), less a
        // partial word at either end.
        let answer = &r.messages[1].content;
        assert!(answer.starts_with(opening), "{answer:?} / {opening:?}");
        assert!(
            text.contains(answer.as_str()),
            "{answer:?} is not in the corpus"
        );
        assert!((14..=40).contains(&answer.len()), "{answer:?}");
        // Its tokens are the ones scored, with the scorer's rows as the teacher's top-k.
        let (at, n) = r.targets[0];
        let ids = &r.tokens[at as usize..(at + n) as usize];
        assert_eq!(fake.decode(ids).expect("decode"), *answer);
        assert!(fake.scored.iter().any(|s| s == ids));
        assert_eq!(r.top_k, 2);
        let rows = &r.topk_ids[..2 * n as usize];
        assert!(rows.chunks(2).zip(ids).all(|(row, &t)| row == [t, t + 1]));
        assert!(r.topk_logprobs[..2 * n as usize]
            .chunks(2)
            .all(|l| l == [-0.5, -1.5]));
        // The second turn is a follow-up the user role wrote and the teacher answered.
        assert_eq!(r.messages.len(), 4);
        assert!(r.messages[3].content.starts_with("ok"));
    }
}

#[test]
fn verbatim_seeds_on_a_backend_that_cannot_score_are_refused_before_anything_is_written() {
    let out = tempfile::tempdir().expect("tmp");
    let mut fake = Fake::new(false);
    fake.scores = false;
    let config = SynthesisConfig {
        seed_weights: SeedWeights::parse("verbatim=1").expect("weights"),
        ..config()
    };
    let err = synthesize(&config, &mut fake, &corpus(), out.path(), false, |_| {})
        .expect_err("cannot score");
    assert!(err.to_string().contains("verbatim"), "{err}");
    assert!(fake.calls.is_empty());
    assert!(!out.path().join("manifest.json").exists());
}
