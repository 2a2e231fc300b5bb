//! The engine, in the spirit of vLLM's `LLMEngine`: `add_request`, `step`,
//! `has_unfinished_requests`. A step schedules, activates the step's adapters in device slots,
//! packs every scheduled token into one [`StepBatch`], runs the backend once, and samples: on
//! the device where the backend can (CUDA), else on the host ([`Sampler`], the CPU oracle).
//! A step in which a request wants log-probabilities ([`crate::logprobs`]) samples on the
//! host, from the raw logits; a request of `n` choices forks its other choices from the first
//! when its prompt has run ([`LLMEngine::step`]), sharing the prompt's KV blocks. A step with
//! a constrained request ([`crate::structured`]) samples on the host too, each such row's
//! grammar mask computed on other threads while the model runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::backend::{Backend, BackendConfig, KvBudget, RowSampling, StepBatch};
use crate::block_manager::BlockManager;
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::logprobs::{token_logprob, LogprobScratch, TokenLogprob};
use crate::lora::manager::{AdapterLoader, DiskLoader, LoraConfig, LoraManager, LoraStats, PreparingLoader};
use crate::lora::{AdapterId, LoraRequest, LoraSlot, LoraTargets};
use crate::sampling::{bad_word_bans, keep_allowed, request_rng, Sampler, SamplingParams};
use crate::scheduler::{ScheduledSeq, Scheduler, SchedulerConfig};
use crate::sequence::{FinishReason, RequestMetrics, SeqId, Sequence};
use crate::structured::{allows_only, apply_mask, Grammars};
use crate::tp::Sharding;
use crate::weights::WeightSource;
use crate::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// Safetensors from the model directory.
    #[default]
    Auto,
    /// Random weights from `config.json` alone.
    Dummy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// Engine settings, with vLLM's names and defaults where vLLM has them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: PathBuf,
    /// Defaults to `model`.
    pub tokenizer: Option<PathBuf>,
    pub load_format: LoadFormat,
    pub device: Device,
    /// `auto`, `float32`, `float16`, `bfloat16` (and vLLM's aliases `half`, `float`). The CPU
    /// backend keeps weight matrices in this dtype (`auto`: the checkpoint's `torch_dtype`,
    /// else the dtype its embedding is stored in; a dummy model without `torch_dtype` is
    /// float32), read in place from the checkpoint when it is stored so, and computes in f32
    /// (activations, LoRA weights, KV cache). The CUDA backend stores weights,
    /// activations, LoRA weights and the KV cache as bf16 or f16 (`auto`: the checkpoint's
    /// `torch_dtype`) and runs float32 as bf16, with a warning. [`ResolvedEngine::dtype`] says
    /// what ran.
    pub dtype: String,
    /// Defaults to the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    /// Tokens per step. Defaults to `max(max_model_len, 2048)`; must be at least
    /// `max_num_seqs` (as in vLLM). Below `max_model_len`, long prompts are prefilled in
    /// chunks over several steps (chunked prefill, see the scheduler).
    pub max_num_batched_tokens: Option<usize>,
    /// Most prompt tokens one sequence computes in a step (vLLM's
    /// `long_prefill_token_threshold`); 0, the default: only `max_num_batched_tokens` bounds
    /// it. Lets a long prompt arrive without stretching the running decodes' steps, while the
    /// budget stays large for many short prompts.
    pub long_prefill_token_threshold: usize,
    pub block_size: usize,
    /// Memory for the KV cache; defaults to what `max_num_seqs` full-length sequences need,
    /// capped at 4 GiB (vLLM's CPU default).
    pub kv_cache_memory_bytes: Option<usize>,
    /// Exact number of KV blocks (vLLM's `num_gpu_blocks_override`), for tests and tuning.
    pub num_gpu_blocks_override: Option<usize>,
    pub gpu_memory_utilization: f32,
    /// Ranks the model is split over, Megatron-style ([`crate::tp`]): heads, KV heads and the
    /// intermediate size must divide (or be divided by, for KV heads). The CPU backend runs the
    /// ranks one after another in this process (the oracle for the split: same results, not
    /// faster); the CUDA backend runs on one GPU and refuses more than 1.
    pub tensor_parallel_size: usize,
    pub enforce_eager: bool,
    pub enable_lora: bool,
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// Defaults to `max_loras`.
    pub max_cpu_loras: Option<usize>,
    /// The projections adapters may target (vLLM's `lora_target_modules`): PEFT names
    /// (`q_proj`, …) or vLLM's packed `qkv_proj` / `gate_up_proj`. `None`: all seven. An
    /// adapter that targets another fails to load, naming it.
    pub lora_target_modules: Option<Vec<String>>,
    /// Steps in which a waiting request may be passed over (its adapter still loading, or
    /// `max_loras` taken by others) while requests behind it are admitted; after that nothing
    /// behind it is admitted before it (see the scheduler). Not a vLLM setting.
    pub max_times_passed_over: u32,
    /// Reads adapters into host memory on the loader threads; `None`: [`DiskLoader`]. Tests
    /// inject a slow or failing one here.
    pub adapter_loader: Option<Arc<dyn AdapterLoader>>,
    /// GPU: wait for each adapter's copy into its device slot instead of ordering it with
    /// events (the reference the overlapped copies are tested against).
    pub sync_lora_uploads: bool,
    /// Tests hold the token table's build (structured outputs, built on a thread of its own)
    /// at this barrier until they wait on it too, to show what runs without the table.
    #[doc(hidden)]
    pub hold_token_table: Option<Arc<std::sync::Barrier>>,
    pub seed: u64,
    /// Also copy each step's logits to the host where the backend samples on the device, so
    /// [`LLMEngine::last_logits`] answers (tests, debugging); costs a `[num_seqs, vocab]` copy
    /// per step. Host sampling always keeps them.
    pub return_logits: bool,
    /// The CUDA backend's tuning switches (defaults: what measured fastest).
    pub cuda: crate::cuda::CudaOptions,
}

