//! Issue 16's defects, each over a real loopback socket, each bounded in time: what a hostile
//! or careless client does must not take down, stall or hold the server.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{adapter, demo_server, http, open_stream, post, sse_data, start, TestResult, MODEL};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::lora::manager::{AdapterLoader, DiskLoader};
use multilora_engine::{LoraRequest, ModelConfig, Result as EngineResult};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const BOUND: Duration = Duration::from_secs(20);

/// Stops the server and waits (bounded) for `serve` to return Ok.
async fn stop_serving(
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
) -> TestResult {
    let _ = stop.send(());
    timeout(BOUND, task).await???;
    Ok(())
}

/// Reads until the server closes the connection (or `BOUND` passes: an error).
async fn read_to_close(stream: &mut TcpStream) -> Result<String, BoxError> {
    let mut raw = Vec::new();
    match timeout(BOUND, stream.read_to_end(&mut raw)).await {
        Err(_) => Err(format!(
            "the server kept the connection open: {}",
            String::from_utf8_lossy(&raw)
        )
        .into()),
        // A reset counts as closed.
        Ok(_) => Ok(String::from_utf8_lossy(&raw).into_owned()),
    }
}

fn status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

fn error_of(body: &str) -> Result<Value, BoxError> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    let code = &v["error"]["code"];
    assert!(
        code.is_string() || code.is_null(),
        "code is a string or null: {body}"
    );
    Ok(v["error"].clone())
}

