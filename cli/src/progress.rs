//! Progress display for long jobs: an indicatif bar (with rate and ETA) on a terminal, or one JSON
//! object per line with `--json` (for scripts), or nothing when stderr is not a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// Where progress goes.
pub enum Progress {
    /// A terminal bar.
    Bar(ProgressBar),
    /// JSON lines on stderr.
    Json,
    /// Nothing (stderr is not a terminal).
    Quiet,
}

impl Progress {
    /// A progress display for `total` units of `unit`; `json` picks JSON lines.
    pub fn new(total: u64, unit: &str, json: bool) -> Self {
        if json {
            return Progress::Json;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Quiet;
        }
        let bar = ProgressBar::new(total);
        let template = format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} ({{msg}}) ETA {{eta}}"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        Progress::Bar(bar)
    }

    /// Report `position` units done, with a short message (rates) and the same facts as JSON.
    pub fn update(&self, position: u64, message: String, fields: Value) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(position);
                bar.set_message(message);
            }
            Progress::Json => eprintln!("{fields}"),
            Progress::Quiet => {}
        }
    }

    /// A line of text above the bar (or on stderr when there is no bar and no JSON).
    pub fn println(&self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Json => {}
            Progress::Quiet => eprintln!("{text}"),
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
