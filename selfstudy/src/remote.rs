//! A teacher behind an OpenAI-compatible HTTP API (DESIGN.md §8): another `cartridge serve`, or
//! vLLM / SGLang / llama.cpp server. Synthesis is embarrassingly parallel, so the requests of one
//! call go out over a bounded number of connections, each retried with exponential backoff on
//! transport errors, 429 (honouring `Retry-After`) and 5xx.
//!
//! Prompts are token ids (`/v1/completions` with `prompt: [ids]`): the shared prefix (the chunk's
//! system message) is byte-identical in every request of a chunk, so a server's prefix cache hits.
//! Tokenising, detokenising and the chat template run here, on the local copy of the model's
//! tokenizer, so the start-up check refuses a server whose model differs: the fingerprint in its
//! `/v1/models` entry (`cartridge serve` reports one) must equal the local model's; a server
//! without one must at least tokenise a probe text to the same ids (vLLM and llama.cpp expose
//! `/tokenize`), and is refused otherwise.
//!
//! Token ids come back from the response's `token_ids` and `logprobs.top_logprobs_ids`
//! (`cartridge serve`), or from `logprobs` entries rendered as `token_id:N` when the server honours
//! `return_tokens_as_token_ids` (vLLM).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cartridge_formats::ModelFingerprint;
use cartridge_runtime::chat_template::{ChatMessage, ChatTemplate};
use cartridge_runtime::loader::LoadedModel;
use cartridge_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};

use crate::backend::{Backend, BackendInfo, Completion, CompletionOutput, Timings};
use crate::error::{Error, Result};
use crate::local::stop_tokens;

/// Text whose tokenisation identifies a tokenizer well enough for the start-up check.
const PROBE: &str =
    "Self-study probe: naïve café, 3.14159, <tag attr=\"x\">\n\tdef f(x): return x**2 // 7";

/// How to talk to the server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Retries of one request after the first try.
    pub retries: u32,
    /// First backoff; doubled after each failed try (capped at 30 s).
    pub backoff: Duration,
    /// Time limit of one HTTP request.
    pub timeout: Duration,
    /// The server's model name (default: the first of `/v1/models`).
    pub model: Option<String>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            retries: 5,
            backoff: Duration::from_millis(250),
            timeout: Duration::from_secs(600),
            model: None,
        }
    }
}

/// A teacher served over HTTP; see the module docs.
pub struct RemoteBackend {
    base: String,
    model: String,
    agent: ureq::Agent,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: BackendInfo,
    options: RemoteOptions,
    timings: Timings,
}

impl std::fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("base", &self.base)
            .field("model", &self.model)
            .field("teacher", &self.info.teacher.short())
            .finish()
    }
}

fn backend_err(msg: impl Into<String>) -> Error {
    Error::Backend(msg.into())
}

/// Why one HTTP call failed, and whether trying again may help.
struct CallError {
    message: String,
    retry: bool,
    wait: Option<Duration>,
}

