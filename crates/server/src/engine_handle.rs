//! What the HTTP side holds of the engine thread ([`crate::engine_loop`]): the
//! [`EngineHandle`] that sends it commands, the [`TokenEvent`]s a request receives, the
//! [`RequestGuard`] that aborts a request whose client went away, and [`EngineHealth`], which
//! tells `/health`, without asking the loop, whether the thread is alive and how long its current
//! step or command has taken — so `/health` can say the engine is stuck or gone while the loop
//! itself cannot answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use multilora_engine::{
    choice_request_id, AdapterId, Error as EngineError, FinishReason, Grammars, LoraRequest, ModelConfig,
    SamplingParams, TokenLogprob,
};
use tokio::sync::{mpsc, oneshot, watch};

/// What the engine reports to a request: one token per step, and its end.
#[derive(Debug, Clone)]
pub enum TokenEvent {
    Token {
        token_id: u32,
        finish_reason: Option<FinishReason>,
        num_prompt_tokens: usize,
        num_output_tokens: usize,
        /// The token's log-probability, when the request asked for `logprobs`.
        logprobs: Option<TokenLogprob>,
        /// With the first token, when the request asked for `prompt_logprobs`.
        prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    },
    /// The engine failed while running the request; it is gone.
    Failed(String),
}

/// Why the loop refused a request.
#[derive(Debug)]
pub enum AddError {
    Engine(EngineError),
    QueueFull {
        max_waiting: usize,
    },
    AdapterUnloaded(String),
    /// The prompt of this index (in a request of several) was refused; none of them was added.
    InPrompt {
        index: usize,
        error: Box<AddError>,
    },
    /// The loop is gone (the server is stopping, or the thread died).
    EngineStopped,
}

pub(crate) enum Command {
    /// One client request's prompts, added together (so they batch) or not at all.
    Add {
        prompts: Vec<AddPrompt>,
        /// Boxed: with a constraint's schema it outweighs every other command.
        params: Box<SamplingParams>,
        lora: Option<LoraRequest>,
        /// The handler checks stop strings: it will say how the request ended.
        has_stop_strings: bool,
        reply: oneshot::Sender<Result<(), AddError>>,
    },
    Abort(String),
    /// A handler's word on a request with stop strings: its text hit one (end it now, counted
    /// as finished with reason `stop`), or it ran until the engine finished it.
    Finished {
        request_id: String,
        at_stop_string: bool,
    },
    AddLora {
        lora: LoraRequest,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Forget an adapter once no request uses it.
    RemoveLora(AdapterId),
    /// Abort every request (shutdown after the drain timeout).
    AbortAll,
    Stop,
    /// Tests of what follows an engine thread's death (nothing a request can send).
    Panic,
    /// Tests of what clients see before a request's first step: while held, the loop serves
    /// commands but runs no step (nothing a request can send).
    HoldSteps(bool),
}

/// One prompt of an [`Command::Add`]: an engine request of its own.
pub(crate) struct AddPrompt {
    pub(crate) request_id: String,
    pub(crate) prompt_token_ids: Vec<u32>,
    /// `[n]` one channel per choice, whose request id is the engine's `choice_request_id`
    pub(crate) events: Vec<mpsc::UnboundedSender<TokenEvent>>,
}

/// Facts about the loaded engine the handlers need.
#[derive(Clone)]
pub struct EngineInfo {
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// For checking runtime adapters off the engine thread before the loop loads them.
    pub model_config: Arc<ModelConfig>,
    pub max_model_len: usize,
    pub enable_lora: bool,
    pub max_lora_rank: usize,
    /// Compiles requests' constraints (structured outputs) off the engine thread, to refuse a
    /// bad schema, regex or grammar before it is queued (and to wait there, not on the engine
    /// thread, for a token table still building).
    pub grammars: Grammars,
}

/// The handlers' side of the loop.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) tx: std_mpsc::Sender<Command>,
    pub info: EngineInfo,
    pub health: Arc<EngineHealth>,
}

/// What the HTTP side can see of the loop without a round trip through it.
#[derive(Debug)]
pub struct EngineHealth {
    epoch: Instant,
    /// Milliseconds after `epoch` (plus one) at which the current step or command began; 0
    /// while the loop waits for work.
    busy_since_ms: AtomicU64,
    is_alive: watch::Sender<bool>,
}

impl EngineHealth {
    pub(crate) fn new() -> Self {
        EngineHealth {
            epoch: Instant::now(),
            busy_since_ms: AtomicU64::new(0),
            is_alive: watch::Sender::new(true),
        }
    }

    pub(crate) fn set_busy(&self, is_busy: bool) {
        let ms = if is_busy {
            self.epoch.elapsed().as_millis() as u64 + 1
        } else {
            0
        };
        self.busy_since_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the current step or command has run; `None` while idle.
    pub fn busy_for(&self) -> Option<Duration> {
        match self.busy_since_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(self.epoch.elapsed().saturating_sub(Duration::from_millis(t - 1))),
        }
    }

    pub fn is_alive(&self) -> bool {
        *self.is_alive.borrow()
    }

    /// Resolves once the engine thread has ended, whatever ended it.
    pub async fn stopped(&self) {
        let mut rx = self.is_alive.subscribe();
        let _ = rx.wait_for(|alive| !alive).await;
    }
}

