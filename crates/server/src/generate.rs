//! `/v1/completions` and `/v1/chat/completions`: resolve the adapter from `model`, tokenize
//! (the chat template first for chat), queue the request on the engine loop, and answer with
//! one JSON body or a stream of server-sent events ending in `data: [DONE]`.
//!
//! Tokenizing a multi-megabyte prompt takes a core for seconds: a prompt is refused by its
//! byte length first when no tokenization could fit it in `max_model_len`, and the template
//! and tokenizer run on the blocking pool, `tokenize_permits` at a time, never on an async
//! worker that other connections' streams and `/health` need.
//!
//! The request's [`RequestGuard`] lives in the handler future or the SSE stream: when hyper
//! drops either because the client left, the request is aborted and its KV blocks freed.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use multilora_engine::{Constraint, FinishReason, LoraRequest, SamplingParams};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::app::{ApiJson, AppState};
use crate::detokenize::Detokenizer;
use crate::engine_loop::{AddError, RequestGuard, TokenEvent};
use crate::error::{ApiError, ApiResult};
use crate::logprobs::{chat_entry, prompt_logprobs, CompletionLogprobs, TokenNames};
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
    let (prompt_token_ids, prompt_text) = match req.prompt.into_single()? {
        Prompt::Text(text) => {
            let echo = output.echo.then(|| text.clone());
            (encode(&st, text, req.add_special_tokens).await?, echo)
        }
        Prompt::TokenIds(ids) => (ids, None),
    };
    let prompt = PromptIds {
        ids: prompt_token_ids,
        text: prompt_text,
    };
    run(st, Api::Completion, req.model, prompt, params, lora, output).await
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
    run(st, Api::Chat, req.model, prompt, params, lora, output).await
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
/// naming `field`, with llguidance's error.
async fn check_constraint(st: &AppState, field: &'static str, c: Constraint) -> ApiResult<()> {
    let grammars = (st.engine.info.grammars.clone()).map_err(|e| {
        ApiError::bad_param(
            field,
            format!("{field}: structured outputs are not available for this model: {e}"),
        )
    })?;
    off_the_runtime(st, move || {
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
        }
    }
}

