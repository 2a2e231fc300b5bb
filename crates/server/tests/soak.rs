//! A soak over a real loopback socket: 64 closed-loop clients for a minute (`MULTILORA_SOAK_SECS`
//! to change it), streamed and whole completions and chats over mixed adapters, clients that
//! leave mid-stream, and adapters loaded and unloaded while others use them. Asserts that
//! nothing but designed refusals failed, every stream ended in `[DONE]`, the engine drained,
//! and the process's RSS stayed within 1.2x of its value after the first 10 s.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    adapter, demo_server, generation_request, http, metric, open_stream, post, sse_data, start, TestResult,
    MODEL,
};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const NUM_CLIENTS: usize = 64;
const NUM_ADAPTERS: usize = 8;

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// 404 for an adapter unloaded a moment before: by design.
    designed: AtomicU64,
    disconnects: AtomicU64,
    loads: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).push(what);
    }
}

/// One generation; checks what came back.
async fn generate(addr: SocketAddr, i: u64, model: &str, tally: &Tally) -> Result<(), BoxError> {
    let is_chat = i.is_multiple_of(3);
    let is_stream = i.is_multiple_of(2);
    let max_tokens = 4 + i % 24;
    let (path, mut body) = generation_request(i, is_chat, model, max_tokens);
    body["temperature"] = json!(0.7);
    body["stream"] = json!(is_stream);
    if is_stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let (status, _, text) = post(addr, path, &body).await?;
    match status {
        200 if is_stream => {
            let data = sse_data(&text);
            let usage: Value = serde_json::from_str(data.iter().rev().nth(1).ok_or("short stream")?)?;
            if data.last().map(String::as_str) != Some("[DONE]")
                || usage["usage"]["completion_tokens"] != max_tokens
            {
                tally.error(format!("{model}: bad stream: {text}"));
                return Ok(());
            }
        }
        200 => {
            let v: Value = serde_json::from_str(&text)?;
            if v["usage"]["completion_tokens"] != max_tokens {
                tally.error(format!("{model}: bad body: {text}"));
                return Ok(());
            }
        }
        404 if model.starts_with("extra") => {
            tally.designed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        _ => {
            tally.error(format!("{model}: {status}: {text}"));
            return Ok(());
        }
    }
    tally.ok.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn client(addr: SocketAddr, c: usize, deadline: Instant, tally: Arc<Tally>) -> Result<(), BoxError> {
    let mut i = c as u64 * 1_000_000;
    while Instant::now() < deadline {
        i += 1;
        match (c, i % 10) {
            // Two clients load, use and unload their own adapter, over and over.
            (0 | 1, _) => {
                let name = format!("extra-{c}");
                let body = json!({"lora_name": name, "lora_path": adapter(NUM_ADAPTERS + c)?});
                let (status, _, text) = post(addr, "/v1/load_lora_adapter", &body).await?;
                if status != 200 {
                    tally.error(format!("load {name}: {status}: {text}"));
                    continue;
                }
                tally.loads.fetch_add(1, Ordering::Relaxed);
                generate(addr, i, &name, &tally).await?;
                let body = json!({"lora_name": name});
                let (status, _, text) = post(addr, "/v1/unload_lora_adapter", &body).await?;
                if status != 200 {
                    tally.error(format!("unload {name}: {status}: {text}"));
                }
            }
            // Leaves mid-stream.
            (_, 0) => {
                drop(open_stream(addr, 64).await?);
                tally.disconnects.fetch_add(1, Ordering::Relaxed);
            }
            // Sometimes an adapter that comes and goes.
            (_, 1) => generate(addr, i, &format!("extra-{}", (i / 10) % 2), &tally).await?,
            (_, k) => {
                let model = match k % 3 {
                    0 => MODEL.to_string(),
                    _ => format!("lora-{}", (c + k as usize) % NUM_ADAPTERS),
                };
                generate(addr, i, &model, &tally).await?
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_for_a_minute() -> TestResult {
    let secs: u64 = std::env::var("MULTILORA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let server = demo_server(NUM_ADAPTERS, |e, s| {
        e.max_num_seqs = 32;
        e.max_loras = 4;
        e.max_cpu_loras = Some(8);
        s.enable_runtime_lora_updating = true;
    })?;
    let (addr, stop, task) = start(server).await?;
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let clients: Vec<_> = (0..NUM_CLIENTS)
        .map(|c| tokio::spawn(client(addr, c, deadline, tally.clone())))
        .collect();
    // RSS once a second; the reference is the first sample after 10 s (or a sixth of the run).
    let settle = Duration::from_secs(secs.min(60) / 6);
    let (mut baseline, mut peak) = (None, 0);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_bytes().ok_or("no VmRSS in /proc/self/status")?;
        if started.elapsed() >= settle {
            baseline.get_or_insert(rss);
            peak = peak.max(rss);
        }
    }
    for c in clients {
        timeout(Duration::from_secs(60), c).await???;
    }
    let errors = tally.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "soak: {secs} s, {ok} ok, {} designed 404s, {} disconnects, {} loads, {} errors; RSS {:?} -> peak {} MB",
        tally.designed.load(Ordering::Relaxed),
        tally.disconnects.load(Ordering::Relaxed),
        tally.loads.load(Ordering::Relaxed),
        errors.len(),
        baseline.map(|b| b >> 20),
        peak >> 20
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(ok > NUM_CLIENTS as u64, "only {ok} requests finished");
    assert!(tally.disconnects.load(Ordering::Relaxed) > 0 && tally.loads.load(Ordering::Relaxed) > 0);
    let baseline = baseline.ok_or("no RSS sample after the settling time")?;
    assert!(
        peak as f64 <= 1.2 * baseline as f64,
        "RSS grew from {} MB to {} MB",
        baseline >> 20,
        peak >> 20
    );
    // Everything ended: nothing runs or waits, and the server still answers.
    let drained = async {
        loop {
            let (_, _, m) = http(addr, "GET", "/metrics", None, &[]).await?;
            let busy = metric(&m, "multilora:num_requests_running").unwrap_or(-1.0)
                + metric(&m, "multilora:num_requests_waiting").unwrap_or(-1.0);
            if busy == 0.0 {
                return Ok::<_, BoxError>(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    timeout(Duration::from_secs(30), drained).await??;
    assert_eq!(http(addr, "GET", "/health", None, &[]).await?.0, 200);
    let _ = stop.send(());
    timeout(Duration::from_secs(30), task).await???;
    Ok(())
}
