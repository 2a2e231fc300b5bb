//! The CPU backend: the embedded default and the test oracle. Weight matrices stay in the dtype
//! the engine resolved (f32, or a checkpoint's bf16/f16, read in place from the memory map) and
//! are widened inside the kernels; activations, LoRA weights and the KV cache are f32. Every
//! buffer a step needs is allocated up front for `max_num_batched_tokens` tokens, so the decode
//! loop does not allocate.

pub mod attention;
pub mod linear;
pub mod ops;

use crate::backend::{Backend, BackendConfig, KvCacheSize, StepBatch};
use crate::error::Result;
use crate::lora::adapter::LoraAdapter;
use crate::lora::punica::LoraStack;
use crate::lora::{LoraSlot, LoraTarget};
use crate::models::llama::{Llama, LoraInput};
use crate::tp::Sharding;
use crate::weights::{WeightDtype, WeightSource};
use crate::ModelConfig;

/// The paged KV cache: per layer and tensor-parallel rank (index `layer * ranks + rank`),
/// `[num_blocks * block_size, rank's KV heads * head_dim]`.
pub struct KvCache {
    pub block_size: usize,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl KvCache {
    /// Bytes one block takes over all layers and ranks (K and V, f32); replicated KV heads
    /// count once per rank that holds them.
    pub fn bytes_per_block(cfg: &ModelConfig, sharding: &Sharding, block_size: usize) -> usize {
        let per_rank = sharding.rank_config(cfg).kv_size();
        2 * cfg.num_hidden_layers * block_size * per_rank * sharding.size * std::mem::size_of::<f32>()
    }
}

/// Activation buffers for up to `max_tokens` tokens and `max_seqs` sequences per step.
pub struct Workspace {
    pub hidden: Vec<f32>,      // [max_tokens, hidden]
    pub normed: Vec<f32>,      // [max_tokens, hidden]
    pub lora_tmp: Vec<f32>,    // [max_tokens, max_lora_rank]
    pub last_hidden: Vec<f32>, // [max_seqs, hidden]
    pub logits: Vec<f32>,      // [max_seqs, vocab]
    /// `[tensor_parallel_size]`
    pub ranks: Vec<RankWorkspace>,
}

/// One tensor-parallel rank's buffers, in its shapes (its heads and intermediate features).
pub struct RankWorkspace {
    pub q: Vec<f32>,    // [max_tokens, q_size]
    pub k: Vec<f32>,    // [max_tokens, kv_size]
    pub v: Vec<f32>,    // [max_tokens, kv_size]
    pub attn: Vec<f32>, // [max_tokens, q_size]
    pub gate: Vec<f32>, // [max_tokens, intermediate]
    pub up: Vec<f32>,   // [max_tokens, intermediate]
    /// `[max_tokens, hidden]` its output of o_proj or down_proj (partial sums with several
    /// ranks; the all-reduce leaves their sum in rank 0's)
    pub out: Vec<f32>,
    /// `[max_seqs, its vocabulary rows]` its logits before they are gathered; empty with one rank
    pub logits: Vec<f32>,
}

impl Workspace {
    fn new(model: &Llama, max_tokens: usize, max_seqs: usize, max_lora_rank: usize) -> Self {
        let (cfg, rc, s) = (&model.cfg, &model.rank_cfg, &model.sharding);
        let z = |n: usize| vec![0.0f32; n];
        Workspace {
            hidden: z(max_tokens * cfg.hidden_size),
            normed: z(max_tokens * cfg.hidden_size),
            lora_tmp: z(max_tokens * max_lora_rank),
            last_hidden: z(max_seqs * cfg.hidden_size),
            logits: z(max_seqs * cfg.vocab_size),
            ranks: (0..s.size)
                .map(|r| RankWorkspace {
                    q: z(max_tokens * rc.q_size()),
                    k: z(max_tokens * rc.kv_size()),
                    v: z(max_tokens * rc.kv_size()),
                    attn: z(max_tokens * rc.q_size()),
                    gate: z(max_tokens * rc.intermediate_size),
                    up: z(max_tokens * rc.intermediate_size),
                    out: z(max_tokens * cfg.hidden_size),
                    logits: if s.size == 1 {
                        Vec::new()
                    } else {
                        z(max_seqs * s.vocab_rows(r).len())
                    },
                })
                .collect(),
        }
    }
}

/// What the CPU backend keeps weight matrices in: the `dtype` asked for; for `auto` the
/// config's `torch_dtype`, else the dtype the checkpoint's embedding is stored in (float32 when
/// that is neither 16-bit format, or for a dummy model).
pub fn weight_dtype(dtype: &str, torch_dtype: Option<&str>, weights: &WeightSource) -> Result<WeightDtype> {
    if let Some(d) = WeightDtype::from_name(dtype) {
        return Ok(d);
    }
    if let Some(d) = torch_dtype.and_then(WeightDtype::from_name) {
        return Ok(d);
    }
    Ok(match weights {
        WeightSource::Files { files, .. } => {
            WeightDtype::of_stored(files.dtype("model.embed_tokens.weight")?).unwrap_or(WeightDtype::F32)
        }
        WeightSource::Dummy { .. } => WeightDtype::F32,
    })
}

/// The KV cache's memory where `kv_cache_memory_bytes` is not given (vLLM's CPU default).
const CPU_KV_BYTES: usize = 4 << 30;

pub struct CpuBackend {
    dtype: WeightDtype,
    model: Llama,
    kv: KvCache,
    kv_size: KvCacheSize,
    ws: Workspace,
    /// See [`LoraInput::index`]; empty when LoRA is disabled
    lora_stacks: Vec<LoraStack>,
    /// Tokens of the last forward, whose final hidden states `ws.hidden` still holds
    num_last_tokens: usize,
    max_num_seqs: usize,
}

impl CpuBackend {
    /// Weight matrices are kept in the dtype [`weight_dtype`] picks from `bc.dtype`. With
    /// `tensor_parallel_size` above 1 the model is split over that many ranks, run one after
    /// another in this process: the same arithmetic as on several devices, not faster.
    pub fn new(cfg: &ModelConfig, weights: &mut WeightSource, bc: &BackendConfig) -> Result<Self> {
        let dtype = weight_dtype(&bc.dtype, cfg.torch_dtype.as_deref(), weights)?;
        let sharding = Sharding::new(cfg, bc.tensor_parallel_size)?;
        if sharding.size > 1 {
            tracing::info!(
                "tensor_parallel_size {}: the CPU backend runs the ranks one after another in this process (the split's arithmetic; not faster than one rank)",
                sharding.size
            );
        }
        let model = Llama::load(weights, cfg, sharding, bc.max_model_len, dtype)?;
        let (rc, num_ranks) = (&model.rank_cfg, model.sharding.size);
        let bytes_per_block = KvCache::bytes_per_block(cfg, &model.sharding, bc.block_size);
        let num_kv_blocks = bc.kv.blocks(bytes_per_block, CPU_KV_BYTES);
        let slots = num_kv_blocks * bc.block_size * rc.kv_size();
        let caches = cfg.num_hidden_layers * num_ranks;
        let kv = KvCache {
            block_size: bc.block_size,
            k: (0..caches).map(|_| vec![0.0; slots]).collect(),
            v: (0..caches).map(|_| vec![0.0; slots]).collect(),
        };
        let mut lora_stacks = Vec::new();
        if bc.max_loras > 0 {
            for _ in 0..cfg.num_hidden_layers {
                for t in LoraTarget::ALL {
                    let (i, o) = t.shape(rc);
                    for _ in 0..num_ranks {
                        lora_stacks.push(LoraStack::new(bc.max_loras, bc.max_lora_rank, i, o));
                    }
                }
            }
        }
        let ws = Workspace::new(
            &model,
            bc.max_num_batched_tokens,
            bc.max_num_seqs,
            bc.max_lora_rank,
        );
        Ok(CpuBackend {
            dtype,
            model,
            kv,
            kv_size: KvCacheSize {
                num_blocks: num_kv_blocks,
                bytes_per_block,
            },
            ws,
            lora_stacks,
            num_last_tokens: 0,
            max_num_seqs: bc.max_num_seqs,
        })
    }
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        match self.model.sharding.size {
            1 => format!("cpu ({} threads)", rayon::current_num_threads()),
            n => format!(
                "cpu ({} threads, {n} tensor-parallel ranks run in turn)",
                rayon::current_num_threads()
            ),
        }
    }

