//! The server's one error type: every failure a client can see becomes OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}` with a fitting status. Engine errors map by
//! variant; internal failures are logged and answered without their details. `code` is always
//! what OpenAI's clients type it as: a string (`context_length_exceeded`, ...) or null.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use multilora_engine::Error as EngineError;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    /// OpenAI's machine-readable `code`; null where none fits.
    pub code: Option<&'static str>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A field the server accepts but does not implement, or a value out of range.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Missing or incorrect API key: send `Authorization: Bearer <key>`.",
        )
        .with_code("invalid_api_key")
    }

    /// The server cannot take requests now (shutting down): 503.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_overloaded", message)
    }

    /// The request's headers came but its body did not, within the body read timeout.
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message)
    }

    /// Too many requests are waiting: 429 as OpenAI answers a rate limit, which clients (the
    /// openai packages among them) retry after `Retry-After`.
    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code("rate_limit_exceeded")
    }

    /// An internal failure: logged in full, answered without details.
    pub fn internal(context: &str, err: &dyn std::fmt::Display) -> Self {
        tracing::error!("{context}: {err}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("internal error while {context}; see the server log"),
        )
    }

    /// This error as one of prompt `index` of a request of several: the message names it.
    pub fn in_prompt(mut self, index: usize) -> Self {
        self.message = format!("prompt[{index}]: {}", self.message);
        self.param.get_or_insert_with(|| "prompt".into());
        self
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        res
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::PromptTooLong {
                prompt_len,
                max_tokens,
                max_model_len,
                ..
            } => ApiError::bad_request(format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). Please reduce the length of the prompt or the completion.",
                // The client's max_tokens may be any u64.
                prompt_len.saturating_add(max_tokens)
            ))
            .with_code("context_length_exceeded"),
            EngineError::InvalidSamplingParams { field, msg } => {
                ApiError::bad_param(field, format!("{field}: {msg}"))
            }
            EngineError::InvalidRequest { msg, .. } => ApiError::bad_request(msg),
            e @ (EngineError::AdapterLoad { .. } | EngineError::AdapterRankTooLarge { .. }) => {
                ApiError::bad_request(e.to_string())
            }
            EngineError::Tokenizer { msg, .. } => ApiError::bad_request(msg),
            e => ApiError::internal("running the request", &e),
        }
    }
}