impl EngineConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineConfig {
            model: model.into(),
            tokenizer: None,
            load_format: LoadFormat::Auto,
            device: Device::Cpu,
            dtype: "auto".into(),
            max_model_len: None,
            max_num_seqs: 256,
            max_num_batched_tokens: None,
            long_prefill_token_threshold: 0,
            block_size: 16,
            kv_cache_memory_bytes: None,
            num_gpu_blocks_override: None,
            gpu_memory_utilization: 0.9,
            tensor_parallel_size: 1,
            enforce_eager: false,
            enable_lora: false,
            max_loras: 1,
            max_lora_rank: 16,
            max_cpu_loras: None,
            lora_target_modules: None,
            max_times_passed_over: 64,
            adapter_loader: None,
            sync_lora_uploads: false,
            hold_token_table: None,
            seed: 0,
            return_logits: false,
            cuda: Default::default(),
        }
    }
}

/// A prompt as text (needs the model's tokenizer) or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

/// What a step produced for one request: the token it generated, and on the last step the
/// whole output.
#[derive(Debug, Clone)]
pub struct RequestOutput {
    pub request_id: Arc<str>,
    pub token_id: Option<u32>,
    pub finish_reason: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    pub num_output_tokens: usize,
    /// Which choice of its request this is (`n` > 1; 0 for the first): the others ran only
    /// the prompt's tail, sharing the first's blocks.
    pub choice_index: usize,
    /// All output tokens, when finished.
    pub output_token_ids: Vec<u32>,
    pub metrics: RequestMetrics,
    /// Why an aborted request ended, when the engine ended it: its adapter failed to load.
    pub error: Option<String>,
    /// The log-probability of `token_id` and its alternatives, when the request asked for
    /// `logprobs`.
    pub logprobs: Option<TokenLogprob>,
    /// `[num_prompt_tokens]` with the first output, when the request asked for
    /// `prompt_logprobs`: each prompt token's log-probability (`None` for the first).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

impl RequestOutput {
    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// What the last step did, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub num_seqs: usize,
    pub num_prefill_tokens: usize,
    /// Of `num_prefill_tokens`, those in chunks of a prompt whose prefill spans several steps
    /// (chunked prefill: the prompt did not fit what was left of `max_num_batched_tokens`).
    pub num_chunked_prefill_tokens: usize,
    /// Sequences whose chunk stopped short of their last token: they produced no token.
    pub num_partial_prefills: usize,
    pub num_decode_tokens: usize,
    pub num_preempted: usize,
    pub num_loras: usize,
    /// Time of the model forward and sampling (wall time on the CPU).
    pub duration: Duration,
    /// Device time of the forward (and of sampling where the device samples), from device
    /// events (CUDA backend only).
    pub device_time: Option<Duration>,
}

/// Settings resolved at start-up, for reports.
#[derive(Debug, Clone)]
pub struct ResolvedEngine {
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub long_prefill_token_threshold: usize,
    pub num_kv_blocks: usize,
    pub block_size: usize,
    pub lora: Option<LoraConfig>,
    /// What weights are stored as: on the CPU the weight matrices' dtype (activations are f32),
    /// on the GPU `bfloat16` or `float16` (activations too).
    pub dtype: &'static str,
}

pub struct LLMEngine {
    model_config: ModelConfig,
    resolved: ResolvedEngine,
    /// Shared with the thread that builds the token table.
    tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// Compiles requests' constraints; the error says why this model cannot have them.
    grammars: Grammars,
    backend: Box<dyn Backend>,
    scheduler: Scheduler,
    blocks: BlockManager,
    lora: Option<LoraManager>,
    seqs: HashMap<SeqId, Sequence>,
    ids: HashMap<Arc<str>, SeqId>,
    next_seq: u64,
    rng: StdRng,
    sampler: Sampler,
    batch: StepBatch,
    // step scratch, reused
    scheduled: Vec<ScheduledSeq>,
    /// `[num_seqs]` whether each scheduled sequence reaches its last token this step and so
    /// samples one; false for a chunk that stops inside the prompt (chunked prefill)
    is_sampling: Vec<bool>,
    step_loras: Vec<AdapterId>,
    step_slots: Vec<LoraSlot>,
    /// `[num_seqs]` token of each scheduled sequence
    sampled: Vec<u32>,
    /// `[num_seqs]` the grammar mask of each constrained row that samples this step
    masks: Vec<Option<SimpleVob>>,
    /// `[num_seqs]` the sampled token's log-probability, for rows that asked
    sampled_logprobs: Vec<Option<TokenLogprob>>,
    logprob_scratch: LogprobScratch,
    /// `[vocab]` a row's raw logits, kept for its logprobs while the sampler masks the row
    raw_row: Vec<f32>,
    /// A row's allowed logits while the rest of it is masked (`allowed_token_ids`).
    allowed_scratch: Vec<(u32, f32)>,
    /// `[num_rows]` (step token index, scheduled index, position) of each prompt token whose
    /// logits the step's prompt logprobs need besides the sequences' last tokens
    prompt_rows: Vec<(u32, usize, usize)>,
    token_rows: Vec<u32>,
    return_logits: bool,
    /// `[num_seqs, vocab]` logits of the last step, as the sampler saw them; empty where the
    /// device sampled and `return_logits` is off
    logits: Vec<f32>,
    /// request of each row of `logits`; `None` for a row that sampled nothing (a prompt chunk)
    logits_rows: Vec<Option<Arc<str>>>,
    last_step: StepStats,
    /// The last step ran nothing, and no request arrived since.
    is_stalled: bool,
}

impl LLMEngine {
    pub fn new(config: EngineConfig) -> Result<Self> {
        let model_config = ModelConfig::from_dir(&config.model)?;
        let max_model_len = config
            .max_model_len
            .unwrap_or(model_config.max_position_embeddings);
        if max_model_len == 0 {
            return Err(Error::InvalidConfig("max_model_len must be at least 1".into()));
        }
        if config.max_num_seqs == 0 {
            return Err(Error::InvalidConfig("max_num_seqs must be at least 1".into()));
        }
        if config.block_size == 0 {
            return Err(Error::InvalidConfig("block_size must be at least 1".into()));
        }
        let max_num_batched_tokens = config.max_num_batched_tokens.unwrap_or(max_model_len.max(2048));
        // Every running sequence's decode token fits a step (vLLM refuses the same).
        if max_num_batched_tokens < config.max_num_seqs {
            return Err(Error::InvalidConfig(format!(
                "max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs ({})",
                config.max_num_seqs
            )));
        }
        const DTYPES: [&str; 6] = ["auto", "float32", "float16", "bfloat16", "half", "float"];
        if !DTYPES.contains(&config.dtype.as_str()) {
            return Err(Error::InvalidConfig(format!(
                "dtype {:?} is not one of {}",
                config.dtype,
                DTYPES.join(", ")
            )));
        }
        // Checked before anything loads; each backend says what it does with the ranks.
        let sharding = Sharding::new(&model_config, config.tensor_parallel_size)?;
        if !(config.gpu_memory_utilization > 0.0 && config.gpu_memory_utilization <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "gpu_memory_utilization {} must be in (0, 1]",
                config.gpu_memory_utilization
            )));
        }
        let blocks_per_seq = max_model_len.div_ceil(config.block_size);

        let lora_cfg = if config.enable_lora {
            Some(LoraConfig {
                max_loras: config.max_loras,
                max_lora_rank: config.max_lora_rank,
                max_cpu_loras: config.max_cpu_loras.unwrap_or(config.max_loras),
                target_modules: match &config.lora_target_modules {
                    Some(names) => LoraTargets::parse(names)?,
                    None => LoraTargets::ALL,
                },
            })
        } else {
            None
        };
        if let Some(c) = &lora_cfg {
            c.check()?;
        }

        let tokenizer_path = config.tokenizer.clone().unwrap_or_else(|| config.model.clone());
        let tokenizer = load_tokenizer(&tokenizer_path)?.map(Arc::new);
        let grammars = match &tokenizer {
            None => Grammars::unavailable("the model has no tokenizer.json".into()),
            Some(t) => Grammars::spawn(
                t.clone(),
                model_config.vocab_size,
                model_config.eos_token_ids.clone(),
                config.hold_token_table.clone(),
            ),
        };

        let mut weights = match config.load_format {
            LoadFormat::Auto => WeightSource::open(&config.model)?,
            LoadFormat::Dummy => WeightSource::dummy(config.seed),
        };
        let bc = BackendConfig {
            max_num_batched_tokens,
            max_num_seqs: config.max_num_seqs,
            max_model_len,
            block_size: config.block_size,
            kv: KvBudget {
                wanted_blocks: config.max_num_seqs * blocks_per_seq,
                num_blocks_override: config.num_gpu_blocks_override,
                memory_bytes: config.kv_cache_memory_bytes,
                gpu_memory_utilization: config.gpu_memory_utilization,
            },
            max_loras: lora_cfg.map_or(0, |c| c.max_loras),
            max_lora_rank: lora_cfg.map_or(0, |c| c.max_lora_rank),
            tensor_parallel_size: sharding.size,
            enforce_eager: config.enforce_eager,
            sync_lora_uploads: config.sync_lora_uploads,
            dtype: config.dtype.clone(),
            seed: config.seed,
            cuda: config.cuda.clone(),
        };
        let backend: Box<dyn Backend> = match config.device {
            Device::Cpu => Box::new(CpuBackend::new(&model_config, &mut weights, &bc)?),
            Device::Cuda => Box::new(crate::cuda::CudaBackend::new(&model_config, &mut weights, &bc)?),
        };
        drop(weights);
        // The backend sized its KV cache from what its weights and buffers left.
        let kv = backend.kv_cache();
        let num_kv_blocks = kv.num_blocks;
        if num_kv_blocks < blocks_per_seq {
            return Err(Error::InvalidConfig(format!(
                "the KV cache holds {num_kv_blocks} blocks of {} tokens, fewer than one sequence of max_model_len {max_model_len} needs ({blocks_per_seq}); give it more memory (gpu_memory_utilization {}, kv_cache_memory_bytes, num_gpu_blocks_override) or lower max_model_len",
                config.block_size, config.gpu_memory_utilization
            )));
        }
        tracing::info!(
            "KV cache: {num_kv_blocks} blocks of {} tokens ({:.2} GiB); {} sequences of max_model_len {max_model_len} fit at once (max_num_seqs {})",
            config.block_size,
            (num_kv_blocks * kv.bytes_per_block) as f64 / (1u64 << 30) as f64,
            num_kv_blocks / blocks_per_seq,
            config.max_num_seqs
        );
        // The backend's conversion of adapters runs with their loads, off the step.
        let mut loader = (config.adapter_loader.clone()).unwrap_or_else(|| Arc::new(DiskLoader));
        if let Some(preparer) = backend.adapter_preparer() {
            loader = Arc::new(PreparingLoader {
                inner: loader,
                preparer,
            });
        }
        let lora = (lora_cfg.map(|c| LoraManager::new(c, &model_config, loader))).transpose()?;

        let mut batch = StepBatch {
            max_blocks_per_seq: blocks_per_seq,
            ..Default::default()
        };
        batch.clear();
        Ok(LLMEngine {
            resolved: ResolvedEngine {
                max_model_len,
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens,
                long_prefill_token_threshold: config.long_prefill_token_threshold,
                num_kv_blocks,
                block_size: config.block_size,
                lora: lora_cfg,
                dtype: backend.dtype(),
            },
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens,
                max_loras: lora_cfg.map_or(0, |c| c.max_loras),
                max_times_passed_over: config.max_times_passed_over,
                long_prefill_token_threshold: config.long_prefill_token_threshold,
            }),
            blocks: BlockManager::new(num_kv_blocks, config.block_size),
            model_config,
            tokenizer,
            grammars,
            backend,
            lora,
            seqs: HashMap::new(),
            ids: HashMap::new(),
            next_seq: 0,
            rng: StdRng::seed_from_u64(config.seed),
            sampler: Sampler::default(),
            batch,
            scheduled: Vec::new(),
            is_sampling: Vec::new(),
            step_loras: Vec::new(),
            step_slots: Vec::new(),
            sampled: Vec::new(),
            masks: Vec::new(),
            sampled_logprobs: Vec::new(),
            logprob_scratch: LogprobScratch::default(),
            raw_row: Vec::new(),
            allowed_scratch: Vec::new(),
            prompt_rows: Vec::new(),
            token_rows: Vec::new(),
            return_logits: config.return_logits,
            logits: Vec::new(),
            logits_rows: Vec::new(),
            last_step: StepStats::default(),
            is_stalled: false,
        })
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    pub fn resolved(&self) -> &ResolvedEngine {
        &self.resolved
    }

    pub fn tokenizer(&self) -> Option<&tokenizers::Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// What compiles requests' constraints for this model; [`Grammars::available`] says why
    /// it has none (no tokenizer, a vocabulary not readable as bytes, no EOS token).
    pub fn grammars(&self) -> &Grammars {
        &self.grammars
    }

    pub fn device_name(&self) -> String {
        self.backend.device_name()
    }

    pub fn lora_stats(&self) -> Option<LoraStats> {
        self.lora.as_ref().map(|l| l.stats)
    }

    pub fn lora_manager(&self) -> Option<&LoraManager> {
        self.lora.as_ref()
    }

    pub fn last_step_stats(&self) -> StepStats {
        self.last_step
    }

    /// The logits a request's last sampled token was drawn from (after EOS/stop masking), if
    /// it ran in the last step and the step kept logits on the host (host sampling, or
    /// `return_logits`). For tests and debugging.
    pub fn last_logits(&self, request_id: &str) -> Option<&[f32]> {
        let vocab = self.model_config.vocab_size;
        let i = self
            .logits_rows
            .iter()
            .position(|r| r.as_deref() == Some(request_id))?;
        self.logits.get(i * vocab..(i + 1) * vocab)
    }

    pub fn num_waiting(&self) -> usize {
        self.scheduler.num_waiting()
    }

    /// KV-cache blocks no sequence holds.
    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    pub fn num_running(&self) -> usize {
        self.scheduler.num_running()
    }

    /// Waiting requests whose adapter is not in host memory yet (loading, or to be loaded when
    /// the host cache has room): a gauge for `/metrics`.
    pub fn num_waiting_for_adapter(&self) -> usize {
        let Some(lora) = &self.lora else { return 0 };
        (self.scheduler.waiting_loras(&self.seqs))
            .filter(|a| a.is_some_and(|a| !lora.is_ready(a)))
            .count()
    }

    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    /// Tokenizes text with the model's tokenizer (special tokens such as BOS added as the
    /// tokenizer's post-processor says).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
            path: self.resolved_tokenizer_hint(),
            msg: "the model has no tokenizer.json; pass prompt token ids".into(),
        })?;
        tok.encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.resolved_tokenizer_hint(),
                msg: e.to_string(),
            })
    }

    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        self.tokenizer.as_ref().and_then(|t| t.decode(ids, true).ok())
    }

    fn resolved_tokenizer_hint(&self) -> PathBuf {
        PathBuf::from("tokenizer.json")
    }

    /// Queues a request. Everything a caller can get wrong is checked here: unknown or broken
    /// adapter, bad sampling values, a prompt that cannot fit `max_model_len`.
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: SamplingParams,
        lora: Option<&LoraRequest>,
    ) -> Result<()> {
        let invalid = |msg: String| Error::InvalidRequest {
            request_id: request_id.to_string(),
            msg,
        };
        params.validate()?;
        if (0..params.n).any(|i| self.ids.contains_key(choice_request_id(request_id, i).as_str())) {
            return Err(invalid("a request with this id is already running".into()));
        }
        let prompt_token_ids = match prompt {
            Prompt::Text(t) => self.encode(&t)?,
            Prompt::TokenIds(ids) => ids,
        };
        if prompt_token_ids.is_empty() {
            return Err(invalid("the prompt is empty".into()));
        }
        let vocab = self.model_config.vocab_size;
        if let Some(&bad) = prompt_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let allowed = params.allowed_token_ids.as_deref().unwrap_or_default();
        let bad_words = params.bad_words_token_ids.iter().flatten();
        for (field, mut ids) in [
            (
                "allowed_token_ids",
                Box::new(allowed.iter()) as Box<dyn Iterator<Item = &u32>>,
            ),
            ("bad_words", Box::new(bad_words)),
        ] {
            if let Some(&bad) = ids.find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidSamplingParams {
                    field,
                    msg: format!("token id {bad} is outside the vocabulary (size {vocab})"),
                });
            }
        }
        let max_model_len = self.resolved.max_model_len;
        // Checked: a client's max_tokens may be any u64, and a wrapped sum would pass.
        let total_len = prompt_token_ids.len().checked_add(params.max_tokens);
        if total_len.is_none_or(|n| n > max_model_len) {
            return Err(Error::PromptTooLong {
                request_id: request_id.to_string(),
                prompt_len: prompt_token_ids.len(),
                max_tokens: params.max_tokens,
                max_model_len,
            });
        }
        let adapter = match lora {
            None => None,
            Some(req) => {
                let pinned: Vec<AdapterId> = self.scheduler.running_loras(&self.seqs).collect();
                let manager = self.lora.as_mut().ok_or_else(|| {
                    invalid(format!(
                        "asks for adapter {:?} but LoRA is not enabled (enable_lora)",
                        req.name
                    ))
                })?;
                manager.register(req, &pinned)?;
                Some(req.id)
            }
        };
        let matcher = match &params.constraint {
            None => None,
            Some(c) => {
                let bad = |msg| Error::InvalidSamplingParams {
                    field: "constraint",
                    msg,
                };
                Some(self.grammars.matcher(c).map_err(bad)?)
            }
        };
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let request_id: Arc<str> = request_id.into();
        let rng = request_rng(params.seed, &mut self.rng);
        let params_n = params.n;
        let prompt_logprobs = match params.prompt_logprobs {
            Some(_) => vec![None; prompt_token_ids.len()],
            None => Vec::new(),
        };
        self.seqs.insert(
            id,
            Sequence {
                request_id: request_id.clone(),
                prompt_token_ids,
                output_token_ids: Vec::with_capacity(params.max_tokens.min(max_model_len)),
                params,
                lora: adapter,
                block_table: Vec::new(),
                num_computed_tokens: 0,
                rng,
                metrics: RequestMetrics::new(Instant::now()),
                prompt_logprobs,
                index: 0,
                num_forks: params_n - 1,
                matcher,
            },
        );
        self.ids.insert(request_id, id);
        self.scheduler.add(id);
        self.is_stalled = false;
        Ok(())
    }

    /// Aborts a request; returns false if it is unknown or already finished.
    pub fn abort_request(&mut self, request_id: &str) -> bool {
        let Some(id) = self.ids.remove(request_id) else {
            return false;
        };
        self.scheduler.remove(id);
        if let Some(mut seq) = self.seqs.remove(&id) {
            self.blocks.free(&mut seq.block_table);
        }
        true
    }

    /// Registers an adapter and loads it now (vLLM's `add_lora`), so that a broken adapter fails
    /// this call rather than a later request. Requests may then name it.
    pub fn add_lora(&mut self, lora: &LoraRequest) -> Result<()> {
        let pinned: Vec<AdapterId> = self.scheduler.running_loras(&self.seqs).collect();
        let manager = self.lora.as_mut().ok_or_else(|| {
            Error::InvalidConfig(format!(
                "cannot add adapter {:?}: LoRA is not enabled (enable_lora)",
                lora.name
            ))
        })?;
        manager.register(lora, &pinned)
    }

    /// Forgets an adapter; requests using it must have finished. False if unknown.
    pub fn remove_lora(&mut self, id: AdapterId) -> bool {
        let in_use = self.seqs.values().any(|s| s.lora == Some(id));
        !in_use && self.lora.as_mut().is_some_and(|l| l.remove(id))
    }

    /// Runs one step: schedule, run the model on every scheduled token, sample one token per
    /// scheduled sequence that reached its last token (a prompt chunk short of the end samples
    /// nothing). Returns one output per sequence that produced a token or finished.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let mut outputs = Vec::new();
        // Adapters that finished loading join the host cache; a failed load ends its requests.
        if let Some(lora) = self.lora.as_mut() {
            // Nothing ran last step and nothing arrived since: only a load can change that, so
            // wait a little for one rather than let the caller spin (a little, so a request
            // that arrives meanwhile is not held up).
            let failed = lora.poll(self.is_stalled.then_some(Duration::from_millis(5)));
            for (adapter, err) in failed {
                tracing::error!(adapter = adapter.0, "aborting its requests: {err}");
                self.abort_adapter(adapter, &err.to_string(), &mut outputs);
            }
        }
        let lora = self.lora.as_ref();
        let is_ready = |a: AdapterId| lora.is_some_and(|l| l.is_ready(a));
        let schedule = self
            .scheduler
            .schedule(&mut self.seqs, &mut self.blocks, &is_ready);
        let num_preempted = schedule.preempted.len();
        if num_preempted > 0 {
            tracing::debug!(num_preempted, "KV cache full: preempted sequences for recompute");
        }
        // Reuse the buffer across steps (taken so `self` stays borrowable below).
        let mut scheduled = std::mem::take(&mut self.scheduled);
        scheduled.clear();
        scheduled.extend_from_slice(&schedule.scheduled);
        let now = Instant::now();
        for s in &scheduled {
            let seq = self.seqs.get_mut(&s.id).expect("scheduled seq exists");
            if seq.metrics.first_scheduled_time.is_none() {
                seq.metrics.first_scheduled_time = Some(now);
                // It waited for its adapter if the adapter arrived in host memory after it did.
                let ready_at = seq.lora.and_then(|a| lora.and_then(|l| l.ready_at(a)));
                if let Some(t) = ready_at {
                    seq.metrics.adapter_wait = t.saturating_duration_since(seq.metrics.arrival_time);
                }
            }
        }
        // Loads for what the waiting queue will need, while this step runs.
        if let Some(lora) = self.lora.as_mut() {
            let mut pinned: Vec<AdapterId> = self.scheduler.running_loras(&self.seqs).collect();
            // Distinct: the load window is what the host cache holds beyond these.
            pinned.sort_unstable();
            pinned.dedup();
            lora.prefetch(self.scheduler.waiting_loras(&self.seqs).flatten(), &pinned);
        }
        self.is_stalled = scheduled.is_empty();
        if scheduled.is_empty() {
            self.last_step = StepStats {
                num_preempted,
                ..Default::default()
            };
            self.scheduled = scheduled;
            return Ok(outputs);
        }

        // Adapters of this step into device slots; all are in host memory.
        self.step_loras.clear();
        for s in &scheduled {
            if let Some(a) = self.seqs[&s.id].lora {
                if !self.step_loras.contains(&a) {
                    self.step_loras.push(a);
                }
            }
        }
        if let Some(lora) = self.lora.as_mut() {
            lora.activate(&self.step_loras, self.backend.as_mut(), &mut self.step_slots)?;
        }

        // Pack the step.
        let start = Instant::now();
        let b = &mut self.batch;
        b.clear();
        let bs = self.blocks.block_size();
        let (mut num_prefill_tokens, mut num_decode_tokens, mut num_chunked_prefill_tokens) = (0, 0, 0);
        self.is_sampling.clear();
        for s in &scheduled {
            let seq = &self.seqs[&s.id];
            let slot = seq.lora.map(|a| {
                let i = self.step_loras.iter().position(|&x| x == a).expect("activated");
                self.step_slots[i]
            });
            let first = seq.num_computed_tokens;
            for pos in first..first + s.num_new_tokens {
                b.token_ids.push(seq.token(pos));
                b.positions.push(pos as u32);
                b.slot_mapping
                    .push(seq.block_table[pos / bs].0 * bs as u32 + (pos % bs) as u32);
                b.token_lora.push(slot);
            }
            b.query_start.push(b.token_ids.len() as u32);
            let start_len = b.block_tables.len();
            b.block_tables.extend(seq.block_table.iter().map(|x| x.0));
            b.block_tables.resize(start_len + b.max_blocks_per_seq, 0);
            let end = first + s.num_new_tokens;
            let is_sampling = end == seq.len();
            self.is_sampling.push(is_sampling);
            if is_sampling && s.num_new_tokens == 1 && first >= seq.prompt_token_ids.len() {
                num_decode_tokens += 1;
            } else {
                num_prefill_tokens += s.num_new_tokens;
                if first > 0 || !is_sampling {
                    num_chunked_prefill_tokens += s.num_new_tokens;
                }
            }
            // EOS and stop ids are suppressed until min_tokens; a row that samples nothing
            // needs none (and takes no room in the device's banned-id buffer).
            let p = &seq.params;
            let is_banning = is_sampling && seq.output_token_ids.len() < p.min_tokens;
            let eos = (is_banning && !p.ignore_eos).then_some(&self.model_config.eos_token_ids);
            let stop = is_banning.then_some(&p.stop_token_ids);
            let banned = eos.into_iter().chain(stop).flatten().copied();
            let bad_words = is_sampling.then_some(&p.bad_words_token_ids);
            let bad_words = bad_words
                .into_iter()
                .flat_map(|w| bad_word_bans(w, &seq.output_token_ids));
            b.sampling.push(RowSampling::new(p), banned.chain(bad_words));
        }

        self.sample_step(&scheduled)?;
        let now = Instant::now();
        for (i, s) in scheduled.iter().enumerate() {
            if self.is_sampling[i] && self.seqs[&s.id].num_forks > 0 {
                self.fork_choices(s.id);
            }
            let seq = self.seqs.get_mut(&s.id).expect("scheduled seq exists");
            seq.num_computed_tokens += s.num_new_tokens;
            if !self.is_sampling[i] {
                // A prompt chunk short of the end: its K/V are cached, nothing else happens.
                continue;
            }
            let p = &seq.params;
            let token = self.sampled[i];
            let prompt_logprobs = (seq.output_token_ids.is_empty() && p.prompt_logprobs.is_some())
                .then(|| std::mem::take(&mut seq.prompt_logprobs));
            seq.output_token_ids.push(token);
            seq.metrics.first_token_time.get_or_insert(now);
            seq.metrics.last_token_time = Some(now);
            let n_out = seq.output_token_ids.len();
            let is_eos = self.model_config.eos_token_ids.contains(&token);
            let is_stop_token =
                n_out >= p.min_tokens && ((!p.ignore_eos && is_eos) || p.stop_token_ids.contains(&token));
            // A constrained sequence's grammar sees every token but one that ends it anyway.
            let finish = if is_stop_token
                || (seq.matcher.as_mut()).is_some_and(|m| is_grammar_done(m, token, is_eos))
            {
                Some(FinishReason::Stop)
            } else if n_out >= p.max_tokens || seq.len() >= self.resolved.max_model_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            let mut out = RequestOutput {
                request_id: seq.request_id.clone(),
                token_id: Some(token),
                finish_reason: finish,
                num_prompt_tokens: seq.prompt_token_ids.len(),
                num_output_tokens: n_out,
                choice_index: seq.index,
                output_token_ids: Vec::new(),
                metrics: seq.metrics,
                error: None,
                logprobs: self.sampled_logprobs[i].take(),
                prompt_logprobs,
            };
            if finish.is_some() {
                let mut seq = self.seqs.remove(&s.id).expect("exists");
                self.scheduler.remove(s.id);
                self.blocks.free(&mut seq.block_table);
                self.ids.remove(&seq.request_id);
                out.output_token_ids = seq.output_token_ids;
            }
            outputs.push(out);
        }
        self.last_step = StepStats {
            num_seqs: scheduled.len(),
            num_prefill_tokens,
            num_chunked_prefill_tokens,
            num_partial_prefills: self.is_sampling.iter().filter(|&&x| !x).count(),
            num_decode_tokens,
            num_preempted,
            num_loras: self.step_loras.len(),
            duration: start.elapsed(),
            device_time: self.backend.last_device_time(),
        };
        self.scheduled = scheduled;
        Ok(outputs)
    }

    /// Forks the other choices of `parent`'s request (`n` > 1), now that its prompt's K/V are
    /// in the cache: each shares the prompt's full blocks short of the last prompt token, and
    /// computes the rest of the prompt (under a block) itself, to draw its own first token.
    /// They wait at the front of the queue. Prompt logprobs are the first choice's, copied
    /// (the few positions a fork recomputes come out the same).
    fn fork_choices(&mut self, parent: SeqId) {
        let bs = self.blocks.block_size();
        let p = self.seqs.get_mut(&parent).expect("forking seq exists");
        let num_forks = std::mem::take(&mut p.num_forks);
        let num_shared = (p.prompt_token_ids.len() - 1) / bs;
        let (request_id, prompt, lora, arrival) = (
            p.request_id.clone(),
            p.prompt_token_ids.clone(),
            p.lora,
            p.metrics.arrival_time,
        );
        let params = SamplingParams {
            n: 1,
            ..p.params.clone()
        };
        // Complete by now (the prompt ran); each choice reports them with its first token.
        let prompt_logprobs = p.prompt_logprobs.clone();
        // Still at the grammar's start: the first token is consumed after the forks.
        let matcher = p.matcher.as_ref().map(Matcher::deep_clone);
        let table: Vec<_> = p.block_table[..num_shared].to_vec();
        let mut children = Vec::with_capacity(num_forks);
        for index in 1..=num_forks {
            let id = SeqId(self.next_seq);
            self.next_seq += 1;
            let child_id: Arc<str> = choice_request_id(&request_id, index).into();
            let seed = params.seed.map(|s| s.wrapping_add(index as u64));
            let child = Sequence {
                request_id: child_id.clone(),
                prompt_token_ids: prompt.clone(),
                output_token_ids: Vec::with_capacity(params.max_tokens.min(self.resolved.max_model_len)),
                params: SamplingParams {
                    seed,
                    ..params.clone()
                },
                lora,
                block_table: self.blocks.fork(&table, num_shared),
                num_computed_tokens: num_shared * bs,
                rng: request_rng(seed, &mut self.rng),
                metrics: RequestMetrics::new(arrival),
                prompt_logprobs: prompt_logprobs.clone(),
                index,
                num_forks: 0,
                matcher: matcher.as_ref().map(Matcher::deep_clone),
            };
            self.seqs.insert(id, child);
            self.ids.insert(child_id, id);
            children.push(id);
        }
        self.scheduler.add_front(&children);
    }

    /// Ends every request of an adapter that failed to load (waiting ones: a running request's
    /// adapter is in host memory), with `error`; the other requests carry on.
    fn abort_adapter(&mut self, adapter: AdapterId, error: &str, outputs: &mut Vec<RequestOutput>) {
        let mut ids: Vec<SeqId> = (self.seqs.iter())
            .filter(|(_, s)| s.lora == Some(adapter))
            .map(|(&id, _)| id)
            .collect();
        ids.sort();
        for id in ids {
            let mut seq = self.seqs.remove(&id).expect("listed above");
            self.scheduler.remove(id);
            self.blocks.free(&mut seq.block_table);
            self.ids.remove(&seq.request_id);
            outputs.push(RequestOutput {
                request_id: seq.request_id.clone(),
                token_id: None,
                finish_reason: Some(FinishReason::Abort),
                num_prompt_tokens: seq.prompt_token_ids.len(),
                num_output_tokens: seq.output_token_ids.len(),
                choice_index: seq.index,
                output_token_ids: seq.output_token_ids,
                metrics: seq.metrics,
                error: Some(error.to_string()),
                logprobs: None,
                prompt_logprobs: None,
            });
        }
    }

    /// Fills the prompt logprobs of this step's prompt chunks, after a host-sampled forward:
    /// the token at position p scores prompt token p + 1. A chunk's last token is its
    /// sequence's logits row (unmasked: a chunk short of the prompt's end samples nothing; at
    /// the end it scores the first output instead); the others come from the backend,
    /// `max_num_seqs` rows at a time.
    fn prompt_logprobs(&mut self, scheduled: &[ScheduledSeq]) -> Result<()> {
        let vocab = self.model_config.vocab_size;
        self.prompt_rows.clear();
        for (i, s) in scheduled.iter().enumerate() {
            let seq = self.seqs.get_mut(&s.id).expect("scheduled seq exists");
            let Some(k) = seq.params.prompt_logprobs.filter(|_| wants_prompt_logprobs(seq)) else {
                continue;
            };
            let (first, end) = (
                seq.num_computed_tokens,
                seq.num_computed_tokens + s.num_new_tokens,
            );
            let prompt_len = seq.prompt_token_ids.len();
            if end < prompt_len {
                let row = &self.logits[i * vocab..(i + 1) * vocab];
                let lp = token_logprob(row, seq.prompt_token_ids[end], k, &mut self.logprob_scratch);
                seq.prompt_logprobs[end] = Some(lp);
            }
            let start = self.batch.query_start[i] as usize;
            for pos in first..end - 1 {
                self.prompt_rows.push(((start + pos - first) as u32, i, pos));
            }
        }
        let max_rows = self.resolved.max_num_seqs;
        for chunk in self.prompt_rows.chunks(max_rows) {
            self.token_rows.clear();
            self.token_rows.extend(chunk.iter().map(|r| r.0));
            let logits = self.backend.token_logits(&self.token_rows)?;
            for (row, &(_, i, pos)) in logits.chunks_exact(vocab).zip(chunk) {
                let seq = self.seqs.get_mut(&scheduled[i].id).expect("scheduled seq exists");
                let k = seq.params.prompt_logprobs.unwrap_or(0);
                let next = seq.prompt_token_ids[pos + 1];
                seq.prompt_logprobs[pos + 1] = Some(token_logprob(row, next, k, &mut self.logprob_scratch));
            }
        }
        Ok(())
    }

    /// Runs the packed step and draws a token per scheduled sequence into `sampled`: on the
    /// device where the backend can take the step, with a random number per row from the
    /// request's own RNG; else on the host from the logits. A row that does not sample (a
    /// prompt chunk short of the end, `is_sampling[i]` false) leaves its request's RNG
    /// untouched, so a seeded request draws the same tokens chunked or not; its entry in
    /// `sampled` is a placeholder (the device still draws for the row, into nothing).
    ///
    /// A step in which a request wants log-probabilities is sampled on the host: they come
    /// from the raw logits, which the device sampler does not return. So is a step with a
    /// constrained row: its grammar's mask is applied to its logits on the host.
    fn sample_step(&mut self, scheduled: &[ScheduledSeq]) -> Result<()> {
        self.sampled.clear();
        self.sampled_logprobs.clear();
        self.sampled_logprobs.resize(scheduled.len(), None);
        self.logits.clear();
        self.logits_rows.clear();
        self.masks.clear();
        self.masks.resize(scheduled.len(), None);
        // Logprobs come from the raw logits, allowed ids need a mask the device sampler has not.
        let wants_host = scheduled.iter().zip(&self.is_sampling).any(|(s, &is_sampling)| {
            let p = &self.seqs[&s.id].params;
            let host_row = p.logprobs.is_some() || p.allowed_token_ids.is_some();
            (is_sampling && host_row) || wants_prompt_logprobs(&self.seqs[&s.id])
        });
        // Row of each constrained sequence that samples this step.
        let constrained: HashMap<SeqId, usize> = (scheduled.iter().enumerate())
            .filter(|&(i, s)| self.is_sampling[i] && self.seqs[&s.id].matcher.is_some())
            .map(|(i, s)| (s.id, i))
            .collect();
        if !wants_host && constrained.is_empty() && self.backend.can_sample(&self.batch) {
            let rows = self.batch.sampling.rows.iter_mut();
            for ((row, s), &is_sampling) in rows.zip(scheduled).zip(&self.is_sampling) {
                let seq = self.seqs.get_mut(&s.id).expect("scheduled seq exists");
                row.random = if is_sampling { seq.rng.random() } else { 0 };
            }
            let (ids, logits) = self.backend.forward_sample(&self.batch, self.return_logits)?;
            self.sampled.extend_from_slice(ids);
            self.logits.extend_from_slice(logits.unwrap_or_default());
        } else {
            let vocab = self.model_config.vocab_size;
            let mut matchers: Vec<(usize, &mut Matcher)> = (self.seqs.iter_mut())
                .filter_map(|(id, seq)| Some((*constrained.get(id)?, seq.matcher.as_mut()?)))
                .collect();
            let (backend, batch, logits) = (&mut self.backend, &self.batch, &mut self.logits);
            // The masks depend only on the tokens so far: computed while the model runs.
            let (forward, masks) = std::thread::scope(|scope| {
                let job = (!matchers.is_empty()).then(|| {
                    scope.spawn(|| {
                        (matchers.par_iter_mut())
                            .map(|(i, m)| (*i, m.compute_mask()))
                            .collect::<Vec<_>>()
                    })
                });
                let forward = backend.forward(batch).map(|l| logits.extend_from_slice(l));
                let masks = job.map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                (forward, masks)
            });
            forward?;
            for (i, mask) in masks.into_iter().flatten() {
                match mask {
                    Ok(m) => self.masks[i] = Some(m),
                    // An empty mask: the row ends with EOS (below).
                    Err(e) => {
                        tracing::warn!("structured output: computing the token mask failed: {e}");
                        self.masks[i] = Some(SimpleVob::alloc(vocab));
                    }
                }
            }
            for (i, s) in scheduled.iter().enumerate() {
                if !self.is_sampling[i] {
                    self.sampled.push(0);
                    continue;
                }
                let seq = self.seqs.get_mut(&s.id).expect("scheduled seq exists");
                let row = &mut self.logits[i * vocab..(i + 1) * vocab];
                if seq.params.logprobs.is_some() {
                    self.raw_row.clear();
                    self.raw_row.extend_from_slice(row);
                }
                if let Some(allowed) = &seq.params.allowed_token_ids {
                    keep_allowed(row, allowed, &mut self.allowed_scratch);
                }
                let mut banned = self.batch.sampling.banned(i);
                if let Some(mask) = &self.masks[i] {
                    apply_mask(mask, row);
                    // The grammar wins over min_tokens: where it allows only EOS or stop
                    // tokens, they are not banned; where it allows nothing (it failed), EOS.
                    if mask.num_set() == 0 {
                        if let Some(&eos) = self.model_config.eos_token_ids.first() {
                            row[eos as usize] = 0.0;
                        }
                        banned = &[];
                    } else if allows_only(mask, banned) {
                        banned = &[];
                    }
                }
                let token = self.sampler.sample(row, &seq.params, banned, &mut seq.rng);
                self.sampled.push(token);
                if let Some(k) = seq.params.logprobs {
                    let lp = token_logprob(&self.raw_row, token, k, &mut self.logprob_scratch);
                    self.sampled_logprobs[i] = Some(lp);
                }
            }
            self.prompt_logprobs(scheduled)?;
        }
        assert_eq!(self.sampled.len(), scheduled.len(), "a token per sequence");
        if !self.logits.is_empty() {
            let ids = (scheduled.iter().zip(&self.is_sampling))
                .map(|(s, &is_sampling)| is_sampling.then(|| self.seqs[&s.id].request_id.clone()));
            self.logits_rows.extend(ids);
        }
        Ok(())
    }
}

