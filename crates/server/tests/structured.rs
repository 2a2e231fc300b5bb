//! Structured outputs through the HTTP API (`router().oneshot(...)`), on the demo model's random
//! weights: whatever it would say, the output obeys the request's choice, regex or schema, on
//! completions and chat, streamed or not, with an adapter; a bad or doubled constraint is a 400
//! naming its field. And a server whose token table is still building serves everything else.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use axum::http::StatusCode;
use common::in_process::{post_json, send};
use common::{demo_server, http, post, sse_data, start, TestResult, MODEL};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_while_its_token_table_builds() -> TestResult {
    let hold = Arc::new(Barrier::new(2));
    let held = hold.clone();
    let server = demo_server(0, move |e, _| e.hold_token_table = Some(held))?;
    let grammars = server.state().engine.info.grammars.clone();
    let (addr, stop, task) = start(server).await?;
    let free = json!({"model": MODEL, "prompt": "Once", "max_tokens": 4, "ignore_eos": true});
    let (status, _, text) = post(addr, "/v1/completions", &free).await?;
    assert_eq!(status, 200, "{text}");
    assert!(
        !grammars.is_ready(),
        "the table was built before a free request was served"
    );
    // A constrained request waits for the table, off the engine thread: free requests and
    // /health still answer.
    let constrained = json!({"model": MODEL, "prompt": "Answer:", "max_tokens": 8,
                             "guided_choice": ["yes", "no"]});
    let waiting = tokio::spawn(async move { post(addr, "/v1/completions", &constrained).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a constrained request ran without the table"
    );
    let (status, _, text) = post(addr, "/v1/completions", &free).await?;
    assert_eq!(status, 200, "{text}");
    assert_eq!(http(addr, "GET", "/health", None, &[]).await?.0, 200);
    tokio::task::spawn_blocking(move || hold.wait()).await?;
    let (status, _, text) = tokio::time::timeout(Duration::from_secs(30), waiting).await???;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    let out = v["choices"][0]["text"].as_str().ok_or("no text")?;
    assert!(["yes", "no"].contains(&out), "{out:?}");
    assert!(grammars.is_ready());
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_requests_obey_and_bad_ones_are_refused_by_name() -> TestResult {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();

    // guided_choice on completions, sampled, with an adapter: one of the choices, and "stop".
    let choices = ["yes", "no", "maybe"];
    for seed in 0..4 {
        let body = json!({"model": "lora-0", "prompt": "Answer:", "max_tokens": 20,
                          "temperature": 1.0, "seed": seed, "guided_choice": choices});
        let (status, text) = send(&app, post_json("/v1/completions", &body)).await?;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text)?;
        let out = v["choices"][0]["text"].as_str().ok_or("no text")?;
        assert!(choices.contains(&out), "{out:?} is not one of {choices:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // response_format json_schema on chat: the content parses and validates.
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                        "maximum": 99}}, "required": ["n"], "additionalProperties": false,
                        "x-guidance": {"whitespace_flexible": false}});
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "a number"}],
                      "max_tokens": 30, "temperature": 1.0, "seed": 3,
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "n", "schema": schema}}});
    let (status, text) = send(&app, post_json("/v1/chat/completions", &body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .ok_or("no content")?;
    let parsed: Value = serde_json::from_str(content)?;
    assert!(parsed["n"].as_u64().is_some_and(|n| n <= 99), "{content}");
    assert_eq!(parsed.as_object().map(|o| o.len()), Some(1), "{content}");

    // guided_regex streamed: the deltas put together match the whole regex.
    let body = json!({"model": MODEL, "prompt": "code:", "max_tokens": 20, "temperature": 1.0,
                      "seed": 5, "stream": true, "guided_regex": "[a-z]{3}-[0-9]{2}"});
    let (status, text) = send(&app, post_json("/v1/completions", &body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut streamed = String::new();
    for data in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data)?;
        streamed.push_str(chunk["choices"][0]["text"].as_str().unwrap_or(""));
    }
    let re = regex_like(&streamed);
    assert!(re, "{streamed:?} does not match [a-z]{{3}}-[0-9]{{2}}");

    // Refused, naming the field: a regex llguidance cannot parse, two constraints at once.
    for (body, field) in [
        (
            json!({"model": MODEL, "prompt": "x", "guided_regex": "[a-z"}),
            "guided_regex",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "guided_json": {"type": "object", "required": 5}}),
            "guided_json",
        ),
    ] {
        let (status, text) = send(&app, post_json("/v1/completions", &body)).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
        let e: Value = serde_json::from_str(&text)?;
        assert_eq!(e["error"]["param"], field, "{text}");
        assert!(
            e["error"]["message"].as_str().is_some_and(|m| m.contains(field)),
            "{text}"
        );
    }
    Ok(())
}

/// A GBNF grammar (vLLM's xgrammar format): a greeting and a capitalized name.
const GREETING_GBNF: &str = r#"# a greeting
root     ::= greeting " " name "!"
greeting ::= "hi" | "hello"
name     ::= [A-Z] [a-z]{1,5}
"#;

/// Whether `s` is a sentence of [`GREETING_GBNF`].
fn is_greeting(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("hi ").or_else(|| s.strip_prefix("hello ")) else {
        return false;
    };
    let Some(name) = rest.strip_suffix('!') else {
        return false;
    };
    let b = name.as_bytes();
    (2..=6).contains(&b.len()) && b[0].is_ascii_uppercase() && b[1..].iter().all(u8::is_ascii_lowercase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gbnf_grammars_constrain_outputs_and_bad_ones_are_refused_by_name() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    for seed in 0..10 {
        let body = json!({"model": MODEL, "prompt": "Say hi:", "max_tokens": 40, "temperature": 1.0,
                          "seed": seed, "guided_grammar": GREETING_GBNF});
        let (status, text) = send(&app, post_json("/v1/completions", &body)).await?;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text)?;
        let out = v["choices"][0]["text"].as_str().ok_or("no text")?;
        assert!(
            is_greeting(out),
            "seed {seed}: {out:?} is not a sentence of the grammar"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{out:?}");
    }
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 40, "temperature": 1.0, "seed": 1,
                      "structured_outputs": {"grammar": GREETING_GBNF}});
    let (status, text) = send(&app, post_json("/v1/chat/completions", &body)).await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    let out = v["choices"][0]["message"]["content"]
        .as_str()
        .ok_or("no content")?;
    assert!(is_greeting(out), "{out:?}");
    for (field, bad) in [
        ("guided_grammar", json!("root ::= \"hi")),
        ("guided_grammar", json!("root ::= greeting")),
        ("structured_outputs", json!({"grammar": "root ::= [z-a]"})),
    ] {
        let mut body = json!({"model": MODEL, "prompt": "x", "max_tokens": 4});
        body[field] = bad.clone();
        let (status, text) = send(&app, post_json("/v1/completions", &body)).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {text}");
        let e: Value = serde_json::from_str(&text)?;
        assert_eq!(e["error"]["param"], field, "{text}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(&format!("{field}: GBNF: ")), "{text}");
    }
    Ok(())
}

/// `[a-z]{3}-[0-9]{2}`, whole, without a regex crate in the server's tests.
fn regex_like(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 6
        && b[..3].iter().all(u8::is_ascii_lowercase)
        && b[3] == b'-'
        && b[4..].iter().all(u8::is_ascii_digit)
}
