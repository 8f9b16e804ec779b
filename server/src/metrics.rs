//! Prometheus metrics in the text exposition format, kept with atomics and one small lock: request
//! counts by endpoint and status, token counts, latency histograms, the engine's queue and batch,
//! and the cartridges in memory (filled in from the registry at scrape time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::registry::RegistryStats;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative histogram over [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation in seconds.
    pub fn observe(&self, secs: f64) {
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((secs.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {n}");
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Prompt tokens of accepted requests (prefix not included).
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected_queue_full: AtomicU64,
    /// Requests cancelled because their client went away.
    pub cancelled: AtomicU64,
    /// Requests that ran past the time limit.
    pub timed_out: AtomicU64,
    /// Requests waiting for a place in the batch.
    pub queued: AtomicU64,
    /// Sequences in the engine's batches (prefilling or decoding).
    pub running: AtomicU64,
    /// Engine steps run.
    pub engine_steps: AtomicU64,
    /// Whole-request latency of completion endpoints.
    pub request_seconds: Histogram,
    /// Time from arrival to the first generated token.
    pub ttft_seconds: Histogram,
}

impl Metrics {
    /// Count a finished request.
    pub fn count_request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    /// Total requests counted with `status` (tests, health).
    pub fn requests_with_status(&self, pred: impl Fn(u16) -> bool) -> u64 {
        self.requests
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|((_, s), _)| pred(*s))
                    .map(|(_, n)| n)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The text exposition.
    pub fn render(&self, registry: RegistryStats) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP cartridge_requests_total HTTP requests by endpoint and status.\n");
        out.push_str("# TYPE cartridge_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((endpoint, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "cartridge_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counters: [(&str, &str, u64); 6] = [
            (
                "cartridge_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
                load(&self.prompt_tokens),
            ),
            (
                "cartridge_generated_tokens_total",
                "Tokens generated.",
                load(&self.generated_tokens),
            ),
            (
                "cartridge_rejected_queue_full_total",
                "Requests refused with 429.",
                load(&self.rejected_queue_full),
            ),
            (
                "cartridge_cancelled_total",
                "Requests whose client went away.",
                load(&self.cancelled),
            ),
            (
                "cartridge_timed_out_total",
                "Requests past the time limit.",
                load(&self.timed_out),
            ),
            (
                "cartridge_engine_steps_total",
                "Batch steps run by the engine.",
                load(&self.engine_steps),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges: [(&str, &str, u64); 4] = [
            (
                "cartridge_queued_requests",
                "Requests waiting for a place in the batch.",
                load(&self.queued),
            ),
            (
                "cartridge_running_sequences",
                "Sequences in the engine's batches.",
                load(&self.running),
            ),
            (
                "cartridge_loaded_cartridges",
                "Cartridge files in memory.",
                registry.loaded as u64,
            ),
            (
                "cartridge_loaded_cartridge_bytes",
                "Bytes of the cartridges in memory.",
                registry.bytes,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP cartridge_cartridge_loads_total Cartridge files loaded and verified.\n# TYPE cartridge_cartridge_loads_total counter\ncartridge_cartridge_loads_total {}",
            registry.loads
        );
        let _ = writeln!(
            out,
            "# HELP cartridge_cartridge_evictions_total Cartridge files evicted.\n# TYPE cartridge_cartridge_evictions_total counter\ncartridge_cartridge_evictions_total {}",
            registry.evictions
        );
        out.push_str("# HELP cartridge_request_seconds Latency of completion requests.\n");
        out.push_str("# TYPE cartridge_request_seconds histogram\n");
        self.request_seconds
            .render(&mut out, "cartridge_request_seconds", "");
        out.push_str("# HELP cartridge_time_to_first_token_seconds Arrival to first token.\n");
        out.push_str("# TYPE cartridge_time_to_first_token_seconds histogram\n");
        self.ttft_seconds
            .render(&mut out, "cartridge_time_to_first_token_seconds", "");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft_seconds.observe(0.003);
        m.ttft_seconds.observe(0.3);
        m.count_request("/v1/completions", 200);
        let text = m.render(RegistryStats::default());
        assert!(text.contains("cartridge_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("cartridge_time_to_first_token_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("cartridge_time_to_first_token_seconds_count 2"));
        assert!(text
            .contains("cartridge_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1"));
    }
}
