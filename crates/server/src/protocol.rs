//! OpenAI request bodies as vLLM accepts them (with vLLM's extra sampling fields `top_k`,
//! `min_tokens`, `ignore_eos`, `stop_token_ids`), turned into the engine's `SamplingParams`.
//! Unknown fields are ignored, as OpenAI and vLLM do; known fields this server does not
//! implement are refused with 400 rather than silently ignored.

use multilora_engine::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};

/// Limits on what each generated token is checked against (OpenAI allows 4 stop strings).
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_STRING_BYTES: usize = 1024;
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `prompt` of `/v1/completions`: text, token ids, or a list of one of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

impl PromptInput {
    pub fn into_single(self) -> ApiResult<Prompt> {
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::bad_param(
                    "prompt",
                    format!("{n} prompts in one request are not supported; send one prompt per request"),
                ))
            }
        };
        Ok(match self {
            PromptInput::Text(t) => Prompt::Text(t),
            PromptInput::Tokens(ids) => Prompt::TokenIds(ids),
            PromptInput::Texts(mut v) => {
                one(v.len())?;
                Prompt::Text(v.remove(0))
            }
            PromptInput::TokenLists(mut v) => {
                one(v.len())?;
                Prompt::TokenIds(v.remove(0))
            }
        })
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and output fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_tokens: Option<usize>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // Known fields that are refused unless they ask for the default.
    pub n: Option<usize>,
    pub best_of: Option<usize>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub suffix: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<Value>,
    pub use_beam_search: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Value>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// vLLM's `/tokenize` body (prompt form).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: String,
    pub prompt: String,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

/// What a handler needs besides the engine's `SamplingParams`.
pub struct Output {
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
}

impl Sampling {
    /// Checks the refused fields and builds the engine's parameters. `default_max_tokens`
    /// applies when the request gives none (16 for completions, the rest of the context for
    /// chat, as vLLM does).
    pub fn resolve(self, default_max_tokens: usize) -> ApiResult<(SamplingParams, Output)> {
        let refuse = |param: &str, what: &str| {
            Err(ApiError::bad_param(
                param,
                format!("{param}: {what} is not supported by this server"),
            ))
        };
        if self.n.is_some_and(|n| n != 1) {
            return refuse("n", "more than one choice per request");
        }
        if self.best_of.is_some_and(|n| n > 1) {
            return refuse("best_of", "best_of > 1");
        }
        let truthy = |v: &Option<Value>| {
            v.as_ref()
                .is_some_and(|v| !(v.is_null() || *v == Value::Bool(false) || *v == 0))
        };
        if truthy(&self.logprobs) || truthy(&self.top_logprobs) {
            return refuse("logprobs", "returning log-probabilities");
        }
        if self.echo == Some(true) {
            return refuse("echo", "echoing the prompt");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return refuse("presence_penalty", "a non-zero presence penalty");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return refuse("frequency_penalty", "a non-zero frequency penalty");
        }
        if self.repetition_penalty.is_some_and(|p| p != 1.0) {
            return refuse("repetition_penalty", "a repetition penalty other than 1");
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("logit_bias", "logit bias");
        }
        if self.suffix.is_some() {
            return refuse("suffix", "a suffix");
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse("tools", "tool calling");
        }
        if self
            .response_format
            .as_ref()
            .is_some_and(|f| !f.is_null() && f["type"] != "text")
        {
            return refuse("response_format", "structured output");
        }
        if self.use_beam_search == Some(true) {
            return refuse("use_beam_search", "beam search");
        }
        let d = SamplingParams::default();
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            // OpenAI's seed is any integer; the engine's is 64 bits of RNG state.
            seed: self.seed.map(|s| s as u64),
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(default_max_tokens),
            min_tokens: self.min_tokens.unwrap_or(0),
            stop_token_ids: self.stop_token_ids.unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        };
        let stop = self.stop.map(StringOrList::into_vec).unwrap_or_default();
        // Each is searched for after every token, and stop ids by the engine at every step.
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::bad_param(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len()),
            ));
        }
        if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(ApiError::bad_param(
                "stop",
                format!(
                    "a stop string may be at most {MAX_STOP_STRING_BYTES} bytes, got one of {}",
                    s.len()
                ),
            ));
        }
        if params.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ApiError::bad_param(
                "stop_token_ids",
                format!(
                    "at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {}",
                    params.stop_token_ids.len()
                ),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        if !stream && self.stream_options.is_some() {
            return Err(ApiError::bad_param(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let output = Output {
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            stop,
        };
        Ok((params, output))
    }
}

/// Flattens OpenAI message content (a string, or a list of `{"type": "text", "text"}` parts)
/// into a string, as vLLM does for text-only models; other keys are kept for the template.
pub fn normalize_messages(messages: Vec<Value>) -> ApiResult<Vec<Value>> {
    if messages.is_empty() {
        return Err(ApiError::bad_param("messages", "messages must not be empty"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            let bad = |what: &str| ApiError::bad_param("messages", format!("messages[{i}]: {what}"));
            let obj = m.as_object_mut().ok_or_else(|| bad("expected an object"))?;
            if !obj.get("role").is_some_and(Value::is_string) {
                return Err(bad("\"role\" must be a string"));
            }
            let text = match obj.get("content") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for p in parts {
                        match (p["type"].as_str(), p["text"].as_str()) {
                            (Some("text"), Some(t)) => texts.push(t),
                            _ => return Err(bad("only text content parts are supported")),
                        }
                    }
                    Some(texts.join("\n"))
                }
                Some(_) => return Err(bad("\"content\" must be a string or a list of parts")),
            };
            if let Some(t) = text {
                obj.insert("content".into(), Value::String(t));
            }
            Ok(m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vllm_extra_fields_reach_sampling_params() -> Result<(), Box<dyn std::error::Error>> {
        let req: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "hi", "max_tokens": 7, "min_tokens": 3, "top_k": 5,
            "seed": -1, "ignore_eos": true, "temperature": 0.5, "stop": "x", "user": "ignored"
        }))?;
        let (p, out) = req.sampling.resolve(16).map_err(|e| e.message)?;
        assert_eq!((p.max_tokens, p.min_tokens, p.top_k), (7, 3, 5));
        assert_eq!(p.seed, Some(u64::MAX));
        assert!(p.ignore_eos);
        assert_eq!(out.stop, vec!["x".to_string()]);
        assert!(!out.stream);
        Ok(())
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() -> Result<(), Box<dyn std::error::Error>> {
        for (field, value) in [
            ("n", json!(2)),
            ("logprobs", json!(3)),
            ("presence_penalty", json!(0.5)),
        ] {
            let mut body = json!({"model": "m", "prompt": "hi"});
            body[field] = value;
            let req: CompletionRequest = serde_json::from_value(body)?;
            let err = req.sampling.resolve(16).err().ok_or("accepted")?;
            assert_eq!(err.param.as_deref(), Some(field));
        }
        // Defaults sent explicitly are fine.
        let req: CompletionRequest = serde_json::from_value(
            json!({"model": "m", "prompt": "hi", "n": 1, "logprobs": null, "presence_penalty": 0}),
        )?;
        assert!(req.sampling.resolve(16).is_ok());
        Ok(())
    }

    #[test]
    fn message_parts_are_flattened() -> Result<(), Box<dyn std::error::Error>> {
        let msgs = normalize_messages(vec![json!({"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})])
        .map_err(|e| e.message)?;
        assert_eq!(msgs[0]["content"], "a\nb");
        assert!(normalize_messages(vec![json!({"content": "x"})]).is_err());
        Ok(())
    }
}
