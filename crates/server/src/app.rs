//! The HTTP surface: shared state, the router, the API-key check on `/v1`, our JSON extractor
//! (so malformed bodies get OpenAI's error format too), and the small endpoints: `/health`,
//! `/metrics`, `/version`, `/v1/models`, `/v1/models/{id}`, `/v1/load_lora_adapter`,
//! `/v1/unload_lora_adapter`.
//! The API key guards every route but `/health` and `/metrics`, unknown ones included (so a
//! client without it learns nothing of which routes exist).
//!
//! Runtime adapter loading is off unless asked for; a path to load is read on the blocking pool
//! (never on an async worker or the engine loop) and, with `--allowed-lora-dirs`, must resolve
//! inside one of them, with one answer for every path outside whether it exists or not.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::{AdapterId, LoraRequest};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::chat_template::ChatTemplate;
use crate::engine_handle::{Command, EngineHandle};
use crate::error::{ApiError, ApiResult};
use crate::generate;
use crate::metrics::Metrics;
use crate::ServerConfig;

/// Adapter loads read at once; more wait (a folder on a hung mount holds its permit).
const MAX_CONCURRENT_LORA_LOADS: usize = 4;

pub struct AppState {
    pub engine: EngineHandle,
    pub config: ServerConfig,
    /// The base model's folder, reported as `root` in `/v1/models`.
    pub model_root: String,
    pub adapters: RwLock<Adapters>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub metrics: Arc<Metrics>,
    /// Unix seconds at start-up.
    pub created: u64,
    next_request: AtomicU64,
    pub is_shutting_down: AtomicBool,
    /// Tokenizations (and chat templates) running on the blocking pool at once.
    pub tokenize_permits: Arc<Semaphore>,
    lora_load_permits: Arc<Semaphore>,
    /// A prompt longer than this many bytes cannot fit `max_model_len` tokens, whatever it
    /// holds: `max_model_len` times the longest token in the vocabulary.
    pub max_prompt_bytes: usize,
}

/// Adapters requests may name, by name; ids are never reused.
#[derive(Default)]
pub struct Adapters {
    pub by_name: BTreeMap<String, LoraRequest>,
    pub next_id: u32,
}

impl Adapters {
    pub fn new_request(&mut self, name: &str, path: PathBuf) -> LoraRequest {
        self.next_id += 1;
        LoraRequest {
            name: name.to_string(),
            id: AdapterId(self.next_id),
            path,
        }
    }
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        config: ServerConfig,
        model_root: String,
        adapters: Adapters,
        chat_template: Option<ChatTemplate>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_token_bytes = engine
            .info
            .tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        let max_prompt_bytes = engine.info.max_model_len.saturating_mul(max_token_bytes.max(1));
        let num_cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        AppState {
            engine,
            config,
            model_root,
            adapters: RwLock::new(adapters),
            chat_template: chat_template.map(Arc::new),
            metrics,
            created: unix_now(),
            next_request: AtomicU64::new(0),
            is_shutting_down: AtomicBool::new(false),
            tokenize_permits: Arc::new(Semaphore::new(num_cpus)),
            lora_load_permits: Arc::new(Semaphore::new(MAX_CONCURRENT_LORA_LOADS)),
            max_prompt_bytes,
        }
    }

    pub fn served_model_name(&self) -> &str {
        &self.config.served_model_name
    }

    /// A request id unique in this process: `<prefix>-<start time><counter>`.
    pub fn request_id(&self, prefix: &str) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:08x}", self.created)
    }

    /// The adapter `model` names, `None` for the base model.
    pub fn resolve_model(&self, model: &str) -> ApiResult<Option<LoraRequest>> {
        if model == self.served_model_name() {
            return Ok(None);
        }
        let adapters = self.adapters.read().unwrap_or_else(|e| e.into_inner());
        adapters
            .by_name
            .get(model)
            .cloned()
            .map(Some)
            .ok_or_else(|| ApiError::model_not_found(model))
    }

    pub fn check_accepting(&self) -> ApiResult<()> {
        if self.is_shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::overloaded("the server is shutting down"));
        }
        Ok(())
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .route("/v1/models", get(list_models))
        // A catch-all: served model names may hold slashes (`org/model`).
        .route("/v1/models/{*id}", get(retrieve_model))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route("/tokenize", post(generate::tokenize))
        .route("/detokenize", post(generate::detokenize))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Every route but `/health` and `/metrics`, unknown routes and wrong methods included.
