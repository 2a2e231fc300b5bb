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
