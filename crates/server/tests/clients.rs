//! What third-party clients (vllm bench, litellm, lm-evaluation-harness, the openai client)
//! rely on beyond the basics (issue 19): fields we do not implement refused by name, the
//! first streamed chunk sent with the first token, `stop_reason`, `continuous_usage_stats`,
//! `/v1/models/{id}`, `/detokenize`, `/version`, and chat templates that fail cleanly.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::{demo_server, TestResult, MODEL};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn send(
    app: &Router,
    req: Request<Body>,
) -> Result<(StatusCode, String), Box<dyn std::error::Error + Send + Sync>> {
    let res = app.clone().oneshot(req).await?;
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 16 << 20).await?;
    Ok((status, String::from_utf8(bytes.to_vec())?))
}

fn post_json(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("valid request")
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_not_implemented_are_refused_by_name_on_both_endpoints() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let fields = [
        ("guided_choice", json!(["yes", "no"])),
        ("guided_json", json!({"type": "object"})),
        ("structured_outputs", json!({"regex": "a+"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ),
        ("logprobs", json!(0)),
        ("prompt_logprobs", json!(1)),
        ("allowed_token_ids", json!([5])),
        ("n", json!(2)),
    ];
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for (field, value) in &fields {
            let mut body = match path {
                "/v1/completions" => json!({"model": MODEL, "prompt": "hi", "max_tokens": 3}),
                _ => chat("hi"),
            };
            body[*field] = value.clone();
            let (status, text) = send(&app, post_json(path, &body)).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {field}: {text}");
            let e: Value = serde_json::from_str(&text)?;
            assert_eq!(e["error"]["param"], *field, "{text}");
            assert_eq!(e["error"]["type"], "invalid_request_error", "{text}");
            assert!(e["error"]["code"].is_null(), "{text}");
        }
    }
    // Harmless and unknown fields are accepted.
    let mut body = chat("hi");
    body["skip_special_tokens"] = json!(true);
    body["chat_template_kwargs"] = json!({"enable_thinking": false});
    body["some_future_field"] = json!(1);
    let (status, text) = send(&app, post_json("/v1/chat/completions", &body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    Ok(())
}

/// The role chunk of a streamed chat used to go out when the request arrived; it must come
/// with the first token. The engine's steps are held while the client waits for its first
/// event, so a chunk sent before any step is seen with the step count still 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_first_chunk_comes_after_the_first_step() -> TestResult {
    use futures_util::StreamExt;
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let metrics = server.state().metrics.clone();
    server.state().engine.hold_steps_for_tests(true);
    let mut body = chat("hello");
    body["stream"] = json!(true);
    // The handler answers once the engine loop has taken the request; no step has run.
    let res = app
        .clone()
        .oneshot(post_json("/v1/chat/completions", &body))
        .await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(metrics.num_steps.get(), 0);
    let reader = tokio::spawn(async move {
        let mut stream = res.into_body().into_data_stream();
        let first = stream.next().await;
        let num_steps_then = metrics.num_steps.get();
        let mut text = match first {
            Some(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        while let Some(Ok(bytes)) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
        (num_steps_then, text)
    });
    // Time enough for an early chunk to arrive; the assertion below does not depend on it.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    server.state().engine.hold_steps_for_tests(false);
    let (num_steps_then, text) = reader.await?;
    assert!(
        num_steps_then >= 1,
        "the first chunk came before any engine step: {text}"
    );
    let data = common::sse_data(&text);
    let first: Value = serde_json::from_str(data.first().ok_or("no events")?)?;
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{text}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_retrieve_detokenize_and_version() -> TestResult {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();
    let get = |path: &str| Request::get(path).body(Body::empty()).expect("valid request");
    // One card per model, as /v1/models lists it.
    let (_, list) = send(&app, get("/v1/models")).await?;
    let list: Value = serde_json::from_str(&list)?;
    for id in [MODEL, "lora-0"] {
        let (status, text) = send(&app, get(&format!("/v1/models/{id}"))).await?;
        assert_eq!(status, StatusCode::OK, "{text}");
        let card: Value = serde_json::from_str(&text)?;
        assert_eq!(card["id"], id);
        assert_eq!(card["object"], "model");
        let listed = list["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["id"] == id);
        assert_eq!(Some(&card), listed, "{list}");
    }
    let (status, text) = send(&app, get("/v1/models/no-such/model")).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    let e: Value = serde_json::from_str(&text)?;
    assert_eq!(e["error"]["code"], "model_not_found");
    assert!(e["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("no-such/model")));

    // /tokenize then /detokenize gives the text back (BOS included, as vLLM keeps it).
    let prompt = "Hello there, friend";
    let (_, text) = send(
        &app,
        post_json("/tokenize", &json!({"model": MODEL, "prompt": prompt})),
    )
    .await?;
    let tokens = serde_json::from_str::<Value>(&text)?["tokens"].clone();
    let (status, text) = send(
        &app,
        post_json("/detokenize", &json!({"model": "lora-0", "tokens": tokens})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let back = serde_json::from_str::<Value>(&text)?["prompt"]
        .as_str()
        .ok_or("no prompt")?
        .to_string();
    assert!(back.ends_with(prompt), "{back:?}");
    let (status, text) = send(
        &app,
        post_json(
            "/detokenize",
            &json!({"model": MODEL, "tokens": [1, 4000000000u32]}),
        ),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text)?["error"]["param"], "tokens");
    let (status, _) = send(
        &app,
        post_json("/detokenize", &json!({"model": "nope", "tokens": []})),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, text) = send(&app, get("/version")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text)?["version"],
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}
