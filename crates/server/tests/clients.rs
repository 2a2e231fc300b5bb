//! What third-party clients (vllm bench, litellm, lm-evaluation-harness, the openai client)
//! rely on beyond the basics (issue 19): fields we do not implement refused by name, the
//! first streamed chunk sent with the first token, `stop_reason`, `continuous_usage_stats`,
//! `/v1/models/{id}`, `/detokenize`, `/version`, and chat templates that fail cleanly.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::in_process::{post_json, send};
use common::{demo_server, TestResult, MODEL};
use serde_json::{json, Value};
use tower::ServiceExt;

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_not_implemented_are_refused_by_name_on_both_endpoints() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    // Structured outputs work (tests/structured.rs); malformed ones are refused by name.
    let fields = [
        ("guided_choice", json!([])),
        ("guided_json", json!("{not json")),
        ("structured_outputs", json!({"structural_tag": "x"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        ),
        ("prompt_logprobs", json!(21)),
        ("allowed_token_ids", json!([])),
        ("n", json!(0)),
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

async fn body_of(
    app: &Router,
    path: &str,
    body: &Value,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let (status, text) = send(app, post_json(path, body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    Ok(serde_json::from_str(&text)?)
}

/// The streamed chunks of a request (without `[DONE]`), and the text they carry.
async fn stream_of(
    app: &Router,
    path: &str,
    body: &Value,
) -> Result<(Vec<Value>, String), Box<dyn std::error::Error + Send + Sync>> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (status, text) = send(app, post_json(path, &body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let chunks = common::sse_chunks(&text)?;
    let mut streamed = String::new();
    for c in &chunks {
        for choice in c["choices"].as_array().into_iter().flatten() {
            let piece = choice["text"].as_str().or(choice["delta"]["content"].as_str());
            streamed.push_str(piece.unwrap_or_default());
        }
    }
    Ok((chunks, streamed))
}

/// The one `stop_reason` a stream's chunks report with their finish.
fn streamed_stop_reason(chunks: &[Value]) -> Option<Value> {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().into_iter().flatten())
        .find(|c| !c["finish_reason"].is_null())
        .map(|c| c["stop_reason"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reason_names_the_stop_string_or_token() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let base =
        json!({"model": MODEL, "prompt": "The", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let v = body_of(&app, "/v1/completions", &base).await?;
    assert_eq!(
        v["choices"][0]["stop_reason"],
        Value::Null,
        "length: no stop_reason"
    );
    let full = v["choices"][0]["text"].as_str().ok_or("no text")?.to_string();
    let (stop, _) = common::stop_string_in(&full)?;
    // Completions and chat, whole and streamed; the stop string kept on request.
    let chat_base = json!({"model": MODEL, "messages": [{"role": "user", "content": "The"}],
                           "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let chat_full = body_of(&app, "/v1/chat/completions", &chat_base).await?["choices"][0]["message"]
        ["content"]
        .as_str()
        .ok_or("no chat text")?
        .to_string();
    for (path, base, full) in [
        ("/v1/completions", &base, &full),
        ("/v1/chat/completions", &chat_base, &chat_full),
    ] {
        let Some(cut) = full.find(&stop) else {
            assert_eq!(path, "/v1/chat/completions");
            continue;
        };
        for include in [false, true] {
            let mut req = base.clone();
            req["stop"] = json!(["never-in-the-output", stop]);
            req["include_stop_str_in_output"] = json!(include);
            let expected = match include {
                true => &full[..cut + stop.len()],
                false => &full[..cut],
            };
            let v = body_of(&app, path, &req).await?;
            let choice = &v["choices"][0];
            let text = choice["text"].as_str().or(choice["message"]["content"].as_str());
            assert_eq!(text, Some(expected), "{path} include={include}: {v}");
            assert_eq!(choice["finish_reason"], "stop");
            assert_eq!(choice["stop_reason"], stop.as_str(), "{v}");
            let (chunks, streamed) = stream_of(&app, path, &req).await?;
            assert_eq!(streamed, expected, "{path} streamed, include={include}");
            assert_eq!(streamed_stop_reason(&chunks), Some(json!(stop)));
        }
    }

    // A stop token: every id in one of two halves of the vocabulary; the first greedy token
    // is in one, which ends the request with its id as stop_reason and without its text.
    let vocab_size = server.state().engine.info.tokenizer.get_vocab_size(true) as u32;
    let half = vocab_size / 2;
    assert!(
        half <= 1024,
        "the demo vocabulary fits two requests' stop_token_ids"
    );
    let mut stopped_by = None;
    for ids in [(0..half).collect::<Vec<u32>>(), (half..vocab_size).collect()] {
        let mut req = base.clone();
        req["stop_token_ids"] = json!(ids);
        let v = body_of(&app, "/v1/completions", &req).await?;
        if v["usage"]["completion_tokens"] == 1 {
            let id = v["choices"][0]["stop_reason"]
                .as_u64()
                .ok_or(format!("no stop_reason: {v}"))?;
            assert!(ids.contains(&(id as u32)), "{v}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            assert_eq!(v["choices"][0]["text"], "", "a stop token's text is not output");
            let (chunks, streamed) = stream_of(&app, "/v1/completions", &req).await?;
            assert_eq!(streamed_stop_reason(&chunks), Some(json!(id)));
            assert_eq!(streamed, "");
            req["include_stop_str_in_output"] = json!(true);
            let with = body_of(&app, "/v1/completions", &req).await?;
            let mut first = base.clone();
            first["max_tokens"] = json!(1);
            let first = body_of(&app, "/v1/completions", &first).await?;
            assert_eq!(with["choices"][0]["text"], first["choices"][0]["text"]);
            stopped_by = Some(id);
        }
    }
    assert!(stopped_by.is_some(), "the first token was in neither half");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_usage_stats_put_usage_on_every_chunk() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = json!({"model": MODEL, "max_tokens": 5, "ignore_eos": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
        match path {
            "/v1/completions" => body["prompt"] = json!("Once upon"),
            _ => body["messages"] = json!([{"role": "user", "content": "hi"}]),
        }
        let (chunks, _) = stream_of(&app, path, &body).await?;
        let counts: Vec<u64> = chunks
            .iter()
            .map(|c| {
                c["usage"]["completion_tokens"]
                    .as_u64()
                    .ok_or(format!("{path}: no usage in {c}"))
            })
            .collect::<Result<_, _>>()?;
        // One chunk per token (chat: after the role chunk), then the usage chunk.
        let expected: Vec<u64> = match path {
            "/v1/completions" => vec![1, 2, 3, 4, 5, 5],
            _ => vec![0, 1, 2, 3, 4, 5, 5],
        };
        assert_eq!(counts, expected, "{path}");
        let prompt_tokens = &chunks[0]["usage"]["prompt_tokens"];
        assert!(chunks
            .iter()
            .all(|c| &c["usage"]["prompt_tokens"] == prompt_tokens));
        // Without include_usage, no usage (as vLLM).
        body["stream_options"] = json!({"continuous_usage_stats": true});
        let (chunks, _) = stream_of(&app, path, &body).await?;
        assert!(chunks.iter().all(|c| c["usage"].is_null()), "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_history_gets_a_clear_400() -> TestResult {
    // A template as most are: content concatenated to strings.
    let server = demo_server(0, |_, s| {
        s.chat_template =
            Some("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}".into());
    })?;
    let app = server.router();
    let body = json!({"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]});
    let (status, text) = send(&app, post_json("/v1/chat/completions", &body)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let e: Value = serde_json::from_str(&text)?;
    assert_eq!(e["error"]["param"], "messages");
    let msg = e["error"]["message"].as_str().ok_or("no message")?;
    assert!(msg.contains("messages[1]"), "{msg}");
    assert!(
        !msg.contains("operator") && !msg.contains("unsupported types"),
        "{msg}"
    );
    Ok(())
}
