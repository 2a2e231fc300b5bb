//! multilora's OpenAI-compatible server, shaped like `vllm serve`: `/v1/completions` and
//! `/v1/chat/completions` (streamed as server-sent events or not), the adapter chosen per
//! request by `model`, vLLM's adapter endpoints, `/v1/models`, `/health` and `/metrics`.
//!
//! One engine loop on its own thread ([`engine_loop`]) serves every connection, so requests
//! from many clients, with different adapters, share each engine step. The HTTP side never
//! touches the engine directly; it sends commands and reads per-request token events
//! ([`engine_handle`]).
//!
//! Nothing a client does may hold the engine or the process: sizes are checked before work is
//! done for them, tokenization runs on a bounded pool off the async workers, slow connections
//! time out (`connections`), and a shutdown ends at its timeout.

pub mod app;
pub mod chat_template;
mod choices;
mod connections;
pub mod detokenize;
pub mod engine_handle;
pub mod engine_loop;
pub mod error;
pub mod generate;
pub mod logprobs;
pub mod metrics;
pub mod protocol;
pub mod resolve;
pub mod structured;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use multilora_engine::EngineConfig;

use crate::app::{Adapters, AppState};
use crate::chat_template::ChatTemplate;
use crate::engine_handle::Command;
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
    /// Queued requests that no free batch slot can take, beyond which new requests get 429
    /// (checked once per request: all of a request's prompts are admitted together).
    pub max_waiting_requests: usize,
    pub max_body_bytes: usize,
    /// How long a shutdown waits for running requests before aborting them (`--shutdown-timeout`).
    pub drain_timeout: Duration,
    /// `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` answer (vLLM's
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING`); off, they answer 404.
    pub enable_runtime_lora_updating: bool,
    /// Folders runtime adapter paths must resolve inside (after symlinks); empty: any path.
    pub allowed_lora_dirs: Vec<PathBuf>,
    /// `/v1/models` gives each adapter's folder as its `root` (else its name).
    pub show_lora_paths: bool,
    /// How long a connection may take to send a request's headers, from its opening or its
    /// previous response; also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive once its headers have.
    pub body_timeout: Duration,
    /// Open connections beyond which new ones wait in the listen backlog.
    pub max_connections: usize,
    /// A step or command of the engine loop running longer than this makes `/health` 503.
    pub engine_stall_timeout: Duration,
    /// How long `/v1/load_lora_adapter` waits for the adapter's files to be read.
    pub lora_load_timeout: Duration,
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
            enable_runtime_lora_updating: false,
            allowed_lora_dirs: Vec::new(),
            show_lora_paths: false,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            engine_stall_timeout: Duration::from_secs(60),
            lora_load_timeout: Duration::from_secs(60),
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
    #[error("--allowed-lora-dirs {}: {source}", path.display())]
    AllowedLoraDir { path: PathBuf, source: std::io::Error },
}

/// A loaded engine and its HTTP state. Dropping it stops the engine loop.
pub struct Server {
    state: Arc<AppState>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Loads the model and the start-up adapters (a broken one fails here) on the engine thread.
    pub fn start(mut engine: EngineConfig, mut config: ServerConfig) -> Result<Self, StartError> {
        // Resolved once, so a load path is compared with what the roots are, not what they say.
        for dir in &mut config.allowed_lora_dirs {
            *dir = std::fs::canonicalize(&*dir).map_err(|source| StartError::AllowedLoraDir {
                path: dir.clone(),
                source,
            })?;
        }
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
        let metrics = Arc::new(Metrics::new(&config.served_model_name));
        let (handle, thread) = engine_loop::spawn(
            engine,
            adapters.by_name.values().cloned().collect(),
            config.max_waiting_requests,
            metrics.clone(),
        )?;
        let state = AppState::new(handle, config, model_root, adapters, chat_template, metrics);
        Ok(Server {
            state: Arc::new(state),
            thread: Some(thread),
        })
    }

    pub fn router(&self) -> Router {
        app::router(self.state.clone(), self.state.config.max_body_bytes)
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: running requests may finish for up to
    /// `drain_timeout` while new ones get 503, then the rest are aborted and every connection
    /// is closed. Returns an error if the engine thread died (so the process exits non-zero
    /// and a supervisor restarts it).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        connections::serve(listener, router, self.state.clone(), shutdown).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.engine.send(Command::Stop);
        let Some(t) = self.thread.take() else { return };
        // A loop stuck in a read (an adapter file on a hung mount) must not keep the process
        // alive: wait a little, then leave the thread to the process's exit.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::warn!("the engine thread did not stop within 2 s; leaving it");
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
