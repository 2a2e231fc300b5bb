//! The server over a real loopback socket: many concurrent streaming clients with mixed
//! adapters, a client that disconnects mid-stream, and graceful shutdown.

mod common;

use std::time::Duration;

use common::{
    demo_server, generation_request, http, metric, open_stream, open_stream_with, sse_data, start, wait_idle,
    TestResult, MODEL,
};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_streaming_clients_with_mixed_adapters_all_finish() -> TestResult {
    let num_adapters = 8;
    let (addr, stop, task) = start(demo_server(num_adapters, |_, _| {})?).await?;
    let num_clients = 32;
    let mut clients = Vec::new();
    let mut want_tokens = 0;
    for i in 0..num_clients {
        let model = if i % 5 == 0 {
            MODEL.to_string()
        } else {
            format!("lora-{}", i % num_adapters)
        };
        let max_tokens = 8 + i % 9;
        want_tokens += max_tokens;
        let chat = i % 2 == 0;
        let (path, mut body) = generation_request(i as u64, chat, &model, max_tokens as u64);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body["temperature"] = json!(0.8);
        clients.push(tokio::spawn(async move {
            let (status, _, text) = http(addr, "POST", path, Some(&body), &[]).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((i, max_tokens, status, text))
        }));
    }
    for c in clients {
        let (i, max_tokens, status, text) = c.await??;
        assert_eq!(status, 200, "client {i}: {text}");
        let data = sse_data(&text);
        assert_eq!(
            data.last().map(String::as_str),
            Some("[DONE]"),
            "client {i}: {text}"
        );
        let usage: Value = serde_json::from_str(&data[data.len() - 2])?;
        assert_eq!(
            usage["usage"]["completion_tokens"], max_tokens,
            "client {i}: {text}"
        );
    }
    let m = wait_idle(addr).await?;
    let finished = |reason: &str| {
        m.lines()
            .find(|l| l.contains(&format!("finished_reason=\"{reason}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(finished("length"), Some(num_clients as f64), "{m}");
    assert_eq!(finished("abort"), Some(0.0), "{m}");
    let tokens = metric(&m, "multilora:generation_tokens_total").ok_or("no tokens metric")?;
    let steps = metric(&m, "multilora:engine_steps_total").ok_or("no steps metric")?;
    assert_eq!(tokens, want_tokens as f64);
    // Requests from different connections shared steps: continuous batching.
    assert!(
        steps < tokens,
        "{steps} steps for {tokens} tokens: no batching across connections"
    );
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_sequence() -> TestResult {
    let body = json!({"model": MODEL, "prompt": "Once", "max_tokens": LONG, "ignore_eos": true,
                      "stream": true});
    disconnect_frees_sequences(&body, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_several_prompts_that_disconnects_frees_all_their_sequences() -> TestResult {
    let body = json!({"model": MODEL, "prompt": ["Once", "Upon a time", "x"], "n": 2,
                      "max_tokens": LONG, "ignore_eos": true, "stream": true});
    disconnect_frees_sequences(&body, 6).await
}

/// Output tokens of a request that is still running when the server notices its client left.
const LONG: usize = 2000;

/// Opens a stream of `body` ([`LONG`] tokens per sequence), leaves after its first chunk, and
/// checks that all `num_sequences` of it were aborted before running to the end and that the
/// server still serves.
async fn disconnect_frees_sequences(body: &Value, num_sequences: usize) -> TestResult {
    let server = demo_server(0, |e, _| e.max_model_len = Some(2048))?;
    let (addr, stop, task) = start(server).await?;
    let stream = open_stream_with(addr, body).await?;
    drop(stream);
    let m = wait_idle(addr).await?;
    let aborted = m
        .lines()
        .find(|l| l.contains("finished_reason=\"abort\""))
        .and_then(|l| l.rsplit(' ').next())
        .ok_or("no abort metric")?;
    assert_eq!(
        aborted,
        num_sequences.to_string(),
        "every sequence is aborted:\n{m}"
    );
    let tokens = metric(&m, "multilora:generation_tokens_total").ok_or("no tokens metric")?;
    assert!(
        tokens < (num_sequences * LONG) as f64,
        "the request ran to the end ({tokens} tokens) after its client left"
    );
    // The server still serves.
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
    let (status, _, text) = http(addr, "POST", "/v1/completions", Some(&body), &[]).await?;
    assert_eq!(status, 200, "{text}");
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_requests_finish() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    let mut stream = open_stream(addr, 60).await?;
    let _ = stop.send(());
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await?;
    let data = sse_data(&rest);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{rest}");
    assert!(
        data.iter().any(|d| d.contains("\"finish_reason\":\"length\"")),
        "the request was cut short: {rest}"
    );
    tokio::time::timeout(Duration::from_secs(30), task).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_what_outlives_the_drain_timeout() -> TestResult {
    let server = demo_server(0, |e, s| {
        e.max_model_len = Some(2048);
        s.drain_timeout = Duration::ZERO;
    })?;
    let (addr, stop, task) = start(server).await?;
    let mut stream = open_stream(addr, 2000).await?;
    let _ = stop.send(());
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await?;
    let data = sse_data(&rest);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{rest}");
    let err: Value = serde_json::from_str(&data[data.len() - 2])?;
    assert!(err["error"]["message"].is_string(), "{rest}");
    tokio::time::timeout(Duration::from_secs(30), task).await???;
    Ok(())
}