/// Polls `/health` until it answers `want`; returns its body.
async fn wait_health(addr: SocketAddr, want: u16) -> Result<String, BoxError> {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let (status, _, body) = http(addr, "GET", "/health", None, &[]).await?;
        if status == want {
            return Ok(body);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("/health stayed {status}: {body}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), BoxError> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// Replaces a file with a FIFO: whoever opens it to read blocks until [`release_fifo`].
fn make_fifo(path: &Path) -> Result<Vec<u8>, BoxError> {
    let content = std::fs::read(path)?;
    std::fs::remove_file(path)?;
    let ok = std::process::Command::new("mkfifo").arg(path).status()?.success();
    if !ok {
        return Err("mkfifo failed".into());
    }
    Ok(content)
}

/// Feeds the FIFO's reader (off the async workers: opening blocks until the reader opens).
async fn release_fifo(path: PathBuf, content: Vec<u8>) -> Result<(), BoxError> {
    let write = tokio::task::spawn_blocking(move || std::fs::write(path, content));
    timeout(BOUND, write).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_of_u64_max_is_refused_and_the_engine_lives() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    let huge = u64::MAX;
    let cases = [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "hello", "max_tokens": huge}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_completion_tokens": huge}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [1, 2], "max_tokens": huge - 1, "stream": true}),
        ),
    ];
    for (path, body) in &cases {
        let (status, _, text) = http(addr, "POST", path, Some(body), &[]).await?;
        assert_eq!(status, 400, "{path}: {text}");
        assert_eq!(error_of(&text)?["code"], "context_length_exceeded", "{text}");
    }
    // The engine thread is alive: generation and /health work.
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 3});
    let (status, _, text) = post(addr, "/v1/completions", &body).await?;
    assert_eq!(status, 200, "{text}");
    wait_health(addr, 200).await?;
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_makes_health_503_and_serve_fail() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let state = server.state().clone();
    let (addr, _stop, task) = start(server).await?;
    wait_health(addr, 200).await?;
    state.engine.panic_engine_for_tests();
    // serve returns an error (so the process exits non-zero) once the engine is gone.
    let served = timeout(BOUND, task).await??;
    assert!(served.is_err(), "serve returned Ok after the engine died");
    assert!(!state.engine.health.is_alive());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_the_engine_is_dead_before_exit() -> TestResult {
    // The router alone (no accept loop to exit): /health must say the engine is gone.
    let server = demo_server(0, |_, _| {})?;
    let state = server.state().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = server.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    wait_health(addr, 200).await?;
    state.engine.panic_engine_for_tests();
    let body = wait_health(addr, 503).await?;
    assert!(
        error_of(&body)?["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped")),
        "{body}"
    );
    let req = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
    let (status, _, text) = post(addr, "/v1/completions", &req).await?;
    assert_eq!(status, 503, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_bodies_and_idle_connections_are_closed() -> TestResult {
    let server = demo_server(0, |_, s| {
        s.header_timeout = Duration::from_millis(500);
        s.body_timeout = Duration::from_millis(500);
    })?;
    let (addr, stop, task) = start(server).await?;

    // Headers that never end.
    let mut slow = TcpStream::connect(addr).await?;
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .await?;
    read_to_close(&mut slow).await?;

    // A body shorter than its Content-Length: 408, then closed.
    let mut short = TcpStream::connect(addr).await?;
    short
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        .await?;
    let response = read_to_close(&mut short).await?;
    assert_eq!(status_of(&response), Some(408), "{response}");
    let body = response.split_once("\r\n\r\n").ok_or("no body")?.1;
    error_of(body)?;

    // An idle keep-alive connection after its response.
    let mut idle = TcpStream::connect(addr).await?;
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let response = read_to_close(&mut idle).await?;
    assert_eq!(status_of(&response), Some(200), "{response}");

    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_503_while_draining_and_ends_at_its_timeout() -> TestResult {
    let server = demo_server(0, |e, s| {
        e.max_model_len = Some(2048);
        // A slow client could hold the process for this long if shutdown waited for it.
        s.header_timeout = Duration::from_secs(600);
        s.drain_timeout = Duration::from_secs(2);
    })?;
    let (addr, stop, task) = start(server).await?;
    let mut slowloris = TcpStream::connect(addr).await?;
    slowloris.write_all(b"POST /v1/completions HTTP/1.1\r\n").await?;
    let mut long = open_stream(addr, 2000).await?;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The listener is still open: a new client is told why, in JSON.
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
    let (status, head, text) = post(addr, "/v1/completions", &body).await?;
    assert_eq!(status, 503, "{text}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    let e = error_of(&text)?;
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("shutting down")),
        "{text}"
    );
    // serve ends at the drain timeout (plus the abort grace), not when the slow client gives up.
    timeout(BOUND, task).await???;
    let rest = read_to_close(&mut long).await?;
    assert_eq!(
        sse_data(&rest).last().map(String::as_str),
        Some("[DONE]"),
        "{rest}"
    );
    read_to_close(&mut slowloris).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_one() -> TestResult {
    let server = demo_server(0, |_, s| {
        s.max_connections = 2;
        s.header_timeout = Duration::from_secs(600);
    })?;
    let (addr, stop, task) = start(server).await?;
    let first = TcpStream::connect(addr).await?;
    let _second = TcpStream::connect(addr).await?;
    let mut third = TcpStream::connect(addr).await?;
    third
        .write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = [0u8; 256];
    let early = timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "a third connection was served at a cap of 2");
    drop(first);
    let response = read_to_close(&mut third).await?;
    assert_eq!(status_of(&response), Some(200), "{response}");
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_prompts_are_refused_by_bytes_and_tokenizing_never_blocks_health() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let state = server.state().clone();
    let (addr, stop, task) = start(server).await?;
    // 3.9 MB: refused by its length in bytes, before any tokenization.
    let prompt = "hello ".repeat(650_000);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1});
    let (status, _, text) = post(addr, "/v1/completions", &body).await?;
    assert_eq!(status, 400, "{text}");
    let e = error_of(&text)?;
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("bytes")),
        "{text}"
    );

    // With every tokenize slot taken, text prompts wait; /health and token-id prompts do not.
    let permits = state.tokenize_permits.clone();
    let held = permits
        .clone()
        .acquire_many_owned(permits.available_permits() as u32)
        .await?;
    let body = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 2});
    let waiting = tokio::spawn(async move { post(addr, "/v1/completions", &body).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "tokenized without a permit");
    wait_health(addr, 200).await?;
    let ids = json!({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2});
    let (status, _, text) = post(addr, "/v1/completions", &ids).await?;
    assert_eq!(status, 200, "{text}");
    drop(held);
    let (status, _, text) = timeout(BOUND, waiting).await???;
    assert_eq!(status, 200, "{text}");
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_stop_ids_are_bounded() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
    for (field, value) in [
        ("stop", json!(many)),
        ("stop", json!(["x".repeat(1025)])),
        ("stop_token_ids", json!(vec![1; 1025])),
    ] {
        let mut body = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
        body[field] = value;
        let (status, _, text) = post(addr, "/v1/completions", &body).await?;
        assert_eq!(status, 400, "{text}");
        assert_eq!(error_of(&text)?["param"], field, "{text}");
    }
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 2, "stop": vec!["zz"; 64]});
    let (status, _, text) = post(addr, "/v1/completions", &body).await?;
    assert_eq!(status, 200, "{text}");
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_limit_counts_only_requests_without_a_batch_slot() -> TestResult {
    // 16 batch slots, 2 waiting allowed: a burst of 18 must all be admitted.
    let server = demo_server(0, |e, s| {
        e.max_num_seqs = 16;
        s.max_waiting_requests = 2;
    })?;
    let (addr, stop, task) = start(server).await?;
    let clients: Vec<_> = (0..18)
        .map(|i| {
            let body =
                json!({"model": MODEL, "prompt": format!("p{i}"), "max_tokens": 8, "ignore_eos": true});
            tokio::spawn(async move { post(addr, "/v1/completions", &body).await })
        })
        .collect();
    for c in clients {
        let (status, _, text) = timeout(BOUND, c).await???;
        assert_eq!(status, 200, "{text}");
    }
    stop_serving(stop, task).await
}

