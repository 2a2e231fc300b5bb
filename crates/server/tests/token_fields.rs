//! vLLM's token fields through the API: `allowed_token_ids` keeps every generated token in the
//! list (read back with `return_tokens_as_token_ids`), `bad_words` never appear in the text,
//! `truncate_prompt_tokens` keeps the prompt's last tokens, and bad values are 400s naming the
//! field.

mod common;

use common::in_process::{post_json, send};
use common::{demo_server, TestResult, MODEL};
use serde_json::{json, Value};

async fn completion(
    app: &axum::Router,
    body: Value,
) -> Result<(u16, Value), Box<dyn std::error::Error + Send + Sync>> {
    let (status, text) = send(app, post_json("/v1/completions", &body)).await?;
    Ok((status.as_u16(), serde_json::from_str(&text)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_ids_bad_words_and_truncation_are_honored() -> TestResult {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();
    for model in [MODEL, "lora-0"] {
        let allowed = [5u32, 17, 42, 99];
        let (status, v) = completion(
            &app,
            json!({"model": model, "prompt": "Once upon a time", "max_tokens": 8, "seed": 3,
                "allowed_token_ids": allowed, "logprobs": 0, "return_tokens_as_token_ids": true,
                "ignore_eos": true}),
        )
        .await?;
        assert_eq!(status, 200, "{v}");
        let tokens = v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .ok_or("tokens")?
            .clone();
        assert_eq!(tokens.len(), 8, "{v}");
        for t in &tokens {
            let id: u32 = t
                .as_str()
                .and_then(|s| s.strip_prefix("token_id:"))
                .ok_or("token_id:N")?
                .parse()?;
            assert!(allowed.contains(&id), "{id} not in {allowed:?}");
        }
        // The words a free greedy run writes first are absent once banned.
        let free = json!({"model": model, "prompt": "Once upon a time", "max_tokens": 12,
            "temperature": 0, "ignore_eos": true});
        let (_, v) = completion(&app, free.clone()).await?;
        let text = v["choices"][0]["text"].as_str().ok_or("text")?.to_string();
        let words: Vec<String> = text.split_whitespace().take(2).map(String::from).collect();
        assert!(!words.is_empty(), "{text:?}");
        let mut banned = free.clone();
        banned["bad_words"] = json!(words);
        let (status, v) = completion(&app, banned).await?;
        assert_eq!(status, 200, "{v}");
        let out = v["choices"][0]["text"].as_str().ok_or("text")?;
        for w in &words {
            assert!(!out.split_whitespace().any(|x| x == w), "{w:?} in {out:?}");
        }
        // Truncation keeps the last 3 prompt tokens: usage counts them, echo shows them.
        let (status, v) = completion(
            &app,
            json!({"model": model, "prompt": "Once upon a time there was", "max_tokens": 1,
                "truncate_prompt_tokens": 3, "echo": true}),
        )
        .await?;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], 3, "{v}");
        assert!(
            !v["choices"][0]["text"]
                .as_str()
                .ok_or("text")?
                .starts_with("Once"),
            "{v}"
        );
    }
    for (field, value) in [
        ("allowed_token_ids", json!([1, 1_000_000])),
        ("allowed_token_ids", json!(["a"])),
        ("bad_words", json!([""])),
        ("truncate_prompt_tokens", json!(0)),
    ] {
        let mut body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2});
        body[field] = value.clone();
        let (status, v) = completion(&app, body).await?;
        assert_eq!(status, 400, "{field}: {value} gave {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    Ok(())
}