async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let is_open = matches!(req.uri().path(), "/health" | "/metrics");
    if let Some(key) = st.config.api_key.as_ref().filter(|_| !is_open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `axum::Json`, but every rejection (body too large, malformed JSON, wrong types) is an
/// [`ApiError`], and the body must arrive within `body_timeout` (a client that sends its
/// headers and then trickles or withholds the body would hold the connection forever). The
/// content type is not checked, as clients differ in sending it.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let timeout = state.config.body_timeout;
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::request_timeout(format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ))
            })?;
        let bytes = read.map_err(|e| {
            let status = e.status();
            let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "the request body is larger than this server accepts (--max-body-bytes)".into()
            } else {
                e.body_text()
            };
            ApiError::new(status, "invalid_request_error", msg)
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => "invalid request body",
                _ => "malformed JSON in the request body",
            };
            ApiError::bad_request(format!("{what}: {e}"))
        })
    }
}

/// 200 while the engine loop is alive and not stuck in one step or command; else 503, which
/// a load balancer or supervisor acts on.
async fn health(State(st): State<Arc<AppState>>) -> Response {
    let health = &st.engine.health;
    let busy_for = health.busy_for().filter(|d| *d > st.config.engine_stall_timeout);
    let problem = if !health.is_alive() {
        "the engine loop has stopped".to_string()
    } else if let Some(d) = busy_for {
        format!(
            "the engine loop has been in one step or command for {:.0} s",
            d.as_secs_f64()
        )
    } else if st.is_shutting_down.load(Ordering::Relaxed) {
        "the server is shutting down".to_string()
    } else {
        return StatusCode::OK.into_response();
    };
    ApiError::overloaded(problem).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// As vLLM lists them: the base model, then each adapter with `parent` the base model and
/// `root` its folder, or its name unless `show_lora_paths` (the folder says where the server's
/// files are).
fn model_cards(st: &AppState) -> Vec<serde_json::Value> {
    let card = |id: &str, root: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": st.created,
            "owned_by": "multilora",
            "root": root,
            "parent": parent,
            "max_model_len": st.engine.info.max_model_len,
        })
    };
    let base = st.served_model_name();
    let mut data = vec![card(base, &st.model_root, None)];
    let adapters = st.adapters.read().unwrap_or_else(|e| e.into_inner());
    for (name, l) in &adapters.by_name {
        let root = match st.config.show_lora_paths {
            true => l.path.to_string_lossy(),
            false => name.into(),
        };
        data.push(card(name, &root, Some(base)));
    }
    data
}

async fn list_models(State(st): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"object": "list", "data": model_cards(&st)})).into_response()
}

/// OpenAI's `GET /v1/models/{model}` (`client.models.retrieve`): one card, or 404.
async fn retrieve_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Response> {
    model_cards(&st)
        .into_iter()
        .find(|c| c["id"] == id.as_str())
        .map(|c| axum::Json(c).into_response())
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// vLLM's `/version`.
async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

#[derive(Deserialize)]
struct LoadLora {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadLora {
    lora_name: String,
}

/// Present only when runtime adapter loading is on; else the route answers 404 before its
/// body is read.
struct RuntimeLoraUpdating;

impl FromRequestParts<Arc<AppState>> for RuntimeLoraUpdating {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, st: &Arc<AppState>) -> Result<Self, ApiError> {
        if st.config.enable_runtime_lora_updating {
            return Ok(RuntimeLoraUpdating);
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "runtime adapter loading is off: start the server with --enable-runtime-lora-updating (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
        ))
    }
}

