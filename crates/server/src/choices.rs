//! One request's choices in flight, from the handler's side: each choice's tokens turned into
//! text, logprobs and finish reasons as they come from the engine loop, then gathered into one
//! response (`collect_all`) or streamed as server-sent events (`into_sse`).

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use multilora_engine::FinishReason;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::detokenize::Detokenizer;
use crate::engine_handle::{RequestGuard, TokenEvent};
use crate::error::{ApiError, ApiResult};
use crate::logprobs::{chat_entry, prompt_logprobs, CompletionLogprobs, TokenNames};
use crate::protocol::Api;

/// A choice of a request in flight, from the handler's side.
pub(crate) struct Generation {
    /// Which choice of the request: `prompt * n + choice` (vLLM's order), 0 for the first.
    pub(crate) index: usize,
    /// The first choice of its prompt: its prompt tokens count in usage (once per prompt).
    pub(crate) is_first_choice: bool,
    pub(crate) api: Api,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    /// Declared before `events`, so dropped first: the engine loop has the guard's word on
    /// how the request ended before it finds the receiver gone.
    pub(crate) guard: RequestGuard,
    pub(crate) events: mpsc::UnboundedReceiver<TokenEvent>,
    pub(crate) detok: Detokenizer,
    pub(crate) include_usage: bool,
    /// Usage on every chunk, not only the last (vLLM's `continuous_usage_stats`).
    pub(crate) continuous_usage: bool,
    pub(crate) num_prompt_tokens: usize,
    pub(crate) num_output_tokens: usize,
    /// For `stop_reason`: which ids end the request as stop tokens rather than as EOS.
    pub(crate) stop_token_ids: Vec<u32>,
    pub(crate) eos_token_ids: Vec<u32>,
    pub(crate) include_stop_str_in_output: bool,
    /// vLLM's `stop_reason`: the stop string or stop token id that ended the text, else null.
    pub(crate) stop_reason: Value,
    /// Alternatives per output token, when log-probabilities were asked for.
    pub(crate) num_logprobs: Option<usize>,
    /// Completions' logprobs of the tokens not yet sent (the echoed prompt's first).
    pub(crate) completion_logprobs: Option<CompletionLogprobs>,
    /// Chat's `logprobs.content` entries not yet sent.
    pub(crate) chat_logprobs: Vec<Value>,
    /// vLLM's `prompt_logprobs`, with `k` alternatives, once the first token brought them.
    pub(crate) num_prompt_logprobs: Option<usize>,
    pub(crate) prompt_logprobs: Value,
    /// Completions' `echo`: the prompt's text and ids, until the first token puts them first.
    pub(crate) echo: Option<(String, Vec<u32>)>,
    /// How logprob entries name tokens (text, or `token_id:{id}`).
    pub(crate) names: TokenNames,
}

/// One step of a generation as the client sees it.
enum Progress {
    /// New text (possibly empty), and the finish reason if this was the last token.
    Text(String, Option<&'static str>),
    Failed(ApiError),
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
    fn of(choices: &[Generation]) -> Self {
        let gen = &choices[0];
        ResponseHeader {
            api: gen.api,
            id: gen.id.clone(),
            created: gen.created,
            model: gen.model.clone(),
            include_usage: gen.include_usage,
            continuous_usage: gen.continuous_usage,
            num_prompt_tokens: (choices.iter())
                .filter(|g| g.is_first_choice)
                .map(|g| g.num_prompt_tokens)
                .sum(),
        }
    }

    /// Usage with every prompt's tokens (once each) and every choice's output tokens counted.
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
pub(crate) async fn collect_all(choices: Vec<Generation>) -> ApiResult<Response> {
    let header = ResponseHeader::of(&choices);
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
pub(crate) fn into_sse(choices: Vec<Generation>) -> Response {
    struct StreamState<S> {
        header: ResponseHeader,
        merged: S,
        /// `[n]` output tokens of each choice so far
        num_output_tokens: Vec<usize>,
        num_finished: usize,
        pending: VecDeque<Event>,
        is_done: bool,
    }
    let header = ResponseHeader::of(&choices);
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
