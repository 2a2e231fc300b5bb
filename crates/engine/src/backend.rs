//! The boundary between the engine (scheduling, LoRA bookkeeping, sampling) and a device that
//! runs the model. A step is described by flat, preallocated buffers, as a GPU graph needs them:
//! every token of every scheduled sequence in one batch, its position, the KV-cache slot it
//! writes, and the LoRA slot of its request. A backend may also sample on the device: then the
//! engine hands it each sequence's sampling parameters and gets token ids back, not logits.

use std::any::Any;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::LoraSlot;
use crate::sampling::SamplingParams;

/// One engine step's inputs. Reused across steps: cleared, never shrunk.
#[derive(Debug, Default)]
pub struct StepBatch {
    /// `[T]`
    pub token_ids: Vec<u32>,
    /// `[T]` absolute position of each token in its sequence
    pub positions: Vec<u32>,
    /// `[T]` KV-cache slot (`block * block_size + offset`) each token's K/V go to
    pub slot_mapping: Vec<u32>,
    /// `[T]` adapter slot of each token's request
    pub token_lora: Vec<Option<LoraSlot>>,
    /// `[num_seqs + 1]` offset of each sequence's first token in the step
    pub query_start: Vec<u32>,
    /// `[num_seqs, max_blocks_per_seq]` block tables, padded with 0
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    /// How each sequence's next token is drawn.
    pub sampling: SamplingBatch,
}

impl StepBatch {
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.query_start.len().saturating_sub(1)
    }

    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slot_mapping.clear();
        self.token_lora.clear();
        self.query_start.clear();
        self.query_start.push(0);
        self.block_tables.clear();
        self.sampling.clear();
    }

    pub fn has_lora(&self) -> bool {
        self.token_lora.iter().any(Option::is_some)
    }
}

/// One sequence's sampling parameters as a device sampler takes them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowSampling {
    /// 0: greedy (argmax, the first index on ties).
    pub temperature: f32,
    /// 0: disabled.
    pub top_k: u32,
    /// 1.0: disabled.
    pub top_p: f32,
    /// Drawn by the engine from the request's own RNG, so `seed` reproduces a request wherever
    /// it is batched; filled only when the backend samples the step. A step whose banned ids
    /// do not fit the device buffer (many `stop_token_ids` under `min_tokens`) is sampled on the
    /// host for every row, which draws differently: seeded output then depends on that step.
    pub random: u64,
}

impl RowSampling {
    pub fn new(p: &SamplingParams) -> Self {
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k.max(0) as u32,
            top_p: p.top_p,
            random: 0,
        }
    }
}

/// The sampling side of a step: a row per sequence, and the token ids each row must not draw
/// (EOS and stop ids before `min_tokens`). Reused across steps: cleared, never shrunk.
#[derive(Debug)]
pub struct SamplingBatch {
    /// `[num_seqs]`
    pub rows: Vec<RowSampling>,
    /// `[num_seqs + 1]` offset of each row's banned ids in `banned`
    pub banned_start: Vec<u32>,
    /// `[banned_start[num_seqs]]`
    pub banned: Vec<u32>,
}

impl Default for SamplingBatch {
    fn default() -> Self {
        SamplingBatch {
            rows: Vec::new(),
            banned_start: vec![0],
            banned: Vec::new(),
        }
    }
}

impl SamplingBatch {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.banned.clear();
        self.banned_start.clear();
        self.banned_start.push(0);
    }

    pub fn push(&mut self, row: RowSampling, banned: impl IntoIterator<Item = u32>) {
        self.rows.push(row);
        self.banned.extend(banned);
        self.banned_start.push(self.banned.len() as u32);
    }

    /// Banned ids of row `i`.
    pub fn banned(&self, i: usize) -> &[u32] {
        &self.banned[self.banned_start[i] as usize..self.banned_start[i + 1] as usize]
    }
}

/// An adapter in a backend's own form (element type, layout, pinned memory), made by its
/// [`AdapterPreparer`] on a loader thread and carried by the [`LoraAdapter`] to
/// [`Backend::set_lora_slot`], which then only copies.
#[derive(Clone)]
pub struct PreparedAdapter(pub Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for PreparedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedAdapter")
    }
}

/// Converts a loaded adapter into its backend's form, off the engine step (on the adapter
/// loader threads, and on the caller's thread for an adapter's first load).
pub trait AdapterPreparer: Send + Sync + std::fmt::Debug {
    fn prepare(&self, adapter: &LoraAdapter) -> Result<PreparedAdapter>;

    /// The prepared form is all the backend reads: the f32 weights are dropped from the host
    /// cache once it is made (a third of the memory where the form is 16-bit).
    fn replaces_host_weights(&self) -> bool {
        false
    }
}

/// What a backend allocates for, resolved once by the engine; every backend reads the same.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// What the KV cache may take: the backend sizes it ([`KvBudget::blocks`]).
    pub kv: KvBudget,
    /// 0 when LoRA is disabled.
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// Ranks the model is split over (Megatron-style, see [`crate::tp`]).
    pub tensor_parallel_size: usize,
    /// No CUDA graphs (GPU backends).
    pub enforce_eager: bool,
    /// Wait for each adapter's copy into its slot before `set_lora_slot` returns, rather than
    /// ordering it with events (GPU backends; a reference for tests and measurements).
    pub sync_lora_uploads: bool,
    /// vLLM's `dtype` as asked (`auto`, `float32`, `bfloat16`, `float16`, `half`, `float`): each
    /// backend picks what it keeps weights in from it ([`Backend::dtype`] says what it chose).
    pub dtype: String,
    /// Seed of `load_format: dummy` weights where a backend generates them itself.
    pub seed: u64,
    /// The CUDA backend's tuning switches.
    pub cuda: crate::cuda::CudaOptions,
}