    fn kv_cache(&self) -> KvCacheSize {
        self.kv_size
    }

    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) -> Result<()> {
        let (cfg, sharding) = (&self.model.cfg, &self.model.sharding);
        assert!(!self.lora_stacks.is_empty(), "set_lora_slot with LoRA disabled");
        for layer in 0..cfg.num_hidden_layers {
            for t in LoraTarget::ALL {
                let module = adapter.and_then(|a| a.module(layer, t));
                for rank in 0..sharding.size {
                    let stack = &mut self.lora_stacks[LoraInput::index(layer, t, rank, sharding.size)];
                    match module {
                        Some(m) if sharding.size > 1 => {
                            let part = sharding.lora_module(m, t, t.shape(cfg).0, rank);
                            stack.set(slot, Some(&part));
                        }
                        m => stack.set(slot, m),
                    }
                }
            }
        }
        Ok(())
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<&[f32]> {
        let lora = (!self.lora_stacks.is_empty() && batch.has_lora()).then(|| LoraInput {
            stacks: &self.lora_stacks,
            token_lora: &batch.token_lora,
        });
        // The whole step on one of rayon's workers: each kernel's parallel loop is then a
        // fork inside the pool, not a job handed in from outside and waited for (a sleep and a
        // wake-up of this thread per kernel, ~50 a step).
        let (model, kv, ws) = (&self.model, &mut self.kv, &mut self.ws);
        rayon::scope(|_| model.forward(batch, kv, lora, ws));
        self.num_last_tokens = batch.num_tokens();
        Ok(&self.ws.logits[..batch.num_seqs() * self.model.cfg.vocab_size])
    }

    fn token_logits(&mut self, rows: &[u32]) -> Result<&[f32]> {
        assert!(
            rows.len() <= self.max_num_seqs,
            "at most max_num_seqs rows a call"
        );
        assert!(
            rows.iter().all(|&r| (r as usize) < self.num_last_tokens),
            "rows of the last step"
        );
        let (model, ws) = (&self.model, &mut self.ws);
        rayon::scope(|_| model.token_logits(rows, ws)); // on the pool, as `forward` is
        Ok(&self.ws.logits[..rows.len() * self.model.cfg.vocab_size])
    }
}
