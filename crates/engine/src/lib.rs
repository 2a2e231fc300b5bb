//! multilora's engine: loads Hugging Face Llama-family checkpoints and PEFT LoRA adapters and
//! runs mixed-adapter batches Punica-style — one batched shrink/expand per projection for the
//! whole step — with vLLM's LoRA semantics (`max_loras`, `max_cpu_loras`, `max_lora_rank`).
//!
//! Data flow: a request enters [`engine`], waits in [`scheduler`], gets KV blocks from
//! [`block_manager`], runs on a [`backend`] ([`cpu`] → [`models::llama`], [`lora`]), and leaves
//! through [`sampling`] (held to a schema, regex or grammar by [`structured`] where it asks).

pub mod backend;
pub mod block_manager;
pub mod cpu;
pub mod cuda;
pub mod demo;
pub mod engine;
pub mod error;
pub mod gbnf;
pub mod logprobs;
pub mod lora;
pub mod model_config;
pub mod models;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod structured;
pub mod tp;
pub mod weights;

pub use engine::{
    choice_request_id, Device, EngineConfig, LLMEngine, LoadFormat, Prompt, RequestOutput, StepStats,
};
pub use error::{Error, Result};
pub use logprobs::TokenLogprob;
pub use lora::{AdapterId, LoraRequest};
pub use model_config::ModelConfig;
pub use sampling::SamplingParams;
pub use sequence::FinishReason;
pub use structured::{Constraint, Grammars};
