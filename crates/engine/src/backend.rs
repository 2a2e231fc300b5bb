//! The boundary between the engine (scheduling, LoRA bookkeeping, sampling) and a device that
//! runs the model. A step is described by flat, preallocated buffers, as a GPU graph needs them:
//! every token of every scheduled sequence in one batch, its position, the KV-cache slot it
//! writes, and the LoRA slot of its request.

use crate::error::Result;
use crate::lora::adapter::LoraAdapter;
use crate::lora::LoraSlot;

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
    }

    pub fn has_lora(&self) -> bool {
        self.token_lora.iter().any(Option::is_some)
    }
}

/// What a backend allocates for, resolved once by the engine; every backend reads the same.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_kv_blocks: usize,
    /// 0 when LoRA is disabled.
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// No CUDA graphs (GPU backends).
    pub enforce_eager: bool,
    /// Seed of `load_format: dummy` weights where a backend generates them itself.
    pub seed: u64,
}

/// A device that holds the weights, the paged KV cache and `max_loras` adapter slots.
pub trait Backend: Send {
    /// Human-readable device description for reports.
    fn device_name(&self) -> String;

    /// Fills (or clears) an adapter slot; called by the engine when the LoRA manager activates
    /// an adapter for a step.
    fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>);

    /// Runs the model over the step and returns the logits of each sequence's last token,
    /// `[num_seqs, vocab_size]`.
    fn forward(&mut self, batch: &StepBatch) -> Result<&[f32]>;

    /// Device time of the last `forward`, measured with device events (GPU backends); `None`
    /// where the device has no such clock.
    fn last_device_time(&self) -> Option<std::time::Duration> {
        None
    }
}