/// Marks the engine dead when the thread ends, by return or by panic.
pub(crate) struct MarkDeadOnDrop(pub(crate) Arc<EngineHealth>);

impl Drop for MarkDeadOnDrop {
    fn drop(&mut self) {
        self.0.set_busy(false);
        self.0.is_alive.send_replace(false);
    }
}

impl EngineHandle {
    pub(crate) fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Queues a request's prompts, all or none; errors (validation, full queue) come back
    /// before any token. Each prompt is an engine request (`request_id`, or `{request_id}-{i}`
    /// with several, as vLLM names them) whose `params.n` choices get their guard and channel,
    /// in prompt then choice order. With `has_stop_strings` the caller checks the text for stop
    /// strings and tells the loop how each choice ended through its guard
    /// ([`RequestGuard::finish`], [`RequestGuard::stop_at_string`]).
    pub async fn add(
        &self,
        request_id: String,
        prompts: Vec<Vec<u32>>,
        params: SamplingParams,
        lora: Option<LoraRequest>,
        has_stop_strings: bool,
    ) -> Result<Vec<Vec<(RequestGuard, mpsc::UnboundedReceiver<TokenEvent>)>>, AddError> {
        let (reply, reply_rx) = oneshot::channel();
        let num_prompts = prompts.len();
        let mut to_add = Vec::with_capacity(num_prompts);
        let mut choices = Vec::with_capacity(num_prompts);
        for (p, prompt_token_ids) in prompts.into_iter().enumerate() {
            let request_id = match num_prompts {
                1 => request_id.clone(),
                _ => format!("{request_id}-{p}"),
            };
            let mut events = Vec::with_capacity(params.n);
            let mut prompt_choices = Vec::with_capacity(params.n);
            for i in 0..params.n {
                let (tx, rx) = mpsc::unbounded_channel();
                events.push(tx);
                let guard = RequestGuard {
                    tx: self.tx.clone(),
                    request_id: choice_request_id(&request_id, i),
                    has_stop_strings,
                    is_finished: false,
                };
                prompt_choices.push((guard, rx));
            }
            to_add.push(AddPrompt {
                request_id,
                prompt_token_ids,
                events,
            });
            choices.push(prompt_choices);
        }
        let sent = self.send(Command::Add {
            prompts: to_add,
            params: Box::new(params),
            lora,
            has_stop_strings,
            reply,
        });
        if !sent {
            return Err(AddError::EngineStopped);
        }
        match reply_rx.await {
            Ok(Ok(())) => Ok(choices),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AddError::EngineStopped),
        }
    }

    /// Makes the engine thread panic: for tests of `/health` and of the server's exit after
    /// the engine dies. Nothing a client sends reaches this.
    #[doc(hidden)]
    pub fn panic_engine_for_tests(&self) {
        self.send(Command::Panic);
    }

    /// Holds (or resumes) the engine's steps; commands are still served. For tests of what a
    /// client sees before its request's first token. Nothing a client sends reaches this.
    #[doc(hidden)]
    pub fn hold_steps_for_tests(&self, is_held: bool) {
        self.send(Command::HoldSteps(is_held));
    }

    pub async fn add_lora(&self, lora: LoraRequest) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Command::AddLora { lora, reply }) {
            return Err(EngineError::Backend("the engine loop has stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(EngineError::Backend("the engine loop has stopped".into())))
    }
}

/// Aborts its request when dropped before [`RequestGuard::finish`]: a handler future or an
/// SSE stream that hyper drops because the client left takes its sequence with it.
pub struct RequestGuard {
    tx: std_mpsc::Sender<Command>,
    request_id: String,
    has_stop_strings: bool,
    is_finished: bool,
}

impl RequestGuard {
    /// The engine finished the request (and no stop string ended it first).
    pub fn finish(&mut self) {
        self.end(false);
    }

    /// The text hit a stop string: the engine's sequence ends now (if the engine has not
    /// finished it already), and the request counts as finished (`stop`), not aborted.
    pub fn stop_at_string(&mut self) {
        self.end(true);
    }

    fn end(&mut self, at_stop_string: bool) {
        if self.is_finished {
            return;
        }
        self.is_finished = true;
        if self.has_stop_strings {
            let _ = self.tx.send(Command::Finished {
                request_id: self.request_id.clone(),
                at_stop_string,
            });
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.is_finished {
            let _ = self.tx.send(Command::Abort(std::mem::take(&mut self.request_id)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_sees_a_panicked_thread_and_a_busy_one() -> Result<(), Box<dyn std::error::Error>> {
        let health = Arc::new(EngineHealth::new());
        assert!(health.is_alive() && health.busy_for().is_none());
        health.set_busy(true);
        std::thread::sleep(Duration::from_millis(20));
        assert!(health.busy_for().is_some_and(|d| d >= Duration::from_millis(20)));
        let h = health.clone();
        let t = std::thread::spawn(move || {
            let _mark = MarkDeadOnDrop(h);
            panic!("boom");
        });
        assert!(t.join().is_err());
        assert!(!health.is_alive());
        // `stopped` resolves at once for a thread that already died.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), health.stopped()).await })?;
        Ok(())
    }
}
