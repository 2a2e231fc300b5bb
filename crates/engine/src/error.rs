//! The engine's one error type. Every variant names the file, field or value at fault so a
//! caller (the CLI, the server) can print it as is or map it to a status code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A model directory that is not a usable HF checkpoint (bad config field, bad shape, ...).
    #[error("{}: {msg}", path.display())]
    InvalidModel { path: PathBuf, msg: String },
    #[error(
        "{}: unsupported architecture {arch:?}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        path.display()
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{}: missing tensor {name:?}", path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// Anything wrong with a PEFT adapter: missing files, unsupported options, bad shapes.
    #[error("adapter {name:?} ({}): {msg}", path.display())]
    AdapterLoad {
        name: String,
        path: PathBuf,
        msg: String,
    },
    #[error("adapter {name:?} ({}): rank {rank} exceeds max_lora_rank {max_lora_rank}", path.display())]
    AdapterRankTooLarge {
        name: String,
        path: PathBuf,
        rank: usize,
        max_lora_rank: usize,
    },
    #[error("invalid engine config: {0}")]
    InvalidConfig(String),
    #[error("request {request_id:?}: prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds max_model_len {max_model_len}")]
    PromptTooLong {
        request_id: String,
        prompt_len: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("request {request_id:?}: {msg}")]
    InvalidRequest { request_id: String, msg: String },
    #[error("invalid sampling parameter {field}: {msg}")]
    InvalidSamplingParams { field: &'static str, msg: String },
    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("backend: {0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::InvalidModel {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Reads and parses a JSON file, naming the file in any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