/// The queue limit is checked once per request: a completion with more prompts than slots and
/// queue together is admitted whole on an idle server (a 429 there could never succeed on
/// retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_more_prompts_than_the_queue_holds_is_admitted_whole() -> TestResult {
    let server = demo_server(0, |e, s| {
        e.max_num_seqs = 2;
        s.max_waiting_requests = 2;
    })?;
    let (addr, stop, task) = start(server).await?;
    let prompts: Vec<String> = (0..8).map(|i| format!("prompt {i}")).collect();
    let body = json!({"model": MODEL, "prompt": prompts, "max_tokens": 4, "ignore_eos": true});
    let (status, _, text) = timeout(BOUND, post(addr, "/v1/completions", &body)).await??;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(8), "{text}");
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_guards_unknown_routes_and_methods_too() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, s| s.api_key = Some("k".into()))?).await?;
    let key = [("Authorization", "Bearer k")];
    for (method, path, with_key) in [
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/completions", 405),
        ("POST", "/v1/load_lora_adapter", 404),
    ] {
        let (status, _, text) = http(addr, method, path, None, &[]).await?;
        assert_eq!(status, 401, "{method} {path}: {text}");
        error_of(&text)?;
        let (status, _, text) = http(addr, method, path, None, &key).await?;
        assert_eq!(status, with_key, "{method} {path}: {text}");
    }
    for open in ["/health", "/metrics"] {
        assert_eq!(http(addr, "GET", open, None, &[]).await?.0, 200, "{open}");
    }
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_series_all_carry_the_model_label() -> TestResult {
    let (addr, stop, task) = start(demo_server(1, |_, _| {})?).await?;
    let body = json!({"model": "lora-0", "prompt": "x", "max_tokens": 3});
    assert_eq!(post(addr, "/v1/completions", &body).await?.0, 200);
    let (_, _, text) = http(addr, "GET", "/metrics", None, &[]).await?;
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(samples.len() > 50, "{text}");
    for l in samples {
        assert!(
            l.starts_with("multilora:") && l.contains("model_name=\"demo\""),
            "{l}"
        );
    }
    assert_eq!(
        common::metric(&text, "multilora:generation_tokens_total"),
        Some(3.0),
        "{text}"
    );
    stop_serving(stop, task).await
}

