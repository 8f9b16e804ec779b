//! Load and admission over loopback: 64 concurrent clients send a few hundred short requests
//! (mixed cartridge sets, streamed or not) and every one gets the answer it gets alone, with no
//! 5xx; a full queue answers 429 with `Retry-After`; a client that hangs up stops its work;
//! a request past the time limit gets 504; memory stays bounded and the server healthy.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, get, post, post_raw, post_stream};
use serde_json::{json, Value};

/// Variant `i` of the short requests: cartridge set, prompt and seed differ.
fn variant(i: usize) -> Value {
    let sets = [
        json!([]),
        json!([{"id": "a"}]),
        json!([{"id": "a"}, {"id": "b"}]),
    ];
    json!({
        "messages": [{"role": "user", "content": format!("question {i}")}],
        "max_tokens": 3 + i % 4,
        "temperature": 0.7,
        "seed": i,
        "cartridges": sets[i % 3],
    })
}

fn answer_ids(v: &Value) -> Vec<u64> {
    v["choices"][0]["token_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn metric(base: &str, name: &str) -> f64 {
    let (_, text) = get(base, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(f64::NAN)
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn sixty_four_clients_get_exact_answers_and_no_5xx() {
    const VARIANTS: usize = 12;
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 5;
    let f = fixture(|c| {
        c.engine.max_batch = 32;
        c.engine.queue = 256;
    });
    // Each variant alone first: the reference.
    let reference: Vec<Vec<u64>> = (0..VARIANTS)
        .map(|i| {
            let (s, v) = post(&f.base, "/v1/chat/completions", &variant(i));
            assert_eq!(s, 200, "{v}");
            answer_ids(&v)
        })
        .collect();
    let rss_before = rss_kib();
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (ok, failures, base, reference) =
                (ok.clone(), failures.clone(), &f.base, &reference);
            scope.spawn(move || {
                for k in 0..PER_CLIENT {
                    let i = (client * 7 + k) % VARIANTS;
                    let body = variant(i);
                    let got = if (client + k) % 4 == 0 {
                        let mut b = body.clone();
                        b["stream"] = json!(true);
                        let (events, done) = post_stream(base, "/v1/chat/completions", &b);
                        let last = events.last().cloned().unwrap_or(Value::Null);
                        let n = last["usage"]["completion_tokens"].as_u64();
                        if !done || last["choices"][0]["finish_reason"].is_null() {
                            Err(format!("stream {i} ended early: {last}"))
                        } else if n != Some(reference[i].len() as u64) {
                            Err(format!("stream {i}: {n:?} tokens"))
                        } else {
                            Ok(())
                        }
                    } else {
                        let (s, _, v) = post_raw(base, "/v1/chat/completions", &body.to_string());
                        if s != 200 {
                            Err(format!("status {s}: {v}"))
                        } else if answer_ids(&v) != reference[i] {
                            Err(format!(
                                "variant {i}: {:?} != {:?}",
                                answer_ids(&v),
                                reference[i]
                            ))
                        } else {
                            Ok(())
                        }
                    };
                    match got {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().expect("lock").push(e),
                    }
                }
            });
        }
    });
    let failures = failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(
        ok.load(Ordering::Relaxed),
        CLIENTS * PER_CLIENT,
        "lost requests"
    );
    eprintln!(
        "{} requests from {CLIENTS} clients in {:.2} s",
        CLIENTS * PER_CLIENT,
        started.elapsed().as_secs_f64()
    );
    let server = f.server.as_ref().expect("server");
    assert_eq!(server.metrics().requests_with_status(|s| s >= 500), 0);
    // Healthy and idle afterwards, with memory bounded (a generous 256 MiB of growth: the cache
    // buffers of 32 sequences of this model are a few MiB).
    let (status, body) = get(&f.base, "/health");
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&f.base, "cartridge_running_sequences ") != 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&f.base, "cartridge_running_sequences "), 0.0);
    assert_eq!(metric(&f.base, "cartridge_queued_requests "), 0.0);
    if let (Some(a), Some(b)) = (rss_before, rss_kib()) {
        assert!(b < a + 256 * 1024, "RSS grew from {a} to {b} KiB");
    }
    let (s, v) = post(&f.base, "/v1/chat/completions", &variant(0));
    assert_eq!((s, answer_ids(&v)), (200, reference[0].clone()));
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let f = fixture(|c| {
        c.engine.max_batch = 1;
        c.engine.queue = 1;
        c.limits.max_prompt_tokens = 64;
    });
    let long = json!({"prompt": [40, 41, 42], "max_tokens": 400, "temperature": 0});
    let statuses = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| {
                let (s, retry, v) = post_raw(&f.base, "/v1/completions", &long.to_string());
                statuses.lock().expect("lock").push((s, retry, v));
            });
        }
    });
    let statuses = statuses.into_inner().expect("lock");
    let busy: Vec<_> = statuses.iter().filter(|(s, _, _)| *s == 429).collect();
    assert!(
        !busy.is_empty(),
        "no 429 among {:?}",
        statuses.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for (_, retry, v) in &busy {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(v["error"]["code"], json!("queue_full"));
    }
    assert!(statuses.iter().all(|(s, _, _)| *s == 200 || *s == 429));
    assert!(statuses.iter().any(|(s, _, _)| *s == 200));
    // The prompt limit is enforced.
    let (s, v) = post(&f.base, "/v1/completions", &json!({"prompt": vec![40; 65]}));
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], json!("prompt"));
}

