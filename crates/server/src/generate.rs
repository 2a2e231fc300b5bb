//! `/v1/completions` and `/v1/chat/completions`: resolve the adapter from `model`, tokenize
//! (the chat template first for chat), queue the request on the engine loop, and answer with
//! one JSON body or a stream of server-sent events ending in `data: [DONE]`.
//!
//! Tokenizing a multi-megabyte prompt takes a core for seconds: a prompt is refused by its
//! byte length first when no tokenization could fit it in `max_model_len`, and the template
//! and tokenizer run on the blocking pool, `tokenize_permits` at a time, never on an async
//! worker that other connections' streams and `/health` need.
//!
//! The request's [`RequestGuard`](crate::engine_handle::RequestGuard) lives in the handler future
//! or the SSE stream (`choices.rs`): when hyper drops either because the client left, the request
//! is aborted and its KV blocks freed.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use multilora_engine::{Constraint, LoraRequest, SamplingParams};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::app::{ApiJson, AppState};
use crate::choices::{collect_all, into_sse, Generation};
use crate::detokenize::Detokenizer;
use crate::engine_handle::AddError;
use crate::error::{ApiError, ApiResult};
use crate::logprobs::{CompletionLogprobs, TokenNames};
use crate::protocol::{
    normalize_messages, warn_unknown_fields, Api, ChatRequest, CompletionRequest, DetokenizeRequest, Output,
    Prompt, TokenizeRequest,
};

/// vLLM's default `max_tokens` for `/v1/completions` (OpenAI's too).
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

pub async fn completions(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> ApiResult<Response> {
    st.check_accepting()?;
    warn_unknown_fields("/v1/completions", &req.unknown);
    let lora = st.resolve_model(&req.model)?;
    let (params, output) = req
        .sampling
        .resolve(Api::Completion, DEFAULT_COMPLETION_MAX_TOKENS)?;
    let prompts = req.prompt.into_prompts()?;
    let num_prompts = prompts.len();
    let has_text = prompts.iter().any(|p| matches!(p, Prompt::Text(_)));
    let (limits, echo, add_special_tokens) = (PromptLimits::of(&st), output.echo, req.add_special_tokens);
    // A prompt that fails is named by its index.
    let to_ids = move || {
        (prompts.into_iter().enumerate())
            .map(|(i, p)| match p {
                Prompt::Text(text) => Ok(PromptIds {
                    ids: (limits.encode(&text, add_special_tokens)).map_err(|e| {
                        if num_prompts > 1 {
                            e.in_prompt(i)
                        } else {
                            e
                        }
                    })?,
                    text: echo.then_some(text),
                }),
                Prompt::TokenIds(ids) => Ok(PromptIds { ids, text: None }),
            })
            .collect::<ApiResult<Vec<_>>>()
    };
    // Text goes to the blocking pool (all of a request's in one trip); token ids need no trip.
    let prompts = match has_text {
        true => off_the_runtime(&st, to_ids).await?,
        false => to_ids()?,
    };
    run(st, Api::Completion, req.model, prompts, params, lora, output).await
}

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> ApiResult<Response> {
    st.check_accepting()?;
    warn_unknown_fields("/v1/chat/completions", &req.unknown);
    req.check_chat_fields()?;
    let lora = st.resolve_model(&req.model)?;
    let template = st.chat_template.clone().ok_or_else(|| {
        ApiError::bad_request(
            "the model has no chat template (tokenizer_config.json); use /v1/completions or start the server with --chat-template",
        )
    })?;
    let messages = normalize_messages(req.messages)?;
    let limits = PromptLimits::of(&st);
    let add_generation_prompt = req.add_generation_prompt;
    let add_special_tokens = req.add_special_tokens;
    let kwargs = req.chat_template_kwargs.unwrap_or_default();
    let prompt_token_ids = off_the_runtime(&st, move || {
        let text = template
            .render(&messages, add_generation_prompt, &kwargs)
            .map_err(|e| ApiError::bad_param("messages", e))?;
        // The template writes the special tokens (BOS) itself, unless asked otherwise.
        limits.encode(&text, add_special_tokens)
    })
    .await?;
    // As vLLM: without max_tokens, chat may use the rest of the context.
    let default_max_tokens = st
        .engine
        .info
        .max_model_len
        .saturating_sub(prompt_token_ids.len())
        .max(1);
    let (params, output) = req.sampling.resolve(Api::Chat, default_max_tokens)?;
    let prompt = PromptIds {
        ids: prompt_token_ids,
        text: None,
    };
    run(st, Api::Chat, req.model, vec![prompt], params, lora, output).await
}

/// vLLM's `/tokenize`: how a prompt tokenizes, so clients (the benchmark) can check lengths.
pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> ApiResult<Response> {
    st.resolve_model(&req.model)?;
    let tokens = encode(&st, req.prompt, req.add_special_tokens).await?;
    Ok(axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": st.engine.info.max_model_len,
        "tokens": tokens,
    }))
    .into_response())
}