impl RemoteBackend {
    /// Connect to `base` (e.g. `http://host:8080/v1`) as the teacher for `local`, whose tokenizer,
    /// chat template and fingerprint are used here; refuses a server whose model differs.
    pub fn connect(base: &str, local: LoadedModel, options: RemoteOptions) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let template = local.chat_template.ok_or_else(|| {
            Error::Config(format!(
                "{} has no chat template; self-study needs a chat model",
                local.path.display()
            ))
        })?;
        let agent = ureq::AgentBuilder::new()
            .timeout(options.timeout)
            .max_idle_connections_per_host(options.concurrency.max(1))
            .build();
        let stop = stop_tokens(&local.tokenizer);
        let mut backend = Self {
            base,
            model: String::new(),
            agent,
            tokenizer: local.tokenizer,
            template,
            info: BackendInfo {
                teacher: local.fingerprint,
                context_window: local.config.max_position_embeddings,
                stop_tokens: stop,
            },
            options,
            timings: Timings::default(),
        };
        backend.check_server()?;
        Ok(backend)
    }

    /// The model name used in requests.
    pub fn model_name(&self) -> &str {
        &self.model
    }

    /// Pick the model and refuse a server whose model or tokenizer is not ours.
    fn check_server(&mut self) -> Result<()> {
        let url = format!("{}/models", self.base);
        let list = self.call_json("GET", &url, None).map_err(|e| {
            backend_err(format!(
                "cannot list the models of {}: {}",
                self.base, e.message
            ))
        })?;
        let models = list["data"].as_array().cloned().unwrap_or_default();
        let entry = match &self.options.model {
            Some(name) => models.iter().find(|m| m["id"].as_str() == Some(name)),
            None => models.first(),
        }
        .ok_or_else(|| {
            backend_err(format!(
                "{url} lists no model{}",
                self.options
                    .model
                    .as_ref()
                    .map(|m| format!(" named {m:?}"))
                    .unwrap_or_default()
            ))
        })?;
        self.model = entry["id"].as_str().unwrap_or_default().to_string();
        if let Some(window) = entry["max_model_len"].as_u64() {
            self.info.context_window = self.info.context_window.min(window as usize);
        }
        if let Some(fp) = entry.get("fingerprint").filter(|v| !v.is_null()) {
            let theirs: ModelFingerprint = serde_json::from_value(fp.clone())
                .map_err(|e| backend_err(format!("{url}: unreadable model fingerprint: {e}")))?;
            if theirs != self.info.teacher {
                return Err(backend_err(format!(
                    "the server's model {:?} (fingerprint {}) is not the local model (fingerprint \
                     {}): refusing to record its log-probs as this model's",
                    self.model,
                    theirs.short(),
                    self.info.teacher.short()
                )));
            }
            return Ok(());
        }
        self.check_tokenizer()
    }

    /// A server without a fingerprint must tokenise the probe as we do.
    fn check_tokenizer(&self) -> Result<()> {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        let url = format!("{root}/tokenize");
        // vLLM reads `prompt`, llama.cpp `content`.
        let body = json!({"model": self.model, "prompt": PROBE, "content": PROBE,
                          "add_special_tokens": false});
        let reply = self.call_json("POST", &url, Some(&body)).map_err(|e| {
            backend_err(format!(
                "cannot verify the server's model: /v1/models has no fingerprint and {url} \
                 failed ({}); refusing",
                e.message
            ))
        })?;
        let theirs: Vec<u32> = reply["tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_u64().map(|t| t as u32))
                    .collect()
            })
            .unwrap_or_default();
        let ours = self.tokenizer.encode(PROBE, false)?;
        if theirs != ours {
            return Err(backend_err(format!(
                "the server's tokenizer differs from the local model's ({} vs {} probe tokens); \
                 refusing",
                theirs.len(),
                ours.len()
            )));
        }
        Ok(())
    }

    /// One HTTP call returning JSON (no retries).
    fn call_json(
        &self,
        method: &str,
        url: &str,
        body: Option<&Value>,
    ) -> std::result::Result<Value, CallError> {
        let req = self.agent.request(method, url);
        let resp = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        match resp {
            Ok(r) => r.into_json::<Value>().map_err(|e| CallError {
                message: format!("unreadable reply: {e}"),
                retry: true,
                wait: None,
            }),
            Err(ureq::Error::Status(code, r)) => {
                let wait = r
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = r.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or(text);
                Err(CallError {
                    message: format!("HTTP {code}: {message}"),
                    retry: code == 429 || code >= 500,
                    wait,
                })
            }
            Err(e) => Err(CallError {
                message: e.to_string(),
                retry: true,
                wait: None,
            }),
        }
    }

    /// One call with retries and exponential backoff.
    fn call_with_retries(&self, url: &str, body: &Value) -> Result<Value> {
        with_retries(
            self.options.retries,
            self.options.backoff,
            std::thread::sleep,
            || self.call_json("POST", url, Some(body)),
        )
        .map_err(|(tries, e)| backend_err(format!("{url} failed after {tries} tries: {e}")))
    }

    fn request_body(&self, shared: &[u32], c: &Completion) -> Value {
        let mut prompt = Vec::with_capacity(shared.len() + c.prompt.len());
        prompt.extend_from_slice(shared);
        prompt.extend_from_slice(&c.prompt);
        json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": c.max_tokens,
            "temperature": c.temperature.max(0.0),
            "seed": c.seed,
            // Ids of the generated tokens come with the log-probs: always ask for at least one.
            "logprobs": c.top_logprobs.max(1),
            "stop_token_ids": self.info.stop_tokens,
            "return_tokens_as_token_ids": true,
            "skip_special_tokens": false,
            "include_stop_str_in_output": true,
        })
    }

    fn complete_one(&self, shared: &[u32], c: &Completion) -> Result<CompletionOutput> {
        let url = format!("{}/completions", self.base);
        let reply = self.call_with_retries(&url, &self.request_body(shared, c))?;
        parse_completion(&reply, c.top_logprobs, &self.info.stop_tokens)
    }
}

