//! multilora's OpenAI-compatible server, shaped like `vllm serve`: `/v1/completions` and
//! `/v1/chat/completions` (streamed as server-sent events or not), the adapter chosen per
//! request by `model`, vLLM's adapter endpoints, `/v1/models`, `/health` and `/metrics`.
//!
//! One engine loop on its own thread ([`engine_loop`]) serves every connection, so requests
//! from many clients, with different adapters, share each engine step. The HTTP side never
//! touches the engine directly; it sends commands and reads per-request token events.

pub mod app;
pub mod chat_template;
pub mod detokenize;
pub mod engine_loop;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod protocol;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use multilora_engine::EngineConfig;

use crate::app::{Adapters, AppState};
use crate::chat_template::ChatTemplate;
use crate::engine_loop::Command;
use crate::metrics::Metrics;

pub use error::ApiError;

/// Server settings beyond the engine's.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The `model` name of the base model (vLLM's `--served-model-name`).
    pub served_model_name: String,
    /// `(name, path)` adapters loaded at start-up (vLLM's `--lora-modules`).
    pub lora_modules: Vec<(String, PathBuf)>,
    pub api_key: Option<String>,
    /// A chat template file or inline template, overriding the model's.
    pub chat_template: Option<String>,
    /// Requests waiting for a batch slot beyond which new requests get 429.
    pub max_waiting_requests: usize,
    pub max_body_bytes: usize,
    /// How long a shutdown waits for running requests before aborting them.
    pub drain_timeout: Duration,
}

impl ServerConfig {
    pub fn new(served_model_name: impl Into<String>) -> Self {
        ServerConfig {
            served_model_name: served_model_name.into(),
            lora_modules: Vec::new(),
            api_key: None,
            chat_template: None,
            max_waiting_requests: 1024,
            max_body_bytes: 4 << 20,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] multilora_engine::Error),
    #[error("--lora-modules: adapter name {0:?} is given twice or is the base model's name")]
    DuplicateAdapter(String),
    #[error("{0}")]
    ChatTemplate(String),
}

/// A loaded engine and its HTTP state. Dropping it stops the engine loop.
pub struct Server {
    state: Arc<AppState>,
    thread: Option<JoinHandle<()>>,
    config: ServerConfig,
}

impl Server {
    /// Loads the model and the start-up adapters (a broken one fails here) on the engine thread.
    pub fn start(mut engine: EngineConfig, config: ServerConfig) -> Result<Self, StartError> {
        let mut adapters = Adapters::default();
        for (name, path) in &config.lora_modules {
            if *name == config.served_model_name || adapters.by_name.contains_key(name) {
                return Err(StartError::DuplicateAdapter(name.clone()));
            }
            let req = adapters.new_request(name, path.clone());
            adapters.by_name.insert(name.clone(), req);
        }
        if !adapters.by_name.is_empty() {
            engine.enable_lora = true;
        }
        let chat_template = ChatTemplate::from_model_dir(
            engine.tokenizer.as_ref().unwrap_or(&engine.model),
            config.chat_template.as_deref(),
        )
        .map_err(StartError::ChatTemplate)?;
        let model_root = engine.model.to_string_lossy().into_owned();
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let (handle, thread) = engine_loop::spawn(
            engine,
            adapters.by_name.values().cloned().collect(),
            config.max_waiting_requests,
            metrics.clone(),
        )?;
        let state = AppState::new(
            handle,
            config.served_model_name.clone(),
            model_root,
            adapters,
            chat_template,
            config.api_key.clone(),
            metrics,
        );
        Ok(Server {
            state: Arc::new(state),
            thread: Some(thread),
            config,
        })
    }

    pub fn router(&self) -> Router {
        app::router(self.state.clone(), self.config.max_body_bytes)
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops taking requests, lets running ones finish
    /// for up to `drain_timeout`, aborts the rest, and returns once every connection closed.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let drain_timeout = self.config.drain_timeout;
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing running requests (at most {drain_timeout:?})");
            state.is_shutting_down.store(true, Ordering::Relaxed);
            tokio::spawn(async move {
                tokio::time::sleep(drain_timeout).await;
                tracing::warn!("drain timeout: aborting the requests still running");
                state.engine.send(Command::AbortAll);
            });
        };
        // Token events are small writes: without TCP_NODELAY, Nagle's algorithm and delayed
        // ACKs hold them for ~40 ms and streamed latencies become meaningless.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!("TCP_NODELAY: {e}");
            }
        });
        axum::serve(listener, self.router())
            .with_graceful_shutdown(signal)
            .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.engine.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
