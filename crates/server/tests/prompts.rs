//! Several prompts in one `/v1/completions` request, as vLLM takes them (and as
//! lm-evaluation-harness sends them with `--batch_size` > 1), over a real socket: the same
//! choices as the prompts sent one by one, choice `p * n + c` being choice `c` of prompt `p`,
//! usage summed; streamed, as token ids, with echo and logprobs; and refusals that name the
//! prompt and run nothing.

mod common;

use std::net::SocketAddr;

use common::{demo_server, metric, post, sse_chunks, start, wait_idle, TestResult, MODEL};
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PROMPTS: [&str; 3] = [
    "Hi",
    "Once upon a time there was a",
    "The quick brown fox jumps over the lazy dog, and then the dog",
];

async fn completion(addr: SocketAddr, body: &Value) -> Result<Value, BoxError> {
    let (status, _, text) = post(addr, "/v1/completions", body).await?;
    assert_eq!(status, 200, "{text}");
    Ok(serde_json::from_str(&text)?)
}

/// A greedy completion body for `prompt`, with these fields added.
fn body(prompt: Value, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                       "ignore_eos": true});
    for (k, v) in extra.as_object().into_iter().flatten() {
        b[k] = v.clone();
    }
    b
}

/// `a` and `b` are the same JSON, numbers within 1e-5 of each other.
fn assert_close(a: &Value, b: &Value, what: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            assert!((x - y).abs() <= 1e-5, "{what}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{what}: lengths");
            x.iter().zip(y).for_each(|(x, y)| assert_close(x, y, what));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert!(x.keys().eq(y.keys()), "{what}: keys {x:?} vs {y:?}");
            x.iter().for_each(|(k, v)| assert_close(v, &y[k], what));
        }
        _ => assert_eq!(a, b, "{what}"),
    }
}

fn usage(v: &Value, key: &str) -> u64 {
    v["usage"][key].as_u64().unwrap_or(u64::MAX)
}

