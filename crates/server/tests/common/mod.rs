//! Shared set-up for the server tests: the demo model (written once per build under Cargo's
//! test temp folder), a server on it, and a minimal HTTP/1.0 client for real-socket tests
//! (HTTP/1.0 so that a streamed body ends when the connection closes: no chunked decoding).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use multilora_engine::EngineConfig;
use multilora_server::{Server, ServerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const MODEL: &str = "demo";

/// The demo model and adapters; written on first use.
pub fn demo_dir() -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("server-demo");
    // Test binaries may race to write it; a loser finds it complete on the next try.
    if multilora_engine::demo::ensure_demo(&root, 0).is_err() {
        std::thread::sleep(Duration::from_millis(500));
        multilora_engine::demo::ensure_demo(&root, 0)?;
    }
    Ok(root)
}

pub fn adapter(i: usize) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    let rank = if i.is_multiple_of(2) { 8 } else { 16 };
    Ok(demo_dir()?.join(format!("adapters/demo-r{rank}-{:03}", i / 2)))
}

/// A server on the demo model with adapters `lora-0` .. `lora-{num_adapters-1}`.
pub fn demo_server(
    num_adapters: usize,
    tweak: impl FnOnce(&mut EngineConfig, &mut ServerConfig),
) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
    let root = demo_dir()?;
    let mut engine = EngineConfig::new(root.join("model"));
    engine.enable_lora = true;
    engine.max_loras = 4;
    engine.max_cpu_loras = Some(8);
    engine.max_num_seqs = 16;
    engine.max_model_len = Some(256);
    let mut server = ServerConfig::new(MODEL);
    for i in 0..num_adapters {
        server.lora_modules.push((format!("lora-{i}"), adapter(i)?));
    }
    tweak(&mut engine, &mut server);
    Ok(Server::start(engine, server)?)
}

pub type Serving = (SocketAddr, oneshot::Sender<()>, JoinHandle<std::io::Result<()>>);

/// Serves on a loopback port until the sender is used (or dropped).
pub async fn start(server: Server) -> Result<Serving, Box<dyn std::error::Error + Send + Sync>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    Ok((addr, stop, task))
}

/// A raw HTTP/1.0 exchange: returns (status, headers, body).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String), Box<dyn std::error::Error + Send + Sync>> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head.split(' ').nth(1).ok_or("no status")?.parse::<u16>()?;
    Ok((status, head.to_string(), body.to_string()))
}

/// Opens a streaming completion and reads until its first content chunk; returns the open
/// connection.
pub async fn open_stream(
    addr: SocketAddr,
    max_tokens: usize,
) -> Result<TcpStream, Box<dyn std::error::Error + Send + Sync>> {
    let body = json!({"model": MODEL, "prompt": "Once", "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true});
    open_stream_with(addr, &body).await
}

/// [`open_stream`] with this completion body.
pub async fn open_stream_with(
    addr: SocketAddr,
    body: &Value,
) -> Result<TcpStream, Box<dyn std::error::Error + Send + Sync>> {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!(
        "POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(format!("stream closed early: {}", String::from_utf8_lossy(&seen)).into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(stream)
}

/// A generation request `i` for `model`: a chat or a completion, `max_tokens` long whatever
/// the model says (`ignore_eos`); returns its path and body.
pub fn generation_request(i: u64, is_chat: bool, model: &str, max_tokens: u64) -> (&'static str, Value) {
    let mut body = json!({"model": model, "max_tokens": max_tokens, "ignore_eos": true, "seed": i});
    if is_chat {
        body["messages"] = json!([{"role": "user", "content": format!("question {i}")}]);
        ("/v1/chat/completions", body)
    } else {
        body["prompt"] = json!(format!("prompt number {i}"));
        ("/v1/completions", body)
    }
}

/// A JSON POST over [`http`].
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> Result<(u16, String, String), Box<dyn std::error::Error + Send + Sync>> {
    http(addr, "POST", path, Some(body), &[]).await
}

/// The `data:` payloads of a server-sent-events body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The JSON chunks of a server-sent-events body that ends with `[DONE]` (which is checked and
/// left out).
pub fn sse_chunks(body: &str) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
    let data = sse_data(body);
    if data.last().map(String::as_str) != Some("[DONE]") {
        return Err(format!("the stream does not end with [DONE]: {body}").into());
    }
    Ok(data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d))
        .collect::<Result<_, _>>()?)
}

/// A Prometheus sample's value, e.g. `metric("multilora:num_requests_running")`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn metrics(addr: SocketAddr) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    Ok(http(addr, "GET", "/metrics", None, &[]).await?.2)
}

/// Polls /metrics until no request runs or waits.
pub async fn wait_idle(addr: SocketAddr) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(addr).await?;
        let busy = metric(&m, "multilora:num_requests_running").unwrap_or(-1.0)
            + metric(&m, "multilora:num_requests_waiting").unwrap_or(-1.0);
        if busy == 0.0 {
            return Ok(m);
        }
        if Instant::now() > deadline {
            return Err(format!("the engine did not drain:\n{m}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stop string for a test: two characters from the second half of a greedy output (none a
/// replacement character), and where it first occurs in it.
pub fn stop_string_in(full: &str) -> Result<(String, usize), Box<dyn std::error::Error + Send + Sync>> {
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..]
        .windows(2)
        .find(|w| !w.contains(&'\u{FFFD}'))
        .ok_or("no clean two characters in the output")?
        .iter()
        .collect();
    let cut = full.find(&stop).ok_or("stop not in text")?;
    Ok((stop, cut))
}

/// Requests through the router in-process (`app.oneshot(...)`), no socket.
pub mod in_process {
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use axum::Router;
    use serde_json::Value;
    use tower::ServiceExt;

    pub async fn send(
        app: &Router,
        req: Request<Body>,
    ) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
        let res = app.clone().oneshot(req).await?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 16 << 20).await?;
        Ok((status, String::from_utf8(bytes.to_vec())?))
    }

    pub fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .expect("valid request")
    }

    pub fn post_json(path: &str, body: &Value) -> Request<Body> {
        post(path, body.to_string())
    }
}