/// A copy of a demo adapter in `root` whose first `lora_A` element is `value` (F32 tensors).
fn adapter_with_weight(root: &Path, name: &str, value: f32) -> Result<PathBuf, BoxError> {
    let dir = root.join(name);
    copy_dir(&adapter(0)?, &dir)?;
    let path = dir.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&path)?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len])?;
    let (_, t) = header
        .as_object()
        .ok_or("header")?
        .iter()
        .find(|(k, _)| k.contains("lora_A"))
        .ok_or("no lora_A")?;
    assert_eq!(t["dtype"], "F32");
    let at = 8 + header_len + t["data_offsets"][0].as_u64().ok_or("offsets")? as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_adapter_loading_is_off_by_default_and_confined_when_on() -> TestResult {
    let load = |name: &str, path: &Path| json!({"lora_name": name, "lora_path": path});
    // Off by default: 404, whatever the path.
    let (addr, stop, task) = start(demo_server(1, |_, _| {})?).await?;
    let (status, _, text) = post(addr, "/v1/load_lora_adapter", &load("x", &adapter(1)?)).await?;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("--enable-runtime-lora-updating"), "{text}");
    let (status, _, _) = post(addr, "/v1/unload_lora_adapter", &json!({"lora_name": "lora-0"})).await?;
    assert_eq!(status, 404);
    // Adapter folders are not listed.
    let (_, _, text) = http(addr, "GET", "/v1/models", None, &[]).await?;
    assert!(!text.contains(&*adapter(0)?.to_string_lossy()), "{text}");
    stop_serving(stop, task).await?;

    let root = tempfile::tempdir()?;
    let good = root.path().join("good");
    copy_dir(&adapter(1)?, &good)?;
    let outside = tempfile::tempdir()?;
    std::os::unix::fs::symlink(outside.path(), root.path().join("escape"))?;
    copy_dir(&adapter(1)?, outside.path())?;
    let nan = adapter_with_weight(root.path(), "nan", f32::NAN)?;
    let allowed = root.path().to_path_buf();
    let server = demo_server(0, move |_, s| {
        s.enable_runtime_lora_updating = true;
        s.allowed_lora_dirs = vec![allowed];
    })?;
    let (addr, stop, task) = start(server).await?;
    // Outside the roots, existing or not, through a symlink or not: one answer.
    let mut answers = Vec::new();
    for path in [
        Path::new("/etc"),
        Path::new("/nonexistent"),
        &root.path().join("escape"),
        outside.path(),
    ] {
        let (status, _, text) = post(addr, "/v1/load_lora_adapter", &load("x", path)).await?;
        assert_eq!(status, 400, "{}: {text}", path.display());
        answers.push(error_of(&text)?["message"].clone());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    // NaN weights: a clear 400.
    let (status, _, text) = post(addr, "/v1/load_lora_adapter", &load("nan", &nan)).await?;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("NaN or Inf"), "{text}");
    // Inside: loads and serves.
    let (status, _, text) = post(addr, "/v1/load_lora_adapter", &load("good", &good)).await?;
    assert_eq!(status, 200, "{text}");
    let body = json!({"model": "good", "prompt": "x", "max_tokens": 2});
    let (status, _, text) = post(addr, "/v1/completions", &body).await?;
    assert_eq!(status, 200, "{text}");
    let (_, _, text) = http(addr, "GET", "/v1/models", None, &[]).await?;
    let models: Value = serde_json::from_str(&text)?;
    assert_eq!(models["data"][1]["root"], "good", "{text}");
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_adapter_read_holds_neither_generation_nor_health() -> TestResult {
    let root = tempfile::tempdir()?;
    let slow = root.path().join("slow");
    copy_dir(&adapter(1)?, &slow)?;
    let fifo = slow.join("adapter_config.json");
    let content = make_fifo(&fifo)?;
    let allowed = root.path().to_path_buf();
    let server = demo_server(1, move |_, s| {
        s.enable_runtime_lora_updating = true;
        s.allowed_lora_dirs = vec![allowed];
        s.lora_load_timeout = Duration::from_secs(1);
    })?;
    let (addr, stop, task) = start(server).await?;
    let body = json!({"lora_name": "slow", "lora_path": slow});
    let loading = tokio::spawn(async move { post(addr, "/v1/load_lora_adapter", &body).await });
    // While the read hangs, streams on other adapters run and /health is fine.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gen = json!({"model": "lora-0", "prompt": "x", "max_tokens": 4});
    let (status, _, text) = post(addr, "/v1/completions", &gen).await?;
    assert_eq!(status, 200, "{text}");
    wait_health(addr, 200).await?;
    let (status, _, text) = timeout(BOUND, loading).await???;
    assert_eq!(status, 504, "{text}");
    error_of(&text)?;
    release_fifo(fifo, content).await?;
    stop_serving(stop, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_an_engine_stuck_in_one_command() -> TestResult {
    // Adapters evicted from the host cache reload on loader threads (issue 13), so what still
    // reads on the engine thread is a runtime adapter's load into the engine (`add_lora`, after
    // the handler's own check); the injected loader holds that read.
    let root = tempfile::tempdir()?;
    let gated = root.path().join("gated");
    copy_dir(&adapter(0)?, &gated)?;
    let loader = Arc::new(GatedLoader::default());
    let (hook, allowed) = (loader.clone(), root.path().to_path_buf());
    let server = demo_server(1, move |e, s| {
        e.adapter_loader = Some(hook);
        s.enable_runtime_lora_updating = true;
        s.allowed_lora_dirs = vec![allowed];
        s.engine_stall_timeout = Duration::from_millis(300);
    })?;
    let (addr, stop, task) = start(server).await?;
    let body = json!({"lora_name": "gated", "lora_path": gated});
    let stuck = tokio::spawn(async move { post(addr, "/v1/load_lora_adapter", &body).await });
    let text = wait_health(addr, 503).await?;
    assert!(text.contains("one step or command"), "{text}");
    // The HTTP side still answers what needs no engine.
    let (status, _, text) = timeout(BOUND, http(addr, "GET", "/v1/models", None, &[])).await??;
    assert_eq!(status, 200, "{text}");
    loader.open();
    let (status, _, text) = timeout(BOUND, stuck).await???;
    assert_eq!(status, 200, "{text}");
    wait_health(addr, 200).await?;
    stop_serving(stop, task).await
}

/// Loads adapters from disk, but one named `gated` only once [`GatedLoader::open`] is called.
#[derive(Debug, Default)]
struct GatedLoader {
    is_open: Mutex<bool>,
    opened: Condvar,
}

impl GatedLoader {
    fn open(&self) {
        *self.is_open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.opened.notify_all();
    }
}

impl AdapterLoader for GatedLoader {
    fn load(
        &self,
        req: &LoraRequest,
        model: &ModelConfig,
        max_lora_rank: usize,
    ) -> EngineResult<LoraAdapter> {
        if req.name == "gated" {
            let mut is_open = self.is_open.lock().unwrap_or_else(|e| e.into_inner());
            while !*is_open {
                is_open = self.opened.wait(is_open).unwrap_or_else(|e| e.into_inner());
            }
        }
        DiskLoader.load(req, model, max_lora_rank)
    }
}