/// The folder to load, after symlinks, if it lies inside `allowed` (any folder if empty). One
/// error for every refused path, so that answers do not tell what exists outside.
fn resolve_lora_path(path: &str, allowed: &[PathBuf]) -> ApiResult<PathBuf> {
    if allowed.is_empty() {
        return Ok(PathBuf::from(path));
    }
    let outside = || {
        ApiError::bad_param(
            "lora_path",
            "lora_path must name an adapter folder inside --allowed-lora-dirs",
        )
    };
    let real = std::fs::canonicalize(path).map_err(|_| outside())?;
    match allowed.iter().any(|root| real.starts_with(root)) {
        true => Ok(real),
        false => Err(outside()),
    }
}

/// Resolves and reads the adapter on the blocking pool, so a slow or stuck folder holds neither
/// an async worker nor the engine loop, then hands it to the loop (whose copy then comes from
/// the page cache).
async fn check_adapter(st: &AppState, name: &str, path: &str) -> ApiResult<PathBuf> {
    let permits = st.lora_load_permits.clone();
    let (name, path) = (name.to_string(), path.to_string());
    let allowed = st.config.allowed_lora_dirs.clone();
    let model = st.engine.info.model_config.clone();
    let max_lora_rank = st.engine.info.max_lora_rank;
    let read = async move {
        let permit = permits
            .acquire_owned()
            .await
            .map_err(|e| ApiError::internal("loading an adapter", &e))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let dir = resolve_lora_path(&path, &allowed)?;
            LoraAdapter::load(&name, &dir, &model, max_lora_rank)?;
            Ok(dir)
        })
        .await
        .map_err(|e| ApiError::internal("loading an adapter", &e))?
    };
    let timeout = st.config.lora_load_timeout;
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!(
                "the adapter's files could not be read within {} s",
                timeout.as_secs_f64()
            ),
        )
    })?
}

/// vLLM's `/v1/load_lora_adapter`: the adapter is read and checked now, so a broken one fails
/// this call (400) and nothing else.
async fn load_lora_adapter(
    State(st): State<Arc<AppState>>,
    _: RuntimeLoraUpdating,
    ApiJson(body): ApiJson<LoadLora>,
) -> ApiResult<Response> {
    st.check_accepting()?;
    let name = body.lora_name;
    if name.is_empty() || body.lora_path.is_empty() {
        return Err(ApiError::bad_request(
            "both \"lora_name\" and \"lora_path\" must be non-empty",
        ));
    }
    if !st.engine.info.enable_lora {
        return Err(ApiError::bad_request(
            "LoRA is not enabled on this server (start it with --enable-lora or --lora-modules)",
        ));
    }
    let exists = |st: &AppState| {
        name == st.served_model_name()
            || st
                .adapters
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .by_name
                .contains_key(&name)
    };
    let already = || {
        ApiError::bad_param(
            "lora_name",
            format!("The lora adapter '{name}' has already been loaded."),
        )
    };
    if exists(&st) {
        return Err(already());
    }
    let dir = check_adapter(&st, &name, &body.lora_path).await?;
    let req = st
        .adapters
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .new_request(&name, dir);
    st.engine.add_lora(req.clone()).await?;
    {
        let mut adapters = st.adapters.write().unwrap_or_else(|e| e.into_inner());
        // A concurrent load of the same name may have won.
        if !adapters.by_name.contains_key(&name) {
            adapters.by_name.insert(name.clone(), req);
            tracing::info!(adapter = %name, path = %body.lora_path, "loaded adapter");
            return Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response());
        }
    }
    st.engine.send(Command::RemoveLora(req.id));
    Err(already())
}

/// vLLM's `/v1/unload_lora_adapter`: the name is gone at once; the engine drops the weights
/// when the last request using them finishes.
async fn unload_lora_adapter(
    State(st): State<Arc<AppState>>,
    _: RuntimeLoraUpdating,
    ApiJson(body): ApiJson<UnloadLora>,
) -> ApiResult<Response> {
    let name = body.lora_name;
    let removed = st
        .adapters
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .by_name
        .remove(&name);
    let Some(req) = removed else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("The lora adapter '{name}' cannot be found."),
        )
        .with_param("lora_name"));
    };
    st.engine.send(Command::RemoveLora(req.id));
    tracing::info!(adapter = %name, "unloaded adapter");
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}