/// The memory a KV cache may take, in vLLM's terms. A backend knows its element size and, on a
/// GPU, how much memory its weights, adapter slots and buffers left; it sizes the cache from
/// this after loading everything else.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvBudget {
    /// Blocks the engine can use at most: `max_num_seqs` sequences of `max_model_len` (there is
    /// no prefix cache, so more would stay empty).
    pub wanted_blocks: usize,
    /// vLLM's `num_gpu_blocks_override`: exactly this many.
    pub num_blocks_override: Option<usize>,
    /// vLLM's `kv_cache_memory_bytes`: this much memory, whatever the device has left.
    pub memory_bytes: Option<usize>,
    /// vLLM's `gpu_memory_utilization`: the share of the device's memory this process may take
    /// in all (weights and buffers included); the KV cache gets what is left of it.
    pub gpu_memory_utilization: f32,
}

impl KvBudget {
    /// Blocks of `bytes_per_block` the cache gets where the device has `available` bytes for it.
    pub fn blocks(&self, bytes_per_block: usize, available: usize) -> usize {
        if let Some(n) = self.num_blocks_override {
            return n;
        }
        let bytes = self.memory_bytes.unwrap_or(available);
        self.wanted_blocks.min(bytes / bytes_per_block.max(1))
    }
}

/// The KV cache a backend allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSize {
    pub num_blocks: usize,
    pub bytes_per_block: usize,
}

/// A device that holds the weights, the paged KV cache and `max_loras` adapter slots.
pub trait Backend: Send {
    /// Human-readable device description for reports.
    fn device_name(&self) -> String;

    /// The KV cache it sized from [`BackendConfig::kv`] and allocated.
    fn kv_cache(&self) -> KvCacheSize;

    /// What it keeps weights in (vLLM's dtype name), chosen from [`BackendConfig::dtype`].
    fn dtype(&self) -> &'static str;

    /// Fills (or clears) an adapter slot; called by the engine when the LoRA manager activates
    /// an adapter for a step. The slot must not be read by a step that follows until its
    /// contents arrived (a backend that copies asynchronously orders that itself). An error
    /// (a failed device copy) fails the step that needed the adapter.
    fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) -> Result<()>;

    /// What converts adapters into this backend's form on the loader threads; `None` where
    /// `set_lora_slot` takes them as loaded.
    fn adapter_preparer(&self) -> Option<Arc<dyn AdapterPreparer>> {
        None
    }

    /// Runs the model over the step and returns the logits of each sequence's last token,
    /// `[num_seqs, vocab_size]`.
    fn forward(&mut self, batch: &StepBatch) -> Result<&[f32]>;

    /// Logits of chosen tokens of the step [`Backend::forward`] just ran, `[rows.len(),
    /// vocab_size]`: `rows` index the step's tokens (`batch.token_ids`), at most
    /// `max_num_seqs` of them a call. What `prompt_logprobs` needs besides each sequence's last
    /// token, computed only for the rows asked (the step's final hidden states are still there).
    fn token_logits(&mut self, rows: &[u32]) -> Result<&[f32]>;

    /// Whether [`Backend::forward_sample`] can run this step: the backend samples on the device
    /// and the step's banned ids fit its buffers. The engine samples on the host otherwise.
    fn can_sample(&self, _batch: &StepBatch) -> bool {
        false
    }

    /// Runs the model and draws one token per sequence on the device, as `batch.sampling`
    /// says: `[num_seqs]` token ids, and with `with_logits` also the logits the ids were drawn
    /// from, `[num_seqs, vocab_size]` with banned ids at -inf. Only called after
    /// [`Backend::can_sample`] said yes for the batch.
    fn forward_sample(&mut self, _batch: &StepBatch, _with_logits: bool) -> Result<(&[u32], Option<&[f32]>)> {
        Err(Error::Backend(
            "this backend does not sample on the device".into(),
        ))
    }

    /// Device time of the last `forward`, measured with device events (GPU backends); `None`
    /// where the device has no such clock.
    fn last_device_time(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kv_budget_takes_the_override_then_the_bytes_then_what_is_left() {
        let b = KvBudget {
            wanted_blocks: 100,
            num_blocks_override: None,
            memory_bytes: None,
            gpu_memory_utilization: 0.9,
        };
        assert_eq!(b.blocks(1000, 50_500), 50, "what the device has left");
        assert_eq!(b.blocks(1000, 1 << 30), 100, "no more than the engine can use");
        assert_eq!(b.blocks(1000, 999), 0);
        let bytes = KvBudget {
            memory_bytes: Some(20_000),
            ..b
        };
        assert_eq!(
            bytes.blocks(1000, 1 << 30),
            20,
            "kv_cache_memory_bytes over the device's"
        );
        let exact = KvBudget {
            num_blocks_override: Some(7),
            ..bytes
        };
        assert_eq!(exact.blocks(1000, 0), 7);
    }

    #[test]
    fn sampling_rows_keep_their_banned_ids() {
        let mut s = SamplingBatch::default();
        let greedy = RowSampling::new(&SamplingParams::greedy(1));
        let top_k = RowSampling::new(&SamplingParams {
            top_k: -1,
            ..Default::default()
        });
        assert_eq!((greedy.temperature, top_k.top_k), (0.0, 0), "-1 disables top-k");
        for _ in 0..2 {
            s.clear();
            s.push(greedy, [2, 7]);
            s.push(top_k, []);
            s.push(greedy, [5]);
            assert_eq!(s.banned(0), &[2, 7]);
            assert!(s.banned(1).is_empty());
            assert_eq!(s.banned(2), &[5]);
            assert_eq!(s.banned_start, [0, 2, 2, 3]);
        }
    }
}