/// A choice of a request in flight, from the handler's side.
struct Generation {
    /// Which choice (`n` > 1), 0 for the first.
    index: usize,
    api: Api,
    id: String,
    created: u64,
    model: String,
    /// Declared before `events`, so dropped first: the engine loop has the guard's word on
    /// how the request ended before it finds the receiver gone.
    guard: RequestGuard,
    events: mpsc::UnboundedReceiver<TokenEvent>,
    detok: Detokenizer,
    include_usage: bool,
    /// Usage on every chunk, not only the last (vLLM's `continuous_usage_stats`).
    continuous_usage: bool,
    num_prompt_tokens: usize,
    num_output_tokens: usize,
    /// For `stop_reason`: which ids end the request as stop tokens rather than as EOS.
    stop_token_ids: Vec<u32>,
    eos_token_ids: Vec<u32>,
    include_stop_str_in_output: bool,
    /// vLLM's `stop_reason`: the stop string or stop token id that ended the text, else null.
    stop_reason: Value,
    /// Alternatives per output token, when log-probabilities were asked for.
    num_logprobs: Option<usize>,
    /// Completions' logprobs of the tokens not yet sent (the echoed prompt's first).
    completion_logprobs: Option<CompletionLogprobs>,
    /// Chat's `logprobs.content` entries not yet sent.
    chat_logprobs: Vec<Value>,
    /// vLLM's `prompt_logprobs`, with `k` alternatives, once the first token brought them.
    num_prompt_logprobs: Option<usize>,
    prompt_logprobs: Value,
    /// Completions' `echo`: the prompt's text and ids, until the first token puts them first.
    echo: Option<(String, Vec<u32>)>,
    /// How logprob entries name tokens (text, or `token_id:{id}`).
    names: TokenNames,
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

/// One step of a generation as the client sees it.
enum Progress {
    /// New text (possibly empty), and the finish reason if this was the last token.
    Text(String, Option<&'static str>),
    Failed(ApiError),
}

async fn run(
    st: Arc<AppState>,
    api: Api,
    model: String,
    mut prompt: PromptIds,
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
        let before = prompt.ids.len();
        t.apply(&mut prompt.ids, st.engine.info.max_model_len);
        if prompt.ids.len() < before {
            // Echo shows the prompt that ran.
            prompt.text = None;
        }
    }
    if !output.bad_words.is_empty() {
        let (t, words) = (tokenizer.clone(), output.bad_words.clone());
        params.bad_words_token_ids = off_the_runtime(&st, move || bad_words_token_ids(&t, &words)).await?;
    }
    let num_prompt_tokens = prompt.ids.len();
    let names = TokenNames {
        tokenizer: tokenizer.clone(),
        as_ids: output.tokens_as_ids,
    };
    let echo = match output.echo {
        true => {
            let text = match prompt.text {
                Some(t) => t,
                None => {
                    let (t, ids) = (tokenizer.clone(), prompt.ids.clone());
                    off_the_runtime(&st, move || {
                        (t.decode(&ids, false)).map_err(|e| {
                            ApiError::bad_param("prompt", format!("cannot decode the prompt: {e}"))
                        })
                    })
                    .await?
                }
            };
            Some((text, prompt.ids.clone()))
        }
        false => None,
    };
    let has_stop_strings = !output.stop.is_empty();
    let stop_token_ids = params.stop_token_ids.clone();
    let eos_token_ids = match params.ignore_eos {
        true => Vec::new(),
        false => st.engine.info.model_config.eos_token_ids.clone(),
    };
    let added = st
        .engine
        .add(id.clone(), prompt.ids, params, lora, has_stop_strings)
        .await?;
    let mut choices = Vec::with_capacity(added.len());
    for (index, (guard, events)) in added.into_iter().enumerate() {
        choices.push(Generation {
            index,
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
    Ok(if output.stream {
        into_sse(choices)
    } else {
        collect_all(choices).await?
    })
}

impl Generation {
    async fn next(&mut self) -> Progress {
        let failed = |msg: String| {
            Progress::Failed(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                msg,
            ))
        };
        match self.events.recv().await {
            Some(TokenEvent::Token {
                token_id,
                finish_reason,
                num_prompt_tokens,
                num_output_tokens,
                logprobs,
                prompt_logprobs,
            }) => {
                self.num_prompt_tokens = num_prompt_tokens;
                self.num_output_tokens = num_output_tokens;
                let echo = self.echo.take();
                self.add_logprobs(token_id, logprobs, prompt_logprobs, echo.as_ref().map(|e| &e.1));
                // As vLLM: EOS first (null), then the stop token id.
                let is_stop_token = finish_reason == Some(FinishReason::Stop)
                    && !self.eos_token_ids.contains(&token_id)
                    && self.stop_token_ids.contains(&token_id);
                // A stop token's text is not output (vLLM), unless asked for.
                let mut hit_stop = match is_stop_token && !self.include_stop_str_in_output {
                    true => false,
                    false => self.detok.push(token_id),
                };
                let mut finish = finish_reason.map(|r| r.as_str());
                if finish.is_some() && !hit_stop {
                    hit_stop = self.detok.flush();
                }
                if hit_stop {
                    // Ends the engine's sequence now, counted as a finish (stop), not an abort.
                    self.guard.stop_at_string();
                    finish = Some("stop");
                    self.stop_reason = self.detok.matched_stop().map_or(Value::Null, Value::from);
                } else if finish.is_some() {
                    self.guard.finish();
                    if is_stop_token {
                        self.stop_reason = json!(token_id);
                    }
                }
                let delta = self.detok.take_delta(finish.is_some());
                let text = match echo {
                    Some((prompt, _)) => prompt + delta,
                    None => delta.to_string(),
                };
                Progress::Text(text, finish)
            }
            Some(TokenEvent::Failed(msg)) => failed(msg),
            None => failed("the engine loop stopped".into()),
        }
    }

    /// Files a token's log-probabilities (and with the first, the prompt's) for the next
    /// response or chunk. `echo`: the prompt's ids, whose logprobs lead completions'.
    fn add_logprobs(
        &mut self,
        token_id: u32,
        logprobs: Option<multilora_engine::TokenLogprob>,
        prompt: Option<Vec<Option<multilora_engine::TokenLogprob>>>,
        echo: Option<&Vec<u32>>,
    ) {
        if let (Some(lps), Some(k)) = (&prompt, self.num_prompt_logprobs) {
            self.prompt_logprobs = prompt_logprobs(&self.names, lps, k);
        }
        if let Some(c) = self.completion_logprobs.as_mut() {
            if let Some(ids) = echo {
                let lps = prompt.as_deref().unwrap_or_default();
                for (i, &id) in ids.iter().enumerate() {
                    c.push(id, lps.get(i).and_then(Option::as_ref));
                }
            }
            c.push(token_id, logprobs.as_ref());
        } else if let (Some(k), Some(lp)) = (self.num_logprobs, &logprobs) {
            self.chat_logprobs.push(chat_entry(&self.names, lp, k));
        }
    }

    /// The `logprobs` of a choice: what was filed since the last call, or null if none were
    /// asked for.
    fn take_logprobs(&mut self) -> Value {
        match (self.api, self.num_logprobs) {
            (_, None) => Value::Null,
            (Api::Completion, Some(_)) => self
                .completion_logprobs
                .as_mut()
                .map_or(Value::Null, |c| c.take()),
            (Api::Chat, Some(_)) => json!({"content": std::mem::take(&mut self.chat_logprobs)}),
        }
    }

    /// What this choice sends when it finishes: its `choices` entry, the prompt's logprobs
    /// (vLLM's `prompt_logprobs`, or null) and its output token count.
    async fn collect(mut self) -> ApiResult<(Value, Value, usize)> {
        let mut text = String::new();
        let finish = loop {
            match self.next().await {
                Progress::Text(delta, finish) => {
                    text.push_str(&delta);
                    if let Some(f) = finish {
                        break f;
                    }
                }
                Progress::Failed(e) => return Err(e),
            }
        };
        let logprobs = self.take_logprobs();
        let mut choice = match self.api {
            Api::Completion => json!({
                "index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": self.stop_reason,
            }),
            Api::Chat => json!({
                "index": self.index, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish, "stop_reason": self.stop_reason,
            }),
        };
        let prompt_logprobs = std::mem::take(&mut self.prompt_logprobs);
        if self.api == Api::Completion {
            choice["prompt_logprobs"] = prompt_logprobs.clone();
        }
        Ok((choice, prompt_logprobs, self.num_output_tokens))
    }

    /// The entry of a streamed chunk for this choice's latest token.
    fn text_choice(&mut self, delta: &str, finish: Option<&str>) -> Value {
        let logprobs = self.take_logprobs();
        match self.api {
            Api::Completion => {
                let mut c = json!({
                    "index": self.index, "text": delta, "logprobs": logprobs, "finish_reason": finish,
                    "stop_reason": self.stop_reason,
                });
                if !self.prompt_logprobs.is_null() {
                    c["prompt_logprobs"] = std::mem::take(&mut self.prompt_logprobs);
                }
                c
            }
            Api::Chat => {
                let delta = if finish.is_some() && delta.is_empty() {
                    json!({})
                } else {
                    json!({"content": delta})
                };
                json!({"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                    "stop_reason": self.stop_reason})
            }
        }
    }

    /// This choice's stream of chunk entries, a token at a time; it ends after the last.
    fn into_choice_stream(self) -> impl futures_util::Stream<Item = ChoiceEvent> {
        futures_util::stream::unfold(
            (self, false, false),
            |(mut gen, mut has_sent_role, is_done)| async move {
                if is_done {
                    return None;
                }
                Some(match gen.next().await {
                    Progress::Text(delta, finish) => {
                        let mut entries = Vec::with_capacity(2);
                        // Chat's first chunk (the role) goes with the first token, as vLLM sends
                        // it: clients time the first token by the first chunk.
                        if gen.api == Api::Chat && !has_sent_role {
                            has_sent_role = true;
                            entries.push(
                                json!({"index": gen.index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": null, "finish_reason": null}),
                            );
                        }
                        entries.push(gen.text_choice(&delta, finish));
                        let event = ChoiceEvent::Entries {
                            index: gen.index,
                            entries,
                            num_output_tokens: gen.num_output_tokens,
                            is_last: finish.is_some(),
                        };
                        (event, (gen, has_sent_role, finish.is_some()))
                    }
                    Progress::Failed(e) => (ChoiceEvent::Failed(e), (gen, has_sent_role, true)),
                })
            },
        )
    }
}

/// What one choice of a streamed response produced.
enum ChoiceEvent {
    /// Chunk entries for its latest token (chat's role entry first, with the first token).
    Entries {
        index: usize,
        entries: Vec<Value>,
        num_output_tokens: usize,
        is_last: bool,
    },
    Failed(ApiError),
}

/// What every chunk and response of a request shares, whatever its choices.
struct ResponseHeader {
    api: Api,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    continuous_usage: bool,
    num_prompt_tokens: usize,
}

impl ResponseHeader {
    fn of(gen: &Generation) -> Self {
        ResponseHeader {
            api: gen.api,
            id: gen.id.clone(),
            created: gen.created,
            model: gen.model.clone(),
            include_usage: gen.include_usage,
            continuous_usage: gen.continuous_usage,
            num_prompt_tokens: gen.num_prompt_tokens,
        }
    }

    /// Usage with every choice's output tokens counted.
    fn usage(&self, num_output_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": num_output_tokens,
            "total_tokens": self.num_prompt_tokens + num_output_tokens,
        })
    }

    /// A streaming chunk with these entries (none, for the usage chunk).
    fn chunk(&self, choices: Vec<Value>, usage: Value) -> Event {
        let object = match self.api {
            Api::Completion => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let mut body = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            body["usage"] = usage;
        }
        Event::default().data(body.to_string())
    }
}

/// The whole response once every choice has finished, choices in index order.
async fn collect_all(choices: Vec<Generation>) -> ApiResult<Response> {
    let header = ResponseHeader::of(&choices[0]);
    let results = futures_util::future::try_join_all(choices.into_iter().map(Generation::collect)).await?;
    let num_output_tokens = results.iter().map(|r| r.2).sum();
    // Every choice reports the same prompt's logprobs.
    let prompt_logprobs = results.first().map_or(Value::Null, |r| r.1.clone());
    let object = match header.api {
        Api::Completion => "text_completion",
        Api::Chat => "chat.completion",
    };
    Ok(axum::Json(json!({
        "id": header.id,
        "object": object,
        "created": header.created,
        "model": header.model,
        "choices": results.into_iter().map(|r| r.0).collect::<Vec<_>>(),
        "usage": header.usage(num_output_tokens),
        // vLLM's: chat gives the prompt's logprobs beside the choices.
        "prompt_logprobs": match header.api {
            Api::Chat => prompt_logprobs,
            Api::Completion => Value::Null,
        },
    }))
    .into_response())
}

/// Streams every choice as its tokens come, one chunk per token and choice (its text possibly
/// empty: a token that completes no character yet), as vLLM streams, since clients time tokens
/// (TTFT, ITL) by chunks; then the usage chunk if asked, and `[DONE]` once all have finished.
fn into_sse(choices: Vec<Generation>) -> Response {
    struct StreamState<S> {
        header: ResponseHeader,
        merged: S,
        /// `[n]` output tokens of each choice so far
        num_output_tokens: Vec<usize>,
        num_finished: usize,
        pending: VecDeque<Event>,
        is_done: bool,
    }
    let header = ResponseHeader::of(&choices[0]);
    let n = choices.len();
    let streams = choices.into_iter().map(|g| Box::pin(g.into_choice_stream()));
    let state = StreamState {
        header,
        merged: futures_util::stream::select_all(streams),
        num_output_tokens: vec![0; n],
        num_finished: 0,
        pending: VecDeque::new(),
        is_done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        use futures_util::StreamExt;
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), s));
            }
            if s.is_done {
                return None;
            }
            match s.merged.next().await {
                Some(ChoiceEvent::Entries {
                    index,
                    entries,
                    num_output_tokens,
                    is_last,
                }) => {
                    let num_entries = entries.len();
                    for (k, entry) in entries.into_iter().enumerate() {
                        // The role entry's usage is from before the token.
                        if k + 1 == num_entries {
                            s.num_output_tokens[index] = num_output_tokens;
                        }
                        let usage = match s.header.continuous_usage {
                            true => s.header.usage(s.num_output_tokens.iter().sum()),
                            false => Value::Null,
                        };
                        s.pending.push_back(s.header.chunk(vec![entry], usage));
                    }
                    s.num_finished += usize::from(is_last);
                    if s.num_finished == s.num_output_tokens.len() {
                        if s.header.include_usage {
                            let usage = s.header.usage(s.num_output_tokens.iter().sum());
                            s.pending.push_back(s.header.chunk(Vec::new(), usage));
                        }
                        s.pending.push_back(Event::default().data("[DONE]"));
                        s.is_done = true;
                    }
                }
                Some(ChoiceEvent::Failed(e)) => {
                    s.pending.push_back(Event::default().data(e.body().to_string()));
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.is_done = true;
                }
                None => s.is_done = true,
            }
        }
    });
    Sse::new(stream).into_response()
}