/// Each prompt alone: its response.
async fn one_by_one(addr: SocketAddr, prompts: &[Value], extra: &Value) -> Result<Vec<Value>, BoxError> {
    let mut out = Vec::new();
    for p in prompts {
        out.push(completion(addr, &body(p.clone(), extra.clone())).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_prompts_equal_the_same_prompts_one_by_one() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    let prompts: Vec<Value> = PROMPTS.iter().map(|&p| json!(p)).collect();
    for n in [1, 2] {
        let extra = json!({"n": n});
        let alone = one_by_one(addr, &prompts, &extra).await?;
        let all = completion(addr, &body(json!(PROMPTS), extra)).await?;
        let choices = all["choices"].as_array().ok_or("choices")?;
        assert_eq!(choices.len(), PROMPTS.len() * n, "{all}");
        for (i, choice) in choices.iter().enumerate() {
            let (p, c) = (i / n, i % n);
            assert_eq!(choice["index"], i, "{all}");
            assert_eq!(
                choice["text"], alone[p]["choices"][c]["text"],
                "n={n}: prompt {p}, choice {c}"
            );
            assert_eq!(choice["finish_reason"], "length");
        }
        let sum = |key: &str| alone.iter().map(|a| usage(a, key)).sum::<u64>();
        assert_eq!(usage(&all, "prompt_tokens"), sum("prompt_tokens"), "{all}");
        assert_eq!(usage(&all, "completion_tokens"), sum("completion_tokens"));
        assert_eq!(usage(&all, "completion_tokens"), (8 * PROMPTS.len() * n) as u64);
        assert_eq!(usage(&all, "total_tokens"), sum("total_tokens"));
        let ids: Vec<&Value> = alone.iter().map(|a| &a["id"]).collect();
        assert!(!ids.contains(&&all["id"]), "one response id of its own");
    }
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_prompts_stream_interleaved_by_index() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    let prompts: Vec<Value> = PROMPTS.iter().map(|&p| json!(p)).collect();
    let n = 2;
    let alone = one_by_one(addr, &prompts, &json!({"n": n})).await?;
    let streamed = body(
        json!(PROMPTS),
        json!({"n": n, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (status, _, text) = post(addr, "/v1/completions", &streamed).await?;
    assert_eq!(status, 200, "{text}");
    let chunks = sse_chunks(&text)?;
    let num_choices = PROMPTS.len() * n;
    let mut texts = vec![String::new(); num_choices];
    let mut finished = vec![false; num_choices];
    for chunk in &chunks[..chunks.len() - 1] {
        let entries = chunk["choices"].as_array().ok_or("choices")?;
        assert_eq!(entries.len(), 1, "one choice per chunk: {chunk}");
        let i = entries[0]["index"].as_u64().ok_or("index")? as usize;
        assert!(!finished[i], "choice {i} goes on after its end");
        texts[i].push_str(entries[0]["text"].as_str().ok_or("text")?);
        finished[i] = !entries[0]["finish_reason"].is_null();
    }
    assert!(finished.iter().all(|&f| f), "{finished:?}");
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, &alone[i / n]["choices"][i % n]["text"], "choice {i}");
    }
    // The chunks of the prompts interleave: they ran in the same steps.
    let first_of = |i: usize| chunks.iter().position(|c| c["choices"][0]["index"] == i);
    let last_of = |i: usize| chunks.iter().rposition(|c| c["choices"][0]["index"] == i);
    assert!(
        first_of(num_choices - 1) < last_of(0),
        "prompt 2 started after prompt 0 ended"
    );
    let usage_chunk = chunks.last().ok_or("no usage chunk")?;
    let sum = |key: &str| alone.iter().map(|a| usage(a, key)).sum::<u64>();
    assert_eq!(usage(usage_chunk, "prompt_tokens"), sum("prompt_tokens"));
    assert_eq!(usage(usage_chunk, "completion_tokens"), sum("completion_tokens"));
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_of_token_ids_are_prompts_too() -> TestResult {
    let (addr, stop, task) = start(demo_server(1, |_, _| {})?).await?;
    let mut token_lists = Vec::new();
    for p in PROMPTS {
        let (status, _, text) = post(addr, "/tokenize", &json!({"model": MODEL, "prompt": p})).await?;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text)?;
        token_lists.push(v["tokens"].clone());
    }
    for model in [MODEL, "lora-0"] {
        let by_text = completion(addr, &body(json!(PROMPTS), json!({"model": model}))).await?;
        let by_ids = completion(addr, &body(json!(token_lists), json!({"model": model}))).await?;
        assert_eq!(by_ids["choices"].as_array().map(Vec::len), Some(PROMPTS.len()));
        for i in 0..PROMPTS.len() {
            assert_eq!(
                by_ids["choices"][i]["text"], by_text["choices"][i]["text"],
                "{model}: {i}"
            );
        }
        assert_eq!(by_ids["usage"], by_text["usage"]);
        // One prompt's ids alone, as a list of one list: the same as prompt 1 alone.
        let one = completion(addr, &body(json!([token_lists[1]]), json!({"model": model}))).await?;
        assert_eq!(one["choices"][0]["text"], by_text["choices"][1]["text"]);
    }
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_and_logprobs_are_per_prompt() -> TestResult {
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    // As lm-evaluation-harness scores loglikelihoods: echo, logprobs, one token.
    let extra = json!({"echo": true, "logprobs": 1, "max_tokens": 1, "prompt_logprobs": 0});
    let prompts = [json!(PROMPTS[1]), json!(PROMPTS[2])];
    let alone = one_by_one(addr, &prompts, &extra).await?;
    let both = completion(addr, &body(json!(prompts), extra)).await?;
    for (p, a) in alone.iter().enumerate() {
        let (got, want) = (&both["choices"][p], &a["choices"][0]);
        assert!(
            got["text"]
                .as_str()
                .is_some_and(|t| t.starts_with(PROMPTS[p + 1])),
            "echo leads with prompt {p}: {got}"
        );
        assert_eq!(got["text"], want["text"]);
        for key in ["tokens", "text_offset"] {
            assert_eq!(got["logprobs"][key], want["logprobs"][key], "prompt {p}: {key}");
        }
        // The same numbers up to the last bits: a prompt's tokens may fall into other kernel
        // tiles (or paths) when another prompt shares the step.
        for key in ["token_logprobs", "top_logprobs"] {
            assert_close(
                &got["logprobs"][key],
                &want["logprobs"][key],
                &format!("prompt {p}: {key}"),
            );
        }
        assert_close(
            &got["prompt_logprobs"],
            &want["prompt_logprobs"],
            &format!("prompt {p}"),
        );
        let num_prompt_tokens = usage(a, "prompt_tokens") as usize;
        assert_eq!(
            got["logprobs"]["tokens"].as_array().map(Vec::len),
            Some(num_prompt_tokens + 1),
            "prompt {p}: its prompt's tokens and the one generated"
        );
    }
    let _ = stop.send(());
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_prompt_in_the_list_is_named_and_nothing_runs() -> TestResult {
    // max_model_len 256 (common::demo_server).
    let (addr, stop, task) = start(demo_server(0, |_, _| {})?).await?;
    let long = vec![5u32; 300];
    for (prompt, index, code) in [
        (
            json!(["Hi", "word ".repeat(300), "there"]),
            Some(1),
            json!("context_length_exceeded"),
        ),
        (
            json!([[5, 6, 7], [5, 6], long]),
            Some(2),
            json!("context_length_exceeded"),
        ),
        (json!([[5, 6, 7], [5, 999_999]]), Some(1), Value::Null),
        (json!([]), None, Value::Null),
    ] {
        let (status, _, text) = post(addr, "/v1/completions", &body(prompt.clone(), json!({}))).await?;
        assert_eq!(status, 400, "{prompt}: {text}");
        let err: Value = serde_json::from_str(&text)?;
        assert_eq!(err["error"]["param"], "prompt", "{text}");
        assert_eq!(err["error"]["code"], code, "{text}");
        let message = err["error"]["message"].as_str().ok_or("message")?;
        if let Some(i) = index {
            assert!(message.starts_with(&format!("prompt[{i}]: ")), "{message}");
        }
    }
    let m = wait_idle(addr).await?;
    for name in [
        "multilora:prompt_tokens_total",
        "multilora:generation_tokens_total",
        "multilora:engine_steps_total",
    ] {
        assert_eq!(metric(&m, name), Some(0.0), "{name}: something ran\n{m}");
    }
    // The server still serves several prompts.
    let v = completion(addr, &body(json!(["a", "b"]), json!({"max_tokens": 2}))).await?;
    assert_eq!(usage(&v, "completion_tokens"), 4);
    let _ = stop.send(());
    task.await??;
    Ok(())
}