/// vLLM's `/detokenize`: token ids back to text, special tokens kept (vLLM's benchmark uses it
/// to realign prompts).
pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> ApiResult<Response> {
    st.resolve_model(&req.model)?;
    let tokenizer = st.engine.info.tokenizer.clone();
    let vocab_size = tokenizer.get_vocab_size(true);
    if let Some((i, id)) = req
        .tokens
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab_size)
    {
        return Err(ApiError::bad_param(
            "tokens",
            format!("tokens[{i}] = {id} is not a token id: the vocabulary has {vocab_size}"),
        ));
    }
    let prompt = off_the_runtime(&st, move || {
        tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::bad_param("tokens", format!("cannot decode the tokens: {e}")))
    })
    .await?;
    Ok(axum::Json(json!({"prompt": prompt})).into_response())
}

/// What tokenizing a prompt needs, to move onto the blocking pool.
struct PromptLimits {
    tokenizer: Arc<Tokenizer>,
    max_prompt_bytes: usize,
    max_model_len: usize,
}

impl PromptLimits {
    fn of(st: &AppState) -> Self {
        PromptLimits {
            tokenizer: st.engine.info.tokenizer.clone(),
            max_prompt_bytes: st.max_prompt_bytes,
            max_model_len: st.engine.info.max_model_len,
        }
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> ApiResult<Vec<u32>> {
        if text.len() > self.max_prompt_bytes {
            return Err(ApiError::bad_param(
                "prompt",
                format!(
                    "This model's maximum context length is {} tokens. However, the prompt is {} bytes, more than any prompt of that many tokens can be ({} bytes). Please reduce the length of the prompt.",
                    self.max_model_len,
                    text.len(),
                    self.max_prompt_bytes
                ),
            )
            .with_code("context_length_exceeded"));
        }
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::bad_param("prompt", format!("cannot tokenize the prompt: {e}")))
    }
}

async fn encode(st: &AppState, text: String, add_special_tokens: bool) -> ApiResult<Vec<u32>> {
    let limits = PromptLimits::of(st);
    off_the_runtime(st, move || limits.encode(&text, add_special_tokens)).await
}

/// Compiles a request's constraint off the engine thread (which, queueing the request, copies
/// this compile from the grammars' cache), so that a bad schema, regex or grammar is a 400
/// naming `field`, with llguidance's error; the first constrained request waits here, not on
/// the engine thread, for a token table still building.
async fn check_constraint(st: &AppState, field: &'static str, c: Constraint) -> ApiResult<()> {
    let grammars = st.engine.info.grammars.clone();
    off_the_runtime(st, move || {
        grammars.available().map_err(|e| {
            ApiError::bad_param(
                field,
                format!("{field}: structured outputs are not available for this model: {e}"),
            )
        })?;
        (grammars.matcher(&c).map(drop)).map_err(|e| ApiError::bad_param(field, format!("{field}: {e}")))
    })
    .await
}

/// Runs `f` on the blocking pool once a tokenize permit is free; the permit goes with `f`, so
/// a client that leaves does not free its place before its work ends.
async fn off_the_runtime<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let permit = st
        .tokenize_permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ApiError::internal("tokenizing", &e))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|e| ApiError::internal("tokenizing", &e))?
}

impl From<AddError> for ApiError {
    fn from(e: AddError) -> Self {
        match e {
            AddError::Engine(e) => e.into(),
            AddError::QueueFull { max_waiting } => ApiError::too_many_requests(format!(
                "too many requests: {max_waiting} are already waiting for a batch slot (--max-waiting-requests); retry later"
            )),
            AddError::AdapterUnloaded(name) => ApiError::model_not_found(&name),
            AddError::EngineStopped => ApiError::overloaded("the engine loop has stopped; see the server log"),
            AddError::InPrompt { index, error } => ApiError::from(*error).in_prompt(index),
        }
    }
}

/// vLLM's tokenization of `bad_words`: each word as it would follow other text (with a leading
/// space) and, where that is a different first token of the same length, also as it would start
/// the text, so the word is banned in both places.
fn bad_words_token_ids(tokenizer: &Tokenizer, words: &[String]) -> ApiResult<Vec<Vec<u32>>> {
    let encode = |text: &str| {
        tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::bad_param("bad_words", format!("cannot tokenize {text:?}: {e}")))
    };
    let mut out = Vec::new();
    for w in words {
        let word = w.trim_start();
        let bare = encode(word)?;
        let spaced = encode(&format!(" {word}"))?;
        if !bare.is_empty() {
            out.push(bare.clone());
        }
        if !spaced.is_empty() && spaced.len() == bare.len() && spaced.first() != bare.first() {
            out.push(spaced);
        }
    }
    Ok(out)
}

