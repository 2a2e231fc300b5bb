//! Log-probabilities through the API (issue 19): completions' `logprobs` with `echo`, chat's
//! `logprobs` + `top_logprobs`, vLLM's `prompt_logprobs`, streamed and not, in vLLM's shapes; and
//! the same numbers whichever way a token was scored (generated, echoed, or as a prompt token).

mod common;

use common::in_process::{post_json, send};
use common::{demo_server, sse_data, TestResult, MODEL};
use serde_json::{json, Value};

async fn completion(
    app: &axum::Router,
    body: Value,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let (status, text) = send(app, post_json("/v1/completions", &body)).await?;
    assert_eq!(status, 200, "{text}");
    Ok(serde_json::from_str(&text)?)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_echoed_and_prompt_logprobs_agree() -> TestResult {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();
    for model in [MODEL, "lora-0"] {
        // Generated greedily, each token's logprob with 2 alternatives.
        let gen = completion(
            &app,
            json!({"model": model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
                "logprobs": 2, "ignore_eos": true}),
        )
        .await?;
        let choice = &gen["choices"][0];
        let lp = &choice["logprobs"];
        let generated = floats(&lp["token_logprobs"]);
        assert_eq!(generated.len(), 5, "{lp}");
        assert!(generated.iter().all(|&l| l <= 0.0));
        for (i, top) in lp["top_logprobs"]
            .as_array()
            .ok_or("top_logprobs")?
            .iter()
            .enumerate()
        {
            let top = top.as_object().ok_or("a map")?;
            // The token and 2 alternatives (the token is among them when greedy).
            assert!(top.len() == 2 || top.len() == 3, "{top:?}");
            let best = top.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
            assert!(
                (best - generated[i]).abs() < 1e-6,
                "greedy: the token is the top one"
            );
        }
        let text = choice["text"].as_str().ok_or("text")?;
        let tokens: String = lp["tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(tokens, text, "the tokens spell the text");
        let n_prompt = gen["usage"]["prompt_tokens"].as_u64().ok_or("usage")? as usize;

        // The prompt and that output echoed back as one prompt: the same numbers.
        let full = format!("Once upon a time{text}");
        let echo = completion(
            &app,
            json!({"model": model, "prompt": full, "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "echo": true, "prompt_logprobs": 0}),
        )
        .await?;
        let choice = &echo["choices"][0];
        assert!(
            choice["text"].as_str().ok_or("text")?.starts_with(&full),
            "echo leads with the prompt"
        );
        let lp = &choice["logprobs"];
        let n_full = echo["usage"]["prompt_tokens"].as_u64().ok_or("usage")? as usize;
        assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(n_full + 1));
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        let echoed = floats(&lp["token_logprobs"]);
        assert_eq!(echoed.len(), n_full);
        // The text re-tokenizes to the same tokens here, so the echoed output tokens are the
        // generated ones.
        assert_eq!(n_full, n_prompt + 5, "re-tokenized");
        for (e, g) in echoed[n_prompt - 1..n_prompt + 4].iter().zip(&generated) {
            assert!((e - g).abs() < 1e-4, "echoed {e} vs generated {g}");
        }
        // vLLM's prompt_logprobs: the same values, keyed by token id, with ranks.
        let plp = choice["prompt_logprobs"].as_array().ok_or("prompt_logprobs")?;
        assert_eq!(plp.len(), n_full);
        assert!(plp[0].is_null());
        for (i, pos) in plp.iter().enumerate().skip(1) {
            let entries = pos.as_object().ok_or("a map")?;
            assert_eq!(entries.len(), 1, "prompt_logprobs: 0 is the token alone");
            let (_, e) = entries.iter().next().ok_or("empty")?;
            assert!(e["rank"].as_u64().is_some_and(|r| r >= 1), "{e}");
            assert!(e["decoded_token"].is_string());
            let l = e["logprob"].as_f64().ok_or("logprob")?;
            assert!(
                (l - echoed[i - 1]).abs() < 1e-6,
                "position {i}: {l} vs echoed {}",
                echoed[i - 1]
            );
        }
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        assert_eq!(offsets.len(), n_full + 1);
        assert!(offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_logprobs_come_with_their_tokens() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0,
        "logprobs": 0, "ignore_eos": true});
    let whole = completion(&app, body.clone()).await?;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, text) = send(&app, post_json("/v1/completions", &streamed)).await?;
    assert_eq!(status, 200);
    let mut logprobs = Vec::new();
    let mut offsets = Vec::new();
    for data in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data)?;
        let lp = &chunk["choices"][0]["logprobs"];
        assert_eq!(
            lp["tokens"].as_array().map(Vec::len),
            Some(1),
            "a token a chunk: {chunk}"
        );
        logprobs.extend(floats(&lp["token_logprobs"]));
        offsets.extend(
            lp["text_offset"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64),
        );
    }
    assert_eq!(
        logprobs,
        floats(&whole["choices"][0]["logprobs"]["token_logprobs"])
    );
    let want: Vec<u64> = (whole["choices"][0]["logprobs"]["text_offset"]
        .as_array()
        .into_iter()
        .flatten())
    .filter_map(Value::as_u64)
    .collect();
    assert_eq!(offsets, want, "offsets carry on across chunks");

    // Chat, streamed: each content chunk has its token's entry with 3 alternatives.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "logprobs": true, "top_logprobs": 3, "ignore_eos": true, "stream": true});
    let (status, text) = send(&app, post_json("/v1/chat/completions", &chat)).await?;
    assert_eq!(status, 200);
    let mut entries = Vec::new();
    for data in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data)?;
        if let Some(content) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            entries.extend(content.iter().cloned());
        }
    }
    assert_eq!(entries.len(), 3, "{text}");
    for e in &entries {
        let top = e["top_logprobs"].as_array().ok_or("top_logprobs")?;
        assert_eq!(top.len(), 3);
        let tops = floats(&Value::Array(top.iter().map(|t| t["logprob"].clone()).collect()));
        assert!(
            tops.windows(2).all(|w| w[0] >= w[1]),
            "most likely first: {tops:?}"
        );
        let token = e["token"].as_str().ok_or("token")?;
        assert_eq!(e["bytes"], json!(token.as_bytes()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prompt_logprobs_sit_beside_the_choices() -> TestResult {
    let server = demo_server(0, |_, _| {})?;
    let app = server.router();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 2, "prompt_logprobs": 1, "logprobs": true});
    let (status, text) = send(&app, post_json("/v1/chat/completions", &body)).await?;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text)?;
    let plp = v["prompt_logprobs"].as_array().ok_or("prompt_logprobs")?;
    assert_eq!(
        plp.len() as u64,
        v["usage"]["prompt_tokens"].as_u64().ok_or("usage")?
    );
    assert!(
        plp[0].is_null()
            && plp[1..]
                .iter()
                .all(|p| p.as_object().is_some_and(|m| !m.is_empty() && m.len() <= 2))
    );
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .ok_or("content")?;
    assert_eq!(content.len(), 2);
    assert!(
        content.iter().all(|e| e["top_logprobs"] == json!([])),
        "top_logprobs defaults to 0"
    );
    Ok(())
}
