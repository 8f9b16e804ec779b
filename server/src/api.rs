//! The request bodies of the OpenAI endpoints we serve, with the cartridge extensions, and their
//! validation into what the engine runs: prompt ids, a prefix set and a generation request.
//!
//! Extensions over OpenAI: `cartridges: [{"id"}]` (composed in order) and `soft_prompt: {"id"}`;
//! `top_k`; `stop_token_ids` and `return_tokens_as_token_ids` (as vLLM names them); `seed` is
//! honoured exactly (same seed, same prompt, same prefix: same tokens, whatever else is batched).

use serde::Deserialize;

use crate::error::ApiError;

/// A cartridge named by a request.
#[derive(Debug, Clone, Deserialize)]
pub struct CartridgeRef {
    /// File name (with or without `.cart`) inside the served folder.
    pub id: String,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// A message's content: text, or a list of parts of which only text parts are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`).
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Its text.
    pub content: MessageContent,
}

impl MessageIn {
    /// The text, or an error for non-text parts.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            MessageContent::Text(t) => Ok(t.clone()),
            MessageContent::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (&p.kind[..], &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        _ => {
                            return Err(ApiError::invalid_param(
                                "messages",
                                format!("content parts of type {:?} are not supported", p.kind),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The prompt of `/v1/completions`: text or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// Text, tokenised by the server.
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

/// Fields shared by both completion endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// The served model's name (optional; another name is refused).
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// Sampling temperature (0: greedy; default 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Keep the k most probable tokens.
    pub top_k: Option<u32>,
    /// Sampling seed (default 0).
    pub seed: Option<u64>,
    /// Stop strings (not included in the output).
    pub stop: Option<StopField>,
    /// Extra stop token ids (included in the output's ids).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Number of choices (only 1).
    pub n: Option<u32>,
    /// Cartridges in front of the prompt, composed in this order.
    pub cartridges: Option<Vec<CartridgeRef>>,
    /// A soft prompt after the cartridges.
    pub soft_prompt: Option<CartridgeRef>,
    /// Render tokens in log-probs as `token_id:N`.
    pub return_tokens_as_token_ids: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<MessageIn>,
    /// Return the chosen tokens' log-probabilities.
    pub logprobs: Option<bool>,
    /// And this many alternatives per position.
    pub top_logprobs: Option<u32>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: Common,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Text or token ids.
    pub prompt: PromptField,
    /// Return this many top log-probabilities per position (with the chosen token's).
    pub logprobs: Option<u32>,
    /// Echo the prompt (only `false`).
    pub echo: Option<bool>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: Common,
}

/// Limits applied to every request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Longest prompt (after the prefix), in tokens.
    pub max_prompt_tokens: usize,
    /// Most tokens one request may generate.
    pub max_output_tokens: usize,
    /// Most alternatives per position.
    pub max_top_logprobs: usize,
    /// Most cartridges one request may compose.
    pub max_cartridges: usize,
    /// Longest a request may take, queueing included.
    pub timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_prompt_tokens: 8192,
            max_output_tokens: 2048,
            max_top_logprobs: 20,
            max_cartridges: 8,
            timeout: std::time::Duration::from_secs(600),
        }
    }
}

/// Stop strings as a list (at most 4, none empty).
pub fn stop_strings(stop: &Option<StopField>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if list.len() > 4 {
        return Err(ApiError::invalid_param("stop", "at most 4 stop strings"));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop strings must not be empty",
        ));
    }
    Ok(list)
}

/// Check the sampling fields and build the runtime's parameters.
pub fn sampling(c: &Common) -> Result<cartridge_runtime::generate::SamplingParams, ApiError> {
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
        return Err(ApiError::invalid_param(
            "temperature",
            "temperature must be in [0, 100]",
        ));
    }
    if let Some(p) = c.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid_param("top_p", "top_p must be in (0, 1]"));
        }
    }
    if c.top_k == Some(0) {
        return Err(ApiError::invalid_param("top_k", "top_k must be at least 1"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    Ok(cartridge_runtime::generate::SamplingParams {
        temperature,
        top_k: c.top_k.map(|k| k as usize),
        // top_p = 1 keeps everything: the same as no nucleus filter.
        top_p: c.top_p.filter(|&p| p < 1.0),
        seed: c.seed.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_and_shapes_do_not_parse() {
        let bad = [
            r#"{"messages": "hi"}"#,
            r#"{"messages": [{"role": "user", "content": 3}]}"#,
            r#"{"messages": [], "max_tokens": "ten"}"#,
            r#"{"messages": [], "cartridges": [{"name": "x"}]}"#,
            r#"{"messages": [], "seed": -1}"#,
        ];
        for b in bad {
            assert!(
                serde_json::from_str::<ChatRequest>(b).is_err(),
                "{b} parsed"
            );
        }
        let ok: ChatRequest = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                "cartridges": [{"id": "x"}], "stop": "END", "seed": 7}"#,
        )
        .expect("parse");
        assert_eq!(ok.messages[0].text().expect("text"), "a");
        assert_eq!(ok.common.seed, Some(7));
        assert_eq!(stop_strings(&ok.common.stop).expect("stop"), vec!["END"]);
        let p: CompletionRequest = serde_json::from_str(r#"{"prompt": [1, 2, 3]}"#).expect("ids");
        assert!(matches!(p.prompt, PromptField::Ids(ref v) if v == &[1, 2, 3]));
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt": [1, "a"]}"#).is_err());
    }

    #[test]
    fn sampling_ranges_are_checked() {
        let c = |t: Option<f32>, p: Option<f32>| Common {
            temperature: t,
            top_p: p,
            ..Common::default()
        };
        assert!(sampling(&c(Some(-1.0), None)).is_err());
        assert!(sampling(&c(Some(f32::NAN), None)).is_err());
        assert!(sampling(&c(None, Some(0.0))).is_err());
        let s = sampling(&c(Some(0.0), Some(1.0))).expect("ok");
        assert_eq!((s.temperature, s.top_p, s.seed), (0.0, None, 0));
    }
}
