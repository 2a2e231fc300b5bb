//! OpenAI request bodies as vLLM accepts them (with vLLM's extra sampling fields `top_k`,
//! `min_tokens`, `ignore_eos`, `stop_token_ids`, `prompt_logprobs`, ...); [`crate::resolve`]
//! checks their sampling fields and turns them into the engine's `SamplingParams`, refusing
//! with a 400 the known fields this server does not implement, and structured outputs
//! (`response_format`, vLLM's `guided_*`) are read by [`crate::structured`]. Unknown fields are
//! ignored, as OpenAI and vLLM do, and logged once per field name (a bounded set, so clients
//! cannot grow it).

use std::collections::BTreeSet;
use std::sync::Mutex;

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

/// `prompt` of `/v1/completions`: text, token ids, or a list of either (several prompts in one
/// request, as vLLM takes them).
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
    /// The request's prompts, in order; an empty list is refused.
    pub fn into_prompts(self) -> ApiResult<Vec<Prompt>> {
        let prompts: Vec<Prompt> = match self {
            PromptInput::Text(t) => vec![Prompt::Text(t)],
            PromptInput::Tokens(ids) => vec![Prompt::TokenIds(ids)],
            PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
            PromptInput::TokenLists(v) => v.into_iter().map(Prompt::TokenIds).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::bad_param(
                "prompt",
                "prompt: expected a prompt or a non-empty list of prompts, got an empty list",
            ));
        }
        Ok(prompts)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: bool,
    /// vLLM's: usage on every chunk, not only the last.
    pub continuous_usage_stats: bool,
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
    pub use_beam_search: Option<bool>,
    pub min_p: Option<f32>,
    pub length_penalty: Option<f32>,
    pub bad_words: Option<Value>,
    pub allowed_token_ids: Option<Value>,
    pub prompt_logprobs: Option<Value>,
    pub truncate_prompt_tokens: Option<Value>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub logits_processors: Option<Value>,
    pub detokenize: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub priority: Option<i64>,
    // Honored.
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub include_stop_str_in_output: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    // Accepted and without effect here: they change nothing in the output.
    pub user: Option<Value>,
    pub metadata: Option<Value>,
    pub store: Option<Value>,
    pub service_tier: Option<Value>,
    pub request_id: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
    // Refused when set: structured output's whitespace follows the schema's `x-guidance`.
    pub guided_whitespace_pattern: Option<Value>,
}

/// Fields the structs above do not know, collected after them (`#[serde(flatten)]` hands a
/// map only what no earlier field took).
pub type UnknownFields = serde_json::Map<String, Value>;

/// Distinct unknown field names logged; beyond it, no more are.
const MAX_WARNED_FIELDS: usize = 256;
static WARNED_FIELDS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Logs the unknown fields not logged before; returns their names.
pub fn warn_unknown_fields(endpoint: &str, unknown: &UnknownFields) -> Vec<String> {
    if unknown.is_empty() {
        return Vec::new();
    }
    let mut warned = WARNED_FIELDS.lock().unwrap_or_else(|e| e.into_inner());
    let mut new = Vec::new();
    for name in unknown.keys() {
        if warned.len() < MAX_WARNED_FIELDS && !warned.contains(name) {
            warned.insert(name.clone());
            new.push(name.clone());
        }
    }
    if !new.is_empty() {
        tracing::warn!(
            "{endpoint}: the request fields {new:?} are not known to this server and are ignored (logged once per field)"
        );
    }
    new
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    /// vLLM's; true by default for completions.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Value>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    /// vLLM's; false by default for chat (the template writes BOS).
    #[serde(default)]
    pub add_special_tokens: bool,
    /// Extra variables for the chat template (`enable_thinking`, ...), as vLLM passes them.
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub chat_template: Option<Value>,
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    #[serde(default)]
    pub documents: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

impl ChatRequest {
    /// Refuses the chat-only fields this server does not implement.
    pub fn check_chat_fields(&self) -> ApiResult<()> {
        let refuse = |param: &str, what: &str| {
            Err(ApiError::bad_param(
                param,
                format!("{param}: {what} is not supported by this server"),
            ))
        };
        if self.chat_template.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("chat_template", "a per-request chat template");
        }
        if self.continue_final_message == Some(true) {
            return refuse("continue_final_message", "continuing the final message");
        }
        if self.documents.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("documents", "retrieval documents");
        }
        if self
            .tool_choice
            .as_ref()
            .is_some_and(|v| !(v.is_null() || *v == "none" || *v == "auto"))
        {
            return refuse("tool_choice", "tool calling");
        }
        Ok(())
    }
}