#[test]
fn a_client_that_hangs_up_stops_its_work_and_slow_requests_time_out() {
    let f = fixture(|_| {});
    // Stream a long answer, read the first token, hang up.
    let body = json!({"prompt": [40, 41], "max_tokens": 1000, "temperature": 0, "stream": true});
    let resp = ureq::post(&format!("{}/v1/completions", f.base))
        .send_json(body)
        .expect("stream");
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).expect("read");
    }
    drop(reader);
    // Wait for the engine to notice: the first event can reach the client before the engine
    // has admitted the sequence (running is then still 0), so wait for the cancellation too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (metric(&f.base, "cartridge_running_sequences ") != 0.0
        || metric(&f.base, "cartridge_cancelled_total ") < 1.0)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(metric(&f.base, "cartridge_running_sequences "), 0.0);
    let generated = metric(&f.base, "cartridge_generated_tokens_total ");
    assert!(
        generated < 1000.0,
        "the hung-up request ran to the end ({generated} tokens)"
    );
    let cancelled = metric(&f.base, "cartridge_cancelled_total ");
    assert_eq!(cancelled, 1.0);
    assert_eq!(metric(&f.base, "cartridge_timed_out_total "), 0.0);

    // The same for a whole (non-streamed) answer: the client gives up after 30 ms.
    let before = metric(&f.base, "cartridge_generated_tokens_total ");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(30))
        .build();
    let body = json!({"prompt": [40, 41], "max_tokens": 1000, "temperature": 0});
    assert!(agent
        .post(&format!("{}/v1/completions", f.base))
        .send_json(body)
        .is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&f.base, "cartridge_cancelled_total ") < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(metric(&f.base, "cartridge_cancelled_total "), 2.0);
    let generated = metric(&f.base, "cartridge_generated_tokens_total ") - before;
    assert!(generated < 1000.0, "the abandoned request ran to the end");

    let f = fixture(|c| c.limits.timeout = Duration::from_millis(20));
    // A request that cannot finish within the limit gets 504 (whole) or an error event (stream).
    let (s, v) = post(
        &f.base,
        "/v1/completions",
        &json!({"prompt": [40], "max_tokens": 1000, "temperature": 0}),
    );
    assert_eq!(s, 504, "{v}");
    assert_eq!(v["error"]["code"], json!("timeout"));
    let (events, done) = post_stream(
        &f.base,
        "/v1/completions",
        &json!({"prompt": [40], "max_tokens": 1000, "temperature": 0, "stream": true}),
    );
    assert!(done);
    assert_eq!(
        events.last().expect("events")["error"]["code"],
        json!("timeout")
    );
}
