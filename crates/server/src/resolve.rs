//! A request's sampling fields checked and turned into the engine's `SamplingParams` and what
//! the response needs ([`Output`]): the fields this server does not implement refused by name,
//! limits enforced, vLLM's extra fields read. The request bodies are in [`crate::protocol`].

use multilora_engine::logprobs::MAX_LOGPROBS;
use multilora_engine::sampling::MAX_CHOICES;
use multilora_engine::SamplingParams;
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::protocol::{
    Api, Output, Sampling, StringOrList, Truncate, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES,
    MAX_STOP_TOKEN_IDS,
};
use crate::structured::{self, StructuredFields};

/// Most `bad_words` a request may list (each is tokenized, and checked at every step).
pub const MAX_BAD_WORDS: usize = 128;

/// A count of log-probabilities: `null` (none) or an integer from 0 to [`MAX_LOGPROBS`].
fn logprob_count(param: &str, v: &Option<Value>) -> ApiResult<Option<usize>> {
    let bad = || {
        ApiError::bad_param(
            param,
            format!(
                "{param}: expected an integer from 0 to {MAX_LOGPROBS} (max_logprobs) or null, got {}",
                v.as_ref().unwrap_or(&Value::Null)
            ),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) if n as usize <= MAX_LOGPROBS => Ok(Some(n as usize)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

impl Sampling {
    /// Checks the refused fields and builds the engine's parameters. `default_max_tokens`
    /// applies when the request gives none (16 for completions, the rest of the context for
    /// chat, as vLLM does).
    pub fn resolve(self, api: Api, default_max_tokens: usize) -> ApiResult<(SamplingParams, Output)> {
        let refuse = |param: &str, what: &str| {
            Err(ApiError::bad_param(
                param,
                format!("{param}: {what} is not supported by this server"),
            ))
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::bad_param(
                "n",
                format!("n: expected from 1 to {MAX_CHOICES} choices, got {n}"),
            ));
        }
        if self.best_of.is_some_and(|n| n > 1) {
            return refuse("best_of", "best_of > 1");
        }
        let is_set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let logprobs = match api {
            // An integer; `false` is the default some clients send.
            Api::Completion => {
                if is_set(&self.top_logprobs) {
                    return Err(ApiError::bad_param(
                        "top_logprobs",
                        "top_logprobs is a chat field; completions take logprobs: <number of alternatives>",
                    ));
                }
                match &self.logprobs {
                    Some(Value::Bool(false)) => None,
                    v => logprob_count("logprobs", v)?,
                }
            }
            // A boolean, and the number of alternatives in top_logprobs.
            Api::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return Err(ApiError::bad_param(
                            "logprobs",
                            format!("logprobs: expected true or false, got {v}; the number of alternatives goes in top_logprobs"),
                        ))
                    }
                };
                let top = logprob_count("top_logprobs", &self.top_logprobs)?;
                if top.is_some() && !on {
                    return Err(ApiError::bad_param(
                        "top_logprobs",
                        "top_logprobs needs logprobs: true",
                    ));
                }
                on.then(|| top.unwrap_or(0))
            }
        };
        let prompt_logprobs = logprob_count("prompt_logprobs", &self.prompt_logprobs)?;
        let echo = self.echo == Some(true);
        if echo && api == Api::Chat {
            return refuse("echo", "echoing the last message of a chat");
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
        if self.use_beam_search == Some(true) {
            return refuse("use_beam_search", "beam search");
        }
        let constraint = structured::constraint(StructuredFields {
            response_format: self.response_format.as_ref(),
            guided_json: self.guided_json.as_ref(),
            guided_regex: self.guided_regex.as_ref(),
            guided_choice: self.guided_choice.as_ref(),
            guided_grammar: self.guided_grammar.as_ref(),
            structured_outputs: self.structured_outputs.as_ref(),
        })?;
        let constraint_field = constraint.as_ref().map(|c| c.0);
        if is_set(&self.guided_whitespace_pattern) {
            return refuse(
                "guided_whitespace_pattern",
                "a whitespace pattern for structured output",
            );
        }
        if self.min_p.is_some_and(|p| p != 0.0) {
            return refuse("min_p", "min_p sampling");
        }
        if self.length_penalty.is_some_and(|p| p != 1.0) {
            return refuse("length_penalty", "a length penalty");
        }
        let bad_words = match &self.bad_words {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value::<Vec<String>>(v.clone())
                .ok()
                .filter(|w| w.len() <= MAX_BAD_WORDS && w.iter().all(|w| !w.trim().is_empty()))
                .ok_or_else(|| {
                    ApiError::bad_param(
                        "bad_words",
                        format!("bad_words: expected a list of at most {MAX_BAD_WORDS} non-empty strings, got {v}"),
                    )
                })?,
        };
        let allowed_token_ids = match &self.allowed_token_ids {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<Vec<u32>>(v.clone())
                    .ok()
                    .filter(|ids| !ids.is_empty())
                    .ok_or_else(|| {
                        ApiError::bad_param(
                            "allowed_token_ids",
                            format!("allowed_token_ids: expected a non-empty list of token ids, got {v}"),
                        )
                    })?,
            ),
        };
        let truncate_prompt_tokens = match &self.truncate_prompt_tokens {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(-1) => Some(Truncate::MaxModelLen),
                Some(k) if k >= 1 => Some(Truncate::Last(k as usize)),
                _ => {
                    return Err(ApiError::bad_param(
                        "truncate_prompt_tokens",
                        format!("truncate_prompt_tokens: expected -1 (max_model_len) or a token count of at least 1, got {v}"),
                    ))
                }
            },
        };
        if self
            .logits_processors
            .as_ref()
            .is_some_and(|v| !(v.is_null() || v.as_array().is_some_and(Vec::is_empty)))
        {
            return refuse("logits_processors", "logits processors");
        }
        if self.detokenize == Some(false) {
            return refuse("detokenize", "output without text");
        }
        if self.spaces_between_special_tokens == Some(false) {
            return refuse("spaces_between_special_tokens", "changing special-token spacing");
        }
        if self.priority.is_some_and(|p| p != 0) {
            return refuse("priority", "request priorities");
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
            logprobs,
            // Echoed prompt tokens carry logprobs when the output tokens do (vLLM).
            prompt_logprobs: prompt_logprobs.max(logprobs.filter(|_| echo)),
            n,
            allowed_token_ids,
            // Tokenized by the handler ([`Output::bad_words`]).
            bad_words_token_ids: Vec::new(),
            constraint: constraint.map(|c| c.1),
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
        let options = self.stream_options.unwrap_or_default();
        let output = Output {
            stream,
            include_usage: options.include_usage,
            // As vLLM: only with include_usage.
            continuous_usage: options.include_usage && options.continuous_usage_stats,
            stop,
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            logprobs,
            echo,
            prompt_logprobs,
            bad_words,
            truncate_prompt_tokens,
            tokens_as_ids: self.return_tokens_as_token_ids.unwrap_or(false),
            constraint_field,
        };
        Ok((params, output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::protocol::CompletionRequest;

    #[test]
    fn vllm_extra_fields_reach_sampling_params() -> Result<(), Box<dyn std::error::Error>> {
        let req: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "hi", "max_tokens": 7, "min_tokens": 3, "top_k": 5,
            "seed": -1, "ignore_eos": true, "temperature": 0.5, "stop": "x", "user": "ignored"
        }))?;
        let (p, out) = req.sampling.resolve(Api::Completion, 16).map_err(|e| e.message)?;
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
            ("n", json!(0)),
            ("logprobs", json!(21)),
            ("presence_penalty", json!(0.5)),
        ] {
            let mut body = json!({"model": "m", "prompt": "hi"});
            body[field] = value;
            let req: CompletionRequest = serde_json::from_value(body)?;
            let err = req
                .sampling
                .resolve(Api::Completion, 16)
                .err()
                .ok_or("accepted")?;
            assert_eq!(err.param.as_deref(), Some(field));
        }
        // Defaults sent explicitly are fine.
        let req: CompletionRequest = serde_json::from_value(
            json!({"model": "m", "prompt": "hi", "n": 1, "logprobs": null, "presence_penalty": 0}),
        )?;
        assert!(req.sampling.resolve(Api::Completion, 16).is_ok());
        Ok(())
    }

    #[test]
    fn vllm_extra_fields_not_implemented_are_refused_by_name() -> Result<(), Box<dyn std::error::Error>> {
        for (field, value) in [
            ("logprobs", json!(true)),
            ("logprobs", json!(-1)),
            ("top_logprobs", json!(0)),
            ("n", json!(129)),
            ("guided_choice", json!([])),
            ("guided_regex", json!(5)),
            ("structured_outputs", json!({"structural_tag": "x"})),
            ("response_format", json!({"type": "yaml"})),
            ("prompt_logprobs", json!(21)),
            ("guided_whitespace_pattern", json!("[ ]?")),
            // Honored, but not in these shapes.
            ("bad_words", json!("x")),
            ("bad_words", json!([""])),
            ("allowed_token_ids", json!([])),
            ("allowed_token_ids", json!([-1])),
            ("truncate_prompt_tokens", json!(0)),
            ("truncate_prompt_tokens", json!(-2)),
            ("min_p", json!(0.1)),
            ("logits_processors", json!(["x"])),
            ("spaces_between_special_tokens", json!(false)),
        ] {
            let mut body = json!({"model": "m", "prompt": "hi"});
            body[field] = value.clone();
            let req: CompletionRequest = serde_json::from_value(body)?;
            assert!(req.unknown.is_empty(), "{field} is a known field");
            let err = req
                .sampling
                .resolve(Api::Completion, 16)
                .err()
                .ok_or(format!("{field}: {value} accepted"))?;
            assert_eq!(err.param.as_deref(), Some(field));
            assert!(err.message.contains(field), "{}", err.message);
        }
        // What is harmless or honored is accepted.
        let req: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "hi", "skip_special_tokens": false,
            "include_stop_str_in_output": true, "response_format": {"type": "text"},
            "logprobs": false, "bad_words": [], "user": "u", "guided_decoding_backend": "auto",
            "stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}
        }))?;
        assert!(req.unknown.is_empty());
        let (_, out) = req.sampling.resolve(Api::Completion, 16).map_err(|e| e.message)?;
        assert!(out.include_stop_str_in_output && !out.skip_special_tokens && out.continuous_usage);
        Ok(())
    }

    #[test]
    fn token_fields_are_read() -> Result<(), Box<dyn std::error::Error>> {
        let req: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "hi", "bad_words": ["foo", " bar"], "allowed_token_ids": [3, 5],
            "truncate_prompt_tokens": 4, "return_tokens_as_token_ids": true
        }))?;
        let (p, out) = req.sampling.resolve(Api::Completion, 16).map_err(|e| e.message)?;
        assert_eq!(p.allowed_token_ids, Some(vec![3, 5]));
        assert_eq!(out.bad_words, vec!["foo", " bar"]);
        assert_eq!(out.truncate_prompt_tokens, Some(Truncate::Last(4)));
        assert!(out.tokens_as_ids);
        let mut ids = vec![1, 2, 3, 4, 5, 6];
        Truncate::Last(4).apply(&mut ids, 100);
        assert_eq!(ids, vec![3, 4, 5, 6], "the prompt's last tokens are kept");
        Truncate::MaxModelLen.apply(&mut ids, 2);
        assert_eq!(ids, vec![5, 6]);
        Truncate::Last(10).apply(&mut ids, 100);
        assert_eq!(ids, vec![5, 6], "a shorter prompt is whole");
        Ok(())
    }

    #[test]
    fn logprobs_are_read_per_endpoint() -> Result<(), Box<dyn std::error::Error>> {
        let resolve = |api: Api, extra: Value| -> Result<(SamplingParams, Output), ApiError> {
            let mut body = json!({"model": "m", "prompt": "hi"});
            for (k, v) in extra.as_object().into_iter().flatten() {
                body[k] = v.clone();
            }
            let req: CompletionRequest =
                serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            req.sampling.resolve(api, 16)
        };
        let (p, out) = resolve(Api::Completion, json!({"logprobs": 0})).map_err(|e| e.message)?;
        assert_eq!(
            (p.logprobs, p.prompt_logprobs, out.echo),
            (Some(0), None, false),
            "0 still asks"
        );
        // echo makes the engine score the prompt with as many alternatives.
        let (p, out) =
            resolve(Api::Completion, json!({"logprobs": 3, "echo": true})).map_err(|e| e.message)?;
        assert_eq!(
            (p.logprobs, p.prompt_logprobs, out.prompt_logprobs),
            (Some(3), Some(3), None)
        );
        let (p, _) =
            resolve(Api::Completion, json!({"echo": true, "prompt_logprobs": 5})).map_err(|e| e.message)?;
        assert_eq!((p.logprobs, p.prompt_logprobs), (None, Some(5)));
        let (p, out) = resolve(Api::Chat, json!({"logprobs": true})).map_err(|e| e.message)?;
        assert_eq!((p.logprobs, out.logprobs), (Some(0), Some(0)));
        let (p, _) =
            resolve(Api::Chat, json!({"logprobs": true, "top_logprobs": 20})).map_err(|e| e.message)?;
        assert_eq!(p.logprobs, Some(20));
        let (p, _) = resolve(Api::Chat, json!({"logprobs": false})).map_err(|e| e.message)?;
        assert_eq!(p.logprobs, None);
        for (api, extra, param) in [
            (Api::Chat, json!({"top_logprobs": 2}), "top_logprobs"),
            (Api::Chat, json!({"logprobs": 2}), "logprobs"),
            (
                Api::Chat,
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (Api::Chat, json!({"echo": true}), "echo"),
            (Api::Completion, json!({"logprobs": 2.5}), "logprobs"),
            (
                Api::Completion,
                json!({"prompt_logprobs": "all"}),
                "prompt_logprobs",
            ),
        ] {
            let e = resolve(api, extra.clone())
                .err()
                .ok_or(format!("{extra} accepted"))?;
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
        Ok(())
    }
}
