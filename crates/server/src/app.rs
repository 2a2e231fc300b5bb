//! The HTTP surface: shared state, the router, the API-key check on `/v1`, our JSON extractor
//! (so malformed bodies get OpenAI's error format too), and the small endpoints: `/health`,
//! `/metrics`, `/v1/models`, `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`.
//! The API key guards every route but `/health` and `/metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use multilora_engine::{AdapterId, LoraRequest};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::chat_template::ChatTemplate;
use crate::engine_loop::{Command, EngineHandle};
use crate::error::{ApiError, ApiResult};
use crate::generate;
use crate::metrics::Metrics;

pub struct AppState {
    pub engine: EngineHandle,
    pub served_model_name: String,
    /// The base model's folder, reported as `root` in `/v1/models`.
    pub model_root: String,
    pub adapters: RwLock<Adapters>,
    pub chat_template: Option<ChatTemplate>,
    pub api_key: Option<String>,
    pub metrics: Arc<Mutex<Metrics>>,
    /// Unix seconds at start-up.
    pub created: u64,
    next_request: AtomicU64,
    pub is_shutting_down: AtomicBool,
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
        served_model_name: String,
        model_root: String,
        adapters: Adapters,
        chat_template: Option<ChatTemplate>,
        api_key: Option<String>,
        metrics: Arc<Mutex<Metrics>>,
    ) -> Self {
        AppState {
            engine,
            served_model_name,
            model_root,
            adapters: RwLock::new(adapters),
            chat_template,
            api_key,
            metrics,
            created: unix_now(),
            next_request: AtomicU64::new(0),
            is_shutting_down: AtomicBool::new(false),
        }
    }

    /// A request id unique in this process: `<prefix>-<start time><counter>`.
    pub fn request_id(&self, prefix: &str) -> String {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:08x}", self.created)
    }

    /// The adapter `model` names, `None` for the base model.
    pub fn resolve_model(&self, model: &str) -> ApiResult<Option<LoraRequest>> {
        if model == self.served_model_name {
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
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route("/tokenize", post(generate::tokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
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
/// [`ApiError`]. The content type is not checked, as clients differ in sending it.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
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

async fn health(State(st): State<Arc<AppState>>) -> StatusCode {
    if st.is_shutting_down.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st
        .metrics
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .render(&st.served_model_name);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// As vLLM lists them: the base model, then each adapter with `parent` the base model and
/// `root` its folder.
async fn list_models(State(st): State<Arc<AppState>>) -> Response {
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
    let mut data = vec![card(&st.served_model_name, &st.model_root, None)];
    let adapters = st.adapters.read().unwrap_or_else(|e| e.into_inner());
    for (name, l) in &adapters.by_name {
        data.push(card(name, &l.path.to_string_lossy(), Some(&st.served_model_name)));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
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

/// vLLM's `/v1/load_lora_adapter`: the adapter is read and checked now, so a broken one fails
/// this call (400) and nothing else.
async fn load_lora_adapter(
    State(st): State<Arc<AppState>>,
    ApiJson(body): ApiJson<LoadLora>,
) -> ApiResult<Response> {
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
        name == st.served_model_name
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
    let req = st
        .adapters
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .new_request(&name, PathBuf::from(&body.lora_path));
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