/// The request id of choice `index` of a request (`n` > 1): the request's own id for choice 0,
/// `"{index}_{request_id}"` (vLLM's naming of a parent's children) for the others. Each is a
/// request of its own to [`LLMEngine::abort_request`] and in [`RequestOutput`].
pub fn choice_request_id(request_id: &str, index: usize) -> String {
    match index {
        0 => request_id.to_string(),
        i => format!("{i}_{request_id}"),
    }
}

/// Feeds a constrained sequence's sampled token to its grammar; true when the output ends
/// there: the grammar is complete and admits nothing more (vLLM finishes such a request with
/// "stop"), the token is EOS (allowed only where the grammar may end), or the grammar failed.
fn is_grammar_done(matcher: &mut Matcher, token: u32, is_eos: bool) -> bool {
    if is_eos {
        return true;
    }
    if let Err(e) = matcher.consume_token(token) {
        tracing::warn!("structured output ended early: {e}");
        return true;
    }
    matcher.is_stopped()
}

/// Whether a sequence's step must compute log-probabilities of prompt tokens: it asked, and
/// its prompt has not produced its first output yet (after a preemption its prompt is
/// recomputed, its prompt logprobs already sent).
fn wants_prompt_logprobs(seq: &Sequence) -> bool {
    seq.params.prompt_logprobs.is_some() && seq.output_token_ids.is_empty()
}

fn load_tokenizer(dir: &Path) -> Result<Option<tokenizers::Tokenizer>> {
    let path = if dir.is_file() {
        dir.to_path_buf()
    } else {
        dir.join("tokenizer.json")
    };
    if !path.exists() {
        return Ok(None);
    }
    tokenizers::Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| Error::Tokenizer {
            path,
            msg: e.to_string(),
        })
}
