//! The one engine loop. `LLMEngine` is not thread-safe, so a dedicated OS thread owns it and
//! serves commands (add, abort, load/unload adapter) from the HTTP handlers over a channel
//! (their side: [`crate::engine_handle`]). Every request gets its own channel of
//! [`TokenEvent`]s. Continuous batching across connections falls out of the loop: drain
//! commands, step while work exists, block on the channel when idle.
//!
//! A request whose client went away (its [`RequestGuard`](crate::engine_handle::RequestGuard)
//! dropped, or its event channel closed) is aborted, which frees its KV blocks at once. Stop
//! strings are found by the handlers, which detokenize, behind the engine: a request with stop
//! strings is counted in `/metrics` once its handler has said how it ended (at a stop string:
//! `stop`, as vLLM counts it).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use multilora_engine::sequence::RequestMetrics;
use multilora_engine::{
    choice_request_id, AdapterId, EngineConfig, Error as EngineError, FinishReason, LLMEngine, LoraRequest,
    Prompt, SamplingParams,
};
use tokio::sync::mpsc;

use crate::engine_handle::{
    AddError, AddPrompt, Command, EngineHandle, EngineHealth, EngineInfo, MarkDeadOnDrop, TokenEvent,
};
use crate::metrics::Metrics;

/// Starts the engine thread; returns once the model is loaded (or failed to load).
pub fn spawn(
    config: EngineConfig,
    loras: Vec<LoraRequest>,
    max_waiting: usize,
    metrics: Arc<Metrics>,
) -> Result<(EngineHandle, JoinHandle<()>), EngineError> {
    let (tx, rx) = std_mpsc::channel();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let health = Arc::new(EngineHealth::new());
    let thread_health = health.clone();
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let _mark_dead = MarkDeadOnDrop(thread_health.clone());
            let engine = LLMEngine::new(config).and_then(|mut e| {
                for l in &loras {
                    e.add_lora(l)?;
                }
                Ok(e)
            });
            let engine = match engine {
                Ok(e) => e,
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                    return;
                }
            };
            let Some(tokenizer) = engine.tokenizer().cloned() else {
                let _ = ready_tx.send(Err(EngineError::InvalidConfig(
                    "the model has no tokenizer.json; the server needs one".into(),
                )));
                return;
            };
            let lora = engine.lora_manager().map(|m| m.config());
            let info = EngineInfo {
                tokenizer: Arc::new(tokenizer),
                model_config: Arc::new(engine.model_config().clone()),
                max_model_len: engine.resolved().max_model_len,
                enable_lora: lora.is_some(),
                max_lora_rank: lora.map_or(0, |c| c.max_lora_rank),
                grammars: engine.grammars().clone(),
            };
            let _ = ready_tx.send(Ok(info));
            EngineLoop {
                engine,
                max_waiting,
                metrics,
                health: thread_health,
                live: HashMap::new(),
                awaiting_handler: HashMap::new(),
                unloaded: HashSet::new(),
                pending_removals: Vec::new(),
                is_holding_steps: false,
            }
            .run(rx);
        })
        .map_err(|e| EngineError::Backend(format!("starting the engine thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(info)) => Ok((EngineHandle { tx, info, health }, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(EngineError::Backend(
                "the engine thread died while loading".into(),
            ))
        }
    }
}

struct Live {
    events: mpsc::UnboundedSender<TokenEvent>,
    has_stop_strings: bool,
    /// Names an adapter: its wait for it is observed.
    has_lora: bool,
    /// The last token's time, and the engine's timestamps and output length then (for the
    /// latency histograms of a request ended at a stop string).
    last: Option<(Instant, RequestMetrics, usize)>,
}

struct EngineLoop {
    engine: LLMEngine,
    max_waiting: usize,
    metrics: Arc<Metrics>,
    health: Arc<EngineHealth>,
    live: HashMap<Arc<str>, Live>,
    /// Requests with stop strings the engine finished, with its reason, counted once their
    /// handler says whether a stop string ended them first.
    awaiting_handler: HashMap<Arc<str>, FinishReason>,
    /// Adapters unloaded through the API; a request still naming one is refused.
    unloaded: HashSet<AdapterId>,
    /// Unloaded adapters that running requests still use.
    pending_removals: Vec<AdapterId>,
    /// Set by a test hook: serve commands, run no step.
    is_holding_steps: bool,
}