/// A prompt's token ids, and its text where the client sent text (for `echo`).
struct PromptIds {
    ids: Vec<u32>,
    text: Option<String>,
}

/// Queues a request's prompts (completions may send several; chat sends one) together, so they
/// batch, and answers with `len(prompts) * n` choices, choice `p * n + c` being choice `c` of
/// prompt `p` (vLLM's order), usage summed over all.
async fn run(
    st: Arc<AppState>,
    api: Api,
    model: String,
    mut prompts: Vec<PromptIds>,
    mut params: SamplingParams,
    lora: Option<LoraRequest>,
    output: Output,
) -> ApiResult<Response> {
    let prefix = match api {
        Api::Completion => "cmpl",
        Api::Chat => "chatcmpl",
    };
    if let (Some(c), Some(field)) = (params.constraint.clone(), output.constraint_field) {
        check_constraint(&st, field, c).await?;
    }
    let id = st.request_id(prefix);
    let tokenizer = st.engine.info.tokenizer.clone();
    if let Some(t) = output.truncate_prompt_tokens {
        for prompt in &mut prompts {
            let before = prompt.ids.len();
            t.apply(&mut prompt.ids, st.engine.info.max_model_len);
            if prompt.ids.len() < before {
                // Echo shows the prompt that ran.
                prompt.text = None;
            }
        }
    }
    if !output.bad_words.is_empty() {
        let (t, words) = (tokenizer.clone(), output.bad_words.clone());
        params.bad_words_token_ids = off_the_runtime(&st, move || bad_words_token_ids(&t, &words)).await?;
    }
    let names = TokenNames {
        tokenizer: tokenizer.clone(),
        as_ids: output.tokens_as_ids,
    };
    let echoes = match output.echo {
        true => echoed_prompts(&st, &prompts).await?,
        false => vec![None; prompts.len()],
    };
    let has_stop_strings = !output.stop.is_empty();
    let stop_token_ids = params.stop_token_ids.clone();
    let eos_token_ids = match params.ignore_eos {
        true => Vec::new(),
        false => st.engine.info.model_config.eos_token_ids.clone(),
    };
    let num_prompt_tokens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    let prompt_ids = prompts.into_iter().map(|p| p.ids).collect();
    let added = st
        .engine
        .add(id.clone(), prompt_ids, params, lora, has_stop_strings)
        .await?;
    let mut choices = Vec::new();
    for ((prompt_choices, echo), num_prompt_tokens) in added.into_iter().zip(echoes).zip(num_prompt_tokens) {
        for (c, (guard, events)) in prompt_choices.into_iter().enumerate() {
            choices.push(Generation {
                index: choices.len(),
                is_first_choice: c == 0,
                api,
                id: id.clone(),
                created: crate::app::unix_now(),
                model: model.clone(),
                guard,
                events,
                detok: Detokenizer::new(
                    st.engine.info.tokenizer.clone(),
                    output.stop.clone(),
                    output.include_stop_str_in_output,
                    output.skip_special_tokens,
                ),
                include_usage: output.include_usage,
                continuous_usage: output.continuous_usage,
                num_prompt_tokens,
                num_output_tokens: 0,
                stop_token_ids: stop_token_ids.clone(),
                eos_token_ids: eos_token_ids.clone(),
                include_stop_str_in_output: output.include_stop_str_in_output,
                stop_reason: Value::Null,
                num_logprobs: output.logprobs,
                completion_logprobs: match api {
                    Api::Completion => (output.logprobs).map(|k| CompletionLogprobs::new(names.clone(), k)),
                    Api::Chat => None,
                },
                names: names.clone(),
                chat_logprobs: Vec::new(),
                num_prompt_logprobs: output.prompt_logprobs,
                prompt_logprobs: Value::Null,
                echo: echo.clone(),
            });
        }
    }
    Ok(if output.stream {
        into_sse(choices)
    } else {
        collect_all(choices).await?
    })
}

/// What `echo` puts before each prompt's output: its text (decoded from its ids where the
/// client sent ids, or truncation cut it) and its ids.
async fn echoed_prompts(st: &AppState, prompts: &[PromptIds]) -> ApiResult<Vec<Option<(String, Vec<u32>)>>> {
    let tokenizer = st.engine.info.tokenizer.clone();
    let prompts: Vec<(Option<String>, Vec<u32>)> = (prompts.iter())
        .map(|p| (p.text.clone(), p.ids.clone()))
        .collect();
    off_the_runtime(st, move || {
        (prompts.into_iter())
            .map(|(text, ids)| {
                let text = match text {
                    Some(t) => t,
                    None => (tokenizer.decode(&ids, false)).map_err(|e| {
                        ApiError::bad_param("prompt", format!("cannot decode the prompt: {e}"))
                    })?,
                };
                Ok(Some((text, ids)))
            })
            .collect()
    })
    .await
}
