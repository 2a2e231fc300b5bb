//! The HTTP API in-process (`router().oneshot(...)`): every error status and body, the
//! response formats, adapters loaded and unloaded at run time.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::in_process::{post, post_json, send};
use common::{demo_dir, demo_server, sse_chunks, TestResult, MODEL};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Checks OpenAI's error shape and returns the error object.
fn error_body(text: &str) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let v: Value = serde_json::from_str(text)?;
    let e = v
        .get("error")
        .ok_or_else(|| format!("no error object in {text}"))?
        .clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
    assert!(e["type"].is_string(), "{text}");
    assert!(e.get("param").is_some(), "{text}");
    // OpenAI's type for it, in every body.
    assert!(e["code"].is_string() || e["code"].is_null(), "{text}");
    Ok(e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_and_chat_bodies() -> TestResult {
    let server = demo_server(2, |_, _| {})?;
    let app = server.router();
    let (status, text) = send(
        &app,
        post_json(
            "/v1/completions",
            &json!({"model": "lora-1", "prompt": "Hello there", "max_tokens": 5, "min_tokens": 5,
                    "ignore_eos": true, "temperature": 0}),
        ),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "lora-1");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert!(v["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 0));

    // vLLM's /tokenize agrees with the usage of a completion.
    let (status, text) = send(
        &app,
        post_json("/tokenize", &json!({"model": MODEL, "prompt": "Hello there"})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let t: Value = serde_json::from_str(&text)?;
    assert_eq!(t["count"], v["usage"]["prompt_tokens"]);
    assert_eq!(t["max_model_len"], 256);

    // Token-id prompts work too, and greedy decoding is deterministic.
    let body = json!({"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0,
                      "ignore_eos": true});
    let (_, a) = send(&app, post_json("/v1/completions", &body)).await?;
    let (_, b) = send(&app, post_json("/v1/completions", &body)).await?;
    let text_of = |s: &str| -> Result<Value, serde_json::Error> {
        Ok(serde_json::from_str::<Value>(s)?["choices"][0]["text"].clone())
    };
    assert_eq!(text_of(&a)?, text_of(&b)?);
    assert_eq!(serde_json::from_str::<Value>(&a)?["usage"]["prompt_tokens"], 4);

    let (status, text) = send(
        &app,
        post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3, "ignore_eos": true}),
        ),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    // "<|begin_of_text|>user: hi\nassistant: " rendered by the demo's template, BOS once.
    let tok = &server.state().engine.info.tokenizer;
    let expected = tok
        .encode("<|begin_of_text|>user: hi\nassistant: ", false)
        .map_err(|e| e.to_string())?
        .len();
    assert_eq!(v["usage"]["prompt_tokens"], expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_with_usage_and_done() -> TestResult {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = json!({"model": "lora-0", "max_tokens": 7, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true}});
        if path.contains("chat") {
            body["messages"] = json!([{"role": "user", "content": "tell me"}]);
        } else {
            body["prompt"] = json!("Once upon a time");
        }
        let (status, text) = send(&app, post_json(path, &body)).await?;
        assert_eq!(status, StatusCode::OK, "{text}");
        let chunks = sse_chunks(&text)?;
        let usage = chunks.last().ok_or("no chunks")?;
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 7);
        let finishes: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().into_iter().flatten())
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, vec![&json!("length")], "{text}");
        if path.contains("chat") {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_openai_body() -> TestResult {
    let server = demo_server(1, |_, s| {
        s.max_body_bytes = 4096;
        s.enable_runtime_lora_updating = true;
    })?;
    let app = server.router();
    let cases: Vec<(&str, Request<Body>, StatusCode, Option<&str>)> = vec![
        (
            "malformed JSON",
            post("/v1/completions", "{\"model\": "),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "wrong type",
            post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "x", "max_tokens": "many"}),
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "missing field",
            post_json("/v1/completions", &json!({"prompt": "x"})),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "unknown model",
            post_json("/v1/completions", &json!({"model": "nope", "prompt": "x"})),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
        (
            "prompt too long",
            post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": vec![5; 250], "max_tokens": 10}),
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "temperature < 0",
            post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "x", "temperature": -1}),
            ),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
        ),
        (
            "top_p > 1",
            post_json(
                "/v1/chat/completions",
                &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 2}),
            ),
            StatusCode::BAD_REQUEST,
            Some("top_p"),
        ),
        (
            "max_tokens 0",
            post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "x", "max_tokens": 0}),
            ),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
        ),
        (
            "min > max",
            post_json(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 3}),
            ),
            StatusCode::BAD_REQUEST,
            Some("min_tokens"),
        ),
        (
            "n = 0",
            post_json("/v1/completions", &json!({"model": MODEL, "prompt": "x", "n": 0})),
            StatusCode::BAD_REQUEST,
            Some("n"),
        ),
        (
            "token outside vocab",
            post_json("/v1/completions", &json!({"model": MODEL, "prompt": [999999]})),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "empty messages",
            post_json("/v1/chat/completions", &json!({"model": MODEL, "messages": []})),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            "body too large",
            post(
                "/v1/completions",
                format!("{{\"model\": \"{MODEL}\", \"prompt\": \"{}\"}}", "a".repeat(8000)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
        (
            "unknown route",
            Request::get("/v1/nothing").body(Body::empty())?,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "unload unknown",
            post_json("/v1/unload_lora_adapter", &json!({"lora_name": "nope"})),
            StatusCode::NOT_FOUND,
            Some("lora_name"),
        ),
        (
            "load existing name",
            post_json(
                "/v1/load_lora_adapter",
                &json!({"lora_name": "lora-0", "lora_path": "/x"}),
            ),
            StatusCode::BAD_REQUEST,
            Some("lora_name"),
        ),
    ];
    for (what, req, want, param) in cases {
        let (status, text) = send(&app, req).await?;
        assert_eq!(status, want, "{what}: {text}");
        let e = error_body(&text)?;
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{what}: {text}");
        }
        if what == "prompt too long" {
            assert_eq!(e["code"], "context_length_exceeded", "{text}");
        }
    }
    // Nothing leaked: every refused request left the engine empty.
    let (_, metrics) = send(&app, Request::get("/metrics").body(Body::empty())?).await?;
    assert_eq!(
        common::metric(&metrics, "multilora:num_requests_waiting"),
        Some(0.0)
    );
    assert_eq!(
        common::metric(&metrics, "multilora:num_requests_running"),
        Some(0.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_on_v1_only() -> TestResult {
    let server = demo_server(0, |_, s| s.api_key = Some("sekret".into()))?;
    let app = server.router();
    let models = |auth: Option<&str>| {
        let mut r = Request::get("/v1/models");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        r.body(Body::empty()).expect("valid request")
    };
    for auth in [None, Some("Bearer wrong"), Some("sekret"), Some("Bearer sekre")] {
        let (status, text) = send(&app, models(auth)).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {text}");
        assert_eq!(error_body(&text)?["code"], "invalid_api_key");
    }
    let (status, _) = send(
        &app,
        post_json("/v1/completions", &json!({"model": MODEL, "prompt": "x"})),
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, text) = send(&app, models(Some("Bearer sekret"))).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, _) = send(&app, Request::get("/health").body(Body::empty())?).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_and_shutting_down_503_both_with_retry_after() -> TestResult {
    // No request may wait: every generation request is refused, deterministically.
    let server = demo_server(0, |_, s| s.max_waiting_requests = 0)?;
    let app = server.router();
    let refused = |app: Router| async move {
        let req = post_json("/v1/completions", &json!({"model": MODEL, "prompt": "x"}));
        let res = app.oneshot(req).await?;
        let (status, retry_after) = (res.status(), res.headers().get(header::RETRY_AFTER).cloned());
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
        let e = error_body(std::str::from_utf8(&bytes)?)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, retry_after, e))
    };
    let (status, retry_after, e) = refused(app.clone()).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{e}");
    assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-waiting-requests")),
        "{e}"
    );
    let (_, metrics) = send(&app, Request::get("/metrics").body(Body::empty())?).await?;
    assert_eq!(
        common::metric(&metrics, "multilora:request_rejected_queue_full_total"),
        Some(1.0)
    );
    // A draining server is unavailable, not rate limiting: 503.
    server
        .state()
        .is_shutting_down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, retry_after, e) = refused(app.clone()).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    assert!(retry_after.is_some());
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains("shutting down")),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_at_run_time() -> TestResult {
    let server = demo_server(0, |_, s| {
        s.enable_runtime_lora_updating = true;
        s.show_lora_paths = true;
    })?;
    let app = server.router();
    let demo = demo_dir()?;
    // A broken adapter fails its load call only.
    let broken = tempfile::tempdir()?;
    std::fs::write(broken.path().join("adapter_config.json"), "{not json")?;
    for path in [broken.path().to_path_buf(), demo.join("adapters/missing")] {
        let body = json!({"lora_name": "bad", "lora_path": path});
        let (status, text) = send(&app, post_json("/v1/load_lora_adapter", &body)).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        error_body(&text)?;
    }
    let good = demo.join("adapters/demo-r16-003");
    let body = json!({"lora_name": "sql", "lora_path": good});
    let (status, text) = send(&app, post_json("/v1/load_lora_adapter", &body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");

    let (_, text) = send(&app, Request::get("/v1/models").body(Body::empty())?).await?;
    let models: Value = serde_json::from_str(&text)?;
    let data = models["data"].as_array().ok_or("no data")?;
    assert_eq!(data.len(), 2, "{text}");
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["parent"], Value::Null);
    assert_eq!(data[1]["id"], "sql");
    assert_eq!(data[1]["parent"], MODEL);
    assert_eq!(data[1]["root"], good.to_string_lossy().as_ref());

    let req = json!({"model": "sql", "prompt": "select", "max_tokens": 2});
    let (status, text) = send(&app, post_json("/v1/completions", &req)).await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "the server keeps serving after a broken load: {text}"
    );

    let (status, _) = send(
        &app,
        post_json("/v1/unload_lora_adapter", &json!({"lora_name": "sql"})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&app, post_json("/v1/completions", &req)).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let base = json!({"model": MODEL, "prompt": "The", "max_tokens": 12, "temperature": 0,
                      "ignore_eos": true});
    let (_, text) = send(&app, post_json("/v1/completions", &base)).await?;
    let full = serde_json::from_str::<Value>(&text)?["choices"][0]["text"]
        .as_str()
        .ok_or("no text")?
        .to_string();
    // Stop on a piece of the greedy output: the text ends right before its first occurrence.
    let (stop, cut) = common::stop_string_in(&full)?;
    let mut req = base.clone();
    req["stop"] = json!([stop]);
    let (_, text) = send(&app, post_json("/v1/completions", &req)).await?;
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["choices"][0]["text"], full[..cut], "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // A stop string that completes on the last allowed token: the engine finished the request
    // (length) on that token, the client sees `stop`, and so must /metrics.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let tail = (0..chars.len().saturating_sub(1))
        .rev()
        .map(|i| &full[chars[i].0..])
        .find(|t| !t.contains('\u{FFFD}') && full.find(t) == Some(full.len() - t.len()))
        .ok_or("no suffix of the output that occurs once")?;
    req["stop"] = json!([tail]);
    let (_, text) = send(&app, post_json("/v1/completions", &req)).await?;
    let v: Value = serde_json::from_str(&text)?;
    assert_eq!(v["choices"][0]["text"], full[..full.len() - tail.len()], "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Both stop-string requests count as finished with reason stop, none as aborted. The
    // engine loop counts on its own thread: wait until it has (bounded).
    let finished = |metrics: &str, reason: &str| {
        let label = format!("finished_reason=\"{reason}\"}}");
        metrics
            .lines()
            .find(|l| l.starts_with("multilora:request_success_total{") && l.contains(&label))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = send(&app, Request::get("/metrics").body(Body::empty())?).await?.1;
        if finished(&metrics, "stop") >= Some(2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(finished(&metrics, "stop"), Some(2), "{metrics}");
    assert_eq!(finished(&metrics, "length"), Some(1), "{metrics}");
    assert_eq!(finished(&metrics, "abort"), Some(0), "{metrics}");
    assert_eq!(
        common::metric(&metrics, "multilora:e2e_request_latency_seconds_count"),
        Some(3.0),
        "a stop-string finish has its latencies observed: {metrics}"
    );
    Ok(())
}
