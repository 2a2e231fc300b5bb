//! A request inside the engine: its tokens, KV blocks, adapter and timestamps.

use std::sync::Arc;
use std::time::Instant;

use llguidance::Matcher;
use rand::rngs::StdRng;

use crate::block_manager::BlockId;
use crate::logprobs::TokenLogprob;
use crate::lora::AdapterId;
use crate::sampling::SamplingParams;

/// The engine's internal handle of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Why a request ended, as vLLM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token.
    Stop,
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// Aborted by the caller, or its adapter could not be loaded.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Timestamps of a request, the ones the benchmark reports.
#[derive(Debug, Clone, Copy)]
pub struct RequestMetrics {
    pub arrival_time: Instant,
    pub first_scheduled_time: Option<Instant>,
    pub first_token_time: Option<Instant>,
    pub last_token_time: Option<Instant>,
    /// Times the request lost its KV cache and was recomputed.
    pub num_preemptions: u32,
    /// Steps in which the scheduler passed the request over while waiting (its adapter not yet
    /// in host memory, or `max_loras` taken); at most `max_times_passed_over`.
    pub num_times_passed_over: u32,
    /// How long it waited for its adapter to arrive in host memory (zero if it was there when
    /// the request arrived), as of its first step.
    pub adapter_wait: std::time::Duration,
}

impl RequestMetrics {
    /// A request that arrived at `arrival_time` and has not run yet.
    pub fn new(arrival_time: Instant) -> Self {
        RequestMetrics {
            arrival_time,
            first_scheduled_time: None,
            first_token_time: None,
            last_token_time: None,
            num_preemptions: 0,
            num_times_passed_over: 0,
            adapter_wait: std::time::Duration::ZERO,
        }
    }
}

pub struct Sequence {
    pub request_id: Arc<str>,
    pub prompt_token_ids: Vec<u32>,
    pub output_token_ids: Vec<u32>,
    pub params: SamplingParams,
    pub lora: Option<AdapterId>,
    pub block_table: Vec<BlockId>,
    /// Tokens whose K/V are in the cache.
    pub num_computed_tokens: usize,
    pub rng: StdRng,
    pub metrics: RequestMetrics,
    /// `[prompt_len]` each prompt token's log-probability given the tokens before it, filled
    /// as the prompt's chunks run (the first token has none); empty unless the request asked
    /// for `prompt_logprobs`, and taken with its first output.
    pub prompt_logprobs: Vec<Option<TokenLogprob>>,
    /// Which choice of its request this is (`n` > 1), 0 for the first.
    pub index: usize,
    /// Choices still to fork from this one when its prompt has run (`n - 1` for choice 0 until
    /// its first token, else 0).
    pub num_forks: usize,
    /// Where the output stands in its constraint's grammar (structured outputs), fed each
    /// sampled token; `None` for a free request.
    pub matcher: Option<Matcher>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.prompt_token_ids.len() + self.output_token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn token(&self, i: usize) -> u32 {
        let p = self.prompt_token_ids.len();
        if i < p {
            self.prompt_token_ids[i]
        } else {
            self.output_token_ids[i - p]
        }
    }
}
