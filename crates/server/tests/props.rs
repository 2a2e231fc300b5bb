//! Property tests over what clients and adapter folders hand the server: request JSON,
//! `adapter_config.json` and safetensors headers. Whatever comes, the answer is a response (never
//! a 500 or a panic) or a clean adapter error. Few cases each, so CI stays quick; the
//! cargo-fuzz targets in `fuzz/` run the same entry points for as long as one likes.

mod common;

use std::path::Path;

use axum::body::Body;
use axum::http::{header, Request};
use common::{adapter, demo_dir, demo_server, MODEL};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::{Error, ModelConfig};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

/// Any JSON, with the numbers that break arithmetic over-represented.
fn json_value() -> impl Strategy<Value = Value> {
    let edge = prop_oneof![
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(255)),
        Just(json!(256)),
        Just(json!(1e308)),
        Just(json!(-0.0)),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        edge,
        "\\PC{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request body: the fields both endpoints read, each present or not, with any value.
fn request_body() -> impl Strategy<Value = (bool, Value)> {
    const FIELDS: [&str; 22] = [
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_tokens",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "stream",
        "stream_options",
        "n",
        "best_of",
        "logprobs",
        "echo",
        "presence_penalty",
        "logit_bias",
        "suffix",
        "tools",
        "response_format",
        "add_generation_prompt",
    ];
    let model = prop_oneof![Just(json!(MODEL)), Just(json!("lora-0")), json_value()];
    let prompt = prop_oneof![
        Just(json!("hello")),
        Just(json!([5, 6, 7])),
        Just(json!([[5, 6], [7]])),
        json_value(),
    ];
    let messages = prop_oneof![
        Just(json!([{"role": "user", "content": "hi"}])),
        Just(json!([{"role": "user", "content": [{"type": "text", "text": "a"}]}])),
        json_value(),
    ];
    let fields = prop::collection::btree_map(prop::sample::select(&FIELDS[..]), json_value(), 0..6);
    // Mostly a runnable length, so requests reach the engine; else sums that overflow.
    let max_tokens = prop_oneof![
        4 => (0u64..40).prop_map(Value::from),
        1 => (0u64..8).prop_map(|d| json!(u64::MAX - d)),
        1 => any::<u64>().prop_map(Value::from),
        1 => json_value(),
    ];
    let max_tokens_key = prop::sample::select(vec!["max_tokens", "max_completion_tokens"]);
    (
        any::<bool>(),
        model,
        prompt,
        messages,
        fields,
        (max_tokens_key, max_tokens),
    )
        .prop_map(
            |(is_chat, model, prompt, messages, fields, (max_tokens_key, max_tokens))| {
                let mut body = Map::new();
                body.insert("model".into(), model);
                match is_chat {
                    true => body.insert("messages".into(), messages),
                    false => body.insert("prompt".into(), prompt),
                };
                body.insert(max_tokens_key.into(), max_tokens);
                for (k, v) in fields {
                    body.insert(k.into(), v);
                }
                (is_chat, Value::Object(body))
            },
        )
}

#[test]
fn any_request_json_gets_a_response_never_a_500() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let server = demo_server(1, |_, _| {})?;
    let app = server.router();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    proptest!(config(), |((is_chat, body) in request_body())| {
        let path = if is_chat { "/v1/chat/completions" } else { "/v1/completions" };
        let req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (status, bytes) = rt.block_on(async {
            let res = app.clone().oneshot(req).await?;
            let status = res.status();
            let bytes = axum::body::to_bytes(res.into_body(), 64 << 20).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, bytes))
        }).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let text = String::from_utf8_lossy(&bytes);
        prop_assert!(!status.is_server_error(), "{} for {}: {}", status, body, text);
        if !status.is_success() {
            let v: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let code = &v["error"]["code"];
            prop_assert!(v["error"]["message"].is_string() && (code.is_string() || code.is_null()), "{}", text);
        }
    });
    Ok(())
}

fn model_config() -> Result<ModelConfig, Box<dyn std::error::Error + Send + Sync>> {
    Ok(ModelConfig::from_dir(&demo_dir()?.join("model"))?)
}

/// Loading may fail, but only as an adapter error.
fn check_load(dir: &Path, cfg: &ModelConfig) -> Result<(), TestCaseError> {
    match LoraAdapter::load("p", dir, cfg, 16) {
        Ok(_) | Err(Error::AdapterLoad { .. } | Error::AdapterRankTooLarge { .. }) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("not an adapter error: {e}"))),
    }
}

fn adapter_copy(to: &Path) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(adapter(0)?)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[test]
fn any_adapter_config_json_loads_or_is_an_adapter_error(
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    const KEYS: [&str; 11] = [
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "alpha_pattern",
        "rank_pattern",
        "target_modules",
        "modules_to_save",
        "bias",
        "fan_in_fan_out",
    ];
    let cfg = model_config()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("a");
    adapter_copy(&dir)?;
    let original: Value = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json"))?)?;
    let edits = prop::collection::btree_map(prop::sample::select(&KEYS[..]), json_value(), 0..5);
    proptest!(config(), |(edits in edits, raw in prop::option::weighted(0.2, prop::collection::vec(any::<u8>(), 0..64)))| {
        let text = match raw {
            Some(bytes) => bytes,
            None => {
                let mut v = original.clone();
                for (k, val) in edits {
                    v[k] = val;
                }
                v.to_string().into_bytes()
            }
        };
        std::fs::write(dir.join("adapter_config.json"), text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_load(&dir, &cfg)?;
    });
    Ok(())
}

/// A safetensors file: the 8-byte header length (the true one, or any), a JSON header of
/// tensors with any dtype, shape and offsets, then data.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()),
        Just("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string()),
        Just("base_model.model.model.layers.99.mlp.down_proj.lora_A.weight".to_string()),
        "[a-z_.]{1,40}",
    ];
    let dtype = prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "F64", "BOOL", "X"]);
    let shape = prop::collection::vec(
        prop_oneof![0usize..70, Just(usize::MAX), Just(1usize << 40)],
        0..4,
    );
    let offsets = (0usize..4096, 0usize..4096);
    let tensor = (name, dtype, shape, offsets)
        .prop_map(|(n, d, s, (a, b))| (n, json!({"dtype": d, "shape": s, "data_offsets": [a, b]})));
    let tensors = prop::collection::vec(tensor, 0..4);
    let length = prop_oneof![
        Just(None),
        any::<u64>().prop_map(Some),
        (0u64..512).prop_map(Some)
    ];
    (tensors, length, prop::collection::vec(any::<u8>(), 0..2048)).prop_map(|(tensors, length, data)| {
        let header = Value::Object(tensors.into_iter().collect()).to_string();
        let n = length.unwrap_or(header.len() as u64);
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        bytes
    })
}

#[test]
fn any_safetensors_header_loads_or_is_an_adapter_error(
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let cfg = model_config()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("a");
    adapter_copy(&dir)?;
    proptest!(config(), |(file in safetensors_file())| {
        std::fs::write(dir.join("adapter_model.safetensors"), file).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_load(&dir, &cfg)?;
    });
    Ok(())
}
