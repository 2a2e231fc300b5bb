//! `n` > 1 through the API: one choice per index, each what a request of its own with
//! `seed + index` gives, usage counting every choice, streamed with each choice's chunks
//! interleaved, one finish per choice and one `[DONE]`.

mod common;

use std::collections::HashMap;

use common::in_process::{post_json, send};
use common::{demo_server, sse_data, TestResult, MODEL};
use serde_json::{json, Value};

async fn post(
    app: &axum::Router,
    path: &str,
    body: &Value,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let (status, text) = send(app, post_json(path, body)).await?;
    assert_eq!(status, 200, "{text}");
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_choice_is_its_seeded_request() -> TestResult {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();
    for model in [MODEL, "lora-0"] {
        let body = json!({"model": model, "prompt": "Once upon a time there was", "max_tokens": 6,
            "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": true, "logprobs": 0});
        let v: Value = serde_json::from_str(&post(&app, "/v1/completions", &body).await?)?;
        let choices = v["choices"].as_array().ok_or("choices")?;
        assert_eq!(choices.len(), 3);
        assert_eq!(v["usage"]["completion_tokens"], json!(18), "{}", v["usage"]);
        let mut texts = Vec::new();
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], json!(i));
            assert_eq!(c["logprobs"]["token_logprobs"].as_array().map(Vec::len), Some(6));
            let mut alone = body.clone();
            alone["n"] = json!(1);
            alone["seed"] = json!(7 + i);
            let a: Value = serde_json::from_str(&post(&app, "/v1/completions", &alone).await?)?;
            assert_eq!(c["text"], a["choices"][0]["text"], "{model} choice {i}");
            // Batched with its siblings or alone: the same numbers up to f32 summation order.
            let lps = |v: &Value| -> Vec<f64> {
                v["logprobs"]["token_logprobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .collect()
            };
            let (got, want) = (lps(c), lps(&a["choices"][0]));
            assert_eq!(got.len(), want.len());
            assert!(
                got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-4),
                "{got:?} vs {want:?}"
            );
            texts.push(c["text"].clone());
        }
        texts.dedup();
        assert!(texts.len() > 1, "seeded choices differ: {texts:?}");
    }
    // Greedy choices are all the same; echo puts the prompt before each.
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "n": 2,
        "echo": true, "logprobs": 1, "ignore_eos": true});
    let v: Value = serde_json::from_str(&post(&app, "/v1/completions", &body).await?)?;
    let (a, b) = (&v["choices"][0], &v["choices"][1]);
    assert_eq!(a["text"], b["text"]);
    assert!(a["text"].as_str().is_some_and(|t| t.starts_with("Hello")));
    assert_eq!(a["logprobs"], b["logprobs"]);
    assert!(
        b["logprobs"]["token_logprobs"][0].is_null(),
        "the echoed prompt leads choice 1 too"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_choices_interleave_and_end_once() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell a story"}],
        "max_tokens": 5, "temperature": 0.9, "seed": 3, "n": 2, "ignore_eos": true});
    let whole: Value = serde_json::from_str(&post(&app, "/v1/chat/completions", &body).await?)?;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = post(&app, "/v1/chat/completions", &streamed).await?;
    let data = sse_data(&text);
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let (mut content, mut roles, mut finishes) = (HashMap::new(), HashMap::new(), HashMap::new());
    let mut usage = Value::Null;
    for d in data.iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(d)?;
        for c in chunk["choices"].as_array().ok_or("choices")? {
            let i = c["index"].as_u64().ok_or("index")?;
            if c["delta"]["role"] == "assistant" {
                *roles.entry(i).or_insert(0) += 1;
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                content.entry(i).or_insert_with(String::new).push_str(t);
            }
            if !c["finish_reason"].is_null() {
                *finishes.entry(i).or_insert(0) += 1;
            }
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    for i in 0..2u64 {
        assert_eq!(
            (roles.get(&i), finishes.get(&i)),
            (Some(&1), Some(&1)),
            "choice {i}"
        );
        assert_eq!(
            content.get(&i).map(String::as_str),
            whole["choices"][i as usize]["message"]["content"].as_str(),
            "choice {i} streamed as whole"
        );
    }
    assert_eq!(usage["completion_tokens"], json!(10));
    assert_eq!(usage, whole["usage"]);
    // Two requests of two choices each: their prompts count once each in /metrics.
    let prompt_tokens = usage["prompt_tokens"].as_u64().ok_or("usage")?;
    assert_eq!(server.state().metrics.num_prompt_tokens.get(), 2 * prompt_tokens);
    Ok(())
}
