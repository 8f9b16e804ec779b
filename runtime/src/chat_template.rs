//! Chat templates: the model's own Jinja template rendered with minijinja, as Hugging Face
//! `apply_chat_template` does.
//!
//! Hugging Face renders with jinja2 under `trim_blocks` and `lstrip_blocks`, passes `messages`,
//! `add_generation_prompt` and the special tokens, and adds `raise_exception` and `strftime_now`;
//! templates also call Python string and dict methods (`.strip()`, `.items()`, ...), which
//! minijinja-contrib's pycompat callback provides. `tojson` follows Python's `json.dumps` (no HTML
//! escaping, `", "` and `": "` separators) because templates that embed tool schemas depend on it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    // `{:#}` includes the template line and the chain of causes.
    Error::Template(format!("{e:#}"))
}

impl ChatTemplate {
    /// Compile `source`; `bos_token`/`eos_token` are the token texts templates may print.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_err)?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, serde_json::Value::Null)
    }

    /// The rendered text of `messages` *after* a system message `system`: what follows the
    /// system turn when the template renders `[system, messages...]`.
    ///
    /// This is how a conversation is rendered when a prefix (a cartridge, or a soft prompt without
    /// summary text) stands in for the system message: self-study records exactly these tokens
    /// after the chunk's system message, so serving must render the same way — without it,
    /// templates that insert a default system prompt (SmolLM2, Qwen) would put text in front of
    /// the conversation that training never saw.
    pub fn render_after_system(
        &self,
        system: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let head = self.render(&[ChatMessage::new("system", system)], false)?;
        let mut all = Vec::with_capacity(messages.len() + 1);
        all.push(ChatMessage::new("system", system));
        all.extend_from_slice(messages);
        let text = self.render(&all, add_generation_prompt)?;
        text.strip_prefix(&head).map(str::to_string).ok_or_else(|| {
            Error::Template(
                "the chat template does not render the system message as a prefix of the \
                 conversation, so a cartridge cannot stand in for it"
                    .into(),
            )
        })
    }

    /// Render with extra context variables (e.g. `tools`, `documents`): `extra` must be a JSON
    /// object or null; its keys are added to the context (and override the defaults).
    pub fn render_with<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
        extra: serde_json::Value,
    ) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?,
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        match extra {
            serde_json::Value::Null => {}
            serde_json::Value::Object(m) => ctx.extend(m),
            other => {
                return Err(Error::Template(format!(
                    "extra context must be a JSON object, got {other}"
                )))
            }
        }
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        tmpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(template_err)
    }
}

/// `raise_exception(msg)`: templates use it to reject conversations they cannot format.
fn raise_exception(msg: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime` codes.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Format Unix time `secs` (UTC) with `%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`; other codes are
/// copied through.
fn strftime(format: &str, secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = ((days % 7 + 7 + 3) % 7) as usize;
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(is_leap && month > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        let month_name = MONTHS[(month - 1) as usize];
        let day_name = WEEKDAYS[weekday];
        match code {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'e' => out.push_str(&format!("{day:>2}")),
            'B' => out.push_str(month_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'A' => out.push_str(day_name),
            'a' => out.push_str(&day_name[..3]),
            'H' => out.push_str(&format!("{:02}", rem / 3600)),
            'M' => out.push_str(&format!("{:02}", rem / 60 % 60)),
            'S' => out.push_str(&format!("{:02}", rem % 60)),
            'j' => out.push_str(&format!("{yday:03}")),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `tojson` as Hugging Face defines it: Python `json.dumps(x, ensure_ascii=False, indent=indent)`.
///
/// One difference remains: object keys come out sorted, where Python keeps insertion order,
/// because the workspace builds serde_json without `preserve_order` (turning it on would change how
/// every crate's JSON maps serialise, `.cart` headers included). Only templates that print tool
/// schemas notice.
fn tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted and ignored: Hugging Face passes these through to json.dumps.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = Vec::new();
    let res = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            json.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            json.serialize(&mut ser)
        }
    };
    res.map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let s = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    Ok(minijinja::Value::from_safe_string(s))
}

/// serde_json formatter with Python's default separators `", "` and `": "`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_the_conversation_after_a_system_message() -> Result<()> {
        let t = ChatTemplate::new(CHATML, None, None)?;
        let msgs = [ChatMessage::new("user", "Hi")];
        // No default system prompt: the prefix stands in for it.
        assert_eq!(
            t.render_after_system("anything", &msgs, true)?,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with = t.render(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "Hi"),
            ],
            true,
        )?;
        let head = t.render(&[ChatMessage::new("system", "S")], false)?;
        assert_eq!(
            format!("{head}{}", t.render_after_system("S", &msgs, true)?),
            with
        );
        Ok(())
    }

    #[test]
    fn renders_chatml_with_default_system() -> Result<()> {
        let t = ChatTemplate::new(CHATML, None, None)?;
        let s = t.render(&[ChatMessage::new("user", "Hi")], true)?;
        assert_eq!(
            s,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t.render(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "Hi"),
            ],
            false,
        )?;
        assert_eq!(
            s,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        Ok(())
    }

    #[test]
    fn python_methods_exceptions_and_tojson() -> Result<()> {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.content.strip() }}]{% endfor %}{{ {'a': [1, 'x<y']} | tojson }}",
            Some("<s>".into()),
            None,
        )?;
        let s = t.render(&[ChatMessage::new("user", "  hi  ")], false)?;
        assert_eq!(s, "<s>[hi]{\"a\": [1, \"x<y\"]}");
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .expect_err("raise_exception must fail the render");
        assert!(err.to_string().contains("no tools"), "{err}");
        Ok(())
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hugging_face() -> Result<()> {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
            None,
            None,
        )?;
        assert_eq!(t.render(&[ChatMessage::new("user", "a")], false)?, "a\n");
        Ok(())
    }

    /// The shape of Qwen2.5's template: `{%-` whitespace control, attribute access on messages
    /// that lack it (`message.tool_calls`), `tools` rendered with `tojson`.
    const QWEN_LIKE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen.' }}
    {%- endif %}
    {{- "\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn renders_a_qwen_style_template_with_and_without_tools() -> Result<()> {
        let t = ChatTemplate::new(QWEN_LIKE, None, Some("<|im_end|>".into()))?;
        let msgs = [
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Yo"),
        ];
        assert_eq!(
            t.render(&msgs, true)?,
            "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nYo<|im_end|>\n<|im_start|>assistant\n"
        );
        let tools = serde_json::json!({"tools": [{"name": "f", "parameters": {"x": 1}}]});
        let s = t.render_with(&msgs[..1], false, tools)?;
        assert_eq!(
            s,
            "<|im_start|>system\nYou are Qwen.\n\n<tools>\n{\"name\": \"f\", \"parameters\": \
             {\"x\": 1}}\n</tools><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        Ok(())
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let secs = 1_709_210_096;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %d %B %Y %b %j %%", secs),
            "2024-02-29 12:34:56 Thursday 29 February 2024 Feb 060 %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
    }
}
