//! Model definitions. The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) shares one module:
//! their differences are flags in [`crate::ModelConfig`].

pub mod llama;
pub mod rope;
pub mod spec;