/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Run `call` until it succeeds, fails for good, or `retries` retries are spent, sleeping (with
/// `sleep`) the server's `Retry-After` when it gave one, else `backoff`, doubled after each try.
/// On failure: the number of tries and the last error message.
fn with_retries<T>(
    retries: u32,
    backoff: Duration,
    mut sleep: impl FnMut(Duration),
    mut call: impl FnMut() -> std::result::Result<T, CallError>,
) -> std::result::Result<T, (u32, String)> {
    let mut delay = backoff;
    let mut tries = 0;
    loop {
        tries += 1;
        match call() {
            Ok(v) => return Ok(v),
            Err(e) if e.retry && tries <= retries => {
                sleep(e.wait.unwrap_or(delay).min(MAX_BACKOFF));
                delay = (delay * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err((tries, e.message)),
        }
    }
}

/// `token_id:N` -> N.
fn id_of_token_string(s: &str) -> Option<u32> {
    s.strip_prefix("token_id:")?.parse().ok()
}

/// Generated ids and top-`k` rows of a `/v1/completions` reply.
pub fn parse_completion(reply: &Value, k: usize, stops: &[u32]) -> Result<CompletionOutput> {
    let choice = &reply["choices"][0];
    let lp = &choice["logprobs"];
    let as_ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let tokens = as_ids(&choice["token_ids"])
        .or_else(|| as_ids(&lp["token_ids"]))
        .or_else(|| {
            lp["tokens"]
                .as_array()?
                .iter()
                .map(|t| t.as_str().and_then(id_of_token_string))
                .collect()
        })
        .ok_or_else(|| {
            backend_err(
                "the reply carries no token ids (the server must return them, e.g. with \
                 return_tokens_as_token_ids)",
            )
        })?;
    let mut top = Vec::new();
    if k > 0 {
        let rows: Option<Vec<Vec<(u32, f32)>>> =
            if let Some(rows) = lp["top_logprobs_ids"].as_array() {
                rows.iter()
                    .map(|row| {
                        row.as_array()?
                            .iter()
                            .map(|p| {
                                let id = p[0].as_u64().and_then(|n| u32::try_from(n).ok())?;
                                Some((id, p[1].as_f64()? as f32))
                            })
                            .collect()
                    })
                    .collect()
            } else {
                lp["top_logprobs"].as_array().and_then(|rows| {
                    rows.iter()
                        .map(|row| {
                            let mut r: Vec<(u32, f32)> = row
                                .as_object()?
                                .iter()
                                .map(|(t, l)| Some((id_of_token_string(t)?, l.as_f64()? as f32)))
                                .collect::<Option<_>>()?;
                            r.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                            Some(r)
                        })
                        .collect()
                })
            };
        let rows =
            rows.ok_or_else(|| backend_err("the reply carries no top log-probs with ids"))?;
        for row in rows {
            if row.len() < k {
                return Err(backend_err(format!(
                    "the server returned {} alternatives per token, {k} were asked",
                    row.len()
                )));
            }
            top.push(row.into_iter().take(k).collect());
        }
    }
    let stopped = choice["finish_reason"].as_str() == Some("stop")
        && tokens.last().is_some_and(|t| stops.contains(t));
    Ok(CompletionOutput {
        tokens,
        top_logprobs: top,
        stopped,
    })
}

impl Backend for RemoteBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false)?)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.tokenizer.decode(ids, true)?)
    }

    fn token_text(&self, id: u32) -> Result<String> {
        Ok(self.tokenizer.decode(&[id], false)?)
    }

    fn render_chat(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs: Vec<ChatMessage> = messages
            .iter()
            .map(|(r, c)| ChatMessage::new(r.clone(), c.clone()))
            .collect();
        Ok(self.template.render(&msgs, add_generation_prompt)?)
    }

    fn complete(
        &mut self,
        shared: &[u32],
        requests: &[Completion],
    ) -> Result<Vec<CompletionOutput>> {
        let t0 = Instant::now();
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<CompletionOutput>>>> =
            Mutex::new((0..requests.len()).map(|_| None).collect());
        let workers = self.options.concurrency.clamp(1, requests.len().max(1));
        let this = &*self;
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = requests.get(i) else {
                        return;
                    };
                    let out = this.complete_one(shared, req);
                    let failed = out.is_err();
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(out);
                    }
                    if failed {
                        // Stop handing out work; the first error is reported below.
                        next.store(requests.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        let results = results
            .into_inner()
            .map_err(|_| backend_err("a request thread panicked"))?;
        // The first real error wins over the "not sent" of the requests it cut short.
        let mut outs = Vec::with_capacity(requests.len());
        let mut unsent = false;
        for r in results {
            match r {
                Some(Ok(o)) => outs.push(o),
                Some(Err(e)) => return Err(e),
                None => unsent = true,
            }
        }
        if unsent {
            return Err(backend_err("a request was not sent"));
        }
        let elapsed = t0.elapsed().as_secs_f64();
        self.timings.generate_secs += elapsed;
        self.timings.generated_tokens += outs.iter().map(|o| o.tokens.len() as u64).sum::<u64>();
        Ok(outs)
    }

    fn timings(&self) -> Timings {
        self.timings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(retry: bool, wait: Option<u64>) -> CallError {
        CallError {
            message: format!("failed (retry: {retry})"),
            retry,
            wait: wait.map(Duration::from_secs),
        }
    }

    #[test]
    fn retries_back_off_honour_retry_after_and_give_up() {
        // Two retryable failures (the second with Retry-After: 3), then success.
        let mut slept = Vec::new();
        let mut calls = 0;
        let got = with_retries(
            5,
            Duration::from_millis(100),
            |d| slept.push(d),
            || {
                calls += 1;
                match calls {
                    1 => Err(fail(true, None)),
                    2 => Err(fail(true, Some(3))),
                    _ => Ok(calls),
                }
            },
        );
        assert_eq!(got.ok(), Some(3));
        assert_eq!(
            slept,
            vec![Duration::from_millis(100), Duration::from_secs(3)]
        );
        // Backoff doubles and the retries run out: 1 try + 3 retries.
        let mut slept = Vec::new();
        let got: std::result::Result<(), _> = with_retries(
            3,
            Duration::from_millis(10),
            |d| slept.push(d),
            || Err(fail(true, None)),
        );
        assert_eq!(got.err().map(|e| e.0), Some(4));
        assert_eq!(slept, [10, 20, 40].map(Duration::from_millis).to_vec());
        // A request the server refused (4xx) is not retried.
        let mut calls = 0;
        let got: std::result::Result<(), _> = with_retries(
            5,
            Duration::ZERO,
            |_| {},
            || {
                calls += 1;
                Err(fail(false, None))
            },
        );
        assert_eq!((got.err().map(|e| e.0), calls), (Some(1), 1));
    }

    #[test]
    fn replies_in_both_id_formats_parse_alike() {
        let ours = json!({"choices": [{"token_ids": [5, 2], "finish_reason": "stop",
            "logprobs": {"top_logprobs_ids": [[[5, -0.1], [7, -2.0]], [[2, -0.5], [9, -1.0]]]}}]});
        let vllm = json!({"choices": [{"finish_reason": "stop", "logprobs": {
            "tokens": ["token_id:5", "token_id:2"],
            "top_logprobs": [{"token_id:7": -2.0, "token_id:5": -0.1},
                             {"token_id:9": -1.0, "token_id:2": -0.5}]}}]});
        let a = parse_completion(&ours, 2, &[2]).expect("ours");
        let b = parse_completion(&vllm, 2, &[2]).expect("vllm");
        assert_eq!(a, b);
        assert_eq!(a.tokens, vec![5, 2]);
        assert_eq!(a.top_logprobs[0], vec![(5, -0.1), (7, -2.0)]);
        assert!(a.stopped);
        // Fewer alternatives than asked, or no ids at all, are errors.
        assert!(parse_completion(&ours, 3, &[2]).is_err());
        let no_ids = json!({"choices": [{"text": "hi", "finish_reason": "length"}]});
        assert!(parse_completion(&no_ids, 0, &[2]).is_err());
        // k = 0: no rows kept; "length" is not stopped.
        let c = parse_completion(
            &json!({"choices": [{"token_ids": [1], "finish_reason": "length"}]}),
            0,
            &[2],
        )
        .expect("k0");
        assert!(c.top_logprobs.is_empty() && !c.stopped);
    }
}
