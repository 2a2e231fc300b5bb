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

/// A set of projections; [`LoraTargets::ALL`] by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraTargets(u8);

impl LoraTargets {
    pub const ALL: LoraTargets = LoraTargets((1 << LoraTarget::ALL.len()) - 1);
    pub const NONE: LoraTargets = LoraTargets(0);

    pub fn contains(self, t: LoraTarget) -> bool {
        self.0 & (1 << t.index()) != 0
    }

    pub fn with(self, t: LoraTarget) -> Self {
        self.union(LoraTargets(1 << t.index()))
    }

    pub fn union(self, other: LoraTargets) -> Self {
        LoraTargets(self.0 | other.0)
    }

    /// The projections a module name stands for: a PEFT name (`q_proj`, …) or vLLM's packed
    /// `qkv_proj` / `gate_up_proj`.
    pub fn of_module(name: &str) -> Option<Self> {
        use LoraTarget::*;
        let of = |ts: &[LoraTarget]| ts.iter().fold(LoraTargets::NONE, |set, &t| set.with(t));
        match name {
            "qkv_proj" => Some(of(&[QProj, KProj, VProj])),
            "gate_up_proj" => Some(of(&[GateProj, UpProj])),
            _ => LoraTarget::from_name(name).map(|t| LoraTargets::NONE.with(t)),
        }
    }

    pub fn iter(self) -> impl Iterator<Item = LoraTarget> {
        LoraTarget::ALL.into_iter().filter(move |&t| self.contains(t))
    }

    /// vLLM's `lora_target_modules`: PEFT module names or vLLM's packed `qkv_proj` /
    /// `gate_up_proj`; an unknown name or an empty list is an error naming the setting.
    pub fn parse(names: &[String]) -> crate::Result<Self> {
        if names.is_empty() {
            return Err(crate::Error::InvalidConfig(
                "lora_target_modules is empty; leave it out to allow every projection".into(),
            ));
        }
        let mut set = LoraTargets::NONE;
        for name in names {
            let named = LoraTargets::of_module(name).ok_or_else(|| {
                crate::Error::InvalidConfig(format!(
                    "lora_target_modules: {name:?} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, qkv_proj, gate_up_proj"
                ))
            })?;
            set = set.union(named);
        }
        Ok(set)
    }
}

impl Default for LoraTargets {
    fn default() -> Self {
        LoraTargets::ALL
    }
}

impl std::fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.iter().map(LoraTarget::name).collect();
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_module_names_as_peft_and_vllm_write_them() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let qv = LoraTargets::parse(&names(&["q_proj", "v_proj"])).unwrap();
        assert_eq!(qv.to_string(), "q_proj, v_proj");
        assert!(qv.contains(LoraTarget::VProj) && !qv.contains(LoraTarget::KProj));
        let packed = LoraTargets::parse(&names(&["qkv_proj", "gate_up_proj", "o_proj"])).unwrap();
        assert_eq!(
            packed.to_string(),
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj"
        );
        let all = LoraTargets::parse(&names(&["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])).unwrap();
        assert_eq!(all, LoraTargets::ALL);
        let err = LoraTargets::parse(&names(&["q_proj", "lm_head"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"lm_head\"") && err.contains("lora_target_modules"),
            "{err}"
        );
        assert!(LoraTargets::parse(&[]).is_err());
    }
}