impl EngineLoop {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        'outer: loop {
            if !self.engine.has_unfinished_requests() || self.is_holding_steps {
                self.health.set_busy(false);
                let cmd = rx.recv();
                self.health.set_busy(true);
                match cmd {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.health.set_busy(true);
                if !self.handle(cmd) {
                    break 'outer;
                }
            }
            if self.engine.has_unfinished_requests() && !self.is_holding_steps {
                // Before the step too: its tokens reach clients before the publish after it,
                // and a client must not then read the gauges of before its request arrived.
                self.publish();
                self.health.set_busy(true);
                self.step();
            }
            if !self.pending_removals.is_empty() {
                let engine = &mut self.engine;
                self.pending_removals.retain(|&id| !engine.remove_lora(id));
            }
            self.publish();
        }
        self.abort_all();
        self.publish();
    }

    /// Returns false on `Stop`.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add {
                prompts,
                params,
                lora,
                has_stop_strings,
                reply,
            } => {
                let result = self.add_all(prompts, &params, lora, has_stop_strings);
                let refused = match &result {
                    Err(AddError::InPrompt { error, .. }) => Some(&**error),
                    r => r.as_ref().err(),
                };
                if let Some(AddError::QueueFull { .. }) = refused {
                    self.metrics.num_rejected_queue_full.inc();
                }
                let _ = reply.send(result);
            }
            Command::Abort(id) => {
                if self.live.remove(id.as_str()).is_some() {
                    self.engine.abort_request(&id);
                    self.metrics.count_finish("abort");
                    tracing::debug!(request_id = %id, "aborted: client went away");
                } else if let Some(reason) = self.awaiting_handler.remove(id.as_str()) {
                    // The engine had finished it; the client left before reading the end.
                    self.metrics.count_finish(reason.as_str());
                }
            }
            Command::Finished {
                request_id,
                at_stop_string,
            } => self.finished_by_handler(&request_id, at_stop_string),
            Command::AddLora { lora, reply } => {
                let _ = reply.send(self.engine.add_lora(&lora));
            }
            Command::RemoveLora(id) => {
                self.unloaded.insert(id);
                if !self.engine.remove_lora(id) {
                    self.pending_removals.push(id);
                }
            }
            Command::AbortAll => self.abort_all(),
            Command::Stop => return false,
            Command::Panic => panic!("engine thread panicked on request (a test of engine death)"),
            Command::HoldSteps(is_held) => self.is_holding_steps = is_held,
        }
        true
    }

    /// Adds every prompt of a request, or (one refused) none: those already added are taken
    /// back before any step could run them, and the error names the refused prompt's index
    /// when there are several.
    fn add_all(
        &mut self,
        prompts: Vec<AddPrompt>,
        params: &SamplingParams,
        lora: Option<LoraRequest>,
        has_stop_strings: bool,
    ) -> Result<(), AddError> {
        let num_prompts = prompts.len();
        // Only requests that cannot start at the next step count as queued: a burst arrives
        // before any step has run, and free batch slots would otherwise refuse it. A request's
        // prompts are admitted together on one check, so a request with more prompts than the
        // queue holds is never refused on a server that has room (a retry could not help it).
        let free_slots = (self.engine.resolved().max_num_seqs).saturating_sub(self.engine.num_running());
        if self.engine.num_waiting().saturating_sub(free_slots) >= self.max_waiting {
            return Err(AddError::QueueFull {
                max_waiting: self.max_waiting,
            });
        }
        let mut added: Vec<(String, Vec<mpsc::UnboundedSender<TokenEvent>>)> =
            Vec::with_capacity(num_prompts);
        for (index, prompt) in prompts.into_iter().enumerate() {
            let (request_id, events) = (prompt.request_id, prompt.events);
            if let Err(e) = self.add(
                &request_id,
                prompt.prompt_token_ids,
                params.clone(),
                lora.as_ref(),
            ) {
                for (request_id, events) in &added {
                    for i in 0..events.len() {
                        self.engine.abort_request(&choice_request_id(request_id, i));
                    }
                }
                return Err(match num_prompts {
                    1 => e,
                    _ => AddError::InPrompt {
                        index,
                        error: Box::new(e),
                    },
                });
            }
            added.push((request_id, events));
        }
        let has_lora = lora.is_some();
        for (request_id, events) in added {
            for (i, events) in events.into_iter().enumerate() {
                let live = Live {
                    events,
                    has_stop_strings,
                    has_lora,
                    last: None,
                };
                self.live.insert(choice_request_id(&request_id, i).into(), live);
            }
        }
        Ok(())
    }

    fn add(
        &mut self,
        request_id: &str,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        lora: Option<&LoraRequest>,
    ) -> Result<(), AddError> {
        if let Some(l) = lora.filter(|l| self.unloaded.contains(&l.id)) {
            return Err(AddError::AdapterUnloaded(l.name.clone()));
        }
        self.engine
            .add_request(request_id, Prompt::TokenIds(prompt_token_ids), params, lora)
            .map_err(AddError::Engine)
    }

    fn step(&mut self) {
        let outputs = match self.engine.step() {
            Ok(o) => o,
            Err(err) => {
                // A failed step (an adapter that no longer loads, a backend error) ends the
                // requests in flight, not the server.
                tracing::error!("engine step failed: {err}");
                let msg = "the engine failed while running this request; see the server log";
                for (id, live) in self.live.drain() {
                    let _ = live.events.send(TokenEvent::Failed(msg.into()));
                    self.engine.abort_request(&id);
                }
                return;
            }
        };
        let metrics = &self.metrics;
        metrics.num_steps.inc();
        for out in outputs {
            let Some(token_id) = out.token_id else {
                // Ended without a token: the engine could not reload its adapter.
                if let Some(live) = self.live.remove(&out.request_id) {
                    let msg = "the request's adapter could not be loaded; see the server log";
                    let _ = live.events.send(TokenEvent::Failed(msg.into()));
                    metrics.count_finish("abort");
                }
                continue;
            };
            let Some(live) = self.live.get_mut(&out.request_id) else {
                continue;
            };
            let now = out.metrics.last_token_time.unwrap_or_else(Instant::now);
            match live.last {
                None => {
                    // A request's prompt counts once, whatever its choices (`n`).
                    if out.choice_index == 0 {
                        metrics.num_prompt_tokens.inc_by(out.num_prompt_tokens as u64);
                    }
                    metrics
                        .time_to_first_token
                        .observe((now - out.metrics.arrival_time).as_secs_f64());
                    if live.has_lora {
                        // Final once it is scheduled, which its first token implies.
                        metrics
                            .lora_adapter_wait
                            .observe(out.metrics.adapter_wait.as_secs_f64());
                    }
                }
                Some((prev, ..)) => metrics.inter_token_latency.observe((now - prev).as_secs_f64()),
            }
            live.last = Some((now, out.metrics, out.num_output_tokens));
            metrics.num_generation_tokens.inc();
            let sent = live.events.send(TokenEvent::Token {
                token_id,
                finish_reason: out.finish_reason,
                num_prompt_tokens: out.num_prompt_tokens,
                num_output_tokens: out.num_output_tokens,
                logprobs: out.logprobs,
                prompt_logprobs: out.prompt_logprobs,
            });
            if let Some(reason) = out.finish_reason {
                metrics.observe_finished(&out.metrics, now, out.num_output_tokens);
                if live.has_stop_strings {
                    // Its handler may still find a stop string in the last tokens.
                    self.awaiting_handler.insert(out.request_id.clone(), reason);
                } else {
                    metrics.count_finish(reason.as_str());
                }
                self.live.remove(&out.request_id);
            } else if sent.is_err() && !live.has_stop_strings {
                // The client is gone: free the sequence now. (With stop strings, the handler
                // may have stopped reading at one: its guard queued how the request ended,
                // before dropping the receiver, and that command ends it before the next step.)
                self.live.remove(&out.request_id);
                self.engine.abort_request(&out.request_id);
                metrics.count_finish("abort");
            }
        }
    }

    /// Counts a request with stop strings once its handler says how it ended. One that hit a
    /// stop string is finished (`stop`, as vLLM counts it): if the engine is still running it,
    /// it ends now, with the latencies of its last token.
    fn finished_by_handler(&mut self, request_id: &str, at_stop_string: bool) {
        let metrics = &self.metrics;
        if let Some(reason) = self.awaiting_handler.remove(request_id) {
            // Finished by the engine, its latencies observed then.
            metrics.count_finish(if at_stop_string { "stop" } else { reason.as_str() });
        } else if at_stop_string {
            if let Some(live) = self.live.remove(request_id) {
                self.engine.abort_request(request_id);
                metrics.count_finish("stop");
                if let Some((now, m, n)) = live.last {
                    metrics.observe_finished(&m, now, n);
                }
            }
        }
    }

    fn abort_all(&mut self) {
        for (id, live) in self.live.drain() {
            self.engine.abort_request(&id);
            let _ = live
                .events
                .send(TokenEvent::Failed("the server is shutting down".into()));
        }
    }

    /// Copies the engine's gauges into the shared metrics.
    fn publish(&mut self) {
        let m = &self.metrics;
        m.num_requests_running.set(self.engine.num_running() as i64);
        m.num_requests_waiting.set(self.engine.num_waiting() as i64);
        if let Some(lm) = self.engine.lora_manager() {
            m.lora_adapters_on_device.set(lm.num_in_slots() as i64);
            m.lora_adapters_on_host.set(lm.num_cached() as i64);
        }
        if let Some(s) = self.engine.lora_stats() {
            m.set_lora_stats(&s);
        }
    }
}
