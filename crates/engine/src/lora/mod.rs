//! LoRA: PEFT adapters ([`adapter`]), the host cache and slot table with vLLM's semantics
//! ([`manager`]), and the batched shrink/expand ops that apply a different adapter to every
//! token of a step ([`punica`]).

pub mod adapter;
pub mod manager;
pub mod punica;
pub mod slots;

use std::path::PathBuf;

/// The caller's integer id of an adapter (vLLM's `lora_int_id`); always > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(pub u32);

/// A slot in the backend's stacked adapter weights; `max_loras` of them exist.
/// "No adapter" is `Option<LoraSlot>::None`, never a sentinel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoraSlot(pub u32);

impl LoraSlot {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What a request names to use an adapter, as vLLM's `LoRARequest(name, int_id, path)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraRequest {
    pub name: String,
    pub id: AdapterId,
    pub path: PathBuf,
}

/// The seven projections of a decoder layer that LoRA may target, in checkpoint vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// `self_attn` or `mlp`, the parent module in the checkpoint's names.
    pub fn parent(self) -> &'static str {
        match self {
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => "mlp",
            _ => "self_attn",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// (in_features, out_features) of this projection in the given model.
    pub fn shape(self, cfg: &crate::ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        match self {
            LoraTarget::QProj => (h, cfg.q_size()),
            LoraTarget::KProj | LoraTarget::VProj => (h, cfg.kv_size()),
            LoraTarget::OProj => (cfg.q_size(), h),
            LoraTarget::GateProj | LoraTarget::UpProj => (h, cfg.intermediate_size),
            LoraTarget::DownProj => (cfg.intermediate_size, h),
        }
    }
}
