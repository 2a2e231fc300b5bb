//! What a Llama-family checkpoint holds, as both backends read it: the tensors' names, the seven
//! projections ([`LoraTarget`], with their shapes) and how they fuse into four GEMMs that share
//! an input ([`ProjGroup`], vLLM's `packed_modules_mapping`). The CPU oracle, the CUDA loader,
//! the adapter slots and the step plan all take their names and groups from here, so the
//! oracle and the fast path cannot drift apart.

use crate::lora::LoraTarget;

/// Projections that share an input and run as one GEMM (their weights concatenated along the
/// output dimension on the GPU), with one LoRA shrink and one expand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjGroup {
    Qkv = 0,
    O = 1,
    GateUp = 2,
    Down = 3,
}

impl ProjGroup {
    pub const ALL: [ProjGroup; 4] = [Self::Qkv, Self::O, Self::GateUp, Self::Down];

    /// The projections of the group, in the order their outputs are concatenated.
    pub fn targets(self) -> &'static [LoraTarget] {
        use LoraTarget::*;
        match self {
            ProjGroup::Qkv => &[QProj, KProj, VProj],
            ProjGroup::O => &[OProj],
            ProjGroup::GateUp => &[GateProj, UpProj],
            ProjGroup::Down => &[DownProj],
        }
    }

    /// The group a projection belongs to.
    pub fn of(target: LoraTarget) -> ProjGroup {
        Self::ALL
            .into_iter()
            .find(|g| g.targets().contains(&target))
            .expect("every projection is in a group")
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether a projection carries a bias in this model (Qwen2's q/k/v; Llama's `attention_bias`
/// on q/k/v and o).
pub fn has_bias(target: LoraTarget, cfg: &crate::ModelConfig) -> bool {
    match ProjGroup::of(target) {
        ProjGroup::Qkv => cfg.qkv_bias,
        ProjGroup::O => cfg.o_bias,
        ProjGroup::GateUp | ProjGroup::Down => false,
    }
}

/// `model.layers.{layer}.`
pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// A projection's module in layer `layer`: `model.layers.{layer}.self_attn.q_proj`, ...
pub fn proj_module(layer: usize, target: LoraTarget) -> String {
    format!("{}.{}.{}", layer_prefix(layer), target.parent(), target.name())
}

/// A projection's weight (`suffix` "weight") or bias ("bias") in layer `layer`.
pub fn proj_tensor(layer: usize, target: LoraTarget, suffix: &str) -> String {
    format!("{}.{suffix}", proj_module(layer, target))
}

/// A layer's own tensor: `input_layernorm.weight`, `self_attn.q_norm.weight`, ...
pub fn layer_tensor(layer: usize, name: &str) -> String {
    format!("{}.{name}", layer_prefix(layer))
}

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_projection_is_in_exactly_one_group_in_checkpoint_order() {
        let all: Vec<LoraTarget> = ProjGroup::ALL
            .iter()
            .flat_map(|g| g.targets().iter().copied())
            .collect();
        assert_eq!(
            all,
            LoraTarget::ALL,
            "the groups list the seven projections once, in order"
        );
        for t in LoraTarget::ALL {
            assert!(ProjGroup::of(t).targets().contains(&t));
        }
        // A group shares its input: the same in_features for each of its projections.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/llama-3-8b");
        let cfg = crate::ModelConfig::from_dir(&dir).unwrap();
        for g in ProjGroup::ALL {
            let inputs: Vec<usize> = g.targets().iter().map(|t| t.shape(&cfg).0).collect();
            assert!(inputs.windows(2).all(|w| w[0] == w[1]), "{g:?}: {inputs:?}");
        }
    }

    #[test]
    fn tensor_names_are_hf_names() {
        assert_eq!(
            proj_tensor(3, LoraTarget::KProj, "bias"),
            "model.layers.3.self_attn.k_proj.bias"
        );
        assert_eq!(
            proj_tensor(0, LoraTarget::DownProj, "weight"),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            layer_tensor(1, "input_layernorm.weight"),
            "model.layers.1.input_layernorm.weight"
        );
    }
}