/// vLLM's `/tokenize` body (prompt form).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: String,
    pub prompt: String,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
}

/// vLLM's `/detokenize` body.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<u32>,
}

fn yes() -> bool {
    true
}

/// Which endpoint a request came to: the two read `logprobs` differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completion,
    Chat,
}

/// What a handler needs besides the engine's `SamplingParams`.
pub struct Output {
    pub stream: bool,
    pub include_usage: bool,
    /// Usage on every streamed chunk (vLLM's `continuous_usage_stats`).
    pub continuous_usage: bool,
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    /// Alternatives per output token when log-probabilities are asked for: completions'
    /// `logprobs: n`, chat's `top_logprobs` (0 with `logprobs: true` alone).
    pub logprobs: Option<usize>,
    /// Completions' `echo`: the prompt leads the text (and the logprobs).
    pub echo: bool,
    /// vLLM's `prompt_logprobs`, as asked (echo may make the engine compute them anyway).
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `bad_words`, for the handler to tokenize into the sampling parameters.
    pub bad_words: Vec<String>,
    /// vLLM's `truncate_prompt_tokens`: keep only the prompt's last tokens.
    pub truncate_prompt_tokens: Option<Truncate>,
    /// vLLM's `return_tokens_as_token_ids`: logprob entries name tokens `token_id:{id}`.
    pub tokens_as_ids: bool,
    /// The field that carried `SamplingParams::constraint`, for naming it in errors.
    pub constraint_field: Option<&'static str>,
}

/// How much of a prompt `truncate_prompt_tokens` keeps: its last `k` tokens, or (-1) its last
/// `max_model_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncate {
    Last(usize),
    MaxModelLen,
}

impl Truncate {
    /// The kept tail of `ids` (the whole prompt when it is shorter).
    pub fn apply(self, ids: &mut Vec<u32>, max_model_len: usize) {
        let k = match self {
            Truncate::Last(k) => k,
            Truncate::MaxModelLen => max_model_len,
        };
        if ids.len() > k {
            ids.drain(..ids.len() - k);
        }
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
    fn chat_only_fields_are_refused_by_name() -> Result<(), Box<dyn std::error::Error>> {
        for (field, value) in [
            ("chat_template", json!("{{ x }}")),
            ("continue_final_message", json!(true)),
            ("documents", json!([{"text": "d"}])),
            ("tool_choice", json!("required")),
        ] {
            let mut body = json!({"model": "m", "messages": []});
            body[field] = value;
            let req: ChatRequest = serde_json::from_value(body)?;
            let err = req.check_chat_fields().err().ok_or("accepted")?;
            assert_eq!(err.param.as_deref(), Some(field));
        }
        let req: ChatRequest = serde_json::from_value(json!({"model": "m", "messages": [],
            "tool_choice": "none", "chat_template_kwargs": {"enable_thinking": false}}))?;
        assert!(req.check_chat_fields().is_ok() && req.unknown.is_empty());
        Ok(())
    }

    #[test]
    fn unknown_fields_are_collected_and_warned_once() -> Result<(), Box<dyn std::error::Error>> {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "m", "messages": [], "max_tokens": 3, "no_such_field_a": 1, "no_such_field_b": {}
        }))?;
        let names: Vec<&str> = req.unknown.keys().map(String::as_str).collect();
        assert_eq!(names, ["no_such_field_a", "no_such_field_b"]);
        assert_eq!(req.sampling.max_tokens, Some(3));
        assert_eq!(warn_unknown_fields("test", &req.unknown).len(), 2);
        assert!(warn_unknown_fields("test", &req.unknown).is_empty());
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
